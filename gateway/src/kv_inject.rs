//! KV injections the gateway asks KDNs for, shared between requests: one job per
//! (target store, model, block) at a time, whose readiness every waiting request
//! watches. Blocks injected recently are remembered as resident in their target
//! until the KDN's registry (synced) says so itself.

use cacheroute_wire::kdn::{InjectJob, InjectRequest, JobStatus};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// (injection target, model, block id).
pub type InjectKey = (String, String, String);

/// Where an injection stands.
#[derive(Debug, Clone, PartialEq)]
pub enum InjectState {
    Pending,
    /// The block's KV is in the target store; `job` names the KDN job.
    Ready {
        job: String,
    },
    Failed(String),
}

/// How long a finished injection counts as resident without the registry's word.
const RESIDENT_MEMORY: Duration = Duration::from_secs(600);

#[derive(Default)]
pub struct KvInjections {
    running: Mutex<HashMap<InjectKey, watch::Receiver<InjectState>>>,
    done: Mutex<HashMap<InjectKey, (String, Instant)>>,
    /// KV bytes of the injections still running, per target: the gateway's own backlog
    /// on each KDN → instance link, known at once (the KDN's report lags a sync period).
    backlog: Mutex<HashMap<String, u64>>,
}

impl KvInjections {
    /// The job of a block injected into `target` (or prefilled there) within `within`
    /// (at most the ten minutes a mark is kept), if any.
    pub fn resident_job(&self, key: &InjectKey, within: Duration) -> Option<String> {
        let done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        done.get(key)
            .filter(|(_, at)| at.elapsed() < within.min(RESIDENT_MEMORY))
            .map(|(job, _)| job.clone())
    }

    /// KV bytes of the running injections into `target`.
    pub fn backlog_bytes(&self, target: &str) -> u64 {
        let backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        backlog.get(target).copied().unwrap_or(0)
    }

    fn add_backlog(&self, target: &str, bytes: u64, add: bool) {
        let mut backlog = self.backlog.lock().unwrap_or_else(|p| p.into_inner());
        let b = backlog.entry(target.to_string()).or_default();
        *b = if add {
            b.saturating_add(bytes)
        } else {
            b.saturating_sub(bytes)
        };
        if *b == 0 {
            backlog.remove(target);
        }
    }

    /// Remember that `key`'s KV reached its store another way (the engine computed the
    /// prefix in text mode, and LMCache stores what it computes).
    pub fn mark_resident(&self, key: InjectKey, how: &str) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        if done.len() > 100_000 {
            done.retain(|_, (_, at)| at.elapsed() < RESIDENT_MEMORY);
        }
        done.insert(key, (how.to_string(), Instant::now()));
    }

    /// Watch the injection of `key` from the KDN at `kdn_url`, starting it unless one
    /// is already running.
    pub fn ensure(
        self: &std::sync::Arc<Self>,
        http: &reqwest::Client,
        kdn_url: &str,
        token: &str,
        key: InjectKey,
        bytes: u64,
        timeout: Duration,
    ) -> watch::Receiver<InjectState> {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = running.get(&key) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(InjectState::Pending);
        running.insert(key.clone(), rx.clone());
        drop(running);
        let this = self.clone();
        let http = http.clone();
        let url = kdn_url.trim_end_matches('/').to_string();
        let token = token.to_string();
        self.add_backlog(&key.0, bytes, true);
        tokio::spawn(async move {
            let state = run_job(&http, &url, &token, &key, timeout).await;
            this.add_backlog(&key.0, bytes, false);
            if let InjectState::Ready { job } = &state {
                let mut done = this.done.lock().unwrap_or_else(|p| p.into_inner());
                done.retain(|_, (_, at)| at.elapsed() < RESIDENT_MEMORY);
                done.insert(key.clone(), (job.clone(), Instant::now()));
            }
            let _ = tx.send(state);
            let mut running = this.running.lock().unwrap_or_else(|p| p.into_inner());
            running.remove(&key);
        });
        rx
    }
}

/// Ask the KDN to inject and wait for the job to finish.
async fn run_job(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    (target, model, block): &InjectKey,
    timeout: Duration,
) -> InjectState {
    let body = InjectRequest {
        knowledge_ids: vec![block.clone()],
        model: model.clone(),
        target: target.clone(),
        wait: Some(true),
        timeout_ms: Some(timeout.as_millis() as u64),
    };
    let mut req = http
        .post(format!("{url}/v1/inject"))
        .json(&body)
        .timeout(timeout + Duration::from_secs(5));
    if !token.is_empty() {
        req = req.bearer_auth(token);
    }
    let resp = req.send().await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return InjectState::Failed(format!("{url}: {e}")),
    };
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        return InjectState::Failed(format!("{url}: HTTP {status}: {text}"));
    }
    match serde_json::from_str::<InjectJob>(&text) {
        Ok(j) if j.status == JobStatus::Done => InjectState::Ready { job: j.id },
        Ok(j) if j.status == JobStatus::Failed => {
            InjectState::Failed(j.error.unwrap_or_else(|| "injection failed".into()))
        }
        Ok(j) => InjectState::Failed(format!("injection job {} still {:?}", j.id, j.status)),
        Err(e) => InjectState::Failed(format!("{url}: unexpected answer: {e}")),
    }
}

/// Wait until `rx` is no longer pending or `deadline` passes (then `Pending`).
pub async fn wait_ready(rx: &mut watch::Receiver<InjectState>, deadline: Instant) -> InjectState {
    let wait = rx.wait_for(|s| *s != InjectState::Pending);
    match tokio::time::timeout_at(deadline.into(), wait).await {
        Ok(Ok(s)) => s.clone(),
        Ok(Err(_)) => InjectState::Failed("injection task ended".into()),
        Err(_) => InjectState::Pending,
    }
}
