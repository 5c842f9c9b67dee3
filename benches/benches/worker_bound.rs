//! The longest synchronous steps a single request can cost a gateway worker thread,
//! at the bounds a client can reach: the largest body parsed inline (64 KiB; larger
//! ones go to the blocking pool), the most knowledge ids (64), the longest retrieval
//! query (the last 4 KiB of the prompt) over 100,000 blocks, and the Llama-3
//! tokenization of a knowledge block's prefix (once per block, then cached).
//! Each step is timed per call and its p50, p99 and max printed: the bound to hold is
//! about a millisecond per request.
//!
//! `cargo bench -p cacheroute-benches --bench worker_bound`

use std::hint::black_box;
use std::time::{Duration, Instant};

use cacheroute_benches::corpus;
use cacheroute_decisions::bm25::Bm25Index;
use cacheroute_decisions::openai::{CompletionBody, Route};
use cacheroute_decisions::scheduler::{query_text, take_extensions, MAX_QUERY_BYTES};
use cacheroute_lmcache::tokenizer::Tokenizer;

/// Bodies up to this size are parsed on the worker thread (gateway's PARSE_INLINE_MAX).
const INLINE: usize = 64 << 10;

fn time(name: &str, calls: usize, mut f: impl FnMut()) {
    let mut t: Vec<Duration> = (0..calls)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed()
        })
        .collect();
    t.sort();
    let at = |q: f64| t[((t.len() - 1) as f64 * q) as usize];
    println!(
        "{name:<58} p50 {:>9.1?}  p99 {:>9.1?}  max {:>9.1?}",
        at(0.5),
        at(0.99),
        t[t.len() - 1]
    );
}

/// A chat body of `size` bytes: one long user message.
fn long_chat(size: usize) -> Vec<u8> {
    let words = "the quick brown fox jumps over the lazy dog ".repeat(size / 44);
    serde_json::to_vec(&serde_json::json!({
        "model": "llama3-8b", "max_tokens": 4,
        "messages": [{"role": "user", "content": &words[..size - 120]}]
    }))
    .expect("json")
}

/// A completions body of `size` bytes of small token ids (the most values per byte).
fn token_prompt(size: usize) -> Vec<u8> {
    let ids: Vec<u32> = (0..(size - 60) as u32 / 2).map(|i| i % 10).collect();
    serde_json::to_vec(&serde_json::json!({"model": "llama3-8b", "prompt": ids})).expect("json")
}

fn main() {
    let chat = long_chat(INLINE);
    let tokens = token_prompt(INLINE);
    assert!(chat.len() <= INLINE && tokens.len() <= INLINE);
    time("parse: 64 KiB chat body", 500, || {
        black_box(CompletionBody::parse(Route::Chat, &chat).expect("parses"));
    });
    time("parse: 64 KiB completions body of token ids", 500, || {
        black_box(CompletionBody::parse(Route::Completions, &tokens).expect("parses"));
    });

    let ids: Vec<String> = (0..64).map(|i| format!("knowledge-block-{i:04}")).collect();
    let with_ids = serde_json::to_vec(&serde_json::json!({
        "model": "llama3-8b", "max_tokens": 4, "knowledge_ids": ids,
        "messages": [{"role": "user", "content": "Why?"}]
    }))
    .expect("json");
    time("extensions: 64 knowledge_ids (parse + take)", 2_000, || {
        let mut b = CompletionBody::parse(Route::Chat, &with_ids).expect("parses");
        black_box(take_extensions(b.extra_mut()).expect("valid"));
    });

    let blocks = corpus(100_000, 42);
    let mut index = Bm25Index::new();
    for b in &blocks {
        index.insert(&b.id, &b.text);
    }
    let question: String = blocks
        .iter()
        .take(400)
        .map(|b| b.question.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let long = CompletionBody::parse(Route::Chat, &long_chat_with(&question)).expect("parses");
    let query = query_text(&long);
    assert!(query.len() <= MAX_QUERY_BYTES && query.len() > MAX_QUERY_BYTES / 2);
    time(
        "retrieval: 4 KiB query, BM25 top-3 over 100,000 blocks",
        200,
        || {
            black_box(index.search(&query, 3));
        },
    );

    let tok = Tokenizer::llama3().expect("embedded Llama-3 tokenizer");
    for kb in [6, 20] {
        let text: String = blocks
            .iter()
            .map(|b| b.text.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        let text = &text[..text
            .char_indices()
            .nth(kb << 10)
            .map_or(text.len(), |(i, _)| i)];
        time(
            &format!("tokenize: a {kb} KiB knowledge prefix, Llama-3 (once per block)"),
            50,
            || {
                black_box(tok.encode_with(text, false));
            },
        );
    }
}

fn long_chat_with(text: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": "llama3-8b", "max_tokens": 4,
        "messages": [{"role": "user", "content": text}]
    }))
    .expect("json")
}
