//! `rate_limit`: per-tenant token buckets of requests per minute and prompt tokens
//! per minute (`[rate_limit]`, with per-tenant overrides). A request over either is
//! answered 429 with `Retry-After` and OpenAI's `rate_limit_exceeded`. Buckets exist
//! only for configured tenants and one shared "unknown" bucket (bounded); a reload
//! starts them full.

use super::{Flow, Incoming, Phases, Reply, RequestCtx, RequestFilter, World};
use crate::config::RateLimitSection;
use cacheroute_decisions::openai::ApiError;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// A token bucket refilled continuously at `per_minute`, holding at most a minute's.
#[derive(Debug)]
struct Bucket {
    per_minute: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u64, now: Instant) -> Bucket {
        Bucket {
            per_minute: per_minute as f64,
            level: per_minute as f64,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + dt * self.per_minute / 60.0).min(self.per_minute);
        self.at = now;
    }

    /// Seconds until `n` is available (0: available now). An `n` over a whole
    /// minute's worth waits for a full bucket.
    fn wait_for(&self, n: f64) -> f64 {
        let n = n.min(self.per_minute);
        if self.level >= n || self.per_minute <= 0.0 {
            0.0
        } else {
            (n - self.level) * 60.0 / self.per_minute
        }
    }
}

/// One tenant's buckets (`None`: unlimited).
#[derive(Debug)]
struct Limits {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

pub struct RateLimit {
    tenants: HashMap<String, Mutex<Limits>>,
    unknown: Mutex<Limits>,
}

impl RateLimit {
    pub fn new(cfg: &RateLimitSection) -> RateLimit {
        RateLimit::at(cfg, Instant::now())
    }

    fn at(cfg: &RateLimitSection, now: Instant) -> RateLimit {
        let make = |rpm: u64, tpm: u64| Limits {
            requests: (rpm > 0).then(|| Bucket::new(rpm, now)),
            tokens: (tpm > 0).then(|| Bucket::new(tpm, now)),
        };
        let tenants = cfg
            .tenants
            .iter()
            .map(|(name, t)| {
                let l = make(
                    t.requests_per_minute.unwrap_or(cfg.requests_per_minute),
                    t.prompt_tokens_per_minute
                        .unwrap_or(cfg.prompt_tokens_per_minute),
                );
                (name.clone(), Mutex::new(l))
            })
            .collect();
        RateLimit {
            tenants,
            unknown: Mutex::new(make(cfg.requests_per_minute, cfg.prompt_tokens_per_minute)),
        }
    }

    /// Take one request and `tokens` prompt tokens from `tenant`'s buckets, or say
    /// how many seconds to wait.
    fn take(&self, tenant: Option<&str>, tokens: u64, now: Instant) -> Result<(), u64> {
        let limits = tenant
            .and_then(|t| self.tenants.get(t))
            .unwrap_or(&self.unknown);
        let mut l = limits.lock().unwrap_or_else(|p| p.into_inner());
        let Limits {
            requests,
            tokens: tb,
        } = &mut *l;
        let mut wait: f64 = 0.0;
        if let Some(b) = requests.as_mut() {
            b.refill(now);
            wait = wait.max(b.wait_for(1.0));
        }
        if let Some(b) = tb.as_mut() {
            b.refill(now);
            wait = wait.max(b.wait_for(tokens as f64));
        }
        if wait > 0.0 {
            return Err(wait.ceil().max(1.0) as u64);
        }
        if let Some(b) = requests.as_mut() {
            b.level -= 1.0;
        }
        if let Some(b) = tb.as_mut() {
            b.level -= (tokens as f64).min(b.per_minute);
        }
        Ok(())
    }
}

impl RequestFilter for RateLimit {
    fn name(&self) -> &str {
        "rate_limit"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    fn on_request(&self, ctx: &mut RequestCtx, req: &mut Incoming<'_>, _: &dyn World) -> Flow {
        let tokens = req.body.to_prompt_estimate();
        match self.take(ctx.tenant.as_deref(), tokens, Instant::now()) {
            Ok(()) => Flow::Next,
            Err(secs) => Flow::Reply(Reply {
                error: ApiError::new(
                    429,
                    "rate_limit_error",
                    "rate_limit_exceeded",
                    format!(
                        "rate limit reached for tenant {}; try again in {secs} s",
                        ctx.tenant.as_deref().unwrap_or("unknown")
                    ),
                ),
                retry_after: Some(secs),
            }),
        }
    }
}

/// The prompt's size in tokens, estimated at 4 bytes per token (as the proxy does).
trait PromptEstimate {
    fn to_prompt_estimate(&self) -> u64;
}

impl PromptEstimate for cacheroute_decisions::openai::CompletionBody {
    fn to_prompt_estimate(&self) -> u64 {
        use cacheroute_decisions::openai::{CompletionBody, Prompt};
        let bytes = match self {
            CompletionBody::Chat(c) => c.messages.iter().map(|m| m.text().len()).sum(),
            CompletionBody::Completions(c) => match &c.prompt {
                Prompt::Text(t) => t.len(),
                _ => 0,
            },
        };
        (bytes / 4) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TenantLimits;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn cfg() -> RateLimitSection {
        RateLimitSection {
            requests_per_minute: 2,
            prompt_tokens_per_minute: 0,
            tenants: BTreeMap::from([(
                "big".to_string(),
                TenantLimits {
                    requests_per_minute: Some(0),
                    prompt_tokens_per_minute: Some(100),
                },
            )]),
        }
    }

    #[test]
    fn requests_per_minute_refill_over_time() {
        let t0 = Instant::now();
        let rl = RateLimit::at(&cfg(), t0);
        assert_eq!(rl.take(None, 0, t0), Ok(()));
        assert_eq!(rl.take(None, 0, t0), Ok(()));
        // Two a minute: the next one is 30 s away.
        assert_eq!(rl.take(None, 0, t0), Err(30));
        assert_eq!(rl.take(None, 0, t0 + Duration::from_secs(30)), Ok(()));
    }

    #[test]
    fn prompt_tokens_per_minute_per_tenant() {
        let t0 = Instant::now();
        let rl = RateLimit::at(&cfg(), t0);
        // "big" has no request limit but 100 tokens a minute.
        assert_eq!(rl.take(Some("big"), 80, t0), Ok(()));
        assert_eq!(rl.take(Some("big"), 40, t0), Err(12));
        // An unconfigured tenant shares the "unknown" bucket.
        assert_eq!(rl.take(Some("nobody"), 1000, t0), Ok(()));
    }
}
