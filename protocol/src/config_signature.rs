//! Config push signatures (`cc.alg` / `cc.sg`) that a daemon can actually check.
//!
//! # Why
//!
//! In CodeMantle 0.1.50 `alg` and `sg` are opaque strings the operator types into the push
//! request; the control plane passes them through and the daemon only checks that they are
//! present (reference §6.5, daemon §9.3, §15.1 #2). Nothing is verified, so "restricted" mode
//! protects nothing. Here the control plane signs every push with a key derived from the
//! device's own secret, and the daemon verifies it before writing anything.
//!
//! What it protects: a payload cannot be altered, or re-aimed at another apply path, phase or
//! template identity, by anything between the control plane's signing code and the daemon that
//! does not hold the device secret (a proxy, a relay, a bug that mixes up two pushes, a frame
//! meant for another device). What it does not protect against: a control plane that is fully
//! compromised (it holds the device secrets), or the replay of an older push with the same
//! fields to the same device (the timestamp `ts` is not bound; an old signed config can be
//! re-applied, which is a rollback, not an escalation).
//!
//! # Algorithm `hmac-sha256-devkey-v1` ([`ALG_HMAC_SHA256_DEVKEY_V1`])
//!
//! ```text
//! signing_key = HMAC-SHA256(key = device secret bytes, msg = "codemantle/config-signing/v1")
//! message     = "cfg|<tid>|<tv>|<ph>|<sc>|<ap>|<pd>"
//! sg          = base64url-nopad(HMAC-SHA256(key = signing_key, msg = message))   (43 chars)
//! ```
//!
//! - The device secret is the same byte string the handshake MACs with (the device token's
//!   UTF-8 bytes). The signing key is *derived* from it ([`KEY_DERIVATION_LABEL`]) so the raw
//!   device key is never used for two purposes: no handshake MAC can ever be a valid config
//!   signature or the other way round.
//! - `<tid>`, `<tv>`, `<ap>`, `<pd>` are the push's `tid`, `tv`, `ap` and `pd` exactly as they
//!   are on the wire (`ap` is **not** normalised: `a/./b` and `a/b` sign differently).
//! - `<ph>` and `<sc>` are the *effective* phase and scope ([`effective_phase_scope`]): when a
//!   push leaves them out, a daemon treats it as `runtime`/`full` (or `session-init`/
//!   `session-init` when only `ph` says session-init), so the signature covers what the
//!   daemon will do, not what bytes happened to be sent.
//! - The digest `pd` binds the payload itself (the daemon recomputes it from `cfg` and refuses
//!   a mismatch before checking the signature), so signing the digest signs the config.
//! - Unambiguous: `tid`, `tv`, `pd` can never contain `|` (their wire patterns exclude it, and
//!   [`SignedFields::message`] refuses one), `ph`/`sc` are fixed words, so the only field that
//!   may contain `|` is `ap`, and it is the one between the fifth and the last separator.
//! - The policy mode `pm` is not in the message; a compiled config declares its mode inside
//!   `cfg` (`codemantle.policy.mode`), which the digest covers, and the daemon refuses a `pm`
//!   that disagrees with it (`policy_mode_mismatch`).
//!
//! Verification is constant-time in the signature bytes ([`crate::handshake::verify_mac`]).

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::handshake::{self, Secret};
use crate::message::{ConfigPhase, ConfigPush, ConfigScope};

/// The algorithm name carried in `alg`.
pub const ALG_HMAC_SHA256_DEVKEY_V1: &str = "hmac-sha256-devkey-v1";

/// The message the signing key is derived with (HMAC-SHA256 keyed with the device secret).
pub const KEY_DERIVATION_LABEL: &str = "codemantle/config-signing/v1";

/// Why a signature was not made or not accepted. [`SignatureError::code`] is the violation code
/// a daemon reports in `cv.vd`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Neither `alg` nor `sg` is present.
    #[error(
        "the config push is not signed — the control plane must sign pushes with the device key (alg {ALG_HMAC_SHA256_DEVKEY_V1})"
    )]
    Missing,
    /// Only one of `alg` and `sg` is present.
    #[error("the config push carries `{present}` without `{absent}` — send both or neither")]
    Incomplete {
        /// The field that is present.
        present: &'static str,
        /// The field that is missing.
        absent: &'static str,
    },
    /// `alg` names an algorithm this peer does not verify.
    #[error(
        "signature algorithm {alg:?} is not supported — use {ALG_HMAC_SHA256_DEVKEY_V1} (opaque operator-supplied signatures are not accepted)"
    )]
    UnsupportedAlgorithm {
        /// The `alg` received (shortened).
        alg: String,
    },
    /// The signature does not match the fields and the device key.
    #[error(
        "the config signature does not match — the payload, its apply path, phase or template identity was changed after signing, or it was signed with another device's key"
    )]
    Mismatch,
    /// A field that must not contain `|` does (it would make the signed string ambiguous).
    #[error("`{field}` contains `|` and cannot be signed — fix the template id, version or digest")]
    UnsignableField {
        /// The wire name of the field.
        field: &'static str,
    },
}

impl SignatureError {
    /// The violation code for `cv.vd`: `signature_missing`, `signature_alg_unsupported` or
    /// `signature_invalid`.
    pub fn code(&self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::UnsupportedAlgorithm { .. } => "signature_alg_unsupported",
            SignatureError::Incomplete { .. }
            | SignatureError::Mismatch
            | SignatureError::UnsignableField { .. } => "signature_invalid",
        }
    }
}

/// The phase and scope a daemon applies a push with: `ph` defaults to `runtime`; `sc`
/// defaults to `session-init` for a session-init push and to `full` otherwise (0.1.50's
/// defaults, daemon reference §9.3).
pub fn effective_phase_scope(push: &ConfigPush) -> (ConfigPhase, ConfigScope) {
    let phase = push.phase.unwrap_or(ConfigPhase::Runtime);
    let scope = push.scope.unwrap_or(match phase {
        ConfigPhase::SessionInit => ConfigScope::SessionInit,
        ConfigPhase::Runtime => ConfigScope::Full,
    });
    (phase, scope)
}

/// Everything a signature binds. See the module doc for the exact string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedFields<'a> {
    /// `tid`.
    pub template_id: &'a str,
    /// `tv`.
    pub template_version: &'a str,
    /// Effective `ph`.
    pub phase: ConfigPhase,
    /// Effective `sc`.
    pub scope: ConfigScope,
    /// `ap`, exactly as sent.
    pub apply_path: &'a str,
    /// `pd`.
    pub digest: &'a str,
}

impl<'a> SignedFields<'a> {
    /// The fields of a push, with the effective phase and scope.
    pub fn of_push(push: &'a ConfigPush) -> SignedFields<'a> {
        let (phase, scope) = effective_phase_scope(push);
        SignedFields {
            template_id: &push.template_id,
            template_version: &push.template_version,
            phase,
            scope,
            apply_path: &push.apply_path,
            digest: &push.digest,
        }
    }

    /// `cfg|<tid>|<tv>|<ph>|<sc>|<ap>|<pd>`, or an error if `tid`, `tv` or `pd` contains `|`.
    pub fn message(&self) -> Result<String, SignatureError> {
        for (field, value) in [
            ("tid", self.template_id),
            ("tv", self.template_version),
            ("pd", self.digest),
        ] {
            if value.contains('|') {
                return Err(SignatureError::UnsignableField { field });
            }
        }
        Ok(format!(
            "cfg|{}|{}|{}|{}|{}|{}",
            self.template_id,
            self.template_version,
            self.phase.as_str(),
            self.scope.as_str(),
            self.apply_path,
            self.digest
        ))
    }
}

/// The derived config-signing key of one device. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct ConfigSigningKey([u8; 32]);

impl fmt::Debug for ConfigSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ConfigSigningKey(<redacted>)")
    }
}

impl ConfigSigningKey {
    /// `HMAC-SHA256(key = device secret, msg = KEY_DERIVATION_LABEL)`.
    pub fn derive(device_secret: &Secret) -> ConfigSigningKey {
        ConfigSigningKey::derive_from_bytes(device_secret.expose())
    }

    /// [`ConfigSigningKey::derive`] from raw secret bytes.
    pub fn derive_from_bytes(device_secret: &[u8]) -> ConfigSigningKey {
        // HMAC is defined for keys of any length; `new_from_slice` cannot fail.
        let mut mac = match Hmac::<Sha256>::new_from_slice(device_secret) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC-SHA256 accepts keys of any length"),
        };
        mac.update(KEY_DERIVATION_LABEL.as_bytes());
        ConfigSigningKey(mac.finalize().into_bytes().into())
    }

    /// `sg` for `fields` (43 characters of base64url).
    pub fn sign(&self, fields: &SignedFields<'_>) -> Result<String, SignatureError> {
        Ok(handshake::mac(&self.0, &fields.message()?))
    }

    /// Checks `alg` and `sg` against `fields`. Both absent is [`SignatureError::Missing`]; the
    /// caller decides whether that is acceptable.
    pub fn verify(
        &self,
        fields: &SignedFields<'_>,
        alg: Option<&str>,
        sg: Option<&str>,
    ) -> Result<(), SignatureError> {
        let (alg, sg) = match (alg, sg) {
            (None, None) => return Err(SignatureError::Missing),
            (Some(_), None) => {
                return Err(SignatureError::Incomplete {
                    present: "alg",
                    absent: "sg",
                });
            }
            (None, Some(_)) => {
                return Err(SignatureError::Incomplete {
                    present: "sg",
                    absent: "alg",
                });
            }
            (Some(alg), Some(sg)) => (alg, sg),
        };
        if alg != ALG_HMAC_SHA256_DEVKEY_V1 {
            return Err(SignatureError::UnsupportedAlgorithm {
                alg: alg.chars().take(64).collect(),
            });
        }
        if handshake::verify_mac(&self.0, &fields.message()?, sg) {
            Ok(())
        } else {
            Err(SignatureError::Mismatch)
        }
    }
}

/// `sg` for `fields` under `device_secret` (see the module doc).
pub fn sign(device_secret: &Secret, fields: &SignedFields<'_>) -> Result<String, SignatureError> {
    ConfigSigningKey::derive(device_secret).sign(fields)
}

/// Checks `alg`/`sg` against `fields` under `device_secret`, in constant time.
pub fn verify(
    device_secret: &Secret,
    fields: &SignedFields<'_>,
    alg: Option<&str>,
    sg: Option<&str>,
) -> Result<(), SignatureError> {
    ConfigSigningKey::derive(device_secret).verify(fields, alg, sg)
}

/// Signs `push` in place: sets `alg` to [`ALG_HMAC_SHA256_DEVKEY_V1`] and `sg` to the signature
/// over its current fields. Call it last, after every signed field is final.
pub fn sign_push(push: &mut ConfigPush, device_secret: &Secret) -> Result<(), SignatureError> {
    let sg = sign(device_secret, &SignedFields::of_push(push))?;
    push.signature_alg = Some(ALG_HMAC_SHA256_DEVKEY_V1.to_owned());
    push.signature = Some(sg);
    Ok(())
}

/// Checks the `alg`/`sg` a push carries against its fields.
pub fn verify_push(push: &ConfigPush, device_secret: &Secret) -> Result<(), SignatureError> {
    verify(
        device_secret,
        &SignedFields::of_push(push),
        push.signature_alg.as_deref(),
        push.signature.as_deref(),
    )
}
