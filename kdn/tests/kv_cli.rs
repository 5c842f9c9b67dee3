//! `cacheroute kv keys`, run in-process.

use cacheroute_kdn::cli::{run_kv_keys, KvCommand, KvKeysArgs};
use clap::Parser;

#[derive(Parser)]
struct TestCli {
    #[command(subcommand)]
    kv: KvCommand,
}

fn args(extra: &[&str]) -> KvKeysArgs {
    let mut argv = vec![
        "kv",
        "keys",
        "--scheme",
        "lmcache-0.3.15",
        "--model",
        "llama3-70b",
        "--world-size",
        "1",
        "--worker-id",
        "0",
        "--chunk-size",
        "4",
        "--dtype",
        "bfloat16",
    ];
    argv.extend_from_slice(extra);
    match TestCli::try_parse_from(argv).unwrap().kv {
        KvCommand::Keys(a) => a,
    }
}

fn run(args: &KvKeysArgs, stdin: &str) -> anyhow::Result<String> {
    let mut out = Vec::new();
    run_kv_keys(args, stdin.as_bytes(), &mut out)?;
    Ok(String::from_utf8(out).unwrap())
}

const TINY9: &str = "[128000, 1, 2, 3, 300, 70000, 128255, 9, 10]";

#[test]
fn keys_match_lmcache_vector() {
    // lmcache/tests/data/lmcache_key_vectors.json: 0.3.13-0.3.15, sha256_cbor, seed "0", tiny9.
    let out = run(&args(&["--hash-seed", "0"]), TINY9).unwrap();
    assert_eq!(
        out,
        "llama3-70b@1@0@4215b2bef0fcba33d8e5b97cf3ef48ccf17e19e8f54fa865883ca067b17829fb@bfloat16\n\
         llama3-70b@1@0@ad5dd217210efbb23abca6aded72379508e3b0817a93ac8503a38b2b55cf75d0@bfloat16\n"
    );
    // save_unfull_chunk adds the 1-token tail; lmcache-0.5 renders 64-bit hashes.
    let mut a = args(&["--hash-seed", "0", "--save-unfull-chunk"]);
    a.scheme = "lmcache-0.5.6".parse().unwrap();
    let out = run(&a, TINY9).unwrap();
    assert_eq!(
        out,
        "llama3-70b@1@0@9088bb0c494b4952@bfloat16\n\
         llama3-70b@1@0@1820b0cfce36a5be@bfloat16\n\
         llama3-70b@1@0@db6875ad6774cd88@bfloat16\n"
    );
    // empty input: no keys
    assert_eq!(run(&args(&["--hash-seed", "0"]), "[]").unwrap(), "");
}

#[test]
fn clear_errors() {
    let e = run(&args(&[]), TINY9).unwrap_err().to_string();
    assert!(
        e.contains("set PYTHONHASHSEED for vLLM") && e.contains("--hash-seed"),
        "{e}"
    );

    let e = run(
        &args(&["--hash-seed", "0", "--hash-algorithm", "builtin"]),
        TINY9,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("pre_caching_hash_algorithm: sha256_cbor"), "{e}");

    for bad in [
        "",
        "  ",
        "[1, 2",
        "{\"a\": 1}",
        "[-1]",
        "[1.5]",
        "[4294967296]",
        "hello",
    ] {
        let e = format!("{:#}", run(&args(&["--hash-seed", "0"]), bad).unwrap_err());
        assert!(e.contains("JSON array of token ids"), "{bad:?}: {e}");
    }

    let e = TestCli::try_parse_from([
        "kv",
        "keys",
        "--scheme",
        "lmcache-0.3.12",
        "--model",
        "m",
        "--world-size",
        "1",
        "--worker-id",
        "0",
        "--chunk-size",
        "256",
        "--dtype",
        "bfloat16",
    ])
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains(">= 0.3.13"), "{e}");

    // --text without --tokenizer (and vice versa) is refused by clap ...
    assert!(TestCli::try_parse_from([
        "kv",
        "keys",
        "--scheme",
        "lmcache-0.4",
        "--model",
        "m",
        "--world-size",
        "1",
        "--worker-id",
        "0",
        "--chunk-size",
        "256",
        "--dtype",
        "bfloat16",
        "--text",
        "hi",
    ])
    .is_err());
    // ... and by run_kv_keys when built by hand.
    let mut a = args(&["--hash-seed", "0"]);
    a.text = Some("hi".into());
    let e = run(&a, "").unwrap_err().to_string();
    assert!(e.contains("--text needs --tokenizer"), "{e}");
    a.text = None;
    a.tokenizer = Some("tokenizer.json".into());
    let e = run(&a, "").unwrap_err().to_string();
    assert!(e.contains("--tokenizer needs --text"), "{e}");
}

#[test]
fn text_with_tokenizer() {
    // A tiny word-level tokenizer.json whose post-processor adds <bos>, like Llama-3's.
    let tokenizer_json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{
            "id": 128000, "content": "<bos>", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [
                {"SpecialToken": {"id": "<bos>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}
            ],
            "pair": [
                {"SpecialToken": {"id": "<bos>", "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [128000], "tokens": ["<bos>"]}}
        },
        "decoder": null,
        "model": {
            "type": "WordLevel",
            "vocab": {"[UNK]": 0, "hello": 1, "world": 2, "again": 3, "<bos>": 128000},
            "unk_token": "[UNK]"
        }
    });
    let path = std::env::temp_dir().join(format!("cacheroute-kdn-tok-{}.json", std::process::id()));
    std::fs::write(&path, tokenizer_json.to_string()).unwrap();
    let from_ids = run(
        &args(&["--hash-seed", "0", "--save-unfull-chunk"]),
        "[128000, 1, 2, 3, 1]",
    )
    .unwrap();
    assert_eq!(from_ids.lines().count(), 2);

    // BOS written in the text (a rendered chat template) ...
    let mut a = args(&["--hash-seed", "0", "--save-unfull-chunk"]);
    a.text = Some("<bos> hello world again hello".into());
    a.tokenizer = Some(path.clone());
    assert_eq!(run(&a, "ignored").unwrap(), from_ids);
    // ... or added by the tokenizer.
    a.text = Some("hello world again hello".into());
    a.add_special_tokens = true;
    assert_eq!(run(&a, "").unwrap(), from_ids);
    a.add_special_tokens = false;
    assert_ne!(run(&a, "").unwrap(), from_ids);

    a.tokenizer = Some(path.with_extension("missing"));
    let e = run(&a, "").unwrap_err().to_string();
    assert!(e.contains("cannot load tokenizer"), "{e}");
    let _ = std::fs::remove_file(&path);
}
