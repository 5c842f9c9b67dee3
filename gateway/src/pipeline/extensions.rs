//! `extensions`: takes CacheRoute's fields (`RAG`, `knowledge_ids`, `injection`) out
//! of the body, finds the pools serving the model (404 when none), and, in a proxy
//! behind a scheduler that proves it is one (`x-cacheroute-peer`), reads the
//! scheduler's decision from the `x-cacheroute-*` headers (a client's are ignored).

use super::{Flow, Incoming, Phases, RequestCtx, RequestFilter, UpstreamDecision, World};
use crate::config::Role;
use crate::headers;
use cacheroute_decisions::openai::ApiError;
use cacheroute_decisions::scheduler::{take_extensions, InjectionPreference};

pub struct RequestExtensions;

impl RequestFilter for RequestExtensions {
    fn name(&self) -> &str {
        "extensions"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    fn on_request(&self, ctx: &mut RequestCtx, req: &mut Incoming<'_>, _: &dyn World) -> Flow {
        let extra = req.body.extra_mut();
        if ["RAG", "knowledge_ids", "injection"]
            .iter()
            .any(|k| extra.contains_key(*k))
        {
            ctx.rewritten = true;
        }
        ctx.ext = match take_extensions(extra) {
            Ok(ext) => ext,
            Err(e) => return Flow::Reply(e.into()),
        };
        if ctx.model != req.body.model() {
            // Only when a filter before changed it: the plain path allocates it once.
            ctx.model = req.body.model().to_string();
        }
        let pools = ctx.fleet.pools_for(&ctx.model);
        if pools.is_empty() {
            return Flow::Reply(ApiError::model_not_found(&ctx.model).into());
        }
        ctx.pool_order = pools.to_vec();
        let gw = &ctx.fleet.config.gateway;
        let peer = req.header.headers.get(headers::PEER).map(|v| v.as_bytes());
        if ctx.role == Role::Proxy
            && ctx.hops > 0
            && cacheroute_auth::secret_matches(peer, &gw.peer_token)
        {
            match upstream_decision(req) {
                Ok(d) => ctx.upstream = d,
                Err(e) => return Flow::Reply(e.into()),
            }
        }
        if let Some(u) = &ctx.upstream {
            ctx.ext.injection = u.injection;
        }
        Flow::Next
    }
}

/// The scheduler's decision in the headers; `None` when it sent none.
fn upstream_decision(req: &Incoming<'_>) -> Result<Option<UpstreamDecision>, ApiError> {
    let Some(knowledge) = req.header_str(headers::KNOWLEDGE) else {
        return Ok(None);
    };
    let knowledge = headers::decode_ids(knowledge).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_header",
            format!("malformed {} header", headers::KNOWLEDGE),
        )
    })?;
    let injection = match req.header_str(headers::INJECTION_PREFERENCE) {
        Some("kv") => InjectionPreference::Kv,
        Some("text") => InjectionPreference::Text,
        _ => InjectionPreference::Auto,
    };
    Ok(Some(UpstreamDecision {
        pool: req.header_str(headers::POOL).map(str::to_string),
        kdn: req
            .header_str(headers::KDN)
            .filter(|k| *k != "none")
            .map(str::to_string),
        knowledge,
        injection,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::fake::FakeWorld;
    use crate::pipeline::testing::{ctx_with, request};

    #[tokio::test]
    async fn takes_the_extensions_out_and_refuses_an_unknown_model() {
        let (mut ctx, mut body) =
            ctx_with(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"RAG":true}"#)
                .await;
        let header = request(&[]);
        let mut req = Incoming {
            header: &header,
            body: &mut body,
        };
        assert!(matches!(
            RequestExtensions.on_request(&mut ctx, &mut req, &FakeWorld::default()),
            Flow::Next
        ));
        assert!(ctx.rewritten);
        assert_eq!(ctx.ext.rag, Some(true));
        assert!(!body.extra_mut().contains_key("RAG"));
        let (mut ctx, mut body) =
            ctx_with(r#"{"model":"other","messages":[{"role":"user","content":"hi"}]}"#).await;
        let mut req = Incoming {
            header: &header,
            body: &mut body,
        };
        match RequestExtensions.on_request(&mut ctx, &mut req, &FakeWorld::default()) {
            Flow::Reply(r) => assert_eq!(r.error.code, "model_not_found"),
            _ => panic!("an unknown model passed"),
        }
    }
}
