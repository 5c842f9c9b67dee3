//! How a request's knowledge reaches the instance the scheduler chose: as **text** (the
//! knowledge is prefilled from scratch with the prompt) or as **KV** (the knowledge's KV
//! chunks are moved from the KDN into the instance's store, loaded into GPU memory, and only
//! the uncached suffix is prefilled). Plain data in, an [`InjectionDecision`] out; no I/O.
//!
//! Strategies ([`InjectionStrategy`], config `injection = "text" | "kv" | "iws" | "adaptive"`):
//!
//! * `text`, `kv`: fixed. A client's own `"injection"` field (`"text"`/`"kv"`) picks between
//!   them; `"auto"` (or absent) keeps the strategy's mode.
//! * `hybrid`: a static 1:1 mix, the original's "hybrid" baseline: knowledge requests
//!   alternate between KV and text on the gateway's turn counter ([`InjectionInputs::turn`]).
//! * `iws`: the original proxy's rule (`docs/original.md`), term for term, with
//!   the 0.5 queue penalty and the 100 ms margin, but fed with coefficients fitted from our
//!   calibration profile ([`crate::cost_model::CostModel`]) instead of the all-zero
//!   coefficients it ships with.
//!   The baseline the benchmarks compare against. See [`iws_terms`].
//! * `adaptive` (default): predicted TTFT of both modes on the chosen instance from its queue
//!   and running batch, the fitted prefill / cached-prefill / decode / host-to-device curves,
//!   the bytes of the non-resident KV chunks over the link, and the KDN's reported load;
//!   chooses the cheaper and corrects itself online with measured TTFTs ([`Corrections`]).
//!   "Cheaper" counts what a mode costs the other requests on the instance too: the GPU
//!   time one step spends on this request's prefill (or KV load) is time every request
//!   prefilling beside it waits, so a long text prefill on a busy instance costs its
//!   own TTFT plus the extra step time × the requests that share those steps.
//!   Fixes the original's defects (`docs/original.md`): the queue wait is counted once,
//!   the KDN's load is used, and KV already resident in the instance's store costs
//!   nothing to move. See [`adaptive_terms`].
//!
//! Under `iws` and `adaptive` the client's field is overridden, as in the original.
//! Every decision records its inputs, both predictions and the reason (for `/debug/strategy`
//! and the decision log).
//!
//! `inputs`: what a decision reads (strategy, load, knowledge shape, transfer path) and
//! the queue-wait estimate both rules share; `corrections`: the online correction by
//! measured TTFT; [`iws`]: the original's rule; `adaptive`: the adaptive prediction;
//! `decide`: the decision itself.

mod adaptive;
mod corrections;
mod decide;
mod inputs;
pub mod iws;

pub use adaptive::{adaptive_terms, AdaptiveTerms};
pub use corrections::{Corrections, Ewma, CORRECTION_ALPHA, CORRECTION_MAX, CORRECTION_MIN};
pub use decide::{decide, InjectionDecision, KV_MARGIN};
pub use inputs::{
    queue_wait_ms, InjectionInputs, InjectionMode, InjectionStrategy, InstanceLoad, KnowledgeShape,
    ReleasePolicy, TransferPath,
};
pub use iws::{iws_terms, IwsTerms};

/// Models and inputs the unit tests of every part share.
#[cfg(test)]
mod fixtures {
    use super::*;
    use crate::cost_model::CostModel;
    use crate::scheduler::InjectionPreference;

    pub const P8B: &str = include_str!("../../../conf/profiles/h100-llama3-8b.json");

    pub fn m8b() -> CostModel {
        CostModel::from_profile_json(P8B).unwrap()
    }

    /// A hand-computable model: prefill 0.2 ms/token, nothing else; KV 82,500 B/token so
    /// that 8 Gbit/s at the original's 0.825 efficiency moves a token in 0.1 ms; h2d 8.25
    /// GB/s = 0.01 ms/token.
    pub fn toy() -> CostModel {
        CostModel {
            prefill_intercept_ms: 0.0,
            prefill_ms_per_token: 0.2,
            prefill_ms_per_pair: 0.0,
            prefill_floor_ms: 0.0,
            cached_ms_per_context_pair: 0.0,
            cached_floor_ms: 0.0,
            decode_intercept_ms: 0.0,
            decode_ms_per_seq: 0.0,
            decode_ms_per_context_token: 0.0,
            h2d_gbps: 8.25,
            kv_bytes_per_token: 82_500,
        }
    }

    pub fn inputs(p: u64, k: u64, transfer: Option<TransferPath>) -> InjectionInputs {
        InjectionInputs {
            instance: "i0".into(),
            load: InstanceLoad::default(),
            knowledge: KnowledgeShape {
                prompt_tokens: p,
                knowledge_tokens: k,
                chunk_size: 256,
                resident_chunks: 0,
                total_chunks: k / 256,
                kv_bytes_per_token: 0,
            },
            transfer,
            turn: 0,
            store_gbps: 0.0,
            store_async: false,
            store_busy_ms: 0.0,
            weigh_others: false,
        }
    }

    pub fn link(gbps: f64) -> TransferPath {
        TransferPath {
            link_gbps: gbps,
            rtt_ms: 1.0,
            ..Default::default()
        }
    }

    pub fn adaptive(m: &CostModel, i: &InjectionInputs) -> InjectionDecision {
        decide(
            InjectionStrategy::Adaptive,
            InjectionPreference::Auto,
            m,
            i,
            &Corrections::new(),
        )
    }

    pub fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }
}
