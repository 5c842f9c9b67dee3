//! Hand-written deserialisers for the request types: one pass over the body, typed
//! fields checked, unknown fields kept. (serde's `flatten` and `untagged` buffer every
//! value first, which is most of the parsing cost on the hot path.) Every list and
//! `Value` tree a body can grow is bounded here.

use super::{
    ChatCompletionRequest, ChatMessage, CommonParams, CompletionRequest, MessageContent, Prompt,
    StreamOptions,
};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt;

const PROMPT_SHAPES: &str = "`prompt` must be a string, an array of strings, an array of token ids, or an array of arrays of token ids";

/// Marks the errors of the bounds below (their own error code).
pub(super) const LIMIT_MARK: &str = "over the gateway's limit";
/// JSON values the gateway keeps as `Value` trees in one body (unknown
/// fields, content parts): one costs ~80 bytes against 2 in the body.
pub const MAX_VALUE_NODES: usize = 262_144;
/// Messages of one chat request (~160 bytes each, parsed).
pub const MAX_MESSAGES: usize = 100_000;
/// Texts or token-id batches of one completion prompt.
pub const MAX_PROMPT_ITEMS: usize = 65_536;

/// The bounds of the body being parsed on this thread.
#[derive(Clone, Copy)]
struct Limits {
    /// `Value` nodes still allowed.
    nodes_left: usize,
    /// Most token ids the body can hold (2 bytes each at least): a long
    /// token prompt reserves this at once instead of doubling its way up
    /// (each doubling keeps the old and the new buffer alive).
    max_tokens: usize,
}

const UNLIMITED: Limits = Limits {
    nodes_left: usize::MAX,
    max_tokens: 0,
};

thread_local! {
    static LIMITS: std::cell::Cell<Limits> = const { std::cell::Cell::new(UNLIMITED) };
}

/// Run `f` (a parse of a body of `len` bytes) under the body bounds.
pub(super) fn with_limits<T>(len: usize, f: impl FnOnce() -> T) -> T {
    LIMITS.with(|l| {
        l.set(Limits {
            nodes_left: MAX_VALUE_NODES,
            max_tokens: len / 2 + 1,
        })
    });
    let out = f();
    LIMITS.with(|l| l.set(UNLIMITED));
    out
}

fn take_node<E: de::Error>() -> Result<(), E> {
    LIMITS.with(|l| {
        let mut cur = l.get();
        if cur.nodes_left == 0 {
            return Err(E::custom(format_args!(
                "more than {MAX_VALUE_NODES} JSON values in pass-through fields: {LIMIT_MARK}"
            )));
        }
        cur.nodes_left -= 1;
        l.set(cur);
        Ok(())
    })
}

fn too_many<E: de::Error>(what: &str, max: usize) -> E {
    E::custom(format_args!("more than {max} {what}: {LIMIT_MARK}"))
}

/// A `Value` whose nodes count against the body's budget.
pub(super) struct Bounded(pub Value);

impl<'de> Deserialize<'de> for Bounded {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Bounded;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Bounded, E> {
                take_node()?;
                Ok(Bounded(Value::Bool(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Bounded, E> {
                take_node()?;
                Ok(Bounded(Value::from(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Bounded, E> {
                take_node()?;
                Ok(Bounded(Value::from(v)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Bounded, E> {
                take_node()?;
                Ok(Bounded(
                    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number),
                ))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Bounded, E> {
                take_node()?;
                Ok(Bounded(Value::String(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Bounded, E> {
                take_node()?;
                Ok(Bounded(Value::String(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Bounded, E> {
                take_node()?;
                Ok(Bounded(Value::Null))
            }
            fn visit_none<E: de::Error>(self) -> Result<Bounded, E> {
                self.visit_unit()
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Bounded, D::Error> {
                Bounded::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bounded, A::Error> {
                take_node()?;
                let mut items = Vec::new();
                while let Some(Bounded(v)) = seq.next_element()? {
                    items.push(v);
                }
                Ok(Bounded(Value::Array(items)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Bounded, A::Error> {
                take_node()?;
                let mut out = Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    let Bounded(v) = map.next_value()?;
                    out.insert(key, v);
                }
                Ok(Bounded(Value::Object(out)))
            }
        }
        d.deserialize_any(V)
    }
}

/// An object key, borrowed from the body when it has no escapes: the fields a
/// request is matched on are read without an allocation per key (`Cow`'s own
/// `Deserialize` always copies).
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A chat request's messages, at most MAX_MESSAGES of them.
pub(super) struct Messages(pub Vec<ChatMessage>);

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Messages, A::Error> {
                let mut out = Vec::new();
                while let Some(m) = seq.next_element::<ChatMessage>()? {
                    if out.len() == MAX_MESSAGES {
                        return Err(too_many("messages", MAX_MESSAGES));
                    }
                    out.push(m);
                }
                Ok(Messages(out))
            }
        }
        d.deserialize_seq(V)
    }
}

/// What the second look at a refused body needs: is it an object, and
/// which of the required fields does it hold (not null). Nothing else of
/// the body is kept.
pub(super) struct Shape {
    pub present: Option<Vec<&'static str>>,
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Shape;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Shape, A::Error> {
                let mut present = Vec::new();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    let value = map.next_value::<Option<de::IgnoredAny>>()?;
                    let known = ["model", "messages", "prompt"]
                        .into_iter()
                        .find(|k| *k == key.0);
                    if let (Some(k), Some(_)) = (known, value) {
                        present.push(k);
                    }
                }
                Ok(Shape {
                    present: Some(present),
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Shape, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Shape { present: None })
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Shape, E> {
                Ok(Shape { present: None })
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Shape, E> {
                Ok(Shape { present: None })
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Shape, E> {
                Ok(Shape { present: None })
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Shape, E> {
                Ok(Shape { present: None })
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Shape, E> {
                Ok(Shape { present: None })
            }
            fn visit_unit<E: de::Error>(self) -> Result<Shape, E> {
                Ok(Shape { present: None })
            }
        }
        d.deserialize_any(V)
    }
}

impl CommonParams {
    /// Take `key`'s value if it is one of the common parameters.
    fn accept<'de, A: MapAccess<'de>>(&mut self, key: &str, map: &mut A) -> Result<bool, A::Error> {
        match key {
            "stream" => self.stream = map.next_value()?,
            "stream_options" => self.stream_options = map.next_value()?,
            "max_tokens" => self.max_tokens = map.next_value()?,
            "temperature" => self.temperature = map.next_value()?,
            "top_p" => self.top_p = map.next_value()?,
            "n" => self.n = map.next_value()?,
            _ => return Ok(false),
        }
        Ok(true)
    }
}

fn required<T, E: de::Error>(v: Option<T>, field: &'static str) -> Result<T, E> {
    v.ok_or_else(|| de::Error::missing_field(field))
}

impl<'de> Deserialize<'de> for ChatCompletionRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ChatCompletionRequest;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a chat completion request object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut model, mut messages, mut max_completion_tokens) = (None, None, None);
                let mut params = CommonParams::default();
                let mut extra = Map::new();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match &*key.0 {
                        "model" => model = map.next_value::<Option<String>>()?,
                        "messages" => messages = map.next_value::<Option<Messages>>()?.map(|m| m.0),
                        "max_completion_tokens" => max_completion_tokens = map.next_value()?,
                        k => {
                            if !params.accept(k, &mut map)? {
                                extra.insert(key.0.into_owned(), map.next_value::<Bounded>()?.0);
                            }
                        }
                    }
                }
                Ok(ChatCompletionRequest {
                    model: required(model, "model")?,
                    messages: required(messages, "messages")?,
                    max_completion_tokens,
                    params,
                    extra,
                })
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for CompletionRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CompletionRequest;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a completion request object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut model, mut prompt) = (None, None);
                let mut params = CommonParams::default();
                let mut extra = Map::new();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match &*key.0 {
                        "model" => model = map.next_value::<Option<String>>()?,
                        "prompt" => prompt = map.next_value::<Option<Prompt>>()?,
                        k => {
                            if !params.accept(k, &mut map)? {
                                extra.insert(key.0.into_owned(), map.next_value::<Bounded>()?.0);
                            }
                        }
                    }
                }
                Ok(CompletionRequest {
                    model: required(model, "model")?,
                    prompt: required(prompt, "prompt")?,
                    params,
                    extra,
                })
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for StreamOptions {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StreamOptions;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a `stream_options` object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = StreamOptions::default();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    if key.0 == "include_usage" {
                        out.include_usage = map.next_value()?;
                    } else {
                        out.extra
                            .insert(key.0.into_owned(), map.next_value::<Bounded>()?.0);
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for ChatMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ChatMessage;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut role, mut content) = (None, None);
                let mut extra = Map::new();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match &*key.0 {
                        "role" => role = Some(map.next_value::<String>()?),
                        "content" => content = map.next_value::<Option<MessageContent>>()?,
                        _ => {
                            extra.insert(key.0.into_owned(), map.next_value::<Bounded>()?.0);
                        }
                    }
                }
                Ok(ChatMessage {
                    role: required(role, "role")?,
                    content,
                    extra,
                })
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MessageContent;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a message's `content` as a string or an array of content parts")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(MessageContent::Text(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(MessageContent::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut parts = Vec::new();
                while let Some(Bounded(p)) = seq.next_element::<Bounded>()? {
                    parts.push(p);
                }
                Ok(MessageContent::Parts(parts))
            }
        }
        d.deserialize_any(V)
    }
}

/// Token prompts longer than this reserve the body's most at once.
const TOKENS_RESERVE_FROM: usize = 1 << 16;

/// One element of a `prompt` array, typed as it is read: a string, a token
/// id or a batch of ids. (Going through `Value` cost ~32 bytes per token id,
/// about 16× the body's size for a long token prompt.)
enum PromptItem {
    Text(String),
    Token(u32),
    Batch(Vec<u32>),
}

impl<'de> Deserialize<'de> for PromptItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PromptItem;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(PROMPT_SHAPES)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(PromptItem::Text(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(PromptItem::Text(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                u32::try_from(v)
                    .map(PromptItem::Token)
                    .map_err(|_| E::custom(PROMPT_SHAPES))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut ids = Vec::new();
                while let Some(id) = seq.next_element::<u32>()? {
                    ids.push(id);
                }
                Ok(PromptItem::Batch(ids))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Prompt;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(PROMPT_SHAPES)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Prompt::Text(v.to_string()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Prompt::Text(v))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                // The first element fixes the shape; every other must match it.
                let invalid = || de::Error::custom(PROMPT_SHAPES);
                let mut prompt = match seq.next_element::<PromptItem>()? {
                    // An empty array reads as an empty list of texts, as before.
                    None => return Ok(Prompt::Texts(Vec::new())),
                    Some(PromptItem::Text(s)) => Prompt::Texts(vec![s]),
                    Some(PromptItem::Token(t)) => Prompt::Tokens(vec![t]),
                    Some(PromptItem::Batch(b)) => Prompt::TokenBatches(vec![b]),
                };
                while let Some(item) = seq.next_element::<PromptItem>()? {
                    match (&mut prompt, item) {
                        (Prompt::Texts(v), PromptItem::Text(s)) => {
                            if v.len() == MAX_PROMPT_ITEMS {
                                return Err(too_many("prompt texts", MAX_PROMPT_ITEMS));
                            }
                            v.push(s)
                        }
                        (Prompt::Tokens(v), PromptItem::Token(t)) => {
                            if v.len() == v.capacity() && v.len() >= TOKENS_RESERVE_FROM {
                                let most = LIMITS.with(|l| l.get().max_tokens);
                                v.reserve_exact(most.saturating_sub(v.len()).max(v.len()));
                            }
                            v.push(t)
                        }
                        (Prompt::TokenBatches(v), PromptItem::Batch(b)) => {
                            if v.len() == MAX_PROMPT_ITEMS {
                                return Err(too_many("prompt batches", MAX_PROMPT_ITEMS));
                            }
                            v.push(b)
                        }
                        _ => return Err(invalid()),
                    }
                }
                Ok(prompt)
            }
        }
        d.deserialize_any(V)
    }
}
