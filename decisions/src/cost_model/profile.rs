//! The calibration profile format (`conf/profiles/*.json`, `docs/calibration.md`) and its
//! measured points, read tolerantly: unknown fields ignored, failed points skipped, bad
//! keys a clear error.

use super::CostModelError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Model shape as recorded in a profile. Unknown fields are ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct ModelConfig {
    pub hidden_size: u64,
    pub intermediate_size: u64,
    pub num_hidden_layers: u64,
    pub num_attention_heads: u64,
    pub num_key_value_heads: u64,
    pub vocab_size: u64,
}

impl ModelConfig {
    /// Head dimension (hidden / attention heads), 128 for Llama-3.
    pub fn head_dim(&self) -> u64 {
        self.hidden_size
            .checked_div(self.num_attention_heads)
            .unwrap_or(128)
    }

    /// Approximate parameter count of a Llama-style decoder (embeddings + LM head + layers).
    pub fn approx_params(&self) -> u64 {
        let h = self.hidden_size;
        let kv = self.num_key_value_heads * self.head_dim();
        let per_layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size;
        2 * self.vocab_size * h + self.num_hidden_layers * per_layer
    }
}

/// A measured GPU profile (the JSON format of `conf/profiles/*.json`, `docs/calibration.md`).
///
/// Timing maps keep the string keys of the file ("n", "BxN", "P+S", "BxC", "16MB_pinned");
/// values that are not numbers (the profiler writes `"error: ..."` for a failed point) are
/// skipped by the accessors. Unknown fields are ignored; every field may be missing except
/// the prefill points needed to fit.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct CalibrationProfile {
    pub device: String,
    pub model: String,
    pub config: ModelConfig,
    pub kv_bytes_per_token: Option<u64>,
    /// GPUs the model is spread over (tensor/pipeline parallel; absent: 1).
    pub gpus: Option<u64>,
    /// Memory of one GPU in GB (1e9 bytes; absent: 80, an H100).
    pub gpu_memory_gb: Option<f64>,
    pub prefill_b1_ms: BTreeMap<String, serde_json::Value>,
    pub prefill_batched_ms: BTreeMap<String, serde_json::Value>,
    pub cached_prefill_ms: BTreeMap<String, serde_json::Value>,
    pub decode_step_ms: BTreeMap<String, serde_json::Value>,
    #[serde(rename = "h2d_GBps")]
    pub h2d_gbps: BTreeMap<String, serde_json::Value>,
}

/// A prefill measurement: `batch` sequences of `tokens` tokens each.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefillPoint {
    pub batch: u64,
    pub tokens: u64,
    pub ms: f64,
}

/// A cached-prefill measurement: `new` tokens on top of `cached` ones.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CachedPoint {
    pub cached: u64,
    pub new: u64,
    pub ms: f64,
}

/// A decode-step measurement: `batch` sequences at context `context`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodePoint {
    pub batch: u64,
    pub context: u64,
    pub ms: f64,
}

/// A host-to-device bandwidth measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct H2dPoint {
    pub bytes: u64,
    pub pinned: bool,
    pub gbps: f64,
}

fn num(v: &serde_json::Value) -> Option<f64> {
    v.as_f64().filter(|x| x.is_finite() && *x > 0.0)
}

fn parse_u64(
    field: &'static str,
    key: &str,
    s: &str,
    expected: &'static str,
) -> Result<u64, CostModelError> {
    s.trim().parse::<u64>().map_err(|_| CostModelError::BadKey {
        field,
        key: key.to_string(),
        expected,
    })
}

fn parse_pair(
    field: &'static str,
    key: &str,
    sep: char,
    expected: &'static str,
) -> Result<(u64, u64), CostModelError> {
    let (a, b) = key.split_once(sep).ok_or_else(|| CostModelError::BadKey {
        field,
        key: key.to_string(),
        expected,
    })?;
    Ok((
        parse_u64(field, key, a, expected)?,
        parse_u64(field, key, b, expected)?,
    ))
}

impl CalibrationProfile {
    /// Parse a profile from its JSON text.
    pub fn from_json(text: &str) -> Result<Self, CostModelError> {
        Ok(serde_json::from_str(text)?)
    }

    /// KV bytes per token: the recorded value, else 2 × layers × KV heads × head dim × 2 bytes.
    pub fn kv_bytes_per_token(&self) -> u64 {
        self.kv_bytes_per_token
            .filter(|b| *b > 0)
            .unwrap_or_else(|| {
                let c = &self.config;
                2 * c.num_hidden_layers.max(1) * c.num_key_value_heads.max(1) * c.head_dim() * 2
            })
    }

    /// All prefill points (`prefill_b1_ms` as batch 1, then `prefill_batched_ms`).
    pub fn prefill_points(&self) -> Result<Vec<PrefillPoint>, CostModelError> {
        let mut out = Vec::new();
        for (k, v) in &self.prefill_b1_ms {
            let n = parse_u64("prefill_b1_ms", k, k, "a token count like \"512\"")?;
            if let Some(ms) = num(v) {
                out.push(PrefillPoint {
                    batch: 1,
                    tokens: n,
                    ms,
                });
            }
        }
        for (k, v) in &self.prefill_batched_ms {
            let (b, n) = parse_pair("prefill_batched_ms", k, 'x', "\"BxN\" like \"4x512\"")?;
            if let Some(ms) = num(v) {
                out.push(PrefillPoint {
                    batch: b,
                    tokens: n,
                    ms,
                });
            }
        }
        Ok(out)
    }

    /// Cached-prefill points (`"P+S"`).
    pub fn cached_points(&self) -> Result<Vec<CachedPoint>, CostModelError> {
        let mut out = Vec::new();
        for (k, v) in &self.cached_prefill_ms {
            let (p, s) = parse_pair("cached_prefill_ms", k, '+', "\"P+S\" like \"1024+128\"")?;
            if let Some(ms) = num(v) {
                out.push(CachedPoint {
                    cached: p,
                    new: s,
                    ms,
                });
            }
        }
        Ok(out)
    }

    /// Decode points (`"BxC"`).
    pub fn decode_points(&self) -> Result<Vec<DecodePoint>, CostModelError> {
        let mut out = Vec::new();
        for (k, v) in &self.decode_step_ms {
            let (b, c) = parse_pair("decode_step_ms", k, 'x', "\"BxC\" like \"8x1024\"")?;
            if let Some(ms) = num(v) {
                out.push(DecodePoint {
                    batch: b,
                    context: c,
                    ms,
                });
            }
        }
        Ok(out)
    }

    /// Host-to-device points (`"16MB_pinned"`, `"64MB_pageable"`; MB = 2^20 bytes).
    pub fn h2d_points(&self) -> Result<Vec<H2dPoint>, CostModelError> {
        const EXPECTED: &str = "\"<size>MB_pinned\" or \"<size>MB_pageable\"";
        let mut out = Vec::new();
        for (k, v) in &self.h2d_gbps {
            let bad = || CostModelError::BadKey {
                field: "h2d_GBps",
                key: k.clone(),
                expected: EXPECTED,
            };
            let (size, kind) = k.split_once('_').ok_or_else(bad)?;
            let pinned = match kind {
                "pinned" => true,
                "pageable" => false,
                _ => return Err(bad()),
            };
            let (digits, mult) = if let Some(d) = size.strip_suffix("GB") {
                (d, 1u64 << 30)
            } else if let Some(d) = size.strip_suffix("MB") {
                (d, 1u64 << 20)
            } else if let Some(d) = size.strip_suffix("KB") {
                (d, 1u64 << 10)
            } else {
                return Err(bad());
            };
            let n = parse_u64("h2d_GBps", k, digits, EXPECTED)?;
            if let Some(gbps) = num(v) {
                out.push(H2dPoint {
                    bytes: n * mult,
                    pinned,
                    gbps,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost_model::fit::DEFAULT_H2D_GBPS;
    use crate::cost_model::fixtures::P8B;
    use crate::cost_model::CostModel;
    #[test]
    fn parses_profiles() {
        let p = CalibrationProfile::from_json(P8B).unwrap();
        assert_eq!(p.config.num_hidden_layers, 32);
        assert_eq!(p.kv_bytes_per_token(), 131072);
        assert_eq!(p.prefill_points().unwrap().len(), 15);
        assert_eq!(p.cached_points().unwrap().len(), 12);
        assert_eq!(p.decode_points().unwrap().len(), 6);
        let h = p.h2d_points().unwrap();
        assert_eq!(h.len(), 8);
        assert!(h.iter().any(|x| x.pinned && x.bytes == 16 << 20));
        // computed kv bytes match the recorded ones
        let mut q = p.clone();
        q.kv_bytes_per_token = None;
        assert_eq!(q.kv_bytes_per_token(), 131072);
    }

    #[test]
    fn tolerates_missing_and_unknown_fields_and_error_values() {
        let text = r#"{"prefill_b1_ms": {"1024": 30.0, "2048": 60.0, "4096": 121.0, "8192": "error: OOM"},
                       "something_new": [1,2,3], "config": {"hidden_size": 4096, "extra": 1}}"#;
        let p = CalibrationProfile::from_json(text).unwrap();
        assert_eq!(p.prefill_points().unwrap().len(), 3);
        let m = CostModel::fit(&p).unwrap();
        assert!(m.prefill_ms(4096) > m.prefill_ms(1024));
        assert!(m.decode_step_ms(8, 1024) > 0.0);
        assert!((m.h2d_gbps - DEFAULT_H2D_GBPS).abs() < 1e-9);
    }

    #[test]
    fn bad_keys_are_clear_errors() {
        let p = CalibrationProfile::from_json(
            r#"{"prefill_b1_ms": {"1024": 30.0, "2048": 60.0, "4096": 121.0},
                "prefill_batched_ms": {"4by512": 50.0}}"#,
        )
        .unwrap();
        let e = CostModel::fit(&p).unwrap_err().to_string();
        assert!(
            e.contains("4by512") && e.contains("prefill_batched_ms"),
            "{e}"
        );
        let p = CalibrationProfile::from_json(r#"{"cached_prefill_ms": {"512-32": 1.0}}"#).unwrap();
        assert!(p.cached_points().unwrap_err().to_string().contains("P+S"));
        let p = CalibrationProfile::from_json(r#"{"h2d_GBps": {"16MB_fast": 1.0}}"#).unwrap();
        assert!(p.h2d_points().is_err());
        assert!(CalibrationProfile::from_json("{not json").is_err());
        let p = CalibrationProfile::from_json(r#"{"prefill_b1_ms": {"1024": 30.0}}"#).unwrap();
        assert!(CostModel::fit(&p).is_err());
    }
}
