//! Registration with gateways' control planes: `POST {gateway}/v1/members` every
//! heartbeat, forever, so that neither start order nor a gateway restart matters.

use crate::engine::error_chain;
use crate::metrics::AgentMetrics;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Who this agent is, as told to gateways.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: String,
    pub url: String,
    pub instance: String,
    pub heartbeat: Duration,
    pub token: Option<String>,
}

impl Identity {
    /// The registration body; the TTL outlives two missed heartbeats.
    pub fn body(&self) -> Value {
        json!({
            "kind": "agent",
            "id": self.id,
            "url": self.url,
            "instance": self.instance,
            "ttl_s": 3.0 * self.heartbeat.as_secs_f64(),
        })
    }

    /// Limit for one call: a late answer is useless once the next heartbeat is due.
    fn call_timeout(&self) -> Duration {
        self.heartbeat
            .clamp(Duration::from_millis(500), Duration::from_secs(5))
    }

    fn auth(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }
}

async fn register_once(
    client: &reqwest::Client,
    who: &Identity,
    url: &str,
    body: &Value,
) -> Result<(), String> {
    let resp = who
        .auth(client.post(url))
        .timeout(who.call_timeout())
        .json(body)
        .send()
        .await
        .map_err(|e| error_chain(&e))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let text = resp.text().await.unwrap_or_default();
    let snippet: String = text.chars().take(200).collect();
    Err(format!("HTTP {status}: {snippet}"))
}

/// Heartbeat one gateway until `stop` turns true. Logs: a warning when the
/// gateway starts failing, debug while it keeps failing, info when it accepts us.
pub async fn register_loop(
    client: reqwest::Client,
    gateway: String,
    who: Arc<Identity>,
    metrics: Arc<AgentMetrics>,
    mut stop: watch::Receiver<bool>,
) {
    let url = format!("{gateway}/v1/members");
    let body = who.body();
    let mut tick = tokio::time::interval(who.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ok: Option<bool> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let result = tokio::select! {
            r = register_once(&client, &who, &url, &body) => r,
            _ = stop.changed() => return,
        };
        match result {
            Ok(()) => {
                metrics.registrations.with_label_values(&["ok"]).inc();
                if ok != Some(true) {
                    tracing::info!(%gateway, id = %who.id, "registered with gateway");
                }
                ok = Some(true);
            }
            Err(e) => {
                metrics.registrations.with_label_values(&["error"]).inc();
                if ok != Some(false) {
                    tracing::warn!(%gateway, error = %e, "gateway registration failed; retrying every heartbeat");
                } else {
                    tracing::debug!(%gateway, error = %e, "gateway registration failed");
                }
                ok = Some(false);
            }
        }
    }
}

/// `id` as one URL path segment: the usual `agent@host:port` stays as it is,
/// anything that would end or split the segment is percent-encoded.
pub fn path_segment(id: &str) -> String {
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

/// Best-effort `DELETE {gateway}/v1/members/agent/{id}` on every gateway at once.
pub async fn deregister_all(client: &reqwest::Client, gateways: &[String], who: &Identity) {
    let calls = gateways.iter().map(|g| async move {
        let url = format!("{g}/v1/members/agent/{}", path_segment(&who.id));
        let r = who
            .auth(client.delete(&url))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {
                tracing::info!(gateway = %g, id = %who.id, "left gateway")
            }
            Ok(resp) => {
                tracing::debug!(gateway = %g, status = %resp.status(), "deregistration refused")
            }
            Err(e) => {
                tracing::debug!(gateway = %g, error = %error_chain(&e), "deregistration failed")
            }
        }
    });
    futures::future::join_all(calls).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_and_path_segment() {
        let who = Identity {
            id: "agent@127.0.0.1:9001".into(),
            url: "http://127.0.0.1:9001".into(),
            instance: "http://127.0.0.1:8000".into(),
            heartbeat: Duration::from_millis(1500),
            token: None,
        };
        let b = who.body();
        assert_eq!(b["kind"], "agent");
        assert_eq!(b["instance"], "http://127.0.0.1:8000");
        assert_eq!(b["ttl_s"], 4.5);
        assert_eq!(path_segment(&who.id), "agent@127.0.0.1:9001");
        assert_eq!(path_segment("a b/c?d%"), "a%20b%2Fc%3Fd%25");
    }
}
