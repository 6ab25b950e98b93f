//! `config_apply`: what the daemon does with a config push (`cc` → `cv`).
//!
//! A config push changes how the coding agent on this host behaves: which tools it may use,
//! which MCP servers (programs!) it starts, which models it calls. It is the most powerful
//! thing the control plane can send, so the daemon checks it as if the sender were hostile.
//! CodeMantle 0.1.50 did not (daemon reference §9, §15.1 #2): it never verified `sg`,
//! `read-only` had no effect, and the policy cross-check looked under the wrong key. Here:
//!
//! 1. **Integrity.** The canonical digest of `cfg` must equal `pd` (`digest_mismatch`).
//! 2. **Authenticity.** `alg`/`sg` are verified with the device key
//!    (`codemantle_protocol::config_signature`, `hmac-sha256-devkey-v1`) whenever present
//!    (`signature_invalid`, `signature_alg_unsupported`), and required when
//!    [`ApplySettings::require_signature`] is set or the push is `restricted`
//!    (`signature_required`). The signature binds the digest, template id and version, phase,
//!    scope and the apply path, so a signed payload cannot be re-aimed at another file.
//! 3. **Policy.** The modes that apply are the union of the push's `pm`, the mode the payload
//!    declares inside itself (`codemantle.policy.mode`, or 0.1.x's `codenucleus`), and the
//!    daemon's own floor ([`ApplySettings::policy_floor`]). `pm` must equal the declared mode
//!    (`policy_mode_mismatch`). Each mode's checks run; none can switch another off:
//!    - `off`: no content checks.
//!    - `read-only`: the config may enable nothing that writes or executes. Every write/exec
//!      tool (`bash`, `edit`, `write`, `patch`, `multiedit`) must be **explicitly** disabled
//!      (`tools.<t> = false`, or its permission `deny`), because OpenCode enables tools that a
//!      config does not mention; `tools.<t> = true` is refused (`read_only_tool_enabled:<t>`);
//!      the permissions `bash` and `edit` may only be `deny`; MCP servers of type `local`
//!      (programs on this host) are refused; so are `plugin`, `formatter`, `lsp` and
//!      `experimental` (they run code), and agents (`agent`, `mode`) that enable a write tool.
//!    - `restricted`: only allowlisted top-level keys (`restricted_key_not_allowed:<k>`) and
//!      allowlisted tools (`restricted_tool_not_allowed:<t>`); write/exec tools that are not
//!      allowlisted must be explicitly disabled; no local MCP servers; the apply path must be
//!      `.opencode/opencode.json`; a valid signature is required. The allowlists are the
//!      daemon's ([`ApplySettings::restricted_keys`], [`ApplySettings::restricted_tools`]),
//!      **intersected** with any `allowedKeys`/`allowedTools` the payload declares: a payload
//!      can narrow the daemon's allowlist, never widen it.
//! 4. **Where.** The apply path is normalised lexically ([`RelPath`]); `..` above the root or
//!    an absolute path is `apply_path_escape`; a path not on [`ApplySettings::allowed_apply_paths`]
//!    (default only `.opencode/opencode.json`) is `apply_path_not_allowed`. At write time every
//!    component is opened from the root fd with `O_NOFOLLOW` (the path guard's walk), so a
//!    symlinked parent is `apply_path_escape` and a symlink as the target is
//!    `apply_path_symlink_not_allowed`: a config file is never written through a link, even
//!    one that stays inside the root.
//! 5. **How.** Runtime configs are written atomically: a temp file in the same directory
//!    (`O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0640), write, `fsync`, keep the current file as
//!    `<file>.prev` (a hard link: same inode, same permissions, nothing copied), `renameat` over
//!    the target, `fsync` the directory. A failure at any step leaves the old file as it was and
//!    removes the temp file. [`ConfigApplier::rollback`] puts `<file>.prev` back.
//! 6. **Session-init** pushes are validated (0.1.50's rules, daemon reference §9.4, with either
//!    `codemantle` or `codenucleus` as the root key) and **not written anywhere**: they are kept
//!    in a [`SessionInitStore`] for the session about to start in the folder the apply path
//!    belongs to (see [`folder_key`]), because a `cc` carries no session id: the control plane
//!    sends it right before the `si` for that folder. The session start takes it with
//!    [`SessionInitStore::take_for_session`] (its folder, else the nearest ancestor's, else
//!    the root's: a 0.1.x control plane always uses the root's path). Entries expire after
//!    [`SESSION_INIT_TTL_MS`]; the store can be backed by a journal tree to survive a restart.
//!
//! Every check runs and every violation is reported (`cv.vd`, at most 32 codes of at most 160
//! characters; a 32nd entry `more_violations:<n>` says how many were left out). Nothing is
//! written unless there are none.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write as _;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex};

use codemantle_protocol::canonical;
use codemantle_protocol::config_signature::{
    ConfigSigningKey, SignatureError, SignedFields, effective_phase_scope,
};
use codemantle_protocol::handshake::Secret;
use codemantle_protocol::limits;
use codemantle_protocol::message::{
    ConfigOutcome, ConfigPhase, ConfigPush, ConfigResult, ConfigScope, PolicyMode,
};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::UnlinkatFlags;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::guard::path::{GuardError, RelPath, RootDir};

/// Where OpenCode reads its project config; the only apply path allowed by default.
pub const DEFAULT_APPLY_PATH: &str = ".opencode/opencode.json";
/// Largest canonical payload accepted (0.1.50's `CONFIG_PUSH_MAX_BYTES`).
pub const MAX_CONFIG_BYTES: usize = 262_144;
/// Suffix of the previous version kept for [`ConfigApplier::rollback`].
pub const PREV_SUFFIX: &str = ".prev";
/// Mode of a written config file (owner rw, group r: OpenCode may run as a group member).
pub const CONFIG_FILE_MODE: u32 = 0o640;
/// Mode of directories created on the way to the apply path.
pub const CONFIG_DIR_MODE: u32 = 0o750;
/// How long a session-init payload waits for its session to start.
pub const SESSION_INIT_TTL_MS: u64 = 15 * 60 * 1000;

/// Tools that write files or execute programs. Kept in step with the control plane's
/// `templates` (which warns a publisher about the same tools).
pub const WRITE_EXEC_TOOLS: &[&str] = &["bash", "edit", "write", "patch", "multiedit"];
/// Top-level OpenCode config keys that make OpenCode run code.
pub const EXEC_CONFIG_KEYS: &[&str] = &["plugin", "formatter", "lsp", "experimental"];
/// Top-level keys that are metadata, allowed in every mode.
pub const METADATA_KEYS: &[&str] = &["$schema", "codemantle", "codenucleus"];
/// Default `restricted` allowlist of top-level keys.
pub const DEFAULT_RESTRICTED_KEYS: &[&str] = &[
    "model",
    "small_model",
    "permission",
    "tools",
    "mcp",
    "instructions",
];
/// Default `restricted` allowlist of tools that may be enabled (read-only tools, no network).
pub const DEFAULT_RESTRICTED_TOOLS: &[&str] =
    &["read", "grep", "glob", "list", "todoread", "todowrite"];

/// The permission key OpenCode checks for a tool (`write`, `patch`, `multiedit` are `edit`).
fn permission_key(tool: &str) -> &str {
    match tool {
        "write" | "patch" | "multiedit" => "edit",
        t => t,
    }
}

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

/// What the operator configures (the daemon config's `[config_push]` section maps onto this).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplySettings {
    /// Relative paths a runtime config may be written to. Empty means
    /// [`DEFAULT_APPLY_PATH`] only.
    pub allowed_apply_paths: Vec<String>,
    /// Refuse unsigned pushes in every mode (default). Turn off only to accept pushes from a
    /// 0.1.x control plane, which cannot sign; `restricted` pushes need a signature anyway.
    pub require_signature: bool,
    /// Checks of this mode apply to every push, whatever the push says.
    pub policy_floor: PolicyMode,
    /// Top-level keys a `restricted` config may set (besides [`METADATA_KEYS`]).
    pub restricted_keys: Vec<String>,
    /// Tools a `restricted` config may enable.
    pub restricted_tools: Vec<String>,
}

impl Default for ApplySettings {
    fn default() -> Self {
        ApplySettings {
            allowed_apply_paths: vec![DEFAULT_APPLY_PATH.to_owned()],
            require_signature: true,
            policy_floor: PolicyMode::Off,
            restricted_keys: DEFAULT_RESTRICTED_KEYS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            restricted_tools: DEFAULT_RESTRICTED_TOOLS
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// A setting the daemon cannot work with; found at start, not at the first push.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "allowed apply path {path:?}: {why} — list paths relative to the project root ending in .json, e.g. {DEFAULT_APPLY_PATH}"
    )]
    BadApplyPath { path: String, why: String },
}

/// One entry of [`ApplySettings::allowed_apply_paths`]: a path relative to the root naming a
/// `.json` file (checked when the daemon config is loaded, and again by [`ConfigApplier::new`]).
pub fn parse_allowed_apply_path(path: &str) -> Result<RelPath, SettingsError> {
    let bad = |why: String| SettingsError::BadApplyPath {
        path: path.to_owned(),
        why,
    };
    let rel = RelPath::parse(path).map_err(|e| bad(e.to_string()))?;
    if rel.is_root() || !path.ends_with(".json") {
        return Err(bad("it must name a .json file".to_owned()));
    }
    Ok(rel)
}

// ---------------------------------------------------------------------------------------------
// Errors of the file operations
// ---------------------------------------------------------------------------------------------

/// Why a write or rollback did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The path is refused (the violation code says which rule).
    #[error("{code}: {detail}")]
    Refused { code: &'static str, detail: String },
    /// There is no `<file>.prev` to roll back to.
    #[error(
        "no previous version of {path} to roll back to — a .prev file exists only after a config was applied over an existing one"
    )]
    NothingToRollBack { path: String },
    /// A system call failed.
    #[error("{op} failed on {path}: {errno}")]
    Io {
        op: &'static str,
        path: String,
        errno: Errno,
    },
}

impl ApplyError {
    /// The violation code for `cv.vd`.
    pub fn code(&self) -> &'static str {
        match self {
            ApplyError::Refused { code, .. } => code,
            ApplyError::NothingToRollBack { .. } => "nothing_to_roll_back",
            ApplyError::Io { .. } => "write_failed",
        }
    }
}

/// A test hook: makes the next runtime write fail at a chosen step, to prove the old file
/// survives. Never set outside tests.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyFault {
    /// Write half the bytes to the temp file, then fail.
    FailAfterPartialWrite,
    /// Do everything up to the final rename, then fail it.
    FailRename,
}

// ---------------------------------------------------------------------------------------------
// Session-init store
// ---------------------------------------------------------------------------------------------

/// An MCP tool a session-init payload lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInitTool {
    pub alias: String,
    pub server_id: String,
    pub version: String,
    /// `remote` or `local`.
    pub kind: String,
    /// `disabled`, `ask` or `allow`.
    pub status: String,
}

/// A validated session-init payload, waiting for its session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInit {
    /// [`folder_key`] of the folder the session will run in.
    pub folder: String,
    pub template_id: String,
    pub template_version: String,
    /// The payload's digest (`pd`).
    pub digest: String,
    /// `off`, `read-only` or `restricted`.
    pub policy_mode: String,
    pub providers: Vec<String>,
    /// `sessionInit.routing` as sent.
    pub routing: Value,
    pub mcp_tools: Vec<SessionInitTool>,
    /// Daemon clock when accepted.
    pub received_ms: u64,
}

/// The environment variable OpenCode reads an inline JSON config from (merged over its config
/// files; see `shared/reference/opencode.md`).
pub const OPENCODE_CONFIG_CONTENT_ENV: &str = "OPENCODE_CONFIG_CONTENT";

impl SessionInit {
    /// The OpenCode inline config (for [`OPENCODE_CONFIG_CONTENT_ENV`]) this payload asks for,
    /// kept minimal: `model` from `routing.defaultModel` (when it is a non-empty string), and
    /// `mcp.<alias>.enabled` (`status != "disabled"`) for each MCP tool, by alias only — the
    /// server definitions themselves come from the project's runtime config. Providers are not
    /// translated: a session-init payload carries no provider settings, only names. `None` when
    /// there is nothing to pass.
    pub fn opencode_config(&self) -> Option<Value> {
        let mut out = Map::new();
        if let Some(model) = self
            .routing
            .get("defaultModel")
            .and_then(Value::as_str)
            .filter(|m| !m.is_empty())
        {
            out.insert("model".to_owned(), Value::String(model.to_owned()));
        }
        let mut mcp = Map::new();
        for tool in self.mcp_tools.iter().filter(|t| !t.alias.is_empty()) {
            let mut entry = Map::new();
            entry.insert("enabled".to_owned(), Value::Bool(tool.status != "disabled"));
            mcp.insert(tool.alias.clone(), Value::Object(entry));
        }
        if !mcp.is_empty() {
            out.insert("mcp".to_owned(), Value::Object(mcp));
        }
        (!out.is_empty()).then_some(Value::Object(out))
    }
}

/// Why the session-init store failed (only its sled backing can).
#[derive(Debug, thiserror::Error)]
pub enum SessionInitStoreError {
    #[error("session-init store: {0}")]
    Storage(#[from] sled::Error),
    #[error("session-init store: cannot encode entry: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Session-init payloads by folder, in memory and optionally in a sled tree (for example
/// `journal.tree("session_init")`) so a daemon restart between `cc` and `si` loses nothing.
/// Entries older than [`SESSION_INIT_TTL_MS`] are ignored and dropped.
pub struct SessionInitStore {
    memory: Mutex<BTreeMap<String, SessionInit>>,
    tree: Option<sled::Tree>,
    ttl_ms: u64,
}

impl fmt::Debug for SessionInitStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionInitStore")
            .field("persistent", &self.tree.is_some())
            .field("ttl_ms", &self.ttl_ms)
            .finish()
    }
}

impl Default for SessionInitStore {
    fn default() -> Self {
        SessionInitStore::in_memory()
    }
}

impl SessionInitStore {
    /// A store that forgets everything on restart.
    pub fn in_memory() -> SessionInitStore {
        SessionInitStore {
            memory: Mutex::new(BTreeMap::new()),
            tree: None,
            ttl_ms: SESSION_INIT_TTL_MS,
        }
    }

    /// A store backed by `tree`; entries already in it are loaded.
    pub fn with_tree(tree: sled::Tree) -> Result<SessionInitStore, SessionInitStoreError> {
        let mut memory = BTreeMap::new();
        for item in tree.iter() {
            let (_, value) = item?;
            // An entry we cannot read (older format) is skipped, not fatal.
            if let Ok(entry) = serde_json::from_slice::<SessionInit>(&value) {
                memory.insert(entry.folder.clone(), entry);
            }
        }
        Ok(SessionInitStore {
            memory: Mutex::new(memory),
            tree: Some(tree),
            ttl_ms: SESSION_INIT_TTL_MS,
        })
    }

    /// Changes how long entries live.
    pub fn with_ttl_ms(mut self, ttl_ms: u64) -> SessionInitStore {
        self.ttl_ms = ttl_ms;
        self
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SessionInit>> {
        // A panic while holding the lock cannot leave the map half-updated (every change is a
        // single insert or remove), so a poisoned lock is still usable.
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores `entry` for its folder, replacing an older one.
    pub fn put(&self, entry: SessionInit) -> Result<(), SessionInitStoreError> {
        if let Some(tree) = &self.tree {
            tree.insert(entry.folder.as_bytes(), serde_json::to_vec(&entry)?)?;
            tree.flush()?;
        }
        self.memory().insert(entry.folder.clone(), entry);
        Ok(())
    }

    /// The live entry for `folder` (a [`folder_key`]), if any.
    pub fn get(&self, folder: &str, now_ms: u64) -> Option<SessionInit> {
        let entry = self.memory().get(folder).cloned()?;
        if self.expired(&entry, now_ms) {
            self.forget(folder);
            return None;
        }
        Some(entry)
    }

    /// Removes and returns the live entry for `folder`: call it when the session starts, so
    /// one push initialises one session.
    pub fn take(&self, folder: &str, now_ms: u64) -> Option<SessionInit> {
        let entry = self.get(folder, now_ms)?;
        self.forget(folder);
        Some(entry)
    }

    /// What a session starting in `folder` (relative to the root) is initialised with: the
    /// live entry of the folder itself or, failing that, of the nearest ancestor up to the
    /// root, the way OpenCode looks for `.opencode/opencode.json` in parent directories. A
    /// 0.1.x control plane always pushes session-init with the default apply path (the root's
    /// folder key `.`), whatever folder the session then starts in; this lookup serves it.
    /// The entry is removed: one push initialises one session.
    pub fn take_for_session(&self, folder: &RelPath, now_ms: u64) -> Option<SessionInit> {
        let comps: Vec<&str> = folder.components().collect();
        (0..=comps.len())
            .rev()
            .find_map(|n| self.take(&join_key(&comps[..n]), now_ms))
    }

    /// Number of entries held (live or not yet noticed as expired).
    pub fn len(&self) -> usize {
        self.memory().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn expired(&self, entry: &SessionInit, now_ms: u64) -> bool {
        now_ms >= entry.received_ms.saturating_add(self.ttl_ms)
    }

    fn forget(&self, folder: &str) {
        self.memory().remove(folder);
        if let Some(tree) = &self.tree {
            if let Err(e) = tree.remove(folder.as_bytes()) {
                tracing::warn!(folder, error = %e, "cannot remove a session-init entry from the journal");
            }
        }
    }
}

/// The key a session-init payload is stored under: the folder whose OpenCode config the apply
/// path is. `.opencode/opencode.json` → `.` (the root); `app/.opencode/opencode.json` →
/// `app`; `app/opencode.json` → `app`. A session started in folder `p` looks up
/// `folder_key_of_session(p)`.
pub fn folder_key(apply_path: &RelPath) -> String {
    let mut comps: Vec<&str> = apply_path.components().collect();
    comps.pop();
    if comps.last() == Some(&".opencode") {
        comps.pop();
    }
    join_key(&comps)
}

/// The key for a session folder (`si.p`, relative to the root; `""`/`.` is the root).
pub fn folder_key_of_session(folder: &RelPath) -> String {
    join_key(&folder.components().collect::<Vec<_>>())
}

fn join_key(comps: &[&str]) -> String {
    if comps.is_empty() {
        ".".to_owned()
    } else {
        comps.join("/")
    }
}

// ---------------------------------------------------------------------------------------------
// The applier
// ---------------------------------------------------------------------------------------------

/// Checks and applies config pushes beneath one project root. Share it by reference; `apply`
/// takes `&self`.
pub struct ConfigApplier {
    root: RootDir,
    allowed_apply_paths: Vec<RelPath>,
    require_signature: bool,
    policy_floor: PolicyMode,
    restricted_keys: BTreeSet<String>,
    restricted_tools: BTreeSet<String>,
    signing_key: ConfigSigningKey,
    session_inits: Arc<SessionInitStore>,
    fault: Mutex<Option<ApplyFault>>,
}

impl fmt::Debug for ConfigApplier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigApplier")
            .field("root", &self.root)
            .field("allowed_apply_paths", &self.allowed_apply_paths)
            .field("require_signature", &self.require_signature)
            .field("policy_floor", &self.policy_floor)
            .field("restricted_keys", &self.restricted_keys)
            .field("restricted_tools", &self.restricted_tools)
            .finish_non_exhaustive()
    }
}

/// What the checks decided, before anything is written.
struct Verdict {
    violations: Vec<String>,
    /// The normalised apply path, when it passed the lexical checks.
    path: Option<RelPath>,
}

impl ConfigApplier {
    /// An applier for `root` (the project root; paths are resolved beneath it) that verifies
    /// signatures with `device_secret` (the key this daemon authenticates with).
    pub fn new(
        root: RootDir,
        device_secret: &Secret,
        settings: ApplySettings,
    ) -> Result<ConfigApplier, SettingsError> {
        let mut allowed = Vec::new();
        let paths = if settings.allowed_apply_paths.is_empty() {
            vec![DEFAULT_APPLY_PATH.to_owned()]
        } else {
            settings.allowed_apply_paths
        };
        for p in paths {
            allowed.push(parse_allowed_apply_path(&p)?);
        }
        Ok(ConfigApplier {
            root,
            allowed_apply_paths: allowed,
            require_signature: settings.require_signature,
            policy_floor: settings.policy_floor,
            restricted_keys: settings.restricted_keys.into_iter().collect(),
            restricted_tools: settings.restricted_tools.into_iter().collect(),
            signing_key: ConfigSigningKey::derive(device_secret),
            session_inits: Arc::new(SessionInitStore::in_memory()),
            fault: Mutex::new(None),
        })
    }

    /// Uses `store` for session-init payloads (e.g. one backed by a journal tree).
    pub fn with_session_init_store(self, store: SessionInitStore) -> ConfigApplier {
        self.with_shared_session_init_store(Arc::new(store))
    }

    /// Uses `store`, shared with whoever consumes the payloads (the session manager).
    pub fn with_shared_session_init_store(mut self, store: Arc<SessionInitStore>) -> ConfigApplier {
        self.session_inits = store;
        self
    }

    /// The session-init store, to share with the session manager (which takes the payloads
    /// when sessions start).
    pub fn shared_session_inits(&self) -> Arc<SessionInitStore> {
        Arc::clone(&self.session_inits)
    }

    /// The session-init payloads received and not yet taken.
    pub fn session_inits(&self) -> &SessionInitStore {
        &self.session_inits
    }

    /// The root configs are applied beneath.
    pub fn root(&self) -> &RootDir {
        &self.root
    }

    #[doc(hidden)]
    pub fn inject_fault(&self, fault: Option<ApplyFault>) {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    fn take_fault(&self) -> Option<ApplyFault> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Checks `push` and, if it passes, applies it (runtime: write the file; session-init:
    /// remember it for the folder's next session). Always answers: `applied`, or `rejected`
    /// with every violation in `vd`. `now_ms` is the daemon clock (the reply's `at`).
    pub fn apply(&self, push: &ConfigPush, now_ms: u64) -> ConfigResult {
        let (phase, _) = effective_phase_scope(push);
        let canonical_text = canonical::canonical_json(&push.config);
        let digest = canonical::digest_text(&canonical_text);
        let mut verdict = self.check(push, &canonical_text, &digest);

        let mut message = "config_rejected";
        if verdict.violations.is_empty() {
            match (&verdict.path, phase) {
                (Some(path), ConfigPhase::Runtime) => {
                    let mut bytes = canonical_text.into_bytes();
                    bytes.push(b'\n');
                    match self.write_atomically(path, &bytes) {
                        Ok(()) => message = "config_applied",
                        Err(e) => {
                            tracing::warn!(path = %path, error = %e, "config push not applied");
                            if matches!(e, ApplyError::Io { .. }) {
                                message = "config_apply_failed";
                            }
                            verdict.violations.push(e.code().to_owned());
                        }
                    }
                }
                (Some(path), ConfigPhase::SessionInit) => {
                    match self.remember_session_init(push, path, &digest, now_ms) {
                        Ok(()) => message = "config_session_init_applied",
                        Err(e) => {
                            tracing::warn!(error = %e, "session-init payload not stored");
                            message = "config_apply_failed";
                            verdict
                                .violations
                                .push("session_init_store_failed".to_owned());
                        }
                    }
                }
                (None, _) => verdict.violations.push("invalid_apply_path".to_owned()),
            }
        }

        let applied = verdict.violations.is_empty();
        if applied {
            tracing::info!(
                template = %push.template_id,
                version = %push.template_version,
                phase = phase.as_str(),
                digest = %digest,
                "config push applied"
            );
        } else {
            tracing::warn!(
                template = %push.template_id,
                version = %push.template_version,
                violations = ?verdict.violations,
                "config push rejected"
            );
        }
        ConfigResult {
            request_id: push.request_id,
            phase: push.phase,
            scope: push.scope,
            ok: applied,
            template_id: push.template_id.clone(),
            template_version: push.template_version.clone(),
            outcome: if applied {
                ConfigOutcome::Applied
            } else {
                ConfigOutcome::Rejected
            },
            digest,
            at_ms: now_ms,
            apply_path: if applied {
                verdict.path.as_ref().map(rel_text)
            } else {
                None
            },
            violations: bounded_violations(verdict.violations),
            signature_alg: push.signature_alg.clone(),
            signature: push.signature.clone(),
            policy_mode: push.policy_mode,
            message: Some(message.to_owned()),
        }
    }

    /// Every check that needs no filesystem access.
    fn check(&self, push: &ConfigPush, canonical_text: &str, digest: &str) -> Verdict {
        let mut v: Vec<String> = Vec::new();
        let (phase, scope) = effective_phase_scope(push);

        // 1. Integrity and size.
        if digest != push.digest {
            v.push("digest_mismatch".into());
        }
        if canonical_text.len() > MAX_CONFIG_BYTES {
            v.push("config_payload_too_large".into());
        }
        let Some(cfg) = push.config.as_object() else {
            v.push("config_not_object".into());
            return Verdict {
                violations: v,
                path: None,
            };
        };

        // 2. Phase and scope pair up.
        match (phase, scope) {
            (ConfigPhase::SessionInit, ConfigScope::SessionInit)
            | (ConfigPhase::Runtime, ConfigScope::Full) => {}
            (ConfigPhase::SessionInit, _) => v.push("session_init_scope_mismatch".into()),
            (ConfigPhase::Runtime, _) => v.push("runtime_scope_mismatch".into()),
        }

        // 3. Policy modes: the push's, the payload's own, the daemon's floor.
        let pushed_mode = push.policy_mode.unwrap_or(PolicyMode::Off);
        let declared = declared_policy(cfg);
        let mut modes = BTreeSet::from([mode_rank(pushed_mode), mode_rank(self.policy_floor)]);
        match &declared {
            DeclaredPolicy::Absent => {}
            DeclaredPolicy::Invalid => v.push("policy_mode_invalid".into()),
            DeclaredPolicy::Mode(m) => {
                modes.insert(mode_rank(*m));
                if *m != pushed_mode {
                    v.push("policy_mode_mismatch".into());
                }
            }
        }
        let read_only = modes.contains(&mode_rank(PolicyMode::ReadOnly));
        let restricted = modes.contains(&mode_rank(PolicyMode::Restricted));

        // 4. Signature.
        let fields = SignedFields::of_push(push);
        match self.signing_key.verify(
            &fields,
            push.signature_alg.as_deref(),
            push.signature.as_deref(),
        ) {
            Ok(()) => {}
            Err(SignatureError::Missing) => {
                if self.require_signature || restricted {
                    v.push("signature_required".into());
                }
            }
            Err(e) => v.push(e.code().into()),
        }

        // 5. The apply path, lexically.
        let path = match RelPath::parse(&push.apply_path) {
            Err(GuardError::Escape { .. } | GuardError::Absolute { .. }) => {
                v.push("apply_path_escape".into());
                None
            }
            Err(_) => {
                v.push("invalid_apply_path".into());
                None
            }
            Ok(rel) if rel.is_root() || !push.apply_path.ends_with(".json") => {
                v.push("invalid_apply_path".into());
                None
            }
            Ok(rel) => {
                if !self.allowed_apply_paths.contains(&rel) {
                    v.push("apply_path_not_allowed".into());
                }
                if restricted && rel_text(&rel) != DEFAULT_APPLY_PATH {
                    v.push("restricted_policy_path_violation".into());
                }
                Some(rel)
            }
        };

        // 6. Content.
        match phase {
            ConfigPhase::Runtime => {
                if read_only {
                    check_read_only(cfg, &mut v);
                }
                if restricted {
                    self.check_restricted(cfg, &mut v);
                }
            }
            ConfigPhase::SessionInit => {
                check_session_init(cfg, &mut v);
                if read_only || restricted {
                    for alias in session_init_local_tools(cfg) {
                        v.push(format!("local_mcp_not_allowed:{alias}"));
                    }
                }
            }
        }

        Verdict {
            violations: v,
            path,
        }
    }

    fn check_restricted(&self, cfg: &Map<String, Value>, v: &mut Vec<String>) {
        let policy = root_meta(cfg).and_then(|m| m.get("policy"));
        let narrowed = |daemon: &BTreeSet<String>, key: &str, v: &mut Vec<String>| match policy
            .and_then(|p| p.get(key))
        {
            None => daemon.clone(),
            Some(Value::Array(items)) => {
                let declared: BTreeSet<&str> = items.iter().filter_map(Value::as_str).collect();
                daemon
                    .iter()
                    .filter(|k| declared.contains(k.as_str()))
                    .cloned()
                    .collect()
            }
            Some(_) => {
                v.push(format!("policy_allowlist_invalid:{key}"));
                BTreeSet::new()
            }
        };
        let keys = narrowed(&self.restricted_keys, "allowedKeys", v);
        let tools = narrowed(&self.restricted_tools, "allowedTools", v);

        for key in cfg.keys() {
            if !METADATA_KEYS.contains(&key.as_str()) && !keys.contains(key) {
                v.push(format!("restricted_key_not_allowed:{key}"));
            }
        }
        if let Some(enabled) = cfg.get("tools").and_then(Value::as_object) {
            for (tool, on) in enabled {
                if on != &Value::Bool(false) && !tools.contains(tool) {
                    v.push(format!("restricted_tool_not_allowed:{tool}"));
                }
            }
        }
        for tool in WRITE_EXEC_TOOLS {
            if !tools.contains(*tool) && !tool_disabled(cfg, tool) {
                v.push(format!("restricted_tool_not_disabled:{tool}"));
            }
        }
        for alias in local_mcp_servers(cfg) {
            v.push(format!("local_mcp_not_allowed:{alias}"));
        }
    }

    fn remember_session_init(
        &self,
        push: &ConfigPush,
        path: &RelPath,
        digest: &str,
        now_ms: u64,
    ) -> Result<(), SessionInitStoreError> {
        let body = push
            .config
            .as_object()
            .and_then(root_meta)
            .cloned()
            .unwrap_or_default();
        let init = body.get("sessionInit").and_then(Value::as_object);
        let providers = init
            .and_then(|i| i.get("providers"))
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        let routing = init
            .and_then(|i| i.get("routing"))
            .cloned()
            .unwrap_or(Value::Object(Map::new()));
        let text = |t: &Value, k: &str| t.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let mcp_tools = init
            .and_then(|i| i.get("mcp"))
            .and_then(|m| m.get("tools"))
            .and_then(Value::as_array)
            .map(|tools| {
                tools
                    .iter()
                    .map(|t| SessionInitTool {
                        alias: text(t, "alias"),
                        server_id: text(t, "serverId"),
                        version: text(t, "version"),
                        kind: text(t, "type"),
                        status: text(t, "status"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        self.session_inits.put(SessionInit {
            folder: folder_key(path),
            template_id: push.template_id.clone(),
            template_version: push.template_version.clone(),
            digest: digest.to_owned(),
            policy_mode: push
                .policy_mode
                .unwrap_or(PolicyMode::Off)
                .as_str()
                .to_owned(),
            providers,
            routing,
            mcp_tools,
            received_ms: now_ms,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Files
    // -----------------------------------------------------------------------------------------

    /// Opens (creating if needed, mode [`CONFIG_DIR_MODE`]) every directory of `dirs` from the
    /// root fd, one component at a time with `O_NOFOLLOW`: no `..` (the path is normalised), no
    /// symlink, so the result is a directory beneath the root reached only through real
    /// directories.
    fn open_dirs(&self, dirs: &[&str], create: bool) -> Result<OwnedFd, ApplyError> {
        let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let mut cur: Option<OwnedFd> = None;
        let mut walked = String::new();
        for comp in dirs {
            if !walked.is_empty() {
                walked.push('/');
            }
            walked.push_str(comp);
            let at = cur.as_ref().map_or(self.root.as_fd(), |fd| fd.as_fd());
            let next = match nix::fcntl::openat(at, *comp, flags, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match nix::sys::stat::mkdirat(
                        at,
                        *comp,
                        Mode::from_bits_truncate(CONFIG_DIR_MODE),
                    ) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(errno) => {
                            return Err(ApplyError::Io {
                                op: "mkdir",
                                path: walked,
                                errno,
                            });
                        }
                    }
                    nix::fcntl::openat(at, *comp, flags, Mode::empty())
                        .map_err(|errno| dir_error(at, comp, &walked, errno))?
                }
                Err(errno) => return Err(dir_error(at, comp, &walked, errno)),
            };
            cur = Some(next);
        }
        match cur {
            Some(fd) => Ok(fd),
            None => {
                nix::fcntl::openat(self.root.as_fd(), ".", flags, Mode::empty()).map_err(|errno| {
                    ApplyError::Io {
                        op: "open",
                        path: ".".to_owned(),
                        errno,
                    }
                })
            }
        }
    }

    /// What is at `name` in `dir` now: nothing, a regular file, or a refusal.
    fn existing_file(dir: BorrowedFd<'_>, name: &str, shown: &str) -> Result<bool, ApplyError> {
        match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Err(Errno::ENOENT) => Ok(false),
            Err(errno) => Err(ApplyError::Io {
                op: "stat",
                path: shown.to_owned(),
                errno,
            }),
            Ok(st) => {
                let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
                if kind == SFlag::S_IFREG {
                    Ok(true)
                } else if kind == SFlag::S_IFLNK {
                    Err(ApplyError::Refused {
                        code: "apply_path_symlink_not_allowed",
                        detail: format!(
                            "{shown} is a symlink; the daemon never writes a config through a link — remove it"
                        ),
                    })
                } else {
                    Err(ApplyError::Refused {
                        code: "apply_path_not_a_file",
                        detail: format!("{shown} exists and is not a regular file"),
                    })
                }
            }
        }
    }

    /// Temp-file, fsync, keep `.prev`, rename, fsync dir. See the module doc.
    fn write_atomically(&self, rel: &RelPath, bytes: &[u8]) -> Result<(), ApplyError> {
        let shown = rel_text(rel);
        let comps: Vec<&str> = rel.components().collect();
        let Some((name, dirs)) = comps.split_last() else {
            return Err(ApplyError::Refused {
                code: "invalid_apply_path",
                detail: "the apply path names the root".to_owned(),
            });
        };
        let dir = self.open_dirs(dirs, true)?;
        let had_previous = Self::existing_file(dir.as_fd(), name, &shown)?;

        let tmp_name = format!("{name}.tmp-{}", random_suffix()?);
        let io = |op: &'static str| {
            let path = shown.clone();
            move |errno: Errno| ApplyError::Io { op, path, errno }
        };
        let tmp = nix::fcntl::openat(
            dir.as_fd(),
            tmp_name.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(CONFIG_FILE_MODE),
        )
        .map_err(io("create temp file"))?;

        let result = self.fill_and_swap(
            dir.as_fd(),
            tmp,
            &tmp_name,
            name,
            had_previous,
            bytes,
            &shown,
        );
        if result.is_err() {
            // Best effort: the temp file may already be gone (renamed) or never have been
            // written; either way no half-written file may linger next to the config.
            let _ =
                nix::unistd::unlinkat(dir.as_fd(), tmp_name.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn fill_and_swap(
        &self,
        dir: BorrowedFd<'_>,
        tmp: OwnedFd,
        tmp_name: &str,
        name: &str,
        had_previous: bool,
        bytes: &[u8],
        shown: &str,
    ) -> Result<(), ApplyError> {
        let io = |op: &'static str| {
            let path = shown.to_owned();
            move |errno: Errno| ApplyError::Io { op, path, errno }
        };
        let fault = self.take_fault();
        // The umask may have narrowed the mode given to open; set it exactly.
        nix::sys::stat::fchmod(&tmp, Mode::from_bits_truncate(CONFIG_FILE_MODE))
            .map_err(io("chmod"))?;
        let mut file = std::fs::File::from(tmp);
        if fault == Some(ApplyFault::FailAfterPartialWrite) {
            let half = bytes.len() / 2;
            file.write_all(&bytes[..half])
                .map_err(|e| io("write")(errno_of(&e)))?;
            return Err(io("write")(Errno::EIO));
        }
        file.write_all(bytes)
            .map_err(|e| io("write")(errno_of(&e)))?;
        nix::unistd::fsync(&file).map_err(io("fsync"))?;
        drop(file);

        if had_previous {
            // `.prev` becomes a second name for the current file: same inode and permissions,
            // nothing read or copied. Linked under a temp name first, then renamed, so an
            // existing `.prev` is replaced atomically.
            let prev = format!("{name}{PREV_SUFFIX}");
            let prev_tmp = format!("{prev}.tmp-{}", random_suffix()?);
            nix::unistd::linkat(dir, name, dir, prev_tmp.as_str(), AtFlags::empty())
                .map_err(io("link previous version"))?;
            if let Err(errno) = nix::fcntl::renameat(dir, prev_tmp.as_str(), dir, prev.as_str()) {
                let _ = nix::unistd::unlinkat(dir, prev_tmp.as_str(), UnlinkatFlags::NoRemoveDir);
                return Err(io("keep previous version")(errno));
            }
        }

        if fault == Some(ApplyFault::FailRename) {
            return Err(io("rename")(Errno::EIO));
        }
        nix::fcntl::renameat(dir, tmp_name, dir, name).map_err(io("rename"))?;
        sync_dir(dir).map_err(io("fsync directory"))?;
        Ok(())
    }

    /// Puts `<apply path>.prev` back in place of the apply path (the `.prev` is consumed). The
    /// path must be allowed, as for a push.
    pub fn rollback(&self, apply_path: &str) -> Result<(), ApplyError> {
        let rel = match RelPath::parse(apply_path) {
            Ok(rel) if !rel.is_root() => rel,
            Ok(_) | Err(_) => {
                return Err(ApplyError::Refused {
                    code: "invalid_apply_path",
                    detail: format!("{apply_path:?} is not a relative path to a file"),
                });
            }
        };
        if !self.allowed_apply_paths.contains(&rel) {
            return Err(ApplyError::Refused {
                code: "apply_path_not_allowed",
                detail: format!("{} is not an allowed apply path", rel_text(&rel)),
            });
        }
        let shown = rel_text(&rel);
        let comps: Vec<&str> = rel.components().collect();
        let Some((name, dirs)) = comps.split_last() else {
            return Err(ApplyError::Refused {
                code: "invalid_apply_path",
                detail: "the apply path names the root".to_owned(),
            });
        };
        let dir = match self.open_dirs(dirs, false) {
            Err(ApplyError::Io {
                errno: Errno::ENOENT,
                ..
            }) => return Err(ApplyError::NothingToRollBack { path: shown }),
            other => other?,
        };
        let prev = format!("{name}{PREV_SUFFIX}");
        if !Self::existing_file(dir.as_fd(), &prev, &format!("{shown}{PREV_SUFFIX}"))? {
            return Err(ApplyError::NothingToRollBack { path: shown });
        }
        // The current file may have become a symlink since; renaming over it replaces the link
        // itself, never its target, so that is safe.
        nix::fcntl::renameat(dir.as_fd(), prev.as_str(), dir.as_fd(), *name).map_err(|errno| {
            ApplyError::Io {
                op: "rename",
                path: shown.clone(),
                errno,
            }
        })?;
        sync_dir(dir.as_fd()).map_err(|errno| ApplyError::Io {
            op: "fsync directory",
            path: shown,
            errno,
        })?;
        tracing::info!(
            path = apply_path,
            "config rolled back to the previous version"
        );
        Ok(())
    }
}

/// `fsync` a directory given as an `O_PATH` fd (which cannot be synced itself).
fn sync_dir(dir: BorrowedFd<'_>) -> Result<(), Errno> {
    let fd = nix::fcntl::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    nix::unistd::fsync(&fd)
}

fn errno_of(e: &std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_raw)
}

/// Maps a failed directory open: a symlink (or a non-directory) on the way is a refusal.
fn dir_error(at: BorrowedFd<'_>, comp: &str, walked: &str, errno: Errno) -> ApplyError {
    let is_link = nix::sys::stat::fstatat(at, comp, AtFlags::AT_SYMLINK_NOFOLLOW)
        .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK)
        .unwrap_or(false);
    match errno {
        Errno::ELOOP | Errno::ENOTDIR if is_link => ApplyError::Refused {
            code: "apply_path_escape",
            detail: format!(
                "{walked} is a symlink; configs are only written through real directories beneath the root"
            ),
        },
        Errno::ENOTDIR => ApplyError::Refused {
            code: "apply_path_not_a_directory",
            detail: format!("{walked} is not a directory"),
        },
        errno => ApplyError::Io {
            op: "open directory",
            path: walked.to_owned(),
            errno,
        },
    }
}

fn random_suffix() -> Result<String, ApplyError> {
    use base64::Engine as _;
    let mut raw = [0u8; 6];
    getrandom::getrandom(&mut raw).map_err(|_| ApplyError::Io {
        op: "getrandom",
        path: String::new(),
        errno: Errno::EIO,
    })?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw))
}

/// `a/b/c` (or `.` for the root), never shortened.
fn rel_text(rel: &RelPath) -> String {
    join_key(&rel.components().collect::<Vec<_>>())
}

/// At most [`limits::MAX_VIOLATIONS`] codes of at most [`limits::VIOLATION`] characters.
fn bounded_violations(mut v: Vec<String>) -> Vec<String> {
    let max_len = limits::VIOLATION.max;
    for s in &mut v {
        if s.chars().count() > max_len {
            *s = s.chars().take(max_len).collect();
        }
    }
    let max = limits::MAX_VIOLATIONS;
    if v.len() > max {
        let left_out = v.len() - (max - 1);
        v.truncate(max - 1);
        v.push(format!("more_violations:{left_out}"));
    }
    v
}

// ---------------------------------------------------------------------------------------------
// Policy content checks
// ---------------------------------------------------------------------------------------------

fn mode_rank(m: PolicyMode) -> u8 {
    match m {
        PolicyMode::Off => 0,
        PolicyMode::ReadOnly => 1,
        PolicyMode::Restricted => 2,
    }
}

enum DeclaredPolicy {
    Absent,
    Invalid,
    Mode(PolicyMode),
}

/// Our metadata object: `codemantle`, or 0.1.x's `codenucleus`.
fn root_meta(cfg: &Map<String, Value>) -> Option<&Map<String, Value>> {
    cfg.get("codemantle")
        .or_else(|| cfg.get("codenucleus"))
        .and_then(Value::as_object)
}

fn declared_policy(cfg: &Map<String, Value>) -> DeclaredPolicy {
    let mut found = None;
    for key in ["codemantle", "codenucleus"] {
        let Some(mode) = cfg
            .get(key)
            .and_then(|m| m.get("policy"))
            .and_then(|p| p.get("mode"))
        else {
            continue;
        };
        match mode.as_str().and_then(PolicyMode::parse) {
            None => return DeclaredPolicy::Invalid,
            Some(m) => match found {
                None => found = Some(m),
                Some(prev) if prev != m => return DeclaredPolicy::Invalid,
                Some(_) => {}
            },
        }
    }
    found.map_or(DeclaredPolicy::Absent, DeclaredPolicy::Mode)
}

/// Whether a permission value (`"deny"`, or an object of pattern → action) denies everything.
fn denies_all(v: &Value) -> bool {
    match v {
        Value::String(s) => s == "deny",
        Value::Object(m) => !m.is_empty() && m.values().all(|x| x == "deny"),
        _ => false,
    }
}

/// Whether `tool` is explicitly off: `tools.<tool> = false` (or `tools["*"] = false` without
/// `tools.<tool> = true`), or its permission denies everything.
fn tool_disabled(cfg: &Map<String, Value>, tool: &str) -> bool {
    let tools = cfg.get("tools").and_then(Value::as_object);
    let own = tools.and_then(|t| t.get(tool));
    if own == Some(&Value::Bool(false)) {
        return true;
    }
    if own.is_none() && tools.and_then(|t| t.get("*")) == Some(&Value::Bool(false)) {
        return true;
    }
    let permission = cfg.get("permission");
    match permission {
        Some(Value::String(s)) => s == "deny",
        Some(Value::Object(p)) => p.get(permission_key(tool)).is_some_and(denies_all),
        _ => false,
    }
}

/// Whether a tool key (possibly a `*` glob) covers `tool`.
fn glob_covers(pattern: &str, tool: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == tool,
        Some((prefix, rest)) => {
            // One `*` is what configs use (`*`, `mcp_*`); more are treated as matching all.
            rest.contains('*')
                || (tool.starts_with(prefix)
                    && tool.len() >= prefix.len() + rest.len()
                    && tool.ends_with(rest))
        }
    }
}

fn local_mcp_servers(cfg: &Map<String, Value>) -> Vec<String> {
    cfg.get("mcp")
        .and_then(Value::as_object)
        .map(|servers| {
            servers
                .iter()
                .filter(|(_, s)| {
                    s.get("type").and_then(Value::as_str) != Some("remote")
                        || s.get("command").is_some()
                })
                .map(|(alias, _)| alias.clone())
                .collect()
        })
        .unwrap_or_default()
}

fn check_read_only(cfg: &Map<String, Value>, v: &mut Vec<String>) {
    if let Some(tools) = cfg.get("tools").and_then(Value::as_object) {
        for (name, on) in tools {
            if on != &Value::Bool(false) && WRITE_EXEC_TOOLS.iter().any(|t| glob_covers(name, t)) {
                v.push(format!("read_only_tool_enabled:{name}"));
            }
        }
    }
    for tool in WRITE_EXEC_TOOLS {
        let explicitly_on = cfg
            .get("tools")
            .and_then(|t| t.get(*tool))
            .is_some_and(|x| x != &Value::Bool(false));
        if !explicitly_on && !tool_disabled(cfg, tool) {
            v.push(format!("read_only_tool_not_disabled:{tool}"));
        }
    }
    match cfg.get("permission") {
        None => {}
        Some(Value::Object(p)) => {
            for key in ["bash", "edit"] {
                if p.get(key).is_some_and(|x| !denies_all(x)) {
                    v.push(format!("read_only_permission_not_deny:{key}"));
                }
            }
        }
        Some(other) if !denies_all(other) => {
            v.push("read_only_permission_not_deny:*".into());
        }
        Some(_) => {}
    }
    for alias in local_mcp_servers(cfg) {
        v.push(format!("local_mcp_not_allowed:{alias}"));
    }
    for key in EXEC_CONFIG_KEYS {
        match cfg.get(*key) {
            None | Some(Value::Bool(false)) => {}
            Some(_) => v.push(format!("read_only_exec_key:{key}")),
        }
    }
    for agents_key in ["agent", "mode"] {
        let Some(agents) = cfg.get(agents_key).and_then(Value::as_object) else {
            continue;
        };
        for (agent, def) in agents {
            if let Some(tools) = def.get("tools").and_then(Value::as_object) {
                for (name, on) in tools {
                    if on != &Value::Bool(false)
                        && WRITE_EXEC_TOOLS.iter().any(|t| glob_covers(name, t))
                    {
                        v.push(format!("read_only_agent_tool_enabled:{agent}.{name}"));
                    }
                }
            }
            if let Some(p) = def.get("permission").and_then(Value::as_object) {
                for key in ["bash", "edit"] {
                    if p.get(key).is_some_and(|x| !denies_all(x)) {
                        v.push(format!("read_only_agent_permission_not_deny:{agent}.{key}"));
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Session-init rules (daemon reference §9.4)
// ---------------------------------------------------------------------------------------------

const SESSION_INIT_ROOT_KEYS: &[&str] = &[
    "schemaVersion",
    "templateId",
    "templateVersion",
    "phase",
    "scope",
    "policy",
    "sessionInit",
];
const SESSION_INIT_KEYS: &[&str] = &["providers", "routing", "mcp"];
const SESSION_INIT_TOOL_KEYS: &[&str] = &["alias", "serverId", "version", "type", "status"];
/// Keys that never belong in a session-init payload (it carries no endpoints or secrets).
const FORBIDDEN_SESSION_INIT_KEYS: &[&str] = &[
    "url",
    "urls",
    "header",
    "headers",
    "command",
    "commands",
    "executable",
    "exec",
    "env",
    "environment",
    "secret",
    "secrets",
    "token",
    "tokens",
    "runtime",
];

fn slug(s: &str) -> bool {
    let b = s.as_bytes();
    (2..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

fn wire_version(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

fn session_init_body(cfg: &Map<String, Value>) -> Option<&Map<String, Value>> {
    if cfg.len() != 1 {
        return None;
    }
    root_meta(cfg)
}

fn check_session_init(cfg: &Map<String, Value>, v: &mut Vec<String>) {
    let root_key = cfg.keys().next().map(String::as_str).unwrap_or("");
    if cfg.len() != 1 || !matches!(root_key, "codemantle" | "codenucleus") {
        v.push("session_init_scope_violation".into());
        return;
    }
    let Some(body) = session_init_body(cfg) else {
        v.push("session_init_root_not_object".into());
        return;
    };
    if body
        .keys()
        .any(|k| !SESSION_INIT_ROOT_KEYS.contains(&k.as_str()))
    {
        v.push("session_init_root_unknown_fields".into());
    }
    if body.get("phase").and_then(Value::as_str) != Some("session-init") {
        v.push("session_init_phase_invalid".into());
    }
    if body.get("scope").and_then(Value::as_str) != Some("session-init") {
        v.push("session_init_scope_invalid".into());
    }
    let Some(init) = body.get("sessionInit").and_then(Value::as_object) else {
        v.push("session_init_payload_missing".into());
        return;
    };
    if init
        .keys()
        .any(|k| !SESSION_INIT_KEYS.contains(&k.as_str()))
    {
        v.push("session_init_payload_unknown_fields".into());
    }
    if let Some(p) = init.get("providers") {
        match p.as_array() {
            None => v.push("session_init_providers_invalid".into()),
            Some(items) => {
                if items.len() > 64 || !items.iter().all(|x| x.as_str().is_some_and(slug)) {
                    v.push("session_init_provider_invalid".into());
                }
            }
        }
    }
    if let Some(mcp) = init.get("mcp") {
        let tools = mcp
            .as_object()
            .filter(|m| m.len() == 1)
            .and_then(|m| m.get("tools"))
            .and_then(Value::as_array);
        match tools {
            None => v.push("session_init_mcp_invalid".into()),
            Some(tools) if tools.len() > 128 => v.push("session_init_mcp_invalid".into()),
            Some(tools) => {
                for t in tools {
                    let Some(t) = t.as_object() else {
                        v.push("session_init_mcp_scope_violation".into());
                        break;
                    };
                    if t.keys()
                        .any(|k| !SESSION_INIT_TOOL_KEYS.contains(&k.as_str()))
                    {
                        v.push("session_init_mcp_scope_violation".into());
                        break;
                    }
                    let s = |k: &str| t.get(k).and_then(Value::as_str);
                    if !s("alias").is_some_and(slug) {
                        v.push("session_init_mcp_alias_invalid".into());
                    }
                    if !s("serverId").is_some_and(slug) {
                        v.push("session_init_mcp_server_invalid".into());
                    }
                    if !s("version").is_some_and(wire_version) {
                        v.push("session_init_mcp_version_invalid".into());
                    }
                    if !matches!(s("type"), Some("remote" | "local")) {
                        v.push("session_init_mcp_type_invalid".into());
                    }
                    if !matches!(s("status"), Some("disabled" | "ask" | "allow")) {
                        v.push("session_init_mcp_status_invalid".into());
                    }
                }
            }
        }
    }
    if let Some(r) = init.get("routing") {
        if !r.is_object() {
            v.push("session_init_routing_invalid".into());
        }
    }
    let mut path = format!("cfg.{root_key}");
    forbidden_fields(&cfg[root_key], &mut path, v);
}

fn forbidden_fields(value: &Value, path: &mut String, v: &mut Vec<String>) {
    match value {
        Value::Object(m) => {
            for (k, x) in m {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                if FORBIDDEN_SESSION_INIT_KEYS.contains(&k.to_ascii_lowercase().as_str()) {
                    v.push(format!("forbidden_field:{path}"));
                }
                forbidden_fields(x, path, v);
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                forbidden_fields(x, path, v);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn session_init_local_tools(cfg: &Map<String, Value>) -> Vec<String> {
    session_init_body(cfg)
        .and_then(|b| b.get("sessionInit"))
        .and_then(|i| i.get("mcp"))
        .and_then(|m| m.get("tools"))
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter(|t| t.get("type").and_then(Value::as_str) == Some("local"))
                .map(|t| {
                    t.get("alias")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn globs() {
        assert!(glob_covers("*", "bash"));
        assert!(glob_covers("ba*", "bash"));
        assert!(glob_covers("*sh", "bash"));
        assert!(!glob_covers("mcp_*", "bash"));
        assert!(glob_covers("bash", "bash"));
        assert!(!glob_covers("bas", "bash"));
    }

    #[test]
    fn disabled_means_explicitly_off() {
        let cfg = obj(json!({ "tools": { "bash": false }, "permission": { "edit": "deny" } }));
        assert!(tool_disabled(&cfg, "bash"));
        assert!(
            tool_disabled(&cfg, "write"),
            "write is governed by the edit permission"
        );
        let cfg = obj(json!({ "tools": { "*": false, "edit": true } }));
        assert!(tool_disabled(&cfg, "bash"));
        assert!(!tool_disabled(&cfg, "edit"));
        let cfg = obj(json!({ "permission": { "bash": { "git *": "allow", "*": "deny" } } }));
        assert!(!tool_disabled(&cfg, "bash"));
        assert!(!tool_disabled(&obj(json!({})), "bash"));
    }

    #[test]
    fn folder_keys() {
        let k = |p: &str| folder_key(&RelPath::parse(p).unwrap());
        assert_eq!(k(".opencode/opencode.json"), ".");
        assert_eq!(k("app/.opencode/opencode.json"), "app");
        assert_eq!(k("app/opencode.json"), "app");
        assert_eq!(folder_key_of_session(&RelPath::parse(".").unwrap()), ".");
        assert_eq!(
            folder_key_of_session(&RelPath::parse("./app/").unwrap()),
            "app"
        );
    }

    #[test]
    fn violations_are_bounded() {
        let v: Vec<String> = (0..40)
            .map(|i| format!("v{i}:{}", "x".repeat(200)))
            .collect();
        let b = bounded_violations(v);
        assert_eq!(b.len(), 32);
        assert!(b.iter().all(|s| s.chars().count() <= 160));
        assert_eq!(b[31], "more_violations:9");
    }
}
