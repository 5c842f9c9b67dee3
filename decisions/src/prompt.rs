//! Prompt layout for knowledge injection: the ONE layout that text injection and KV
//! injection share, so that a knowledge block's KV cache (computed by the KDN from this
//! layout) is a prefix hit for the prompts the gateway builds.
//!
//! The knowledge goes first, as the content of a leading **system** message:
//!
//! ```text
//! prefix  = template head + knowledge_message_content(text, padding)
//! head    = Llama-3: "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
//!           ChatML:  "<|im_start|>system\n"
//!           Plain:   ""   (the tokenizer adds BOS, as vLLM's /v1/completions does)
//! content = KNOWLEDGE_PREAMBLE + text + PADDING_UNIT × padding
//! ```
//!
//! The KDN chooses `padding` so that the prefix's token count is a whole number of
//! LMCache chunks, registers that exact content string per model, and the gateway puts
//! it, unchanged, as the first system message ([`render_chat`]). Because the message is
//! followed by the template's end-of-message special token (`<|eot_id|>`, `<|im_end|>`),
//! which tokenizers split off before any merge, the rendered chat's token ids start with
//! the registered prefix's ids, and every knowledge chunk is a cache hit. With the
//! [`ChatTemplate::Plain`] layout, the content is followed by [`PLAIN_SEPARATOR`].
//!
//! **Padding unit.** [`PADDING_UNIT`] is `" the"`: one token in every byte-level BPE
//! vocabulary we target (Llama-3, Qwen/ChatML) and in the KDN's approximate tokenizer,
//! and it merges with neither neighbour:
//!
//! * on its left is the (trimmed) text, whose last character is not whitespace, or
//!   another unit: the leading space starts a new pre-token (GPT-style pre-tokenizers:
//!   `[^\r\n\p{L}\p{N}]?\p{L}+`; the approximation: one space attaches to the following
//!   word);
//! * on its right is another unit (same argument), an end-of-message special token
//!   (split before pre-tokenization), or [`PLAIN_SEPARATOR`] (`"\n\n"`; a letter run never
//!   absorbs newlines). A punctuation unit such as `" ."` would not do: GPT-style
//!   pre-tokenizers glue trailing newlines to punctuation (`?[^\s\p{L}\p{N}]+[\r\n]*`).
//!
//! The KDN still re-tokenizes the padded prefix and checks the count, so a tokenizer
//! where this does not hold fails registration loudly instead of silently missing.
//!
//! **Trimming.** Meta's Llama-3 template writes `message['content'] | trim`: Jinja's
//! `trim` is Python's `str.strip()`, which removes leading and trailing whitespace as
//! Python defines it ([`python_trim`]). [`render_chat`] and [`knowledge_prefix`] do the
//! same for [`ChatTemplate::Llama3`] ([`ChatTemplate::message_content`]), so the token
//! counts and prefixes computed here are the engine's. Registered knowledge content
//! starts with [`KNOWLEDGE_PREAMBLE`] and ends with the trimmed text or a padding unit,
//! so trimming leaves it unchanged. ChatML (Qwen's template) does not trim.

use serde::{Deserialize, Serialize};

/// A chat template family: how messages become the prompt text the engine tokenizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatTemplate {
    /// Llama-3 (`<|begin_of_text|><|start_header_id|>role<|end_header_id|>\n\n…<|eot_id|>`).
    ///
    /// This is the Llama-3.0 template. Llama-3.1+'s stock template writes
    /// "Cutting Knowledge Date…" lines into the system message; serve those models with
    /// a template that does not (e.g. vLLM `--chat-template` with the 3.0 template).
    #[default]
    Llama3,
    /// ChatML (`<|im_start|>role\n…<|im_end|>\n`), e.g. Qwen.
    Chatml,
    /// No template: the prompt is the knowledge, [`PLAIN_SEPARATOR`], then the rest
    /// (for `/v1/completions` with a text prompt; the tokenizer adds BOS).
    Plain,
}

impl ChatTemplate {
    /// Every template.
    pub const ALL: [ChatTemplate; 3] = [
        ChatTemplate::Llama3,
        ChatTemplate::Chatml,
        ChatTemplate::Plain,
    ];

    /// The configuration name (`llama3`, `chatml`, `plain`).
    pub fn name(self) -> &'static str {
        match self {
            ChatTemplate::Llama3 => "llama3",
            ChatTemplate::Chatml => "chatml",
            ChatTemplate::Plain => "plain",
        }
    }

    /// Text before the knowledge message's content: the start of the prompt up to and
    /// including the system message's header.
    pub fn head(self) -> &'static str {
        match self {
            ChatTemplate::Llama3 => {
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
            }
            ChatTemplate::Chatml => "<|im_start|>system\n",
            ChatTemplate::Plain => "",
        }
    }

    /// What closes the knowledge message in a raw (completions) prompt, as the chat
    /// template would close it: the end-of-message special token, or
    /// [`PLAIN_SEPARATOR`] without a template.
    pub fn end_of_message(self) -> &'static str {
        match self {
            ChatTemplate::Llama3 => "<|eot_id|>",
            ChatTemplate::Chatml => "<|im_end|>\n",
            ChatTemplate::Plain => PLAIN_SEPARATOR,
        }
    }

    /// A message's content as the template writes it: Llama-3 trims it (Meta's
    /// template: `message['content'] | trim`), the others keep it as is.
    pub fn message_content(self, content: &str) -> &str {
        match self {
            ChatTemplate::Llama3 => python_trim(content),
            ChatTemplate::Chatml | ChatTemplate::Plain => content,
        }
    }

    /// Whether the engine lets the tokenizer add its special tokens (BOS) when it
    /// tokenizes text in this layout: not for chat templates (the Llama-3 template writes
    /// `<|begin_of_text|>` itself, ChatML has no BOS), yes for plain completions.
    pub fn add_special_tokens(self) -> bool {
        matches!(self, ChatTemplate::Plain)
    }
}

impl std::fmt::Display for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ChatTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "llama3" | "llama-3" => Ok(ChatTemplate::Llama3),
            "chatml" => Ok(ChatTemplate::Chatml),
            "plain" | "none" => Ok(ChatTemplate::Plain),
            _ => Err(format!(
                "unknown chat template {s:?}: use llama3, chatml or plain"
            )),
        }
    }
}

/// Written before the knowledge text inside the knowledge message, so that the model
/// knows what the text is for (the original CacheRoute sent bare knowledge in KV mode).
pub const KNOWLEDGE_PREAMBLE: &str = "Use the following context to answer the user's \
question. If the context is not relevant, ignore it.\n\n### Context\n";

/// The padding unit: exactly one token, merges with neither neighbour (module docs).
pub const PADDING_UNIT: &str = " the";

/// What follows the knowledge content in the [`ChatTemplate::Plain`] layout.
pub const PLAIN_SEPARATOR: &str = "\n\n";

/// Whitespace as Python's `str.isspace()` sees it: Rust's [`char::is_whitespace`] plus
/// the four information separators U+001C..U+001F (Python's `strip()` removes them).
pub fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.strip()` (Jinja's `trim` filter, as chat templates use it).
pub fn python_trim(s: &str) -> &str {
    s.trim_matches(is_python_space)
}

/// Normalise knowledge text as the registry stores it: CRLF and CR become LF, and
/// leading and trailing whitespace is removed as [`python_trim`] does (case and inner
/// whitespace are kept).
pub fn normalize_knowledge_text(text: &str) -> String {
    python_trim(&text.replace("\r\n", "\n").replace('\r', "\n")).to_string()
}

/// The content of the knowledge message: [`KNOWLEDGE_PREAMBLE`], the (normalised) text,
/// then `padding` × [`PADDING_UNIT`].
pub fn knowledge_message_content(text: &str, padding: usize) -> String {
    let mut s =
        String::with_capacity(KNOWLEDGE_PREAMBLE.len() + text.len() + padding * PADDING_UNIT.len());
    s.push_str(KNOWLEDGE_PREAMBLE);
    s.push_str(text);
    for _ in 0..padding {
        s.push_str(PADDING_UNIT);
    }
    s
}

/// The knowledge prefix as the engine sees it: the template head + `content` (the
/// output of [`knowledge_message_content`]), trimmed where the template trims. Tokenize
/// it with [`ChatTemplate::add_special_tokens`].
pub fn knowledge_prefix(template: ChatTemplate, content: &str) -> String {
    let content = template.message_content(content);
    let head = template.head();
    let mut s = String::with_capacity(head.len() + content.len());
    s.push_str(head);
    s.push_str(content);
    s
}

/// A message for [`render_chat`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

impl<'a> Message<'a> {
    pub fn new(role: &'a str, content: &'a str) -> Self {
        Message { role, content }
    }
}

/// Render a whole prompt with the generation prompt, as the engine's chat template
/// does (Llama-3 trims each message's content, as Meta's template does). With the knowledge layout, `messages[0]` is `system` with the registered
/// content. For [`ChatTemplate::Plain`], the message contents are joined with
/// [`PLAIN_SEPARATOR`] (roles are not written).
pub fn render_chat(template: ChatTemplate, messages: &[Message<'_>]) -> String {
    let mut s = String::new();
    match template {
        ChatTemplate::Llama3 => {
            s.push_str("<|begin_of_text|>");
            for m in messages {
                s.push_str("<|start_header_id|>");
                s.push_str(m.role);
                s.push_str("<|end_header_id|>\n\n");
                s.push_str(python_trim(m.content));
                s.push_str("<|eot_id|>");
            }
            s.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
        }
        ChatTemplate::Chatml => {
            for m in messages {
                s.push_str("<|im_start|>");
                s.push_str(m.role);
                s.push('\n');
                s.push_str(m.content);
                s.push_str("<|im_end|>\n");
            }
            s.push_str("<|im_start|>assistant\n");
        }
        ChatTemplate::Plain => {
            for (i, m) in messages.iter().enumerate() {
                if i > 0 {
                    s.push_str(PLAIN_SEPARATOR);
                }
                s.push_str(m.content);
            }
        }
    }
    s
}

/// Padding units that bring `tokens` up to the next multiple of `chunk_size` (0 when it
/// already is one), assuming each unit adds exactly one token.
pub fn padding_for(tokens: usize, chunk_size: usize) -> usize {
    if chunk_size == 0 {
        return 0;
    }
    (chunk_size - tokens % chunk_size) % chunk_size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_is_a_prefix_of_the_rendered_chat() {
        let content = knowledge_message_content("Paris is the capital of France.", 3);
        assert!(content.ends_with("France. the the the"));
        assert!(content.starts_with(KNOWLEDGE_PREAMBLE));
        for t in ChatTemplate::ALL {
            let prefix = knowledge_prefix(t, &content);
            let chat = render_chat(
                t,
                &[
                    Message::new("system", &content),
                    Message::new("user", "What is the capital of France?"),
                ],
            );
            assert!(chat.starts_with(&prefix), "{t}: {chat:?}");
            assert!(chat.len() > prefix.len());
        }
        let llama = render_chat(
            ChatTemplate::Llama3,
            &[Message::new("system", "S"), Message::new("user", "U")],
        );
        assert_eq!(
            llama,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let chatml = render_chat(ChatTemplate::Chatml, &[Message::new("user", "U")]);
        assert_eq!(
            chatml,
            "<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
        );
        let plain = render_chat(
            ChatTemplate::Plain,
            &[Message::new("system", "K"), Message::new("user", "Q")],
        );
        assert_eq!(plain, "K\n\nQ");
    }

    #[test]
    fn llama3_trims_message_content_like_python_strip() {
        let chat = render_chat(
            ChatTemplate::Llama3,
            &[
                Message::new("system", "\n  K \t"),
                Message::new("user", "\u{1f}\u{a0}U\u{3000}\n\n"),
            ],
        );
        assert_eq!(
            chat,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nK<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        // inner whitespace stays; ChatML and plain keep the content as is
        assert_eq!(python_trim(" a \n b "), "a \n b");
        assert_eq!(
            python_trim("\u{200b}x"),
            "\u{200b}x",
            "ZWSP is not whitespace"
        );
        assert_eq!(
            render_chat(ChatTemplate::Chatml, &[Message::new("user", " U ")]),
            "<|im_start|>user\n U <|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            render_chat(ChatTemplate::Plain, &[Message::new("user", " U ")]),
            " U "
        );
        // the knowledge prefix stays a prefix of the rendered chat, trimmed alike
        let content = knowledge_message_content("Some text.", 2);
        assert_eq!(ChatTemplate::Llama3.message_content(&content), content);
        for raw in [
            content.clone(),
            format!("{content}\n "),
            format!(" {content}"),
        ] {
            let prefix = knowledge_prefix(ChatTemplate::Llama3, &raw);
            let chat = render_chat(
                ChatTemplate::Llama3,
                &[Message::new("system", &raw), Message::new("user", "Q")],
            );
            assert!(chat.starts_with(&format!("{prefix}<|eot_id|>")), "{raw:?}");
        }
        assert_eq!(normalize_knowledge_text("\u{1c} a \u{1f}"), "a");
    }

    #[test]
    fn names_normalisation_and_padding() {
        for t in ChatTemplate::ALL {
            assert_eq!(t.name().parse::<ChatTemplate>().unwrap(), t);
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.name()));
            assert_eq!(serde_json::from_str::<ChatTemplate>(&json).unwrap(), t);
        }
        assert!("mistral".parse::<ChatTemplate>().is_err());
        assert_eq!(normalize_knowledge_text("\r\n  a\r\nb\rc \n"), "a\nb\nc");
        assert_eq!(normalize_knowledge_text(" \n\t "), "");
        assert_eq!(padding_for(0, 256), 0);
        assert_eq!(padding_for(1, 256), 255);
        assert_eq!(padding_for(256, 256), 0);
        assert_eq!(padding_for(300, 256), 212);
        assert_eq!(padding_for(5, 0), 0);
        assert_eq!(
            knowledge_message_content("x", 0),
            format!("{KNOWLEDGE_PREAMBLE}x")
        );
    }
}
