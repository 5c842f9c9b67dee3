//! GPU cost model fitted from a calibration profile (plain math, no I/O).
//!
//! A [`CalibrationProfile`] is the JSON written by `scripts/profile_llama.py` or
//! `scripts/calibrate_profile.py` (`docs/calibration.md`)
//! (see `conf/profiles/*.json`). [`CostModel::fit`] turns its measured points into a few
//! closed-form curves, all in milliseconds:
//!
//! * **prefill** (no cache), for a forward over sequences of `N_i` new tokens:
//!   `prefill = max(floor_p, a + lin·T + attn·Q)` with `T = Σ N_i` (batched tokens) and
//!   `Q = Σ N_i²/2` (causal attention pairs). `a`, `lin`, `attn` are a weighted (relative
//!   error) least-squares fit over the points clearly above the small-size floor; the floor
//!   (eager PyTorch's fixed per-forward overhead) is then chosen, among the measured values,
//!   to minimise the mean relative error over all points.
//!   `a` may come out below 0 only when that floor is above 0 (a floor, then a ramp: e.g.
//!   the reconstructed 8×RTX 5090 profile, whose short prompts cost one pass over the
//!   weights); otherwise negative coefficients are dropped and the fit redone.
//! * **cached prefill**, `S` new tokens on top of `P` tokens already in the KV cache:
//!   `cached = max(floor_c, a + lin·S + attn·S²/2 + ctx_attn·S·P)`. `a`, `lin`, `attn` are
//!   shared with prefill; `ctx_attn` (cost of one new-token × cached-token attention pair)
//!   and `floor_c` are found by a grid search minimising the mean relative error over the
//!   `cached_prefill_ms` points (`ctx_attn` between 0.1× and 20× `attn`).
//! * **decode** step of `B` sequences at context `C`:
//!   `decode = a_d + b_d·B + kv_d·B·C` (weighted least squares, negative coefficients dropped).
//! * **host-to-device copy**: `h2d = bytes / pinned bandwidth` (median of the pinned entries).
//!
//! One continuous-batching step ([`CostModel::step_cost`]) is one forward pass: see there.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The profiles shipped in `conf/profiles/`, embedded, by short name (the file name
/// without `.json`): what `--profile NAME` / `profile = "NAME"` select.
pub const BUILTIN_PROFILES: &[(&str, &str)] = &[
    (
        "h100-llama3-8b",
        include_str!("../../conf/profiles/h100-llama3-8b.json"),
    ),
    (
        "h100-llama3-70b-8layers",
        include_str!("../../conf/profiles/h100-llama3-70b-8layers.json"),
    ),
    (
        "h100x8-llama3-70b-tp8",
        include_str!("../../conf/profiles/h100x8-llama3-70b-tp8.json"),
    ),
    (
        "rtx5090x8-llama3-70b",
        include_str!("../../conf/profiles/rtx5090x8-llama3-70b.json"),
    ),
];

/// The JSON of a shipped profile by short name (see [`BUILTIN_PROFILES`]).
pub fn builtin_profile(name: &str) -> Option<&'static str> {
    BUILTIN_PROFILES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, json)| *json)
}

/// Errors while reading a profile or fitting a model.
#[derive(Debug, thiserror::Error)]
pub enum CostModelError {
    #[error("invalid calibration profile JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bad key {key:?} in {field}: expected {expected}")]
    BadKey {
        field: &'static str,
        key: String,
        expected: &'static str,
    },
    #[error("{0}")]
    Fit(String),
}

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

/// Default PCIe Gen4 x16-ish bandwidth when a profile has no h2d entries.
const DEFAULT_H2D_GBPS: f64 = 25.0;

/// Solve the weighted least-squares problem min Σ ((x_i·β − y_i)/y_i)² by normal equations.
#[allow(clippy::needless_range_loop)] // dense matrix code reads best with indices
fn relative_lstsq(rows: &[Vec<f64>], y: &[f64]) -> Option<Vec<f64>> {
    let n = rows.first()?.len();
    if rows.len() < n {
        return None;
    }
    // Scale columns for conditioning (pairs are ~1e7, intercept 1).
    let mut scale = vec![0.0f64; n];
    for r in rows {
        for j in 0..n {
            scale[j] = scale[j].max(r[j].abs());
        }
    }
    if scale.contains(&0.0) {
        return None;
    }
    let mut m = vec![vec![0.0f64; n + 1]; n];
    for (r, &yy) in rows.iter().zip(y) {
        let w = 1.0 / yy;
        let x: Vec<f64> = (0..n).map(|j| r[j] / scale[j] * w).collect();
        for i in 0..n {
            for j in 0..n {
                m[i][j] += x[i] * x[j];
            }
            m[i][n] += x[i] * 1.0; // y_i·w = 1
        }
    }
    // Gaussian elimination with partial pivoting.
    for c in 0..n {
        let p = (c..n).max_by(|&a, &b| m[a][c].abs().total_cmp(&m[b][c].abs()))?;
        m.swap(c, p);
        if m[c][c].abs() < 1e-12 {
            return None;
        }
        for r in 0..n {
            if r != c {
                let f = m[r][c] / m[c][c];
                for k in c..=n {
                    m[r][k] -= f * m[c][k];
                }
            }
        }
    }
    Some((0..n).map(|i| m[i][n] / m[i][i] / scale[i]).collect())
}

/// Least squares, dropping columns whose coefficient comes out negative (in the order
/// given by `drop_order`) until all are non-negative, except column `free` (if any),
/// which may stay negative.
fn nonneg_fit(
    rows: &[Vec<f64>],
    y: &[f64],
    drop_order: &[usize],
    free: Option<usize>,
) -> Option<Vec<f64>> {
    let n = rows.first()?.len();
    let mut active: Vec<bool> = vec![true; n];
    loop {
        let cols: Vec<usize> = (0..n).filter(|&j| active[j]).collect();
        if cols.is_empty() {
            return None;
        }
        let sub: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| cols.iter().map(|&j| r[j]).collect())
            .collect();
        let beta = relative_lstsq(&sub, y)?;
        let mut full = vec![0.0; n];
        for (k, &j) in cols.iter().enumerate() {
            full[j] = beta[k];
        }
        let negative = |j: usize| full[j] < 0.0 && Some(j) != free;
        match drop_order.iter().find(|&&j| active[j] && negative(j)) {
            Some(&j) => active[j] = false,
            None => {
                if (0..n).any(negative) {
                    // a negative column not in drop_order: give up on it too
                    for (j, a) in active.iter_mut().enumerate() {
                        if negative(j) {
                            *a = false;
                        }
                    }
                    continue;
                }
                return Some(full);
            }
        }
    }
}

fn rel_err(pred: f64, meas: f64) -> f64 {
    (pred - meas).abs() / meas
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Pick the floor among {0} ∪ measured values that minimises the mean relative error of
/// `max(floor, compute_i)` against `meas_i`.
fn best_floor(compute: &[f64], meas: &[f64]) -> f64 {
    let mut best = (f64::INFINITY, 0.0);
    for &fl in std::iter::once(&0.0).chain(meas.iter()) {
        let e: f64 = compute
            .iter()
            .zip(meas)
            .map(|(c, m)| rel_err(c.max(fl), *m))
            .sum();
        if e < best.0 - 1e-12 {
            best = (e, fl);
        }
    }
    best.1
}

impl CostModel {
    /// Fit a model from a profile. Needs at least 3 prefill points; the other curves fall
    /// back to prefill-derived values when their points are missing.
    pub fn fit(profile: &CalibrationProfile) -> Result<CostModel, CostModelError> {
        let pre = profile.prefill_points()?;
        let cached = profile.cached_points()?;
        let decode = profile.decode_points()?;
        let h2d = profile.h2d_points()?;
        Self::fit_points(profile.kv_bytes_per_token(), &pre, &cached, &decode, &h2d)
    }

    pub(crate) fn fit_points(
        kv_bytes_per_token: u64,
        pre: &[PrefillPoint],
        cached: &[CachedPoint],
        decode: &[DecodePoint],
        h2d: &[H2dPoint],
    ) -> Result<CostModel, CostModelError> {
        if pre.len() < 3 {
            return Err(CostModelError::Fit(format!(
                "need at least 3 prefill points to fit, got {}",
                pre.len()
            )));
        }
        // ---- prefill: max(floor, a + lin·T + attn·Q)
        let row = |p: &PrefillPoint| {
            let t = (p.batch * p.tokens) as f64;
            let q = p.batch as f64 * (p.tokens as f64).powi(2) / 2.0;
            vec![1.0, t, q]
        };
        let meas: Vec<f64> = pre.iter().map(|p| p.ms).collect();
        let min_ms = meas.iter().cloned().fold(f64::INFINITY, f64::min);
        let select = |pred: &dyn Fn(&PrefillPoint) -> bool| -> Vec<PrefillPoint> {
            let mut big: Vec<PrefillPoint> = pre.iter().filter(|p| pred(p)).cloned().collect();
            if big.len() < 3 {
                // too few clearly-above-floor points: take the largest ones
                let mut all = pre.to_vec();
                all.sort_by_key(|p| p.batch * p.tokens);
                big = all[all.len().saturating_sub(3.max(all.len() / 2))..].to_vec();
            }
            big
        };
        // `negative_intercept`: let the intercept go below 0 (a ramp that starts past a
        // floor: short prompts on the floor, long ones on the line); only kept when a
        // floor above 0 holds predictions up (see below).
        let fit_lin = |big: &[PrefillPoint],
                       negative_intercept: bool|
         -> Result<Vec<f64>, CostModelError> {
            let rows: Vec<Vec<f64>> = big.iter().map(row).collect();
            let y: Vec<f64> = big.iter().map(|p| p.ms).collect();
            let beta = nonneg_fit(&rows, &y, &[2, 0, 1], negative_intercept.then_some(0))
                .ok_or_else(|| CostModelError::Fit("prefill least squares is singular".into()))?;
            if beta[1] <= 0.0 && beta[2] <= 0.0 {
                return Err(CostModelError::Fit(
                    "prefill time does not grow with tokens in this profile".into(),
                ));
            }
            Ok(beta)
        };
        let compute_all = |beta: &[f64]| -> Vec<f64> {
            pre.iter()
                .map(|p| {
                    let r = row(p);
                    beta[0] + beta[1] * r[1] + beta[2] * r[2]
                })
                .collect()
        };
        let fit_prefill = |negative_intercept: bool| -> Result<(Vec<f64>, f64), CostModelError> {
            let mut beta = fit_lin(&select(&|p| p.ms >= 2.0 * min_ms), negative_intercept)?;
            let mut floor = best_floor(&compute_all(&beta), &meas);
            // refine once: slope from the points clearly above the fitted floor
            let refined = select(&|p| p.ms >= 1.5 * floor);
            if refined.len() >= 3 {
                beta = fit_lin(&refined, negative_intercept)?;
                floor = best_floor(&compute_all(&beta), &meas);
            }
            Ok((beta, floor))
        };
        // A negative intercept is kept only with a floor that keeps every prediction
        // positive (and the line rising): then max(floor, line) is a floor followed by a
        // ramp, e.g. a profile whose short prompts cost a fixed weight pass.
        let (beta, floor) = match fit_prefill(true)? {
            (b, f) if b[0] >= 0.0 || (f > 0.0 && b[1] > 0.0) => (b, f),
            _ => fit_prefill(false)?,
        };
        let (a, lin, attn) = (beta[0], beta[1], beta[2]);

        // ---- cached prefill: max(floor_c, a + lin·S + attn·S²/2 + k·S·P)
        let base_pair = if attn > 0.0 { attn } else { lin / 4096.0 };
        let (ctx_pair, cached_floor) = if cached.is_empty() {
            (base_pair, floor)
        } else {
            let cmeas: Vec<f64> = cached.iter().map(|c| c.ms).collect();
            let mut best = (f64::INFINITY, base_pair, floor);
            // k from 0.1× to 20× the causal pair cost, 40 steps per decade
            for i in -40..=53 {
                let k = base_pair * 10f64.powf(i as f64 / 40.0);
                let comp: Vec<f64> = cached
                    .iter()
                    .map(|c| {
                        let s = c.new as f64;
                        a + lin * s + attn * s * s / 2.0 + k * s * c.cached as f64
                    })
                    .collect();
                let fl = best_floor(&comp, &cmeas);
                let e: f64 = comp
                    .iter()
                    .zip(&cmeas)
                    .map(|(c, m)| rel_err(c.max(fl), *m))
                    .sum();
                if e < best.0 - 1e-12 {
                    best = (e, k, fl);
                }
            }
            (best.1, best.2)
        };

        // ---- decode: a_d + b_d·B + kv·B·C
        let (da, db, dc) = if decode.len() >= 3 {
            let rows: Vec<Vec<f64>> = decode
                .iter()
                .map(|d| {
                    let b = d.batch as f64;
                    vec![1.0, b, b * d.context as f64]
                })
                .collect();
            let y: Vec<f64> = decode.iter().map(|d| d.ms).collect();
            let beta = nonneg_fit(&rows, &y, &[1, 2, 0], None)
                .ok_or_else(|| CostModelError::Fit("decode least squares is singular".into()))?;
            (beta[0], beta[1], beta[2])
        } else if let Some(m) = median(decode.iter().map(|d| d.ms).collect()) {
            (m, 0.0, 0.0)
        } else {
            // no decode data: a one-token-per-sequence forward of the prefill model
            (a.max(0.0).max(floor * 0.5), lin, ctx_pair)
        };

        // ---- h2d: pinned bandwidth (median), else any, else a default
        let pinned: Vec<f64> = h2d.iter().filter(|p| p.pinned).map(|p| p.gbps).collect();
        let gbps = median(pinned)
            .or_else(|| median(h2d.iter().map(|p| p.gbps).collect()))
            .unwrap_or(DEFAULT_H2D_GBPS);

        Ok(CostModel {
            prefill_intercept_ms: a,
            prefill_ms_per_token: lin,
            prefill_ms_per_pair: attn,
            prefill_floor_ms: floor,
            cached_ms_per_context_pair: ctx_pair,
            cached_floor_ms: cached_floor,
            decode_intercept_ms: da,
            decode_ms_per_seq: db,
            decode_ms_per_context_token: dc,
            h2d_gbps: gbps,
            kv_bytes_per_token,
        })
    }

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

/// Errors of one curve against its measured points.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CurveReport {
    /// Number of measured points.
    pub points: usize,
    /// Mean absolute percentage error over all points (in sample).
    pub mape_pct: f64,
    /// Points whose fitted compute part is at or above the floor (not floor-dominated).
    pub points_above_floor: usize,
    /// MAPE over those points (None when there are none).
    pub mape_above_floor_pct: Option<f64>,
    /// Leave-one-out MAPE over all points.
    pub holdout_mape_pct: f64,
    /// Leave-one-out MAPE over the points above the floor.
    pub holdout_mape_above_floor_pct: Option<f64>,
    /// The worst in-sample point: (key, signed error %).
    pub worst: Option<(String, f64)>,
}

/// How well a fitted model reproduces its profile.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FitReport {
    pub model: CostModel,
    pub prefill: CurveReport,
    pub cached_prefill: CurveReport,
    pub decode: CurveReport,
    pub h2d: CurveReport,
}

impl std::fmt::Display for FitReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |o: Option<f64>| o.map_or("-".to_string(), |v| format!("{v:.1}%"));
        writeln!(
            f,
            "{:<15} {:>6} {:>8} {:>12} {:>9} {:>13}",
            "curve", "points", "MAPE", "above-floor", "LOO MAPE", "LOO above-fl."
        )?;
        for (name, c) in [
            ("prefill", &self.prefill),
            ("cached_prefill", &self.cached_prefill),
            ("decode", &self.decode),
            ("h2d", &self.h2d),
        ] {
            writeln!(
                f,
                "{:<15} {:>6} {:>7.1}% {:>6} {:>5} {:>8.1}% {:>13}",
                name,
                c.points,
                c.mape_pct,
                opt(c.mape_above_floor_pct),
                format!("({})", c.points_above_floor),
                c.holdout_mape_pct,
                opt(c.holdout_mape_above_floor_pct)
            )?;
        }
        Ok(())
    }
}

/// One evaluated point: key, measured, in-sample prediction, LOO prediction, above floor.
struct Eval {
    key: String,
    meas: f64,
    pred: f64,
    loo: f64,
    above: bool,
}

fn curve_report(ev: &[Eval]) -> CurveReport {
    let mape = |it: &mut dyn Iterator<Item = f64>| -> Option<f64> {
        let v: Vec<f64> = it.collect();
        (!v.is_empty()).then(|| 100.0 * v.iter().sum::<f64>() / v.len() as f64)
    };
    let worst = ev
        .iter()
        .max_by(|a, b| rel_err(a.pred, a.meas).total_cmp(&rel_err(b.pred, b.meas)))
        .map(|e| (e.key.clone(), 100.0 * (e.pred - e.meas) / e.meas));
    CurveReport {
        points: ev.len(),
        mape_pct: mape(&mut ev.iter().map(|e| rel_err(e.pred, e.meas))).unwrap_or(0.0),
        points_above_floor: ev.iter().filter(|e| e.above).count(),
        mape_above_floor_pct: mape(
            &mut ev
                .iter()
                .filter(|e| e.above)
                .map(|e| rel_err(e.pred, e.meas)),
        ),
        holdout_mape_pct: mape(&mut ev.iter().map(|e| rel_err(e.loo, e.meas))).unwrap_or(0.0),
        holdout_mape_above_floor_pct: mape(
            &mut ev
                .iter()
                .filter(|e| e.above)
                .map(|e| rel_err(e.loo, e.meas)),
        ),
        worst,
    }
}

/// Fit `profile` and measure the fit (see [`CostModel::evaluate`]).
pub fn evaluate(profile: &CalibrationProfile) -> Result<FitReport, CostModelError> {
    let kvb = profile.kv_bytes_per_token();
    let pre = profile.prefill_points()?;
    let cached = profile.cached_points()?;
    let decode = profile.decode_points()?;
    let h2d = profile.h2d_points()?;
    let model = CostModel::fit_points(kvb, &pre, &cached, &decode, &h2d)?;
    fn without<T: Clone>(v: &[T], i: usize) -> Vec<T> {
        let mut v = v.to_vec();
        v.remove(i);
        v
    }

    let mut ev = Vec::new();
    for (i, p) in pre.iter().enumerate() {
        let m = CostModel::fit_points(kvb, &without(&pre, i), &cached, &decode, &h2d)?;
        let compute = model.prefill_intercept_ms
            + model.prefill_ms_per_token * (p.batch * p.tokens) as f64
            + model.prefill_ms_per_pair * p.batch as f64 * (p.tokens as f64).powi(2) / 2.0;
        ev.push(Eval {
            key: format!("{}x{}", p.batch, p.tokens),
            meas: p.ms,
            pred: model.prefill_batch_ms(p.batch, p.tokens),
            loo: m.prefill_batch_ms(p.batch, p.tokens),
            above: compute >= model.prefill_floor_ms,
        });
    }
    let prefill = curve_report(&ev);

    let mut ev = Vec::new();
    for (i, c) in cached.iter().enumerate() {
        let m = CostModel::fit_points(kvb, &pre, &without(&cached, i), &decode, &h2d)?;
        let s = c.new as f64;
        let compute = model.prefill_intercept_ms
            + model.prefill_ms_per_token * s
            + model.prefill_ms_per_pair * s * s / 2.0
            + model.cached_ms_per_context_pair * s * c.cached as f64;
        ev.push(Eval {
            key: format!("{}+{}", c.cached, c.new),
            meas: c.ms,
            pred: model.cached_prefill_ms(c.cached, c.new),
            loo: m.cached_prefill_ms(c.cached, c.new),
            above: compute >= model.prefill_floor_ms.max(model.cached_floor_ms),
        });
    }
    let cached_prefill = curve_report(&ev);

    let mut ev = Vec::new();
    for (i, d) in decode.iter().enumerate() {
        let m = CostModel::fit_points(kvb, &pre, &cached, &without(&decode, i), &h2d)?;
        ev.push(Eval {
            key: format!("{}x{}", d.batch, d.context),
            meas: d.ms,
            pred: model.decode_step_ms(d.batch, d.context),
            loo: m.decode_step_ms(d.batch, d.context),
            above: true,
        });
    }
    let decode_r = curve_report(&ev);

    // h2d: compare copy times of the pinned points (what h2d_ms models)
    let pinned: Vec<H2dPoint> = h2d.iter().filter(|p| p.pinned).cloned().collect();
    let mut ev = Vec::new();
    for (i, p) in pinned.iter().enumerate() {
        let others: Vec<H2dPoint> = h2d.iter().filter(|q| *q != p).cloned().collect();
        let _ = i;
        let m = CostModel::fit_points(kvb, &pre, &cached, &decode, &others)?;
        let meas = p.bytes as f64 / (p.gbps * 1e6);
        ev.push(Eval {
            key: format!("{}MB_pinned", p.bytes >> 20),
            meas,
            pred: model.h2d_ms(p.bytes),
            loo: m.h2d_ms(p.bytes),
            above: true,
        });
    }
    let h2d_r = curve_report(&ev);

    Ok(FitReport {
        model,
        prefill,
        cached_prefill,
        decode: decode_r,
        h2d: h2d_r,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P8B: &str = include_str!("../../conf/profiles/h100-llama3-8b.json");
    const P70: &str = include_str!("../../conf/profiles/h100-llama3-70b-8layers.json");

    fn both() -> Vec<(&'static str, CalibrationProfile)> {
        vec![
            ("8b", CalibrationProfile::from_json(P8B).unwrap()),
            ("70b-8layers", CalibrationProfile::from_json(P70).unwrap()),
        ]
    }

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

    #[test]
    fn fits_shipped_profiles() {
        for (name, p) in both() {
            let m = CostModel::fit(&p).unwrap();
            assert!(m.prefill_ms_per_token > 0.0, "{name}: {m:?}");
            assert!(
                m.prefill_floor_ms > 1.0 && m.prefill_floor_ms < 50.0,
                "{name}: {m:?}"
            );
            assert!(m.h2d_gbps > 40.0 && m.h2d_gbps < 60.0, "{name}: {m:?}");
            assert_eq!(m.kv_bytes(10), 10 * p.kv_bytes_per_token());
            // 1 GB at ~54 GB/s ≈ 18.5 ms
            let t = m.h2d_ms(1_000_000_000);
            assert!(t > 15.0 && t < 25.0, "{name}: {t}");
            // the large single-sequence prefill is close to the measurement
            let meas = p.prefill_points().unwrap();
            let big = meas
                .iter()
                .find(|x| x.batch == 1 && x.tokens == 8192)
                .unwrap();
            assert!(rel_err(m.prefill_ms(8192), big.ms) < 0.05, "{name}");
        }
    }

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

    #[test]
    fn mape_within_bounds() {
        for (name, p) in both() {
            let r = evaluate(&p).unwrap();
            eprintln!("{name}:\n{r}");
            let above = r.prefill.mape_above_floor_pct.unwrap();
            assert!(above < 15.0, "{name} prefill above floor {above}");
            assert!(
                r.prefill.mape_pct < 15.0,
                "{name} prefill {}",
                r.prefill.mape_pct
            );
            assert!(
                r.cached_prefill.mape_pct < 15.0,
                "{name} cached {:?}",
                r.cached_prefill
            );
            assert!(r.decode.mape_pct < 15.0, "{name} decode {:?}", r.decode);
            assert!(r.h2d.mape_pct < 15.0, "{name} h2d {:?}", r.h2d);
            // held-out prefill points above the floor are still predicted well
            let loo = r.prefill.holdout_mape_above_floor_pct.unwrap();
            assert!(loo < 15.0, "{name} prefill LOO {loo}");
        }
    }
}
