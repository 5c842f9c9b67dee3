//! What a KDN injection job costs beyond its bytes on the link, learned from finished
//! jobs (plain math, no I/O).
//!
//! The adaptive predictor prices a KV transfer as `rtt + bytes / link`. A real KDN adds
//! its own work to every job: the inject request and its answer, job bookkeeping, the
//! check of what the target already holds, the reads and writes of the stores. On the
//! benches that overhead was 2–4× the link time and it is what made KV look cheaper
//! than it was. [`JobTimes`] fits, over the jobs the gateway saw finish,
//! `residual = fixed + per_byte · bytes`, where `residual` is the job's time at the
//! gateway minus what the predictor already counts (the KDN's own queue wait and the
//! link time of the bytes ahead of it and of its own). Older jobs weigh less
//! (exponential forgetting), so the fit follows a KDN whose load changes.

use serde::{Deserialize, Serialize};

/// Weight kept by the past at each new job (≈ the last 20 jobs count).
pub const FORGET: f64 = 0.95;
/// Jobs needed before the fit is used (one outlier alone does not move predictions).
pub const MIN_JOBS: u64 = 3;
/// Upper bound of the learned fixed part, ms: a KDN slower than this per job is down,
/// which the scheduler's overload filter handles; one stalled job must not make KV
/// look impossible for ever.
pub const MAX_FIXED_MS: f64 = 10_000.0;

/// One finished job as the gateway saw it.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct JobSample {
    /// Logical KV bytes the job moved (the KDN's `bytes_moved`).
    pub bytes: u64,
    /// From the gateway's inject request to the KDN's answer that the job is done, ms.
    pub observed_ms: f64,
    /// The KDN's report of the time the job waited for a copy slot, ms.
    pub kdn_queue_ms: f64,
    /// The link time the predictor counts for this job: its own bytes and the bytes
    /// ahead of it on the same link, at the link's rate, ms.
    pub link_ms: f64,
}

impl JobSample {
    /// What the predictor does not count: the job's time beyond its queue and link.
    pub fn residual_ms(&self) -> f64 {
        (self.observed_ms - self.kdn_queue_ms.max(0.0) - self.link_ms.max(0.0)).max(0.0)
    }
}

/// Online weighted least squares of the residual on the bytes moved.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct JobTimes {
    /// Σw, Σw·x, Σw·y, Σw·x², Σw·x·y with x in MB (1e6 bytes) and y in ms.
    w: f64,
    wx: f64,
    wy: f64,
    wxx: f64,
    wxy: f64,
    /// Jobs observed.
    pub jobs: u64,
}

/// The learned extra cost of a job.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct JobCost {
    /// Fixed part per job, ms.
    pub fixed_ms: f64,
    /// Per MB (1e6 logical bytes) moved, on top of the link's own time, ms.
    pub ms_per_mb: f64,
}

impl JobCost {
    /// The extra time of a job moving `bytes`, ms.
    pub fn extra_ms(&self, bytes: u64) -> f64 {
        self.fixed_ms + self.ms_per_mb * bytes as f64 / 1e6
    }
}

impl JobTimes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Learn from one finished job. Non-finite or negative times are ignored.
    pub fn observe(&mut self, s: &JobSample) {
        if !(s.observed_ms.is_finite() && s.kdn_queue_ms.is_finite() && s.link_ms.is_finite())
            || s.observed_ms < 0.0
        {
            return;
        }
        let x = s.bytes as f64 / 1e6;
        let y = s.residual_ms().min(MAX_FIXED_MS);
        self.w = self.w * FORGET + 1.0;
        self.wx = self.wx * FORGET + x;
        self.wy = self.wy * FORGET + y;
        self.wxx = self.wxx * FORGET + x * x;
        self.wxy = self.wxy * FORGET + x * y;
        self.jobs += 1;
    }

    /// The fitted cost, or `None` before [`MIN_JOBS`] jobs. When the jobs' sizes hardly
    /// differ (or the slope comes out negative) the whole residual is a fixed cost:
    /// its weighted mean.
    pub fn cost(&self) -> Option<JobCost> {
        if self.jobs < MIN_JOBS || self.w <= 0.0 {
            return None;
        }
        let mean_x = self.wx / self.w;
        let mean_y = self.wy / self.w;
        let var_x = self.wxx / self.w - mean_x * mean_x;
        let cov = self.wxy / self.w - mean_x * mean_y;
        // sizes spread by less than 1 % of their mean: no slope to fit
        let spread = var_x > (0.01 * mean_x).powi(2) && var_x > 1e-12;
        let (fixed, slope) = if spread && cov > 0.0 {
            let slope = cov / var_x;
            let fixed = mean_y - slope * mean_x;
            if fixed >= 0.0 {
                (fixed, slope)
            } else {
                // a line through the origin instead of a negative fixed part
                let through = if self.wxx > 0.0 {
                    self.wxy / self.wxx
                } else {
                    0.0
                };
                (0.0, through.max(0.0))
            }
        } else {
            (mean_y, 0.0)
        };
        Some(JobCost {
            fixed_ms: fixed.clamp(0.0, MAX_FIXED_MS),
            ms_per_mb: slope.max(0.0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(mb: f64, extra_ms: f64) -> JobSample {
        let bytes = (mb * 1e6) as u64;
        JobSample {
            bytes,
            observed_ms: 3.0 + 10.0 + extra_ms,
            kdn_queue_ms: 3.0,
            link_ms: 10.0,
        }
    }

    #[test]
    fn nothing_before_enough_jobs() {
        let mut t = JobTimes::new();
        assert_eq!(t.cost(), None);
        t.observe(&job(100.0, 20.0));
        t.observe(&job(200.0, 20.0));
        assert_eq!(t.cost(), None);
        t.observe(&job(300.0, 20.0));
        assert!(t.cost().is_some());
    }

    #[test]
    fn learns_a_fixed_and_a_per_byte_part() {
        let mut t = JobTimes::new();
        // extra = 8 ms + 0.05 ms/MB
        for mb in [34.0, 134.0, 268.0, 67.0, 400.0, 134.0, 201.0] {
            t.observe(&job(mb, 8.0 + 0.05 * mb));
        }
        let c = t.cost().unwrap();
        assert!((c.fixed_ms - 8.0).abs() < 1e-6, "{c:?}");
        assert!((c.ms_per_mb - 0.05).abs() < 1e-9, "{c:?}");
        assert!((c.extra_ms(100_000_000) - 13.0).abs() < 1e-6);
    }

    #[test]
    fn same_sized_jobs_give_a_fixed_cost() {
        let mut t = JobTimes::new();
        for extra in [10.0, 20.0, 30.0] {
            t.observe(&job(134.0, extra));
        }
        let c = t.cost().unwrap();
        assert_eq!(c.ms_per_mb, 0.0);
        // weighted mean: the latest jobs weigh a little more than the first
        assert!(c.fixed_ms > 20.0 && c.fixed_ms < 20.5, "{c:?}");
    }

    #[test]
    fn queue_and_link_are_not_counted_twice() {
        let s = JobSample {
            bytes: 1,
            observed_ms: 50.0,
            kdn_queue_ms: 30.0,
            link_ms: 15.0,
        };
        assert!((s.residual_ms() - 5.0).abs() < 1e-12);
        // a job faster than the link says costs nothing extra, never less than nothing
        let fast = JobSample {
            observed_ms: 10.0,
            ..s
        };
        assert_eq!(fast.residual_ms(), 0.0);
    }

    #[test]
    fn forgets_old_jobs() {
        let mut t = JobTimes::new();
        for _ in 0..50 {
            t.observe(&job(134.0, 100.0));
        }
        for _ in 0..50 {
            t.observe(&job(134.0, 10.0));
        }
        let c = t.cost().unwrap();
        assert!(c.fixed_ms < 20.0, "{c:?}");
    }

    #[test]
    fn bad_samples_are_ignored_and_outliers_bounded() {
        let mut t = JobTimes::new();
        t.observe(&JobSample {
            observed_ms: f64::NAN,
            ..job(1.0, 0.0)
        });
        t.observe(&JobSample {
            observed_ms: -1.0,
            ..job(1.0, 0.0)
        });
        assert_eq!(t.jobs, 0);
        for _ in 0..3 {
            t.observe(&job(10.0, 1e9));
        }
        assert!(t.cost().unwrap().fixed_ms <= MAX_FIXED_MS);
    }

    #[test]
    fn a_negative_intercept_becomes_a_line_through_the_origin() {
        let mut t = JobTimes::new();
        // extra grows faster than linearly from 0: the straight fit crosses below 0
        for (mb, extra) in [(10.0, 0.0), (100.0, 1.0), (200.0, 40.0), (300.0, 90.0)] {
            t.observe(&job(mb, extra));
        }
        let c = t.cost().unwrap();
        assert_eq!(c.fixed_ms, 0.0);
        assert!(c.ms_per_mb > 0.0, "{c:?}");
    }
}
