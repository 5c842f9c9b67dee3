//! Membership: KDNs and instance agents that registered themselves on the control
//! plane (`POST /v1/members`) and keep registering as a heartbeat. A member that
//! stops heartbeating expires; nothing depends on the order in which the gateway and
//! the members start.

use cacheroute_decisions::openai::ApiError;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use cacheroute_wire::members::{MemberEntry, MemberKind, Registration};

#[derive(Debug, Clone)]
pub struct Member {
    pub registration: Registration,
    pub expires: Instant,
    pub first_seen: Instant,
}

#[derive(Default)]
pub struct Members {
    table: Mutex<BTreeMap<(MemberKind, String), Member>>,
}

/// Parse and check a registration body (`POST /v1/members`).
pub fn parse_registration(body: &[u8]) -> Result<Registration, ApiError> {
    {
        let r: Registration = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request("invalid_registration", format!("invalid registration: {e}"))
        })?;
        if r.id.trim().is_empty() {
            return Err(
                ApiError::bad_request("invalid_registration", "`id` is empty").with_param("id"),
            );
        }
        if !r.url.starts_with("http://") {
            return Err(ApiError::bad_request(
                "invalid_registration",
                format!("`url` {:?} must be an http:// base URL", r.url),
            )
            .with_param("url"));
        }
        if r.kind == MemberKind::Agent
            && !r
                .instance
                .as_deref()
                .is_some_and(|i| i.starts_with("http://"))
        {
            return Err(ApiError::bad_request(
                "invalid_registration",
                "an agent must give `instance`, the http:// base URL of its engine",
            )
            .with_param("instance"));
        }
        if let Some(ttl) = r.ttl_s {
            if !(ttl.is_finite() && ttl > 0.0 && ttl <= 3600.0) {
                return Err(ApiError::bad_request(
                    "invalid_registration",
                    "`ttl_s` must be in (0, 3600]",
                )
                .with_param("ttl_s"));
            }
        }
        Ok(r)
    }
}

impl Members {
    /// Register or refresh; returns whether the member is new. A new member past `max`
    /// live ones is refused: every member is polled each sync period, so the table
    /// bounds the gateway's outgoing work.
    pub fn register(
        &self,
        r: Registration,
        default_ttl_s: f64,
        max: usize,
    ) -> Result<bool, ApiError> {
        let now = Instant::now();
        let ttl = Duration::from_secs_f64(r.ttl_s.unwrap_or(default_ttl_s));
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let key = (r.kind, r.id.clone());
        let first_seen = t
            .get(&key)
            .filter(|m| m.expires > now)
            .map(|m| m.first_seen);
        let new = first_seen.is_none();
        if new {
            t.retain(|_, m| m.expires > now);
            if t.len() >= max {
                return Err(ApiError::too_many_requests(
                    "too_many_members",
                    format!(
                        "the gateway already has {} members (knowledge.max_members = {max})",
                        t.len()
                    ),
                ));
            }
        }
        t.insert(
            key,
            Member {
                registration: r,
                expires: now + ttl,
                first_seen: first_seen.unwrap_or(now),
            },
        );
        Ok(new)
    }

    pub fn remove(&self, kind: MemberKind, id: &str) -> bool {
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.remove(&(kind, id.to_string())).is_some()
    }

    /// Live members of a kind (expired ones are dropped).
    pub fn live(&self, kind: MemberKind) -> Vec<Registration> {
        let now = Instant::now();
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.retain(|_, m| m.expires > now);
        t.values()
            .filter(|m| m.registration.kind == kind)
            .map(|m| m.registration.clone())
            .collect()
    }

    /// `GET /v1/members`.
    pub fn to_json(&self) -> serde_json::Value {
        let now = Instant::now();
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.retain(|_, m| m.expires > now);
        let data: Vec<_> = t
            .values()
            .map(|m| MemberEntry {
                kind: m.registration.kind,
                id: m.registration.id.clone(),
                url: m.registration.url.clone(),
                instance: m.registration.instance.clone(),
                expires_in_s: (m.expires - now).as_secs_f64(),
                member_for_s: (now - m.first_seen).as_secs_f64(),
            })
            .collect();
        serde_json::json!({"object": "list", "data": data})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(kind: MemberKind, id: &str, ttl: f64) -> Registration {
        Registration {
            kind,
            id: id.into(),
            url: "http://127.0.0.1:1".into(),
            instance: Some("http://127.0.0.1:2".into()),
            ttl_s: Some(ttl),
        }
    }

    #[test]
    fn register_refresh_expire_remove() {
        let m = Members::default();
        assert!(m
            .register(reg(MemberKind::Kdn, "a", 60.0), 10.0, 8)
            .unwrap());
        assert!(!m
            .register(reg(MemberKind::Kdn, "a", 60.0), 10.0, 8)
            .unwrap());
        assert!(m
            .register(reg(MemberKind::Agent, "a", 60.0), 10.0, 8)
            .unwrap());
        assert_eq!(m.live(MemberKind::Kdn).len(), 1);
        m.register(reg(MemberKind::Kdn, "b", 0.001), 10.0, 8)
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(m.live(MemberKind::Kdn).len(), 1, "b expired");
        assert!(m.remove(MemberKind::Agent, "a"));
        assert!(m.live(MemberKind::Agent).is_empty());
    }

    #[test]
    fn the_member_table_is_bounded() {
        let m = Members::default();
        for i in 0..3 {
            assert!(m
                .register(reg(MemberKind::Kdn, &i.to_string(), 60.0), 10.0, 3)
                .unwrap());
        }
        let err = m
            .register(reg(MemberKind::Agent, "x", 60.0), 10.0, 3)
            .unwrap_err();
        assert_eq!((err.status, err.code), (429, "too_many_members"));
        // a known member still refreshes
        assert!(!m
            .register(reg(MemberKind::Kdn, "0", 60.0), 10.0, 3)
            .unwrap());
        assert!(m.remove(MemberKind::Kdn, "1"));
        assert!(m
            .register(reg(MemberKind::Agent, "x", 60.0), 10.0, 3)
            .unwrap());
    }

    #[test]
    fn bad_registrations_are_refused() {
        for body in [
            r#"{"kind":"kdn","id":"","url":"http://x:1"}"#,
            r#"{"kind":"kdn","id":"a","url":"ftp://x"}"#,
            r#"{"kind":"agent","id":"a","url":"http://x:1"}"#,
            r#"{"kind":"robot","id":"a","url":"http://x:1"}"#,
            r#"{"kind":"kdn","id":"a","url":"http://x:1","ttl_s":-1}"#,
            r#"not json"#,
        ] {
            assert!(parse_registration(body.as_bytes()).is_err(), "{body}");
        }
        assert!(parse_registration(br#"{"kind":"kdn","id":"a","url":"http://x:1"}"#).is_ok());
    }
}
