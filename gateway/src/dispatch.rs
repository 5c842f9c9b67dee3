//! Dispatch: a completion that passed the request filters goes to an instance.
//!
//! One attempt per instance the picker offers, each held first by the attempt
//! filters (admission, KV readiness); a request that could not be sent is tried on
//! the next instance, one whose answer had started is not (its stream is cut), and
//! when every instance failed the client gets one error naming them all.

use crate::config::Role;
use crate::fleet::{InflightGuard, PoolInstance, PrefillGuard};
use crate::forward::{self, ExchangeError};
use crate::headers;
use crate::kv_plan::KvPlan;
use crate::pickers::next_instance;
use crate::pipeline::{Attempt, Client, Reply, RequestCtx, Stop};
use crate::service::{ReqCtx, ServicePlane};
use bytes::Bytes;
use cacheroute_decisions::injection::InjectionMode;
use cacheroute_decisions::openai::ApiError;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession as Session;

impl ServicePlane {
    /// Send the request to an instance, retrying on others while it could not
    /// be sent, and stream the answer back.
    pub(crate) async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut ReqCtx,
        pipe: &mut RequestCtx,
        body: Bytes,
    ) -> Result<()> {
        let metrics = &self.state.metrics;
        let fleet = pipe.fleet.clone();
        let chain = fleet.chain.clone();
        let pools = pipe.pool_order.clone();
        let max_retries = pools
            .iter()
            .map(|&p| fleet.pools[p].settings.max_retries)
            .max()
            .unwrap_or(0);
        let knowledge_header = headers::encode_ids(pipe.ids.iter().map(String::as_str));
        let kdn_header = pipe
            .decision
            .as_ref()
            .and_then(|d| d.kdn.clone())
            .unwrap_or_else(|| "none".into());
        let decision_id = pipe.id.to_string();
        let catalog = self.state.knowledge.catalog.load();
        let mut tried: Vec<(usize, usize)> = Vec::new();
        let mut connect_errors: Vec<String> = Vec::new();
        while tried.len() <= max_retries {
            let agents = self.state.knowledge.agents.load();
            let Some((pool, idx)) =
                next_instance(&fleet, &pools, &tried, pipe, &catalog, &self.state, &agents)
            else {
                break;
            };
            tried.push((pool, idx));
            let pool_ref = &fleet.pools[pool];
            let inst: &PoolInstance = &pool_ref.instances[idx];
            let mut at = Attempt {
                pool: pool_ref,
                index: idx,
                inst,
                kv: None,
                slot: None,
                admitted: false,
            };
            match chain
                .attempt(pipe, &mut at, &mut Client(session), &*self.state)
                .await
            {
                Ok(()) => {}
                Err(Stop::Reply(r)) => {
                    ctx.served_by = None;
                    return self.reply(session, ctx, r).await;
                }
                Err(Stop::Gone(e)) => return Err(e),
            }
            let _slot = at.slot.take();
            let kv = at.kv.take();
            let _inflight = InflightGuard::new(inst);
            let mode = kv.as_ref().map(|k| k.mode());
            let injection = match (mode, pipe.ids.is_empty()) {
                (_, true) => "none",
                (Some(m), false) => m.as_str(),
                (None, false) if pipe.role == Role::Scheduler => "none",
                (None, false) => "text",
            };
            let mut request_headers: Vec<(&'static str, &str)> = pipe
                .request_headers
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            let handle = kv
                .as_ref()
                .filter(|k| k.mode() == InjectionMode::Kv)
                .map(|k| k.handle());
            if let Some(h) = &handle {
                request_headers.push((headers::KV_HANDLE, h.as_str()));
            }
            let attempt_body = match (&kv, pipe.parsed.as_ref()) {
                (Some(k), Some(parsed)) if k.mode() == InjectionMode::Kv => {
                    let mut parsed = parsed.clone();
                    parsed
                        .extra_mut()
                        .insert("kv_transfer_params".into(), k.transfer_params());
                    Bytes::from(parsed.to_json())
                }
                _ => body.clone(),
            };
            let all = [
                (headers::INSTANCE, inst.url.base.as_str()),
                (headers::POOL, pool_ref.name.as_str()),
                (headers::DECISION, decision_id.as_str()),
                (headers::KNOWLEDGE, knowledge_header.as_str()),
                (headers::KDN, kdn_header.as_str()),
                (headers::INJECTION, injection),
            ];
            // The knowledge headers only when the request carried knowledge (or a
            // scheduler in front said so): plain requests stay lean.
            let response_headers = if pipe.ids.is_empty() && pipe.hops == 0 {
                &all[..3]
            } else {
                &all[..]
            };
            ctx.served_by = Some(inst.metrics.clone());
            if let Some(k) = kv.as_ref() {
                pipe.injection = Some(k.decision.clone());
                pipe.kv_note = (k.mode() == InjectionMode::Kv).then(|| match &k.job {
                    Some(job) => format!("KV ready (job {job}) in {}", k.target),
                    None => format!("KV resident in {}", k.target),
                });
            }
            let outgoing = forward::Outgoing {
                body: attempt_body,
                headers: &request_headers,
                prefill: PrefillGuard::new(&inst.state, prefill_tokens(pipe, kv.as_ref())),
            };
            let view: &RequestCtx = pipe;
            let on_response = |resp: &mut ResponseHeader| chain.response(view, resp);
            let exchanged = forward::exchange(
                &self.state.transport,
                session,
                inst,
                outgoing,
                response_headers,
                &on_response,
                ctx.start,
            )
            .await;
            match exchanged {
                Ok(done) => {
                    ctx.status = done.status;
                    ctx.ttft = done.ttft;
                    ctx.exchanged = true;
                    inst.state.clear_connect_failure();
                    pipe.kv = kv;
                    return Ok(());
                }
                Err(ExchangeError::NotSent(e)) => {
                    inst.state.mark_connect_failure();
                    metrics
                        .upstream_errors
                        .with_label_values(&[&inst.url.base, "connect"])
                        .inc();
                    metrics
                        .retries
                        .with_label_values(&[&pool_ref.name, &inst.url.base])
                        .inc();
                    tracing::warn!(upstream = %inst.url.base, error = %e, "request not sent; trying another instance");
                    connect_errors.push(format!("{}: {}", inst.url.base, e));
                }
                Err(ExchangeError::Failed {
                    status_sent: true,
                    error,
                }) => {
                    // The response had started: the stream is cut, nothing
                    // else can be said to the client.
                    metrics
                        .upstream_errors
                        .with_label_values(&[&inst.url.base, "stream"])
                        .inc();
                    ctx.status = 200;
                    return Err(error);
                }
                Err(ExchangeError::Failed {
                    status_sent: false,
                    error,
                }) => {
                    let timeout = matches!(error.etype(), ReadTimedout | WriteTimedout);
                    let kind = if timeout { "timeout" } else { "failed" };
                    metrics
                        .upstream_errors
                        .with_label_values(&[&inst.url.base, kind])
                        .inc();
                    let api = if timeout {
                        ApiError::upstream_timeout(format!(
                            "{} did not answer in time",
                            inst.url.base
                        ))
                    } else {
                        ApiError::upstream_failed(format!("{}: {}", inst.url.base, error))
                    };
                    return self.reject(session, ctx, api).await;
                }
                Err(ExchangeError::Downstream(e)) => return Err(e),
            }
        }
        ctx.served_by = None;
        let mut err = ApiError::no_healthy_upstream(&pipe.model);
        if !connect_errors.is_empty() {
            err.message = format!(
                "{}; could not connect to: {}",
                err.message,
                connect_errors.join("; ")
            );
        }
        // Worth a retry once a health check may have seen an instance back.
        let retry_after = fleet
            .config
            .upstream
            .health_check_interval_ms
            .div_ceil(1000)
            .clamp(1, 60);
        let reply = Reply {
            error: err,
            retry_after: Some(retry_after),
        };
        self.reply(session, ctx, reply).await
    }
}

/// Prompt tokens the engine computes for this attempt: the estimate of the whole
/// prompt, less the knowledge chunks its store serves (all of them in KV mode, the
/// resident ones in text mode: LMCache finds those whatever the mode).
fn prefill_tokens(pipe: &RequestCtx, kv: Option<&KvPlan>) -> u64 {
    let total = pipe.prompt_tokens + pipe.knowledge_tokens;
    let cached = kv.map_or(0, |k| {
        let chunks = match k.mode() {
            InjectionMode::Kv => k.chunks,
            InjectionMode::Text => k.decision.inputs.knowledge.resident_chunks,
        };
        chunks * k.chunk_size
    });
    total.saturating_sub(cached).max(1)
}
