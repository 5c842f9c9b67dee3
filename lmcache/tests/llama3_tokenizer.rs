//! The embedded Llama-3 tokenizer gives Meta's exact ids, and `auto` picks it for
//! Llama-3 model names only.
//!
//! `data/llama3_expected_ids.json`: 248 strings (ASCII, contractions, numbers, whitespace
//! runs, 20+ scripts, CJK, emoji, code, special-token text) with the ids that HF
//! `tokenizers`, Meta's tiktoken reference and `llama3-tokenizer-js` agreed on, encoded
//! without special tokens (see `conf/tokenizers/llama3/NOTICE.md`).

use cacheroute_lmcache::tokenizer::{
    looks_like_llama3, ChatMessage, Tokenizer, TokenizerChoice, BOS_ID, LLAMA3_VOCAB_SIZE,
};

#[test]
fn embedded_llama3_matches_every_expected_id() {
    let doc: serde_json::Value =
        serde_json::from_str(include_str!("data/llama3_expected_ids.json")).unwrap();
    assert_eq!(doc["add_special_tokens"], false);
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 248);
    let tok = Tokenizer::llama3().unwrap();
    assert!(tok.is_exact());
    let mut bad = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode_with(text, false);
        if got != want {
            bad.push(format!("case {i} {text:?}: got {got:?}, want {want:?}"));
        }
        // with special tokens: exactly BOS in front
        let with_bos = tok.encode(text);
        assert_eq!(with_bos.first(), Some(&BOS_ID), "case {i}");
        assert_eq!(&with_bos[1..], &want[..], "case {i}");
    }
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn the_embedded_tokenizer_is_loaded_once() {
    let a = Tokenizer::llama3().unwrap();
    let b = Tokenizer::llama3().unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
}

#[test]
fn auto_is_exact_for_llama3_names_and_approximate_otherwise() {
    let auto = TokenizerChoice::Auto;
    let llama = auto.resolve(&["llama3-8b"], LLAMA3_VOCAB_SIZE).unwrap();
    assert!(llama.is_exact());
    // Meta's ids: "Hello" 9906, " world" 1917, "!" 0; BOS once, only when asked
    assert_eq!(llama.encode_with("Hello world", false), vec![9906, 1917]);
    assert_eq!(llama.encode("Hello world"), vec![BOS_ID, 9906, 1917]);
    assert_eq!(
        llama.encode_with("Hello world!", false),
        vec![9906, 1917, 0]
    );
    // a chat: the template writes BOS; it must not be doubled
    let chat = llama.encode_chat(&[ChatMessage {
        role: "user".into(),
        content: "Hello".into(),
    }]);
    assert_eq!(
        chat,
        vec![128000, 128006, 882, 128007, 271, 9906, 128009, 128006, 78191, 128007, 271]
    );

    let other = auto.resolve(&["qwen2.5-7b"], 1000).unwrap();
    assert!(!other.is_exact());
    assert!(other
        .encode_with("Hello world", false)
        .iter()
        .all(|&i| i < 1000));
    // any of a model's names counts (served name, vLLM --model)
    let by_path = auto
        .resolve(&["served", "/models/Meta-Llama-3.1-70B-Instruct"], 1)
        .unwrap();
    assert!(by_path.is_exact());
    // on request the approximation, even for Llama-3
    let approx = TokenizerChoice::parse("approx")
        .resolve(&["llama3-8b"], LLAMA3_VOCAB_SIZE)
        .unwrap();
    assert!(!approx.is_exact());
    assert_eq!(
        approx.encode_with("Hello world", false),
        Tokenizer::approx(LLAMA3_VOCAB_SIZE).encode_with("Hello world", false)
    );
    // a missing file is an error, not a fallback
    let e = TokenizerChoice::parse("/nonexistent/tokenizer.json")
        .resolve(&["llama3-8b"], LLAMA3_VOCAB_SIZE)
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("/nonexistent/tokenizer.json"),
        "{e:#}"
    );
}

#[test]
fn llama3_names() {
    for yes in [
        "llama3",
        "llama3-8b",
        "Llama-3",
        "LLAMA-3.1-8B",
        "Llama-3.2-1B-Instruct",
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "llama_3_70b",
        "llama3.3",
        "my llama 3",
    ] {
        assert!(looks_like_llama3(yes), "{yes}");
    }
    for no in [
        "",
        "llama",
        "llama-2-7b",
        "llama-30b",
        "Llama-13b",
        "llama4-scout",
        "qwen2.5-7b",
        "mistral-7b",
        "llama--3",
    ] {
        assert!(!looks_like_llama3(no), "{no}");
    }
    assert_eq!(TokenizerChoice::parse(""), TokenizerChoice::Auto);
    assert_eq!(TokenizerChoice::parse("auto"), TokenizerChoice::Auto);
    assert_eq!(TokenizerChoice::parse("approx"), TokenizerChoice::Approx);
    assert_eq!(
        TokenizerChoice::parse("t.json"),
        TokenizerChoice::File("t.json".into())
    );
}
