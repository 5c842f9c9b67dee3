//! `injection`: per attempt, how the knowledge reaches the chosen instance
//! (`cacheroute_decisions::injection::decide` via `kv_plan::plan_kv`): as text, or as
//! KV the KDN copies into the instance's store. A KV attempt whose KV is still on
//! its way is held under the pool's ready-release policy: wait for it admitted
//! (holding a slot) or outside the queue (`text_bypass`: in order, and a request
//! whose slot is free first goes as text), and fall back to text past the deadline
//! or on a failed injection.

use super::{admission, Attempt, Client, Flow, Phases, RequestCtx, RequestFilter, Stop, World};
use crate::kv_inject::{self, InjectState};
use crate::kv_plan::{self, KvPlan};
use async_trait::async_trait;
use cacheroute_decisions::injection::{InjectionMode, ReleasePolicy};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub struct Injection;

#[async_trait]
impl RequestFilter for Injection {
    fn name(&self) -> &str {
        "injection"
    }

    fn phases(&self) -> Phases {
        Phases::ATTEMPT
    }

    fn on_attempt(&self, ctx: &mut RequestCtx, at: &mut Attempt<'_>, world: &dyn World) -> Flow {
        let Some(state) = world.gateway() else {
            return Flow::Next;
        };
        at.kv = if ctx.leading_applied {
            let catalog = world.catalog();
            kv_plan::plan_kv(state, &ctx.fleet, at.pool, at.index, ctx, &catalog)
        } else {
            None
        };
        if at.kv.as_ref().is_some_and(|k| k.pending.is_some()) {
            return Flow::Wait;
        }
        let policy = at.pool.proxy.release;
        if policy == ReleasePolicy::TextBypass
            && at.inst.state.kv_waiting.load(Ordering::Relaxed) > 0
        {
            state
                .metrics
                .ready_release
                .with_label_values(&[policy.as_str(), "bypassed_by_text"])
                .inc();
        }
        Flow::Next
    }

    async fn wait_attempt(
        &self,
        ctx: &mut RequestCtx,
        at: &mut Attempt<'_>,
        client: &mut Client<'_>,
        world: &dyn World,
    ) -> Result<(), Stop> {
        let Some(mut rx) = at.kv.as_mut().and_then(|k| k.pending.take()) else {
            return Ok(());
        };
        let policy = at.pool.proxy.release;
        let deadline = at.pool.proxy.kv_deadline;
        let ready = if policy.waits_admitted() {
            match admission::wait_admit(at, client, world).await {
                Ok(slot) => {
                    at.slot = slot;
                    at.admitted = true;
                    wait_kv(client, &mut rx, deadline)
                        .await
                        .map_err(Stop::Gone)?
                }
                Err(stop) => {
                    settle(at, InjectState::Pending, policy, ctx, world);
                    return Err(stop);
                }
            }
        } else {
            let state = &at.inst.state;
            state.kv_waiting.fetch_add(1, Ordering::Relaxed);
            let gate = if policy == ReleasePolicy::TextBypass {
                Some(state.kv_gate.lock().await)
            } else {
                None
            };
            let ready = wait_kv(client, &mut rx, deadline).await;
            drop(gate);
            state.kv_waiting.fetch_sub(1, Ordering::Relaxed);
            ready.map_err(Stop::Gone)?
        };
        settle(at, ready, policy, ctx, world);
        Ok(())
    }
}

/// Wait for a KV injection up to `deadline`, giving up if the client goes away.
async fn wait_kv(
    client: &mut Client<'_>,
    rx: &mut watch::Receiver<InjectState>,
    deadline: Duration,
) -> Result<InjectState, Box<pingora::Error>> {
    let until = Instant::now() + deadline;
    client
        .or_gone(
            kv_inject::wait_ready(rx, until),
            "client went away while its KV was injected",
        )
        .await
}

/// The outcome of waiting for a KV injection: ready, or text after the deadline or
/// a failure.
fn settle(
    at: &mut Attempt<'_>,
    ready: InjectState,
    policy: ReleasePolicy,
    ctx: &mut RequestCtx,
    world: &dyn World,
) {
    let Some(kv) = at.kv.as_mut() else {
        return;
    };
    let outcome = settle_kv(kv, ready, policy, &mut ctx.notes);
    if let Some(g) = world.gateway() {
        let m = &g.metrics;
        let injected = match outcome {
            "ready" => "ok",
            "deadline_text" => "timeout",
            _ => "failed",
        };
        m.kv_injections.with_label_values(&[injected]).inc();
        m.ready_release
            .with_label_values(&[policy.as_str(), outcome])
            .inc();
    }
}

/// Apply the injection's outcome to the attempt's KV plan; the outcome's label.
fn settle_kv(
    kv: &mut KvPlan,
    ready: InjectState,
    policy: ReleasePolicy,
    notes: &mut Vec<String>,
) -> &'static str {
    match ready {
        InjectState::Ready { job } => {
            kv.job = Some(job);
            "ready"
        }
        InjectState::Pending => {
            notes.push(format!(
                "KV not resident in {} by the deadline ({}): sent as text",
                kv.target,
                policy.as_str()
            ));
            kv.decision.mode = InjectionMode::Text;
            kv.decision.reason = "kv_deadline";
            "deadline_text"
        }
        InjectState::Failed(e) => {
            notes.push(format!(
                "KV injection into {} failed: {e}; sent as text",
                kv.target
            ));
            kv.decision.mode = InjectionMode::Text;
            kv.decision.reason = "kv_failed";
            "failed_text"
        }
    }
}
