//! `decision_record`: counts the scheduling decision per pool and keeps the
//! request's whole record (inputs, candidates, scores, outcome) for
//! `GET /debug/strategy` and the decision log.

use super::{Done, Phases, RequestCtx, RequestFilter, World};
use crate::decisions::{DecisionRecord, Outcome};
use cacheroute_decisions::scheduler::KnowledgeRequirement;

pub struct DecisionRecorder;

impl RequestFilter for DecisionRecorder {
    fn name(&self) -> &str {
        "decision_record"
    }

    fn phases(&self) -> Phases {
        Phases::DONE
    }

    fn on_done(&self, ctx: &mut RequestCtx, done: &Done<'_>, world: &dyn World) {
        let (Some(state), Some(d)) = (world.gateway(), ctx.decision.as_ref()) else {
            return;
        };
        let source = match d.knowledge {
            KnowledgeRequirement::None => 0,
            KnowledgeRequirement::Explicit { .. } => 1,
            KnowledgeRequirement::Retrieved { .. } => 2,
        };
        let fleet = state.fleet.load();
        if let Some(pool) = fleet
            .pools
            .iter()
            .find(|p| Some(p.name.as_str()) == d.pool.as_deref())
        {
            pool.scheduled[source][usize::from(d.kdn.is_some())].inc();
        }
        let keep = fleet.config.gateway.decision_history;
        let notes = std::mem::take(&mut ctx.notes);
        let record = DecisionRecord {
            id: ctx.id,
            at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
            route: ctx.route_label,
            role: ctx.role.as_str(),
            hops: ctx.hops,
            tenant: ctx.tenant.as_deref().map(str::to_string),
            scheduling: d.clone(),
            injection: ctx.injection.clone(),
            outcome: Outcome {
                status: done.status,
                instance: done.instance.map(str::to_string),
                ttft_ms: done.ttft.map(|t| t.as_secs_f64() * 1e3),
                duration_ms: ctx.start.elapsed().as_secs_f64() * 1e3,
                kv: ctx.kv_note.clone(),
                notes,
            },
        };
        state.decisions.push(record, keep);
    }
}
