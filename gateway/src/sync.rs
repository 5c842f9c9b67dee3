//! The sync task: pulls each KDN's registry (versioned: `If-None-Match` on the
//! snapshot's ETag, so an unchanged registry costs a 304) and load, and each agent's
//! load, every `knowledge.sync_interval_ms`. KDNs come from the config and from the
//! control plane's members; either may appear or vanish at any time.
//!
//! A changed registry costs its metadata plus the text of the blocks that changed: the
//! snapshot is asked for without text (`?text=false`, each block with a content
//! digest), blocks whose digest the gateway already holds keep their text, and only
//! the others are fetched from `/v1/knowledge/contents` in batches. A KDN that ignores
//! `text=false` (older releases) sends the full snapshot, used as before.

use crate::knowledge::{
    AgentLive, AgentLoad, Catalog, KdnLive, KdnLoad, KdnSnapshot, SnapshotBlock,
};
use crate::members::MemberKind;
use crate::pull::PullError;
use crate::state::GatewayState;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use cacheroute_wire::kdn::{Contents as ContentsBody, Snapshot as SnapshotBody};

/// Most ids in one `/v1/knowledge/contents` request (the KDN takes up to 256).
const CONTENT_BATCH_IDS: usize = 64;
/// Most text bytes asked for in one `/v1/knowledge/contents` request (a block larger
/// than this goes alone).
const CONTENT_BATCH_BYTES: u64 = 8 << 20;

/// The sync task's own memory between rounds.
#[derive(Default)]
pub struct SyncState {
    /// KDN URL → its last snapshot.
    snapshots: BTreeMap<String, KdnSnapshot>,
    /// Response body bytes of snapshots and contents pulled so far.
    bytes_pulled: u64,
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

/// Why a KDN's registry could not be synced this round.
#[derive(Debug, thiserror::Error)]
enum SnapshotError {
    #[error("snapshot: {0}")]
    Snapshot(PullError),
    #[error("contents: {0}")]
    Contents(PullError),
}

enum SnapshotResult {
    Unchanged,
    Changed(KdnSnapshot),
    Failed(SnapshotError),
}

async fn pull_snapshot(
    client: &reqwest::Client,
    url: &str,
    previous: Option<&KdnSnapshot>,
    pulled: &mut u64,
) -> SnapshotResult {
    let snapshot_url = format!("{url}/v1/knowledge/snapshot?text=false");
    let failed = |e| SnapshotResult::Failed(SnapshotError::Snapshot(e));
    let mut req = client.get(&snapshot_url);
    if let Some(p) = previous.filter(|p| !p.version.is_empty()) {
        req = req.header("if-none-match", format!("\"{}\"", p.version));
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return failed(PullError::send(&snapshot_url, e)),
    };
    if resp.status() == reqwest::StatusCode::NOT_MODIFIED {
        return SnapshotResult::Unchanged;
    }
    if !resp.status().is_success() {
        return failed(PullError::status(&snapshot_url, resp.status()));
    }
    let etag = resp
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_start_matches("W/").trim_matches('"').to_string());
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return failed(PullError::body(&snapshot_url, e)),
    };
    *pulled += body.len() as u64;
    let body: SnapshotBody = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return failed(PullError::json(&snapshot_url, e)),
    };
    let mut version = etag.unwrap_or(body.version);
    let blocks = if !body.text {
        match fill_texts(client, url, body.blocks, previous, pulled).await {
            Ok((blocks, complete)) => {
                if !complete {
                    // the registry moved between the snapshot and the contents: take
                    // the whole snapshot again next round
                    version.clear();
                }
                blocks
            }
            Err(e) => return SnapshotResult::Failed(SnapshotError::Contents(e)),
        }
    } else {
        body.blocks.into_iter().map(Arc::new).collect()
    };
    SnapshotResult::Changed(KdnSnapshot {
        kdn_id: body.kdn_id,
        version,
        blocks,
    })
}

/// Whether `meta` (text-less) describes `old` apart from the text and contents.
fn same_metadata(meta: &SnapshotBlock, old: &SnapshotBlock) -> bool {
    meta.id == old.id
        && meta.title == old.title
        && meta.tags == old.tags
        && meta.text_bytes == old.text_bytes
        && meta.models.len() == old.models.len()
        && meta.models.iter().zip(&old.models).all(|((a, x), (b, y))| {
            a == b
                && x.status == y.status
                && x.template == y.template
                && x.tokens == y.tokens
                && x.chunks == y.chunks
                && x.chunk_size == y.chunk_size
                && x.bytes == y.bytes
                && x.resident == y.resident
        })
}

/// Complete a text-less snapshot: blocks whose digest `previous` holds keep its text
/// and contents (the same `Arc` when nothing else changed either); the others are
/// fetched. Returns the blocks, in the snapshot's order, and whether every block was
/// found at the snapshot's digest.
async fn fill_texts(
    client: &reqwest::Client,
    url: &str,
    metas: Vec<SnapshotBlock>,
    previous: Option<&KdnSnapshot>,
    pulled: &mut u64,
) -> Result<(Vec<Arc<SnapshotBlock>>, bool), PullError> {
    let known: HashMap<&str, &Arc<SnapshotBlock>> = previous
        .map(|p| p.blocks.iter().map(|b| (b.id.as_str(), b)).collect())
        .unwrap_or_default();
    let mut out: Vec<Option<Arc<SnapshotBlock>>> = Vec::with_capacity(metas.len());
    let mut missing: Vec<usize> = Vec::new();
    for (i, meta) in metas.iter().enumerate() {
        let old = known
            .get(meta.id.as_str())
            .filter(|o| meta.digest.is_some() && o.digest == meta.digest);
        match old {
            Some(old) if same_metadata(meta, old) => out.push(Some(Arc::clone(old))),
            Some(old) => {
                let mut b = meta.clone();
                b.text = old.text.clone();
                for (name, m) in b.models.iter_mut() {
                    if let Some(o) = old.models.get(name) {
                        m.content = o.content.clone();
                    }
                }
                out.push(Some(Arc::new(b)));
            }
            None => {
                out.push(None);
                missing.push(i);
            }
        }
    }
    let mut complete = true;
    let mut batch_start = 0;
    while batch_start < missing.len() {
        // a batch: up to CONTENT_BATCH_IDS ids and CONTENT_BATCH_BYTES of text
        let mut end = batch_start;
        let mut bytes = 0u64;
        while end < missing.len()
            && end - batch_start < CONTENT_BATCH_IDS
            && (end == batch_start || bytes + metas[missing[end]].text_bytes <= CONTENT_BATCH_BYTES)
        {
            bytes += metas[missing[end]].text_bytes;
            end += 1;
        }
        let batch = &missing[batch_start..end];
        batch_start = end;
        let ids: Vec<&str> = batch.iter().map(|&i| metas[i].id.as_str()).collect();
        let contents_url = format!("{url}/v1/knowledge/contents");
        let resp = client
            .get(&contents_url)
            .query(&[("ids", ids.join(","))])
            .send()
            .await
            .map_err(|e| PullError::send(&contents_url, e))?;
        if !resp.status().is_success() {
            return Err(PullError::status(&contents_url, resp.status()));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| PullError::body(&contents_url, e))?;
        *pulled += body.len() as u64;
        let body: ContentsBody =
            serde_json::from_slice(&body).map_err(|e| PullError::json(&contents_url, e))?;
        let mut fetched: HashMap<String, SnapshotBlock> =
            body.data.into_iter().map(|b| (b.id.clone(), b)).collect();
        for &i in batch {
            match fetched.remove(&metas[i].id) {
                Some(b) => {
                    complete &= b.digest == metas[i].digest;
                    out[i] = Some(Arc::new(b));
                }
                // deleted since the snapshot
                None => complete = false,
            }
        }
    }
    Ok((out.into_iter().flatten().collect(), complete))
}

async fn pull_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: String,
) -> Result<T, PullError> {
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| PullError::send(&url, e))?;
    if !resp.status().is_success() {
        return Err(PullError::status(&url, resp.status()));
    }
    let body = resp.bytes().await.map_err(|e| PullError::body(&url, e))?;
    serde_json::from_slice(&body).map_err(|e| PullError::json(&url, e))
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
            let mut pulled = 0u64;
            let snap = pull_snapshot(client, url, previous, &mut pulled).await;
            let load = pull_json::<KdnLoad>(client, format!("{url}/v1/load")).await;
            (snap, load, pulled)
        }
    }))
    .await;

    let mut changed = false;
    let mut live = Vec::with_capacity(sources.len());
    for ((url, member), (snap, load, pulled)) in sources.iter().zip(results) {
        let mut error = None;
        sync.bytes_pulled += pulled;
        match snap {
            SnapshotResult::Unchanged => {}
            SnapshotResult::Changed(s) => {
                tracing::info!(kdn = %url, version = %s.version, blocks = s.blocks.len(), bytes = pulled, total_bytes = sync.bytes_pulled, "knowledge registry synced");
                sync.snapshots.insert(url.clone(), s);
                changed = true;
            }
            SnapshotResult::Failed(e) => error = Some(e.to_string()),
        }
        let load = match load {
            Ok(l) => Some(l),
            Err(e) => {
                error.get_or_insert(e.to_string());
                None
            }
        };
        let id = sync
            .snapshots
            .get(url)
            .map(|s| s.kdn_id.clone())
            .or_else(|| load.as_ref().map(|l| l.kdn_id.clone()))
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
        // the prefix checks of new blocks, off the request path
        state.prefix_checks.warm(&state.fleet.load(), &catalog);
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

#[cfg(test)]
mod tests {
    use super::*;
    use cacheroute_kdn::config::{KdnConfig, ModelConfig};
    use serde_json::json;

    fn kdn_config(name: &str) -> KdnConfig {
        let mut cfg = KdnConfig::default();
        cfg.kdn.listen = "127.0.0.1:0".parse().unwrap();
        cfg.kdn.registry = format!("memory://{name}-reg");
        cfg.kdn.store = format!("memory://{name}-store");
        cfg.kdn.max_registrations_per_s = 0.0;
        cfg.models = vec![ModelConfig {
            name: "llama3-8b".into(),
            lmcache_model: "meta-llama/Meta-Llama-3-8B-Instruct".into(),
            template: Default::default(),
            tokenizer: cacheroute_kdn::tokenizer::TokenizerChoice::Approx,
            vocab_size: 128256,
            scheme: "lmcache-0.3.15".into(),
            hash_algorithm: "sha256_cbor".into(),
            chunk_size: 256,
            dtype: "bfloat16".into(),
            world_size: 1,
            hash_seed: "0".into(),
            kv_bytes_per_token: 131072,
            producer: None,
        }];
        cfg
    }

    /// About `bytes` of distinct words (every block different).
    fn text(seed: usize, bytes: usize) -> String {
        let mut s = String::with_capacity(bytes + 16);
        let mut i = 0usize;
        while s.len() < bytes {
            s.push_str(&format!("w{seed}x{i} "));
            i += 1;
        }
        s.trim().to_string()
    }

    async fn settle(kdn: &cacheroute_kdn::KdnHandle) {
        for _ in 0..3000 {
            if kdn.kdn.warmup_counts() == (0, 0) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("warm-ups did not finish");
    }

    /// The whole snapshot, as a KDN without text-less snapshots would send it.
    async fn full(client: &reqwest::Client, url: &str) -> (usize, Vec<SnapshotBlock>) {
        let body = client
            .get(format!("{url}/v1/knowledge/snapshot"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let parsed: SnapshotBody = serde_json::from_slice(&body).unwrap();
        (body.len(), parsed.blocks)
    }

    fn blocks(s: &KdnSnapshot) -> Vec<SnapshotBlock> {
        s.blocks.iter().map(|b| (**b).clone()).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_change_pulls_metadata_and_the_changed_block_only() {
        const N: usize = 30;
        const SIZE: usize = 128 << 10;
        let kdn = cacheroute_kdn::spawn_kdn(kdn_config("sync-bytes"))
            .await
            .unwrap();
        let url = kdn.url();
        let client = reqwest::Client::new();
        let bulk: Vec<String> = (0..N)
            .map(|i| json!({"id": format!("b{i}"), "text": text(i, SIZE)}).to_string())
            .collect();
        let r = client
            .post(format!("{url}/v1/knowledge/bulk"))
            .body(bulk.join("\n"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
        settle(&kdn).await;

        // the first pull costs about the whole registry, and gives what it holds
        let mut first = 0u64;
        let SnapshotResult::Changed(s1) = pull_snapshot(&client, &url, None, &mut first).await
        else {
            panic!("first pull");
        };
        let (full_bytes, full_blocks) = full(&client, &url).await;
        assert_eq!(blocks(&s1), full_blocks);
        assert!(first as usize >= N * SIZE, "{first}");

        // unchanged: a 304, nothing pulled
        let mut none = 0u64;
        assert!(matches!(
            pull_snapshot(&client, &url, Some(&s1), &mut none).await,
            SnapshotResult::Unchanged
        ));
        assert_eq!(none, 0);

        // one block more: the metadata and that block's text and content
        let r = client
            .post(format!("{url}/v1/knowledge"))
            .json(&json!({"id": "new", "text": text(99, SIZE)}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        settle(&kdn).await;
        let mut one = 0u64;
        let SnapshotResult::Changed(s2) = pull_snapshot(&client, &url, Some(&s1), &mut one).await
        else {
            panic!("second pull");
        };
        let (full2, full_blocks) = full(&client, &url).await;
        assert_eq!(blocks(&s2), full_blocks, "the same catalog as a full pull");
        eprintln!(
            "{N} × {SIZE} B blocks: a full snapshot after one change is {full2} B; the gateway \
             pulled {one} B (first sync {first} B, full before {full_bytes} B)"
        );
        assert!(one as usize <= 2 * SIZE + 64 * 1024, "{one}");
        assert!(one * 10 < full2 as u64, "{one} vs {full2}");
        // unchanged blocks keep the very same allocation
        assert!(Arc::ptr_eq(&s1.blocks[0], &s2.blocks[0]));

        // a status-only change (re-warm: registered → warming → failed): metadata only
        let r = client
            .post(format!("{url}/v1/knowledge/b3/warm?wait=true"))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
        let mut status_only = 0u64;
        let SnapshotResult::Changed(s3) =
            pull_snapshot(&client, &url, Some(&s2), &mut status_only).await
        else {
            panic!("third pull");
        };
        assert_eq!(blocks(&s3), full(&client, &url).await.1);
        assert!(status_only < 64 * 1024, "{status_only}");

        // a deleted block disappears
        client
            .delete(format!("{url}/v1/knowledge/b0"))
            .send()
            .await
            .unwrap();
        let mut del = 0u64;
        let SnapshotResult::Changed(s4) = pull_snapshot(&client, &url, Some(&s3), &mut del).await
        else {
            panic!("fourth pull");
        };
        assert!(s4.blocks.iter().all(|b| b.id != "b0"));
        assert_eq!(blocks(&s4), full(&client, &url).await.1);
        assert!(del < 64 * 1024, "{del}");
        kdn.stop().await;
    }
}
