//! Random identifiers and secrets, their hashes, and constant-time comparison.
//!
//! Why these shapes:
//! - API tokens look like `cmt_<id>_<secret>`: the id (16 hex chars) is a lookup key that may
//!   appear in logs and events; the secret (32 random bytes, base64url) never does. Only
//!   SHA-256(secret) is stored: a 256-bit random secret needs no slow hash, and a stolen data
//!   dir then yields no usable API token.
//! - Device secrets are the HMAC keys of the tunnel handshake, so the control plane must keep
//!   them **raw** (an HMAC cannot be checked against a hash of its key). They live in the data
//!   dir, which is created 0700. The handshake's key id is derived exactly as 0.1.x derives it
//!   from a token: the first 24 chars of base64url(SHA-256(secret)).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

/// Prefix of every API token; lets secret scanners and operators recognise one.
pub const API_TOKEN_PREFIX: &str = "cmt_";

/// Fills `N` bytes from the OS RNG. The OS RNG failing is not recoverable for a server that
/// mints credentials, so this panics with an explanation rather than minting weak secrets.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    if let Err(e) = getrandom::getrandom(&mut buf) {
        panic!(
            "the operating system's random number generator failed ({e}); refusing to mint secrets"
        );
    }
    buf
}

/// 32 random bytes, base64url without padding (43 chars).
pub fn random_secret() -> String {
    URL_SAFE_NO_PAD.encode(random_bytes::<32>())
}

/// A fresh device id: `dev_` + 16 base64url chars (96 bits), the same shape 0.1.x daemons use,
/// so it always matches `^[A-Za-z0-9_-]{12,32}$`.
pub fn new_device_id() -> String {
    format!("dev_{}", URL_SAFE_NO_PAD.encode(random_bytes::<12>()))
}

/// A fresh API token id: 16 lowercase hex chars (64 bits). Hex keeps `_` out of the id so the
/// `cmt_<id>_<secret>` form splits unambiguously.
pub fn new_token_id() -> String {
    hex(&random_bytes::<8>())
}

/// SHA-256 of the secret's UTF-8 bytes.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// The handshake key id of a shared or device secret (0.1.x `deriveKeyId`).
pub fn key_id(secret: &str) -> String {
    let mut id = URL_SAFE_NO_PAD.encode(sha256(secret.as_bytes()));
    id.truncate(24);
    id
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Parses lowercase or uppercase hex into exactly 32 bytes.
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Compares two byte strings without an early exit, so timing does not reveal how many leading
/// bytes matched. Lengths are not secret here (both sides are fixed-size digests).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A freshly minted API token: what to store (`id`, `secret_sha256`) and what to show once.
pub struct MintedToken {
    pub id: String,
    pub secret_sha256: [u8; 32],
    /// The full bearer string `cmt_<id>_<secret>`; shown to the operator once, never stored.
    pub bearer: String,
}

/// Mints a new API token.
pub fn mint_api_token() -> MintedToken {
    let id = new_token_id();
    let secret = random_secret();
    MintedToken {
        secret_sha256: sha256(secret.as_bytes()),
        bearer: format!("{API_TOKEN_PREFIX}{id}_{secret}"),
        id,
    }
}

/// Splits `cmt_<id>_<secret>` into `(id, secret)`. The secret may itself contain `_`.
pub fn split_api_token(bearer: &str) -> Option<(&str, &str)> {
    let rest = bearer.strip_prefix(API_TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id_ok = id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit());
    (id_ok && !secret.is_empty() && secret.len() <= 128).then_some((id, secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_token_splits_back_and_hashes_match() {
        let t = mint_api_token();
        let (id, secret) = split_api_token(&t.bearer).expect("well-formed");
        assert_eq!(id, t.id);
        assert!(constant_time_eq(
            &sha256(secret.as_bytes()),
            &t.secret_sha256
        ));
    }

    #[test]
    fn rejects_malformed_tokens() {
        for bad in [
            "",
            "cmt_",
            "cmt_abc_def",
            "xyz_0123456789abcdef_s",
            "cmt_0123456789abcdef_",
        ] {
            assert!(split_api_token(bad).is_none(), "{bad}");
        }
        assert!(split_api_token("cmt_0123456789abcdef_a_b").is_some());
    }

    #[test]
    fn device_ids_match_the_protocol_pattern() {
        let id = new_device_id();
        assert!((12..=32).contains(&id.len()));
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        );
    }

    #[test]
    fn key_id_matches_the_0_1_50_vector_and_hex_round_trips() {
        // ../shared/protocol/vectors.json, handshake.key_id
        assert_eq!(key_id("test-token-0123456789"), "k7AZFe8hftnrd2suRzJwsAQY");
        let d = sha256(b"x");
        assert_eq!(parse_hex32(&hex(&d)), Some(d));
        assert_eq!(parse_hex32("zz"), None);
    }
}
