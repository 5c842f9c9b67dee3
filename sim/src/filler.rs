//! Deterministic filler text for generated tokens.
//!
//! For generation, one word = one token: token `i` of a request is a word picked from a
//! fixed list by SplitMix64(seed + i), with a leading space for every token but the first.
//! The seed mixes the server's `--seed` with the FNV-1a hash of the prompt's token ids, so
//! the same request gets the same text, streamed or not, on every run.

use crate::tokenizer::fnv1a64;

const WORDS: &[&str] = &[
    "the",
    "model",
    "answer",
    "is",
    "based",
    "on",
    "retrieved",
    "knowledge",
    "and",
    "a",
    "cache",
    "of",
    "keys",
    "values",
    "that",
    "route",
    "requests",
    "to",
    "fast",
    "servers",
    "with",
    "low",
    "latency",
    "for",
    "every",
    "prompt",
    "token",
    "in",
    "context",
    "window",
    "we",
    "find",
    "this",
    "result",
    "shows",
    "clear",
    "evidence",
    "from",
    "data",
    "because",
    "prefill",
    "decode",
    "batch",
    "step",
    "time",
    "first",
    "output",
    "stream",
    "text",
    "block",
    "it",
    "can",
    "be",
    "more",
    "than",
    "one",
    "way",
    "to",
    "serve",
    "users",
    "well",
    "here",
    "as",
    "expected",
];

pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e3779b97f4a7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

/// The seed of a request: the server seed mixed with the prompt's token ids.
pub fn request_seed(server_seed: u64, prompt_ids: &[u32]) -> u64 {
    let mut bytes = Vec::with_capacity(prompt_ids.len() * 4);
    for id in prompt_ids {
        bytes.extend_from_slice(&id.to_le_bytes());
    }
    splitmix64(server_seed ^ fnv1a64(&bytes))
}

/// The text of generated token `index` (0-based).
pub fn token_text(seed: u64, index: u64) -> String {
    let w = WORDS[(splitmix64(seed.wrapping_add(index)) % WORDS.len() as u64) as usize];
    if index == 0 {
        w.to_string()
    } else {
        format!(" {w}")
    }
}

/// The whole text of `n` generated tokens.
pub fn text(seed: u64, n: u64) -> String {
    (0..n).map(|i| token_text(seed, i)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_one_word_per_token() {
        let s = request_seed(0, &[128000, 1, 2, 3]);
        assert_eq!(s, request_seed(0, &[128000, 1, 2, 3]));
        assert_ne!(s, request_seed(1, &[128000, 1, 2, 3]));
        let t = text(s, 16);
        assert_eq!(t.split(' ').count(), 16);
        assert!(!t.starts_with(' '));
        assert_eq!(t, text(s, 16));
        assert!(text(s, 20).starts_with(&t));
    }
}
