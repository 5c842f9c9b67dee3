//! The KV plan of one attempt on one instance (the proxy filter's inputs and effects): what the
//! injection decision looks at (`cacheroute_decisions::injection::decide` makes it), the prefix
//! check, starting the KV injection, and the KV handle.

use crate::fleet::{Fleet, Pool};
use crate::knowledge::{self, Catalog, KdnLive};
use crate::kv_inject::{InjectKey, InjectState};
use crate::pipeline::RequestCtx;
use crate::state::GatewayState;
use cacheroute_decisions::cost_model;
use cacheroute_decisions::injection::{
    self, InjectionDecision, InjectionInputs, InjectionMode, InstanceLoad, KnowledgeShape,
    TransferPath,
};
use cacheroute_decisions::prompt::knowledge_prefix;
use cacheroute_decisions::prompt::ChatTemplate;
use cacheroute_lmcache::tokenizer::Tokenizer;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Link speed assumed when a KDN reports neither shaping nor a measured bandwidth.
const DEFAULT_LINK_GBPS: f64 = 25.0;

/// The KV side of one attempt.
pub struct KvPlan {
    pub decision: InjectionDecision,
    /// Injection target of the instance's store.
    pub target: String,
    /// (target, model, leading block).
    pub key: InjectKey,
    /// The injection to wait for (KV mode, not resident yet).
    pub pending: Option<watch::Receiver<InjectState>>,
    /// KDN job (or `resident`) named in the KV handle.
    pub job: Option<String>,
    pub chunks: u64,
    pub chunk_size: u64,
}

impl KvPlan {
    pub fn mode(&self) -> InjectionMode {
        self.decision.mode
    }

    /// `x-cacheroute-kv-handle`: the job and the chunk range it made resident.
    pub fn handle(&self) -> String {
        format!(
            "job={};chunks={};tokens={}",
            self.job.as_deref().unwrap_or("resident"),
            self.chunks,
            self.chunks * self.chunk_size
        )
    }

    pub fn transfer_params(&self) -> serde_json::Value {
        serde_json::json!({"cacheroute_kv_handle": {
            "job": self.job.as_deref().unwrap_or("resident"),
            "chunks": self.chunks,
            "tokens": self.chunks * self.chunk_size,
        }})
    }
}

/// Checked prefixes: (block, model, registered tokens) → tokens match.
#[derive(Default)]
pub struct PrefixChecks {
    seen: Arc<Mutex<HashMap<PrefixKey, bool>>>,
}

type PrefixKey = (String, String, u64);

/// At most this many checks are remembered (then the memory starts over).
const MAX_PREFIX_CHECKS: usize = 100_000;

fn prefix_matches(
    template: ChatTemplate,
    tokenizer: &Tokenizer,
    content: &str,
    tokens: u64,
) -> bool {
    let ids = tokenizer.encode_with(
        &knowledge_prefix(template, content),
        template.add_special_tokens(),
    );
    ids.len() as u64 == tokens
}

impl PrefixChecks {
    /// Whether the prefix the gateway renders for `content` tokenizes to `tokens`
    /// tokens, as the KDN registered it (cached per block and model; [`Self::warm`]
    /// computes it off the worker threads when a sync brings the block).
    fn matches(&self, fleet: &Fleet, id: &str, model: &str, content: &str, tokens: u64) -> bool {
        let key = (id.to_string(), model.to_string(), tokens);
        if let Some(ok) = self.lock().get(&key) {
            return *ok;
        }
        let ok = prefix_matches(
            fleet.config.proxy.template_of(model),
            &fleet.tokenizer_of(model),
            content,
            tokens,
        );
        self.remember(key, ok);
        ok
    }

    /// Check, on the blocking pool, the prefixes of `catalog` for the fleet's models
    /// that are not checked yet: tokenizing a large block takes milliseconds, which a
    /// request's worker thread should not pay (measured in `benches/worker_bound`).
    pub fn warm(&self, fleet: &Fleet, catalog: &Catalog) {
        let todo: Vec<(PrefixKey, ChatTemplate, Arc<Tokenizer>, String)> = {
            let seen = self.lock();
            catalog
                .blocks
                .iter()
                .flat_map(|(id, b)| b.block.models.iter().map(move |(m, bm)| (id, m, bm)))
                .filter(|(_, m, bm)| !bm.content.is_empty() && fleet.models.iter().any(|x| x == *m))
                .map(|(id, m, bm)| ((id.clone(), m.clone(), bm.tokens), bm))
                .filter(|(key, _)| !seen.contains_key(key))
                .take(MAX_PREFIX_CHECKS)
                .map(|(key, bm)| {
                    let model = key.1.clone();
                    (
                        key,
                        fleet.config.proxy.template_of(&model),
                        fleet.tokenizer_of(&model),
                        bm.content.clone(),
                    )
                })
                .collect()
        };
        if todo.is_empty() {
            return;
        }
        let checks = PrefixChecks {
            seen: self.seen.clone(),
        };
        tokio::task::spawn_blocking(move || {
            for (key, template, tokenizer, content) in todo {
                let ok = prefix_matches(template, &tokenizer, &content, key.2);
                checks.remember(key, ok);
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PrefixKey, bool>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, key: PrefixKey, ok: bool) {
        let mut seen = self.lock();
        if seen.len() >= MAX_PREFIX_CHECKS {
            seen.clear();
        }
        seen.insert(key, ok);
    }
}

/// The path from `kdn` to `target`. The link's backlog is the larger of what the KDN
/// last reported and the gateway's own injections into `target` still running
/// (`own_backlog_bytes`): under a burst, the report is a sync period old.
fn transfer_path(state: &GatewayState, fleet: &Fleet, kdn: &KdnLive, target: &str) -> TransferPath {
    let own_backlog_bytes = state.injections.backlog_bytes(target);
    // what the KDN's finished jobs took beyond their queue and link time
    let job = state.injections.job_cost(&kdn.url).unwrap_or_default();
    // Borrowed: the KDN's load (its per-target map included) is read on every KV
    // decision; an empty default does not allocate.
    let unknown = knowledge::KdnLoad::default();
    let load = kdn.load.as_ref().unwrap_or(&unknown);
    let t = load.targets.get(target);
    let gbps = t
        .and_then(|t| t.link_gbps)
        .or_else(|| (load.bandwidth_bytes_per_s > 0.0).then_some(load.bandwidth_bytes_per_s * 8e-9))
        .unwrap_or(DEFAULT_LINK_GBPS);
    let own_ms = own_backlog_bytes as f64 * 8.0 / (gbps * 1e9) * 1000.0;
    TransferPath {
        link_gbps: gbps,
        rtt_ms: fleet.config.proxy.link_rtt_ms,
        link_busy_ms: t.map_or(0.0, |t| t.link_backlog_ms).max(own_ms),
        kdn_queue_ms: load.queue_wait_ms,
        kdn_pending: load.pending_transfers,
        kdn_bytes_per_sec: load.bandwidth_bytes_per_s,
        job_fixed_ms: job.fixed_ms,
        job_ms_per_mb: job.ms_per_mb,
    }
}

/// Decide how the knowledge reaches instance `idx` of `pool`, and start the
/// injection if KV is chosen and not resident. `None`: no registered knowledge
/// leads the prompt (nothing to decide).
pub fn plan_kv(
    state: &GatewayState,
    fleet: &Fleet,
    pool: &Pool,
    idx: usize,
    plan: &RequestCtx,
    catalog: &Catalog,
) -> Option<KvPlan> {
    if !plan.leading_applied {
        return None;
    }
    let id = plan.ids.first()?;
    let block = catalog.blocks.get(id)?;
    let m = block.model(&plan.model)?;
    let inst = &pool.instances[idx];
    let target = knowledge::instance_target(pool, idx).to_string();
    let key: InjectKey = (target.clone(), plan.model.clone(), id.clone());
    let agents = state.knowledge.agents.load();
    let agent = agents.get(&inst.url.base).filter(|a| a.up);
    let found = knowledge::residency(
        pool,
        idx,
        &plan.model,
        id,
        Some(block),
        &agents,
        &state.injections,
    );
    let resident = found.is_some();
    let recent_job = match found {
        Some(knowledge::Residency::Recent(job)) => Some(job),
        _ => None,
    };
    let kdns = state.knowledge.kdns.load();
    let kdn = plan
        .decision
        .as_ref()
        .and_then(|d| d.kdn.as_deref())
        .and_then(|k| kdns.iter().find(|l| l.id == k && l.up))
        .filter(|k| block.kv_ready_on(&k.id, &plan.model));
    let chunk_size = m.chunk_size.max(1);
    let usable = resident || kdn.is_some();
    let est = plan.prompt_tokens + plan.knowledge_tokens;
    // Ahead of this request: those waiting for a slot here, and those sent whose
    // first byte has not come back (the engine is still prefilling them). An
    // agent's waiting count covers the engine's own queue when it is higher.
    let (prefilling, prefill_tokens) = inst.state.prefilling();
    let gateway_queued = inst.state.queued();
    let agent_waiting = agent.map_or(0, |a| a.load.waiting);
    let (queued, queued_prefill_tokens) = if gateway_queued + prefilling >= agent_waiting {
        (
            gateway_queued + prefilling,
            gateway_queued * est + prefill_tokens,
        )
    } else {
        (agent_waiting, agent_waiting * est)
    };
    let running = inst
        .state
        .inflight()
        .saturating_sub(prefilling)
        .max(agent.map_or(0, |a| a.load.running));
    let inputs = InjectionInputs {
        instance: inst.url.base.clone(),
        load: InstanceLoad {
            queued,
            queued_prefill_tokens,
            running,
            running_context_tokens: running * est,
        },
        knowledge: KnowledgeShape {
            prompt_tokens: plan.prompt_tokens,
            knowledge_tokens: m.tokens,
            chunk_size,
            resident_chunks: if resident { m.chunks } else { 0 },
            total_chunks: if usable { m.chunks } else { 0 },
            kv_bytes_per_token: m.bytes.checked_div(m.tokens).unwrap_or(0),
        },
        transfer: kdn.map(|k| transfer_path(state, fleet, k, &target)),
        turn: state
            .knowledge_turn
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        store_gbps: fleet.config.proxy.store_gbps,
        store_async: fleet.config.proxy.store_async_loading,
        store_busy_ms: inst.state.store_link_backlog_ms(),
        weigh_others: fleet.config.proxy.weigh_others,
    };
    let mut decision = {
        let corrections = state.corrections.lock().unwrap_or_else(|p| p.into_inner());
        injection::decide(
            pool.proxy.injection,
            plan.ext.injection,
            &pool.proxy.cost,
            &inputs,
            &corrections,
        )
    };
    if decision.mode == InjectionMode::Kv {
        let template_ok = m.template.is_empty()
            || m.template == fleet.config.proxy.template_of(&plan.model).name();
        if !usable {
            decision.mode = InjectionMode::Text;
            decision.reason = "no_usable_kv";
        } else if !template_ok
            || !state
                .prefix_checks
                .matches(fleet, id, &plan.model, &m.content, m.tokens)
        {
            state.metrics.prefix_mismatch.inc();
            decision.mode = InjectionMode::Text;
            decision.reason = "prefix_mismatch";
        }
    }
    let (pending, job) = match (decision.mode, resident) {
        (InjectionMode::Kv, true) => (None, recent_job),
        (InjectionMode::Kv, false) => {
            let kdn = kdn?;
            let timeout = std::time::Duration::from_millis(fleet.config.proxy.inject_timeout_ms);
            let rx = state.injections.ensure(
                &state.http,
                &kdn.url,
                &fleet.config.knowledge.kdn_token,
                key.clone(),
                m.bytes,
                decision.inputs.transfer.map_or(0.0, |t| t.link_gbps),
                timeout,
            );
            if fleet.config.proxy.store_async_loading {
                // the engine will load what the KDN copies over its store link, after
                // the loads already sent there
                inst.state.reserve_store_link(cost_model::link_ms(
                    m.bytes,
                    fleet.config.proxy.store_gbps,
                ));
            }
            (Some(rx), None)
        }
        (InjectionMode::Text, _) => (None, None),
    };
    Some(KvPlan {
        decision,
        target,
        key,
        pending,
        job,
        chunks: m.chunks,
        chunk_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::FleetBuilder;
    use crate::knowledge::{BlockModel, KdnSnapshot, SnapshotBlock};
    use crate::pipeline::testing::{fleet_from, CONFIG};
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    fn block(id: &str, model: &str, content: &str, tokens: u64) -> Arc<SnapshotBlock> {
        Arc::new(SnapshotBlock {
            id: id.into(),
            title: None,
            tags: vec![],
            text: content.into(),
            models: BTreeMap::from([(
                model.to_string(),
                BlockModel {
                    status: "kv_ready".into(),
                    template: "llama3".into(),
                    tokens,
                    chunks: 1,
                    chunk_size: 256,
                    bytes: 0,
                    content: content.into(),
                    resident: vec![],
                },
            )]),
            digest: None,
            text_bytes: content.len() as u64,
        })
    }

    /// `warm` checks, on the blocking pool, the blocks of the models the fleet serves
    /// that have content and are not checked yet; `matches` then answers from memory.
    #[tokio::test]
    async fn warm_checks_new_served_blocks_and_requests_read_the_result() {
        let fleet = fleet_from(&FleetBuilder::new(&Default::default()), CONFIG).await;
        let template = fleet.config.proxy.template_of("m");
        let content = "ctx volcanic basalt and tidal flats";
        let right = fleet
            .tokenizer_of("m")
            .encode_with(
                &knowledge_prefix(template, content),
                template.add_special_tokens(),
            )
            .len() as u64;
        let snap = KdnSnapshot {
            kdn_id: "k".into(),
            version: "1".into(),
            blocks: vec![
                block("good", "m", content, right),
                block("stale", "m", content, right + 1),
                block("unserved", "other", content, right),
                block("empty", "m", "", right),
            ],
        };
        let catalog = Catalog::build(&[&snap], &Catalog::default());
        let checks = PrefixChecks::default();
        checks.warm(&fleet, &catalog);
        let deadline = Instant::now() + Duration::from_secs(30);
        while checks.lock().len() < 2 {
            assert!(Instant::now() < deadline, "the warm-up never finished");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let seen = checks.lock().clone();
        let key = |id: &str, tokens| (id.to_string(), "m".to_string(), tokens);
        assert_eq!(
            seen,
            HashMap::from([(key("good", right), true), (key("stale", right + 1), false)])
        );
        // A request reads the remembered answer (here one set by hand), no tokenizing.
        checks.remember(key("good", right), false);
        assert!(!checks.matches(&fleet, "good", "m", content, right));
    }
}
