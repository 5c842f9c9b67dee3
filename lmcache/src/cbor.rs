//! The small subset of canonical CBOR (RFC 8949) that vLLM's `sha256_cbor`
//! feeds to SHA-256 for LMCache's chunk hashes.
//!
//! vLLM hashes `cbor2.dumps(obj, canonical=True)`. For the objects LMCache
//! hashes (tuples of byte strings, unsigned ints, text, `None` and nested
//! tuples) canonical encoding just means *minimal-length heads*: an argument
//! below 24 lives in the initial byte, otherwise the shortest of 1, 2, 4 or 8
//! following big-endian bytes (`0x18`, `0x19`, `0x1a`, `0x1b`). Tuples and
//! lists both become definite-length arrays. Maps and floats, where canonical
//! ordering rules would matter, never occur and are not supported.

/// Major type 0: unsigned integer.
const MAJOR_UINT: u8 = 0;
/// Major type 2: byte string.
const MAJOR_BYTES: u8 = 2;
/// Major type 3: UTF-8 text string.
const MAJOR_TEXT: u8 = 3;
/// Major type 4: array.
const MAJOR_ARRAY: u8 = 4;
/// Simple value 22 (`null`, Python `None`).
const NULL: u8 = 0xf6;

/// A CBOR value of the supported subset, for building an object to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// Unsigned integer (Python non-negative `int` below 2^64).
    Uint(u64),
    /// Byte string (Python `bytes`).
    Bytes(&'a [u8]),
    /// Text string (Python `str`).
    Text(&'a str),
    /// Definite-length array (Python `tuple` or `list`).
    Array(Vec<Value<'a>>),
    /// `null` (Python `None`).
    Null,
}

impl Value<'_> {
    /// Canonical encoding of this value.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut enc = Encoder::new();
        enc.value(self);
        enc.into_inner()
    }
}

/// Streaming canonical-CBOR writer into a byte vector.
#[derive(Debug, Default, Clone)]
pub struct Encoder {
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// An encoder whose buffer can hold `capacity` bytes without growing.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            buf: Vec::with_capacity(capacity),
        }
    }

    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.buf
    }

    /// Forget what was written, keeping the allocation.
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// An initial byte plus the minimal-length argument.
    fn head(&mut self, major: u8, arg: u64) {
        let m = major << 5;
        if arg < 24 {
            self.buf.push(m | arg as u8);
        } else if arg <= u64::from(u8::MAX) {
            self.buf.push(m | 24);
            self.buf.push(arg as u8);
        } else if arg <= u64::from(u16::MAX) {
            self.buf.push(m | 25);
            self.buf.extend_from_slice(&(arg as u16).to_be_bytes());
        } else if arg <= u64::from(u32::MAX) {
            self.buf.push(m | 26);
            self.buf.extend_from_slice(&(arg as u32).to_be_bytes());
        } else {
            self.buf.push(m | 27);
            self.buf.extend_from_slice(&arg.to_be_bytes());
        }
    }

    pub fn uint(&mut self, n: u64) -> &mut Self {
        self.head(MAJOR_UINT, n);
        self
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.head(MAJOR_BYTES, b.len() as u64);
        self.buf.extend_from_slice(b);
        self
    }

    pub fn text(&mut self, s: &str) -> &mut Self {
        self.head(MAJOR_TEXT, s.len() as u64);
        self.buf.extend_from_slice(s.as_bytes());
        self
    }

    /// The head of an array of `len` items; the caller then writes the items.
    pub fn array_header(&mut self, len: usize) -> &mut Self {
        self.head(MAJOR_ARRAY, len as u64);
        self
    }

    pub fn null(&mut self) -> &mut Self {
        self.buf.push(NULL);
        self
    }

    /// An array of unsigned ints (a Python tuple of token ids).
    pub fn uint_array<I>(&mut self, items: I) -> &mut Self
    where
        I: IntoIterator,
        I::IntoIter: ExactSizeIterator,
        I::Item: Into<u64>,
    {
        let it = items.into_iter();
        self.array_header(it.len());
        for n in it {
            self.uint(n.into());
        }
        self
    }

    pub fn value(&mut self, v: &Value<'_>) -> &mut Self {
        match v {
            Value::Uint(n) => self.uint(*n),
            Value::Bytes(b) => self.bytes(b),
            Value::Text(s) => self.text(s),
            Value::Array(items) => {
                self.array_header(items.len());
                for item in items {
                    self.value(item);
                }
                self
            }
            Value::Null => self.null(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uint(n: u64) -> String {
        hex::encode(Value::Uint(n).to_vec())
    }

    #[test]
    fn uint_width_edges() {
        assert_eq!(uint(0), "00");
        assert_eq!(uint(1), "01");
        assert_eq!(uint(23), "17");
        assert_eq!(uint(24), "1818");
        assert_eq!(uint(255), "18ff");
        assert_eq!(uint(256), "190100");
        assert_eq!(uint(65535), "19ffff");
        assert_eq!(uint(65536), "1a00010000");
        assert_eq!(uint(128000), "1a0001f400");
        assert_eq!(uint(128255), "1a0001f4ff");
        assert_eq!(uint((1 << 32) - 1), "1affffffff");
        assert_eq!(uint(1 << 32), "1b0000000100000000");
        assert_eq!(uint(u64::MAX), "1bffffffffffffffff");
    }

    fn array_head(len: usize) -> String {
        let mut e = Encoder::new();
        e.array_header(len);
        hex::encode(e.as_bytes())
    }

    #[test]
    fn array_length_edges() {
        assert_eq!(array_head(0), "80");
        assert_eq!(array_head(3), "83");
        assert_eq!(array_head(23), "97");
        assert_eq!(array_head(24), "9818");
        assert_eq!(array_head(255), "98ff");
        assert_eq!(array_head(256), "990100");
        assert_eq!(array_head(65536), "9a00010000");
    }

    #[test]
    fn arrays_with_items() {
        for (len, head) in [
            (23usize, "97"),
            (24, "9818"),
            (255, "98ff"),
            (256, "990100"),
        ] {
            let mut e = Encoder::new();
            e.uint_array((0..len).map(|_| 7u32));
            let bytes = e.into_inner();
            assert!(hex::encode(&bytes).starts_with(head), "len {len}");
            assert_eq!(bytes.len(), head.len() / 2 + len, "len {len}");
            assert!(bytes[head.len() / 2..].iter().all(|&b| b == 0x07));
        }
    }

    #[test]
    fn strings_and_null() {
        assert_eq!(hex::encode(Value::Text("0").to_vec()), "6130");
        assert_eq!(hex::encode(Value::Text("").to_vec()), "60");
        assert_eq!(hex::encode(Value::Text("12345").to_vec()), "653132333435");
        assert_eq!(hex::encode(Value::Bytes(&[]).to_vec()), "40");
        assert_eq!(
            hex::encode(Value::Bytes(&[0xab; 32]).to_vec()),
            format!("5820{}", "ab".repeat(32))
        );
        let long = "x".repeat(300);
        assert!(hex::encode(Value::Text(&long).to_vec()).starts_with("79012c78"));
        assert_eq!(hex::encode(Value::Null.to_vec()), "f6");
        assert_eq!(hex::encode(Value::Array(vec![]).to_vec()), "80");
    }

    #[test]
    fn lmcache_chunk_tuple_layout() {
        // (prev digest, (128000, 1, 2, 3), None): the worked example of
        // the chain link of docs/lmcache-keys.md, "The hash chain".
        let prev = hex::decode("4e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e")
            .unwrap();
        let v = Value::Array(vec![
            Value::Bytes(&prev),
            Value::Array([128000u64, 1, 2, 3].map(Value::Uint).to_vec()),
            Value::Null,
        ]);
        assert_eq!(
            hex::encode(v.to_vec()),
            "8358204e1195df020de59e0d65a33a4279f1183e7ae4e5d980e309f8b55adff2e61c3e\
             841a0001f400010203f6"
        );
        // Streaming form gives the same bytes.
        let mut e = Encoder::new();
        e.array_header(3)
            .bytes(&prev)
            .uint_array([128000u32, 1, 2, 3])
            .null();
        assert_eq!(e.as_bytes(), v.to_vec().as_slice());
    }
}
