//! Putting a request's knowledge into its body, in the one layout both injection
//! modes share (see [`crate::prompt`]): the leading block's registered content goes
//! first, unchanged, so that its KV is a prefix hit whichever way it was injected;
//! the other blocks follow as plain text; then the client's own conversation, system
//! prompt and history included (the original dropped them).
//!
//! * Chat: a system message with the leading block's content is inserted first; the
//!   other blocks go in a second system message.
//! * Completions (text prompts): the knowledge prefix exactly as registered (template
//!   head + content), the template's end of message, the other blocks, then the
//!   prompt. Where the head writes its own BOS (Llama-3), `add_special_tokens: false`
//!   is set (vLLM's completions field) so the engine does not add a second one.
//!   Token-id prompts cannot take text: the knowledge is not applied and the caller is
//!   told.

use serde::Serialize;

use crate::openai::{ChatMessage, CompletionBody, MessageContent, Prompt};
use crate::prompt::{knowledge_prefix, ChatTemplate, PLAIN_SEPARATOR};

/// Heading of the message that carries the non-leading blocks.
pub const MORE_CONTEXT_HEADING: &str = "### More context\n";

/// What applying the knowledge did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Applied {
    /// The knowledge leads the prompt.
    Prefix,
    /// Nothing to apply.
    Nothing,
    /// The prompt is token ids: the knowledge could not be added.
    TokenPrompt,
}

fn more_context(rest: &[&str]) -> String {
    let mut s = String::from(MORE_CONTEXT_HEADING);
    for (i, t) in rest.iter().enumerate() {
        if i > 0 {
            s.push_str("\n\n");
        }
        s.push_str(t);
    }
    s
}

fn system(content: String) -> ChatMessage {
    ChatMessage {
        role: "system".into(),
        content: Some(MessageContent::Text(content)),
        extra: Default::default(),
    }
}

/// Put `leading` (the registered content of the first block) and `rest` (texts of the
/// other blocks) into `body`.
pub fn apply_knowledge(
    body: &mut CompletionBody,
    template: ChatTemplate,
    leading: &str,
    rest: &[&str],
) -> Applied {
    if leading.is_empty() && rest.is_empty() {
        return Applied::Nothing;
    }
    match body {
        CompletionBody::Chat(chat) => {
            let mut front = Vec::with_capacity(2);
            front.push(system(leading.to_string()));
            if !rest.is_empty() {
                front.push(system(more_context(rest)));
            }
            chat.messages.splice(0..0, front);
            Applied::Prefix
        }
        CompletionBody::Completions(c) => {
            let mut head = knowledge_prefix(template, leading);
            head.push_str(template.end_of_message());
            if !rest.is_empty() {
                head.push_str(&more_context(rest));
                head.push_str(PLAIN_SEPARATOR);
            }
            match &mut c.prompt {
                Prompt::Text(p) => p.insert_str(0, &head),
                Prompt::Texts(ps) => ps.iter_mut().for_each(|p| p.insert_str(0, &head)),
                Prompt::Tokens(_) | Prompt::TokenBatches(_) => return Applied::TokenPrompt,
            }
            if !template.add_special_tokens() && !template.head().is_empty() {
                c.extra
                    .entry("add_special_tokens")
                    .or_insert(serde_json::Value::Bool(false));
            }
            Applied::Prefix
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::Route;

    #[test]
    fn chat_keeps_system_and_history_after_the_knowledge() {
        let body = br#"{"model":"m","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"hi"},{"role":"assistant","content":"hello"},{"role":"user","content":"q?"}],"foo":1}"#;
        let mut b = CompletionBody::parse(Route::Chat, body).unwrap();
        assert_eq!(
            apply_knowledge(&mut b, ChatTemplate::Llama3, "K1", &["T2", "T3"]),
            Applied::Prefix
        );
        let CompletionBody::Chat(c) = &b else {
            panic!()
        };
        let texts: Vec<(String, String)> = c
            .messages
            .iter()
            .map(|m| (m.role.clone(), m.text()))
            .collect();
        assert_eq!(texts[0], ("system".into(), "K1".into()));
        assert_eq!(texts[1].1, format!("{MORE_CONTEXT_HEADING}T2\n\nT3"));
        assert_eq!(texts[2], ("system".into(), "Be brief.".into()));
        assert_eq!(texts.len(), 6);
        let json: serde_json::Value = serde_json::from_slice(&b.to_json()).unwrap();
        assert_eq!(json["foo"], 1, "unknown fields survive");
    }

    fn completion(prompt: &str) -> CompletionBody {
        let body = format!(r#"{{"model":"m","prompt":{prompt}}}"#);
        CompletionBody::parse(Route::Completions, body.as_bytes()).unwrap()
    }

    #[test]
    fn completions_prefix_text_prompts_only() {
        let mut b = completion(r#""Q:""#);
        assert_eq!(
            apply_knowledge(&mut b, ChatTemplate::Plain, "K", &[]),
            Applied::Prefix
        );
        let CompletionBody::Completions(c) = &b else {
            panic!()
        };
        assert_eq!(c.prompt, Prompt::Text(format!("K{PLAIN_SEPARATOR}Q:")));
        assert!(!c.extra.contains_key("add_special_tokens"));

        let mut l = completion(r#""Q:""#);
        apply_knowledge(&mut l, ChatTemplate::Llama3, "K", &[]);
        let CompletionBody::Completions(c) = &l else {
            panic!()
        };
        let Prompt::Text(p) = &c.prompt else { panic!() };
        assert!(p.starts_with(&knowledge_prefix(ChatTemplate::Llama3, "K")));
        assert!(p.ends_with("K<|eot_id|>Q:"));
        assert_eq!(c.extra["add_special_tokens"], false);

        let mut t = completion("[1,2]");
        assert_eq!(
            apply_knowledge(&mut t, ChatTemplate::Plain, "K", &[]),
            Applied::TokenPrompt
        );
        let mut n = completion(r#""x""#);
        assert_eq!(
            apply_knowledge(&mut n, ChatTemplate::Plain, "", &[]),
            Applied::Nothing
        );
    }
}
