//! `scheduling`: chooses the pool and the KDN (`cacheroute_decisions::scheduler::decide`)
//! from the knowledge's coverage and the pools' and KDNs' load, or takes a trusted
//! scheduler's choice; orders the pools to try. In a scheduler gateway it also puts
//! the decision in the `x-cacheroute-*` headers for the proxy behind.

use super::{Flow, Incoming, Phases, RequestCtx, RequestFilter, World};
use crate::config::Role;
use crate::fleet::Pool;
use crate::headers;
use crate::knowledge;
use cacheroute_decisions::scheduler::{self, InjectionPreference, SchedulingDecision};
use std::sync::Arc;

pub struct Scheduling;

impl RequestFilter for Scheduling {
    fn name(&self) -> &str {
        "scheduling"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    fn on_request(&self, ctx: &mut RequestCtx, _: &mut Incoming<'_>, world: &dyn World) -> Flow {
        let fleet = ctx.fleet.clone();
        let pool_refs: Vec<&Pool> = ctx.pool_order.iter().map(|&p| &fleet.pools[p]).collect();
        let ids = ctx.requirement.ids();
        let mut decision = if ids.is_empty() && pool_refs.len() == 1 {
            // Nothing to weigh: the plain-proxy path stays cheap.
            SchedulingDecision {
                model: ctx.model.clone(),
                knowledge: ctx.requirement.clone(),
                pool: Some(pool_refs[0].name.clone()),
                kdn: None,
                reason: "the only pool serving the model; no knowledge required".into(),
                window_overridden: false,
                kdn_candidates: Vec::new(),
                pool_candidates: Vec::new(),
            }
        } else {
            let catalog = world.catalog();
            let kdns = world.kdns();
            let agents = world.agents();
            let kdn_views = knowledge::kdn_views(&kdns, &catalog, &ids, &ctx.model, &pool_refs);
            ctx.pool_views = pool_refs
                .iter()
                .map(|p| {
                    knowledge::pool_view(p, &catalog, &agents, world.injections(), &ids, &ctx.model)
                })
                .collect();
            scheduler::decide(
                &fleet.config.scheduler,
                &ctx.requirement,
                &ctx.model,
                &kdn_views,
                &ctx.pool_views,
            )
        };
        if let Some(u) = &ctx.upstream {
            if let Some(pool) = u.pool.as_deref() {
                if pool_refs.iter().any(|p| p.name == pool) {
                    decision.pool = Some(pool.to_string());
                    decision.kdn = u.kdn.clone();
                    decision.reason = format!("pool {pool} chosen by the upstream scheduler");
                }
            }
        }
        // The chosen pool first, then the others serving the model (for retries).
        if let Some(chosen) = &decision.pool {
            if let Some(pos) = ctx
                .pool_order
                .iter()
                .position(|&p| fleet.pools[p].name == *chosen)
            {
                let p = ctx.pool_order.remove(pos);
                ctx.pool_order.insert(0, p);
            }
        }
        ctx.ids = ids.iter().map(|s| s.to_string()).collect();
        if ctx.role == Role::Scheduler {
            decision_headers(ctx, &decision);
        }
        ctx.decision = Some(Arc::new(decision));
        Flow::Next
    }
}

/// The decision for the proxy behind: it lays the knowledge out itself.
fn decision_headers(ctx: &mut RequestCtx, decision: &SchedulingDecision) {
    let gw = &ctx.fleet.config.gateway;
    let h = &mut ctx.request_headers;
    if !gw.peer_token.is_empty() {
        h.push((headers::PEER, gw.peer_token.clone()));
    }
    h.push((
        headers::KNOWLEDGE,
        headers::encode_ids(ctx.ids.iter().map(String::as_str)),
    ));
    if let Some(pool) = &decision.pool {
        h.push((headers::POOL, pool.clone()));
    }
    h.push((
        headers::KDN,
        decision.kdn.clone().unwrap_or_else(|| "none".into()),
    ));
    let preference = match ctx.ext.injection {
        InjectionPreference::Auto => "auto",
        InjectionPreference::Kv => "kv",
        InjectionPreference::Text => "text",
    };
    h.push((headers::INJECTION_PREFERENCE, preference.into()));
}
