//! Bootstrapping the gateway: first load, then the Pingora server with its
//! three services (service plane, control plane, background work).

use crate::background::Background;
use crate::control::ControlPlane;
use crate::fleet::FleetBuilder;
use crate::metrics::Metrics;
use crate::reload::{discover_models, ConfigSource, Overrides, Reloader};
use crate::service::ServicePlane;
use crate::state::GatewayState;
use anyhow::{Context, Result};
use pingora::apps::http_app::HttpServer;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::sync::Arc;

/// Load the configuration and serve until the process is stopped.
/// Blocks the calling thread (Pingora owns its runtimes).
pub fn run(source: ConfigSource, overrides: Overrides) -> Result<()> {
    let (config, text) = source.load(&overrides)?;
    let listen = config.gateway.listen;
    let control = config.gateway.control;
    let threads = config.gateway.threads;
    cacheroute_kdn::auth::check_unauthenticated_listen(
        "the control plane",
        control,
        &config.gateway.control_token,
        overrides.insecure,
        crate::reload::CONTROL_TOKEN_ENV,
    )?;

    // The first load runs on a short-lived runtime: Pingora starts its own.
    let rt = tokio::runtime::Runtime::new()?;
    let metrics = Arc::new(Metrics::new());
    let (state, discovered) = rt.block_on(async {
        let builder = FleetBuilder::new(&config.upstream);
        let discovered = discover_models(&config, &Default::default()).await;
        let fleet = builder.build(config, 1, &discovered, &metrics).await?;
        anyhow::Ok((GatewayState::new(fleet, builder, metrics), discovered))
    })?;
    drop(rt);
    let reloader = Arc::new(Reloader::new(
        source,
        overrides,
        state.clone(),
        text,
        discovered,
    ));

    let conf = ServerConf {
        threads,
        // Stop accepting at once on SIGTERM, then give streams in flight
        // time to finish.
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(30),
        upstream_keepalive_pool_size: 1024,
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let mut service_plane = Service::new(
        "cacheroute service plane".to_string(),
        ServicePlane {
            state: state.clone(),
        },
    );
    service_plane.add_tcp(&listen.to_string());

    let mut control_plane = Service::new(
        "cacheroute control plane".to_string(),
        HttpServer::new_app(ControlPlane {
            state: state.clone(),
            reloader: reloader.clone(),
        }),
    );
    control_plane.threads = Some(1);
    control_plane.add_tcp(&control.to_string());

    let background = background_service(
        "cacheroute background",
        Background {
            state: state.clone(),
            reloader,
        },
    );

    server.add_service(service_plane);
    server.add_service(control_plane);
    server.add_service(background);
    let fleet = state.fleet.load();
    tracing::info!(%listen, %control, models = ?fleet.models, pools = fleet.pools.len(), "cacheroute gateway starting");
    check_bindable(listen).context("service plane")?;
    check_bindable(control).context("control plane")?;
    server.run_forever()
}

/// Fail with a clear message before Pingora would panic on a taken port.
fn check_bindable(addr: std::net::SocketAddr) -> Result<()> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .with_context(|| format!("cannot listen on {addr}"))
}
