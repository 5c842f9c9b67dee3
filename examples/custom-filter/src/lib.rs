//! A request filter of one's own, for CacheRoute's gateway: it refuses prompts
//! that mention a blocked word (400, OpenAI error JSON) and marks every answer it
//! let through with an `x-content-check: passed` header. `main.rs` runs a gateway
//! with it; `tests/` checks it acts, against a simulated engine.

use cacheroute_gateway::{
    ApiError, CompletionBody, Flow, Incoming, Phases, RequestCtx, RequestFilter, ResponseHeader,
    World,
};

/// Refuses prompts containing any of its words.
pub struct ContentCheck {
    blocked: Vec<String>,
}

impl ContentCheck {
    pub fn new(blocked: &[&str]) -> ContentCheck {
        ContentCheck {
            blocked: blocked.iter().map(|w| w.to_lowercase()).collect(),
        }
    }

    fn blocked_word(&self, body: &CompletionBody) -> Option<&str> {
        let text = match body {
            CompletionBody::Chat(c) => c
                .messages
                .iter()
                .map(|m| m.text())
                .collect::<Vec<_>>()
                .join("\n"),
            CompletionBody::Completions(_) => return None,
        }
        .to_lowercase();
        self.blocked
            .iter()
            .find(|w| text.contains(w.as_str()))
            .map(String::as_str)
    }
}

impl RequestFilter for ContentCheck {
    fn name(&self) -> &str {
        "content_check"
    }

    fn phases(&self) -> Phases {
        Phases::REQUEST.with(Phases::RESPONSE)
    }

    fn on_request(&self, _: &mut RequestCtx, req: &mut Incoming<'_>, _: &dyn World) -> Flow {
        match self.blocked_word(req.body) {
            None => Flow::Next,
            Some(w) => Flow::Reply(
                ApiError::bad_request("content_blocked", format!("the prompt mentions `{w}`"))
                    .into(),
            ),
        }
    }

    fn on_response(&self, _: &RequestCtx, resp: &mut ResponseHeader) {
        // A header the filter cannot add (never, for this name) is not worth failing for.
        let _ = resp.insert_header("x-content-check", "passed");
    }
}
