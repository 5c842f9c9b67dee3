//! `GET /v1/models` and `GET /v1/models/{id}`: the model cards the instances
//! report, merged, so that a client sees vLLM's fields (`created`, `owned_by`,
//! `root`, `parent`, `max_model_len`, `permission`) through the gateway.
//!
//! Cards are fetched live from the healthy instances (clients ask rarely; a
//! cached copy would go stale on reloads), at most MODELS_TIMEOUT each, all at
//! once. Only models the gateway routes are listed; a routed model no instance
//! answered for gets a minimal card, so the list never loses a model.

use crate::conn::respond;
use crate::fleet::Fleet;
use crate::service::{ReqCtx, ServicePlane};
use bytes::Bytes;
use cacheroute_decisions::openai::ApiError;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession as Session;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

/// How long one instance gets to list its models.
const MODELS_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest `/v1/models` answer read from one instance.
const MAX_MODELS_BYTES: usize = 1 << 20;

/// The base URLs of the healthy instances serving each routed model.
fn sources(fleet: &Fleet) -> Vec<String> {
    let mut urls: Vec<String> = Vec::new();
    for pool in &fleet.pools {
        for inst in &pool.instances {
            if pool.is_healthy(inst) && !urls.contains(&inst.url.base) {
                urls.push(inst.url.base.clone());
            }
        }
    }
    urls
}

/// One instance's model cards (none when it did not answer well).
async fn cards_of(http: &reqwest::Client, base: &str, auth: Option<&str>) -> Vec<Value> {
    let mut req = http
        .get(format!("{base}/v1/models"))
        .timeout(MODELS_TIMEOUT);
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let Ok(resp) = req.send().await else {
        return Vec::new();
    };
    if !resp.status().is_success() || resp.content_length().unwrap_or(0) > MAX_MODELS_BYTES as u64 {
        return Vec::new();
    }
    let Ok(body) = resp.bytes().await else {
        return Vec::new();
    };
    if body.len() > MAX_MODELS_BYTES {
        return Vec::new();
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(mut o)) => match o.remove("data") {
            Some(Value::Array(cards)) => cards,
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

/// The card of a model no instance described.
fn minimal_card(id: &str) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": now(),
        "owned_by": "vllm",
        "root": id,
        "parent": null,
        "max_model_len": null,
        "permission": [],
    })
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Merge instances' cards: one per routed model, in the fleet's order, the
/// first instance's card winning.
pub fn merge(routed: &[String], reported: Vec<Vec<Value>>) -> Vec<Value> {
    let mut by_id: HashMap<String, Value> = HashMap::new();
    for card in reported.into_iter().flatten() {
        let Some(id) = card.get("id").and_then(Value::as_str) else {
            continue;
        };
        if routed.iter().any(|m| m == id) && !by_id.contains_key(id) {
            by_id.insert(id.to_string(), card);
        }
    }
    routed
        .iter()
        .map(|m| by_id.remove(m).unwrap_or_else(|| minimal_card(m)))
        .collect()
}

/// `%XX` escapes of a path segment decoded (a model id may hold `/` or `:`).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl ServicePlane {
    async fn merged_cards(&self, session: &Session) -> Vec<Value> {
        let fleet = self.state.fleet.load_full();
        let auth = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let urls = sources(&fleet);
        let http = &self.state.http;
        let reported =
            futures::future::join_all(urls.iter().map(|u| cards_of(http, u, auth))).await;
        merge(&fleet.models, reported)
    }

    /// `GET /v1/models`.
    pub(crate) async fn models(&self, session: &mut Session, ctx: &mut ReqCtx) -> Result<()> {
        let data = self.merged_cards(session).await;
        let body = serde_json::to_vec(&json!({"object": "list", "data": data})).unwrap_or_default();
        respond(
            session,
            ctx,
            200,
            "application/json",
            Bytes::from(body),
            &[],
        )
        .await
    }

    /// `GET /v1/models/{id}`: one merged card, or OpenAI's 404.
    pub(crate) async fn model_card(
        &self,
        session: &mut Session,
        ctx: &mut ReqCtx,
        id: &str,
    ) -> Result<()> {
        ctx.route = "models";
        let id = percent_decode(id);
        if session.req_header().method != http::Method::GET {
            let err = ApiError::method_not_allowed(
                session.req_header().method.as_str(),
                "/v1/models/{id}",
            );
            return self
                .reject_with(session, ctx, err, &[("allow", "GET")])
                .await;
        }
        if !self.state.fleet.load().models.contains(&id) {
            return self
                .reject(session, ctx, ApiError::model_not_found(&id))
                .await;
        }
        let card = self
            .merged_cards(session)
            .await
            .into_iter()
            .find(|c| c.get("id").and_then(Value::as_str) == Some(id.as_str()))
            .unwrap_or_else(|| minimal_card(&id));
        let body = serde_json::to_vec(&card).unwrap_or_default();
        respond(
            session,
            ctx,
            200,
            "application/json",
            Bytes::from(body),
            &[],
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cards_merge_per_routed_model_first_instance_wins() {
        let routed = vec!["a".to_string(), "b".to_string()];
        let one = vec![
            json!({"id": "a", "owned_by": "vllm", "max_model_len": 8192, "root": "/models/a"}),
            json!({"id": "unrouted"}),
        ];
        let two = vec![json!({"id": "a", "owned_by": "other"}), json!({"no_id": 1})];
        let merged = merge(&routed, vec![one, two]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0]["owned_by"], "vllm");
        assert_eq!(merged[0]["max_model_len"], 8192);
        assert_eq!(merged[0]["root"], "/models/a");
        // Nobody described b: a minimal card keeps it listed.
        assert_eq!(merged[1]["id"], "b");
        assert_eq!(merged[1]["object"], "model");
    }

    #[test]
    fn model_ids_are_percent_decoded() {
        assert_eq!(percent_decode("meta-llama%2FLlama-3"), "meta-llama/Llama-3");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("x%zz"), "x%zz");
    }
}
