//! The original proxy's IWS rule (`docs/original.md`), term for term: its constants, its
//! estimate ([`iws_terms`]) and its choice.

use serde::{Deserialize, Serialize};

use super::{queue_wait_ms, InjectionInputs, InjectionMode};
use crate::cost_model::CostModel;
use crate::injection::iws;

// Constants of the original's IWS rule (`docs/original.md`).

/// LMCache chunk the original aligns to: `eff = floor(K/256)·256`.
pub const CHUNK: u64 = 256;
/// Template header tokens added to every prompt length.
pub const HEADER_TOKENS: u64 = 36;
/// Fixed text-prepare overhead, ms (`+ rtt + 3`).
pub const TEXT_PREPARE_MS: f64 = 3.0;
/// Link efficiency in `kv_transfer = eff·MB / (bw/8 · 0.825) · 1000`.
pub const LINK_EFFICIENCY: f64 = 0.825;
/// `IWS_KDN_QUEUE_PENALTY_ALPHA`.
pub const QUEUE_PENALTY_ALPHA: f64 = 0.5;
/// `IWS_DECISION_MARGIN_MS`.
pub const DECISION_MARGIN_MS: f64 = 100.0;
/// Bandwidth when the link reports none (`KDN_DEFAULT_BANDWIDTH_MBPS`, else 1000), Mbit/s.
pub const DEFAULT_BANDWIDTH_MBPS: f64 = 1000.0;

/// Every term of the original's IWS estimate (`docs/original.md`), in ms.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct IwsTerms {
    /// `eff = floor(K/256)·256`: knowledge tokens the KV covers.
    pub eff_tokens: u64,
    /// `ready_wait = predict_new_task_wait_ms(instance)`; here [`queue_wait_ms`].
    pub ready_wait: f64,
    /// `text_prepare_wait = max(0, active_until − now) + rtt + 3`.
    pub text_prepare_wait: f64,
    /// `queue_predictor(P + K + 36)`; here the fitted `prefill_ms`.
    pub text_service: f64,
    /// `text_total = max(text_prepare_wait, ready_wait) + text_service`.
    pub text_total: f64,
    /// `kv_transfer = eff·MB_per_token / (bw/8 · 0.825) · 1000` (bw in Mbit/s; MB/token from
    /// the profile instead of the original's constant 0.096).
    pub kv_transfer: f64,
    /// `kv_queue_wait = max(0, link_free − now)`.
    pub kv_queue_wait: f64,
    /// `kv_prepare = kv_queue_wait + kv_transfer`.
    pub kv_prepare: f64,
    /// `redis_load(eff)`: the original's GB → ms pull fit; here the fitted host-to-GPU copy
    /// of `eff` tokens' KV.
    pub redis_load: f64,
    /// `residual = queue_predictor(max(1, P + K − eff + 36))`; here the fitted `prefill_ms`
    /// (a full prefill of the residual, as the original).
    pub residual: f64,
    /// `kvcache_total = max(ready_wait, kv_prepare) + redis_load + residual`.
    pub kv_total: f64,
    /// `kvcache_total + 0.5·kv_queue_wait + 100` (the left side of the comparison; the queue
    /// wait is counted a second time here: a defect of the original kept on purpose).
    pub kv_score: f64,
}

/// The original's IWS terms for `inputs` with the fitted `m` (no decision).
pub fn iws_terms(m: &CostModel, inputs: &InjectionInputs) -> IwsTerms {
    let k = &inputs.knowledge;
    let p = k.prompt_tokens;
    let kk = k.knowledge_tokens;
    let eff = kk / iws::CHUNK * iws::CHUNK;
    let ready_wait = queue_wait_ms(m, &inputs.load);
    let (busy, rtt, bw_mbps) = match &inputs.transfer {
        Some(t) => (
            t.link_busy_ms.max(0.0),
            t.rtt_ms.max(0.0),
            if t.link_gbps > 0.0 {
                t.link_gbps * 1000.0
            } else {
                iws::DEFAULT_BANDWIDTH_MBPS
            },
        ),
        None => (0.0, 0.0, iws::DEFAULT_BANDWIDTH_MBPS),
    };
    let text_prepare_wait = if kk > 0 && inputs.transfer.is_some() {
        busy + rtt + iws::TEXT_PREPARE_MS
    } else {
        0.0
    };
    let text_service = m.prefill_ms(p + kk + iws::HEADER_TOKENS);
    let text_total = text_prepare_wait.max(ready_wait) + text_service;
    let mb_per_token = k.bytes_per_token(m) as f64 / 1e6;
    let kv_transfer = eff as f64 * mb_per_token / (bw_mbps / 8.0 * iws::LINK_EFFICIENCY) * 1000.0;
    let kv_queue_wait = busy;
    let kv_prepare = kv_queue_wait + kv_transfer;
    let redis_load = m.h2d_ms(eff * k.bytes_per_token(m)).max(0.0);
    let residual = m.prefill_ms((p + kk + iws::HEADER_TOKENS).saturating_sub(eff).max(1));
    let kv_total = ready_wait.max(kv_prepare) + redis_load + residual;
    let kv_score = kv_total + iws::QUEUE_PENALTY_ALPHA * kv_queue_wait + iws::DECISION_MARGIN_MS;
    IwsTerms {
        eff_tokens: eff,
        ready_wait,
        text_prepare_wait,
        text_service,
        text_total,
        kv_transfer,
        kv_queue_wait,
        kv_prepare,
        redis_load,
        residual,
        kv_total,
        kv_score,
    }
}

/// The original's choice and reason for these terms (`docs/original.md`).
pub(super) fn iws_choice(inputs: &InjectionInputs, t: &IwsTerms) -> (InjectionMode, &'static str) {
    if inputs.knowledge.knowledge_tokens == 0 || inputs.transfer.is_none() {
        return (InjectionMode::Text, "no_rag_or_empty_knowledge");
    }
    if t.kv_score < t.text_total {
        if t.kv_prepare <= t.ready_wait {
            (InjectionMode::Kv, "kvcache_hidden_and_score_better")
        } else {
            (InjectionMode::Kv, "kvcache_score_better")
        }
    } else if t.kv_queue_wait > 0.0 {
        (InjectionMode::Text, "text_due_to_kdn_congestion")
    } else if t.text_prepare_wait > 0.0 {
        (InjectionMode::Text, "text_despite_active_kv_wait")
    } else {
        (InjectionMode::Text, "text_score_better")
    }
}

#[cfg(test)]
mod tests {
    use crate::injection::fixtures::*;
    use crate::injection::*;
    use crate::scheduler::InjectionPreference;

    /// IWS worked cases, computed by hand from the rule in `docs/original.md` with the toy model:
    /// text_total = max(busy + rtt + 3, ready) + 0.2·(P+K+36);
    /// kv_total = max(ready, busy + 0.1·eff·(8/gbps)) + 0.01·eff + 0.2·max(1, P+K−eff+36);
    /// kv iff kv_total + 0.5·busy + 100 < text_total.
    #[test]
    fn iws_reproduces_worked_cases() {
        struct Case {
            name: &'static str,
            p: u64,
            k: u64,
            gbps: f64,
            busy: f64,
            queued_tokens: u64,
            text_total: f64,
            kv_total: f64,
            mode: InjectionMode,
            reason: &'static str,
        }
        use InjectionMode::*;
        let cases = [
            // no knowledge: text whatever the numbers
            Case {
                name: "no knowledge",
                p: 12,
                k: 0,
                gbps: 8.0,
                busy: 0.0,
                queued_tokens: 0,
                text_total: 0.2 * 48.0,
                kv_total: 0.2 * 48.0,
                mode: Text,
                reason: "no_rag_or_empty_knowledge",
            },
            // text = 4 + 0.2·4196 = 843.2; kv = 409.6 + 40.96 + 0.2·100 = 470.56 (+100 < 843.2)
            Case {
                name: "long knowledge, 8 Gbit/s",
                p: 64,
                k: 4096,
                gbps: 8.0,
                busy: 0.0,
                queued_tokens: 0,
                text_total: 843.2,
                kv_total: 470.56,
                mode: Kv,
                reason: "kvcache_score_better",
            },
            // transfer 8× slower: kv = 3276.8 + 40.96 + 20 = 3337.76 > 843.2
            Case {
                name: "long knowledge, 1 Gbit/s",
                p: 64,
                k: 4096,
                gbps: 1.0,
                busy: 0.0,
                queued_tokens: 0,
                text_total: 843.2,
                kv_total: 3337.76,
                mode: Text,
                reason: "text_despite_active_kv_wait",
            },
            // link busy 1000: text = 1004 + 839.2 = 1843.2; kv = 1409.6 + 40.96 + 20 =
            // 1470.56, + 0.5·1000 + 100 = 2070.56 ≥ 1843.2 → text (the double count decides)
            Case {
                name: "busy link",
                p: 64,
                k: 4096,
                gbps: 8.0,
                busy: 1000.0,
                queued_tokens: 0,
                text_total: 1843.2,
                kv_total: 1470.56,
                mode: Text,
                reason: "text_due_to_kdn_congestion",
            },
            // queue of 3000 tokens: ready = 600; text = 600 + 839.2 = 1439.2;
            // kv = max(600, 409.6) + 40.96 + 20 = 660.96 → kv, transfer hidden
            Case {
                name: "queued instance hides the transfer",
                p: 64,
                k: 4096,
                gbps: 8.0,
                busy: 0.0,
                queued_tokens: 3000,
                text_total: 1439.2,
                kv_total: 660.96,
                mode: Kv,
                reason: "kvcache_hidden_and_score_better",
            },
            // text = 4 + 0.2·612 = 126.4; kv = 51.2 + 5.12 + 20 = 76.32 < 126.4 but
            // 76.32 + 100 ≥ 126.4: the margin keeps text
            Case {
                name: "margin",
                p: 64,
                k: 512,
                gbps: 8.0,
                busy: 0.0,
                queued_tokens: 0,
                text_total: 126.4,
                kv_total: 76.32,
                mode: Text,
                reason: "text_despite_active_kv_wait",
            },
            // eff = 256 of K = 300: text = 4 + 0.2·400 = 84; kv = 25.6 + 2.56 + 0.2·144 = 56.96
            Case {
                name: "partial chunk",
                p: 64,
                k: 300,
                gbps: 8.0,
                busy: 0.0,
                queued_tokens: 0,
                text_total: 84.0,
                kv_total: 56.96,
                mode: Text,
                reason: "text_despite_active_kv_wait",
            },
            // 8192 tokens at 8 Gbit/s: text = 4 + 0.2·8292 = 1662.4;
            // kv = 819.2 + 81.92 + 0.2·100 = 921.12 → kv
            Case {
                name: "very long knowledge",
                p: 64,
                k: 8192,
                gbps: 8.0,
                busy: 0.0,
                queued_tokens: 0,
                text_total: 1662.4,
                kv_total: 921.12,
                mode: Kv,
                reason: "kvcache_score_better",
            },
        ];
        let m = toy();
        for c in &cases {
            let mut i = inputs(
                c.p,
                c.k,
                Some(TransferPath {
                    link_gbps: c.gbps,
                    rtt_ms: 1.0,
                    link_busy_ms: c.busy,
                    ..Default::default()
                }),
            );
            if c.queued_tokens > 0 {
                i.load.queued = 1;
                i.load.queued_prefill_tokens = c.queued_tokens;
            }
            if c.k == 0 {
                i.transfer = None;
            }
            let d = decide(
                InjectionStrategy::Iws,
                InjectionPreference::Kv,
                &m,
                &i,
                &Corrections::new(),
            );
            let t = d.iws.unwrap();
            assert!(close(t.text_total, c.text_total), "{}: text {t:?}", c.name);
            if c.k > 0 {
                assert!(close(t.kv_total, c.kv_total), "{}: kv {t:?}", c.name);
            }
            assert_eq!(d.mode, c.mode, "{}: {t:?}", c.name);
            assert_eq!(d.reason, c.reason, "{}", c.name);
            assert_eq!(d.client_overridden, c.mode == Text, "{}", c.name);
            assert!(d.adaptive.is_none());
        }
    }

    #[test]
    fn iws_with_real_profile_flips_to_kv_for_long_knowledge() {
        // The original's own example (P=12, K=3744, rtt 1 ms, 1 Gbit/s) picked text only because
        // the shipped coefficients were zero; with a fitted model a long knowledge on a fast
        // link goes as KV.
        let m = m8b();
        let d = decide(
            InjectionStrategy::Iws,
            InjectionPreference::Auto,
            &m,
            &inputs(12, 16384, Some(link(100.0))),
            &Corrections::new(),
        );
        let t = d.iws.unwrap();
        assert!(t.text_service > 0.0);
        assert_eq!(d.mode, InjectionMode::Kv, "{t:?}");
    }
}
