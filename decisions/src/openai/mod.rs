//! The OpenAI request bodies the gateway understands, and OpenAI-shaped errors.
//!
//! Bodies are parsed into typed structs so that bad input is refused with a
//! precise message, while every field the gateway does not know is kept in
//! `extra` (in its original order) and serialised back unchanged.
//!
//! `types`: the request types; `body`: [`CompletionBody`], parsing and the
//! explanation of a refused body; `error`: [`ApiError`], the OpenAI error JSON;
//! `de`: the hand-written one-pass deserialisers and their bounds.

mod body;
mod de;
mod error;
mod types;

pub use body::CompletionBody;
pub use error::ApiError;
pub use types::{
    ChatCompletionRequest, ChatMessage, CommonParams, CompletionRequest, MessageContent, Prompt,
    Route, StreamOptions,
};
