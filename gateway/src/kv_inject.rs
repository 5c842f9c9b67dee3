//! KV injections the gateway asks KDNs for, shared between requests: one job per
//! (target store, model, block) at a time, whose readiness every waiting request
//! watches. Blocks injected recently are remembered as resident in their target
//! until the KDN's registry (synced) says so itself. Each finished job teaches the
//! KDN's job-time model (`cacheroute_decisions::kdn_jobs`) what a job costs beyond its link time,
//! which the injection decision then adds to its KV prediction.

use crate::ui::jobs::JobEnd;
use cacheroute_decisions::kdn_jobs::{JobCost, JobSample, JobTimes};
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
    /// Recent jobs with their timings, for the dashboard.
    pub journal: crate::ui::jobs::Journal,
    /// Per KDN URL: what its jobs cost beyond queue and link, learned from finished
    /// jobs (bounded by the configured KDNs; an unknown URL is never added by a client).
    job_times: Mutex<HashMap<String, JobTimes>>,
}

/// At most this many KDNs' job models are kept (a reload that renames KDNs many times
/// must not grow the map for ever).
const MAX_JOB_MODELS: usize = 1024;

/// A finished job as [`run_job`] saw it.
struct Finished {
    state: InjectState,
    /// (bytes moved, KDN queue wait ms) of a job that finished.
    timing: Option<(u64, f64)>,
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

    /// What a job of the KDN at `kdn_url` costs beyond its queue and link time, once
    /// enough of its jobs finished.
    pub fn job_cost(&self, kdn_url: &str) -> Option<JobCost> {
        let times = self.job_times.lock().unwrap_or_else(|p| p.into_inner());
        times
            .get(kdn_url.trim_end_matches('/'))
            .and_then(|t| t.cost())
    }

    fn learn_job(&self, kdn_url: &str, sample: JobSample) {
        let mut times = self.job_times.lock().unwrap_or_else(|p| p.into_inner());
        if times.len() >= MAX_JOB_MODELS && !times.contains_key(kdn_url) {
            times.clear();
        }
        times
            .entry(kdn_url.to_string())
            .or_default()
            .observe(&sample);
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
    /// is already running. `link_gbps`: the KDN → target link the decision assumed
    /// (what the job's time is compared with, to learn the KDN's own part).
    #[allow(clippy::too_many_arguments)]
    pub fn ensure(
        self: &std::sync::Arc<Self>,
        http: &reqwest::Client,
        kdn_url: &str,
        token: &str,
        key: InjectKey,
        bytes: u64,
        link_gbps: f64,
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
        // the bytes already on the link ahead of this job (ours, as the decision saw them)
        let ahead = self.backlog_bytes(&key.0);
        self.add_backlog(&key.0, bytes, true);
        let seq = self.journal.start(&url, &key, bytes);
        tokio::spawn(async move {
            let sent = Instant::now();
            let Finished { state, timing } = run_job(&http, &url, &token, &key, timeout).await;
            let observed_ms = sent.elapsed().as_secs_f64() * 1e3;
            this.add_backlog(&key.0, bytes, false);
            this.journal.finish(
                seq,
                match &state {
                    InjectState::Ready { job } => JobEnd::Done { job: job.clone() },
                    InjectState::Failed(e) => JobEnd::Failed { reason: e.clone() },
                    InjectState::Pending => JobEnd::Failed {
                        reason: "pending".into(),
                    },
                },
            );
            if let (InjectState::Ready { .. }, Some((moved, kdn_queue_ms))) = (&state, timing) {
                let link_ms = if link_gbps > 0.0 {
                    (ahead + moved) as f64 * 8.0 / (link_gbps * 1e9) * 1e3
                } else {
                    0.0
                };
                let sample = JobSample {
                    bytes: moved,
                    observed_ms,
                    kdn_queue_ms,
                    link_ms,
                };
                tracing::debug!(
                    kdn = %url, target = %key.0, block = %key.2, bytes = moved,
                    observed_ms, kdn_queue_ms, link_ms, residual_ms = sample.residual_ms(),
                    "injection job finished"
                );
                this.learn_job(&url, sample);
            }
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
) -> Finished {
    let failed = |e: String| Finished {
        state: InjectState::Failed(e),
        timing: None,
    };
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
        Err(e) => return failed(format!("{url}: {e}")),
    };
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    if !status.is_success() {
        return failed(format!("{url}: HTTP {status}: {text}"));
    }
    match serde_json::from_str::<InjectJob>(&text) {
        Ok(j) if j.status == JobStatus::Done => Finished {
            timing: Some((j.bytes_moved, j.queue_wait_ms)),
            state: InjectState::Ready { job: j.id },
        },
        Ok(j) if j.status == JobStatus::Failed => {
            failed(j.error.unwrap_or_else(|| "injection failed".into()))
        }
        Ok(j) => failed(format!("injection job {} still {:?}", j.id, j.status)),
        Err(e) => failed(format!("{url}: unexpected answer: {e}")),
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
