//! What the service plane, the control plane and the background tasks share.

use crate::fleet::{Fleet, FleetBuilder};
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use pingora::connectors::TransportConnector;
use std::sync::Arc;

pub struct GatewayState {
    /// The routing table in force; swapped whole on reload.
    pub fleet: ArcSwap<Fleet>,
    pub builder: FleetBuilder,
    pub metrics: Arc<Metrics>,
    /// Pooled keep-alive connections to the instances.
    pub transport: TransportConnector,
}

impl GatewayState {
    pub fn new(fleet: Fleet, builder: FleetBuilder, metrics: Arc<Metrics>) -> Arc<GatewayState> {
        metrics.config_version.set(fleet.version as i64);
        Arc::new(GatewayState {
            fleet: ArcSwap::from_pointee(fleet),
            builder,
            metrics,
            transport: TransportConnector::new(None),
        })
    }

    /// Publish the instances' health as gauges (after each health pass and
    /// after each swap).
    pub fn publish_health(&self) {
        let fleet = self.fleet.load();
        self.metrics.healthy.reset();
        for pool in &fleet.pools {
            for inst in &pool.instances {
                self.metrics
                    .healthy
                    .with_label_values(&[&pool.name, &inst.url.base])
                    .set(i64::from(pool.is_healthy(inst)));
            }
        }
    }
}
