//! Instance agent: the sidecar beside each vLLM.
//!
//! * scrapes the engine's `/metrics` ([`engine`], parsed by [`prom`]) into a load report;
//! * with `--kdn` and `--kv-store`, tracks which knowledge blocks are fully resident in
//!   the instance's LMCache store ([`residency`]);
//! * serves both ([`server`]: `/v1/load`, `/v1/resident`, `/metrics`, `/health`);
//! * registers with every gateway each heartbeat (the KDN's membership module, as
//!   `kind = "agent"`) and leaves on shutdown.
//!
//! Nothing here depends on the engine, the KDN, the store or a gateway being up:
//! every failure is retried on the next tick.

pub mod engine;
pub mod metrics;
pub mod prom;
pub mod residency;
pub mod server;

use anyhow::Context;
use cacheroute_kdn::membership::{MemberInfo, Membership};
use clap::Args;
use engine::EngineState;
use metrics::AgentMetrics;
use residency::{ResidencyConfig, ResidentEntry};
use server::Shared;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// `cacheroute agent` arguments.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Base URL of the vLLM engine beside this agent, e.g. http://127.0.0.1:8000.
    #[arg(long, value_name = "URL")]
    pub engine: String,
    /// Address to serve the agent API on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    pub listen: SocketAddr,
    /// Engine /metrics scrape interval, milliseconds.
    #[arg(long, default_value_t = 200)]
    pub scrape_ms: u64,
    /// A gateway control-plane base URL to register with (repeatable).
    #[arg(long = "gateway", value_name = "URL")]
    pub gateways: Vec<String>,
    /// Bearer token for the gateways' control planes.
    #[arg(long, env = "CACHEROUTE_GATEWAY_TOKEN", hide_env_values = true)]
    pub gateway_token: Option<String>,
    /// This agent's id (default `agent@<listen>`).
    #[arg(long)]
    pub id: Option<String>,
    /// The URL gateways reach this agent at (default `http://<listen>`).
    #[arg(long, value_name = "URL")]
    pub advertise_url: Option<String>,
    /// Seconds between registrations; gateways forget the agent after three missed ones.
    #[arg(long, default_value_t = 2.0)]
    pub heartbeat_s: f64,
    /// KDN base URL, for the list of knowledge blocks and their LMCache keys.
    #[arg(long, value_name = "URL")]
    pub kdn: Option<String>,
    /// This instance's LMCache store: redis://host:port[/db] or memory://NAME.
    #[arg(long, value_name = "URL")]
    pub kv_store: Option<String>,
    /// Served model name whose blocks count (default: every model the KDN lists).
    #[arg(long)]
    pub model: Option<String>,
    /// Residency check interval, milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub residency_ms: u64,
}

impl AgentArgs {
    /// Arguments with the CLI defaults for the engine at `engine`.
    pub fn new(engine: impl Into<String>) -> AgentArgs {
        AgentArgs {
            engine: engine.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 9001)),
            scrape_ms: 200,
            gateways: Vec::new(),
            gateway_token: None,
            id: None,
            advertise_url: None,
            heartbeat_s: 2.0,
            kdn: None,
            kv_store: None,
            model: None,
            residency_ms: 2000,
        }
    }
}

/// `http(s)://…` without trailing slashes, or an error naming the flag.
fn base_url(flag: &str, url: &str) -> anyhow::Result<String> {
    let u = url.trim().trim_end_matches('/');
    anyhow::ensure!(
        (u.starts_with("http://") || u.starts_with("https://")) && u.len() > "https://".len(),
        "{flag} must be an http:// base URL, got {url:?}"
    );
    Ok(u.to_string())
}

/// An agent serving in the background (see [`start`]). Dropping it stops the
/// background work without deregistering; [`AgentHandle::shutdown`] does both.
pub struct AgentHandle {
    /// The bound address (the real port when `--listen` asked for port 0).
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    id: String,
    advertise: String,
    membership: Option<Membership>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    server: Option<JoinHandle<()>>,
}

impl AgentHandle {
    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The id it registers under.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The URL it advertises to gateways.
    pub fn advertise_url(&self) -> &str {
        &self.advertise
    }

    /// The current `/v1/load` document.
    pub fn load(&self) -> serde_json::Value {
        self.shared.load_json()
    }

    /// Stop scraping and heartbeating, leave every gateway (best effort), stop serving.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in std::mem::take(&mut self.tasks) {
            let _ = t.await;
        }
        // only after the heartbeats stopped, so none re-adds us after the DELETE
        if let Some(m) = self.membership.take() {
            m.stop().await;
        }
        if let Some(server) = self.server.take() {
            let abort = server.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), server)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    /// Serve until the server task ends (it does not on its own).
    async fn wait(mut self) {
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Check the arguments, bind, and start serving, scraping, checking residency and
/// registering in the background on the current tokio runtime.
pub async fn start(args: AgentArgs) -> anyhow::Result<AgentHandle> {
    let engine = base_url("--engine", &args.engine)?;
    let gateways = args
        .gateways
        .iter()
        .map(|g| base_url("--gateway", g))
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(args.scrape_ms > 0, "--scrape-ms must be at least 1");
    anyhow::ensure!(args.residency_ms > 0, "--residency-ms must be at least 1");
    // the gateway accepts a TTL (3 heartbeats) of at most an hour
    anyhow::ensure!(
        args.heartbeat_s.is_finite() && args.heartbeat_s >= 0.01 && args.heartbeat_s <= 1200.0,
        "--heartbeat-s must be in [0.01, 1200], got {}",
        args.heartbeat_s
    );
    let kdn = args
        .kdn
        .as_deref()
        .map(|k| base_url("--kdn", k))
        .transpose()?;
    if let Some(s) = &args.kv_store {
        anyhow::ensure!(
            ["memory://", "redis://", "rediss://", "unix://"]
                .iter()
                .any(|p| s.starts_with(p)),
            "--kv-store must be redis://host:port[/db] or memory://NAME, got {s:?}"
        );
    }
    let residency = match (kdn, &args.kv_store) {
        (Some(kdn), Some(store)) => Some(ResidencyConfig {
            kdn,
            store_url: store.clone(),
            model: args.model.clone(),
            interval: Duration::from_millis(args.residency_ms),
        }),
        (None, None) => None,
        _ => {
            tracing::warn!("residency needs both --kdn and --kv-store; not tracking it");
            None
        }
    };

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let id = args.id.clone().unwrap_or_else(|| format!("agent@{addr}"));
    anyhow::ensure!(!id.trim().is_empty(), "--id must not be empty");
    let advertise = match &args.advertise_url {
        Some(u) => base_url("--advertise-url", u)?,
        None => {
            if addr.ip().is_unspecified() && !gateways.is_empty() {
                tracing::warn!(%addr, "listening on an unspecified address: give --advertise-url so gateways can reach this agent");
            }
            format!("http://{addr}")
        }
    };

    let metrics = Arc::new(AgentMetrics::new()?);
    let shared = Arc::new(Shared {
        id: id.clone(),
        instance: engine.clone(),
        engine: Arc::new(Mutex::new(EngineState::default())),
        resident: Arc::new(Mutex::new(Vec::<ResidentEntry>::new())),
        metrics: metrics.clone(),
    });
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .build()
        .context("building the HTTP client")?;
    let (stop, stop_rx) = watch::channel(false);

    let mut tasks = vec![tokio::spawn(engine::scrape_loop(
        client.clone(),
        engine.clone(),
        Duration::from_millis(args.scrape_ms),
        shared.engine.clone(),
        metrics.clone(),
        stop_rx.clone(),
    ))];
    if let Some(cfg) = residency {
        tasks.push(tokio::spawn(residency::residency_loop(
            client.clone(),
            cfg,
            shared.resident.clone(),
            metrics.clone(),
            stop_rx.clone(),
        )));
    }
    let on_attempt = {
        let metrics = metrics.clone();
        Arc::new(move |ok: bool| {
            let label = if ok { "ok" } else { "error" };
            metrics.registrations.with_label_values(&[label]).inc();
        })
    };
    let membership = (!gateways.is_empty()).then(|| {
        Membership::start(MemberInfo {
            kind: cacheroute_wire::members::MemberKind::Agent,
            id: id.clone(),
            url: advertise.clone(),
            instance: Some(engine.clone()),
            gateways: gateways.clone(),
            // the gateways' control token, by its own name or the gateway's
            token: cacheroute_auth::token_or_env(
                args.gateway_token.as_deref().unwrap_or_default(),
                cacheroute_auth::CONTROL_TOKEN_ENV,
            ),
            heartbeat: Duration::from_secs_f64(args.heartbeat_s),
            on_attempt: Some(on_attempt),
        })
    });

    let app = server::router(shared.clone());
    let mut server_stop = stop_rx;
    let server = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = server_stop.wait_for(|s| *s).await;
        });
        if let Err(e) = serve.await {
            tracing::error!("agent server on {addr}: {e}");
        }
    });

    Ok(AgentHandle {
        addr,
        shared,
        id,
        advertise,
        membership,
        stop,
        tasks,
        server: Some(server),
    })
}

/// `cacheroute agent`: serve until Ctrl-C (or SIGTERM), then leave the gateways.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let handle = start(args).await?;
    tracing::info!(
        addr = %handle.addr,
        id = handle.id(),
        instance = %handle.shared.instance,
        "cacheroute agent listening"
    );
    match shutdown_signal().await {
        Ok(()) => {
            tracing::info!("stopping agent");
            handle.shutdown().await;
        }
        Err(e) => {
            // no signal handling available: serve until killed
            tracing::warn!("cannot listen for shutdown signals: {e}");
            handle.wait().await;
        }
    }
    Ok(())
}

async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        agent: AgentArgs,
    }

    #[test]
    fn cli_defaults_match_new() {
        Cli::command().debug_assert();
        let a = Cli::try_parse_from(["agent", "--engine", "http://e:8000"])
            .unwrap()
            .agent;
        let b = AgentArgs::new("http://e:8000");
        assert_eq!(a.listen, b.listen);
        assert_eq!(a.scrape_ms, b.scrape_ms);
        assert_eq!(a.heartbeat_s, b.heartbeat_s);
        assert_eq!(a.residency_ms, b.residency_ms);
        assert!(a.gateways.is_empty() && a.kdn.is_none() && a.kv_store.is_none());
        // --engine is required
        assert!(Cli::try_parse_from(["agent"]).is_err());
        let a = Cli::try_parse_from([
            "agent",
            "--engine=http://e",
            "--gateway",
            "http://g1/",
            "--gateway=http://g2",
            "--heartbeat-s",
            "0.5",
            "--model",
            "m",
        ])
        .unwrap()
        .agent;
        assert_eq!(a.gateways, ["http://g1/", "http://g2"]);
        assert_eq!(a.heartbeat_s, 0.5);
        assert_eq!(a.model.as_deref(), Some("m"));
    }

    #[test]
    fn base_urls_are_checked_and_trimmed() {
        assert_eq!(base_url("--x", "http://h:1/").unwrap(), "http://h:1");
        assert!(base_url("--x", "h:1").is_err());
        assert!(base_url("--x", "http://").is_err());
    }

    #[tokio::test]
    async fn bad_arguments_fail_before_binding() {
        let mut a = AgentArgs::new("localhost:8000");
        a.listen = "127.0.0.1:0".parse().unwrap();
        assert!(start(a.clone()).await.is_err());
        a.engine = "http://127.0.0.1:1".into();
        a.kv_store = Some("s3://bucket".into());
        assert!(start(a.clone()).await.is_err());
        a.kv_store = None;
        a.heartbeat_s = 0.0;
        assert!(start(a).await.is_err());
    }
}
