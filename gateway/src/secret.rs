//! `Secret<T>`: a value that never shows itself in `Debug` or logs.

use std::fmt;

use serde::{Deserialize, Deserializer};

#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The one way to read the value; grep for it to audit secret use.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Secret)
    }
}

/// Compares without an early exit, so timing does not reveal a prefix match.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The prefix of every job token, so the API tells it from a registration
/// token or a JWT without trying each.
pub const JOB_TOKEN_PREFIX: &str = "cgj_";

/// A job token's SHA-256, the only form kept at rest (DESIGN §4). The token
/// is 256 random bits, so a fast hash is enough: nothing to brute-force.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash(pub [u8; 32]);

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

impl TokenHash {
    pub fn of(token: &str) -> TokenHash {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        TokenHash(out)
    }

    /// Whether `presented` is the token this is the hash of; the comparison
    /// of the hashes does not exit early.
    pub fn verify(&self, presented: &str) -> bool {
        constant_time_eq(&TokenHash::of(presented).0, &self.0)
    }

    pub fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(text: &str) -> Option<TokenHash> {
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(TokenHash(out))
    }
}

/// A new job token (shown once, to the creator) and its hash (stored).
pub fn new_job_token() -> (Secret<String>, TokenHash) {
    let bytes: [u8; 32] = rand::random();
    let token = format!(
        "{JOB_TOKEN_PREFIX}{}",
        base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, bytes)
    );
    let hash = TokenHash::of(&token);
    (Secret::new(token), hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_tokens_are_random_and_only_their_hash_verifies_them() {
        let (a, ha) = new_job_token();
        let (b, hb) = new_job_token();
        assert_ne!(a.expose(), b.expose());
        assert!(a.expose().starts_with(JOB_TOKEN_PREFIX));
        // 32 bytes of base64url without padding.
        assert_eq!(a.expose().len(), JOB_TOKEN_PREFIX.len() + 43);
        assert!(ha.verify(a.expose()));
        assert!(!ha.verify(b.expose()));
        assert!(!hb.verify(a.expose()));
        assert!(!ha.verify(""));
        // The hash is not the token, round-trips as hex, and never prints.
        let hex = ha.to_hex();
        assert!(!hex.contains(a.expose()));
        assert_eq!(TokenHash::from_hex(&hex), Some(ha));
        assert_eq!(TokenHash::from_hex("zz"), None);
        assert_eq!(format!("{ha:?}"), "TokenHash(..)");
        assert_eq!(format!("{a:?}"), "<secret>");
    }

    #[test]
    fn debug_hides_the_value() {
        assert_eq!(format!("{:?}", Secret::new("hunter2")), "<secret>");
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
