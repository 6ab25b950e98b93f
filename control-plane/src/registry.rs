//! Creating devices, tokens and tenants: the validation rules and the minting, shared by the
//! HTTP API and the local admin subcommands so both enforce exactly the same rules.

use std::collections::BTreeMap;

use crate::events::Event;
use crate::secrets;
use crate::store::{ApiToken, Device, HostFacts, Role, Store, StoreError, Tenant, TenantId};

/// Most labels a device may carry.
pub const MAX_LABELS: usize = 64;

/// Input that breaks a rule, or the store refusing.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// `code` is the API error code; `message` says what is expected.
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(code: &'static str, message: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        code,
        message: message.into(),
    }
}

/// A display name: 1..=120 chars, no control characters.
pub fn validate_name(what: &str, name: &str) -> Result<(), RegistryError> {
    let n = name.chars().count();
    if n == 0 || n > 120 || name.chars().any(char::is_control) || name.trim() != name {
        return Err(invalid(
            "invalid_name",
            format!(
                "{what} name must be 1..120 characters without control characters or surrounding spaces"
            ),
        ));
    }
    Ok(())
}

/// Labels: at most 64; keys 1..=63 of `A-Za-z0-9._/-`; values 0..=256 chars, no control chars.
pub fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), RegistryError> {
    if labels.len() > MAX_LABELS {
        return Err(invalid(
            "invalid_labels",
            format!("at most {MAX_LABELS} labels per device"),
        ));
    }
    for (k, v) in labels {
        let key_ok = (1..=63).contains(&k.len())
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
        if !key_ok {
            return Err(invalid(
                "invalid_labels",
                format!("label key {k:?}: use 1..63 chars of A-Z a-z 0-9 . _ / -"),
            ));
        }
        if v.chars().count() > 256 || v.chars().any(char::is_control) {
            return Err(invalid(
                "invalid_labels",
                format!(
                    "label {k:?}: the value must be at most 256 characters without control characters"
                ),
            ));
        }
    }
    Ok(())
}

/// Parses `key=value` (CLI form of a label).
pub fn parse_label(s: &str) -> Result<(String, String), RegistryError> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| invalid("invalid_labels", format!("label {s:?}: expected key=value")))
}

/// What a caller asks for when adding a device.
#[derive(Debug, Clone, Default)]
pub struct NewDevice {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// A chosen id (e.g. the id a 0.1.x daemon already uses); `None` mints `dev_<random>`.
    pub id: Option<String>,
}

/// Registers a device with a fresh secret. The returned device holds the secret: show it once.
pub fn create_device(
    store: &dyn Store,
    tenant: &TenantId,
    new: NewDevice,
    actor: &str,
) -> Result<(Device, Event), RegistryError> {
    validate_name("device", &new.name)?;
    validate_labels(&new.labels)?;
    let id = match new.id {
        Some(id) => {
            crate::store::validate_device_id(&id)
                .map_err(|e| invalid("invalid_device_id", e.to_string()))?;
            id
        }
        None => secrets::new_device_id(),
    };
    let secret = secrets::random_secret();
    let device = Device {
        id,
        tenant: tenant.clone(),
        name: new.name,
        labels: new.labels,
        key_id: secrets::key_id(&secret),
        secret,
        created_ms: crate::time::now_ms(),
        first_seen_ms: None,
        last_seen_ms: None,
        agent_version: None,
        host: HostFacts::default(),
    };
    let event = store.create_device(&device, actor)?;
    Ok((device, event))
}

/// A freshly minted token: its stored form and the bearer string to show once.
pub struct CreatedToken {
    pub token: ApiToken,
    pub bearer: String,
    pub event: Event,
}

/// Mints an API token. Authorization (who may mint what) is the caller's job.
pub fn create_token(
    store: &dyn Store,
    tenant: &TenantId,
    name: &str,
    role: Role,
    actor: &str,
) -> Result<CreatedToken, RegistryError> {
    validate_name("token", name)?;
    let minted = secrets::mint_api_token();
    let token = ApiToken {
        id: minted.id,
        tenant: tenant.clone(),
        role,
        name: name.to_owned(),
        created_ms: crate::time::now_ms(),
        created_by: actor.to_owned(),
        revoked: false,
        revoked_ms: None,
        secret_sha256: minted.secret_sha256,
    };
    let event = store.create_api_token(&token, actor)?;
    Ok(CreatedToken {
        token,
        bearer: minted.bearer,
        event,
    })
}

/// Creates a tenant.
pub fn create_tenant(
    store: &dyn Store,
    id: &str,
    name: Option<&str>,
    actor: &str,
) -> Result<Tenant, RegistryError> {
    let id = TenantId::parse(id).map_err(|e| invalid("invalid_tenant", e.to_string()))?;
    let name = name.unwrap_or(id.as_str()).to_owned();
    validate_name("tenant", &name)?;
    let tenant = Tenant {
        id,
        name,
        created_ms: crate::time::now_ms(),
    };
    store.create_tenant(&tenant, actor)?;
    Ok(tenant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_and_name_rules() {
        assert!(validate_name("device", "build box 1").is_ok());
        assert!(validate_name("device", "").is_err());
        assert!(validate_name("device", " padded").is_err());
        assert!(validate_name("device", "tab\there").is_err());
        let ok = BTreeMap::from([("team/area".to_string(), "ml-infra".to_string())]);
        assert!(validate_labels(&ok).is_ok());
        let bad = BTreeMap::from([("no spaces".to_string(), String::new())]);
        assert!(validate_labels(&bad).is_err());
        assert_eq!(parse_label("a=b=c").ok(), Some(("a".into(), "b=c".into())));
        assert!(parse_label("novalue").is_err());
    }
}
