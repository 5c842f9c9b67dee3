//! Health checking: a fixed backend set per pool, and an HTTP health check whose
//! settings a reload can change in place.

use crate::config::UpstreamDefaults;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::lb::discovery::ServiceDiscovery;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck};
use pingora::lb::Backend;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

/// A fixed backend set: membership changes come from config reloads, which
/// build a new `Backends` view.
pub(super) struct FixedDiscovery(pub(super) BTreeSet<Backend>);

#[async_trait]
impl ServiceDiscovery for FixedDiscovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        Ok((self.0.clone(), HashMap::new()))
    }
}

/// The active health check: HTTP GET of the configured path, with settings
/// that hot reload can change (the registry accepts one check for its life).
pub struct ReloadableHealthCheck {
    inner: ArcSwap<HttpHealthCheck>,
}

impl ReloadableHealthCheck {
    pub fn new(defaults: &UpstreamDefaults) -> Self {
        ReloadableHealthCheck {
            inner: ArcSwap::from_pointee(Self::build(defaults)),
        }
    }

    pub fn update(&self, defaults: &UpstreamDefaults) {
        self.inner.store(Arc::new(Self::build(defaults)));
    }

    fn build(d: &UpstreamDefaults) -> HttpHealthCheck {
        let mut hc = HttpHealthCheck::new("localhost", false);
        if let Ok(mut req) = RequestHeader::build("GET", d.health_path.as_bytes(), None) {
            let _ = req.append_header("Host", "localhost");
            hc.req = req;
        }
        hc.consecutive_success = d.health_consecutive_success;
        hc.consecutive_failure = d.health_consecutive_failure;
        // A check must finish well within one interval.
        let timeout = Duration::from_millis(d.health_check_interval_ms.clamp(100, 1_000));
        hc.peer_template.options.connection_timeout = Some(timeout);
        hc.peer_template.options.read_timeout = Some(timeout);
        hc.reuse_connection = true;
        hc
    }
}

pub struct SharedCheck(pub Arc<ReloadableHealthCheck>);

#[async_trait]
impl HealthCheck for SharedCheck {
    async fn check(&self, target: &Backend) -> pingora::Result<()> {
        let hc = self.0.inner.load_full();
        hc.check(target).await
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.0.inner.load().health_threshold(success)
    }
}
