//! `learning`: after an answered request, counts how its knowledge was injected,
//! remembers a prefix the engine computed (LMCache keeps it), and corrects the
//! adaptive TTFT predictor with the measured TTFT.

use super::{Done, Phases, RequestCtx, RequestFilter, World};
use cacheroute_decisions::injection::InjectionMode;

pub struct Learning;

impl RequestFilter for Learning {
    fn name(&self) -> &str {
        "learning"
    }

    fn phases(&self) -> Phases {
        Phases::DONE
    }

    fn on_done(&self, ctx: &mut RequestCtx, done: &Done<'_>, world: &dyn World) {
        let (Some(state), Some(kv), true) = (world.gateway(), ctx.kv.as_ref(), done.exchanged)
        else {
            return;
        };
        let m = &state.metrics;
        let d = &kv.decision;
        let mode = d.mode.as_str();
        m.injection.with_label_values(&[mode, d.reason]).inc();
        let tokens = d.inputs.knowledge.knowledge_tokens;
        m.knowledge_tokens.with_label_values(&[mode]).inc_by(tokens);
        if d.mode == InjectionMode::Kv {
            m.knowledge_cached_tokens.inc_by(kv.chunks * kv.chunk_size);
        }
        if done.status != 200 {
            return;
        }
        if d.mode == InjectionMode::Text && ctx.fleet.config.proxy.engine_stores_prefix {
            // LMCache keeps what the engine computed: the next request finds it.
            world.injections().mark_resident(kv.key.clone(), "prefill");
        }
        let (Some(ttft), Some(instance)) = (done.ttft, done.instance) else {
            return;
        };
        let measured = ttft.as_secs_f64() * 1e3;
        let predicted = match d.mode {
            InjectionMode::Text => d.predicted_text_ms,
            InjectionMode::Kv => d.predicted_kv_ms,
        };
        if predicted.is_finite() && predicted > 0.0 {
            m.ttft_prediction_ratio
                .with_label_values(&[mode])
                .observe(measured / predicted);
        }
        if let Some((mode, raw)) = d.correction_sample() {
            state
                .corrections
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .observe(instance, mode, raw, measured);
        }
    }
}
