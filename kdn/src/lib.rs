//! KDN: LMCache key scheme, KV stores, knowledge registry and injection.
