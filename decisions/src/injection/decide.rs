//! The decision: the strategy's rule applied to the inputs, with both predictions and
//! the reason recorded ([`decide`], [`InjectionDecision`]).

use serde::Serialize;

use super::iws::iws_choice;
use super::{
    adaptive_terms, iws_terms, AdaptiveTerms, Corrections, InjectionInputs, InjectionMode,
    InjectionStrategy, IwsTerms,
};
use crate::cost_model::CostModel;
use crate::scheduler::InjectionPreference;

/// KV that must be moved is chosen only when it is predicted cheaper than text by at
/// least this fraction of its own path's work ([`AdaptiveTerms::kv_margin`]): that path
/// (the KDN, the stores, the link) is what the prediction sees least well, while a text
/// prefill costs what the calibrated model says. Within the margin text is the safer bet.
pub const KV_MARGIN: f64 = 0.15;

/// One injection decision with everything it looked at.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InjectionDecision {
    pub strategy: InjectionStrategy,
    pub mode: InjectionMode,
    /// Why (`fixed`, `client_preference`, `no_knowledge`, `no_usable_kv`, `kv_resident`
    /// (nothing to move), `kv_faster`, `text_faster`, `kv_not_clearly_faster` (KV predicted
    /// faster by less than [`AdaptiveTerms::kv_margin`]), `kv_spares_others` (text alone would be faster,
    /// but its prefill would delay the requests sharing its steps by more than it gains),
    /// `hybrid_turn`,
    /// or one of the original's IWS reasons under `iws`).
    pub reason: &'static str,
    /// What the client asked for.
    pub client_preference: InjectionPreference,
    /// The client named a mode and the strategy chose the other.
    pub client_overridden: bool,
    /// The strategy's TTFT prediction for text (iws: `text_total`; otherwise the corrected
    /// adaptive prediction), ms.
    pub predicted_text_ms: f64,
    /// Same for KV (iws: `kvcache_total`, without penalty/margin; INFINITY when no usable
    /// KV — serialised as `null`), ms.
    pub predicted_kv_ms: f64,
    pub inputs: InjectionInputs,
    /// The adaptive predictor's terms (computed under every strategy except `iws`, so the
    /// log can compare fixed choices with what adaptive would have done).
    pub adaptive: Option<AdaptiveTerms>,
    /// The original's terms (under `iws`).
    pub iws: Option<IwsTerms>,
}

impl InjectionDecision {
    /// Which online correction a measured TTFT of this decision teaches, with the raw
    /// prediction to compare it with (`None` outside the adaptive predictor, and for
    /// resident KV). Resident KV compared nothing (both modes find the same chunks), and
    /// its load time depends on the tier the chunks sit in, which the gateway does not
    /// see: learning from it had pulled the KV factor down (moved KV then looked
    /// cheaper than it is) or, taught to text, the text factor.
    pub fn correction_sample(&self) -> Option<(InjectionMode, f64)> {
        let a = self.adaptive.as_ref()?;
        match self.mode {
            InjectionMode::Kv if a.moved_chunks == 0 => None,
            InjectionMode::Kv => Some((InjectionMode::Kv, a.kv_raw_ms)),
            InjectionMode::Text => Some((InjectionMode::Text, a.text_raw_ms)),
        }
    }
}

/// Decide how `inputs`' knowledge reaches its instance.
pub fn decide(
    strategy: InjectionStrategy,
    client: InjectionPreference,
    m: &CostModel,
    inputs: &InjectionInputs,
    corrections: &Corrections,
) -> InjectionDecision {
    let client_mode = match client {
        InjectionPreference::Auto => None,
        InjectionPreference::Text => Some(InjectionMode::Text),
        InjectionPreference::Kv => Some(InjectionMode::Kv),
    };
    let mut adaptive = None;
    let mut iws_t = None;
    let (mode, reason, text_ms, kv_ms) = if strategy == InjectionStrategy::Iws {
        let t = iws_terms(m, inputs);
        let (mode, reason) = iws_choice(inputs, &t);
        iws_t = Some(t);
        (mode, reason, t.text_total, t.kv_total)
    } else {
        let a = adaptive_terms(m, inputs, corrections);
        adaptive = Some(a);
        let text_ms = a.text_raw_ms * a.text_factor;
        let kv_ms = a.kv_raw_ms * a.kv_factor;
        let (mode, reason) = if inputs.knowledge.knowledge_tokens == 0 {
            (InjectionMode::Text, "no_knowledge")
        } else {
            match strategy {
                InjectionStrategy::Text | InjectionStrategy::Kv => {
                    let own = if strategy == InjectionStrategy::Text {
                        InjectionMode::Text
                    } else {
                        InjectionMode::Kv
                    };
                    match client_mode {
                        Some(c) => (c, "client_preference"),
                        None => (own, "fixed"),
                    }
                }
                InjectionStrategy::Hybrid => match client_mode {
                    Some(c) => (c, "client_preference"),
                    None if inputs.turn.is_multiple_of(2) => (InjectionMode::Kv, "hybrid_turn"),
                    None => (InjectionMode::Text, "hybrid_turn"),
                },
                _ => {
                    if !kv_ms.is_finite() {
                        (InjectionMode::Text, "no_usable_kv")
                    } else if a.moved_chunks == 0 {
                        // Nothing to move: the prompt finds the same chunks either way;
                        // KV names them in the handle.
                        (InjectionMode::Kv, "kv_resident")
                    } else if a.kv_cost_ms() + a.kv_margin < a.text_cost_ms() {
                        if kv_ms < text_ms {
                            (InjectionMode::Kv, "kv_faster")
                        } else {
                            (InjectionMode::Kv, "kv_spares_others")
                        }
                    } else if a.kv_cost_ms() < a.text_cost_ms() {
                        (InjectionMode::Text, "kv_not_clearly_faster")
                    } else {
                        (InjectionMode::Text, "text_faster")
                    }
                }
            }
        };
        (mode, reason, text_ms, kv_ms)
    };
    InjectionDecision {
        strategy,
        mode,
        reason,
        client_preference: client,
        client_overridden: client_mode.is_some_and(|c| c != mode),
        predicted_text_ms: text_ms,
        predicted_kv_ms: kv_ms,
        inputs: inputs.clone(),
        adaptive,
        iws: iws_t,
    }
}

#[cfg(test)]
mod tests {
    use crate::injection::fixtures::*;
    use crate::injection::*;
    use crate::scheduler::InjectionPreference;

    #[test]
    fn hybrid_alternates_and_follows_the_client() {
        let m = m8b();
        let c = Corrections::new();
        let mut i = inputs(64, 4096, Some(link(0.01)));
        let modes: Vec<_> = (0..4)
            .map(|turn| {
                i.turn = turn;
                let d = decide(
                    InjectionStrategy::Hybrid,
                    InjectionPreference::Auto,
                    &m,
                    &i,
                    &c,
                );
                assert_eq!(d.reason, "hybrid_turn");
                d.mode
            })
            .collect();
        use InjectionMode::{Kv, Text};
        assert_eq!(modes, [Kv, Text, Kv, Text]);
        let d = decide(
            InjectionStrategy::Hybrid,
            InjectionPreference::Text,
            &m,
            &i,
            &c,
        );
        assert_eq!((d.mode, d.reason), (Text, "client_preference"));
    }

    #[test]
    fn fixed_strategies_follow_the_client() {
        let m = m8b();
        let i = inputs(64, 4096, Some(link(0.01)));
        let c = Corrections::new();
        use InjectionPreference as P;
        use InjectionStrategy as S;
        for (s, p, mode, reason) in [
            (S::Text, P::Auto, InjectionMode::Text, "fixed"),
            (S::Text, P::Kv, InjectionMode::Kv, "client_preference"),
            (S::Kv, P::Auto, InjectionMode::Kv, "fixed"),
            (S::Kv, P::Text, InjectionMode::Text, "client_preference"),
        ] {
            let d = decide(s, p, &m, &i, &c);
            assert_eq!((d.mode, d.reason), (mode, reason), "{s:?} {p:?}");
            assert!(!d.client_overridden);
            assert!(
                d.adaptive.is_some(),
                "predictions logged for fixed strategies"
            );
        }
        // iws and adaptive override the client
        let d = decide(S::Adaptive, P::Kv, &m, &i, &c);
        assert_eq!(d.mode, InjectionMode::Text);
        assert!(d.client_overridden);
        let fast = inputs(64, 16384, Some(link(400.0)));
        let d = decide(S::Iws, P::Text, &m, &fast, &c);
        assert_eq!(d.mode, InjectionMode::Kv);
        assert!(d.client_overridden);
    }

    #[test]
    fn strategy_serde() {
        for (s, name) in [
            (InjectionStrategy::Text, "\"text\""),
            (InjectionStrategy::Kv, "\"kv\""),
            (InjectionStrategy::Hybrid, "\"hybrid\""),
            (InjectionStrategy::Iws, "\"iws\""),
            (InjectionStrategy::Adaptive, "\"adaptive\""),
        ] {
            assert_eq!(serde_json::to_string(&s).unwrap(), name);
            assert_eq!(serde_json::from_str::<InjectionStrategy>(name).unwrap(), s);
            assert_eq!(format!("\"{}\"", s.as_str()), name);
        }
        assert_eq!(InjectionStrategy::default(), InjectionStrategy::Adaptive);
        let c = {
            let mut c = Corrections::new();
            c.observe("a", InjectionMode::Kv, 1.0, 2.0);
            c
        };
        let back: Corrections = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
