//! A bounded fuzz pass over the request-body parser (issue 13): random bytes,
//! random JSON shapes around the OpenAI fields and the CacheRoute extensions,
//! and mutations of valid bodies go through `CompletionBody::parse` and
//! `take_extensions`. Every input must end in a success or an OpenAI error
//! (4xx/5xx with a message and a code), never a panic. A fixed seed and case
//! count keep it deterministic and to a few seconds of `cargo test`.

use cacheroute_decisions::openai::{ApiError, CompletionBody, Route};
use cacheroute_decisions::scheduler::take_extensions;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use serde_json::{json, Value};

const CASES: u32 = 500;

fn runner(seed: u8) -> TestRunner {
    let config = Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]),
    )
}

fn assert_api_error(e: &ApiError, input: &[u8]) {
    assert!(
        (400..600).contains(&e.status),
        "status {} for {:?}",
        e.status,
        String::from_utf8_lossy(input)
    );
    assert!(!e.message.is_empty() && !e.code.is_empty());
    let v: Value = serde_json::from_slice(&e.to_json()).expect("error JSON");
    assert!(v["error"]["message"].is_string() && v["error"]["code"].is_string());
    assert!(v["error"]["type"].is_string());
}

/// Parse as both routes; on success take the extensions and serialise back,
/// and the result must parse again.
fn check(input: &[u8]) {
    for route in [Route::Chat, Route::Completions] {
        match CompletionBody::parse(route, input) {
            Ok(mut body) => {
                if let Err(e) = take_extensions(body.extra_mut()) {
                    assert_api_error(&e, input);
                    continue;
                }
                let back = body.to_json();
                assert!(
                    CompletionBody::parse(route, &back).is_ok(),
                    "re-parse of {:?}",
                    String::from_utf8_lossy(&back)
                );
            }
            Err(e) => assert_api_error(&e, input),
        }
    }
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u32>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "[a-z0-9 ]{0,12}".prop_map(Value::String),
        prop::sample::select(vec!["user", "system", "kv", "text", "auto", "m", ""])
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A body with the fields the parser and the extensions look at, each either
/// well-typed or anything at all.
fn body_like() -> impl Strategy<Value = Vec<u8>> {
    let field = |good: BoxedStrategy<Value>| prop_oneof![3 => good, 1 => any_json()];
    let model = field(Just(json!("llama3-8b")).boxed());
    let messages = field(
        prop::collection::vec(
            (
                prop::sample::select(vec!["user", "system", "assistant"]),
                any_json(),
            )
                .prop_map(|(role, content)| json!({"role": role, "content": content})),
            0..4,
        )
        .prop_map(Value::Array)
        .boxed(),
    );
    let prompt = field(
        prop_oneof![
            "[a-z ]{0,20}".prop_map(Value::from),
            prop::collection::vec(any::<u32>(), 0..8).prop_map(|v| json!(v)),
            prop::collection::vec(prop::collection::vec(any::<u32>(), 0..4), 0..4)
                .prop_map(|v| json!(v)),
        ]
        .boxed(),
    );
    let ids = field(
        prop::collection::vec("[a-z0-9-]{0,10}", 0..6)
            .prop_map(|v| json!(v))
            .boxed(),
    );
    let flag = field(any::<bool>().prop_map(Value::Bool).boxed());
    let injection = field(
        prop::sample::select(vec!["kv", "text", "auto", "other"])
            .prop_map(Value::from)
            .boxed(),
    );
    let extra = prop::collection::btree_map("[a-z_]{1,10}", any_json(), 0..4);
    let present = prop::collection::vec(any::<bool>(), 8);
    (
        model, messages, prompt, ids, flag, injection, extra, present,
    )
        .prop_map(
            |(model, messages, prompt, ids, rag, injection, extra, present)| {
                let mut map = serde_json::Map::new();
                let fields = [
                    ("model", model),
                    ("messages", messages),
                    ("prompt", prompt),
                    ("knowledge_ids", ids),
                    ("RAG", rag),
                    ("injection", injection),
                    ("stream", json!(present[7])),
                ];
                for (i, (k, v)) in fields.into_iter().enumerate() {
                    if present[i] {
                        map.insert(k.to_string(), v);
                    }
                }
                for (k, v) in extra {
                    map.insert(k, v);
                }
                serde_json::to_vec(&Value::Object(map)).expect("serialisable")
            },
        )
}

#[test]
fn random_bytes_never_panic() {
    runner(1)
        .run(&prop::collection::vec(any::<u8>(), 0..256), |input| {
            check(&input);
            Ok(())
        })
        .unwrap();
}

#[test]
fn random_bodies_are_a_success_or_an_openai_error() {
    runner(2)
        .run(&body_like(), |input| {
            check(&input);
            Ok(())
        })
        .unwrap();
}

/// A byte edit of a valid body: flip, insert, delete or truncate.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn apply(mut body: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = body.len().max(1);
        match *e {
            Edit::Set(i, b) if !body.is_empty() => body[i % n] = b,
            Edit::Insert(i, b) => body.insert(i % (body.len() + 1), b),
            Edit::Delete(i) if !body.is_empty() => {
                body.remove(i % n);
            }
            Edit::Truncate(i) => body.truncate(i % (body.len() + 1)),
            _ => {}
        }
    }
    body
}

#[test]
fn mutated_valid_bodies_never_panic() {
    let seeds: Vec<Vec<u8>> = [
        json!({"model": "m", "messages": [{"role": "user", "content": "hi", "name": "x"}],
               "knowledge_ids": ["a", "b"], "RAG": true, "injection": "kv",
               "stream": true, "stream_options": {"include_usage": true}, "logit_bias": {"5": 1}}),
        json!({"model": "m", "prompt": [[1, 2], [3]], "max_tokens": 4, "temperature": 0.5}),
        json!({"model": "m", "prompt": [1, 2, 3], "n": 2, "extra": [{"a": [1, null]}]}),
        json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}),
    ]
    .iter()
    .map(|v| serde_json::to_vec(v).expect("serialisable"))
    .collect();
    let byte = prop::sample::select(b"{}[]\",:0123456789-.eEtrufalsn \\x".to_vec());
    let edit = prop_oneof![
        (any::<usize>(), byte.clone()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), byte).prop_map(|(i, b)| Edit::Insert(i, b)),
        any::<usize>().prop_map(Edit::Delete),
        any::<usize>().prop_map(Edit::Truncate),
    ];
    let strategy = (
        prop::sample::select(seeds),
        prop::collection::vec(edit, 1..6),
    );
    runner(3)
        .run(&strategy, |(seed, edits)| {
            check(&apply(seed, &edits));
            Ok(())
        })
        .unwrap();
}
