//! Bootstrapping the gateway: first load, then the Pingora server with its
//! three services (service plane, control plane, background work).

use crate::background::Background;
use crate::control::ControlPlane;
use crate::fleet::FleetBuilder;
use crate::metrics::Metrics;
use crate::pipeline::RequestFilter;
use crate::reload::{discover_models, ConfigSource, Overrides, Reloader};
use crate::service::ServicePlane;
use crate::state::GatewayState;
use anyhow::{Context, Result};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use std::sync::Arc;

/// Load the configuration and serve until the process is stopped.
/// Blocks the calling thread (Pingora owns its runtimes).
/// `filters`: request filters added through the library's builder.
pub fn run(
    source: ConfigSource,
    overrides: Overrides,
    filters: Vec<Arc<dyn RequestFilter>>,
) -> Result<()> {
    let (config, text) = source.load(&overrides)?;
    let listen = config.gateway.listen;
    let control = config.gateway.control;
    let threads = config.gateway.threads;
    cacheroute_auth::check_unauthenticated_listen(
        "the control plane",
        control,
        &config.gateway.control_token,
        overrides.insecure,
        cacheroute_auth::CONTROL_TOKEN_ENV,
    )?;

    // The first load runs on a short-lived runtime: Pingora starts its own.
    let rt = tokio::runtime::Runtime::new()?;
    let metrics = Arc::new(Metrics::new());
    let (state, discovered) = rt.block_on(async {
        let mut builder = FleetBuilder::new(&config.upstream);
        builder.custom_filters = filters;
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
        // SIGTERM: the listeners stop accepting at once, then requests in flight
        // get up to DRAIN_S to finish (Pingora keeps serving them through its grace
        // period; `drain_then_exit` ends it early once none is left). Runtimes are
        // then shut down without waiting (tasks still there are cut).
        grace_period_seconds: Some(DRAIN_S),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    drain_then_exit(server.watch_execution_phase(), state.clone())?;

    let mut service_plane = Service::new(
        "cacheroute service plane".to_string(),
        ServicePlane {
            state: state.clone(),
        },
    );
    service_plane.add_tcp(&listen.to_string());

    let mut control_plane = Service::new(
        "cacheroute control plane".to_string(),
        crate::ui::ControlApp::new(ControlPlane {
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

/// Longest a SIGTERM waits for requests in flight, seconds.
const DRAIN_S: u64 = 30;

/// On a graceful shutdown (SIGTERM), exit as soon as no service-plane request is
/// in flight rather than sleeping Pingora's whole grace period. SIGINT never
/// enters the grace period: it exits at once.
fn drain_then_exit(
    mut phases: tokio::sync::broadcast::Receiver<pingora::server::ExecutionPhase>,
    state: Arc<GatewayState>,
) -> Result<()> {
    use pingora::server::ExecutionPhase;
    use std::sync::atomic::Ordering;
    std::thread::Builder::new()
        .name("cacheroute-drain".into())
        .spawn(move || loop {
            match phases.blocking_recv() {
                Ok(ExecutionPhase::ShutdownGracePeriod) => {
                    // Polled: the count has no waker, and a 10 ms step is nothing
                    // next to a stream's life.
                    while state.active_requests.load(Ordering::Acquire) > 0 {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    tracing::info!("SIGTERM: no request in flight; exiting");
                    std::process::exit(0);
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        })
        .context("starting the drain watcher")?;
    Ok(())
}

/// Fail with a clear message before Pingora would panic on a taken port.
fn check_bindable(addr: std::net::SocketAddr) -> Result<()> {
    std::net::TcpListener::bind(addr)
        .map(drop)
        .with_context(|| format!("cannot listen on {addr}"))
}
