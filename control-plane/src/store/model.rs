//! The entities the control plane persists, and the rules for their identifiers.
//!
//! These are plain data: no storage types leak in, so a Postgres backend can map them to rows
//! (or JSONB) as easily as the sled backend maps them to JSON values. Every entity that belongs
//! to a tenant carries its [`TenantId`]; tenant-scoped accessors on the store compare it, so a
//! resource of another tenant is indistinguishable from a missing one.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A tenant id: `^[a-z0-9][a-z0-9_-]{0,62}$`. Never contains NUL, so it can prefix store keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TenantId(String);

impl TenantId {
    /// The tenant `init` creates; its owners administer the whole installation.
    pub const DEFAULT: &'static str = "default";

    /// Validates and wraps a tenant id.
    pub fn parse(s: &str) -> Result<TenantId, InvalidId> {
        let b = s.as_bytes();
        let ok = (1..=63).contains(&b.len())
            && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-');
        if ok {
            Ok(TenantId(s.to_owned()))
        } else {
            Err(InvalidId {
                what: "tenant id",
                rule: "1..63 chars of a-z 0-9 _ -, starting with a letter or digit",
            })
        }
    }

    /// The default tenant's id.
    pub fn default_tenant() -> TenantId {
        TenantId(Self::DEFAULT.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An identifier failed its pattern; `rule` says what is expected.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid {what}: expected {rule}")]
pub struct InvalidId {
    pub what: &'static str,
    pub rule: &'static str,
}

/// Checks a device id against the protocol's `^[A-Za-z0-9_-]{12,32}$`.
pub fn validate_device_id(id: &str) -> Result<(), InvalidId> {
    let ok = (12..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then_some(()).ok_or(InvalidId {
        what: "device id",
        rule: "12..32 chars of A-Z a-z 0-9 _ -",
    })
}

/// Checks an identifier used for templates and MCP servers: `^[a-z0-9][a-z0-9_-]{1,63}$`.
pub fn validate_slug(what: &'static str, id: &str) -> Result<(), InvalidId> {
    let b = id.as_bytes();
    let ok = (2..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-');
    ok.then_some(()).ok_or(InvalidId {
        what,
        rule: "2..64 chars of a-z 0-9 _ -, starting with a letter or digit",
    })
}

/// Roles, ordered: each includes the rights of those below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
    Owner,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Operator, Role::Admin, Role::Owner];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tenant: an isolated namespace of devices, tokens, templates, sessions and events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
    pub created_ms: u64,
}

/// An API token's stored form. The secret itself is never stored, only its SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiToken {
    pub id: String,
    pub tenant: TenantId,
    pub role: Role,
    pub name: String,
    pub created_ms: u64,
    /// Actor that minted it (`token:<id>`, `local-admin`, ...).
    pub created_by: String,
    pub revoked: bool,
    pub revoked_ms: Option<u64>,
    #[serde(with = "hex32")]
    pub secret_sha256: [u8; 32],
}

/// What a host reported about itself in its handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
}

/// A registered device (enrolled host).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub id: String,
    pub tenant: TenantId,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The device's handshake secret, raw: it is the HMAC key (see `secrets` module docs).
    pub secret: String,
    /// `key_id(secret)`: what the daemon sends as `ak`.
    pub key_id: String,
    pub created_ms: u64,
    pub first_seen_ms: Option<u64>,
    pub last_seen_ms: Option<u64>,
    pub agent_version: Option<String>,
    #[serde(default)]
    pub host: HostFacts,
}

/// What the tunnel needs to verify a device's handshake. Deliberately not tenant-scoped: the
/// handshake arrives before anything is known about the tenant. Use it only there.
#[derive(Clone, PartialEq)]
pub struct DeviceCredential {
    pub device_id: String,
    pub tenant: TenantId,
    pub key_id: String,
    /// HMAC key bytes are `secret.as_bytes()`.
    pub secret: String,
}

impl fmt::Debug for DeviceCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceCredential")
            .field("device_id", &self.device_id)
            .field("tenant", &self.tenant)
            .field("key_id", &self.key_id)
            .field("secret", &"***")
            .finish()
    }
}

/// What the tunnel learned when a device connected.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConnectInfo {
    pub at_ms: u64,
    pub agent_version: Option<String>,
    pub host: HostFacts,
    /// Remote address, for the event log only.
    pub peer: Option<String>,
    /// `"native"` (CBOR) or `"json"` (0.1.x compat), for the event log only.
    pub mode: Option<String>,
}

/// A 0.1.x-style shared token (`VALID_TOKENS`): optional, for daemons that cannot yet use a
/// per-device key. Bound to a list of device ids, or unbound. Which device ids an unbound token
/// may claim (only registered ones of its tenant, or auto-enrolment) is the tunnel's policy.
/// Kept raw because it is an HMAC key.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct LegacyToken {
    pub key_id: String,
    pub tenant: TenantId,
    pub token: String,
    /// `None`: unbound. `Some(ids)`: only these device ids may use it.
    pub devices: Option<Vec<String>>,
    pub created_ms: u64,
    pub revoked: bool,
}

impl fmt::Debug for LegacyToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LegacyToken")
            .field("key_id", &self.key_id)
            .field("tenant", &self.tenant)
            .field("token", &"***")
            .field("devices", &self.devices)
            .field("revoked", &self.revoked)
            .finish()
    }
}

/// One published, immutable version of a template. `body` is the template document (its
/// validation and compilation live in the templates module, not in the store).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateVersion {
    pub tenant: TenantId,
    pub template_id: String,
    /// Semver (see [`crate::semver`]); "latest" is the highest by semver precedence.
    pub version: String,
    pub body: serde_json::Value,
    /// Canonical digest of `body`, if the publisher computed one.
    pub digest: Option<String>,
    pub published_ms: u64,
    pub published_by: String,
}

/// An MCP registry entry (`serverId@version`); the body is validated elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct McpEntry {
    pub tenant: TenantId,
    pub server_id: String,
    pub version: String,
    pub body: serde_json::Value,
    pub updated_ms: u64,
}

/// Session metadata (the session itself lives on the device).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub session_id: String,
    pub device_id: String,
    pub tenant: TenantId,
    pub folder: String,
    /// Free-form state name (`starting`, `running`, `terminated`, ...), owned by the session code.
    pub state: String,
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// What became of one config push (`cc`) to a device; the handle is the request id the
/// push was sent with. `status` is `pending` (sent, no answer yet), `applied`, `rejected`
/// (the daemon refused it) or `failed` (no usable answer: timeout, disconnect, error frame).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigPushRecord {
    pub tenant: TenantId,
    pub device_id: String,
    pub request_id: u32,
    pub template_id: String,
    pub template_version: String,
    pub status: String,
    /// Digest of the pushed payload (ours for `pending`/`failed`, the daemon's otherwise).
    pub digest: String,
    #[serde(default)]
    pub phase: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub policy_mode: Option<String>,
    #[serde(default)]
    pub applied_path: Option<String>,
    #[serde(default)]
    pub violations: Vec<String>,
    #[serde(default)]
    pub message: Option<String>,
    /// The daemon's `at` for answered pushes, our clock otherwise.
    pub responded_ms: u64,
}

impl ConfigPushRecord {
    pub const PENDING: &'static str = "pending";

    /// A finished push (anything but `pending`).
    pub fn is_final(&self) -> bool {
        self.status != Self::PENDING
    }
}

/// The current policy of a tenant, opaque to the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicySnapshot {
    pub tenant: TenantId,
    pub body: serde_json::Value,
    pub updated_ms: u64,
    pub updated_by: String,
}

/// A stored idempotent response. `response == None` while the first request is still running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    pub tenant: TenantId,
    pub key: String,
    /// SHA-256 (hex) of method, path and body of the first request.
    pub fingerprint: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub response: Option<StoredResponse>,
}

/// An HTTP response kept for replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResponse {
    pub status: u16,
    pub body: serde_json::Value,
}

/// Outcome of claiming an idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub enum IdempotencyClaim {
    /// The key was free (or expired): the caller runs the request, then completes or releases.
    Claimed,
    /// The first request finished: replay its response, run nothing.
    Replay(StoredResponse),
    /// The first request with this key is still running.
    InProgress,
    /// The key was used for a different request (route or body).
    Mismatch,
}

/// Serde helper: `[u8; 32]` as 64 hex chars.
mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::secrets::hex(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        crate::secrets::parse_hex32(&s).ok_or_else(|| D::Error::custom("expected 64 hex chars"))
    }
}

// ---- session output streams ---------------------------------------------------------------

/// The durable state of one session output stream (the `sc` chunks of one prompt), keyed by
/// (tenant, device, stream id `x`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMeta {
    /// The session the prompt was for, when the prompt went through this control plane.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Whether any chunk was stored (before that, `next_seq`/`first_kept` are provisional).
    pub started: bool,
    /// The next seq expected in order: every seq below it was accepted.
    pub next_seq: u32,
    /// The first seq still stored; `first_kept..next_seq` are held, everything below was
    /// evicted by the byte cap (or never seen: the stream was first seen mid-way).
    pub first_kept: u32,
    /// Bytes of chunk text held.
    pub bytes: u64,
    /// The last chunk (`e: 1`) is in.
    pub ended: bool,
    /// When the last change happened (ms since the epoch).
    pub updated_ms: u64,
}

impl StreamMeta {
    pub fn new(session_id: Option<String>, now_ms: u64) -> StreamMeta {
        StreamMeta {
            session_id,
            started: false,
            next_seq: 0,
            first_kept: 0,
            bytes: 0,
            ended: false,
            updated_ms: now_ms,
        }
    }

    /// The seqs evicted (or never seen) before the first one held, if any.
    pub fn truncated(&self) -> Option<(u32, u32)> {
        (self.started && self.first_kept > 0).then(|| (0, self.first_kept - 1))
    }
}

/// One stored chunk of a session output stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredChunk {
    pub seq: u32,
    pub data: String,
    pub last: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifier_rules() {
        assert!(TenantId::parse("default").is_ok());
        assert!(TenantId::parse("team-a_1").is_ok());
        for bad in ["", "-a", "A", "a b", "a\0b", &"a".repeat(64)] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?}");
        }
        assert!(validate_device_id("dev_ABCDEFGHIJKLMNOP").is_ok());
        assert!(validate_device_id("short").is_err());
        assert!(validate_device_id("has space in it!").is_err());
        assert!(validate_slug("template id", "py-build").is_ok());
        assert!(validate_slug("template id", "Py").is_err());
    }

    #[test]
    fn roles_are_ordered_and_round_trip() {
        assert!(
            Role::Viewer < Role::Operator
                && Role::Operator < Role::Admin
                && Role::Admin < Role::Owner
        );
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
    }
}
