//! What the gateway knows of the knowledge and the components around it, kept
//! fresh by the sync task (`sync.rs`) so that a request never waits on the
//! network to retrieve or schedule:
//!
//! * the [`Catalog`]: every block registered on the KDNs (text, per-model prefix
//!   and KV state), with the retrieval index over it; rebuilt only when a KDN's
//!   registry version changes;
//! * the KDNs' reported load ([`KdnLive`]) and the instance agents' ([`AgentLive`]).

use crate::fleet::Pool;
use arc_swap::ArcSwap;
use cacheroute_decisions::bm25::Bm25Index;
use cacheroute_decisions::scheduler::{KdnView, PoolView};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

pub use cacheroute_wire::agent::AgentLoad;
pub use cacheroute_wire::kdn::{BlockModel, KdnLoad, SnapshotBlock};

/// What retrieval indexes of a block (the KDN's own search uses the same fields).
pub trait IndexText {
    fn index_text(&self) -> String;
}

impl IndexText for SnapshotBlock {
    fn index_text(&self) -> String {
        cacheroute_decisions::bm25::document_text(self.title.as_deref(), &self.tags, &self.text)
    }
}

/// A KDN's registry at one version.
#[derive(Debug, Clone, Default)]
pub struct KdnSnapshot {
    pub kdn_id: String,
    pub version: String,
    pub blocks: Vec<Arc<SnapshotBlock>>,
}

/// A block across KDNs.
#[derive(Debug, Clone)]
pub struct Block {
    /// The first KDN's copy (text and layout agree across KDNs with the same config).
    pub block: Arc<SnapshotBlock>,
    /// KDN id → its copy (per-model status and residency differ per KDN).
    pub holders: BTreeMap<String, Arc<SnapshotBlock>>,
}

impl Block {
    /// The registered prefix of this block for `model`, if any KDN laid it out.
    pub fn model(&self, model: &str) -> Option<&BlockModel> {
        self.block
            .models
            .get(model)
            .or_else(|| self.holders.values().find_map(|b| b.models.get(model)))
    }

    /// Whether `kdn` holds this block's KV for `model`.
    pub fn kv_ready_on(&self, kdn: &str, model: &str) -> bool {
        self.holders
            .get(kdn)
            .and_then(|b| b.models.get(model))
            .is_some_and(BlockModel::kv_ready)
    }

    /// Whether the whole block is resident in one of `targets` for `model`.
    pub fn resident_in(&self, model: &str, targets: &[&str]) -> bool {
        self.holders.values().any(|b| {
            b.models
                .get(model)
                .is_some_and(|m| m.resident.iter().any(|r| targets.contains(&r.as_str())))
        })
    }
}

/// Every block known, with the retrieval index.
#[derive(Default)]
pub struct Catalog {
    pub blocks: HashMap<String, Block>,
    pub index: Bm25Index,
    /// Block embeddings (when an embeddings endpoint is configured), L2-normalised.
    pub embeddings: HashMap<String, Vec<f32>>,
    /// KDN id → version the catalog was built from.
    pub versions: BTreeMap<String, String>,
}

impl Catalog {
    pub fn contains(&self, id: &str) -> bool {
        self.blocks.contains_key(id)
    }

    /// Merge KDN snapshots; `previous` gives the index to update in place (only
    /// blocks whose text changed are re-indexed).
    pub fn build(snapshots: &[&KdnSnapshot], previous: &Catalog) -> Catalog {
        let mut blocks: HashMap<String, Block> = HashMap::new();
        let mut versions = BTreeMap::new();
        for s in snapshots {
            versions.insert(s.kdn_id.clone(), s.version.clone());
            for b in &s.blocks {
                blocks
                    .entry(b.id.clone())
                    .and_modify(|e| {
                        e.holders.insert(s.kdn_id.clone(), b.clone());
                    })
                    .or_insert_with(|| Block {
                        block: b.clone(),
                        holders: BTreeMap::from([(s.kdn_id.clone(), b.clone())]),
                    });
            }
        }
        let mut index = previous.index.clone();
        for (id, old) in &previous.blocks {
            match blocks.get(id) {
                Some(new) if new.block.index_text() == old.block.index_text() => {}
                _ => {
                    index.remove(id);
                }
            }
        }
        for (id, b) in &blocks {
            if !index.contains(id) {
                index.insert(id, &b.block.index_text());
            }
        }
        index.compact();
        let embeddings = previous
            .embeddings
            .iter()
            .filter(|(id, _)| {
                blocks.get(*id).is_some_and(|b| {
                    previous
                        .blocks
                        .get(*id)
                        .is_some_and(|o| o.block.index_text() == b.block.index_text())
                })
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Catalog {
            blocks,
            index,
            embeddings,
            versions,
        }
    }
}

/// A KDN as the sync task last saw it.
#[derive(Debug, Clone, Serialize)]
pub struct KdnLive {
    pub id: String,
    pub url: String,
    /// Registered on the control plane (rather than listed in the config).
    pub member: bool,
    pub up: bool,
    pub load: Option<KdnLoad>,
    pub last_error: Option<String>,
}

impl KdnLive {
    /// Cost of moving KV over the link to `target`, ms per MB (8 / Gb/s).
    pub fn link_cost(&self, target: &str) -> Option<f64> {
        let gbps = self.load.as_ref()?.targets.get(target)?.link_gbps?;
        (gbps > 0.0).then(|| 8.0 / gbps)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentLive {
    pub id: String,
    pub url: String,
    /// Base URL of the engine (the gateway's instance identity).
    pub instance: String,
    pub up: bool,
    pub load: AgentLoad,
}

/// The sync task's results, read per request.
#[derive(Default)]
pub struct KnowledgeState {
    pub catalog: ArcSwap<Catalog>,
    pub kdns: ArcSwap<Vec<KdnLive>>,
    /// Instance base URL → its agent.
    pub agents: ArcSwap<HashMap<String, AgentLive>>,
}

/// Where the knowledge's KV in an instance's store is known from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Residency {
    /// This gateway put it there (a KDN job, or the engine computed the prefix) recently.
    Recent(String),
    /// The instance's agent, which looks at the store itself, lists it.
    Agent,
    /// The KDN's registry says a job copied it (no agent to say otherwise).
    Registry,
}

/// How long the gateway's own word (an injection it saw finish, a prefill it sent)
/// outranks an up agent's: long enough for the agent to have scanned the store since,
/// short enough that an eviction the agent saw is believed.
pub const AGENT_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether block `id` (`block`, when in the catalog) is resident in instance `idx` of
/// `pool` for `model`. The gateway's own recent knowledge comes first (only for
/// [`AGENT_CATCH_UP`] when an agent watches the store: stores evict); then an up agent
/// is authoritative (a registry never hears of evictions); without an agent, the KDN's
/// registry.
pub fn residency(
    pool: &Pool,
    idx: usize,
    model: &str,
    id: &str,
    block: Option<&Block>,
    agents: &HashMap<String, AgentLive>,
    injections: &crate::kv_inject::KvInjections,
) -> Option<Residency> {
    let target = instance_target(pool, idx);
    let key = (target.to_string(), model.to_string(), id.to_string());
    let agent = agents.get(&pool.instances[idx].url.base).filter(|a| a.up);
    let trust_own = match agent {
        Some(_) => AGENT_CATCH_UP,
        None => std::time::Duration::MAX,
    };
    if let Some(how) = injections.resident_job(&key, trust_own) {
        return Some(Residency::Recent(how));
    }
    match agent {
        Some(a) => a
            .load
            .resident
            .iter()
            .any(|r| r == id)
            .then_some(Residency::Agent),
        None => block
            .is_some_and(|b| b.resident_in(model, &[target]))
            .then_some(Residency::Registry),
    }
}

/// The KDN injection target of an instance: its own, the pool's, or the pool's name.
pub fn instance_target(pool: &Pool, inst: usize) -> &str {
    pool.instances[inst]
        .kv_target
        .as_deref()
        .or(pool.kv_target.as_deref())
        .unwrap_or(&pool.name)
}

/// Views of the KDNs for one request: only up KDNs that reported a load, with their
/// coverage of the required blocks (the only blocks the scheduler looks at).
pub fn kdn_views(
    kdns: &[KdnLive],
    catalog: &Catalog,
    ids: &[&str],
    model: &str,
    pools: &[&Pool],
) -> Vec<KdnView> {
    kdns.iter()
        .filter(|k| k.up)
        .filter_map(|k| {
            let load = k.load.as_ref()?;
            let covers: BTreeSet<(String, String)> = ids
                .iter()
                .filter(|id| {
                    catalog
                        .blocks
                        .get(**id)
                        .is_some_and(|b| b.kv_ready_on(&k.id, model))
                })
                .map(|id| (id.to_string(), model.to_string()))
                .collect();
            let link_cost_to = pools
                .iter()
                .filter_map(|p| {
                    let target = p.kv_target.as_deref().unwrap_or(&p.name);
                    k.link_cost(target).map(|c| (p.name.clone(), c))
                })
                .collect();
            Some(KdnView {
                id: k.id.clone(),
                covers,
                pending: load.pending_transfers,
                active: load.active_transfers,
                queue_ms: load.queue_wait_ms.max(load.oldest_pending_ms),
                overloaded: load.max_queue > 0 && load.pending_transfers >= load.max_queue,
                link_cost_to,
            })
        })
        .collect()
}

/// A pool's view for one request: load from the gateway's own counts (or its agents',
/// when they see more, e.g. traffic from other gateways), and which required blocks
/// its instances' stores hold.
pub fn pool_view(
    pool: &Pool,
    catalog: &Catalog,
    agents: &HashMap<String, AgentLive>,
    injections: &crate::kv_inject::KvInjections,
    ids: &[&str],
    model: &str,
) -> PoolView {
    let (mut inflight, mut queued, mut capacity) = (0u64, 0u64, 0u64);
    for inst in &pool.instances {
        let own_inflight = inst.state.inflight();
        let own_queued = inst.state.queued();
        let agent = agents.get(&inst.url.base).filter(|a| a.up);
        let (a_running, a_waiting) = agent.map_or((0, 0), |a| (a.load.running, a.load.waiting));
        inflight += own_inflight.max(a_running);
        queued += own_queued.max(a_waiting);
        capacity += inst.max_inflight;
    }
    let resident = ids
        .iter()
        .filter(|id| {
            let block = catalog.blocks.get(**id);
            (0..pool.instances.len())
                .any(|i| residency(pool, i, model, id, block, agents, injections).is_some())
        })
        .map(|id| id.to_string())
        .collect();
    PoolView {
        name: pool.name.clone(),
        models: vec![model.to_string()],
        queue_len: queued,
        inflight,
        capacity,
        resident,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(id: &str, text: &str, status: &str, resident: &[&str]) -> Arc<SnapshotBlock> {
        Arc::new(SnapshotBlock {
            id: id.into(),
            title: None,
            tags: vec![],
            text: text.into(),
            models: BTreeMap::from([(
                "m".to_string(),
                BlockModel {
                    status: status.into(),
                    template: "llama3".into(),
                    tokens: 512,
                    chunks: 2,
                    chunk_size: 256,
                    bytes: 0,
                    content: format!("ctx {text}"),
                    resident: resident.iter().map(|s| s.to_string()).collect(),
                },
            )]),
            digest: None,
            text_bytes: text.len() as u64,
        })
    }

    #[test]
    fn catalog_merges_kdns_and_reindexes_changed_text_only() {
        let a = KdnSnapshot {
            kdn_id: "a".into(),
            version: "1".into(),
            blocks: vec![
                block("x", "volcanic basalt", "kv_ready", &[]),
                block("y", "tidal", "registered", &[]),
            ],
        };
        let b = KdnSnapshot {
            kdn_id: "b".into(),
            version: "7".into(),
            blocks: vec![block("x", "volcanic basalt", "registered", &["pool-b"])],
        };
        let c = Catalog::build(&[&a, &b], &Catalog::default());
        assert_eq!(c.blocks.len(), 2);
        let x = &c.blocks["x"];
        assert!(x.kv_ready_on("a", "m") && !x.kv_ready_on("b", "m"));
        assert!(x.resident_in("m", &["pool-b"]) && !x.resident_in("m", &["pool-a"]));
        assert_eq!(c.index.search("basalt", 1)[0].id, "x");

        let a2 = KdnSnapshot {
            kdn_id: "a".into(),
            version: "2".into(),
            blocks: vec![block("y", "tidal estuary", "registered", &[])],
        };
        let c2 = Catalog::build(&[&a2], &c);
        assert!(!c2.contains("x"));
        assert!(c2.index.search("basalt", 1).is_empty());
        assert_eq!(c2.index.search("estuary", 1)[0].id, "y");
    }
}
