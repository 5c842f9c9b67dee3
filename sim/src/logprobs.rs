//! Log probabilities of the generated filler tokens, in vLLM's shapes: chat's
//! `{"content": [{token, logprob, bytes, top_logprobs}]}` and completions'
//! `{text_offset, token_logprobs, tokens, top_logprobs}`.
//!
//! The values are made up but plausible (negative, the sampled token the most
//! likely, alternatives less so) and deterministic per request seed, so that a
//! client parsing them sees what a real engine sends.

use crate::filler::{splitmix64, token_text};
use serde_json::{json, Map, Value};

/// Most top log probabilities a request may ask for (vLLM's default
/// `--max-logprobs`).
pub const MAX_TOP_LOGPROBS: u64 = 20;

/// The sampled token's log probability: in (-2.0, -0.01].
fn sampled(seed: u64, index: u64) -> f64 {
    let u = (splitmix64(seed ^ index.wrapping_mul(0x9e37_79b9)) % 10_000) as f64 / 10_000.0;
    -(0.01 + 1.99 * u * u)
}

/// The `k`-th alternative (1-based) to token `index`: its text and log probability,
/// below the sampled one and falling with `k`.
fn alternative(seed: u64, index: u64, k: u64, top: f64) -> (String, f64) {
    let text = token_text(splitmix64(seed.wrapping_add(k)), index);
    // k + [0, 0.9): strictly falling with k, whatever the jitter.
    let jitter = 0.9 * (splitmix64(seed ^ index ^ (k << 32)) % 1_000) as f64 / 1_000.0;
    (text, top - k as f64 - jitter)
}

fn bytes_of(s: &str) -> Value {
    Value::from(s.as_bytes().to_vec())
}

/// Chat: the `logprobs` of the tokens `first..first + texts.len()`.
pub fn chat(seed: u64, first: u64, texts: &[String], top: u64) -> Value {
    let content: Vec<Value> = texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let index = first + i as u64;
            let lp = sampled(seed, index);
            let mut tops = Vec::with_capacity(top as usize);
            if top > 0 {
                tops.push(json!({"token": text, "logprob": lp, "bytes": bytes_of(text)}));
            }
            for k in 1..top {
                let (t, l) = alternative(seed, index, k, lp);
                tops.push(json!({"token": t, "logprob": l, "bytes": bytes_of(&t)}));
            }
            json!({"token": text, "logprob": lp, "bytes": bytes_of(text), "top_logprobs": tops})
        })
        .collect();
    json!({ "content": content })
}

/// Completions: the `logprobs` of the tokens `first..first + texts.len()`, whose
/// text starts at byte `offset` of the choice's text.
pub fn completions(seed: u64, first: u64, texts: &[String], top: u64, offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(texts.len());
    let mut token_logprobs = Vec::with_capacity(texts.len());
    let mut top_logprobs = Vec::with_capacity(texts.len());
    let mut at = offset;
    for (i, text) in texts.iter().enumerate() {
        let index = first + i as u64;
        let lp = sampled(seed, index);
        text_offset.push(at);
        at += text.len();
        token_logprobs.push(lp);
        let mut tops = Map::new();
        // The sampled token is always listed, as vLLM does (top + 1 when it is not
        // among the top ones; here it is the most likely).
        tops.insert(text.clone(), Value::from(lp));
        for k in 1..top {
            let (t, l) = alternative(seed, index, k, lp);
            tops.entry(t).or_insert(Value::from(l));
        }
        top_logprobs.push(Value::Object(tops));
    }
    json!({
        "text_offset": text_offset,
        "token_logprobs": token_logprobs,
        "tokens": texts,
        "top_logprobs": top_logprobs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_logprobs_have_vllms_shape_and_sorted_plausible_values() {
        let texts = vec!["Hello".to_string(), " world".to_string()];
        let v = chat(7, 0, &texts, 3);
        let content = v["content"].as_array().unwrap();
        assert_eq!(content.len(), 2);
        for (entry, text) in content.iter().zip(&texts) {
            assert_eq!(entry["token"], text.as_str());
            let lp = entry["logprob"].as_f64().unwrap();
            assert!(lp < 0.0 && lp > -2.1, "{lp}");
            let tops = entry["top_logprobs"].as_array().unwrap();
            assert_eq!(tops.len(), 3);
            assert_eq!(tops[0]["logprob"].as_f64().unwrap(), lp);
            let lps: Vec<f64> = tops
                .iter()
                .map(|t| t["logprob"].as_f64().unwrap())
                .collect();
            assert!(lps.windows(2).all(|w| w[0] > w[1]), "{lps:?}");
            assert_eq!(
                entry["bytes"].as_array().unwrap().len(),
                text.len(),
                "bytes are the token's UTF-8"
            );
        }
        assert_eq!(v, chat(7, 0, &texts, 3), "deterministic");
    }

    #[test]
    fn completion_logprobs_offsets_follow_the_text() {
        let texts = vec!["a".to_string(), " bc".to_string(), " d".to_string()];
        let v = completions(1, 0, &texts, 2, 10);
        assert_eq!(v["text_offset"], json!([10, 11, 14]));
        assert_eq!(v["tokens"], json!(["a", " bc", " d"]));
        assert_eq!(v["token_logprobs"].as_array().unwrap().len(), 3);
        let tops = v["top_logprobs"].as_array().unwrap();
        assert!(tops[0].as_object().unwrap().contains_key("a"));
        assert!(!tops[0].as_object().unwrap().is_empty());
    }
}
