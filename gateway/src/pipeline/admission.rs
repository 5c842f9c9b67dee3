//! `admission`: a bounded number of requests in flight per instance (like vLLM's
//! `max_num_seqs`), the rest wait in a bounded queue; a full queue or a wait past
//! `queue_timeout_ms` is answered 429 with `Retry-After`.

use super::{Attempt, Client, Flow, Phases, Reply, RequestCtx, RequestFilter, Stop, World};
use crate::admission::{Refused, Slot};
use async_trait::async_trait;
use cacheroute_decisions::openai::ApiError;
use std::time::{Duration, Instant};

pub struct Admission;

#[async_trait]
impl RequestFilter for Admission {
    fn name(&self) -> &str {
        "admission"
    }

    fn phases(&self) -> Phases {
        Phases::ATTEMPT
    }

    fn on_attempt(&self, _: &mut RequestCtx, at: &mut Attempt<'_>, _: &dyn World) -> Flow {
        if at.admitted {
            return Flow::Next;
        }
        match try_admit(at) {
            Some(slot) => {
                at.slot = slot;
                at.admitted = true;
                Flow::Next
            }
            None => Flow::Wait,
        }
    }

    async fn wait_attempt(
        &self,
        _: &mut RequestCtx,
        at: &mut Attempt<'_>,
        client: &mut Client<'_>,
        world: &dyn World,
    ) -> Result<(), Stop> {
        at.slot = wait_admit(at, client, world).await?;
        at.admitted = true;
        Ok(())
    }
}

/// A slot without waiting: `Some(None)` when the instance is unbounded, `None` when
/// the request has to queue.
pub(crate) fn try_admit(at: &Attempt<'_>) -> Option<Option<Slot>> {
    let limit = at.inst.max_inflight;
    if limit == 0 {
        return Some(None);
    }
    at.inst.state.admission.try_acquire(limit).map(Some)
}

/// Wait for a slot on the attempt's instance, giving up if the client goes away.
pub(crate) async fn wait_admit(
    at: &Attempt<'_>,
    client: &mut Client<'_>,
    world: &dyn World,
) -> Result<Option<Slot>, Stop> {
    if let Some(slot) = try_admit(at) {
        return Ok(slot);
    }
    let (pool, inst) = (at.pool, at.inst);
    let limit = inst.max_inflight;
    let adm = &inst.state.admission;
    let s = &pool.settings;
    let timeout = Duration::from_millis(s.queue_timeout_ms);
    let metrics = world.gateway().map(|g| &g.metrics);
    let gauge = metrics.map(|m| {
        m.queue_length
            .with_label_values(&[&pool.name, &inst.url.base])
    });
    let waited = Instant::now();
    let result = {
        let acquire = adm.acquire(limit, s.queue_size, timeout);
        if let Some(g) = &gauge {
            g.set(adm.queued() as i64 + 1);
        }
        client
            .or_gone(acquire, "client went away while queued")
            .await
    };
    if let Some(m) = metrics {
        if let Some(g) = &gauge {
            g.set(adm.queued() as i64);
        }
        m.queue_wait
            .with_label_values(&[&pool.name])
            .observe(waited.elapsed().as_secs_f64());
    }
    let refused = match result.map_err(Stop::Gone)? {
        Ok(slot) => return Ok(Some(slot)),
        Err(refused) => refused,
    };
    let (reason, error) = match refused {
        Refused::QueueFull => (
            "queue_full",
            ApiError::too_many_requests(
                "queue_full",
                format!(
                    "instance {} has {} requests in flight and {} waiting; try again later",
                    inst.url.base, limit, s.queue_size
                ),
            ),
        ),
        Refused::Timeout => (
            "timeout",
            ApiError::too_many_requests(
                "queue_timeout",
                format!(
                    "no slot on instance {} within {} ms; try again later",
                    inst.url.base, s.queue_timeout_ms
                ),
            ),
        ),
    };
    if let Some(m) = metrics {
        m.admission_rejected
            .with_label_values(&[&pool.name, reason])
            .inc();
    }
    Err(Stop::Reply(Reply {
        error,
        retry_after: Some((s.queue_timeout_ms / 1000).clamp(1, 60)),
    }))
}
