//! Fitting the cost curves to a profile's points: relative-error least squares with
//! non-negative coefficients, floors chosen among the measured values, and the grid
//! search of the cached-prefill terms (see the crate-level formulas in `cost_model`).

use super::profile::{CachedPoint, DecodePoint, H2dPoint, PrefillPoint};
use super::{CalibrationProfile, CostModel, CostModelError};

/// Default PCIe Gen4 x16-ish bandwidth when a profile has no h2d entries.
pub(super) const DEFAULT_H2D_GBPS: f64 = 25.0;

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

pub(super) fn rel_err(pred: f64, meas: f64) -> f64 {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost_model::fixtures::both;
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
}
