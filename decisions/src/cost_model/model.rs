//! [`CostModel`]: the fitted curves, and the predictions made from them (a forward's
//! prefill, cached prefill, decode step, host-to-device copy, one batching step).

use super::{evaluate, CalibrationProfile, CostModelError, FitReport};
use serde::{Deserialize, Serialize};

/// The shape of one continuous-batching step (one forward pass), as aggregates over the
/// sequences scheduled in it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepShape {
    /// Σ S_i: new prompt tokens computed this step (prefill chunks).
    pub prefill_new_tokens: u64,
    /// Σ S_i²/2: causal attention pairs among the new prefill tokens.
    pub prefill_self_pairs: f64,
    /// Σ S_i·P_i: attention pairs between new prefill tokens and the P_i tokens of their
    /// sequence already in the KV cache (prefix-cache hits and earlier prefill chunks).
    pub prefill_context_pairs: f64,
    /// Sequences decoding one token this step.
    pub decode_batch: u64,
    /// Σ context length of the decoding sequences.
    pub decode_context_tokens: u64,
}

impl StepShape {
    /// Add a prefill chunk of `new` tokens on top of `context` tokens already cached.
    pub fn add_prefill(&mut self, context: u64, new: u64) {
        let s = new as f64;
        self.prefill_new_tokens += new;
        self.prefill_self_pairs += s * s / 2.0;
        self.prefill_context_pairs += s * context as f64;
    }

    /// Add one decoding sequence at context `context`.
    pub fn add_decode(&mut self, context: u64) {
        self.decode_batch += 1;
        self.decode_context_tokens += context;
    }

    pub fn is_empty(&self) -> bool {
        self.prefill_new_tokens == 0 && self.decode_batch == 0
    }
}

/// Fitted cost curves (milliseconds). Fields are public so a caller can inspect or adjust
/// them (e.g. lower the eager-PyTorch floors to mimic CUDA graphs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// Fixed part of a forward pass with prefill tokens (ms).
    pub prefill_intercept_ms: f64,
    /// Per new token (ms/token): the linear layers.
    pub prefill_ms_per_token: f64,
    /// Per causal attention pair among new tokens (ms/pair).
    pub prefill_ms_per_pair: f64,
    /// Small-size floor of a prefill forward (eager per-forward overhead, ms).
    pub prefill_floor_ms: f64,
    /// Per attention pair between a new token and a cached token (ms/pair).
    pub cached_ms_per_context_pair: f64,
    /// Floor of a forward over new tokens on top of a cache (ms).
    pub cached_floor_ms: f64,
    /// Fixed part of a decode step (ms): weights read + per-forward overhead.
    pub decode_intercept_ms: f64,
    /// Per decoding sequence (ms).
    pub decode_ms_per_seq: f64,
    /// Per context token read by a decoding sequence (ms/token).
    pub decode_ms_per_context_token: f64,
    /// Host-to-device bandwidth for pinned memory (GB/s, 1e9 bytes).
    pub h2d_gbps: f64,
    /// KV cache bytes per token.
    pub kv_bytes_per_token: u64,
}

impl CostModel {
    /// Parse a profile's JSON and fit it.
    pub fn from_profile_json(text: &str) -> Result<CostModel, CostModelError> {
        Self::fit(&CalibrationProfile::from_json(text)?)
    }

    /// One forward over `batched_tokens` new tokens with no cache, as one sequence
    /// (`max(floor, a + lin·N + attn·N²/2)`); 0 for 0 tokens.
    pub fn prefill_ms(&self, batched_tokens: u64) -> f64 {
        self.prefill_batch_ms(1, batched_tokens)
    }

    /// One forward over `batch` sequences of `tokens` new tokens each, no cache.
    pub fn prefill_batch_ms(&self, batch: u64, tokens: u64) -> f64 {
        if batch == 0 || tokens == 0 {
            return 0.0;
        }
        let t = (batch * tokens) as f64;
        let q = batch as f64 * (tokens as f64).powi(2) / 2.0;
        (self.prefill_intercept_ms + self.prefill_ms_per_token * t + self.prefill_ms_per_pair * q)
            .max(self.prefill_floor_ms)
    }

    /// `new_tokens` new tokens on top of `cached_tokens` already in the KV cache (one
    /// sequence). Equals [`prefill_ms`](Self::prefill_ms) when nothing is cached.
    pub fn cached_prefill_ms(&self, cached_tokens: u64, new_tokens: u64) -> f64 {
        let mut s = StepShape::default();
        s.add_prefill(cached_tokens, new_tokens);
        self.step_cost(&s)
    }

    /// One decode step of `batch` sequences at context `context` each.
    pub fn decode_step_ms(&self, batch: u64, context: u64) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        let b = batch as f64;
        self.decode_intercept_ms
            + self.decode_ms_per_seq * b
            + self.decode_ms_per_context_token * b * context as f64
    }

    /// Copy `bytes` from pinned host memory to the GPU.
    pub fn h2d_ms(&self, bytes: u64) -> f64 {
        bytes as f64 / (self.h2d_gbps * 1e6)
    }

    /// KV cache bytes of `tokens` tokens.
    pub fn kv_bytes(&self, tokens: u64) -> u64 {
        tokens * self.kv_bytes_per_token
    }

    /// One continuous-batching step with a prefill part and a decode part, in the simple
    /// 4-number form: a prefill chunk of `prefill_new_tokens` on top of
    /// `prefill_cached_context` tokens already in the KV cache (one sequence), plus
    /// `decode_batch` decoding sequences at context `decode_context` each. See
    /// [`step_cost`](Self::step_cost) for how the parts combine.
    pub fn step_ms(
        &self,
        prefill_new_tokens: u64,
        prefill_cached_context: u64,
        decode_batch: u64,
        decode_context: u64,
    ) -> f64 {
        let mut s = StepShape::default();
        s.add_prefill(prefill_cached_context, prefill_new_tokens);
        s.decode_batch = decode_batch;
        s.decode_context_tokens = decode_batch * decode_context;
        self.step_cost(&s)
    }

    /// One continuous-batching step: one forward pass over every scheduled token.
    ///
    /// * decode only: `decode = a_d + b_d·B + kv_d·ΣC` (the decode curve).
    /// * with prefill tokens: the fixed part is paid once, every token (prefill or decode)
    ///   costs `lin` in the linear layers, and attention adds `attn·Σ S²/2` (new × new),
    ///   `ctx_attn·Σ S·P` (new × cached) and `kv_d·ΣC` (decode KV reads):
    ///   `step = max(floor, a + lin·(T + B) + attn·ΣS²/2 + ctx_attn·ΣS·P + kv_d·ΣC)`,
    ///   where `floor` is the prefill floor, or the larger of the prefill and cached floors
    ///   when some prefill token attends to cached context; and never less than the decode
    ///   part alone.
    pub fn step_cost(&self, s: &StepShape) -> f64 {
        let decode = self.decode_intercept_ms
            + self.decode_ms_per_seq * s.decode_batch as f64
            + self.decode_ms_per_context_token * s.decode_context_tokens as f64;
        if s.prefill_new_tokens == 0 {
            return if s.decode_batch == 0 { 0.0 } else { decode };
        }
        let floor = if s.prefill_context_pairs > 0.0 {
            self.prefill_floor_ms.max(self.cached_floor_ms)
        } else {
            self.prefill_floor_ms
        };
        let t = (s.prefill_new_tokens + s.decode_batch) as f64;
        let mixed = self.prefill_intercept_ms
            + self.prefill_ms_per_token * t
            + self.prefill_ms_per_pair * s.prefill_self_pairs
            + self.cached_ms_per_context_pair * s.prefill_context_pairs
            + self.decode_ms_per_context_token * s.decode_context_tokens as f64;
        let mixed = mixed.max(floor);
        if s.decode_batch > 0 {
            mixed.max(decode)
        } else {
            mixed
        }
    }

    /// Fit `profile`, then report how well each curve reproduces the profile's points, in
    /// sample and leave-one-out (refit without the point, predict it).
    pub fn evaluate(profile: &CalibrationProfile) -> Result<FitReport, CostModelError> {
        evaluate(profile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost_model::fixtures::both;
    #[test]
    fn monotone_in_tokens() {
        for (name, p) in both() {
            let m = CostModel::fit(&p).unwrap();
            let sizes = [
                0u64, 1, 16, 100, 128, 512, 1000, 2048, 4096, 8192, 20000, 65536,
            ];
            for w in sizes.windows(2) {
                assert!(
                    m.prefill_ms(w[1]) >= m.prefill_ms(w[0]),
                    "{name} prefill {w:?}"
                );
                for p_ in [0u64, 512, 4096, 32768] {
                    assert!(
                        m.cached_prefill_ms(p_, w[1]) >= m.cached_prefill_ms(p_, w[0]),
                        "{name} cached new {w:?} P={p_}"
                    );
                    assert!(
                        m.cached_prefill_ms(w[1], 256) >= m.cached_prefill_ms(w[0], 256),
                        "{name} cached ctx {w:?}"
                    );
                }
                for b in [1u64, 8, 64] {
                    assert!(
                        m.decode_step_ms(b, w[1]) >= m.decode_step_ms(b, w[0]),
                        "{name}"
                    );
                }
                assert!(m.decode_step_ms(w[1].max(1), 1024) >= m.decode_step_ms(w[0].max(1), 1024));
                assert!(m.h2d_ms(w[1]) >= m.h2d_ms(w[0]));
                assert!(
                    m.step_ms(w[1], 0, 8, 1024) >= m.step_ms(w[0], 0, 8, 1024),
                    "{name}"
                );
                assert!(
                    m.step_ms(512, 0, w[1], 1024) >= m.step_ms(512, 0, w[0], 1024),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn cached_prefill_beats_full_prefill_for_large_prefix() {
        for (name, p) in both() {
            let m = CostModel::fit(&p).unwrap();
            for (pp, s) in [(2048u64, 128u64), (4096, 512), (8192, 256), (32768, 512)] {
                let cached = m.cached_prefill_ms(pp, s) + m.h2d_ms(m.kv_bytes(pp));
                let full = m.prefill_ms(pp + s);
                assert!(
                    cached < full,
                    "{name}: P={pp} S={s}: cached {cached} full {full}"
                );
            }
            assert_eq!(m.cached_prefill_ms(0, 1000), m.prefill_ms(1000));
        }
    }

    #[test]
    fn step_combines_parts() {
        for (_, p) in both() {
            let m = CostModel::fit(&p).unwrap();
            assert_eq!(m.step_ms(0, 0, 0, 0), 0.0);
            assert_eq!(m.step_ms(0, 0, 8, 1024), m.decode_step_ms(8, 1024));
            assert_eq!(m.step_ms(2048, 0, 0, 0), m.prefill_ms(2048));
            assert_eq!(m.step_ms(512, 4096, 0, 0), m.cached_prefill_ms(4096, 512));
            let mixed = m.step_ms(2048, 0, 32, 2048);
            assert!(mixed >= m.prefill_ms(2048) && mixed >= m.decode_step_ms(32, 2048));
            // one mixed forward is cheaper than the two passes run separately
            assert!(mixed < m.prefill_ms(2048) + m.decode_step_ms(32, 2048));
            // StepShape aggregates several sequences
            let mut s = StepShape::default();
            s.add_prefill(0, 1024);
            s.add_prefill(0, 1024);
            assert!((m.step_cost(&s) - m.prefill_batch_ms(2, 1024)).abs() < 1e-9);
        }
    }
}
