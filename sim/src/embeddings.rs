//! `/v1/embeddings` without a model: deterministic lexical vectors, so that anything
//! retrieving over sim embeddings (semantic caches, retrieval tests) sees cosine
//! similarity that follows word overlap.
//!
//! A text's vector is a signed hashed bag of its lowercase word unigrams and bigrams in
//! [`DIMS`] dimensions, L2-normalised. Words are runs of Unicode letters/digits. Each
//! feature adds ±1 to one dimension, both picked by a 64-bit hash of the feature. A text
//! with n ≥ 1 words has 2n − 1 features (an odd count, so some dimension is odd and the
//! vector is never zero); a text without words is one feature: itself.

use crate::api::ApiError;
use serde::Serialize;
use serde_json::Value;

/// Embedding dimensions.
pub const DIMS: usize = 256;

/// What the sim reads of an embeddings request.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingRequest {
    pub model: Option<String>,
    pub inputs: Vec<String>,
    /// `encoding_format: "base64"` (little-endian f32, what OpenAI's Python client asks
    /// for by default) instead of `"float"`.
    pub base64: bool,
}

/// Read an embeddings body: `{"model"?, "input": string | [string], "encoding_format"?,
/// "dimensions"?}`; other fields are ignored.
pub fn parse_request(body: &Value) -> Result<EmbeddingRequest, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    let model = crate::api::optional_model(body)?;
    let token_ids = || {
        ApiError::bad_request(
            "input: token id inputs are not supported by the cacheroute sim; send text",
        )
    };
    let inputs = match body.get("input") {
        None | Some(Value::Null) => return Err(ApiError::bad_request("input: Field required")),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::bad_request(
                "input: List should have at least 1 item",
            ))
        }
        Some(Value::Array(a)) => {
            let mut out = Vec::with_capacity(a.len());
            for (i, x) in a.iter().enumerate() {
                match x {
                    Value::String(s) => out.push(s.clone()),
                    Value::Number(_) | Value::Array(_) => return Err(token_ids()),
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "input[{i}]: Input should be a valid string"
                        )))
                    }
                }
            }
            out
        }
        Some(_) => {
            return Err(ApiError::bad_request(
                "input: Input should be a string or a list of strings",
            ))
        }
    };
    if let Some(i) = inputs.iter().position(String::is_empty) {
        let at = if inputs.len() == 1 {
            String::new()
        } else {
            format!("[{i}]")
        };
        return Err(ApiError::bad_request(format!(
            "input{at}: Input cannot be an empty string"
        )));
    }
    let base64 = match body.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) if s == "float" => false,
        Some(Value::String(s)) if s == "base64" => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                "encoding_format: Input should be 'float' or 'base64'",
            ))
        }
    };
    match body.get("dimensions") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(DIMS as u64) => {}
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "dimensions={v}: the cacheroute sim's embeddings have {DIMS} dimensions and \
                 cannot be shortened"
            )))
        }
    }
    Ok(EmbeddingRequest {
        model,
        inputs,
        base64,
    })
}

/// FNV-1a 64 then a SplitMix64 finaliser: FNV alone leaves the low bits (the dimension)
/// poorly mixed for short keys.
fn hash(tag: u8, parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    eat(tag);
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            // words never contain 0, so "a b" and "ab" stay apart
            eat(0);
        }
        p.bytes().for_each(&mut eat);
    }
    crate::filler::splitmix64(h)
}

/// The embedding of `text` (unit length).
pub fn embed(text: &str) -> Vec<f32> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let mut v = vec![0f64; DIMS];
    let mut add = |h: u64| {
        // top bit: the sign; the rest picks the dimension
        let sign = if h >> 63 == 1 { -1.0 } else { 1.0 };
        v[(h % DIMS as u64) as usize] += sign;
    };
    if words.is_empty() {
        add(hash(b'r', &[text]));
    }
    for w in &words {
        add(hash(b'u', &[w]));
    }
    for pair in words.windows(2) {
        add(hash(b'b', &[&pair[0], &pair[1]]));
    }
    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    v.iter().map(|x| (x / norm) as f32).collect()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard padded base64 of the little-endian f32 bytes (OpenAI's base64 format).
pub fn base64_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                out.push(B64[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One vector, as floats or base64.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Encoded {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
pub struct EmbeddingData {
    pub object: &'static str,
    pub index: usize,
    pub embedding: Encoded,
}

#[derive(Debug, Serialize)]
pub struct EmbeddingUsage {
    pub prompt_tokens: u64,
    pub total_tokens: u64,
    pub completion_tokens: u64,
    pub prompt_tokens_details: Option<()>,
}

/// The response body (serialised directly, so f32 values print short).
#[derive(Debug, Serialize)]
pub struct EmbeddingResponse {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub data: Vec<EmbeddingData>,
    pub usage: EmbeddingUsage,
}

impl EmbeddingResponse {
    /// Embed every input of `req`; `prompt_tokens` is the token count of all inputs.
    pub fn build(
        req: &EmbeddingRequest,
        id: String,
        created: u64,
        model: String,
        prompt_tokens: u64,
    ) -> EmbeddingResponse {
        let data = req
            .inputs
            .iter()
            .enumerate()
            .map(|(index, text)| {
                let v = embed(text);
                EmbeddingData {
                    object: "embedding",
                    index,
                    embedding: if req.base64 {
                        Encoded::Base64(base64_f32(&v))
                    } else {
                        Encoded::Float(v)
                    },
                }
            })
            .collect();
        EmbeddingResponse {
            id,
            object: "list",
            created,
            model,
            data,
            usage: EmbeddingUsage {
                prompt_tokens,
                total_tokens: prompt_tokens,
                completion_tokens: 0,
                prompt_tokens_details: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cos(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn vectors_are_unit_deterministic_and_lexical() {
        let a = embed("The KV cache of the knowledge block");
        assert_eq!(a.len(), DIMS);
        assert!((cos(&a, &a) - 1.0).abs() < 1e-5);
        assert_eq!(a, embed("The KV cache of the knowledge block"));
        // case and punctuation do not matter: same words
        assert_eq!(a, embed("the kv-cache, of THE knowledge block!"));
        let near = embed("the KV cache of a knowledge block");
        let far = embed("bananas grow on tropical plants");
        assert!(cos(&a, &near) > 0.5, "{}", cos(&a, &near));
        assert!(cos(&a, &near) > cos(&a, &far) + 0.3);
        assert!(cos(&a, &far).abs() < 0.4, "{}", cos(&a, &far));
        // word order shows through bigrams
        let swapped = embed("block knowledge the of cache KV the");
        assert!(cos(&a, &swapped) < 0.95 && cos(&a, &swapped) > 0.3);
        // unicode words, and texts without words, still give unit vectors
        for t in ["Ünïcödé 你好 мир", "!!!", " ", "🦀"] {
            let v = embed(t);
            assert!((cos(&v, &v) - 1.0).abs() < 1e-5, "{t:?}");
        }
        assert_eq!(embed("ÉTÉ"), embed("été"));
        assert_ne!(embed("!!!"), embed("???"));
    }

    #[test]
    fn base64_matches_the_le_bytes() {
        assert_eq!(base64_f32(&[]), "");
        // 1.0f32 = 00 00 80 3f
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
        // 1.0, -2.0 = 00 00 80 3f 00 00 00 c0
        assert_eq!(base64_f32(&[1.0, -2.0]), "AACAPwAAAMA=");
        assert_eq!(base64_f32(&[0.0; 3]), "AAAAAAAAAAAAAAAA");
    }

    #[test]
    fn parses_and_refuses() {
        let r = parse_request(&json!({"model": "m", "input": "hi"})).unwrap();
        assert_eq!(
            (r.model.as_deref(), r.inputs.len(), r.base64),
            (Some("m"), 1, false)
        );
        let r = parse_request(
            &json!({"input": ["a", "b"], "encoding_format": "base64", "dimensions": 256, "user": "u"}),
        )
        .unwrap();
        assert_eq!(
            (r.model, r.inputs, r.base64),
            (None, vec!["a".into(), "b".into()], true)
        );
        for (bad, want) in [
            (json!({"model": "m"}), "Field required"),
            (json!({"input": null}), "Field required"),
            (json!({"input": ""}), "empty"),
            (json!({"input": []}), "at least 1"),
            (json!({"input": ["a", ""]}), "input[1]"),
            (json!({"input": [1, 2]}), "token id"),
            (json!({"input": [[1, 2]]}), "token id"),
            (json!({"input": [{"x": 1}]}), "input[0]"),
            (json!({"input": 5}), "string"),
            (
                json!({"input": "a", "encoding_format": "int8"}),
                "encoding_format",
            ),
            (json!({"input": "a", "dimensions": 64}), "dimensions"),
            (json!({"input": "a", "model": 3}), "model"),
            (json!(["a"]), "JSON object"),
        ] {
            let e = parse_request(&bad).unwrap_err();
            assert_eq!(e.body()["error"]["code"], 400, "{bad}");
            assert!(e.message.contains(want), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn response_shape() {
        let req = parse_request(&json!({"input": ["one two", "three"]})).unwrap();
        let r = EmbeddingResponse::build(&req, "embd-1".into(), 7, "m".into(), 5);
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"][1]["index"], 1);
        assert_eq!(v["data"][0]["object"], "embedding");
        assert_eq!(v["data"][0]["embedding"].as_array().unwrap().len(), DIMS);
        assert_eq!(v["usage"]["prompt_tokens"], 5);
        assert_eq!(v["usage"]["total_tokens"], 5);
        // f32 values print in their short form
        let text = serde_json::to_string(&r).unwrap();
        assert!(!text.contains("0000000"), "{}", &text[..200]);
    }
}
