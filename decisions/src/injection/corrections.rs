//! Online correction: each instance's measured/predicted TTFT ratio per mode, smoothed,
//! which scales the adaptive prediction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::InjectionMode;

/// Smoothing of the measured/predicted ratio.
pub const CORRECTION_ALPHA: f64 = 0.2;
/// Bounds of a correction factor (one outlier cannot make a mode look free or impossible).
pub const CORRECTION_MIN: f64 = 0.25;
pub const CORRECTION_MAX: f64 = 4.0;

/// EWMA of measured / predicted TTFT for one (instance, mode).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ewma {
    pub factor: f64,
    pub samples: u64,
}

impl Default for Ewma {
    fn default() -> Self {
        Ewma {
            factor: 1.0,
            samples: 0,
        }
    }
}

/// Per (instance, mode) correction of the adaptive predictions, learnt from measured TTFTs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Corrections {
    /// instance → [text, kv].
    pub by_instance: BTreeMap<String, [Ewma; 2]>,
}

impl Corrections {
    pub fn new() -> Self {
        Self::default()
    }

    /// Record a measured TTFT for a request predicted at `predicted_ms` (the *uncorrected*
    /// prediction, [`super::AdaptiveTerms::text_raw_ms`] / [`super::AdaptiveTerms::kv_raw_ms`]). Returns the
    /// new factor. Non-finite or non-positive values are ignored.
    pub fn observe(
        &mut self,
        instance: &str,
        mode: InjectionMode,
        predicted_ms: f64,
        measured_ms: f64,
    ) -> f64 {
        if !(predicted_ms.is_finite() && measured_ms.is_finite())
            || predicted_ms <= 0.0
            || measured_ms <= 0.0
        {
            return self.factor(instance, mode);
        }
        let ratio = (measured_ms / predicted_ms).clamp(CORRECTION_MIN, CORRECTION_MAX);
        let e = &mut self.by_instance.entry(instance.to_string()).or_default()[mode.index()];
        e.factor = if e.samples == 0 {
            // start from 1 like an unseen instance, move by alpha
            1.0 + CORRECTION_ALPHA * (ratio - 1.0)
        } else {
            e.factor + CORRECTION_ALPHA * (ratio - e.factor)
        }
        .clamp(CORRECTION_MIN, CORRECTION_MAX);
        e.samples += 1;
        e.factor
    }

    /// Current factor (1 when never observed).
    pub fn factor(&self, instance: &str, mode: InjectionMode) -> f64 {
        self.by_instance
            .get(instance)
            .map_or(1.0, |e| e[mode.index()].factor)
    }

    /// Forget an instance (it left the pool).
    pub fn forget(&mut self, instance: &str) {
        self.by_instance.remove(instance);
    }
}

#[cfg(test)]
mod tests {
    use crate::injection::fixtures::*;
    use crate::injection::*;
    use crate::scheduler::InjectionPreference;

    #[test]
    fn corrections_move_predictions() {
        let m = m8b();
        let i = inputs(64, 8192, Some(link(400.0)));
        let mut c = Corrections::new();
        let d0 = adaptive(&m, &i);
        assert_eq!(d0.mode, InjectionMode::Kv);
        let a = d0.adaptive.unwrap();
        // KV keeps coming in 4× slower than predicted
        for _ in 0..30 {
            c.observe("i0", InjectionMode::Kv, a.kv_raw_ms, a.kv_raw_ms * 4.0);
        }
        assert!(c.factor("i0", InjectionMode::Kv) > 3.5);
        assert!(c.factor("i0", InjectionMode::Kv) <= CORRECTION_MAX);
        assert_eq!(c.factor("i0", InjectionMode::Text), 1.0);
        assert_eq!(c.factor("other", InjectionMode::Kv), 1.0);
        let d1 = decide(
            InjectionStrategy::Adaptive,
            InjectionPreference::Auto,
            &m,
            &i,
            &c,
        );
        assert!(d1.predicted_kv_ms > d0.predicted_kv_ms * 3.5);
        assert_eq!(d1.mode, InjectionMode::Text, "{d1:?}");
        // text faster than predicted pushes the same way; bounded below
        for _ in 0..50 {
            c.observe("i0", InjectionMode::Text, 100.0, 1.0);
        }
        let f = c.factor("i0", InjectionMode::Text);
        assert!((CORRECTION_MIN..CORRECTION_MIN + 0.01).contains(&f), "{f}");
        // garbage is ignored
        let f = c.factor("i0", InjectionMode::Text);
        assert_eq!(c.observe("i0", InjectionMode::Text, 0.0, 5.0), f);
        assert_eq!(c.observe("i0", InjectionMode::Text, 5.0, f64::NAN), f);
        c.forget("i0");
        assert_eq!(c.factor("i0", InjectionMode::Kv), 1.0);
        // one observation moves by alpha from 1
        c.observe("i1", InjectionMode::Kv, 100.0, 200.0);
        assert!(close(
            c.factor("i1", InjectionMode::Kv),
            1.0 + CORRECTION_ALPHA
        ));
    }

    /// A text factor above KV's lifts KV's too: a slow instance is slow in both modes.
    #[test]
    fn kv_is_corrected_at_least_as_much_as_text() {
        let m = m8b();
        let i = inputs(64, 4096, Some(link(400.0)));
        let mut c = Corrections::new();
        for _ in 0..20 {
            c.observe("i0", InjectionMode::Text, 100.0, 300.0);
        }
        let d = decide(
            InjectionStrategy::Adaptive,
            InjectionPreference::Auto,
            &m,
            &i,
            &c,
        );
        let a = d.adaptive.unwrap();
        assert!(a.text_factor > 2.5, "{a:?}");
        assert_eq!(a.kv_factor, a.text_factor);
        // the same choice as with no correction at all
        assert_eq!(d.mode, adaptive(&m, &i).mode);
        // a KV factor below 1 does not drop KV under text's either
        let mut c = Corrections::new();
        c.observe("i0", InjectionMode::Kv, 100.0, 30.0);
        let a = adaptive_terms(&m, &i, &c);
        assert_eq!(a.kv_factor, 1.0);
    }

    /// Resident KV teaches no correction; moved KV the KV factor.
    #[test]
    fn only_moved_kv_corrects_kv() {
        let m = m8b();
        let mut i = inputs(64, 4096, Some(link(400.0)));
        let moved = adaptive(&m, &i);
        assert_eq!(moved.mode, InjectionMode::Kv);
        let raw = moved.adaptive.unwrap().kv_raw_ms;
        assert_eq!(moved.correction_sample(), Some((InjectionMode::Kv, raw)));
        i.knowledge.resident_chunks = 16;
        let resident = adaptive(&m, &i);
        assert_eq!(resident.reason, "kv_resident");
        assert_eq!(resident.correction_sample(), None);
        let iws = decide(
            InjectionStrategy::Iws,
            InjectionPreference::Auto,
            &m,
            &i,
            &Corrections::new(),
        );
        assert_eq!(iws.correction_sample(), None);
    }
}
