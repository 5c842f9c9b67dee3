//! The Redis value header: the `metadata` entry LMCache writes beside a chunk's
//! `kv_bytes` (memory format, dtype code, shape, length), and dtype sizes.

use super::KeyError;

/// LMCache's `MemoryFormat` numbers, as stored in [`RemoteMetadata::fmt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum MemoryFormat {
    Undefined = 0,
    /// `[2, layers, tokens, heads × head_dim]`: what naive serde stores for
    /// ordinary (non-MLA, non-layerwise) models.
    Kv2Ltd = 1,
    KvT2d = 2,
    Kv2Td = 3,
    Binary = 4,
    /// cachegen-serialised values.
    BinaryBuffer = 5,
    KvMlaFmt = 6,
}

/// LMCache's `DTYPE_TO_INT` code for a key dtype name (`None` if LMCache has
/// no code for it and cannot write a header for such a tensor).
pub fn metadata_dtype_code(dtype: &str) -> Option<i32> {
    Some(match dtype {
        "half" => 2, // torch.half is torch.float16; the writer emits 2
        "bfloat16" => 3,
        "float" => 4,
        "double" => 5,
        "uint8" => 6,
        "fp8_e4m3fn" | "fp8_e4m3" => 7,
        "fp8_e5m2" => 8,
        _ => return None,
    })
}

/// Bytes per element of a key dtype name.
pub fn dtype_itemsize(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "half" | "bfloat16" | "int16" => 2,
        "float" | "int32" => 4,
        "double" | "int64" => 8,
        "int8" | "uint8" | "bool" => 1,
        d if d.starts_with("fp8_") => 1,
        _ => return None,
    })
}

/// Length of the metadata header for one KV-cache group.
pub const METADATA_LEN: usize = 28;

/// LMCache's `RemoteMetadata`, the `<key>metadata` value: seven little-endian
/// int32 (`length, fmt, dtype, shape[0..4]`), 28 bytes for one KV-cache group
/// (0.3.12+ appends `dtype, shape` per extra group; readers ignore trailing
/// bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RemoteMetadata {
    /// Byte length of the `<key>kv_bytes` value.
    pub length: i32,
    /// [`MemoryFormat`] number.
    pub fmt: i32,
    /// [`metadata_dtype_code`].
    pub dtype: i32,
    pub shape: [i32; 4],
}

impl RemoteMetadata {
    /// Header of a naive-serde KV chunk: format KV_2LTD, shape
    /// `[2, num_layers, num_tokens, hidden_per_rank]` where `hidden_per_rank` =
    /// KV heads on this rank × head dim.
    pub fn kv_2ltd(
        dtype: &str,
        num_layers: usize,
        num_tokens: usize,
        hidden_per_rank: usize,
    ) -> Result<Self, KeyError> {
        let code = metadata_dtype_code(dtype).ok_or_else(|| {
            KeyError::InvalidParams(format!("LMCache has no metadata code for dtype {dtype:?}"))
        })?;
        let item = dtype_itemsize(dtype).unwrap_or(1);
        let too_big = || KeyError::InvalidParams("chunk too large for an int32 length".into());
        let length = [2, num_layers, num_tokens, hidden_per_rank, item]
            .iter()
            .try_fold(1usize, |acc, &x| acc.checked_mul(x))
            .and_then(|n| i32::try_from(n).ok())
            .ok_or_else(too_big)?;
        let dim = |x: usize| i32::try_from(x).map_err(|_| too_big());
        Ok(Self {
            length,
            fmt: MemoryFormat::Kv2Ltd as i32,
            dtype: code,
            shape: [2, dim(num_layers)?, dim(num_tokens)?, dim(hidden_per_rank)?],
        })
    }

    pub fn to_bytes(&self) -> [u8; METADATA_LEN] {
        let mut out = [0u8; METADATA_LEN];
        let fields = [
            self.length,
            self.fmt,
            self.dtype,
            self.shape[0],
            self.shape[1],
            self.shape[2],
            self.shape[3],
        ];
        for (i, v) in fields.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Parse the first 28 bytes (the first KV-cache group); `None` if shorter.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < METADATA_LEN {
            return None;
        }
        let f = |i: usize| i32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
        Some(Self {
            length: f(0),
            fmt: f(1),
            dtype: f(2),
            shape: [f(3), f(4), f(5), f(6)],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_header_matches_lmcache_bytes() {
        // LMCache's packing of a full 70B chunk, TP=1, bf16 (docs/lmcache-keys.md, "Values").
        let m = RemoteMetadata::kv_2ltd("bfloat16", 80, 256, 1024).unwrap();
        assert_eq!(m.length, 83_886_080);
        assert_eq!(
            hex::encode(m.to_bytes()),
            "00000005010000000300000002000000500000000001000000040000"
        );
        assert_eq!(RemoteMetadata::from_bytes(&m.to_bytes()), Some(m));
        let mut longer = m.to_bytes().to_vec();
        longer.extend_from_slice(&[9; 20]);
        assert_eq!(RemoteMetadata::from_bytes(&longer), Some(m));
        assert_eq!(RemoteMetadata::from_bytes(&longer[..27]), None);
        assert!(RemoteMetadata::kv_2ltd("int64", 1, 1, 1).is_err());
        assert!(RemoteMetadata::kv_2ltd("bfloat16", 80, 256, 1 << 20).is_err());
        assert_eq!(
            RemoteMetadata::kv_2ltd("half", 32, 4, 1024).unwrap().dtype,
            2
        );
    }
}
