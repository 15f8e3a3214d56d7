//! API keys: generation (`at_live_` + 40 random base62 characters), the SHA-256 hash that is the
//! only thing stored, syntax checks, and a `Debug` that never prints more than the prefix.

use rand::Rng;
use sha2::{Digest, Sha256};

pub const KEY_PREFIX: &str = "at_live_";
/// Random characters in a generated key.
pub const RANDOM_CHARS: usize = 40;
/// Characters of a key shown to humans after creation.
pub const DISPLAY_PREFIX_CHARS: usize = KEY_PREFIX.len() + 4;
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A full API key as presented by a client or just created.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKey({}…)", self.display_prefix())
    }
}

impl ApiKey {
    /// A fresh key from the OS-seeded CSPRNG.
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        let random: String = (0..RANDOM_CHARS)
            .map(|_| BASE62[rng.random_range(0..BASE62.len())] as char)
            .collect();
        Self(format!("{KEY_PREFIX}{random}"))
    }

    /// Accepts only well-formed keys: the prefix, then 32 to 128 base62 characters.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix(KEY_PREFIX)?;
        if (32..=128).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
            Some(Self(text.to_string()))
        } else {
            None
        }
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Lower-case hex SHA-256 of the key: the only form that is stored.
    pub fn hash_hex(&self) -> String {
        hex::encode(Sha256::digest(self.0.as_bytes()))
    }

    pub fn display_prefix(&self) -> &str {
        self.0.get(..DISPLAY_PREFIX_CHARS).unwrap_or(KEY_PREFIX)
    }
}

/// A new random identifier such as `key_3kT9…` (not secret).
pub fn random_id(prefix: &str, chars: usize) -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(prefix.len() + chars);
    id.push_str(prefix);
    id.extend((0..chars).map(|_| BASE62[rng.random_range(0..BASE62.len())] as char));
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_hash_stably() {
        let k = ApiKey::generate();
        assert!(k.expose().starts_with("at_live_"));
        assert_eq!(k.expose().len(), KEY_PREFIX.len() + RANDOM_CHARS);
        let again = ApiKey::parse(k.expose()).expect("parses");
        assert_eq!(again.hash_hex(), k.hash_hex());
        assert_eq!(k.hash_hex().len(), 64);
        assert_ne!(ApiKey::generate().hash_hex(), k.hash_hex());
    }

    #[test]
    fn malformed_keys_are_refused() {
        assert!(ApiKey::parse("at_live_short").is_none());
        assert!(ApiKey::parse("sk_live_0123456789012345678901234567890123").is_none());
        assert!(ApiKey::parse("at_live_01234567890123456789012345678901-").is_none());
        assert!(ApiKey::parse("at_live_0123456789012345678901234567890ü").is_none());
    }

    #[test]
    fn debug_shows_only_the_prefix() {
        let k = ApiKey::generate();
        let shown = format!("{k:?}");
        assert!(!shown.contains(k.expose()));
        assert!(shown.contains(k.display_prefix()));
    }
}
