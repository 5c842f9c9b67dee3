//! Instance agent: the sidecar beside each vLLM.
