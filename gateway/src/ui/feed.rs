//! The dashboard's JSON feeds: one snapshot of the fleet, KDNs, injections and
//! knowledge (`/ui/api/state`), and the decision stream (`/ui/api/decisions`),
//! read from what the gateway already keeps (fleet status, the sync task's
//! views, the decision ring), so a poll costs no I/O.

use crate::decisions::DecisionRecord;
use crate::state::GatewayState;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

/// Everything the Fleet, KDNs and Knowledge views show, and the totals.
pub fn state(s: &GatewayState, last_reload_error: Option<String>) -> Value {
    let fleet = s.fleet.load();
    let status = fleet.status();
    let catalog = s.knowledge.catalog.load();
    let kdns = s.knowledge.kdns.load();
    let agents = s.knowledge.agents.load();

    // Block id → (model → targets holding it), over every KDN's registry.
    let mut resident: BTreeMap<&str, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for (id, b) in &catalog.blocks {
        for holder in b.holders.values() {
            for (model, m) in &holder.models {
                let e = resident.entry(id).or_default().entry(model).or_default();
                e.extend(m.resident.iter().map(String::as_str));
            }
        }
    }

    let pools: Vec<Value> = status
        .pools
        .iter()
        .zip(&fleet.pools)
        .map(|(ps, pool)| {
            let instances: Vec<Value> =
                ps.instances
                    .iter()
                    .zip(&pool.instances)
                    .map(|(is, inst)| {
                        let agent = agents.get(&inst.url.base);
                        // Resident here: the agent's word, else the registries' for its target.
                        let mut held: BTreeSet<&str> = agent
                            .map(|a| a.load.resident.iter().map(String::as_str).collect())
                            .unwrap_or_default();
                        if let Some(t) = inst.kv_target.as_deref() {
                            for (id, models) in &resident {
                                if pool.models.iter().any(|m| {
                                    models.get(m.as_str()).is_some_and(|ts| ts.contains(t))
                                }) {
                                    held.insert(id);
                                }
                            }
                        }
                        json!({
                            "url": is.url,
                            "healthy": is.healthy,
                            "inflight": is.inflight,
                            "queued": is.queued,
                            "kv_waiting": is.kv_waiting,
                            "max_inflight": is.max_inflight,
                            "weight": is.weight,
                            "kv_target": inst.kv_target,
                            "agent": agent.map(|a| json!({
                                "id": a.id,
                                "up": a.up,
                                "engine_up": a.load.engine_up,
                                "running": a.load.running,
                                "waiting": a.load.waiting,
                                "kv_usage": a.load.kv_usage,
                                "prompt_tokens_per_s": a.load.prompt_tokens_per_s,
                            })),
                            "resident": held,
                        })
                    })
                    .collect();
            json!({
                "name": ps.name,
                "models": ps.models,
                "policy": ps.policy,
                "instances": instances,
            })
        })
        .collect();

    let link = |kdn_url: &str, target: &str| {
        kdns.iter()
            .find(|k| k.url.trim_end_matches('/') == kdn_url.trim_end_matches('/'))
            .and_then(|k| k.load.as_ref()?.targets.get(target)?.link_gbps)
    };
    let injections = s.injections.journal.view(link);

    let mut blocks: Vec<Value> = catalog
        .blocks
        .iter()
        .map(|(id, b)| {
            let models: BTreeMap<&str, Value> = b
                .block
                .models
                .iter()
                .map(|(name, m)| {
                    let targets = resident
                        .get(id.as_str())
                        .and_then(|r| r.get(name.as_str()))
                        .cloned()
                        .unwrap_or_default();
                    (
                        name.as_str(),
                        json!({
                            "status": m.status,
                            "tokens": m.tokens,
                            "chunks": m.chunks,
                            "bytes": m.bytes,
                            "resident": targets,
                        }),
                    )
                })
                .collect();
            json!({
                "id": id,
                "title": b.block.title,
                "text_bytes": b.block.text.len(),
                "kdns": b.holders.keys().collect::<Vec<_>>(),
                "models": models,
                "uses": s.decisions.stats.uses(id),
            })
        })
        .collect();
    blocks.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));

    let m = &s.metrics;
    let text_tokens = m.knowledge_tokens.with_label_values(&["text"]).get();
    let kv_tokens = m.knowledge_tokens.with_label_values(&["kv"]).get();
    let cached = m.knowledge_cached_tokens.get();
    let all = text_tokens + kv_tokens;
    json!({
        "now": unix_now(),
        "config_version": status.config_version,
        "models": status.models,
        "role": fleet.config.gateway.role.as_str(),
        "service": service_url(s),
        "last_reload_error": last_reload_error,
        "pools": pools,
        "kdns": kdns.iter().map(|k| json!({
            "id": k.id,
            "url": k.url,
            "up": k.up,
            "member": k.member,
            "last_error": k.last_error,
            "load": k.load,
        })).collect::<Vec<_>>(),
        "injections": injections,
        "knowledge": blocks,
        "catalog_versions": catalog.versions,
        "totals": {
            "knowledge_tokens_text": text_tokens,
            "knowledge_tokens_kv": kv_tokens,
            "knowledge_cached_tokens": cached,
            "kv_reuse_ratio": if all > 0 { Some(cached as f64 / all as f64) } else { None },
        },
    })
}

/// The decisions newer than `after`, oldest first, at most `n` (the newest `n`).
pub fn decisions(s: &GatewayState, after: u64, n: usize) -> Value {
    let recent = s.decisions.last(n);
    let data: Vec<Value> = recent
        .iter()
        .rev()
        .filter(|r| r.id > after)
        .map(|r| summary(r))
        .collect();
    json!({"object": "list", "data": data})
}

/// One recent decision's whole record.
pub fn decision(s: &GatewayState, id: u64) -> Option<Value> {
    let keep = s.fleet.load().config.gateway.decision_history.max(1);
    s.decisions
        .last(keep)
        .into_iter()
        .find(|r| r.id == id)
        .and_then(|r| serde_json::to_value(&*r).ok())
}

/// What a row of the decision stream shows.
fn summary(r: &DecisionRecord) -> Value {
    let inj = r.injection.as_ref();
    let mode = inj.map(|d| d.mode.as_str());
    let predicted = inj.map(|d| match d.mode {
        cacheroute_decisions::injection::InjectionMode::Text => d.predicted_text_ms,
        cacheroute_decisions::injection::InjectionMode::Kv => d.predicted_kv_ms,
    });
    let finite = |x: f64| x.is_finite().then_some(x);
    json!({
        "id": r.id,
        "at": r.at,
        "route": r.route,
        "model": r.scheduling.model,
        "pool": r.scheduling.pool,
        "kdn": r.scheduling.kdn,
        "knowledge": r.scheduling.knowledge.ids(),
        "instance": r.outcome.instance,
        "mode": mode,
        "strategy": inj.map(|d| d.strategy.as_str()),
        "reason": inj.map(|d| d.reason),
        "scheduling_reason": r.scheduling.reason,
        "predicted_ms": predicted.and_then(finite),
        "predicted_text_ms": inj.and_then(|d| finite(d.predicted_text_ms)),
        "predicted_kv_ms": inj.and_then(|d| finite(d.predicted_kv_ms)),
        "ttft_ms": r.outcome.ttft_ms,
        "duration_ms": r.outcome.duration_ms,
        "status": r.outcome.status,
        "kv": r.outcome.kv,
        "notes": r.outcome.notes,
    })
}

/// The service plane's URL, as the playground's relay reaches it (an unspecified
/// listen address is reached on loopback).
pub fn service_url(s: &GatewayState) -> String {
    let mut addr = s.fleet.load().config.gateway.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    format!("http://{addr}")
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
