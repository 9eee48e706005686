//! Bearer tokens for services that cannot hold a client certificate.
//!
//! A token is `fabric_<ID>_<SECRET>`: a 16-hex-digit id, by which the
//! coordinator finds it and which is safe to show and log, and a
//! 64-hex-digit random secret, shown once when the token is made and never
//! stored: the coordinator keeps only a keyed BLAKE3 hash of it, so a copy
//! of its state gives no usable token. The secret has 256 bits of entropy,
//! so a fast hash is enough (no password stretching needed).

use std::fmt;

/// The prefix of every token.
pub const PREFIX: &str = "fabric_";

/// A token as handed to its user.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// Public: names the token in listings and revocations.
    pub id: String,
    secret: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("id", &self.id)
            .field("secret", &"<secret>")
            .finish()
    }
}

/// A string that is not a token. Never carries the input: it may be a
/// secret typed in the wrong place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a fabric token (expected fabric_<16 hex digits>_<64 hex digits>)")]
pub struct MalformedToken;

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len
        && text
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Token {
    /// A new random token.
    pub fn generate() -> Self {
        Self {
            id: hex::encode(rand::random::<[u8; 8]>()),
            secret: hex::encode(rand::random::<[u8; 32]>()),
        }
    }

    /// Read a token as its user presents it.
    pub fn parse(text: &str) -> Result<Self, MalformedToken> {
        let rest = text.trim().strip_prefix(PREFIX).ok_or(MalformedToken)?;
        let (id, secret) = rest.split_once('_').ok_or(MalformedToken)?;
        if !is_hex(id, 16) || !is_hex(secret, 64) {
            return Err(MalformedToken);
        }
        Ok(Self {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// The whole token, to hand to its user once.
    pub fn reveal(&self) -> String {
        format!("{PREFIX}{}_{}", self.id, self.secret)
    }

    /// What the coordinator stores: a hash of the secret, keyed by the id
    /// (so two tokens never share a hash).
    pub fn secret_hash(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new_derive_key("fabric bearer token v1");
        hasher.update(self.id.as_bytes());
        hasher.update(b"\0");
        hasher.update(self.secret.as_bytes());
        *hasher.finalize().as_bytes()
    }

    /// Whether `stored` is this token's hash, compared in constant time.
    pub fn matches(&self, stored: &[u8]) -> bool {
        let Ok(stored) = <[u8; 32]>::try_from(stored) else {
            return false;
        };
        blake3::Hash::from_bytes(self.secret_hash()) == blake3::Hash::from_bytes(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_only_its_secret_matches_its_hash() {
        let token = Token::generate();
        let parsed = Token::parse(&token.reveal()).unwrap();
        assert_eq!(parsed, token);
        assert!(parsed.matches(&token.secret_hash()));
        let other = Token::generate();
        let forged = Token::parse(&format!("{PREFIX}{}_{}", token.id, other.secret)).unwrap();
        assert!(!forged.matches(&token.secret_hash()));
        assert!(!format!("{token:?}").contains(&token.secret));
    }

    #[test]
    fn malformed_tokens_are_refused_without_echo() {
        for text in [
            "",
            "fabric_",
            "fabric_0123_abcd",
            "Bearer fabric_0123456789abcdef_",
            &format!("fabric_0123456789ABCDEF_{}", "a".repeat(64)),
            &format!("fabric_0123456789abcdef_{}", "g".repeat(64)),
        ] {
            let error = Token::parse(text).unwrap_err();
            assert!(!error.to_string().contains("0123456789"), "{error}");
        }
    }
}
