//! `model_alias`: maps the model name a client asks for to a served one
//! (`[model_aliases] "gpt-4o" = "meta-llama/Llama-3.1-8B-Instruct"`); the body
//! goes upstream with the served name.

use super::{Flow, Incoming, Phases, RequestCtx, RequestFilter, World};
use cacheroute_decisions::openai::CompletionBody;
use std::collections::HashMap;

pub struct ModelAlias {
    aliases: HashMap<String, String>,
}

impl ModelAlias {
    pub fn new(aliases: &std::collections::BTreeMap<String, String>) -> ModelAlias {
        ModelAlias {
            aliases: aliases
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

impl RequestFilter for ModelAlias {
    fn name(&self) -> &str {
        "model_alias"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST
    }

    fn on_request(&self, ctx: &mut RequestCtx, req: &mut Incoming<'_>, _: &dyn World) -> Flow {
        if let Some(served) = self.aliases.get(req.body.model()) {
            match &mut *req.body {
                CompletionBody::Chat(c) => c.model = served.clone(),
                CompletionBody::Completions(c) => c.model = served.clone(),
            }
            ctx.model = served.clone();
            ctx.rewritten = true;
        }
        Flow::Next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::fake::FakeWorld;
    use crate::pipeline::testing::{ctx_with, request};
    use std::collections::BTreeMap;

    #[tokio::test]
    async fn an_alias_becomes_the_served_name() {
        let f = ModelAlias::new(&BTreeMap::from([("gpt-4o".to_string(), "m".to_string())]));
        let (mut ctx, mut body) =
            ctx_with(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#).await;
        let header = request(&[]);
        let mut req = Incoming {
            header: &header,
            body: &mut body,
        };
        assert!(matches!(
            f.on_request(&mut ctx, &mut req, &FakeWorld::default()),
            Flow::Next
        ));
        assert_eq!(body.model(), "m");
        assert!(ctx.rewritten);
        assert!(String::from_utf8_lossy(&body.to_json()).contains(r#""model":"m""#));
    }
}
