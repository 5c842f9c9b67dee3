//! The sync task: pulls each KDN's registry (versioned: `If-None-Match` on the
//! snapshot's ETag, so an unchanged registry costs a 304) and load, and each agent's
//! load, every `knowledge.sync_interval_ms`. KDNs come from the config and from the
//! control plane's members; either may appear or vanish at any time.

use crate::knowledge::{
    AgentLive, AgentLoad, Catalog, KdnLive, KdnLoad, KdnSnapshot, SnapshotBlock,
};
use crate::members::MemberKind;
use crate::state::GatewayState;
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

#[derive(Deserialize)]
struct SnapshotBody {
    #[serde(default)]
    kdn_id: Option<String>,
    #[serde(default)]
    version: Option<String>,
    blocks: Vec<SnapshotBlock>,
}

/// The sync task's own memory between rounds.
#[derive(Default)]
pub struct SyncState {
    /// KDN URL → its last snapshot.
    snapshots: BTreeMap<String, KdnSnapshot>,
}

fn client(timeout: Duration) -> Option<reqwest::Client> {
    reqwest::Client::builder().timeout(timeout).build().ok()
}

/// One KDN source: URL and whether it registered itself.
fn kdn_sources(state: &GatewayState) -> Vec<(String, bool)> {
    let fleet = state.fleet.load();
    let mut out: Vec<(String, bool)> = fleet
        .config
        .kdns
        .iter()
        .map(|k| (k.url.trim_end_matches('/').to_string(), false))
        .collect();
    for m in state.members.live(MemberKind::Kdn) {
        let url = m.url.trim_end_matches('/').to_string();
        if !out.iter().any(|(u, _)| *u == url) {
            out.push((url, true));
        }
    }
    out
}

enum SnapshotResult {
    Unchanged,
    Changed(KdnSnapshot),
    Failed(String),
}

async fn pull_snapshot(
    client: &reqwest::Client,
    url: &str,
    previous: Option<&KdnSnapshot>,
) -> SnapshotResult {
    let mut req = client.get(format!("{url}/v1/knowledge/snapshot"));
    if let Some(p) = previous.filter(|p| !p.version.is_empty()) {
        req = req.header("if-none-match", format!("\"{}\"", p.version));
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return SnapshotResult::Failed(format!("snapshot: {e}")),
    };
    if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
        return SnapshotResult::Unchanged;
    }
    if !resp.status().is_success() {
        return SnapshotResult::Failed(format!("snapshot: HTTP {}", resp.status()));
    }
    let etag = resp
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_start_matches("W/").trim_matches('"').to_string());
    match resp.json::<SnapshotBody>().await {
        Ok(body) => SnapshotResult::Changed(KdnSnapshot {
            kdn_id: body.kdn_id.unwrap_or_else(|| url.to_string()),
            version: etag.or(body.version).unwrap_or_default(),
            blocks: body.blocks.into_iter().map(Arc::new).collect(),
        }),
        Err(e) => SnapshotResult::Failed(format!("snapshot: {e}")),
    }
}

async fn pull_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: String,
) -> Result<T, String> {
    let resp = client.get(&url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("{url}: HTTP {}", resp.status()));
    }
    resp.json::<T>().await.map_err(|e| format!("{url}: {e}"))
}

/// One round over every KDN and agent.
pub async fn sync_once(state: &GatewayState, sync: &mut SyncState) {
    let cfg = state.fleet.load().config.knowledge.clone();
    let Some(client) = client(Duration::from_millis(cfg.sync_timeout_ms)) else {
        return;
    };
    let sources = kdn_sources(state);
    let results = futures::future::join_all(sources.iter().map(|(url, _)| {
        let previous = sync.snapshots.get(url);
        let client = &client;
        async move {
            let snap = pull_snapshot(client, url, previous).await;
            let load = pull_json::<KdnLoad>(client, format!("{url}/v1/load")).await;
            (snap, load)
        }
    }))
    .await;

    let mut changed = false;
    let mut live = Vec::with_capacity(sources.len());
    for ((url, member), (snap, load)) in sources.iter().zip(results) {
        let mut error = None;
        match snap {
            SnapshotResult::Unchanged => {}
            SnapshotResult::Changed(s) => {
                tracing::info!(kdn = %url, version = %s.version, blocks = s.blocks.len(), "knowledge registry synced");
                sync.snapshots.insert(url.clone(), s);
                changed = true;
            }
            SnapshotResult::Failed(e) => error = Some(e),
        }
        let load = match load {
            Ok(l) => Some(l),
            Err(e) => {
                error.get_or_insert(e);
                None
            }
        };
        let id = sync
            .snapshots
            .get(url)
            .map(|s| s.kdn_id.clone())
            .or_else(|| load.as_ref().and_then(|l| l.kdn_id.clone()))
            .unwrap_or_else(|| url.clone());
        live.push(KdnLive {
            id,
            url: url.clone(),
            member: *member,
            up: error.is_none(),
            load,
            last_error: error,
        });
    }
    // KDNs no longer listed (config changed, member expired) take their blocks away.
    let before = sync.snapshots.len();
    sync.snapshots
        .retain(|url, _| sources.iter().any(|(u, _)| u == url));
    changed |= sync.snapshots.len() != before;
    state.knowledge.kdns.store(Arc::new(live));

    if changed {
        let snaps: Vec<&KdnSnapshot> = sync.snapshots.values().collect();
        let previous = state.knowledge.catalog.load_full();
        let catalog = Catalog::build(&snaps, &previous);
        let catalog = crate::retrieval::embed_catalog(&client, &cfg, catalog).await;
        state
            .metrics
            .knowledge_blocks
            .set(catalog.blocks.len() as i64);
        state.knowledge.catalog.store(Arc::new(catalog));
    }

    // Agents.
    let agents = state.members.live(MemberKind::Agent);
    let loads = futures::future::join_all(agents.iter().map(|a| {
        pull_json::<AgentLoad>(&client, format!("{}/v1/load", a.url.trim_end_matches('/')))
    }))
    .await;
    let mut by_instance = HashMap::new();
    for (a, load) in agents.into_iter().zip(loads) {
        let instance = a
            .instance
            .as_deref()
            .and_then(|i| crate::config::InstanceUrl::parse(i).ok())
            .map(|u| u.base)
            .unwrap_or_default();
        let (up, load) = match load {
            Ok(l) => (true, l),
            Err(e) => {
                tracing::debug!(agent = %a.url, error = %e, "agent load");
                (false, AgentLoad::default())
            }
        };
        by_instance.insert(
            instance.clone(),
            AgentLive {
                id: a.id,
                url: a.url,
                instance,
                up,
                load,
            },
        );
    }
    state.knowledge.agents.store(Arc::new(by_instance));
}

/// Run rounds forever.
pub async fn sync_loop(state: Arc<GatewayState>) {
    let mut sync = SyncState::default();
    loop {
        sync_once(&state, &mut sync).await;
        let interval = state.fleet.load().config.knowledge.sync_interval_ms;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(interval)) => {}
            _ = state.sync_now.notified() => {}
        }
    }
}
