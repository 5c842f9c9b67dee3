//! The `x-cacheroute-*` headers: decisions shown to clients, and carried from a
//! scheduler gateway to a proxy gateway; and how a list of ids travels in one of them.

/// Gateway hops taken so far (request).
pub const HOPS: &str = "x-cacheroute-hops";
/// The chosen pool (request from a scheduler; response).
pub const POOL: &str = "x-cacheroute-pool";
/// The required knowledge ids, comma-separated and percent-encoded (request from a
/// scheduler; response).
pub const KNOWLEDGE: &str = "x-cacheroute-knowledge";
/// The KDN supplying the knowledge's KV, or `none` (request from a scheduler; response).
pub const KDN: &str = "x-cacheroute-kdn";
/// The client's injection preference (request from a scheduler).
pub const INJECTION_PREFERENCE: &str = "x-cacheroute-injection-preference";
/// How the knowledge went: `text`, `kv` or `none` (response).
pub const INJECTION: &str = "x-cacheroute-injection";
/// The instance that answered (response).
pub const INSTANCE: &str = "x-cacheroute-instance";
/// The KV handle of a KV-mode request (request to the engine).
pub const KV_HANDLE: &str = "x-cacheroute-kv-handle";
/// A scheduler gateway's proof that it is one (`[gateway] peer_token`), request to a
/// proxy gateway; without it a proxy ignores the decision headers above.
pub const PEER: &str = "x-cacheroute-peer";
/// The decision record's id, for `/debug/strategy` (response).
pub const DECISION: &str = "x-cacheroute-decision";

/// Whether a byte may stand for itself in an encoded id.
fn plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_.:/@+=~!$&'()*;".contains(&b)
}

/// Ids as one header value: `,`-separated, other bytes percent-encoded.
pub fn encode_ids<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for (i, id) in ids.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for &b in id.as_bytes() {
            if plain(b) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// The inverse of [`encode_ids`]; `None` if the value is malformed.
pub fn decode_ids(value: &str) -> Option<Vec<String>> {
    if value.trim().is_empty() {
        return Some(Vec::new());
    }
    value
        .split(',')
        .map(|part| {
            let bytes = part.trim().as_bytes();
            let mut out = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%' {
                    let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 3;
                } else {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
            String::from_utf8(out).ok().filter(|s| !s.is_empty())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_a_header_value() {
        let ids = ["kb-1", "a,b", "naïve 100%", "x/y"];
        let v = encode_ids(ids);
        assert!(v.is_ascii() && !v.contains(' '));
        assert_eq!(decode_ids(&v).unwrap(), ids);
        assert_eq!(decode_ids("").unwrap(), Vec::<String>::new());
        assert!(decode_ids("a,%zz").is_none());
        assert!(decode_ids("a,,b").is_none());
    }
}
