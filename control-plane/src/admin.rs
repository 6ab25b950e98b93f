//! Local admin operations: run on the server host against the data dir **while the server is
//! stopped** (sled allows one process; a running server makes these fail with a clear message).
//! They bootstrap an installation (`init` → first owner token) and recover from lost tokens.
//! Secrets are printed once by the caller, or written to a 0600 file.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::events::ACTOR_LOCAL_ADMIN;
use crate::registry::{self, CreatedToken, NewDevice, RegistryError};
use crate::store::sled::SledStore;
use crate::store::{Device, LegacyToken, Role, Store, StoreError, Tenant, TenantId};

/// A local admin failure, phrased for the operator.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Invalid(String),
}

impl From<RegistryError> for AdminError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid { message, .. } => AdminError::Invalid(message),
            RegistryError::Store(StoreError::NotFound { what: "tenant" }) => AdminError::Invalid(
                "that tenant does not exist: create it with `codemantle-control-plane tenant add <id>` \
                 (or run `init` for the default tenant)"
                    .into(),
            ),
            RegistryError::Store(StoreError::AlreadyExists { what }) => {
                AdminError::Invalid(format!("{what} already exists; choose another id"))
            }
            RegistryError::Store(e) => AdminError::Store(e),
        }
    }
}

/// Opens the store in `data_dir`.
pub fn open(data_dir: &Path) -> Result<SledStore, AdminError> {
    Ok(SledStore::open(data_dir)?)
}

/// Creates the default tenant and mints its first owner token. Refuses if already initialised
/// (mint further tokens with [`create_token`]).
pub fn init(store: &SledStore) -> Result<CreatedToken, AdminError> {
    let default = TenantId::default_tenant();
    if store.tenant(&default)?.is_some() {
        return Err(AdminError::Invalid(format!(
            "{} is already initialised; to mint another owner token run \
             `codemantle-control-plane token create --role owner --name <name>`",
            store.path().display()
        )));
    }
    registry::create_tenant(
        store,
        TenantId::DEFAULT,
        Some("Default tenant"),
        ACTOR_LOCAL_ADMIN,
    )?;
    let token = registry::create_token(
        store,
        &default,
        "initial owner",
        Role::Owner,
        ACTOR_LOCAL_ADMIN,
    )?;
    store.flush()?;
    Ok(token)
}

/// Adds a tenant.
pub fn add_tenant(store: &SledStore, id: &str, name: Option<&str>) -> Result<Tenant, AdminError> {
    let t = registry::create_tenant(store, id, name, ACTOR_LOCAL_ADMIN)?;
    store.flush()?;
    Ok(t)
}

/// Registers a device. With `out_key`, the secret is written to that file (created, mode 0600;
/// an existing file is never overwritten, checked before the device is created).
pub fn add_device(
    store: &SledStore,
    tenant: &str,
    name: &str,
    labels: &[String],
    id: Option<String>,
    out_key: Option<&Path>,
) -> Result<Device, AdminError> {
    let tenant = TenantId::parse(tenant).map_err(|e| AdminError::Invalid(e.to_string()))?;
    let labels = labels
        .iter()
        .map(|l| registry::parse_label(l))
        .collect::<Result<BTreeMap<_, _>, _>>()?;
    if let Some(path) = out_key {
        if path.exists() {
            return Err(AdminError::Invalid(format!(
                "{} already exists; remove it or choose another --out-key path",
                path.display()
            )));
        }
    }
    let new = NewDevice {
        name: name.to_owned(),
        labels,
        id,
    };
    let (device, _) = registry::create_device(store, &tenant, new, ACTOR_LOCAL_ADMIN)?;
    store.flush()?;
    if let Some(path) = out_key {
        write_secret_file(path, &device.secret).map_err(|e| {
            AdminError::Invalid(format!(
                "device {} was created, but writing its key to {} failed ({e}); remove the \
                 device and add it again",
                device.id,
                path.display()
            ))
        })?;
    }
    Ok(device)
}

/// Mints an API token.
pub fn create_token(
    store: &SledStore,
    tenant: &str,
    name: &str,
    role: Role,
) -> Result<CreatedToken, AdminError> {
    let tenant = TenantId::parse(tenant).map_err(|e| AdminError::Invalid(e.to_string()))?;
    let token = registry::create_token(store, &tenant, name, role, ACTOR_LOCAL_ADMIN)?;
    store.flush()?;
    Ok(token)
}

/// Adds a 0.1.x-style shared token (`VALID_TOKENS`), bound to `devices` (empty: unbound).
/// `token`: an existing token to import (read from a file by the caller: secrets never go
/// through argv), or `None` to mint one. 0.1.x daemons send it (or its key id) in `h1`.
pub fn add_legacy_token(
    store: &SledStore,
    tenant: &str,
    token: Option<String>,
    devices: &[String],
) -> Result<LegacyToken, AdminError> {
    let tenant = TenantId::parse(tenant).map_err(|e| AdminError::Invalid(e.to_string()))?;
    let token = token.unwrap_or_else(crate::secrets::random_secret);
    // 0.1.x accepts tokens of 8..2048 chars, but `at` in h1 is limited to 256.
    if !(8..=256).contains(&token.len()) || token.chars().any(|c| c.is_control() || c == ',') {
        return Err(AdminError::Invalid(
            "a legacy token must be 8..256 characters without commas or control characters".into(),
        ));
    }
    for d in devices {
        crate::store::validate_device_id(d).map_err(|e| AdminError::Invalid(e.to_string()))?;
    }
    let legacy = LegacyToken {
        key_id: crate::secrets::key_id(&token),
        tenant,
        token,
        devices: (!devices.is_empty()).then(|| devices.to_vec()),
        created_ms: crate::time::now_ms(),
        revoked: false,
    };
    store
        .add_legacy_token(&legacy, ACTOR_LOCAL_ADMIN)
        .map_err(|e| match e {
            StoreError::NotFound { .. } => AdminError::from(RegistryError::Store(e)),
            StoreError::AlreadyExists { .. } => {
                AdminError::Invalid("this legacy token is already registered".into())
            }
            other => AdminError::Store(other),
        })?;
    store.flush()?;
    Ok(legacy)
}

/// Reads a secret from the first line of a file (or stdin for `-`), trimmed.
pub fn read_secret_file(path: &Path) -> Result<String, AdminError> {
    let text = if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_line(&mut s)
            .map_err(|e| AdminError::Invalid(format!("cannot read stdin: {e}")))?;
        s
    } else {
        std::fs::read_to_string(path)
            .map_err(|e| AdminError::Invalid(format!("cannot read {}: {e}", path.display())))?
    };
    let secret = text.lines().next().unwrap_or("").trim().to_owned();
    if secret.is_empty() {
        return Err(AdminError::Invalid(format!("{} is empty", path.display())));
    }
    Ok(secret)
}

/// Writes `secret` + newline to a new file with mode 0600.
pub fn write_secret_file(path: &Path, secret: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_once_then_devices_and_tokens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir.path().join("data")).expect("open");
        let owner = init(&store).expect("init");
        assert_eq!(owner.token.role, Role::Owner);
        assert!(owner.bearer.starts_with("cmt_"));
        assert!(init(&store).is_err(), "a second init must refuse");

        let key = dir.path().join("device.key");
        let labels = vec!["rack=r1".to_string()];
        let d = add_device(&store, "default", "box", &labels, None, Some(&key)).expect("add");
        let written = std::fs::read_to_string(&key).expect("key file");
        assert_eq!(written.trim_end(), d.secret);
        let mode = std::fs::metadata(&key).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(add_device(&store, "default", "box2", &[], None, Some(&key)).is_err());
        assert!(add_device(&store, "nope", "box3", &[], None, None).is_err());
        assert!(create_token(&store, "default", "ci", Role::Viewer).is_ok());

        let imported = dir.path().join("legacy.txt");
        std::fs::write(&imported, "test-token-0123456789\n").expect("write");
        let secret = read_secret_file(&imported).expect("read");
        let legacy = add_legacy_token(&store, "default", Some(secret), std::slice::from_ref(&d.id))
            .expect("legacy");
        assert_eq!(legacy.key_id, "k7AZFe8hftnrd2suRzJwsAQY");
        let found = store
            .legacy_token(&legacy.key_id)
            .expect("read")
            .expect("some");
        assert_eq!(found.devices, Some(vec![d.id.clone()]));
        assert!(add_legacy_token(&store, "default", Some("short".into()), &[]).is_err());
    }
}
