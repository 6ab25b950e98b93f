//! JIT credentials: the signed token format and the `j` object the control plane attaches to a
//! session start (`si`).
//!
//! A JIT credential is a short-lived bearer value handed to the OpenCode process of one session
//! through its environment; the daemon terminates the session when it expires. 0.1.50 mints the
//! token as `jit.<b64url(payload JSON)>.<b64url(HMAC-SHA256(key, b64url(payload JSON)))>` with
//! the payload keys in the fixed order `d, s, sc, exp, n` (control-plane reference §7.1), and
//! nothing ever verifies it. We produce byte-identical tokens (so a 0.1.50 peer or tool sees the
//! same thing) and add [`verify`], so that a service receiving the token can check it.
//!
//! The `j` object is checked with the 0.1.50 daemon's limits (daemon reference §8.1–8.2), because
//! a `j` outside them makes a 0.1.50 daemon drop the whole `si` silently. Our own TTL policy is
//! stricter than 0.1.50's silent clamping: [`expiry_for_ttl`] rejects a TTL outside
//! [`MIN_TTL_MS`]..=[`MAX_TTL_MS`].
//!
//! Sans-io: the caller passes `now_ms` and the random nonce / ref strings.

use std::collections::BTreeSet;
use std::fmt;
use std::ops::RangeInclusive;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::canonical::write_js_string;
use crate::handshake::{mac, verify_mac};

/// Every JIT token starts with this.
pub const TOKEN_PREFIX: &str = "jit.";
/// Scope used when the operator gives none.
pub const DEFAULT_SCOPE: &str = "opencode:session";
/// Environment variable that receives the token when `n` is absent.
pub const DEFAULT_ENV_VAR: &str = "OPENCODE_SESSION_TOKEN";
/// Environment variable that receives the expiry (ms, decimal).
pub const ENV_EXPIRES_AT: &str = "OPENCODE_JIT_TOKEN_EXPIRES_AT";
/// Environment variable that receives the scope.
pub const ENV_SCOPE: &str = "OPENCODE_JIT_SCOPE";
/// Shortest TTL we mint (and the remaining lifetime a daemon requires at session start).
pub const MIN_TTL_MS: u64 = 15_000;
/// Longest TTL we mint or accept.
pub const MAX_TTL_MS: u64 = 3_600_000;
/// How far in the past `e` may be for a daemon to still parse the `si` (0.1.50: 10 s).
pub const PAST_TOLERANCE_MS: u64 = 10_000;
/// Token length accepted in `j.t` (JavaScript characters).
pub const TOKEN_LEN: RangeInclusive<usize> = 16..=2048;
/// Scope length accepted in `j.s`.
pub const SCOPE_LEN: RangeInclusive<usize> = 1..=128;
/// Maximum number of extra env pairs in `j.v`.
pub const MAX_ENV_PAIRS: usize = 8;
/// Maximum UTF-8 length of one extra env value.
pub const MAX_ENV_VALUE_BYTES: usize = 2048;

// ---------------------------------------------------------------------------------------------
// Token

/// What a JIT token says.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JitClaims {
    /// `d`: device id.
    #[serde(rename = "d")]
    pub device_id: String,
    /// `s`: session id.
    #[serde(rename = "s")]
    pub session_id: String,
    /// `sc`: scope.
    #[serde(rename = "sc")]
    pub scope: String,
    /// `exp`: expiry, Unix milliseconds.
    #[serde(rename = "exp")]
    pub expires_at_ms: u64,
    /// `n`: random nonce (0.1.50: 12 chars), making each token unique.
    #[serde(rename = "n")]
    pub nonce: String,
}

/// Why a JIT token was not minted or not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JitError {
    /// Minting or verifying with an empty key would make the signature meaningless.
    #[error("JIT signing key is empty")]
    EmptyKey,
    /// The token is not `jit.<payload>.<signature>` with base64url parts.
    #[error("malformed JIT token: {0}")]
    Malformed(&'static str),
    /// The signature does not match the payload under this key.
    #[error("JIT token signature does not match")]
    BadSignature,
    /// The token expired.
    #[error("JIT token expired at {expires_at_ms}, now {now_ms}")]
    Expired {
        /// `exp` of the token.
        expires_at_ms: u64,
        /// The verifier's clock.
        now_ms: u64,
    },
}

/// The payload JSON exactly as 0.1.50 writes it: `{"d":…,"s":…,"sc":…,"exp":…,"n":…}`, strings
/// escaped like `JSON.stringify`.
pub fn payload_json(claims: &JitClaims) -> String {
    let mut out = String::with_capacity(96);
    out.push_str("{\"d\":");
    write_js_string(&claims.device_id, &mut out);
    out.push_str(",\"s\":");
    write_js_string(&claims.session_id, &mut out);
    out.push_str(",\"sc\":");
    write_js_string(&claims.scope, &mut out);
    out.push_str(",\"exp\":");
    out.push_str(&claims.expires_at_ms.to_string());
    out.push_str(",\"n\":");
    write_js_string(&claims.nonce, &mut out);
    out.push('}');
    out
}

/// Mints `jit.<b64url(payload)>.<b64url(HMAC-SHA256(key, b64url(payload)))>`.
pub fn mint(key: &[u8], claims: &JitClaims) -> Result<String, JitError> {
    if key.is_empty() {
        return Err(JitError::EmptyKey);
    }
    let payload = URL_SAFE_NO_PAD.encode(payload_json(claims));
    let sig = mac(key, &payload);
    Ok(format!("{TOKEN_PREFIX}{payload}.{sig}"))
}

fn split(token: &str) -> Result<(&str, &str), JitError> {
    if token.len() > *TOKEN_LEN.end() {
        return Err(JitError::Malformed("longer than 2048 characters"));
    }
    let rest = token
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(JitError::Malformed("does not start with `jit.`"))?;
    let (payload, sig) = rest
        .split_once('.')
        .ok_or(JitError::Malformed("missing signature part"))?;
    if payload.is_empty() || sig.is_empty() || sig.contains('.') {
        return Err(JitError::Malformed(
            "expected exactly three dot-separated parts",
        ));
    }
    Ok((payload, sig))
}

fn decode_payload(payload: &str) -> Result<JitClaims, JitError> {
    let json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| JitError::Malformed("payload is not base64url"))?;
    serde_json::from_slice(&json).map_err(|_| {
        JitError::Malformed("payload is not a JSON object with exactly d, s, sc, exp, n")
    })
}

/// Checks the signature (constant time), then decodes the claims, then the expiry: the token is
/// valid while `now_ms < exp`.
pub fn verify(key: &[u8], token: &str, now_ms: u64) -> Result<JitClaims, JitError> {
    if key.is_empty() {
        return Err(JitError::EmptyKey);
    }
    let (payload, sig) = split(token)?;
    if !verify_mac(key, payload, sig) {
        return Err(JitError::BadSignature);
    }
    let claims = decode_payload(payload)?;
    if now_ms >= claims.expires_at_ms {
        return Err(JitError::Expired {
            expires_at_ms: claims.expires_at_ms,
            now_ms,
        });
    }
    Ok(claims)
}

/// Decodes the claims without checking signature or expiry (display and debugging only).
pub fn decode_unverified(token: &str) -> Result<JitClaims, JitError> {
    let (payload, _) = split(token)?;
    decode_payload(payload)
}

// ---------------------------------------------------------------------------------------------
// The `j` object

/// `^[A-Z_][A-Z0-9_]{1,63}$`: the shape of an environment variable name in a `j`.
pub fn valid_env_name(name: &str) -> bool {
    let b = name.as_bytes();
    (2..=64).contains(&b.len())
        && (b[0].is_ascii_uppercase() || b[0] == b'_')
        && b[1..]
            .iter()
            .all(|&c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
}

/// `^[A-Za-z0-9._:-]{1,128}$`: the shape of a credential ref.
pub fn valid_ref(r: &str) -> bool {
    (1..=128).contains(&r.len())
        && r.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
}

fn js_len(s: &str) -> usize {
    s.encode_utf16().count()
}

/// Environment variable names a `j` may set. [`DEFAULT_ENV_VAR`], [`ENV_EXPIRES_AT`] and
/// [`ENV_SCOPE`] are always allowed; names that do not match [`valid_env_name`] are dropped.
///
/// The control plane's and the daemon's lists must agree: a name only the control plane allows
/// makes a 0.1.50 daemon drop the whole `si`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvAllowlist {
    names: BTreeSet<String>,
}

impl EnvAllowlist {
    /// The three built-in names plus the valid ones in `extra`.
    pub fn new<I, S>(extra: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut names: BTreeSet<String> = [DEFAULT_ENV_VAR, ENV_EXPIRES_AT, ENV_SCOPE]
            .into_iter()
            .map(str::to_owned)
            .collect();
        names.extend(
            extra
                .into_iter()
                .map(|s| s.as_ref().trim().to_owned())
                .filter(|s| valid_env_name(s)),
        );
        Self { names }
    }

    /// Parses a comma-separated list (`SESSION_JIT_ENV_ALLOWLIST` style).
    pub fn from_csv(list: &str) -> Self {
        Self::new(list.split(','))
    }

    /// Whether `name` is allowed.
    pub fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }

    /// The allowed names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// Checks a name's shape and membership.
    pub fn check(&self, name: &str) -> Result<(), CredentialError> {
        if !valid_env_name(name) {
            return Err(CredentialError::InvalidEnvName(name.to_owned()));
        }
        if !self.contains(name) {
            return Err(CredentialError::EnvNameNotAllowed(name.to_owned()));
        }
        Ok(())
    }
}

impl Default for EnvAllowlist {
    fn default() -> Self {
        Self::new(std::iter::empty::<&str>())
    }
}

/// Why a `j` object (or a requested TTL) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Requested TTL outside our bounds.
    #[error("JIT TTL {ttl_ms} ms is outside {MIN_TTL_MS}..={MAX_TTL_MS} ms")]
    TtlOutOfRange {
        /// The TTL asked for.
        ttl_ms: u64,
    },
    /// `t` is not 16..=2048 characters.
    #[error("JIT token must be 16..=2048 characters")]
    TokenLength,
    /// `e` is outside what the daemon accepts at this moment.
    #[error("JIT expiry {expires_at_ms} is outside [{earliest_ms}, {latest_ms}]")]
    ExpiryOutOfRange {
        /// `e`.
        expires_at_ms: u64,
        /// Earliest accepted value.
        earliest_ms: u64,
        /// Latest accepted value.
        latest_ms: u64,
    },
    /// `s` is not 1..=128 characters.
    #[error("JIT scope must be 1..=128 characters")]
    ScopeLength,
    /// An env name does not match `^[A-Z_][A-Z0-9_]{1,63}$`.
    #[error("environment name {0:?} must match ^[A-Z_][A-Z0-9_]{{1,63}}$")]
    InvalidEnvName(String),
    /// An env name is not in the allowlist.
    #[error("environment name {0:?} is not in the JIT allowlist")]
    EnvNameNotAllowed(String),
    /// `r` does not match `^[A-Za-z0-9._:-]{1,128}$`.
    #[error("credential ref must match ^[A-Za-z0-9._:-]{{1,128}}$")]
    InvalidRef,
    /// More than [`MAX_ENV_PAIRS`] extra pairs.
    #[error("at most {MAX_ENV_PAIRS} extra environment pairs")]
    TooManyPairs,
    /// The same extra env name twice.
    #[error("environment name {0:?} appears twice")]
    DuplicatePairName(String),
    /// An extra env value is empty, contains NUL or exceeds [`MAX_ENV_VALUE_BYTES`].
    #[error("value of {0:?} must be 1..=2048 bytes without NUL")]
    InvalidPairValue(String),
}

/// Computes `e` for a TTL chosen by the operator, refusing (not clamping) a TTL outside
/// [`MIN_TTL_MS`]..=[`MAX_TTL_MS`].
pub fn expiry_for_ttl(now_ms: u64, ttl_ms: u64) -> Result<u64, CredentialError> {
    if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&ttl_ms) {
        return Err(CredentialError::TtlOutOfRange { ttl_ms });
    }
    Ok(now_ms.saturating_add(ttl_ms))
}

/// The `j` object of `si`: `{t, e, s?, n?, r?, v?}`. `Debug` redacts the token and the pair
/// values.
#[derive(Clone, PartialEq, Eq)]
pub struct JitCredential {
    /// `t`: the token (opaque to the daemon).
    pub token: String,
    /// `e`: expiry, Unix milliseconds. The daemon ends the session then.
    pub expires_at_ms: u64,
    /// `s`: scope.
    pub scope: Option<String>,
    /// `n`: env var that receives the token (default [`DEFAULT_ENV_VAR`]).
    pub env_name: Option<String>,
    /// `r`: credential ref, used by the kill switch.
    pub credential_ref: Option<String>,
    /// `v`: extra `[name, value]` env pairs.
    pub env_pairs: Vec<(String, String)>,
}

impl fmt::Debug for JitCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pairs: Vec<(&str, &str)> = self
            .env_pairs
            .iter()
            .map(|(n, _)| (n.as_str(), "<redacted>"))
            .collect();
        f.debug_struct("JitCredential")
            .field("token", &"<redacted>")
            .field("expires_at_ms", &self.expires_at_ms)
            .field("scope", &self.scope)
            .field("env_name", &self.env_name)
            .field("credential_ref", &self.credential_ref)
            .field("env_pairs", &pairs)
            .finish()
    }
}

impl JitCredential {
    /// The field rules a daemon applies when it parses `si` (0.1.50 drops the whole `si` if one
    /// fails): `t` 16..=2048 chars, `e` within [`now − 10 s`, `now + 1 h`], `s` 1..=128 chars,
    /// `n` and pair names well-formed and allowlisted, `r` well-formed, at most 8 unique pairs
    /// with non-empty values of at most 2048 bytes and no NUL.
    pub fn check_fields(&self, now_ms: u64, allow: &EnvAllowlist) -> Result<(), CredentialError> {
        if !TOKEN_LEN.contains(&js_len(&self.token)) {
            return Err(CredentialError::TokenLength);
        }
        let earliest_ms = now_ms.saturating_sub(PAST_TOLERANCE_MS);
        let latest_ms = now_ms.saturating_add(MAX_TTL_MS);
        if !(earliest_ms..=latest_ms).contains(&self.expires_at_ms) {
            return Err(CredentialError::ExpiryOutOfRange {
                expires_at_ms: self.expires_at_ms,
                earliest_ms,
                latest_ms,
            });
        }
        if let Some(s) = &self.scope {
            if !SCOPE_LEN.contains(&js_len(s)) {
                return Err(CredentialError::ScopeLength);
            }
        }
        if let Some(n) = &self.env_name {
            allow.check(n)?;
        }
        if let Some(r) = &self.credential_ref {
            if !valid_ref(r) {
                return Err(CredentialError::InvalidRef);
            }
        }
        if self.env_pairs.len() > MAX_ENV_PAIRS {
            return Err(CredentialError::TooManyPairs);
        }
        for (i, (name, value)) in self.env_pairs.iter().enumerate() {
            allow.check(name)?;
            if self.env_pairs[..i].iter().any(|(n, _)| n == name) {
                return Err(CredentialError::DuplicatePairName(name.clone()));
            }
            if value.is_empty() || value.len() > MAX_ENV_VALUE_BYTES || value.contains('\0') {
                return Err(CredentialError::InvalidPairValue(name.clone()));
            }
        }
        Ok(())
    }

    /// The check at session start: [`JitCredential::check_fields`] plus a remaining lifetime
    /// in (`MIN_TTL_MS`, `MAX_TTL_MS`], as a 0.1.50 daemon requires.
    pub fn check_usable(&self, now_ms: u64, allow: &EnvAllowlist) -> Result<(), CredentialError> {
        self.check_fields(now_ms, allow)?;
        let earliest_ms = now_ms.saturating_add(MIN_TTL_MS).saturating_add(1);
        let latest_ms = now_ms.saturating_add(MAX_TTL_MS);
        if !(earliest_ms..=latest_ms).contains(&self.expires_at_ms) {
            return Err(CredentialError::ExpiryOutOfRange {
                expires_at_ms: self.expires_at_ms,
                earliest_ms,
                latest_ms,
            });
        }
        Ok(())
    }

    /// The env var that receives the token.
    pub fn token_env_name(&self) -> &str {
        self.env_name.as_deref().unwrap_or(DEFAULT_ENV_VAR)
    }

    /// 0.1.50's credential fingerprint: the first 24 chars of base64url(SHA-256(
    /// `"<r>|<n>|<e>|<s>|<name=value|…>|<t>"`)). The daemon restarts a folder's OpenCode server
    /// when it changes.
    pub fn fingerprint(&self) -> String {
        let pairs: Vec<String> = self
            .env_pairs
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        let input = format!(
            "{}|{}|{}|{}|{}|{}",
            self.credential_ref.as_deref().unwrap_or(""),
            self.token_env_name(),
            self.expires_at_ms,
            self.scope.as_deref().unwrap_or(""),
            pairs.join("|"),
            self.token
        );
        let mut fp = URL_SAFE_NO_PAD.encode(Sha256::digest(input.as_bytes()));
        fp.truncate(24);
        fp
    }

    /// The credential ref: `r` if given, else the fingerprint.
    pub fn effective_ref(&self) -> String {
        self.credential_ref
            .clone()
            .unwrap_or_else(|| self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> JitClaims {
        JitClaims {
            device_id: "dev_ABCDEFGHIJKLMNOP".into(),
            session_id: "ses_abc".into(),
            scope: DEFAULT_SCOPE.into(),
            expires_at_ms: 1_700_000_900_000,
            nonce: "abcdefghijkl".into(),
        }
    }

    #[test]
    fn mint_verify_roundtrip_and_failures() {
        let key = b"k";
        let t = mint(key, &claims()).unwrap();
        assert_eq!(verify(key, &t, 1_700_000_000_000), Ok(claims()));
        assert_eq!(decode_unverified(&t), Ok(claims()));
        assert_eq!(verify(b"other", &t, 0), Err(JitError::BadSignature));
        assert!(matches!(
            verify(key, &t, 1_700_000_900_000),
            Err(JitError::Expired { .. })
        ));
        assert_eq!(mint(b"", &claims()), Err(JitError::EmptyKey));
        for bad in [
            "",
            "jit.",
            "jit.a",
            "jwt.a.b",
            "jit.a.b.c",
            "jit..b",
            "jit.a.",
        ] {
            assert!(
                matches!(verify(key, bad, 0), Err(JitError::Malformed(_))),
                "{bad}"
            );
        }
        // A validly signed payload that is not the claims object.
        let payload = URL_SAFE_NO_PAD.encode(r#"{"d":"x","s":"y","sc":"z","exp":1,"n":"n","q":1}"#);
        let forged = format!("jit.{payload}.{}", mac(key, &payload));
        assert!(matches!(
            verify(key, &forged, 0),
            Err(JitError::Malformed(_))
        ));
    }

    #[test]
    fn payload_escapes_like_json_stringify() {
        let mut c = claims();
        c.session_id = "a\"b\n".into();
        assert!(payload_json(&c).contains(r#""s":"a\"b\n""#));
        let parsed: JitClaims = serde_json::from_str(&payload_json(&c)).unwrap();
        assert_eq!(parsed, c);
    }

    #[test]
    fn env_names_and_refs() {
        assert!(valid_env_name("OPENCODE_SESSION_TOKEN"));
        assert!(valid_env_name("_X"));
        assert!(!valid_env_name("X"));
        assert!(!valid_env_name("1X"));
        assert!(!valid_env_name("lower"));
        assert!(!valid_env_name(&"A".repeat(65)));
        assert!(valid_env_name(&"A".repeat(64)));
        assert!(valid_ref("F8oYYGGJW07H"));
        assert!(valid_ref("a.b_c:d-e"));
        assert!(!valid_ref(""));
        assert!(!valid_ref("a/b"));
        assert!(!valid_ref(&"a".repeat(129)));

        let allow = EnvAllowlist::from_csv(" EXTRA_ONE ,bad name,, lower ");
        assert_eq!(
            allow.names().collect::<Vec<_>>(),
            [
                "EXTRA_ONE",
                "OPENCODE_JIT_SCOPE",
                "OPENCODE_JIT_TOKEN_EXPIRES_AT",
                "OPENCODE_SESSION_TOKEN"
            ]
        );
        assert_eq!(allow.check("EXTRA_ONE"), Ok(()));
        assert_eq!(
            allow.check("LD_PRELOAD"),
            Err(CredentialError::EnvNameNotAllowed("LD_PRELOAD".into()))
        );
        assert_eq!(
            allow.check("ld"),
            Err(CredentialError::InvalidEnvName("ld".into()))
        );
    }

    fn cred(now: u64) -> JitCredential {
        JitCredential {
            token: "jit.exampletoken.0123456789".into(),
            expires_at_ms: now + 900_000,
            scope: Some(DEFAULT_SCOPE.into()),
            env_name: Some(DEFAULT_ENV_VAR.into()),
            credential_ref: Some("F8oYYGGJW07H".into()),
            env_pairs: vec![],
        }
    }

    #[test]
    fn ttl_bounds() {
        assert_eq!(expiry_for_ttl(1_000, 15_000), Ok(16_000));
        assert_eq!(expiry_for_ttl(1_000, 3_600_000), Ok(3_601_000));
        assert_eq!(
            expiry_for_ttl(1_000, 14_999),
            Err(CredentialError::TtlOutOfRange { ttl_ms: 14_999 })
        );
        assert!(expiry_for_ttl(1_000, 3_600_001).is_err());
    }

    #[test]
    fn credential_checks() {
        let now = 1_735_689_600_000;
        let allow = EnvAllowlist::default();
        let c = cred(now);
        assert_eq!(c.check_usable(now, &allow), Ok(()));
        assert!(!format!("{c:?}").contains("exampletoken"));

        let mut x = c.clone();
        x.token = "short".into();
        assert_eq!(
            x.check_fields(now, &allow),
            Err(CredentialError::TokenLength)
        );

        let mut x = c.clone();
        x.expires_at_ms = now - 10_000;
        assert_eq!(x.check_fields(now, &allow), Ok(()));
        assert!(x.check_usable(now, &allow).is_err());
        x.expires_at_ms = now - 10_001;
        assert!(x.check_fields(now, &allow).is_err());
        x.expires_at_ms = now + 15_000;
        assert!(x.check_usable(now, &allow).is_err());
        x.expires_at_ms = now + 15_001;
        assert_eq!(x.check_usable(now, &allow), Ok(()));
        x.expires_at_ms = now + 3_600_001;
        assert!(x.check_fields(now, &allow).is_err());

        let mut x = c.clone();
        x.scope = Some(String::new());
        assert_eq!(
            x.check_fields(now, &allow),
            Err(CredentialError::ScopeLength)
        );

        let mut x = c.clone();
        x.credential_ref = Some("no spaces".into());
        assert_eq!(
            x.check_fields(now, &allow),
            Err(CredentialError::InvalidRef)
        );

        let mut x = c.clone();
        x.env_pairs = vec![
            (ENV_SCOPE.into(), "a".into()),
            (ENV_SCOPE.into(), "b".into()),
        ];
        assert_eq!(
            x.check_fields(now, &allow),
            Err(CredentialError::DuplicatePairName(ENV_SCOPE.into()))
        );
        x.env_pairs = vec![(ENV_SCOPE.into(), "a\0".into())];
        assert!(matches!(
            x.check_fields(now, &allow),
            Err(CredentialError::InvalidPairValue(_))
        ));
        x.env_pairs = vec![(ENV_SCOPE.into(), "a".repeat(2049))];
        assert!(x.check_fields(now, &allow).is_err());
        x.env_pairs = vec![("PATH".into(), "/tmp".into())];
        assert_eq!(
            x.check_fields(now, &allow),
            Err(CredentialError::EnvNameNotAllowed("PATH".into()))
        );
        x.env_pairs = (0..9).map(|_| (ENV_SCOPE.into(), "a".into())).collect();
        assert_eq!(
            x.check_fields(now, &allow),
            Err(CredentialError::TooManyPairs)
        );
    }

    /// Daemon reference §8.3 worked example.
    #[test]
    fn fingerprint_reference_example() {
        let c = JitCredential {
            token: "jit.exampletoken.0123456789".into(),
            expires_at_ms: 1_735_690_500_000,
            scope: Some("opencode:session".into()),
            env_name: Some(DEFAULT_ENV_VAR.into()),
            credential_ref: Some("F8oYYGGJW07H".into()),
            env_pairs: vec![],
        };
        assert_eq!(c.fingerprint(), "iC-HzmRvp6MqG7emlaRJBgpj");
        assert_eq!(c.effective_ref(), "F8oYYGGJW07H");
    }
}
