//! Chunk ids: the BLAKE3-256 of a chunk's plain bytes. Trees are chunks too,
//! so a tree id is the BLAKE3 of the tree's protobuf encoding.

use std::fmt;

/// The 32-byte BLAKE3 id of a chunk's plain bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

/// A byte string that is not a 32-byte id, or a string that is not 64 hex digits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a chunk id (32 bytes / 64 hex digits): {input}")]
pub struct BadChunkId {
    /// What was given, hex-encoded if it was bytes.
    pub input: String,
}

impl ChunkId {
    /// The id of `data`.
    pub fn of(data: &[u8]) -> Self {
        Self(*blake3::hash(data).as_bytes())
    }

    /// An id from its 32 raw bytes, as carried in protobuf `bytes` fields.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, BadChunkId> {
        let array: [u8; 32] = bytes.try_into().map_err(|_| BadChunkId {
            input: hex::encode(bytes),
        })?;
        Ok(Self(array))
    }

    /// An id from 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, BadChunkId> {
        let mut array = [0u8; 32];
        hex::decode_to_slice(text, &mut array).map_err(|_| BadChunkId {
            input: text.to_owned(),
        })?;
        Ok(Self(array))
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The raw bytes as a `Vec`, for protobuf fields.
    pub fn to_vec(&self) -> Vec<u8> {
        self.0.to_vec()
    }

    /// 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Whether `data` hashes to this id.
    pub fn matches(&self, data: &[u8]) -> bool {
        Self::of(data) == *self
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = ChunkId::of(b"hello");
        assert_eq!(ChunkId::from_hex(&id.to_hex()), Ok(id));
        assert_eq!(ChunkId::from_slice(&id.to_vec()), Ok(id));
        assert!(id.matches(b"hello"));
        assert!(!id.matches(b"hellO"));
    }

    #[test]
    fn bad_ids_are_named() {
        let err = ChunkId::from_slice(&[1, 2, 3]).unwrap_err();
        assert_eq!(err.input, "010203");
        assert!(
            ChunkId::from_hex("xyz")
                .unwrap_err()
                .to_string()
                .contains("xyz")
        );
    }
}
