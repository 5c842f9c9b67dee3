//! The KDN's HTTP API (axum) and its entry points: [`spawn_kdn`], [`run_kdn`].
//!
//! | method and path | what |
//! |---|---|
//! | `POST /v1/knowledge[?wait=true]` | register one block (`{"text", "id"?, "title"?, "tags"?, "models"?, "meta"?, "wait"?}`) |
//! | `POST /v1/knowledge/bulk[?wait=true]` | register JSONL, one registration per line, all or none |
//! | `GET /v1/knowledge[?content=true&text=false&keys=true]` | `{"object":"list","data":[record…]}` |
//! | `GET /v1/knowledge/snapshot[?text=false]` | every record with its content (or, `text=false`, its metadata and content digest), versioned: `ETag`, `If-None-Match` → 304 |
//! | `GET /v1/knowledge/contents?ids=a,b` | the named records whole, with digests (≤ 256 ids) |
//! | `GET /v1/knowledge/search?q=…[&k=5]` | BM25 over title, tags, text |
//! | `GET /v1/knowledge/{id}[?keys=true]` | one record, with each model's padded `content` |
//! | `DELETE /v1/knowledge/{id}[?keep_kv=true]` | delete (and drop its KDN-store chunks) |
//! | `POST /v1/knowledge/{id}/warm[?wait=true]` | warm up again (retries failed models) |
//! | `POST /v1/inject` | `{"knowledge_ids", "model", "target", "wait"?, "timeout_ms"?}` → job |
//! | `GET /v1/inject/{job}[?wait_ms=N]` | a job (long-poll with `wait_ms`) |
//! | `GET /v1/load` | `kdn_id`, pending/active jobs and transfers, queue wait, recent bytes/s |
//! | `GET /v1/models` | configured models |
//! | `GET /health`, `GET /metrics` | liveness, Prometheus text |

//!
//! This module holds the router, the write-token check and the server's lifecycle
//! ([`KdnHandle`], [`KdnArgs`]); the endpoint handlers are in `handlers`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::KdnConfig;
use crate::membership::{MemberInfo, Membership};
use crate::service::{Kdn, KdnError};

mod handlers;

pub use handlers::MAX_CONTENT_IDS;
use handlers::{
    contents, delete, health, inject, job, list, load, metrics, models, not_found, register,
    register_bulk, search, show, snapshot, warm,
};

/// Writes (anything but GET and HEAD) need `[kdn] token` as a bearer token when one is
/// set; reads of the registry, jobs and load stay open.
async fn require_token(
    State(kdn): State<Arc<Kdn>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let token = &kdn.config.kdn.token;
    let read = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if token.is_empty() || read {
        return next.run(req).await;
    }
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if crate::auth::bearer_matches(auth, token) {
        return next.run(req).await;
    }
    let mut resp = KdnError::unauthorized(
        "this KDN requires a bearer token for writes (Authorization: Bearer …)",
    )
    .into_response();
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// The KDN's router.
pub fn router(kdn: Arc<Kdn>) -> Router {
    let k = &kdn.config.kdn;
    // JSON escapes can make the body up to 6× the text (\uXXXX)
    let register_limit = k.max_text_bytes.saturating_mul(6).saturating_add(64 << 10);
    let bulk_limit = k.max_bulk_bytes;
    Router::new()
        .route(
            "/v1/knowledge",
            post(register)
                .layer(DefaultBodyLimit::max(register_limit))
                .get(list),
        )
        .route(
            "/v1/knowledge/bulk",
            post(register_bulk).layer(DefaultBodyLimit::max(bulk_limit)),
        )
        .route("/v1/knowledge/search", get(search))
        .route("/v1/knowledge/snapshot", get(snapshot))
        .route("/v1/knowledge/contents", get(contents))
        .route("/v1/knowledge/{id}", get(show).delete(delete))
        .route("/v1/knowledge/{id}/warm", post(warm))
        .route(
            "/v1/inject",
            post(inject).layer(DefaultBodyLimit::max(4 << 20)),
        )
        .route("/v1/inject/{job}", get(job))
        .route("/v1/load", get(load))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            kdn.clone(),
            require_token,
        ))
        .with_state(kdn)
}

/// A KDN serving in the background (see [`spawn_kdn`]). Dropping it stops the server.
pub struct KdnHandle {
    /// The address it listens on (the real port when the config asked for port 0).
    pub addr: SocketAddr,
    pub kdn: Arc<Kdn>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    membership: Option<Membership>,
}

impl KdnHandle {
    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Deregister from the gateways (best effort, about 1 s at most), then stop serving
    /// (waits up to 2 s for open requests). Background warm-ups and transfers already
    /// started run to their end.
    pub async fn stop(mut self) {
        // first, so that gateways stop sending work to a KDN about to go away
        if let Some(m) = self.membership.take() {
            m.stop().await;
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }

    /// Serve until the server task ends (it does not on its own).
    pub async fn wait(mut self) -> anyhow::Result<()> {
        if let Some(task) = self.task.take() {
            task.await.context("KDN server task")?;
        }
        Ok(())
    }
}

impl Drop for KdnHandle {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Start a KDN from `config` on the current tokio runtime and serve in the background;
/// returns once it listens on `config.kdn.listen` (port 0: any free port).
pub async fn spawn_kdn(mut config: KdnConfig) -> anyhow::Result<KdnHandle> {
    let listen = config.kdn.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    crate::auth::check_unauthenticated_listen(
        "the KDN API",
        addr,
        &config.kdn.token,
        config.kdn.insecure,
        crate::auth::KDN_TOKEN_ENV,
    )?;
    // the real port, so that the default id and advertised URL are usable with port 0
    config.kdn.listen = addr;
    let kdn = Kdn::start(config).await?;
    let app = router(kdn.clone());
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = rx.await;
        });
        if let Err(e) = serve.await {
            tracing::error!("KDN server on {addr}: {e}");
        }
    });
    let k = &kdn.config.kdn;
    let membership = (!k.gateways.is_empty()).then(|| {
        Membership::start(MemberInfo {
            kind: cacheroute_wire::members::MemberKind::Kdn,
            instance: None,
            on_attempt: Some({
                let metrics = kdn.metrics.clone();
                std::sync::Arc::new(move |ok: bool| {
                    let result = if ok { "ok" } else { "error" };
                    metrics.heartbeats.with_label_values(&[result]).inc();
                })
            }),
            id: kdn.id.clone(),
            url: k.advertise_url_or_default(),
            gateways: k.gateways.clone(),
            token: k.gateway_token.clone(),
            heartbeat: Duration::from_secs_f64(k.heartbeat_s),
        })
    });
    Ok(KdnHandle {
        addr,
        kdn,
        shutdown: Some(tx),
        task: Some(task),
        membership,
    })
}

/// `cacheroute kdn` arguments.
#[derive(Debug, Clone, Default, Args)]
pub struct KdnArgs {
    /// Configuration file (TOML; see conf/kdn.example.toml).
    #[arg(long, env = "CACHEROUTE_KDN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Listen address (overrides `[kdn] listen`; default 127.0.0.1:9101).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Registry URL, redis://… or memory://NAME (overrides `[kdn] registry`).
    #[arg(long)]
    pub registry: Option<String>,
    /// The KDN's KV store URL (overrides `[kdn] store`).
    #[arg(long)]
    pub store: Option<String>,
    /// This KDN's id (overrides `[kdn] id`; default `kdn@<listen>`).
    #[arg(long)]
    pub id: Option<String>,
    /// A gateway control-plane base URL to register with, e.g. http://127.0.0.1:9090
    /// (repeatable; added to `[kdn] gateways`).
    #[arg(long = "gateway", value_name = "URL")]
    pub gateways: Vec<String>,
    /// The URL gateways reach this KDN at (overrides `[kdn] advertise_url`; default
    /// `http://<listen>`).
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// Serve writes without a token on a non-loopback address.
    #[arg(long)]
    pub insecure: bool,
}

impl KdnArgs {
    /// The configuration these arguments describe.
    pub fn load_config(&self) -> anyhow::Result<KdnConfig> {
        let mut cfg = match &self.config {
            Some(p) => KdnConfig::load(p)?,
            None => KdnConfig::default(),
        };
        if let Some(l) = self.listen {
            cfg.kdn.listen = l;
        }
        if let Some(r) = &self.registry {
            cfg.kdn.registry = r.clone();
        }
        if let Some(s) = &self.store {
            cfg.kdn.store = s.clone();
        }
        if let Some(id) = &self.id {
            cfg.kdn.id = Some(id.clone());
        }
        cfg.kdn.gateways.extend(self.gateways.iter().cloned());
        if let Some(u) = &self.advertise_url {
            cfg.kdn.advertise_url = Some(u.clone());
        }
        cfg.kdn.token = crate::auth::token_or_env(&cfg.kdn.token, crate::auth::KDN_TOKEN_ENV);
        cfg.kdn.gateway_token =
            crate::auth::token_or_env(&cfg.kdn.gateway_token, crate::auth::CONTROL_TOKEN_ENV);
        cfg.kdn.insecure |= self.insecure;
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `cacheroute kdn`: serve until Ctrl-C.
pub async fn run_kdn(args: KdnArgs) -> anyhow::Result<()> {
    let cfg = args.load_config()?;
    if cfg.models.is_empty() {
        tracing::warn!("no [[models]] configured: registrations will be refused");
    }
    let handle = spawn_kdn(cfg).await?;
    tracing::info!(
        addr = %handle.addr,
        id = %handle.kdn.id,
        gateways = handle.kdn.config.kdn.gateways.len(),
        registry = %handle.kdn.registry.describe(),
        blocks = handle.kdn.registry.len(),
        "cacheroute kdn listening"
    );
    match tokio::signal::ctrl_c().await {
        Ok(()) => {
            tracing::info!("stopping the KDN");
            handle.stop().await;
            Ok(())
        }
        Err(_) => handle.wait().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        kdn: KdnArgs,
    }

    #[test]
    fn membership_flags() {
        let cli = Cli::try_parse_from([
            "kdn",
            "--id",
            "kdn-a",
            "--gateway",
            "http://g1:9090",
            "--gateway",
            "http://g2:9090",
            "--advertise-url",
            "http://10.0.0.5:9101",
        ])
        .unwrap();
        let cfg = cli.kdn.load_config().unwrap();
        assert_eq!(cfg.kdn.id_or_default(), "kdn-a");
        assert_eq!(cfg.kdn.gateways, ["http://g1:9090", "http://g2:9090"]);
        assert_eq!(cfg.kdn.advertise_url_or_default(), "http://10.0.0.5:9101");
        let cli = Cli::try_parse_from(["kdn", "--gateway", "g1:9090"]).unwrap();
        assert!(cli.kdn.load_config().is_err());
    }
}
