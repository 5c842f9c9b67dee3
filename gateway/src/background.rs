//! Background work of the gateway: active health checks, config file
//! watching and model discovery, and reload on SIGHUP.

use crate::reload::Reloader;
use crate::state::GatewayState;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::Arc;
use std::time::Duration;

pub struct Background {
    pub state: Arc<GatewayState>,
    pub reloader: Arc<Reloader>,
}

#[async_trait]
impl BackgroundService for Background {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        tokio::select! {
            _ = self.health_loop() => {}
            _ = self.reloader.watch() => {}
            _ = sighup_loop(&self.reloader) => {}
            _ = crate::sync::sync_loop(self.state.clone()) => {}
            _ = self.gauges_loop() => {}
            _ = shutdown.changed() => {}
        }
    }
}

impl Background {
    /// Membership and KDN gauges, refreshed once a second.
    async fn gauges_loop(&self) {
        use crate::members::MemberKind;
        loop {
            let m = &self.state.metrics;
            m.members
                .with_label_values(&["kdn"])
                .set(self.state.members.live(MemberKind::Kdn).len() as i64);
            m.members
                .with_label_values(&["agent"])
                .set(self.state.members.live(MemberKind::Agent).len() as i64);
            m.kdn_up.reset();
            for k in self.state.knowledge.kdns.load().iter() {
                m.kdn_up.with_label_values(&[&k.id]).set(i64::from(k.up));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn health_loop(&self) {
        loop {
            self.state.builder.health.run_health_check(true).await;
            self.state.publish_health();
            let interval = self
                .state
                .fleet
                .load()
                .config
                .upstream
                .health_check_interval_ms;
            tokio::time::sleep(Duration::from_millis(interval)).await;
        }
    }
}

async fn sighup_loop(reloader: &Reloader) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload with the file or POST /admin/reload");
        return std::future::pending().await;
    };
    while hup.recv().await.is_some() {
        let _ = reloader.reload("SIGHUP").await;
    }
}
