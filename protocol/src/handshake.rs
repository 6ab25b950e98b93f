//! The `h1`/`h2` handshake: key ids, MACs, the server-side verifier with its replay cache, and a
//! small client state machine for the daemon.
//!
//! The daemon dials out and proves it holds a secret by MAC-ing a string that binds its device id,
//! a fresh nonce and its clock (`h1`); the control plane answers with a MAC over its session id,
//! its own nonce, the heartbeat and chunk parameters **and the daemon's nonce** (`h2`), which
//! proves the control plane holds the same secret and that the answer is fresh. Everything here is
//! byte-compatible with CodeMantle 0.1.50 (see `shared/reference/codemantle-0.1.50-*.md` §2.2–2.3
//! and §3), so a 0.1.50 daemon can talk to our control plane and vice versa.
//!
//! Sans-io: no clock, no RNG. The caller passes `now_ms` (Unix milliseconds) and the random nonces
//! and session ids; this module only computes and checks.
//!
//! # Where we are stricter than 0.1.50
//!
//! * **Device binding.** 0.1.50 lets any holder of any token claim any device id (§12.1 #1). Here a
//!   [`Credential::Device`] authenticates exactly one device id, and a [`Credential::Shared`]
//!   (legacy token) can be limited to a list of ids. A valid MAC for the wrong id fails with
//!   [`HandshakeError::DeviceNotAllowed`]. The check runs *after* the MAC so that only a key holder
//!   can learn which device a key belongs to.
//! * **Raw tokens.** The `at` field carries the secret itself. The shipped daemon never sends it;
//!   we refuse it unless [`VerifierConfig::allow_raw_token`] is set.
//! * **Replay window.** 0.1.50 remembers a nonce until `now + skew`, so an `h1` stamped up to 30 s in
//!   the future can be replayed once the entry expires while its `ts` is still in the window. We
//!   remember it until `ts + skew`, the last instant the frame could pass the skew check.
//! * **Bounded replay cache.** 0.1.50's cache has no hard cap (§12.1 #6); [`ReplayCache`] has one
//!   and evicts the entry closest to expiry when full. Only MAC-verified nonces are inserted, so
//!   filling it requires a valid key.
//! * **`h2` parameters** are range-checked before signing ([`VerifiedPeer::sign_h2`]), because a
//!   0.1.50 daemon silently ignores an `h2` with `hb` outside 5..=120 (§2.3).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::RangeInclusive;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ErrorCode;

type HmacSha256 = Hmac<Sha256>;

/// The only protocol version on the wire.
pub const PROTOCOL_VERSION: u64 = 1;
/// Default accepted clock difference between daemon and control plane (`HANDSHAKE_SKEW_MS`).
pub const DEFAULT_SKEW_MS: u64 = 30_000;
/// Default cap of the nonce replay cache.
pub const DEFAULT_REPLAY_CAPACITY: usize = 65_536;
/// Length of a key id: the first 24 characters of base64url(SHA-256(secret)).
pub const KEY_ID_LEN: usize = 24;
/// Length of a MAC on the wire: base64url without padding of 32 bytes.
pub const MAC_LEN: usize = 43;
/// `hb` (heartbeat seconds) values a daemon accepts in `h2`.
pub const HEARTBEAT_SECS: RangeInclusive<u64> = 5..=120;
/// `mx` (max stream chunk bytes) values a daemon accepts in `h2`.
pub const MAX_CHUNK_BYTES: RangeInclusive<u64> = 256..=8192;
/// The `mx` the control plane sends.
pub const DEFAULT_MAX_CHUNK_BYTES: u64 = 8192;
/// WebSocket close code "policy violation", used for authentication failures.
pub const CLOSE_POLICY_VIOLATION: u16 = 1008;
/// WebSocket close code "protocol error", used for malformed or unsupported handshakes.
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;

// ---------------------------------------------------------------------------------------------
// Secrets, key ids, MACs

/// A shared secret (the token's UTF-8 bytes are the HMAC key). Its `Debug` output is redacted so
/// it cannot leak through logs; there is deliberately no `PartialEq` (use [`Secret::ct_eq`]).
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Wraps raw secret bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Self(bytes.into())
    }

    /// The raw bytes, for MAC computation or storage.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The key id of this secret, see [`key_id`].
    pub fn key_id(&self) -> String {
        key_id(&self.0)
    }

    /// Constant-time comparison with `other` (the length is not hidden).
    pub fn ct_eq(&self, other: &[u8]) -> bool {
        self.0.len() == other.len() && bool::from(self.0.as_slice().ct_eq(other))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Self(s.as_bytes().to_vec())
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s.into_bytes())
    }
}

impl From<Vec<u8>> for Secret {
    fn from(v: Vec<u8>) -> Self {
        Self(v)
    }
}

/// Key id of a secret: the first 24 characters of base64url-nopad(SHA-256(secret)). It names a
/// secret on the wire (`ak`) without revealing it.
pub fn key_id(secret: &[u8]) -> String {
    let mut id = URL_SAFE_NO_PAD.encode(Sha256::digest(secret));
    id.truncate(KEY_ID_LEN);
    id
}

fn hmac(secret: &[u8]) -> HmacSha256 {
    // HMAC is defined for keys of any length; `new_from_slice` cannot fail for it.
    HmacSha256::new_from_slice(secret).expect("HMAC-SHA256 accepts keys of any length")
}

/// base64url-nopad(HMAC-SHA256(key = secret, msg)), 43 characters.
pub fn mac(secret: &[u8], msg: &str) -> String {
    let mut m = hmac(secret);
    m.update(msg.as_bytes());
    URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
}

/// Checks `mac_b64` (base64url-nopad) against HMAC-SHA256(secret, msg) in constant time.
/// Anything that is not exactly 43 canonical base64url characters is simply a mismatch.
pub fn verify_mac(secret: &[u8], msg: &str, mac_b64: &str) -> bool {
    if mac_b64.len() != MAC_LEN {
        return false;
    }
    let mut tag = [0u8; 32];
    match URL_SAFE_NO_PAD.decode_slice(mac_b64.as_bytes(), &mut tag) {
        Ok(32) => {}
        _ => return false,
    }
    let mut m = hmac(secret);
    m.update(msg.as_bytes());
    m.verify_slice(&tag).is_ok()
}

/// How an `h1` names its credential, which decides the last field of the signed string.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum H1Auth<'a> {
    /// `ak:<key id>`: what every 0.1.50 daemon sends, and what ours sends.
    KeyId(&'a str),
    /// `at:<token>`: the raw token is on the wire.
    Token(&'a str),
    /// `<token>` without prefix: oldest form, accepted whenever `at` is present.
    LegacyToken(&'a str),
}

impl fmt::Debug for H1Auth<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::KeyId(k) => f.debug_tuple("KeyId").field(k).finish(),
            Self::Token(_) => f.write_str("Token(<redacted>)"),
            Self::LegacyToken(_) => f.write_str("LegacyToken(<redacted>)"),
        }
    }
}

/// The string an `h1` MAC covers: `h1|1|<d>|<n>|<ts>|ak:<ak>` (or `at:<at>`, or `<at>`).
pub fn h1_signed(device_id: &str, nonce: &str, ts_ms: u64, auth: H1Auth<'_>) -> String {
    let tail = match auth {
        H1Auth::KeyId(k) => format!("ak:{k}"),
        H1Auth::Token(t) => format!("at:{t}"),
        H1Auth::LegacyToken(t) => t.to_owned(),
    };
    format!("h1|{PROTOCOL_VERSION}|{device_id}|{nonce}|{ts_ms}|{tail}")
}

/// The string an `h2` MAC covers: `h2|1|<sid>|<server nonce>|<hb>|<mx>|<h1 nonce>`.
pub fn h2_signed(sid: &str, server_nonce: &str, hb: u64, mx: u64, h1_nonce: &str) -> String {
    format!("h2|{PROTOCOL_VERSION}|{sid}|{server_nonce}|{hb}|{mx}|{h1_nonce}")
}

/// The `h2` MAC the control plane sends (`m`), keyed with the credential resolved from `h1`.
pub fn h2_mac(
    secret: &[u8],
    sid: &str,
    server_nonce: &str,
    hb: u64,
    mx: u64,
    h1_nonce: &str,
) -> String {
    mac(secret, &h2_signed(sid, server_nonce, hb, mx, h1_nonce))
}

// ---------------------------------------------------------------------------------------------
// Field syntax

/// A handshake field that breaks its syntax rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}` {rule}")]
pub struct FieldError {
    /// Wire name of the field (`d`, `ak`, `at`, `n`, `m`, `s`, `hb`, `mx`, ...).
    pub field: &'static str,
    /// The rule it broke, e.g. `must match ^[A-Za-z0-9_-]{12,32}$`.
    pub rule: &'static str,
}

fn is_b64url_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn b64url_len(s: &str, len: RangeInclusive<usize>) -> bool {
    len.contains(&s.len()) && s.bytes().all(is_b64url_char)
}

/// `d`: `^[A-Za-z0-9_-]{12,32}$`.
pub fn valid_device_id(s: &str) -> bool {
    b64url_len(s, 12..=32)
}

/// `n` of `h1` and `h2`: `^[A-Za-z0-9_-]{16,24}$`.
pub fn valid_nonce(s: &str) -> bool {
    b64url_len(s, 16..=24)
}

/// `ak`: `^[A-Za-z0-9_-]{16,32}$`.
pub fn valid_key_id(s: &str) -> bool {
    b64url_len(s, 16..=32)
}

/// `s` of `h2` (session id): `^[A-Za-z0-9_-]{12,32}$`.
pub fn valid_sid(s: &str) -> bool {
    b64url_len(s, 12..=32)
}

/// `m`: `^[A-Za-z0-9_-]{43}$`.
pub fn valid_mac(s: &str) -> bool {
    b64url_len(s, MAC_LEN..=MAC_LEN)
}

/// `at`: a string of 1..=256 characters (JavaScript length, i.e. UTF-16 code units).
pub fn valid_token(s: &str) -> bool {
    !s.is_empty() && s.len() <= 1024 && s.encode_utf16().count() <= 256
}

fn require(ok: bool, field: &'static str, rule: &'static str) -> Result<(), FieldError> {
    if ok {
        Ok(())
    } else {
        Err(FieldError { field, rule })
    }
}

// ---------------------------------------------------------------------------------------------
// Credentials

/// What a key id or token resolves to in the control plane's credential store.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A per-device secret: authenticates exactly `device_id` and nothing else.
    Device {
        /// The one device id this secret may claim.
        device_id: String,
        /// The secret (HMAC key).
        secret: Secret,
    },
    /// A shared (0.1.x-style) token, optionally bound to a list of device ids. `None` means any
    /// syntactically valid device id may use it, as in 0.1.50.
    Shared {
        /// The secret (HMAC key).
        secret: Secret,
        /// Device ids allowed to use this token; `None` = unbound.
        allowed_devices: Option<Vec<String>>,
    },
}

impl Credential {
    /// The HMAC key.
    pub fn secret(&self) -> &Secret {
        match self {
            Self::Device { secret, .. } | Self::Shared { secret, .. } => secret,
        }
    }

    /// Which kind of credential this is.
    pub fn kind(&self) -> CredentialKind {
        match self {
            Self::Device { .. } => CredentialKind::Device,
            Self::Shared { .. } => CredentialKind::Shared,
        }
    }

    /// Whether this credential may authenticate `device_id`.
    pub fn permits(&self, device_id: &str) -> bool {
        match self {
            Self::Device { device_id: own, .. } => own == device_id,
            Self::Shared {
                allowed_devices: None,
                ..
            } => true,
            Self::Shared {
                allowed_devices: Some(list),
                ..
            } => list.iter().any(|d| d == device_id),
        }
    }
}

/// The kind of a [`Credential`], without its secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    /// [`Credential::Device`].
    Device,
    /// [`Credential::Shared`].
    Shared,
}

/// The control plane's credential store, as the verifier sees it.
///
/// Closures `Fn(&str) -> Option<Credential>` (key id → credential) implement it, and so does
/// [`CredentialSet`].
pub trait CredentialLookup {
    /// The credential whose [`key_id`] is `key_id`, if any.
    fn by_key_id(&self, key_id: &str) -> Option<Credential>;

    /// The credential whose secret is exactly `token` (the `at` forms). The default looks the token
    /// up by its key id and then compares the secret in constant time.
    fn by_token(&self, token: &str) -> Option<Credential> {
        let cred = self.by_key_id(&key_id(token.as_bytes()))?;
        cred.secret().ct_eq(token.as_bytes()).then_some(cred)
    }
}

impl<F> CredentialLookup for F
where
    F: Fn(&str) -> Option<Credential>,
{
    fn by_key_id(&self, key_id: &str) -> Option<Credential> {
        self(key_id)
    }
}

/// A simple in-memory credential store keyed by key id.
#[derive(Debug, Clone, Default)]
pub struct CredentialSet {
    by_key_id: HashMap<String, Credential>,
}

impl CredentialSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a credential; returns the one it replaced (same secret, hence same key id).
    pub fn insert(&mut self, credential: Credential) -> Option<Credential> {
        self.by_key_id
            .insert(credential.secret().key_id(), credential)
    }

    /// Removes the credential with this key id.
    pub fn remove(&mut self, key_id: &str) -> Option<Credential> {
        self.by_key_id.remove(key_id)
    }

    /// Number of credentials.
    pub fn len(&self) -> usize {
        self.by_key_id.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.by_key_id.is_empty()
    }
}

impl FromIterator<Credential> for CredentialSet {
    fn from_iter<I: IntoIterator<Item = Credential>>(iter: I) -> Self {
        let mut set = Self::new();
        for c in iter {
            set.insert(c);
        }
        set
    }
}

impl CredentialLookup for CredentialSet {
    fn by_key_id(&self, key_id: &str) -> Option<Credential> {
        self.by_key_id.get(key_id).cloned()
    }
}

// ---------------------------------------------------------------------------------------------
// Replay cache

/// The nonce was already used by a handshake that is still inside its replay window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("nonce already used")]
pub struct Replayed;

/// Bounded memory of recently used `h1` nonces.
///
/// One global map nonce → expiry, as in 0.1.50 (not per device). An entry is live while
/// `now_ms <= expires_at_ms`. When the cache is full, inserting evicts the entry that expires
/// first (with a monotonic clock and a fixed window: the oldest), so memory stays bounded even
/// under a flood of valid handshakes; [`ReplayCache::evicted`] counts such evictions, which each
/// shorten the protection of one nonce and are worth a metric.
///
/// Operations are O(log n). The struct is single-threaded: the control plane wraps the
/// [`Verifier`] that owns it in a mutex so that check-then-insert is atomic.
#[derive(Debug, Clone)]
pub struct ReplayCache {
    capacity: usize,
    by_nonce: HashMap<String, (u64, u64)>,
    by_expiry: BTreeMap<(u64, u64), String>,
    next_seq: u64,
    evicted: u64,
}

impl ReplayCache {
    /// A cache holding at most `capacity` nonces (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            by_nonce: HashMap::new(),
            by_expiry: BTreeMap::new(),
            next_seq: 0,
            evicted: 0,
        }
    }

    /// Maximum number of entries.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of entries, including expired ones not yet pruned.
    pub fn len(&self) -> usize {
        self.by_nonce.len()
    }

    /// Whether the cache holds no entry.
    pub fn is_empty(&self) -> bool {
        self.by_nonce.is_empty()
    }

    /// How many live entries were evicted because the cache was full, since creation.
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Whether `nonce` is remembered and still live at `now_ms`.
    pub fn contains(&self, nonce: &str, now_ms: u64) -> bool {
        self.by_nonce
            .get(nonce)
            .is_some_and(|&(expiry, _)| now_ms <= expiry)
    }

    /// Removes every entry that expired before `now_ms`; returns how many.
    pub fn prune(&mut self, now_ms: u64) -> usize {
        let mut removed = 0;
        while let Some(entry) = self.by_expiry.first_entry() {
            if entry.key().0 >= now_ms {
                break;
            }
            let nonce = entry.remove();
            self.by_nonce.remove(&nonce);
            removed += 1;
        }
        removed
    }

    /// Remembers `nonce` until `expires_at_ms`, unless it is already live ([`Replayed`]).
    /// Prunes expired entries first and evicts the soonest-expiring entries if still full.
    /// An entry that would already be expired at `now_ms` is not stored.
    pub fn insert(&mut self, nonce: &str, expires_at_ms: u64, now_ms: u64) -> Result<(), Replayed> {
        self.prune(now_ms);
        if let Some(&(expiry, seq)) = self.by_nonce.get(nonce) {
            if now_ms <= expiry {
                return Err(Replayed);
            }
            // Only reachable if the clock went backwards between prunes; drop the stale entry.
            self.by_expiry.remove(&(expiry, seq));
            self.by_nonce.remove(nonce);
        }
        if expires_at_ms < now_ms {
            return Ok(());
        }
        while self.by_nonce.len() >= self.capacity {
            let Some((_, victim)) = self.by_expiry.pop_first() else {
                break;
            };
            self.by_nonce.remove(&victim);
            self.evicted += 1;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_expiry
            .insert((expires_at_ms, seq), nonce.to_owned());
        self.by_nonce.insert(nonce.to_owned(), (expires_at_ms, seq));
        Ok(())
    }
}

impl Default for ReplayCache {
    fn default() -> Self {
        Self::new(DEFAULT_REPLAY_CAPACITY)
    }
}

// ---------------------------------------------------------------------------------------------
// Server side: verifying h1

/// The `h1` fields the verifier needs, as plain values. (`c`, `hn`, `os`, `av` are display-only
/// and are checked by the message parser.)
#[derive(Clone, Copy)]
pub struct H1Fields<'a> {
    /// `v`: protocol version.
    pub version: u64,
    /// `d`: claimed device id.
    pub device_id: &'a str,
    /// `ak`: key id of the credential.
    pub key_id: Option<&'a str>,
    /// `at`: the raw token (legacy).
    pub token: Option<&'a str>,
    /// `n`: client nonce.
    pub nonce: &'a str,
    /// `ts`: client clock, Unix milliseconds.
    pub ts_ms: u64,
    /// `m`: the MAC.
    pub mac: &'a str,
}

impl fmt::Debug for H1Fields<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H1Fields")
            .field("version", &self.version)
            .field("device_id", &self.device_id)
            .field("key_id", &self.key_id)
            .field("token", &self.token.map(|_| "<redacted>"))
            .field("nonce", &self.nonce)
            .field("ts_ms", &self.ts_ms)
            .field("mac", &self.mac)
            .finish()
    }
}

/// Which signed-string form an accepted `h1` used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum H1Form {
    /// `…|ak:<key id>`.
    KeyId,
    /// `…|at:<token>`.
    Token,
    /// `…|<token>`.
    LegacyToken,
}

/// Why an `h1` was refused. Each variant maps to the wire error code, message and WebSocket close
/// code 0.1.50 uses (see [`HandshakeError::wire_code`], [`HandshakeError::close_code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// `v` is below the configured floor.
    #[error("agent protocol v{received} is below the required v{floor}")]
    UpdateRequired {
        /// The configured floor.
        floor: u64,
        /// The `v` received.
        received: u64,
    },
    /// `v` is not 1.
    #[error("protocol v{received} is not supported; this control plane speaks v1")]
    ProtocolNotSupported {
        /// The `v` received.
        received: u64,
    },
    /// A field breaks its syntax rule, or neither `ak` nor `at` is present.
    #[error("malformed h1: {0}")]
    Malformed(FieldError),
    /// `|now − ts|` exceeds the skew window.
    #[error(
        "timestamp skew: ts {ts_ms} is {diff_ms} ms away from now {now_ms}, limit {limit_ms} ms"
    )]
    TimestampSkew {
        /// The `ts` received.
        ts_ms: u64,
        /// The verifier's clock.
        now_ms: u64,
        /// `|now − ts|`.
        diff_ms: u64,
        /// The configured window.
        limit_ms: u64,
    },
    /// The nonce was used by an earlier successful handshake still inside its window.
    #[error("nonce already used (replay)")]
    Replay,
    /// No credential has this key id / token.
    #[error("unknown key id or token")]
    UnknownCredential,
    /// The `h1` carries `at` (the raw secret) and this verifier does not accept raw tokens.
    #[error("raw token (`at`) refused by configuration")]
    RawTokenRefused,
    /// The MAC matches none of the accepted signed strings.
    #[error("invalid signature")]
    BadSignature,
    /// The MAC is valid but the credential may not claim this device id.
    #[error("credential is not valid for device {device_id}")]
    DeviceNotAllowed {
        /// The device id claimed in `d`.
        device_id: String,
    },
}

impl HandshakeError {
    /// The `c` of the `e` frame sent before closing: `UPDATE_REQUIRED`, `PROTO` or `AUTH`.
    pub fn wire_code(&self) -> ErrorCode {
        match self {
            Self::UpdateRequired { .. } | Self::ProtocolNotSupported { .. } => {
                ErrorCode::UpdateRequired
            }
            Self::Malformed(_) => ErrorCode::Proto,
            _ => ErrorCode::Auth,
        }
    }

    /// The `m` of the `e` frame, if any (0.1.50 sends one only for version errors).
    pub fn wire_message(&self) -> Option<String> {
        match self {
            Self::UpdateRequired { floor, received } => Some(format!(
                "agent_update_required:min_v{floor}:received_v{received}"
            )),
            Self::ProtocolNotSupported { received } => Some(format!(
                "protocol_not_supported:control_plane_v1:received_v{received}"
            )),
            Self::DeviceNotAllowed { .. } => Some("key_not_valid_for_device".to_owned()),
            _ => None,
        }
    }

    /// The WebSocket close code: 1002 for protocol problems, 1008 for policy (auth) failures.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::ProtocolNotSupported { .. } | Self::Malformed(_) => CLOSE_PROTOCOL_ERROR,
            _ => CLOSE_POLICY_VIOLATION,
        }
    }

    /// The WebSocket close reason text (0.1.50's wording).
    pub fn close_reason(&self) -> &'static str {
        match self {
            Self::UpdateRequired { .. } => "update required",
            Self::ProtocolNotSupported { .. } => "unsupported protocol version",
            Self::Malformed(_) => "expected handshake",
            Self::TimestampSkew { .. } => "timestamp skew",
            Self::Replay => "replay detected",
            Self::UnknownCredential | Self::RawTokenRefused => "invalid token",
            Self::BadSignature => "invalid signature",
            Self::DeviceNotAllowed { .. } => "key not valid for this device",
        }
    }
}

impl From<FieldError> for HandshakeError {
    fn from(e: FieldError) -> Self {
        Self::Malformed(e)
    }
}

/// Policy of a [`Verifier`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierConfig {
    /// Accepted `|now − ts|`, in milliseconds (0.1.50: 30 000).
    pub skew_ms: u64,
    /// Lowest accepted protocol `v` (`REQUIRED_AGENT_PROTOCOL_VERSION`; 0 is treated as 1).
    pub protocol_floor: u64,
    /// Whether `h1` frames carrying the raw token (`at`) are accepted. 0.1.50 accepts them, its
    /// daemon never sends them; default `false`.
    pub allow_raw_token: bool,
    /// Cap of the replay cache.
    pub replay_capacity: usize,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self {
            skew_ms: DEFAULT_SKEW_MS,
            protocol_floor: PROTOCOL_VERSION,
            allow_raw_token: false,
            replay_capacity: DEFAULT_REPLAY_CAPACITY,
        }
    }
}

/// A successfully authenticated daemon.
#[derive(Debug, Clone)]
pub struct VerifiedPeer {
    /// The device id, now proven.
    pub device_id: String,
    /// Key id of the credential that authenticated it.
    pub key_id: String,
    /// Kind of that credential.
    pub credential: CredentialKind,
    /// Signed-string form the daemon used.
    pub form: H1Form,
    secret: Secret,
    h1_nonce: String,
}

impl VerifiedPeer {
    /// The secret the session is keyed with (to sign `h2`).
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// The daemon's `h1` nonce, which `h2` must cover.
    pub fn h1_nonce(&self) -> &str {
        &self.h1_nonce
    }

    /// The `m` of the `h2` reply, after checking that a daemon would accept these parameters:
    /// `sid` 12..=32 and `server_nonce` 16..=24 base64url characters (caller-generated random),
    /// `hb` in [`HEARTBEAT_SECS`], `mx` in [`MAX_CHUNK_BYTES`].
    pub fn sign_h2(
        &self,
        sid: &str,
        server_nonce: &str,
        hb: u64,
        mx: u64,
    ) -> Result<String, FieldError> {
        check_h2_params(sid, server_nonce, hb, mx)?;
        Ok(h2_mac(
            self.secret.expose(),
            sid,
            server_nonce,
            hb,
            mx,
            &self.h1_nonce,
        ))
    }
}

fn check_h2_params(sid: &str, server_nonce: &str, hb: u64, mx: u64) -> Result<(), FieldError> {
    require(valid_sid(sid), "s", "must match ^[A-Za-z0-9_-]{12,32}$")?;
    require(
        valid_nonce(server_nonce),
        "n",
        "must match ^[A-Za-z0-9_-]{16,24}$",
    )?;
    require(
        HEARTBEAT_SECS.contains(&hb),
        "hb",
        "must be an integer in 5..=120",
    )?;
    require(
        MAX_CHUNK_BYTES.contains(&mx),
        "mx",
        "must be an integer in 256..=8192",
    )
}

fn check_h1_syntax(h1: &H1Fields<'_>) -> Result<(), FieldError> {
    require(
        valid_device_id(h1.device_id),
        "d",
        "must match ^[A-Za-z0-9_-]{12,32}$",
    )?;
    if let Some(ak) = h1.key_id {
        require(valid_key_id(ak), "ak", "must match ^[A-Za-z0-9_-]{16,32}$")?;
    }
    if let Some(at) = h1.token {
        require(
            valid_token(at),
            "at",
            "must be a string of 1..=256 characters",
        )?;
    }
    require(
        h1.key_id.is_some() || h1.token.is_some(),
        "ak",
        "or `at` is required",
    )?;
    require(
        valid_nonce(h1.nonce),
        "n",
        "must match ^[A-Za-z0-9_-]{16,24}$",
    )?;
    require(valid_mac(h1.mac), "m", "must match ^[A-Za-z0-9_-]{43}$")
}

/// Server-side `h1` verifier: the policy plus the replay cache it owns.
///
/// Checks run in 0.1.50's order, so the same bad `h1` gets the same error frame and close code:
/// version floor → `v == 1` → field syntax → clock skew → replay → credential → MAC; then our
/// device binding. The nonce is recorded only once the MAC is valid.
#[derive(Debug, Clone)]
pub struct Verifier {
    config: VerifierConfig,
    replay: ReplayCache,
}

impl Verifier {
    /// A verifier with an empty replay cache of `config.replay_capacity` entries.
    pub fn new(config: VerifierConfig) -> Self {
        let replay = ReplayCache::new(config.replay_capacity);
        Self { config, replay }
    }

    /// The policy.
    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// The replay cache (for metrics).
    pub fn replay_cache(&self) -> &ReplayCache {
        &self.replay
    }

    /// Drops expired nonces (call it from a periodic tick; insertion also prunes).
    pub fn prune(&mut self, now_ms: u64) -> usize {
        self.replay.prune(now_ms)
    }

    /// Verifies one `h1` at `now_ms` against `lookup`. On success the nonce is recorded and the
    /// returned peer can sign the `h2`.
    pub fn verify<L: CredentialLookup + ?Sized>(
        &mut self,
        h1: &H1Fields<'_>,
        now_ms: u64,
        lookup: &L,
    ) -> Result<VerifiedPeer, HandshakeError> {
        let floor = self.config.protocol_floor.max(1);
        if h1.version < floor {
            return Err(HandshakeError::UpdateRequired {
                floor,
                received: h1.version,
            });
        }
        if h1.version != PROTOCOL_VERSION {
            return Err(HandshakeError::ProtocolNotSupported {
                received: h1.version,
            });
        }
        check_h1_syntax(h1)?;

        let diff_ms = now_ms.abs_diff(h1.ts_ms);
        if diff_ms > self.config.skew_ms {
            return Err(HandshakeError::TimestampSkew {
                ts_ms: h1.ts_ms,
                now_ms,
                diff_ms,
                limit_ms: self.config.skew_ms,
            });
        }
        if self.replay.contains(h1.nonce, now_ms) {
            return Err(HandshakeError::Replay);
        }

        if h1.token.is_some() && !self.config.allow_raw_token {
            return Err(HandshakeError::RawTokenRefused);
        }
        let credential = match (h1.key_id, h1.token) {
            (Some(ak), _) => lookup.by_key_id(ak),
            (None, Some(at)) => lookup.by_token(at),
            (None, None) => None,
        }
        .ok_or(HandshakeError::UnknownCredential)?;
        let secret = credential.secret().expose();

        let primary = match (h1.key_id, h1.token) {
            (Some(ak), _) => Some((H1Form::KeyId, H1Auth::KeyId(ak))),
            (None, Some(at)) => Some((H1Form::Token, H1Auth::Token(at))),
            (None, None) => None,
        };
        let legacy = h1
            .token
            .map(|at| (H1Form::LegacyToken, H1Auth::LegacyToken(at)));
        let form = primary
            .into_iter()
            .chain(legacy)
            .find(|&(_, auth)| {
                verify_mac(
                    secret,
                    &h1_signed(h1.device_id, h1.nonce, h1.ts_ms, auth),
                    h1.mac,
                )
            })
            .map(|(form, _)| form)
            .ok_or(HandshakeError::BadSignature)?;

        // Remember the nonce until the last instant this frame could pass the skew check.
        let expires_at = h1.ts_ms.saturating_add(self.config.skew_ms);
        self.replay
            .insert(h1.nonce, expires_at, now_ms)
            .map_err(|Replayed| HandshakeError::Replay)?;

        if !credential.permits(h1.device_id) {
            return Err(HandshakeError::DeviceNotAllowed {
                device_id: h1.device_id.to_owned(),
            });
        }
        Ok(VerifiedPeer {
            device_id: h1.device_id.to_owned(),
            key_id: credential.secret().key_id(),
            credential: credential.kind(),
            form,
            secret: credential.secret().clone(),
            h1_nonce: h1.nonce.to_owned(),
        })
    }
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new(VerifierConfig::default())
    }
}

// ---------------------------------------------------------------------------------------------
// Client side (daemon)

/// The `h1` a daemon sends (ak form), as plain values; `c`, `hn`, `os`, `av` are added by the
/// caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H1Out {
    /// `v`.
    pub version: u64,
    /// `d`.
    pub device_id: String,
    /// `ak`.
    pub key_id: String,
    /// `n`.
    pub nonce: String,
    /// `ts`.
    pub ts_ms: u64,
    /// `m`.
    pub mac: String,
}

/// The `h2` fields a daemon checks, as plain values (`v`/`t` are checked by the message parser).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct H2Fields<'a> {
    /// `s`: session id.
    pub sid: &'a str,
    /// `n`: server nonce.
    pub server_nonce: &'a str,
    /// `hb`: heartbeat seconds.
    pub hb: u64,
    /// `mx`: max stream chunk bytes.
    pub mx: u64,
    /// `m`: MAC.
    pub mac: &'a str,
}

/// What the daemon learns from an accepted `h2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionParams {
    /// Session id assigned by the control plane.
    pub sid: String,
    /// The control plane's nonce.
    pub server_nonce: String,
    /// Heartbeat interval in seconds (5..=120).
    pub heartbeat_secs: u64,
    /// Maximum stream chunk size in bytes (256..=8192).
    pub max_chunk_bytes: u64,
}

/// Why a daemon refuses an `h2`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientHandshakeError {
    /// A field is out of range (0.1.50 silently ignores such a frame).
    #[error("malformed h2: {0}")]
    Malformed(FieldError),
    /// The MAC does not match: the peer does not hold our secret, or the reply is not for our
    /// nonce.
    #[error("h2 signature does not match")]
    BadSignature,
}

impl ClientHandshakeError {
    /// WebSocket close code: 1002 for a malformed frame, 1008 for a bad signature (0.1.50).
    pub fn close_code(&self) -> u16 {
        match self {
            Self::Malformed(_) => CLOSE_PROTOCOL_ERROR,
            Self::BadSignature => CLOSE_POLICY_VIOLATION,
        }
    }

    /// WebSocket close reason text.
    pub fn close_reason(&self) -> &'static str {
        "invalid ack"
    }
}

/// The daemon's half of the handshake: built when the socket opens, consulted when `h2` arrives.
///
/// ```
/// use codemantle_protocol::handshake::{ClientHandshake, H2Fields, Verifier, Credential};
///
/// let secret = "test-token-0123456789";
/// let (client, h1) =
///     ClientHandshake::new(secret, "dev_ABCDEFGHIJKLMNOP", "nonceNONCEnonce12345", 1_700_000_000_000)
///         .unwrap();
/// // ... the control plane verifies h1 and signs h2 ...
/// let lookup = |_: &str| Some(Credential::Shared { secret: secret.into(), allowed_devices: None });
/// let peer = Verifier::default().verify(&h1.as_fields(), 1_700_000_000_000, &lookup).unwrap();
/// let m = peer.sign_h2("SIDsidSIDsidSIDsid", "SRVsrvSRVsrvSRVsrv", 25, 8192).unwrap();
/// let session = client
///     .handle_h2(&H2Fields { sid: "SIDsidSIDsidSIDsid", server_nonce: "SRVsrvSRVsrvSRVsrv", hb: 25, mx: 8192, mac: &m })
///     .unwrap();
/// assert_eq!(session.heartbeat_secs, 25);
/// ```
#[derive(Debug, Clone)]
pub struct ClientHandshake {
    secret: Secret,
    nonce: String,
}

impl ClientHandshake {
    /// Starts a handshake: checks the inputs and builds the `h1` (ak form). `nonce` must be fresh
    /// random base64url (16..=24 chars; 0.1.50 uses 20) and `now_ms` the current clock.
    pub fn new(
        secret: impl Into<Secret>,
        device_id: &str,
        nonce: &str,
        now_ms: u64,
    ) -> Result<(Self, H1Out), FieldError> {
        let secret = secret.into();
        require(!secret.expose().is_empty(), "secret", "must not be empty")?;
        require(
            valid_device_id(device_id),
            "d",
            "must match ^[A-Za-z0-9_-]{12,32}$",
        )?;
        require(valid_nonce(nonce), "n", "must match ^[A-Za-z0-9_-]{16,24}$")?;
        let key_id = secret.key_id();
        let mac = mac(
            secret.expose(),
            &h1_signed(device_id, nonce, now_ms, H1Auth::KeyId(&key_id)),
        );
        let h1 = H1Out {
            version: PROTOCOL_VERSION,
            device_id: device_id.to_owned(),
            key_id,
            nonce: nonce.to_owned(),
            ts_ms: now_ms,
            mac,
        };
        Ok((
            Self {
                secret,
                nonce: nonce.to_owned(),
            },
            h1,
        ))
    }

    /// The nonce sent in `h1`.
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// Checks an `h2`: field ranges, then the MAC over our own `h1` nonce (constant time).
    pub fn handle_h2(&self, h2: &H2Fields<'_>) -> Result<SessionParams, ClientHandshakeError> {
        check_h2_params(h2.sid, h2.server_nonce, h2.hb, h2.mx)
            .and_then(|()| require(valid_mac(h2.mac), "m", "must match ^[A-Za-z0-9_-]{43}$"))
            .map_err(ClientHandshakeError::Malformed)?;
        let signed = h2_signed(h2.sid, h2.server_nonce, h2.hb, h2.mx, &self.nonce);
        if !verify_mac(self.secret.expose(), &signed, h2.mac) {
            return Err(ClientHandshakeError::BadSignature);
        }
        Ok(SessionParams {
            sid: h2.sid.to_owned(),
            server_nonce: h2.server_nonce.to_owned(),
            heartbeat_secs: h2.hb,
            max_chunk_bytes: h2.mx,
        })
    }
}

impl H1Out {
    /// Borrowed view for [`Verifier::verify`] (handy in tests and loopback setups).
    pub fn as_fields(&self) -> H1Fields<'_> {
        H1Fields {
            version: self.version,
            device_id: &self.device_id,
            key_id: Some(&self.key_id),
            token: None,
            nonce: &self.nonce,
            ts_ms: self.ts_ms,
            mac: &self.mac,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_debug_is_redacted() {
        let s = Secret::from("hunter2-hunter2");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        let c = Credential::Shared {
            secret: s,
            allowed_devices: None,
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        let h1 = H1Fields {
            version: 1,
            device_id: "dev_ABCDEFGHIJKLMNOP",
            key_id: None,
            token: Some("hunter2-hunter2"),
            nonce: "nonceNONCEnonce12345",
            ts_ms: 0,
            mac: "x",
        };
        assert!(!format!("{h1:?}").contains("hunter2"));
        assert!(!format!("{:?}", H1Auth::Token("hunter2")).contains("hunter2"));
    }

    #[test]
    fn verify_mac_rejects_non_canonical() {
        let m = mac(b"k", "msg");
        assert!(verify_mac(b"k", "msg", &m));
        assert!(!verify_mac(b"k", "msg2", &m));
        assert!(!verify_mac(b"k", "msg", &m[..42]));
        assert!(!verify_mac(b"k", "msg", &format!("{m}=")));
        // Flip the last character's unused low bits: same bytes under lenient decoding, but not
        // the string 0.1.50 compares.
        let last = m.as_bytes()[42];
        let idx = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
            .iter()
            .position(|&c| c == last)
            .unwrap();
        let twin = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[idx ^ 1];
        let mut bad = m.clone();
        bad.replace_range(42.., std::str::from_utf8(&[twin]).unwrap());
        assert!(!verify_mac(b"k", "msg", &bad));
    }

    #[test]
    fn replay_cache_basics() {
        let mut c = ReplayCache::new(2);
        assert_eq!(c.insert("a", 10, 0), Ok(()));
        assert_eq!(c.insert("a", 10, 5), Err(Replayed));
        assert!(c.contains("a", 10));
        assert!(!c.contains("a", 11));
        assert_eq!(c.insert("a", 30, 11), Ok(()));
        assert_eq!(c.insert("b", 20, 11), Ok(()));
        // Full: inserting evicts the soonest-expiring live entry ("b" at 20).
        assert_eq!(c.insert("c", 40, 12), Ok(()));
        assert_eq!(c.evicted(), 1);
        assert!(!c.contains("b", 12));
        assert!(c.contains("a", 12));
        assert_eq!(c.len(), 2);
        assert_eq!(c.prune(35), 1);
        assert_eq!(c.len(), 1);
        // Already expired entries are not stored.
        assert_eq!(c.insert("d", 5, 35), Ok(()));
        assert!(!c.contains("d", 35));
    }
}
