//! How well a fitted model reproduces its profile: each curve's error (MAPE) in sample
//! and on held-out points (leave-one-out refits).

use super::fit::rel_err;
use super::{CalibrationProfile, CostModel, CostModelError, H2dPoint};
use serde::{Deserialize, Serialize};

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
    use crate::cost_model::fixtures::both;
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
