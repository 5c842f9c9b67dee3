//! Membership: a KDN or an instance agent announces itself to CacheRoute gateways, so
//! that gateways and members can start in any order.
//!
//! Every `heartbeat` a task per gateway sends `POST {gateway}/v1/members` with
//! `{"kind","id","url","ttl_s"}` (agents add `"instance"`); failures are retried at the
//! same pace forever (the gateway may be down, not yet started, or restarting). On
//! shutdown each task sends a best-effort `DELETE {gateway}/v1/members/{kind}/{id}`.

use std::sync::Arc;
use std::time::Duration;

use cacheroute_wire::members::{MemberKind, Registration};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

/// Called after every registration attempt with whether it succeeded (for metrics).
pub type OnAttempt = Arc<dyn Fn(bool) + Send + Sync>;

/// What a member tells the gateways.
#[derive(Clone)]
pub struct MemberInfo {
    /// What registers.
    pub kind: MemberKind,
    /// The member's id.
    pub id: String,
    /// The URL gateways reach the KDN at.
    pub url: String,
    /// Gateway control-plane base URLs.
    pub gateways: Vec<String>,
    /// Bearer token (empty: no `Authorization` header).
    pub token: String,
    pub heartbeat: Duration,
    /// Agents: the engine's base URL.
    pub instance: Option<String>,
    pub on_attempt: Option<OnAttempt>,
}

impl MemberInfo {
    /// The registration body.
    pub fn body(&self) -> Registration {
        Registration {
            kind: self.kind,
            id: self.id.clone(),
            url: self.url.clone(),
            instance: self.instance.clone(),
            ttl_s: Some(3.0 * self.heartbeat.as_secs_f64()),
        }
    }
}

/// Heartbeat tasks, one per gateway. Dropping it stops them (each still sends its DELETE
/// if the runtime keeps running); [`Membership::stop`] also waits for the DELETEs.
pub struct Membership {
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Limit of one DELETE on shutdown: it must not hold up stopping.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(1);

impl Membership {
    /// Start heartbeating to every gateway of `info` (none: nothing runs).
    pub fn start(info: MemberInfo) -> Membership {
        let (shutdown, _) = watch::channel(false);
        // a slow gateway must not delay the next heartbeat by much
        let timeout = info
            .heartbeat
            .clamp(Duration::from_millis(500), Duration::from_secs(5));
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .unwrap_or_default();
        let tasks = info
            .gateways
            .iter()
            .map(|g| {
                let gateway = g.trim_end_matches('/').to_string();
                tokio::spawn(heartbeat(
                    client.clone(),
                    gateway,
                    info.clone(),
                    shutdown.subscribe(),
                ))
            })
            .collect();
        Membership { shutdown, tasks }
    }

    /// Stop heartbeating and deregister from every gateway (best effort).
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        for task in std::mem::take(&mut self.tasks) {
            let abort = task.abort_handle();
            if tokio::time::timeout(DEREGISTER_TIMEOUT * 2, task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

fn authorized(req: reqwest::RequestBuilder, token: &str) -> reqwest::RequestBuilder {
    if token.is_empty() {
        req
    } else {
        req.bearer_auth(token)
    }
}

/// Why one registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The gateway could not be reached (the URL is left out: it is logged beside).
    #[error("{0}")]
    Send(reqwest::Error),
    /// The gateway answered with an error (its body cut to 200 characters).
    #[error("HTTP {status}: {body}")]
    Refused {
        status: reqwest::StatusCode,
        body: String,
    },
}

/// One registration.
async fn register(
    client: &reqwest::Client,
    gateway: &str,
    info: &MemberInfo,
    body: &Registration,
) -> Result<(), RegisterError> {
    let req = client.post(format!("{gateway}/v1/members")).json(body);
    let resp = authorized(req, &info.token)
        .send()
        .await
        .map_err(|e| RegisterError::Send(e.without_url()))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let text = resp.text().await.unwrap_or_default();
    let body: String = text.chars().take(200).collect();
    Err(RegisterError::Refused {
        status,
        body: body.trim().to_string(),
    })
}

/// Percent-encode an id for one URL path segment (ids like `kdn@10.0.0.5:9101` pass as
/// they are; anything else unusual is escaped).
fn path_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~@:!$&'()*+,;=".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn deregister(client: &reqwest::Client, gateway: &str, info: &MemberInfo) {
    let url = format!(
        "{gateway}/v1/members/{}/{}",
        info.kind.name(),
        path_segment(&info.id)
    );
    let req = authorized(client.delete(url), &info.token).timeout(DEREGISTER_TIMEOUT);
    match req.send().await {
        Ok(r) => tracing::debug!(%gateway, status = %r.status(), "deregistered from gateway"),
        Err(e) => tracing::debug!(%gateway, "deregistering from gateway: {}", e.without_url()),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Standing {
    Never,
    Registered,
    Failing,
}

async fn heartbeat(
    client: reqwest::Client,
    gateway: String,
    info: MemberInfo,
    mut shutdown: watch::Receiver<bool>,
) {
    let body = info.body();
    let mut ticker = tokio::time::interval(info.heartbeat);
    // after a slow attempt, wait a whole period again rather than bursting
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut standing = Standing::Never;
    loop {
        if *shutdown.borrow() {
            break;
        }
        // changed() also ends when the sender is gone (the Membership was dropped)
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => break,
        }
        let outcome = tokio::select! {
            r = register(&client, &gateway, &info, &body) => r,
            _ = shutdown.changed() => break,
        };
        if let Some(f) = &info.on_attempt {
            f(outcome.is_ok());
        }
        match outcome {
            Ok(()) => {
                match standing {
                    Standing::Never => {
                        tracing::info!(%gateway, id = %info.id, url = %info.url, "registered with gateway")
                    }
                    Standing::Failing => {
                        tracing::info!(%gateway, id = %info.id, "registered with gateway again")
                    }
                    Standing::Registered => {}
                }
                standing = Standing::Registered;
            }
            Err(e) => {
                if standing == Standing::Failing {
                    tracing::debug!(%gateway, "registering with gateway: {e}");
                } else {
                    tracing::warn!(%gateway, "registering with gateway failed (retrying every {:?}): {e}", info.heartbeat);
                }
                standing = Standing::Failing;
            }
        }
    }
    deregister(&client, &gateway, &info).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_and_path() {
        let info = MemberInfo {
            kind: MemberKind::Kdn,
            instance: None,
            on_attempt: None,
            id: "kdn@127.0.0.1:9101".into(),
            url: "http://127.0.0.1:9101".into(),
            gateways: vec![],
            token: String::new(),
            heartbeat: Duration::from_millis(2500),
        };
        assert_eq!(
            serde_json::to_value(info.body()).unwrap(),
            serde_json::json!({"kind": "kdn", "id": "kdn@127.0.0.1:9101", "url": "http://127.0.0.1:9101", "ttl_s": 7.5})
        );
        assert_eq!(path_segment("kdn@127.0.0.1:9101"), "kdn@127.0.0.1:9101");
        assert_eq!(path_segment("a b/c%"), "a%20b%2Fc%25");
    }
}
