//! A bounded journal of the KV injections this gateway asked KDNs for, so the
//! dashboard can show each job's progress and measured bandwidth. The gateway
//! waits on a job with one call (`wait: true`), so a running job's progress is
//! estimated from its age against the link's reported speed.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Jobs kept (running ones and the most recent finished ones).
const KEEP: usize = 64;

/// How an injection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEnd {
    /// The KDN finished job `job`.
    Done { job: String },
    /// It failed (the KDN's or the transport's reason), or was given up on.
    Failed { reason: String },
}

/// One injection as the gateway saw it.
#[derive(Debug, Clone)]
struct Job {
    seq: u64,
    kdn: String,
    target: String,
    model: String,
    block: String,
    bytes: u64,
    started: Instant,
    started_unix: f64,
    /// When it finished, and how (`ok`, or the failure).
    ended: Option<(Instant, JobEnd)>,
}

#[derive(Default)]
pub struct Journal {
    jobs: Mutex<(u64, VecDeque<Job>)>,
}

impl Journal {
    /// Note an injection starting; the returned number finishes it.
    pub fn start(
        &self,
        kdn: &str,
        (target, model, block): &crate::kv_inject::InjectKey,
        bytes: u64,
    ) -> u64 {
        let mut g = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        g.0 += 1;
        let seq = g.0;
        // Drop the oldest finished job first; running ones go only past twice the bound.
        if g.1.len() >= KEEP {
            match g.1.iter().position(|j| j.ended.is_some()) {
                Some(i) => {
                    g.1.remove(i);
                }
                None if g.1.len() >= 2 * KEEP => {
                    g.1.pop_front();
                }
                None => {}
            }
        }
        g.1.push_back(Job {
            seq,
            kdn: kdn.to_string(),
            target: target.clone(),
            model: model.clone(),
            block: block.clone(),
            bytes,
            started: Instant::now(),
            started_unix: unix_now(),
            ended: None,
        });
        seq
    }

    /// Note how injection `seq` ended.
    pub fn finish(&self, seq: u64, result: JobEnd) {
        let mut g = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(j) = g.1.iter_mut().find(|j| j.seq == seq) {
            j.ended = Some((Instant::now(), result));
        }
    }

    /// The journal, newest first; `link_gbps(kdn, target)` is the link's reported speed.
    pub fn view(&self, link_gbps: impl Fn(&str, &str) -> Option<f64>) -> Vec<serde_json::Value> {
        let g = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        g.1.iter()
            .rev()
            .map(|j| {
                let (elapsed, state, job, error) = match &j.ended {
                    Some((at, JobEnd::Done { job })) => {
                        (*at - j.started, "done", Some(job.clone()), None)
                    }
                    Some((at, JobEnd::Failed { reason })) => {
                        (*at - j.started, "failed", None, Some(reason.clone()))
                    }
                    None => (j.started.elapsed(), "running", None, None),
                };
                let secs = elapsed.as_secs_f64();
                let bandwidth = (state == "done" && secs > 0.0).then(|| j.bytes as f64 / secs);
                // Expected duration from the link's speed; a running job is shown below 100%.
                let expected_s = link_gbps(&j.kdn, &j.target)
                    .filter(|g| *g > 0.0)
                    .map(|g| j.bytes as f64 * 8.0 / (g * 1e9));
                let progress = match state {
                    "done" => Some(1.0),
                    "running" => expected_s.map(|e| (secs / e.max(1e-9)).min(0.99)),
                    _ => None,
                };
                serde_json::json!({
                    "seq": j.seq,
                    "kdn": j.kdn,
                    "target": j.target,
                    "model": j.model,
                    "block": j.block,
                    "bytes": j.bytes,
                    "started_at": j.started_unix,
                    "state": state,
                    "job": job,
                    "error": error,
                    "elapsed_ms": secs * 1e3,
                    "bandwidth_bytes_per_s": bandwidth,
                    "progress": progress,
                    "progress_estimated": state == "running",
                })
            })
            .collect()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: &str) -> crate::kv_inject::InjectKey {
        ("sim-1".into(), "m".into(), b.into())
    }

    #[test]
    fn finished_jobs_report_bandwidth_and_the_journal_stays_bounded() {
        let j = Journal::default();
        let a = j.start("k", &key("a"), 1_000_000);
        let b = j.start("k", &key("b"), 10);
        j.finish(
            a,
            JobEnd::Done {
                job: "job-1".into(),
            },
        );
        j.finish(
            b,
            JobEnd::Failed {
                reason: "boom".into(),
            },
        );
        let v = j.view(|_, _| Some(1.0));
        assert_eq!(v.len(), 2);
        assert_eq!(v[0]["state"], "failed");
        assert_eq!(v[0]["error"], "boom");
        assert_eq!(v[1]["state"], "done");
        assert_eq!(v[1]["job"], "job-1");
        assert!(v[1]["bandwidth_bytes_per_s"].as_f64().unwrap() > 0.0);
        for i in 0..500 {
            let s = j.start("k", &key(&format!("x{i}")), 1);
            j.finish(s, JobEnd::Done { job: "j".into() });
        }
        assert!(j.view(|_, _| None).len() <= KEEP);
    }

    #[test]
    fn a_running_job_shows_estimated_progress_below_one() {
        let j = Journal::default();
        j.start("k", &key("a"), 1 << 40);
        let v = j.view(|_, _| Some(1.0));
        assert_eq!(v[0]["state"], "running");
        let p = v[0]["progress"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&p), "{p}");
        assert!(j.view(|_, _| None)[0]["progress"].is_null());
    }
}
