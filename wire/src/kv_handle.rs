//! The KV handle: a gateway's claim that a KDN job made the first `chunks` LMCache
//! chunks of a prompt resident in the instance's store (`tokens` = `chunks` × chunk
//! size). It travels as the header `x-cacheroute-kv-handle: job=<id>;chunks=<n>;tokens=<t>`
//! ([`KvHandle::to_header`], [`KvHandle::parse_header`]) or as
//! `kv_transfer_params.cacheroute_kv_handle: {"job", "chunks", "tokens"}` (serde).

use serde::{Deserialize, Serialize};
use std::fmt;

/// The `kv_transfer_params` key holding the JSON form.
pub const KV_TRANSFER_PARAMS_KEY: &str = "cacheroute_kv_handle";

/// A KV handle; every field is required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvHandle {
    /// The KDN job (or `prefill`-style marker) that made the chunks resident; not empty.
    pub job: String,
    pub chunks: u64,
    pub tokens: u64,
}

/// Why a KV handle does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvHandleError {
    /// A header part that is not `key=value`.
    NotKeyValue(String),
    /// A count that is not a non-negative integer.
    NotANumber { key: String, value: String },
    /// A key given twice.
    Repeated(String),
    /// A required key missing (or `job` empty).
    Missing(&'static str),
    /// The header value is not visible ASCII.
    NotAscii,
    /// The JSON form does not match [`KvHandle`].
    Json(String),
}

impl fmt::Display for KvHandleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvHandleError::NotKeyValue(p) => write!(f, "{p:?} is not key=value"),
            KvHandleError::NotANumber { key, value } => {
                write!(f, "{key}={value:?} is not a non-negative integer")
            }
            KvHandleError::Repeated(k) => write!(f, "{k} given twice"),
            KvHandleError::Missing(k) => write!(f, "no {k}"),
            KvHandleError::NotAscii => f.write_str("the header is not visible ASCII"),
            KvHandleError::Json(e) => write!(f, "{KV_TRANSFER_PARAMS_KEY}: {e}"),
        }
    }
}

impl std::error::Error for KvHandleError {}

impl KvHandle {
    /// The header form.
    pub fn to_header(&self) -> String {
        format!(
            "job={};chunks={};tokens={}",
            self.job, self.chunks, self.tokens
        )
    }

    /// Parse the header form. Unknown `key=value` parts are ignored (room for later
    /// fields); each known key must appear once.
    pub fn parse_header(value: &str) -> Result<KvHandle, KvHandleError> {
        let (mut job, mut chunks, mut tokens) = (None, None, None);
        for part in value.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| KvHandleError::NotKeyValue(part.to_string()))?;
            let (k, v) = (k.trim(), v.trim());
            let num = || {
                v.parse::<u64>().map_err(|_| KvHandleError::NotANumber {
                    key: k.to_string(),
                    value: v.to_string(),
                })
            };
            let slot_taken = match k {
                "job" => job.replace(v.to_string()).is_some(),
                "chunks" => chunks.replace(num()?).is_some(),
                "tokens" => tokens.replace(num()?).is_some(),
                _ => false,
            };
            if slot_taken {
                return Err(KvHandleError::Repeated(k.to_string()));
            }
        }
        KvHandle {
            job: job.ok_or(KvHandleError::Missing("job"))?,
            chunks: chunks.ok_or(KvHandleError::Missing("chunks"))?,
            tokens: tokens.ok_or(KvHandleError::Missing("tokens"))?,
        }
        .checked()
    }

    /// The handle, if its job is named (serde accepts an empty string).
    pub fn checked(self) -> Result<KvHandle, KvHandleError> {
        if self.job.is_empty() {
            return Err(KvHandleError::Missing("job"));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kv_handles_parse() {
        let h = KvHandle::parse_header("job=j-1;chunks=3;tokens=768").unwrap();
        assert_eq!(
            h,
            KvHandle {
                job: "j-1".into(),
                chunks: 3,
                tokens: 768
            }
        );
        // order, spaces, a trailing ';' and unknown keys are fine
        let h2 = KvHandle::parse_header(" tokens = 768 ; job=j-1; chunks=3; future=x;").unwrap();
        assert_eq!(h2, h);
        for bad in [
            "",
            "kh-1",
            "job=j;chunks=3",
            "job=;chunks=1;tokens=256",
            "job=j;chunks=-1;tokens=0",
            "job=j;chunks=1.5;tokens=384",
            "job=j;chunks=1;tokens=256;chunks=2",
            "job=j;chunks=x;tokens=256",
        ] {
            assert!(KvHandle::parse_header(bad).is_err(), "{bad:?}");
        }
        assert_eq!(KvHandle::parse_header(&h.to_header()).unwrap(), h);
    }
}
