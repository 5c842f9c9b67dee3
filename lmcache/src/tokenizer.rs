//! Token ids for prompts: Meta's Llama-3 tokenizer (embedded), any HuggingFace
//! `tokenizer.json`, or a deterministic approximation.
//!
//! **Which one** ([`TokenizerChoice`], the `--tokenizer` / `tokenizer =` settings of sim,
//! KDN, gateway and demo): `auto` (the default) gives a model whose name looks like
//! Llama-3 ([`looks_like_llama3`]) the exact Llama-3 tokenizer embedded in this crate
//! ([`Tokenizer::llama3`]: `conf/tokenizers/llama3/tokenizer.json`, parsed once per process
//! on first use and shared), and any other model the approximation; `approx` forces the
//! approximation; anything else is the path of a `tokenizer.json`.
//!
//! **The approximation** splits text into BPE-like pieces and hashes each piece to an id,
//! so that it yields token **ids** (not only counts) that are the same in every process
//! and on every machine:
//!
//! * Llama-3 special tokens written in the text (`<|begin_of_text|>` = 128000,
//!   `<|end_of_text|>` = 128001, `<|start_header_id|>` = 128006, `<|end_header_id|>` =
//!   128007, `<|eot_id|>` = 128009) map to their real ids;
//! * a run of letters/digits is a word; one space before a word (or a punctuation char)
//!   belongs to it, as in GPT-style BPE (`" hello"`); words longer than 4 characters are cut
//!   into pieces of at most 4 characters (the first piece carries the space);
//! * every other character (punctuation, symbols) is a piece of its own;
//! * other whitespace (newlines, extra spaces, tabs) is cut into pieces of at most 4 chars;
//! * id = FNV-1a 64 of the piece's UTF-8 bytes, modulo min(vocab_size, 128000) (so regular
//!   ids never collide with the special ids);
//! * [`Tokenizer::encode`] puts BOS (128000) first unless the text already starts with
//!   `<|begin_of_text|>`.
//!
//! On English technical text this gives about 3 characters per token (Llama-3's own
//! tokenizer: about 4), so prompt token counts run roughly 30% high.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Meta's Llama-3 `tokenizer.json` (Meta-Llama-3-8B-Instruct; provenance, sha256 and
/// licences in `conf/tokenizers/llama3/NOTICE.md`). Embedded so that every binary counts
/// Llama-3 tokens exactly with no file to ship beside it.
pub const LLAMA3_TOKENIZER_JSON: &[u8] =
    include_bytes!("../../conf/tokenizers/llama3/tokenizer.json");

/// Vocabulary size of Llama-3 (128,000 BPE tokens + 256 special tokens); the
/// approximation's default.
pub const LLAMA3_VOCAB_SIZE: u32 = 128_256;

/// `<|begin_of_text|>`.
pub const BOS_ID: u32 = 128000;

const SPECIALS: &[(&str, u32)] = &[
    ("<|begin_of_text|>", 128000),
    ("<|end_of_text|>", 128001),
    ("<|start_header_id|>", 128006),
    ("<|end_header_id|>", 128007),
    ("<|eot_id|>", 128009),
];

/// A chat message as the template sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Render messages with the Llama-3 chat template, with the generation prompt.
/// The template itself lives in [`cacheroute_decisions::prompt`], the one the
/// KDN's knowledge layout uses: KV hits depend on both rendering alike.
pub fn render_llama3_chat(messages: &[ChatMessage]) -> String {
    use cacheroute_decisions::prompt::{render_chat, ChatTemplate, Message};
    let messages: Vec<Message<'_>> = messages
        .iter()
        .map(|m| Message::new(&m.role, &m.content))
        .collect();
    render_chat(ChatTemplate::Llama3, &messages)
}

/// FNV-1a, 64 bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Whether a model name looks like a Llama-3 model (`llama3-8b`, `Llama-3.1-70B`,
/// `meta-llama/Meta-Llama-3-8B-Instruct`, `llama_3`…; case-insensitive): "llama", at most
/// one `-`, `_`, `.` or space, then "3" not followed by another digit (so `llama-30b`,
/// a Llama-1 size, is not one).
pub fn looks_like_llama3(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let b = lower.as_bytes();
    let mut from = 0;
    while let Some(i) = lower[from..].find("llama") {
        let mut j = from + i + 5;
        if matches!(b.get(j), Some(b'-' | b'_' | b'.' | b' ')) {
            j += 1;
        }
        if b.get(j) == Some(&b'3') && !b.get(j + 1).is_some_and(u8::is_ascii_digit) {
            return true;
        }
        from += i + 5;
    }
    false
}

/// Which tokenizer a model gets: the `--tokenizer` / `tokenizer =` setting.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum TokenizerChoice {
    /// Exact Llama-3 for a model whose name looks like Llama-3, else the approximation.
    #[default]
    Auto,
    /// The approximation, whatever the model.
    Approx,
    /// A HuggingFace `tokenizer.json`.
    File(PathBuf),
}

impl TokenizerChoice {
    /// `auto` (or empty), `approx`, or a path.
    pub fn parse(s: &str) -> TokenizerChoice {
        match s.trim() {
            "" | "auto" => TokenizerChoice::Auto,
            "approx" => TokenizerChoice::Approx,
            _ => TokenizerChoice::File(PathBuf::from(s)),
        }
    }

    /// The setting as written (`auto`, `approx` or the path).
    pub fn describe(&self) -> String {
        match self {
            TokenizerChoice::Auto => "auto".into(),
            TokenizerChoice::Approx => "approx".into(),
            TokenizerChoice::File(p) => p.display().to_string(),
        }
    }

    /// The tokenizer for a model known by `names` (served name, vLLM `--model`…): a file
    /// is loaded; `auto` gives the shared Llama-3 tokenizer when any name looks like
    /// Llama-3; otherwise the approximation with `vocab_size`.
    pub fn resolve(
        &self,
        names: &[&str],
        vocab_size: u32,
    ) -> Result<Arc<Tokenizer>, TokenizerError> {
        match self {
            TokenizerChoice::File(p) => Ok(Arc::new(Tokenizer::from_file(p)?)),
            TokenizerChoice::Auto if names.iter().any(|n| looks_like_llama3(n)) => {
                Tokenizer::llama3()
            }
            _ => Ok(Arc::new(Tokenizer::approx(vocab_size))),
        }
    }
}

impl std::str::FromStr for TokenizerChoice {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(TokenizerChoice::parse(s))
    }
}

impl std::fmt::Display for TokenizerChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl serde::Serialize for TokenizerChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.describe())
    }
}

impl<'de> serde::Deserialize<'de> for TokenizerChoice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(TokenizerChoice::parse(&s))
    }
}

/// Why a tokenizer could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizerError {
    /// The embedded Llama-3 `tokenizer.json` did not parse (a broken build).
    #[error("loading the embedded Llama-3 tokenizer: {0}")]
    Embedded(String),
    /// A `tokenizer.json` file could not be read or parsed.
    #[error("loading tokenizer {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
}

/// Text to token ids.
pub enum Tokenizer {
    /// A HuggingFace `tokenizer.json`.
    Hf(Box<tokenizers::Tokenizer>),
    /// The deterministic approximation described in the module docs.
    Approx { vocab_size: u32 },
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Hf(_) => f.write_str("Tokenizer::Hf"),
            Tokenizer::Approx { vocab_size } => write!(f, "Tokenizer::Approx({vocab_size})"),
        }
    }
}

impl Tokenizer {
    /// The approximation with the given vocabulary size (128256 for Llama-3).
    pub fn approx(vocab_size: u32) -> Tokenizer {
        Tokenizer::Approx {
            vocab_size: vocab_size.max(2),
        }
    }

    /// The embedded Llama-3 tokenizer, parsed on the first call and shared by every
    /// caller in the process (parsing the 9 MB JSON is the costly part).
    pub fn llama3() -> Result<Arc<Tokenizer>, TokenizerError> {
        // the error is kept as text: `tokenizers`' own error is neither Clone nor Sync
        static LLAMA3: OnceLock<Result<Arc<Tokenizer>, String>> = OnceLock::new();
        LLAMA3
            .get_or_init(|| {
                tokenizers::Tokenizer::from_bytes(LLAMA3_TOKENIZER_JSON)
                    .map(|t| Arc::new(Tokenizer::Hf(Box::new(t))))
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(TokenizerError::Embedded)
    }

    /// Whether this is a real tokenizer (not the approximation).
    pub fn is_exact(&self) -> bool {
        matches!(self, Tokenizer::Hf(_))
    }

    /// Load a HuggingFace `tokenizer.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer, TokenizerError> {
        let path = path.as_ref();
        let t = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::File {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        Ok(Tokenizer::Hf(Box::new(t)))
    }

    /// Encode a raw prompt, adding the model's special tokens (BOS first).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.encode_with(text, true)
    }

    /// Encode `text`; with `add_special_tokens` a BOS is added (HF: the tokenizer's
    /// post-processor; approximation: BOS unless the text already starts with it).
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Vec<u32> {
        match self {
            Tokenizer::Hf(t) => match t.encode(text, add_special_tokens) {
                Ok(enc) => enc.get_ids().to_vec(),
                Err(e) => {
                    tracing::warn!("tokenizer failed ({e}); using the approximation");
                    Tokenizer::approx(t.get_vocab_size(true) as u32)
                        .encode_with(text, add_special_tokens)
                }
            },
            Tokenizer::Approx { vocab_size } => {
                let mut out = Vec::with_capacity(text.len() / 3 + 2);
                if add_special_tokens && !text.starts_with(SPECIALS[0].0) {
                    out.push(BOS_ID);
                }
                approx_encode(text, *vocab_size, &mut out);
                out
            }
        }
    }

    /// Token ids of a chat prompt: the Llama-3 template (which already has BOS) encoded
    /// without adding special tokens, as vLLM does for chat.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Vec<u32> {
        self.encode_with(&render_llama3_chat(messages), false)
    }
}

fn approx_encode(text: &str, vocab_size: u32, out: &mut Vec<u32>) {
    let modulus = vocab_size.min(BOS_ID) as u64;
    let id = |piece: &str| (fnv1a64(piece.as_bytes()) % modulus) as u32;
    let mut rest = text;
    while !rest.is_empty() {
        if rest.starts_with("<|") {
            if let Some((s, sid)) = SPECIALS.iter().find(|(s, _)| rest.starts_with(s)) {
                out.push(*sid);
                rest = &rest[s.len()..];
                continue;
            }
        }
        let mut chars = rest.char_indices();
        let (_, c) = chars.next().expect("non-empty");
        // one leading space attaches to the following word or symbol
        let (lead, body_start) = if c == ' ' {
            match rest[1..].chars().next() {
                Some(n) if !n.is_whitespace() && !rest[1..].starts_with("<|") => (1, 1),
                _ => (0, 0),
            }
        } else {
            (0, 0)
        };
        let body = &rest[body_start..];
        let first = body.chars().next().expect("non-empty");
        let len = if first.is_alphanumeric() {
            body.find(|ch: char| !ch.is_alphanumeric())
                .unwrap_or(body.len())
        } else if first == ' ' {
            // a run of spaces; leave the last one to the word that follows
            let n = body.find(|ch: char| ch != ' ').unwrap_or(body.len());
            let followed_by_text = body[n..]
                .chars()
                .next()
                .is_some_and(|ch| !ch.is_whitespace());
            if n >= 2 && followed_by_text {
                n - 1
            } else {
                n
            }
        } else if first.is_whitespace() {
            // newlines, tabs...: a run of non-space whitespace
            body.find(|ch: char| !ch.is_whitespace() || ch == ' ')
                .unwrap_or(body.len())
        } else {
            first.len_utf8()
        };
        // cut the run into pieces of at most 4 chars; the first carries the space
        let run = &body[..len];
        let mut start = 0;
        let mut first_piece = true;
        while start < run.len() {
            let end = run[start..]
                .char_indices()
                .nth(4)
                .map(|(i, _)| start + i)
                .unwrap_or(run.len());
            let piece = if first_piece && lead == 1 {
                &rest[..body_start + end]
            } else {
                &run[start..end]
            };
            out.push(id(piece));
            first_piece = false;
            start = end;
        }
        rest = &rest[body_start + len..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn approx_is_deterministic_and_bpe_like() {
        let t = Tokenizer::approx(128256);
        let a = t.encode("Hello world, this is a test.");
        assert_eq!(a, t.encode("Hello world, this is a test."));
        assert_eq!(a[0], BOS_ID);
        // BOS, Hell, o, " worl", d, ",", " this", " is", " a", " test", "."
        assert_eq!(a.len(), 11, "{a:?}");
        assert!(a[1..].iter().all(|&i| i < BOS_ID));
        // A fixed vector: ids must never change across versions/processes (KV
        // registered by one build must be found by the next). Literal values,
        // written down once (FNV-1a 64 of each piece mod 128000, computed by an
        // independent script), not recomputed by the hash under test.
        assert_eq!(
            a,
            [128000, 19206, 67262, 94475, 21363, 105547, 87903, 74979, 101882, 75019, 1969]
        );
        // prefix stability: a longer text starts with the same ids
        let b = t.encode("Hello world, this is a test. And more.");
        assert_eq!(&b[..a.len()], &a[..]);
        assert!(t.encode("").len() == 1);
        assert_eq!(t.encode_with("", false), Vec::<u32>::new());
    }

    #[test]
    fn approx_handles_specials_whitespace_and_unicode() {
        let t = Tokenizer::approx(128256);
        let msgs = vec![ChatMessage {
            role: "user".into(),
            content: "Grüße\n\n  naïve café 😀!".into(),
        }];
        let ids = t.encode_chat(&msgs);
        assert_eq!(ids[0], 128000);
        assert_eq!(ids[1], 128006);
        assert!(ids.contains(&128007) && ids.contains(&128009));
        assert_ne!(*ids.last().unwrap(), 128007); // "\n\n" follows the header
        let n_specials = ids.iter().filter(|&&i| i >= 128000).count();
        assert_eq!(n_specials, 1 + 3 + 2);
        // a small vocab keeps ids in range (specials excepted)
        let small = Tokenizer::approx(1000);
        assert!(small
            .encode_with("abc def ghi", false)
            .iter()
            .all(|&i| i < 1000));
    }

    #[test]
    fn template_matches_llama3() {
        let s = render_llama3_chat(&[
            ChatMessage {
                role: "system".into(),
                content: "S".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "U".into(),
            },
        ]);
        assert_eq!(
            s,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }
}
