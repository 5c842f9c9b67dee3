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
//!
//! `profile`: the profile format and its measured points; `fit`: fitting the curves;
//! `model`: [`CostModel`] and its predictions; `report`: how well a fit reproduces its
//! profile (`cacheroute calibrate fit`).

mod fit;
mod model;
mod profile;
mod report;

pub use model::{CostModel, StepShape};

/// Time `bytes` take over a link of `gbps` Gbit/s, ms; 0 for a free link (`gbps` ≤ 0 or
/// not finite). The sim's store link and the gateway's estimate of it use this one rule.
pub fn link_ms(bytes: u64, gbps: f64) -> f64 {
    if gbps.is_finite() && gbps > 0.0 {
        bytes as f64 / (gbps * 1e9 / 8.0) * 1000.0
    } else {
        0.0
    }
}
pub use profile::{
    CachedPoint, CalibrationProfile, DecodePoint, H2dPoint, ModelConfig, PrefillPoint,
};
pub use report::{evaluate, CurveReport, FitReport};

/// The profiles shipped in `conf/profiles/`, embedded, by short name (the file name
/// without `.json`): what `--profile NAME` / `profile = "NAME"` select.
pub const BUILTIN_PROFILES: &[(&str, &str)] = &[
    (
        "h100-llama3-8b",
        include_str!("../../../conf/profiles/h100-llama3-8b.json"),
    ),
    (
        "h100-llama3-70b-8layers",
        include_str!("../../../conf/profiles/h100-llama3-70b-8layers.json"),
    ),
    (
        "h100x8-llama3-70b-tp8",
        include_str!("../../../conf/profiles/h100x8-llama3-70b-tp8.json"),
    ),
    (
        "rtx5090x8-llama3-70b",
        include_str!("../../../conf/profiles/rtx5090x8-llama3-70b.json"),
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

/// The shipped profiles the unit tests of every part fit.
#[cfg(test)]
mod fixtures {
    use super::CalibrationProfile;

    pub const P8B: &str = include_str!("../../../conf/profiles/h100-llama3-8b.json");
    pub const P70: &str = include_str!("../../../conf/profiles/h100-llama3-70b-8layers.json");

    pub fn both() -> Vec<(&'static str, CalibrationProfile)> {
        vec![
            ("8b", CalibrationProfile::from_json(P8B).unwrap()),
            ("70b-8layers", CalibrationProfile::from_json(P70).unwrap()),
        ]
    }
}
