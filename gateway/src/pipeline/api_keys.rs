//! `api_keys`: a request must carry `Authorization: Bearer <key>` with a key from
//! `[api_keys] keys` or `[api_keys] file` (read again on every reload); the key's
//! tenant goes in the context (decision log, rate limits) and labels
//! `cacheroute_tenant_requests_total` (only configured tenants: bounded). Anything
//! else is answered 401 with OpenAI's `invalid_api_key`.

use super::{Done, Flow, Incoming, Phases, RequestCtx, RequestFilter, World};
use crate::config::ApiKeysSection;
use cacheroute_decisions::openai::ApiError;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub struct ApiKeys {
    /// Key → tenant.
    keys: HashMap<String, Arc<str>>,
}

/// Why the keys could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("api_keys.file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("api_keys.file {path}: {source}")]
    Parse {
        path: String,
        source: toml::de::Error,
    },
    #[error("api_keys: an empty key (tenant {0})")]
    EmptyKey(String),
}

impl ApiKeys {
    pub fn from_config(section: &ApiKeysSection) -> Result<ApiKeys, KeysError> {
        let mut all: BTreeMap<String, String> = section.keys.clone();
        if !section.file.is_empty() {
            let path = section.file.clone();
            let text = std::fs::read_to_string(&path).map_err(|source| KeysError::Read {
                path: path.clone(),
                source,
            })?;
            let from_file: BTreeMap<String, String> =
                toml::from_str(&text).map_err(|source| KeysError::Parse { path, source })?;
            all.extend(from_file);
        }
        let mut keys = HashMap::with_capacity(all.len());
        for (key, tenant) in all {
            if key.is_empty() {
                return Err(KeysError::EmptyKey(tenant));
            }
            keys.insert(key, Arc::from(tenant.as_str()));
        }
        Ok(ApiKeys { keys })
    }

    fn tenant(&self, authorization: Option<&str>) -> Option<&Arc<str>> {
        let auth = authorization?;
        let key = auth
            .strip_prefix("Bearer ")
            .or_else(|| auth.strip_prefix("bearer "))?
            .trim();
        self.keys.get(key)
    }
}

impl RequestFilter for ApiKeys {
    fn name(&self) -> &str {
        "api_keys"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST.with(Phases::DONE)
    }

    fn on_request(&self, ctx: &mut RequestCtx, req: &mut Incoming<'_>, _: &dyn World) -> Flow {
        match self.tenant(req.header_str("authorization")) {
            Some(t) => {
                ctx.tenant = Some(t.clone());
                Flow::Next
            }
            None => Flow::Reply(
                ApiError::new(
                    401,
                    "invalid_request_error",
                    "invalid_api_key",
                    "Incorrect API key provided.",
                )
                .into(),
            ),
        }
    }

    fn on_done(&self, ctx: &mut RequestCtx, done: &Done<'_>, world: &dyn World) {
        if let Some(g) = world.gateway() {
            let tenant = ctx.tenant.as_deref().unwrap_or("unknown");
            g.metrics
                .tenant_requests
                .with_label_values(&[tenant, &done.status.to_string()])
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::fake::FakeWorld;
    use crate::pipeline::testing::{ctx_with, request};

    fn keys() -> ApiKeys {
        ApiKeys::from_config(&ApiKeysSection {
            keys: BTreeMap::from([("sk-a".to_string(), "team-a".to_string())]),
            file: String::new(),
        })
        .expect("keys")
    }

    #[tokio::test]
    async fn a_known_key_names_its_tenant_others_get_401() {
        let f = keys();
        let (mut ctx, mut body) = ctx_with("").await;
        let header = request(&[("authorization", "Bearer sk-a")]);
        let mut req = Incoming {
            header: &header,
            body: &mut body,
        };
        assert!(matches!(
            f.on_request(&mut ctx, &mut req, &FakeWorld::default()),
            Flow::Next
        ));
        assert_eq!(ctx.tenant.as_deref(), Some("team-a"));
        for bad in [&[("authorization", "Bearer sk-b")][..], &[]] {
            let header = request(bad);
            let mut req = Incoming {
                header: &header,
                body: &mut body,
            };
            match f.on_request(&mut ctx, &mut req, &FakeWorld::default()) {
                Flow::Reply(r) => {
                    assert_eq!(r.error.status, 401);
                    assert_eq!(r.error.code, "invalid_api_key");
                }
                _ => panic!("a bad key passed"),
            }
        }
    }

    #[test]
    fn a_missing_keys_file_is_an_error() {
        let err = ApiKeys::from_config(&ApiKeysSection {
            keys: BTreeMap::new(),
            file: "/nonexistent/keys.toml".into(),
        });
        assert!(matches!(err, Err(KeysError::Read { .. })));
    }
}
