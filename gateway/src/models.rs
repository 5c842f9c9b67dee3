//! `GET /v1/models` and `GET /v1/models/{id}`: the model cards the instances
//! report, merged, so that a client sees vLLM's fields (`created`, `owned_by`,
//! `root`, `parent`, `max_model_len`, `permission`) through the gateway.
//!
//! Cards are fetched from the healthy instances, at most MODELS_TIMEOUT each, all
//! at once, and the merged list is kept for CARDS_TTL ([`ModelCards`]): a client
//! polling `/v1/models` does not cost every instance a request each time. A reload,
//! a discovery rebuild or a health change makes a new key, so the list is fetched
//! again at once. Only models the gateway routes are listed; a routed model no
//! instance answered for gets a minimal card, so the list never loses a model.

use crate::conn::respond;
use crate::fleet::Fleet;
use crate::service::{ReqCtx, ServicePlane};
use bytes::Bytes;
use cacheroute_decisions::openai::ApiError;
use pingora::prelude::*;
use pingora::protocols::http::ServerSession as Session;
use serde_json::{json, Value};
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long one instance gets to list its models.
const MODELS_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest `/v1/models` answer read from one instance.
const MAX_MODELS_BYTES: usize = 1 << 20;

/// How long a merged list is served without asking the instances again.
const CARDS_TTL: Duration = Duration::from_secs(2);

/// Merged lists kept at once: one per distinct `authorization` a client sent (the
/// instances may answer differently per key), the oldest dropped first.
const CARDS_ENTRIES: usize = 16;

/// What a merged list was built from: a change in any part fetches it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardsKey {
    /// The fleet's version and routed models (a reload, a discovery rebuild).
    pub version: u64,
    pub models: Vec<String>,
    /// The healthy instances asked (a health or membership change).
    pub sources: Vec<String>,
    /// A keyed hash of the client's `authorization` (the value itself is not kept).
    pub auth: u64,
}

struct CardsEntry {
    key: CardsKey,
    at: Instant,
    cards: Arc<Vec<Value>>,
}

/// The recently merged model lists, bounded by CARDS_ENTRIES and CARDS_TTL.
pub struct ModelCards {
    hasher: RandomState,
    entries: Mutex<VecDeque<CardsEntry>>,
}

impl Default for ModelCards {
    fn default() -> Self {
        ModelCards {
            hasher: RandomState::new(),
            entries: Mutex::new(VecDeque::with_capacity(CARDS_ENTRIES)),
        }
    }
}

impl ModelCards {
    /// The key of a list built from `fleet` for a client sending `auth`.
    pub fn key(&self, fleet: &Fleet, auth: Option<&str>) -> CardsKey {
        CardsKey {
            version: fleet.version,
            models: fleet.models.clone(),
            sources: sources(fleet),
            auth: self.hasher.hash_one(auth),
        }
    }

    /// The list stored under `key` if it is younger than CARDS_TTL at `now`.
    pub fn get(&self, key: &CardsKey, now: Instant) -> Option<Arc<Vec<Value>>> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .iter()
            .find(|e| e.key == *key && now.saturating_duration_since(e.at) < CARDS_TTL)
            .map(|e| Arc::clone(&e.cards))
    }

    /// Store `cards` under `key`, replacing that key's older list and, when full,
    /// the oldest one.
    pub fn put(&self, key: CardsKey, cards: Arc<Vec<Value>>, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .retain(|e| e.key.auth != key.auth && now.saturating_duration_since(e.at) < CARDS_TTL);
        while entries.len() >= CARDS_ENTRIES {
            entries.pop_front();
        }
        entries.push_back(CardsEntry {
            key,
            at: now,
            cards,
        });
    }
}

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

/// A 200 with a JSON body.
async fn json_ok(session: &mut Session, ctx: &mut ReqCtx, body: &Value) -> Result<()> {
    let body = serde_json::to_vec(body).unwrap_or_default();
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

impl ServicePlane {
    async fn merged_cards(&self, session: &Session) -> Arc<Vec<Value>> {
        let fleet = self.state.fleet.load_full();
        let auth = session
            .req_header()
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let cache = &self.state.model_cards;
        let key = cache.key(&fleet, auth);
        if let Some(cards) = cache.get(&key, Instant::now()) {
            return cards;
        }
        let http = &self.state.http;
        let reported =
            futures::future::join_all(key.sources.iter().map(|u| cards_of(http, u, auth))).await;
        let cards = Arc::new(merge(&fleet.models, reported));
        cache.put(key, Arc::clone(&cards), Instant::now());
        cards
    }

    /// `GET /v1/models`.
    pub(crate) async fn models(&self, session: &mut Session, ctx: &mut ReqCtx) -> Result<()> {
        let data = self.merged_cards(session).await;
        json_ok(session, ctx, &json!({"object": "list", "data": *data})).await
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
            .iter()
            .find(|c| c.get("id").and_then(Value::as_str) == Some(id.as_str()))
            .cloned()
            .unwrap_or_else(|| minimal_card(&id));
        json_ok(session, ctx, &card).await
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

    fn key(version: u64, auth: u64) -> CardsKey {
        CardsKey {
            version,
            models: vec!["m".into()],
            sources: vec!["http://i0".into()],
            auth,
        }
    }

    #[test]
    fn cached_cards_expire_change_with_the_fleet_and_stay_bounded() {
        let cache = ModelCards::default();
        let t0 = Instant::now();
        let cards = Arc::new(vec![json!({"id": "m"})]);
        cache.put(key(1, 7), Arc::clone(&cards), t0);
        assert_eq!(cache.get(&key(1, 7), t0 + CARDS_TTL / 2), Some(cards));
        // expired
        assert_eq!(cache.get(&key(1, 7), t0 + CARDS_TTL), None);
        // a reload (new version), other sources or another client's key: not served
        assert_eq!(cache.get(&key(2, 7), t0), None);
        let mut moved = key(1, 7);
        moved.sources.push("http://i1".into());
        assert_eq!(cache.get(&moved, t0), None);
        assert_eq!(cache.get(&key(1, 8), t0), None);
        // one list per client key, and never more than CARDS_ENTRIES
        for auth in 0..(3 * CARDS_ENTRIES as u64) {
            cache.put(key(1, auth), Arc::new(Vec::new()), t0);
            cache.put(key(1, auth), Arc::new(Vec::new()), t0);
        }
        assert_eq!(cache.entries.lock().unwrap().len(), CARDS_ENTRIES);
    }

    #[test]
    fn the_client_key_is_hashed_per_process() {
        let cache = ModelCards::default();
        let a = cache.hasher.hash_one(Some("Bearer a"));
        assert_eq!(a, cache.hasher.hash_one(Some("Bearer a")));
        assert_ne!(a, cache.hasher.hash_one(Some("Bearer b")));
        assert_ne!(a, cache.hasher.hash_one(None::<&str>));
    }

    #[test]
    fn model_ids_are_percent_decoded() {
        assert_eq!(percent_decode("meta-llama%2FLlama-3"), "meta-llama/Llama-3");
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("plain"), "plain");
        assert_eq!(percent_decode("x%zz"), "x%zz");
    }
}
