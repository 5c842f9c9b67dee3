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

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::KdnConfig;
use crate::membership::{MemberInfo, Membership};
use crate::registry::Detail;
use crate::service::{InjectRequest, Kdn, KdnError, RegisterRequest};

impl IntoResponse for KdnError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(s) = self.retry_after_s {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

type Q = Query<HashMap<String, String>>;

fn flag(q: &HashMap<String, String>, name: &str, default: bool) -> bool {
    match q.get(name).map(|s| s.to_ascii_lowercase()) {
        Some(v) if v.is_empty() || v == "1" || v == "true" || v == "yes" => true,
        Some(v) if v == "0" || v == "false" || v == "no" => false,
        _ => default,
    }
}

fn number(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, KdnError> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            KdnError::bad_request(
                "invalid_parameter",
                format!("{name}={v:?}: expected a non-negative integer"),
            )
        }),
    }
}

fn body_error(e: BytesRejection) -> KdnError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        KdnError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "body_too_large",
            format!("request body too large: {}", e.body_text()),
        )
    } else {
        KdnError::bad_request("invalid_body", e.body_text())
    }
}

fn parse_json(body: &[u8]) -> Result<Value, KdnError> {
    serde_json::from_slice(body)
        .map_err(|e| KdnError::bad_request("invalid_json", format!("invalid JSON: {e}")))
}

async fn register(
    State(kdn): State<Arc<Kdn>>,
    q: Q,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, KdnError> {
    let body = body.map_err(body_error)?;
    let v = parse_json(&body)?;
    if !v.is_object() {
        return Err(KdnError::bad_request(
            "invalid_registration",
            "the body must be a JSON object with at least \"text\" (use /v1/knowledge/bulk \
             for many blocks)",
        ));
    }
    let req: RegisterRequest = serde_json::from_value(v)
        .map_err(|e| KdnError::bad_request("invalid_registration", e.to_string()))?;
    let wait = req.wait || flag(&q, "wait", false);
    kdn.admit_registrations(1)?;
    let (records, created) = kdn.register(vec![req], wait).await?;
    let detail = Detail {
        content: true,
        ..Detail::default()
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(records[0].to_json(detail))).into_response())
}

async fn register_bulk(
    State(kdn): State<Arc<Kdn>>,
    q: Q,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, KdnError> {
    let body = body.map_err(body_error)?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| KdnError::bad_request("invalid_body", "the body is not UTF-8"))?;
    kdn.admit_registrations(text.lines().filter(|l| !l.trim().is_empty()).count())?;
    let records = kdn.register_jsonl(text, flag(&q, "wait", false)).await?;
    let detail = Detail {
        omit_text: true,
        ..Detail::default()
    };
    let data: Vec<Value> = records.iter().map(|r| r.to_json(detail)).collect();
    Ok((
        StatusCode::OK,
        Json(json!({"object": "list", "data": data})),
    )
        .into_response())
}

async fn list(State(kdn): State<Arc<Kdn>>, q: Q) -> Json<Value> {
    let detail = Detail {
        content: flag(&q, "content", false),
        keys: flag(&q, "keys", false),
        omit_text: !flag(&q, "text", true),
    };
    let model = q.get("model");
    let data: Vec<Value> = kdn
        .registry
        .list()
        .iter()
        .filter(|r| model.is_none_or(|m| r.models.contains_key(m)))
        .map(|r| r.to_json(detail))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// Whether an `If-None-Match` value names `etag` (a list, weak tags and `*` included).
fn etag_matches(if_none_match: &HeaderValue, etag: &str) -> bool {
    let Ok(v) = if_none_match.to_str() else {
        return false;
    };
    v.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

/// `GET /v1/knowledge/snapshot`: what a gateway syncs from. The version is checked
/// before anything is copied, so polling an unchanged registry costs next to nothing.
/// With `?text=false` (what gateways ask for) each block comes without its text and
/// contents but with its content `digest`: a gateway fetches the text of the blocks
/// whose digest it has not seen from `/v1/knowledge/contents`, so an unchanged block's
/// text is never sent twice.
async fn snapshot(State(kdn): State<Arc<Kdn>>, headers: HeaderMap, q: Q) -> Response {
    let etag = format!("\"{}\"", kdn.registry.version());
    if let Some(inm) = headers.get(header::IF_NONE_MATCH) {
        if etag_matches(inm, &etag) {
            return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
        }
    }
    // records and version read together: the tag always describes this body
    let (version, records) = kdn.registry.snapshot();
    let with_text = flag(&q, "text", true);
    let detail = Detail {
        content: with_text,
        keys: false,
        omit_text: !with_text,
    };
    let blocks: Vec<Value> = records
        .iter()
        .map(|r| with_digest(&kdn, r, detail))
        .collect();
    (
        StatusCode::OK,
        [(header::ETAG, format!("\"{version}\""))],
        Json(json!({
            "object": "knowledge.snapshot",
            "kdn_id": kdn.id,
            "version": version,
            "text": with_text,
            "blocks": blocks,
        })),
    )
        .into_response()
}

/// A record's view with its content digest.
fn with_digest(kdn: &Kdn, r: &crate::registry::KnowledgeRecord, detail: Detail) -> Value {
    let mut v = r.to_json(detail);
    v["digest"] = json!(kdn
        .registry
        .digest(&r.id)
        .unwrap_or_else(|| r.content_digest()));
    v
}

/// Most ids one `GET /v1/knowledge/contents` names.
pub const MAX_CONTENT_IDS: usize = 256;

/// `GET /v1/knowledge/contents?ids=a,b,…`: the named blocks whole (text, each model's
/// content, digest), for gateways filling in a text-less snapshot. Unknown ids are left
/// out (deleted since the snapshot).
async fn contents(State(kdn): State<Arc<Kdn>>, q: Q) -> Result<Json<Value>, KdnError> {
    let ids: Vec<&str> = q
        .get("ids")
        .map(|s| s.split(',').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    if ids.is_empty() {
        return Err(KdnError::bad_request(
            "missing_ids",
            "give the block ids as ?ids=a,b,…",
        ));
    }
    if ids.len() > MAX_CONTENT_IDS {
        return Err(KdnError::bad_request(
            "too_many_ids",
            format!("{} ids; at most {MAX_CONTENT_IDS} per request", ids.len()),
        ));
    }
    let detail = Detail {
        content: true,
        keys: false,
        omit_text: false,
    };
    let data: Vec<Value> = ids
        .iter()
        .filter_map(|id| kdn.registry.get(id))
        .map(|r| with_digest(&kdn, &r, detail))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

async fn search(State(kdn): State<Arc<Kdn>>, q: Q) -> Result<Json<Value>, KdnError> {
    let query = q
        .get("q")
        .filter(|s| !s.trim().is_empty())
        .ok_or_else(|| KdnError::bad_request("missing_query", "give the search text as ?q=…"))?;
    let k = number(&q, "k")?.unwrap_or(5).clamp(1, 100) as usize;
    let detail = Detail {
        content: flag(&q, "content", false),
        keys: false,
        omit_text: !flag(&q, "text", false),
    };
    let data: Vec<Value> = kdn
        .registry
        .search(query, k)
        .into_iter()
        .map(|(r, score)| {
            let mut v = r.to_json(detail);
            v["score"] = json!(score);
            v["snippet"] = json!(r.text.chars().take(200).collect::<String>());
            v
        })
        .collect();
    Ok(Json(
        json!({"object": "list", "query": query, "data": data}),
    ))
}

async fn show(
    State(kdn): State<Arc<Kdn>>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Json<Value>, KdnError> {
    let r = kdn.registry.get(&id).ok_or_else(|| {
        KdnError::not_found("knowledge_not_found", format!("knowledge {id:?} not found"))
    })?;
    Ok(Json(r.to_json(Detail {
        content: flag(&q, "content", true),
        keys: flag(&q, "keys", false),
        omit_text: !flag(&q, "text", true),
    })))
}

async fn delete(
    State(kdn): State<Arc<Kdn>>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Json<Value>, KdnError> {
    Ok(Json(kdn.delete(&id, flag(&q, "keep_kv", false)).await?))
}

async fn warm(
    State(kdn): State<Arc<Kdn>>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Json<Value>, KdnError> {
    let r = kdn.rewarm(&id, flag(&q, "wait", false)).await?;
    Ok(Json(r.to_json(Detail {
        omit_text: true,
        ..Detail::default()
    })))
}

async fn inject(
    State(kdn): State<Arc<Kdn>>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, KdnError> {
    let body = body.map_err(body_error)?;
    let req: InjectRequest = serde_json::from_value(parse_json(&body)?)
        .map_err(|e| KdnError::bad_request("invalid_inject_request", e.to_string()))?;
    let job = kdn.inject(&req)?;
    if req.wait {
        let limit = Duration::from_millis(req.timeout_ms.unwrap_or(600_000));
        job.wait(limit).await;
    }
    let status = if job.status().is_finished() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(job.view())).into_response())
}

async fn job(
    State(kdn): State<Arc<Kdn>>,
    Path(id): Path<String>,
    q: Q,
) -> Result<Json<Value>, KdnError> {
    let job = kdn.injector.job(&id).ok_or_else(|| {
        KdnError::not_found(
            "job_not_found",
            format!("injection job {id:?} not found (unknown, or dropped from the history)"),
        )
    })?;
    if let Some(ms) = number(&q, "wait_ms")? {
        job.wait(Duration::from_millis(ms.min(600_000))).await;
    }
    Ok(Json(job.view()))
}

async fn load(State(kdn): State<Arc<Kdn>>) -> Json<Value> {
    Json(kdn.load())
}

async fn models(State(kdn): State<Arc<Kdn>>) -> Json<Value> {
    Json(kdn.models_json())
}

async fn health(State(kdn): State<Arc<Kdn>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "knowledge_blocks": kdn.registry.len(),
        "registry": kdn.registry.describe(),
    }))
}

async fn metrics(State(kdn): State<Arc<Kdn>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        kdn.render_metrics(),
    )
        .into_response()
}

async fn not_found() -> KdnError {
    KdnError::not_found(
        "no_route",
        "no such KDN endpoint; see GET /v1/knowledge, /v1/load",
    )
}

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
        TOKEN_ENV,
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
    /// Listen address (overrides [kdn] listen; default 127.0.0.1:9101).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Registry URL, redis://… or memory://NAME (overrides [kdn] registry).
    #[arg(long)]
    pub registry: Option<String>,
    /// The KDN's KV store URL (overrides [kdn] store).
    #[arg(long)]
    pub store: Option<String>,
    /// This KDN's id (overrides [kdn] id; default kdn@<listen>).
    #[arg(long)]
    pub id: Option<String>,
    /// A gateway control-plane base URL to register with, e.g. http://127.0.0.1:9090
    /// (repeatable; added to [kdn] gateways).
    #[arg(long = "gateway", value_name = "URL")]
    pub gateways: Vec<String>,
    /// The URL gateways reach this KDN at (overrides [kdn] advertise_url; default
    /// http://<listen>).
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// Serve writes without a token on a non-loopback address.
    #[arg(long)]
    pub insecure: bool,
}

/// The environment variable holding the KDN's write token.
pub const TOKEN_ENV: &str = "CACHEROUTE_KDN_TOKEN";

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
        cfg.kdn.token = crate::auth::token_or_env(&cfg.kdn.token, TOKEN_ENV);
        cfg.kdn.gateway_token =
            crate::auth::token_or_env(&cfg.kdn.gateway_token, "CACHEROUTE_CONTROL_TOKEN");
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

    #[test]
    fn if_none_match_forms() {
        let tag = "\"abcd1234-7\"";
        for (v, m) in [
            ("\"abcd1234-7\"", true),
            ("W/\"abcd1234-7\"", true),
            ("\"x-1\", \"abcd1234-7\"", true),
            ("*", true),
            ("\"abcd1234-6\"", false),
            ("abcd1234-7", false),
        ] {
            assert_eq!(etag_matches(&HeaderValue::from_static(v), tag), m, "{v}");
        }
    }
}
