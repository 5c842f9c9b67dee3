//! Log probabilities in vLLM's shapes: the generated filler tokens' (chat's
//! `{"content": [{token, logprob, bytes, top_logprobs}]}`, completions'
//! `{text_offset, token_logprobs, tokens, top_logprobs}`) and the prompt tokens'
//! (`prompt_logprobs`: `[null, {"<id>": {logprob, rank, decoded_token}}, ...]`,
//! and completions' `echo` with `logprobs`, which lists the prompt's tokens before
//! the generated ones).
//!
//! The values are made up but plausible (negative, falling with rank; a generated
//! token is the most likely one, a prompt token usually is) and deterministic per
//! request seed, so that a client parsing them sees what a real engine sends.

use crate::api::ApiError;
use crate::filler::{splitmix64, token_text};
use crate::tokenizer::{Tokenizer, BOS_ID};
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

/// One token of completions' `logprobs`: its text, its log probability (None for
/// the first prompt token, which nothing predicts) and the top alternatives
/// (text, log probability), its own first.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub token: String,
    pub logprob: Option<f64>,
    pub top: Vec<(String, f64)>,
}

/// Completions: the `logprobs` of the generated tokens `first..first + texts.len()`.
pub fn completion_entries(seed: u64, first: u64, texts: &[String], top: u64) -> Vec<Entry> {
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let index = first + i as u64;
            let lp = sampled(seed, index);
            // The sampled token is always listed, as vLLM does (top + 1 when it is not
            // among the top ones; here it is the most likely).
            let mut tops = vec![(text.clone(), lp)];
            for k in 1..top {
                tops.push(alternative(seed, index, k, lp));
            }
            Entry {
                token: text.clone(),
                logprob: Some(lp),
                top: tops,
            }
        })
        .collect()
}

/// Completions' `logprobs` object of `entries`, the first starting at character
/// `offset` of the choice's text. Offsets count characters and run over the
/// tokens' texts, as vLLM's do (so a leading `<|begin_of_text|>`, which the echoed
/// text does not contain, moves the later ones by its length, as in vLLM).
pub fn completions_value(entries: &[Entry], offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(entries.len());
    let mut at = offset;
    for e in entries {
        text_offset.push(at);
        at += e.token.chars().count();
    }
    let top_logprobs: Vec<Value> = entries
        .iter()
        .map(|e| match e.logprob {
            None => Value::Null,
            Some(_) => {
                let mut tops = Map::new();
                for (t, l) in &e.top {
                    tops.entry(t.clone()).or_insert(Value::from(*l));
                }
                Value::Object(tops)
            }
        })
        .collect();
    json!({
        "text_offset": text_offset,
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "tokens": entries.iter().map(|e| e.token.as_str()).collect::<Vec<_>>(),
        "top_logprobs": top_logprobs,
    })
}

/// Completions: the `logprobs` of the generated tokens `first..first + texts.len()`,
/// whose text starts at character `offset` of the choice's text.
pub fn completions(seed: u64, first: u64, texts: &[String], top: u64, offset: usize) -> Value {
    completions_value(&completion_entries(seed, first, texts, top), offset)
}

/// Longest prompt whose log probabilities the sim returns: each prompt token costs
/// up to 21 decoded entries, so a client cannot make one answer grow past what
/// this bounds (about 16 MB of JSON at 20 per token).
pub const MAX_PROMPT_LOGPROB_TOKENS: usize = 16_384;

/// The prompt log probabilities of `ids` with `top` alternatives per position, the
/// texts decoded by `tok`: a 400 for a prompt over [`MAX_PROMPT_LOGPROB_TOKENS`]
/// or a sim on the approximate tokenizer (it cannot decode).
pub fn for_prompt(
    tok: &Tokenizer,
    seed: u64,
    ids: &[u32],
    top: u64,
) -> Result<PromptLogprobs, ApiError> {
    if ids.len() > MAX_PROMPT_LOGPROB_TOKENS {
        return Err(ApiError::bad_request(format!(
            "prompt log probabilities (`prompt_logprobs`, or `echo` with `logprobs`): the \
             cacheroute sim returns them for prompts of at most {MAX_PROMPT_LOGPROB_TOKENS} \
             tokens; this one has {}.",
            ids.len()
        )));
    }
    // alternatives among the ordinary tokens (below the special ones)
    let vocab = match tok {
        Tokenizer::Hf(t) => (t.get_vocab_size(false) as u32).min(BOS_ID),
        Tokenizer::Approx { vocab_size } => (*vocab_size).min(BOS_ID),
    };
    PromptLogprobs::new(seed, ids, top, vocab, |id| {
        crate::tokenize::decode(tok, std::slice::from_ref(&id))
    })
}

/// Salt that keeps a prompt position's values apart from a generated token's.
const PROMPT_SALT: u64 = 0x70f1_e5c0_ffee_0001;

/// One candidate at a prompt position: token id, its text, log probability, rank.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: u32,
    pub text: String,
    pub logprob: f64,
    pub rank: u64,
}

/// The prompt's log probabilities, as vLLM's `prompt_logprobs` has them: nothing
/// for the first token; for each later one the prompt token itself (first) and
/// the `top` most likely tokens at that position, deduplicated.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprobs {
    /// Each prompt token as vLLM decodes it alone (`<|begin_of_text|>` for BOS).
    pub tokens: Vec<String>,
    /// Positions 1.. of the prompt: the prompt token first, then the others of the
    /// top ones, most likely first.
    pub steps: Vec<Vec<Candidate>>,
}

impl PromptLogprobs {
    /// Made-up prompt log probabilities of `ids`, `top` alternatives per position,
    /// alternatives drawn from ids below `vocab`; `decode` gives a token's text.
    pub fn new<E>(
        seed: u64,
        ids: &[u32],
        top: u64,
        vocab: u32,
        mut decode: impl FnMut(u32) -> Result<String, E>,
    ) -> Result<PromptLogprobs, E> {
        let vocab = vocab.max(2);
        let tokens = ids.iter().map(|&id| decode(id)).collect::<Result<_, _>>()?;
        let mut steps = Vec::with_capacity(ids.len().saturating_sub(1));
        for (i, &id) in ids.iter().enumerate().skip(1) {
            let index = i as u64;
            let h = splitmix64(seed ^ PROMPT_SALT ^ index.wrapping_mul(0x9e37_79b9));
            // Most prompt tokens are the model's first guess, some its second or third.
            let own_rank = match h % 8 {
                0 => 3,
                1 | 2 => 2,
                _ => 1,
            };
            let best = sampled(seed ^ PROMPT_SALT, index);
            // Strictly falling with rank: each step down is at least 0.1.
            let value = |r: u64| {
                let jitter = 0.9 * (splitmix64(h ^ (r << 32)) % 1_000) as f64 / 1_000.0;
                if r == 1 {
                    best
                } else {
                    best - (r - 1) as f64 - jitter
                }
            };
            let mut used = vec![id];
            let mut step = vec![Candidate {
                id,
                text: String::new(),
                logprob: value(own_rank),
                rank: own_rank,
            }];
            for r in (1..=top).filter(|&r| r != own_rank) {
                let mut alt = (splitmix64(h.wrapping_add(r)) % vocab as u64) as u32;
                while used.contains(&alt) {
                    alt = (alt + 1) % vocab;
                }
                used.push(alt);
                step.push(Candidate {
                    id: alt,
                    text: String::new(),
                    logprob: value(r),
                    rank: r,
                });
            }
            // the prompt token first, then the others by rank
            step[1..].sort_by_key(|c| c.rank);
            for c in &mut step {
                c.text = decode(c.id)?;
            }
            steps.push(step);
        }
        Ok(PromptLogprobs { tokens, steps })
    }

    /// vLLM's `prompt_logprobs` field.
    pub fn vllm(&self) -> Value {
        let mut out = Vec::with_capacity(self.tokens.len());
        if !self.tokens.is_empty() {
            out.push(Value::Null);
        }
        for step in &self.steps {
            let mut m = Map::new();
            for c in step {
                m.insert(
                    c.id.to_string(),
                    json!({"logprob": c.logprob, "rank": c.rank, "decoded_token": c.text}),
                );
            }
            out.push(Value::Object(m));
        }
        Value::Array(out)
    }

    /// The prompt's entries of completions' `logprobs` with `echo`: the first token
    /// with no log probability, then each with itself and up to `top` more
    /// alternatives (vLLM lists `logprobs + 1`).
    pub fn entries(&self, top: u64) -> Vec<Entry> {
        let mut out = Vec::with_capacity(self.tokens.len());
        if let Some(first) = self.tokens.first() {
            out.push(Entry {
                token: first.clone(),
                logprob: None,
                top: Vec::new(),
            });
        }
        for (token, step) in self.tokens.iter().skip(1).zip(&self.steps) {
            out.push(Entry {
                token: token.clone(),
                logprob: Some(step[0].logprob),
                top: step
                    .iter()
                    .take(top as usize + 1)
                    .map(|c| (c.text.clone(), c.logprob))
                    .collect(),
            });
        }
        out
    }
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

    fn decode(id: u32) -> Result<String, ApiError> {
        Ok(match id {
            128000 => "<|begin_of_text|>".to_string(),
            1 => "Ünï".to_string(),
            2 => " côde".to_string(),
            n => format!(" t{n}"),
        })
    }

    #[test]
    fn prompt_logprobs_have_vllms_shape() {
        let ids = [128000, 1, 2, 3, 4, 5, 6, 7, 8, 9];
        let p = PromptLogprobs::new(9, &ids, 3, 1000, decode).unwrap();
        assert_eq!(p.tokens.len(), ids.len());
        assert_eq!(p.tokens[0], "<|begin_of_text|>");
        assert_eq!(
            p.steps.len(),
            ids.len() - 1,
            "nothing predicts the first token"
        );
        let mut ranks = std::collections::BTreeSet::new();
        for (step, &id) in p.steps.iter().zip(&ids[1..]) {
            assert_eq!(step[0].id, id, "the prompt token comes first");
            ranks.insert(step[0].rank);
            // 3 top ones, plus the prompt token when it is not among them
            let expect = if step[0].rank <= 3 { 3 } else { 4 };
            assert_eq!(step.len(), expect);
            let mut by_rank = step.clone();
            by_rank.sort_by_key(|c| c.rank);
            let ranks_seen: Vec<u64> = by_rank.iter().map(|c| c.rank).collect();
            assert_eq!(ranks_seen, (1..=expect as u64).collect::<Vec<_>>());
            for w in by_rank.windows(2) {
                assert!(w[0].logprob > w[1].logprob, "{w:?}");
            }
            assert!(by_rank[0].logprob < 0.0);
            let distinct: std::collections::BTreeSet<u32> = step.iter().map(|c| c.id).collect();
            assert_eq!(distinct.len(), step.len(), "no token twice");
            assert!(step.iter().all(|c| c.text == decode(c.id).unwrap()));
        }
        assert!(
            ranks.len() > 1,
            "some prompt tokens are not the first guess: {ranks:?}"
        );

        let v = p.vllm();
        let arr = v.as_array().unwrap();
        assert_eq!(arr.len(), ids.len());
        assert!(arr[0].is_null());
        let second = arr[1].as_object().unwrap();
        let own = &second["1"];
        assert_eq!(own["decoded_token"], "Ünï");
        assert_eq!(own["rank"], json!(p.steps[0][0].rank));
        assert_eq!(own["logprob"], json!(p.steps[0][0].logprob));
        assert_eq!(
            p,
            PromptLogprobs::new(9, &ids, 3, 1000, decode).unwrap(),
            "deterministic"
        );
    }

    #[test]
    fn echo_entries_lead_with_the_prompt_and_offsets_count_characters() {
        let ids = [128000, 1, 2];
        let p = PromptLogprobs::new(3, &ids, 1, 1000, decode).unwrap();
        let mut all = p.entries(1);
        assert_eq!(all[0].logprob, None);
        assert!(all[0].top.is_empty());
        for (e, step) in all[1..].iter().zip(&p.steps) {
            assert_eq!(e.logprob, Some(step[0].logprob));
            assert_eq!(e.top[0].0, e.token, "the token itself first");
            assert!(e.top.len() <= 2, "logprobs + 1 at most");
        }
        all.extend(completion_entries(3, 0, &["x".to_string()], 1));
        let v = completions_value(&all, 0);
        assert_eq!(
            v["tokens"],
            json!(["<|begin_of_text|>", "Ünï", " côde", "x"])
        );
        // characters, not bytes: 17, then 3 ("Ünï" is 5 bytes), then 5
        assert_eq!(v["text_offset"], json!([0, 17, 20, 25]));
        assert_eq!(v["token_logprobs"][0], Value::Null);
        assert_eq!(v["top_logprobs"][0], Value::Null);
        assert!(v["top_logprobs"][3].as_object().unwrap().contains_key("x"));
    }

    #[test]
    fn prompt_logprobs_need_a_decoder_and_a_bounded_prompt() {
        let long = vec![5u32; MAX_PROMPT_LOGPROB_TOKENS + 1];
        let tok = Tokenizer::approx(1000);
        let e = for_prompt(&tok, 1, &long, 1).unwrap_err();
        assert!(e.message.contains("at most 16384 tokens"), "{}", e.message);
        let e = for_prompt(&tok, 1, &[128000, 5], 1).unwrap_err();
        assert!(e.message.contains("approximate tokenizer"), "{}", e.message);
        let exact = crate::tokenizer::Tokenizer::llama3().unwrap();
        let ids = exact.encode("Hello world");
        let p = for_prompt(&exact, 1, &ids, 2).unwrap();
        assert_eq!(p.tokens, ["<|begin_of_text|>", "Hello", " world"]);
        assert!(p
            .steps
            .iter()
            .flatten()
            .all(|c| c.id < BOS_ID || ids.contains(&c.id)));
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
