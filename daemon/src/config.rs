//! `config`: the daemon's configuration, from a TOML file, `CODEMANTLE_*` environment variables
//! and command-line flags (flags win over env, env over the file).
//!
//! Why so strict: this file decides which control plane may drive the host and which
//! directories it may touch. A typo that silently falls back to a default (0.1.50 parsed every
//! number with `parseInt` and ran with `NaN`) is a misconfiguration nobody sees. So:
//!
//! - every key is known; an unknown key is an error that names it (`server.ulr: unknown key`);
//! - every problem is reported at once, as `<key>: <what is wrong> — <how to fix>`, which is
//!   what `codemantle-daemon --check-config` prints;
//! - files that hold or steer trust are checked: the config file must not be world-writable,
//!   the device key file must be 0600 or stricter and owned by the daemon's user, the data
//!   directory (and every ancestor that is not sticky) must not be world-writable.
//!
//! The file (default [`DEFAULT_CONFIG_PATH`]):
//!
//! ```toml
//! data_dir = "/var/lib/codemantle"      # sled journal lives here (default shown)
//! handshake_timeout_s = 10
//! exposed_ports = [3000, 8080]          # optional: local ports announced to the control plane
//!                                       # (`pl`) for its port proxy; at most 24. The proxy
//!                                       # reaches only these and running sessions' ports
//!                                       # (127.0.0.1 only; see `proxy`)
//!
//! [server]
//! url = "wss://cp.example.com/ws"       # ws:// only for loopback or a lab
//! ca_file = "/etc/codemantle/ca.pem"    # optional: trust these CAs too (added to the system roots)
//! pin_sha256 = "…"                      # optional: SHA-256 of the server's leaf certificate
//!                                       # (DER), 64 hex or base64 characters
//! [device]
//! id = "build-box-0001"                 # 12–32 of A-Z a-z 0-9 _ -
//! key_file = "/etc/codemantle/device.key"  # the per-device secret; 0600, owned by the daemon
//!
//! [roots]                               # alias → directory; `cwd` is the project root
//! cwd = "/srv/project"
//!
//! [reconnect]
//! base_ms = 1000
//! cap_ms = 30000
//! stable_after_s = 60                   # a link this old resets the back-off
//!
//! [idempotency]
//! retention_s = 86400                   # how long request outcomes are remembered
//!
//! [process]                           # programs the daemon may start; see `config::process`
//! run_as = "codemantle-agent"
//! [process.allowlist]
//! git = "/usr/bin/git"
//!
//! [config_push]                       # which config pushes to accept; see `config::config_push`
//! require_signature = true
//!
//! [git]                               # how git requests run; see `config::git`
//! timeout_s = 120
//!
//! [session]                           # how OpenCode sessions run; see `config::session`
//! port_range = "4100-4199"
//!
//! [log]
//! format = "text"                       # or "json"
//! level = "info"                        # tracing filter; RUST_LOG overrides
//! ```
//!
//! Environment: `CODEMANTLE_SERVER_URL`, `CODEMANTLE_SERVER_CA_FILE`,
//! `CODEMANTLE_SERVER_PIN_SHA256`, `CODEMANTLE_DEVICE_ID`, `CODEMANTLE_KEY_FILE`,
//! `CODEMANTLE_DATA_DIR`, `CODEMANTLE_ROOT_<ALIAS>` (alias lower-cased, e.g.
//! `CODEMANTLE_ROOT_CWD`), `CODEMANTLE_RECONNECT_BASE_MS`, `CODEMANTLE_RECONNECT_CAP_MS`,
//! `CODEMANTLE_RECONNECT_STABLE_AFTER_S`, `CODEMANTLE_HANDSHAKE_TIMEOUT_S`,
//! `CODEMANTLE_IDEMPOTENCY_RETENTION_S`, `CODEMANTLE_EXPOSED_PORTS` (comma-separated, e.g.
//! `3000,8080`), `CODEMANTLE_LOG_FORMAT`, `CODEMANTLE_LOG_LEVEL`, and those of the
//! `[process]`, `[config_push]`, `[git]` and `[session]` sections (listed in their modules)
//! (and `CODEMANTLE_CONFIG` for the file's path, read by `main`). An empty variable counts as
//! unset. Other `CODEMANTLE_*` variables are reported as warnings, not errors, because the
//! operator CLI shares the prefix.
//!
//! Secrets: the device key is read by [`read_device_key`] into a [`Secret`]; nothing in
//! [`DaemonConfig`] is secret, and its `Debug` redacts secret-named query parameters of the
//! URL, so the config can be logged whole.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::redact::{Secret, redact_text};

pub mod config_push;
pub mod git;
pub mod process;
pub mod session;

pub use git::GitSettings;
pub use process::ProcessConfig;
pub use session::SessionConfig;

/// Where the config file is read from unless `--config`/`CODEMANTLE_CONFIG` say otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/codemantle/daemon.toml";
/// The data directory unless configured.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/codemantle";

/// Largest config file read, in bytes.
const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest device key file read, in bytes.
const MAX_KEY_BYTES: u64 = 4096;

/// Where a setting came from (for messages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File,
    Env(String),
    Flag(String),
}

/// A raw setting before validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Raw {
    Str(String),
    Int(i64),
    /// A TOML boolean (env and flags give booleans as text).
    Bool(bool),
    /// Anything else TOML can hold (named in the type error).
    Other(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Setting {
    raw: Raw,
    source: Source,
}

/// One configuration problem: `<key>: <what> — <fix>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub what: String,
    pub fix: String,
}

impl Problem {
    fn new(key: impl Into<String>, what: impl Into<String>, fix: impl Into<String>) -> Problem {
        Problem {
            key: key.into(),
            what: what.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} — {}", self.key, self.what, self.fix)
    }
}

/// Every problem found while loading; the config is unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the daemon configuration has {} problem(s):",
            self.problems.len()
        )?;
        for p in &self.problems {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The control plane's WebSocket URL, parsed.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// The URL as configured; dialled verbatim.
    pub raw: String,
    /// `wss://`.
    pub tls: bool,
    /// Host name or IP literal (IPv6 without brackets), for TCP and TLS SNI.
    pub host: String,
    /// Explicit port, or 443/80.
    pub port: u16,
}

impl fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ServerUrl({:?})", redact_text(&self.raw))
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_text(&self.raw))
    }
}

impl ServerUrl {
    /// Whether the host is a loopback name or address.
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub url: ServerUrl,
    /// PEM file of CA certificates trusted in addition to the system roots.
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the server's leaf certificate (DER); the TLS handshake must match it.
    pub pin_sha256: Option<[u8; 32]>,
}

/// `[device]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub id: String,
    /// File holding the per-device key; read with [`read_device_key`].
    pub key_file: PathBuf,
}

/// `[reconnect]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectConfig {
    pub base_ms: u64,
    pub cap_ms: u64,
    pub stable_after_s: u64,
}

/// `[idempotency]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyConfig {
    pub retention_s: u64,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing_subscriber::EnvFilter` directive (`info`, `codemantle_daemon=debug`, ...).
    pub level: String,
}

/// The validated configuration. `Debug` is safe to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    pub server: ServerConfig,
    pub device: DeviceConfig,
    pub data_dir: PathBuf,
    /// Alias → absolute directory; always contains `cwd`.
    pub roots: BTreeMap<String, PathBuf>,
    pub reconnect: ReconnectConfig,
    pub handshake_timeout_s: u64,
    pub idempotency: IdempotencyConfig,
    pub log: LogConfig,
    /// Local TCP ports announced to the control plane in `pl` (ascending, unique, at most
    /// [`MAX_EXPOSED_PORTS`]); empty means none. Sessions will add the ports they open. The
    /// port proxy ([`crate::proxy`]) serves these and running sessions' ports, nothing else.
    pub exposed_ports: Vec<u16>,
    /// `[process]`: what the process guard may start, as whom, how confined ([`process`]).
    pub process: ProcessConfig,
    /// `[config_push]`: which config pushes this host accepts, and where they may write
    /// ([`config_push`]).
    pub config_push: crate::config_apply::ApplySettings,
    /// `[git]`: how git requests run ([`git`]); only used when `git` is allowlisted.
    pub git: GitSettings,
    /// `[session]`: how OpenCode sessions run ([`session`]); only used when `opencode` is
    /// allowlisted.
    pub session: SessionConfig,
}

/// Most ports `exposed_ports` may list (0.1.50 reported at most 24).
pub const MAX_EXPOSED_PORTS: usize = 24;

/// A loaded configuration and the non-fatal remarks about it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: DaemonConfig,
    pub warnings: Vec<Problem>,
}

struct KeyDef {
    key: &'static str,
    env: &'static str,
}

const KEYS: &[KeyDef] = &[
    KeyDef {
        key: "server.url",
        env: "CODEMANTLE_SERVER_URL",
    },
    KeyDef {
        key: "server.ca_file",
        env: "CODEMANTLE_SERVER_CA_FILE",
    },
    KeyDef {
        key: "server.pin_sha256",
        env: "CODEMANTLE_SERVER_PIN_SHA256",
    },
    KeyDef {
        key: "device.id",
        env: "CODEMANTLE_DEVICE_ID",
    },
    KeyDef {
        key: "device.key_file",
        env: "CODEMANTLE_KEY_FILE",
    },
    KeyDef {
        key: "data_dir",
        env: "CODEMANTLE_DATA_DIR",
    },
    KeyDef {
        key: "handshake_timeout_s",
        env: "CODEMANTLE_HANDSHAKE_TIMEOUT_S",
    },
    KeyDef {
        key: "reconnect.base_ms",
        env: "CODEMANTLE_RECONNECT_BASE_MS",
    },
    KeyDef {
        key: "reconnect.cap_ms",
        env: "CODEMANTLE_RECONNECT_CAP_MS",
    },
    KeyDef {
        key: "reconnect.stable_after_s",
        env: "CODEMANTLE_RECONNECT_STABLE_AFTER_S",
    },
    KeyDef {
        key: "idempotency.retention_s",
        env: "CODEMANTLE_IDEMPOTENCY_RETENTION_S",
    },
    KeyDef {
        key: "exposed_ports",
        env: "CODEMANTLE_EXPOSED_PORTS",
    },
    KeyDef {
        key: "log.format",
        env: "CODEMANTLE_LOG_FORMAT",
    },
    KeyDef {
        key: "log.level",
        env: "CODEMANTLE_LOG_LEVEL",
    },
    // `[process]` (see the `process` module; the allowlist is file-only).
    KeyDef {
        key: "process.run_as",
        env: "CODEMANTLE_PROCESS_RUN_AS",
    },
    KeyDef {
        key: "process.min_protection",
        env: "CODEMANTLE_PROCESS_MIN_PROTECTION",
    },
    KeyDef {
        key: "process.max_open_files",
        env: "CODEMANTLE_PROCESS_MAX_OPEN_FILES",
    },
    KeyDef {
        key: "process.max_processes",
        env: "CODEMANTLE_PROCESS_MAX_PROCESSES",
    },
    KeyDef {
        key: "process.max_address_space_mb",
        env: "CODEMANTLE_PROCESS_MAX_ADDRESS_SPACE_MB",
    },
    KeyDef {
        key: "process.max_cpu_seconds",
        env: "CODEMANTLE_PROCESS_MAX_CPU_SECONDS",
    },
    KeyDef {
        key: "process.env_pass",
        env: "CODEMANTLE_PROCESS_ENV_PASS",
    },
    KeyDef {
        key: "process.connect_ports",
        env: "CODEMANTLE_PROCESS_CONNECT_PORTS",
    },
    KeyDef {
        key: "process.system_paths",
        env: "CODEMANTLE_PROCESS_SYSTEM_PATHS",
    },
    KeyDef {
        key: "process.private_dir",
        env: "CODEMANTLE_PROCESS_PRIVATE_DIR",
    },
    // `[config_push]` (see the `config_push` module).
    KeyDef {
        key: "config_push.allowed_apply_paths",
        env: "CODEMANTLE_CONFIG_PUSH_ALLOWED_APPLY_PATHS",
    },
    KeyDef {
        key: "config_push.require_signature",
        env: "CODEMANTLE_CONFIG_PUSH_REQUIRE_SIGNATURE",
    },
    KeyDef {
        key: "config_push.policy_floor",
        env: "CODEMANTLE_CONFIG_PUSH_POLICY_FLOOR",
    },
    KeyDef {
        key: "config_push.restricted_keys",
        env: "CODEMANTLE_CONFIG_PUSH_RESTRICTED_KEYS",
    },
    KeyDef {
        key: "config_push.restricted_tools",
        env: "CODEMANTLE_CONFIG_PUSH_RESTRICTED_TOOLS",
    },
    // `[git]` (see the `git` module).
    KeyDef {
        key: "git.timeout_s",
        env: "CODEMANTLE_GIT_TIMEOUT_S",
    },
    KeyDef {
        key: "git.allow_http",
        env: "CODEMANTLE_GIT_ALLOW_HTTP",
    },
    KeyDef {
        key: "git.allow_ssh",
        env: "CODEMANTLE_GIT_ALLOW_SSH",
    },
    // `[session]` (see the `session` module).
    KeyDef {
        key: "session.port_range",
        env: "CODEMANTLE_SESSION_PORT_RANGE",
    },
    KeyDef {
        key: "session.connect_ports",
        env: "CODEMANTLE_SESSION_CONNECT_PORTS",
    },
    KeyDef {
        key: "session.start_timeout_s",
        env: "CODEMANTLE_SESSION_START_TIMEOUT_S",
    },
    KeyDef {
        key: "session.request_timeout_s",
        env: "CODEMANTLE_SESSION_REQUEST_TIMEOUT_S",
    },
    KeyDef {
        key: "session.stop_grace_s",
        env: "CODEMANTLE_SESSION_STOP_GRACE_S",
    },
    KeyDef {
        key: "session.journal_max_bytes",
        env: "CODEMANTLE_SESSION_JOURNAL_MAX_BYTES",
    },
    KeyDef {
        key: "session.journal_max_chunks",
        env: "CODEMANTLE_SESSION_JOURNAL_MAX_CHUNKS",
    },
    KeyDef {
        key: "session.jit_env_allowlist",
        env: "CODEMANTLE_SESSION_JIT_ENV_ALLOWLIST",
    },
];

/// Env variables with the prefix that are not settings but are known (not warned about).
const OTHER_KNOWN_ENV: &[&str] = &["CODEMANTLE_CONFIG"];
const ROOT_ENV_PREFIX: &str = "CODEMANTLE_ROOT_";

fn key_def(key: &str) -> Option<&'static KeyDef> {
    KEYS.iter().find(|d| d.key == key)
}

/// One layer of settings (file, env or flags), keyed by dotted name (`server.url`,
/// `roots.cwd`). Layers are merged with [`Layer::overlay`]; the top one wins per key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layer {
    settings: BTreeMap<String, Setting>,
}

impl Layer {
    /// Set `key` (a known dotted key or `roots.<alias>`) to a string value. `main` uses this
    /// for flags, with `Source::Flag("--server-url")` etc. Unknown keys are a programming
    /// error and are reported by validation like any unknown key.
    pub fn set(&mut self, key: &str, value: impl Into<String>, source: Source) {
        self.settings.insert(
            key.to_owned(),
            Setting {
                raw: Raw::Str(value.into()),
                source,
            },
        );
    }

    /// `self` with every key of `top` replacing ours.
    pub fn overlay(mut self, top: Layer) -> Layer {
        self.settings.extend(top.settings);
        self
    }

    /// Parse TOML text into a layer, collecting problems (syntax, unknown keys, wrong types).
    pub fn from_toml_str(text: &str) -> (Layer, Vec<Problem>) {
        let mut layer = Layer::default();
        let mut problems = Vec::new();
        let table: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                let at = e
                    .span()
                    .map(|s| {
                        let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                        format!(" at line {line}")
                    })
                    .unwrap_or_default();
                problems.push(Problem::new(
                    "config file",
                    format!("is not valid TOML{at}: {}", e.message()),
                    "fix the syntax (see the example in the daemon's documentation)",
                ));
                return (layer, problems);
            }
        };
        layer.walk_table("", table, &mut problems);
        (layer, problems)
    }

    fn walk_table(&mut self, prefix: &str, table: toml::Table, problems: &mut Vec<Problem>) {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if prefix == "roots" {
                match v {
                    toml::Value::String(s) => self.set(&key, s, Source::File),
                    other => problems.push(Problem::new(
                        &key,
                        format!(
                            "expected a directory path string, found {}",
                            other.type_str()
                        ),
                        format!("write it as {key} = \"/srv/project\""),
                    )),
                }
                continue;
            }
            if prefix == "process" && k == "allowlist" {
                process::walk_allowlist(self, v, problems);
                continue;
            }
            if let toml::Value::Array(items) = &v {
                if process::is_list_key(&key)
                    || config_push::is_list_key(&key)
                    || session::is_list_key(&key)
                {
                    let raw = process::list_from_toml(items);
                    let source = Source::File;
                    self.settings.insert(key, Setting { raw, source });
                    continue;
                }
            }
            let is_section = matches!(
                k.as_str(),
                "server"
                    | "device"
                    | "roots"
                    | "reconnect"
                    | "idempotency"
                    | "log"
                    | "process"
                    | "config_push"
                    | "git"
                    | "session"
            ) && prefix.is_empty();
            match (is_section, v) {
                (true, toml::Value::Table(t)) => self.walk_table(&key, t, problems),
                (true, other) => problems.push(Problem::new(
                    &key,
                    format!("expected a table, found {}", other.type_str()),
                    format!("write it as a [{key}] section"),
                )),
                (false, v) => {
                    if key_def(&key).is_none() {
                        problems.push(unknown_key(&key));
                        continue;
                    }
                    let raw = match v {
                        toml::Value::String(s) => Raw::Str(s),
                        toml::Value::Integer(i) => Raw::Int(i),
                        toml::Value::Boolean(b) => Raw::Bool(b),
                        // `exposed_ports`: carried as the same comma-separated text
                        // the env variable uses.
                        toml::Value::Array(items) if key == "exposed_ports" => {
                            match items
                                .iter()
                                .map(|i| i.as_integer().map(|n| n.to_string()))
                                .collect::<Option<Vec<String>>>()
                            {
                                Some(ns) => Raw::Str(ns.join(",")),
                                None => Raw::Other("an array with non-integer items"),
                            }
                        }
                        other => Raw::Other(other.type_str()),
                    };
                    self.settings.insert(
                        key,
                        Setting {
                            raw,
                            source: Source::File,
                        },
                    );
                }
            }
        }
    }

    /// Build a layer from environment variables (pass `std::env::vars()`). Returns the layer and
    /// the names of unrecognised `CODEMANTLE_*` variables.
    pub fn from_env(vars: impl IntoIterator<Item = (String, String)>) -> (Layer, Vec<String>) {
        let mut layer = Layer::default();
        let mut unknown = Vec::new();
        for (name, value) in vars {
            if !name.starts_with("CODEMANTLE_") || OTHER_KNOWN_ENV.contains(&name.as_str()) {
                continue;
            }
            if value.is_empty() {
                continue;
            }
            if let Some(def) = KEYS.iter().find(|d| d.env == name) {
                layer.set(def.key, value, Source::Env(name));
            } else if let Some(alias) = name.strip_prefix(ROOT_ENV_PREFIX) {
                let key = format!("roots.{}", alias.to_ascii_lowercase());
                layer.set(&key, value, Source::Env(name));
            } else {
                unknown.push(name);
            }
        }
        unknown.sort();
        (layer, unknown)
    }

    fn take(&mut self, key: &str) -> Option<Setting> {
        self.settings.remove(key)
    }
}

fn unknown_key(key: &str) -> Problem {
    let section = key.rsplit_once('.').map(|(s, _)| s);
    let known: Vec<&str> = KEYS
        .iter()
        .filter(|d| d.key.rsplit_once('.').map(|(s, _)| s) == section)
        .map(|d| d.key)
        .collect();
    let fix = if known.is_empty() {
        "remove it or check the spelling; sections are [server], [device], [roots], [reconnect], [idempotency], [log], [process], [config_push], [git], [session]".to_owned()
    } else {
        format!(
            "remove it or check the spelling; known keys here: {}",
            known.join(", ")
        )
    };
    Problem::new(key, "unknown key", fix)
}

fn from_note(source: &Source) -> String {
    match source {
        Source::File => String::new(),
        Source::Env(name) => format!(" (from {name})"),
        Source::Flag(flag) => format!(" (from {flag})"),
    }
}

/// Read the config file at `path` (if `required` is false, a missing file is an empty layer),
/// overlay `env` and `flags`, and validate. Every problem is returned at once.
pub fn load(
    path: &Path,
    required: bool,
    env: impl IntoIterator<Item = (String, String)>,
    flags: Layer,
) -> Result<Loaded, ConfigErrors> {
    let mut problems = Vec::new();
    let file = match read_config_file(path, required) {
        Ok(Some(text)) => {
            let (layer, mut p) = Layer::from_toml_str(&text);
            for problem in &mut p {
                if problem.key == "config file" {
                    problem.what = format!("{} {}", path.display(), problem.what);
                }
            }
            problems.append(&mut p);
            layer
        }
        Ok(None) => Layer::default(),
        Err(p) => {
            problems.push(p);
            Layer::default()
        }
    };
    let (env_layer, unknown_env) = Layer::from_env(env);
    let merged = file.overlay(env_layer).overlay(flags);
    let (config, mut more, mut warnings) = validate(merged);
    problems.append(&mut more);
    if let Some(config) = &config {
        let file = path.exists().then_some(path);
        problems.append(&mut trust_files_outside_roots(config, file));
    }
    for name in unknown_env {
        warnings.push(Problem::new(
            name,
            "is not a daemon setting and is ignored",
            "unset it for the daemon if it was meant as one (check the spelling)",
        ));
    }
    match config {
        Some(config) if problems.is_empty() => Ok(Loaded { config, warnings }),
        _ => Err(ConfigErrors { problems }),
    }
}

fn read_config_file(path: &Path, required: bool) -> Result<Option<String>, Problem> {
    let key = "config file";
    let shown = path.display();
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(None),
        Err(e) => {
            return Err(Problem::new(
                key,
                format!("cannot open {shown}: {e}"),
                format!(
                    "create it (see the example in the documentation) or pass --config / CODEMANTLE_CONFIG; the default is {DEFAULT_CONFIG_PATH}"
                ),
            ));
        }
    };
    // Checked on the open file, so what we check is what we read.
    let meta = file
        .metadata()
        .map_err(|e| Problem::new(key, format!("cannot stat {shown}: {e}"), "check the file"))?;
    if !meta.is_file() {
        return Err(Problem::new(
            key,
            format!("{shown} is not a regular file"),
            "point --config at the TOML file",
        ));
    }
    if meta.mode() & 0o002 != 0 {
        return Err(Problem::new(
            key,
            format!(
                "{shown} is world-writable (mode {:04o}): anyone on this host could point the daemon at another control plane",
                meta.mode() & 0o7777
            ),
            format!("chmod o-w {shown}"),
        ));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid && meta.uid() != 0 {
        return Err(Problem::new(
            key,
            format!(
                "{shown} is owned by uid {}, neither root nor the daemon's user (uid {euid})",
                meta.uid()
            ),
            format!("chown root {shown} (or the daemon's user)"),
        ));
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(Problem::new(
            key,
            format!(
                "{shown} is {} bytes; the limit is {MAX_CONFIG_BYTES}",
                meta.len()
            ),
            "point --config at the daemon's TOML file",
        ));
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| {
            Problem::new(
                key,
                format!("cannot read {shown}: {e}"),
                "the file must be UTF-8 TOML",
            )
        })?;
    Ok(Some(text))
}

/// Validation state: the merged layer being consumed, and what was found wrong.
struct Validator {
    layer: Layer,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Validator {
    /// A string setting, or a type problem.
    fn string(&mut self, key: &str) -> Option<(String, Source)> {
        let s = self.layer.take(key)?;
        match s.raw {
            Raw::Str(v) => Some((v, s.source)),
            Raw::Int(i) => {
                self.problems.push(Problem::new(
                    key,
                    format!("expected a string, found the number {i}"),
                    format!("quote it: {key} = \"{i}\""),
                ));
                None
            }
            Raw::Bool(b) => {
                self.problems.push(Problem::new(
                    key,
                    format!("expected a string, found the boolean {b}"),
                    format!("quote it: {key} = \"{b}\""),
                ));
                None
            }
            Raw::Other(t) => {
                self.problems.push(Problem::new(
                    key,
                    format!("expected a string, found {t}"),
                    format!("write it as {key} = \"...\""),
                ));
                None
            }
        }
    }

    /// A whole-number setting within `range`, or `default`.
    fn number(&mut self, key: &str, default: u64, min: u64, max: u64) -> u64 {
        let Some(s) = self.layer.take(key) else {
            return default;
        };
        let note = from_note(&s.source);
        let value = match (&s.raw, &s.source) {
            (Raw::Int(i), _) => u64::try_from(*i).ok(),
            (Raw::Str(v), Source::Env(_) | Source::Flag(_)) => v.trim().parse::<u64>().ok(),
            (Raw::Str(v), Source::File) => {
                self.problems.push(Problem::new(
                    key,
                    format!("expected a number, found the string {v:?}"),
                    format!("write it without quotes: {key} = {default}"),
                ));
                return default;
            }
            (Raw::Bool(b), _) => {
                self.problems.push(Problem::new(
                    key,
                    format!("expected a number, found the boolean {b}"),
                    format!("write it as {key} = {default}"),
                ));
                return default;
            }
            (Raw::Other(t), _) => {
                self.problems.push(Problem::new(
                    key,
                    format!("expected a number, found {t}"),
                    format!("write it as {key} = {default}"),
                ));
                return default;
            }
        };
        match value {
            Some(v) if (min..=max).contains(&v) => v,
            _ => {
                let shown = match &s.raw {
                    Raw::Int(i) => i.to_string(),
                    Raw::Str(v) => format!("{v:?}"),
                    Raw::Bool(b) => b.to_string(),
                    Raw::Other(t) => (*t).to_owned(),
                };
                self.problems.push(Problem::new(
                    key,
                    format!("{shown}{note} is not a whole number from {min} to {max}"),
                    format!("use a value in that range (default {default})"),
                ));
                default
            }
        }
    }

    /// A true/false setting, or `default`. The file takes TOML booleans; env and flags take
    /// `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`.
    fn boolean(&mut self, key: &str, default: bool) -> bool {
        let Some(s) = self.layer.take(key) else {
            return default;
        };
        let parsed = match (&s.raw, &s.source) {
            (Raw::Bool(b), _) => Some(*b),
            (Raw::Str(v), Source::Env(_) | Source::Flag(_)) => {
                match v.trim().to_ascii_lowercase().as_str() {
                    "true" | "1" | "yes" | "on" => Some(true),
                    "false" | "0" | "no" | "off" => Some(false),
                    _ => None,
                }
            }
            _ => None,
        };
        parsed.unwrap_or_else(|| {
            let shown = match &s.raw {
                Raw::Str(v) => format!("{v:?}"),
                Raw::Int(i) => i.to_string(),
                Raw::Bool(b) => b.to_string(),
                Raw::Other(t) => (*t).to_owned(),
            };
            self.problems.push(Problem::new(
                key,
                format!("{shown}{} is not true or false", from_note(&s.source)),
                format!("write it as {key} = {default} (no quotes; env: true or false)"),
            ));
            default
        })
    }

    fn missing(&mut self, key: &str, env: &str, flag: &str, example: &str) {
        self.problems.push(Problem::new(
            key,
            "is required but not set",
            format!("set {key} = {example} in the config file, or {env}, or {flag}"),
        ));
    }

    fn absolute_path(&mut self, key: &str, value: &str, source: &Source) -> Option<PathBuf> {
        let path = PathBuf::from(value);
        if path.is_absolute() {
            Some(path)
        } else {
            self.problems.push(Problem::new(
                key,
                format!("{value:?}{} is not an absolute path", from_note(source)),
                "write the full path, starting with /",
            ));
            None
        }
    }
}

/// Validate a merged layer. Returns the config if nothing required was missing or broken (the
/// caller still refuses it if any problem was found), plus problems and warnings.
fn validate(layer: Layer) -> (Option<DaemonConfig>, Vec<Problem>, Vec<Problem>) {
    let mut v = Validator {
        layer,
        problems: Vec::new(),
        warnings: Vec::new(),
    };

    let url = match v.string("server.url") {
        None => {
            if !v.problems.iter().any(|p| p.key == "server.url") {
                v.missing(
                    "server.url",
                    "CODEMANTLE_SERVER_URL",
                    "--server-url",
                    "\"wss://control-plane.example/ws\"",
                );
            }
            None
        }
        Some((raw, source)) => match parse_server_url(&raw) {
            Ok(url) => {
                if !url.tls && !url.is_loopback() {
                    v.warnings.push(Problem::new(
                        "server.url",
                        format!("{url} is plain ws:// to a non-loopback host: commands and file names cross the network unencrypted"),
                        "use wss:// unless this is an isolated lab network",
                    ));
                }
                Some(url)
            }
            Err(what) => {
                v.problems.push(Problem::new(
                    "server.url",
                    format!("{:?}{} {what}", redact_text(&raw), from_note(&source)),
                    "use wss://host[:port]/path (ws:// only for a loopback or lab control plane), e.g. wss://cp.example.com/ws",
                ));
                None
            }
        },
    };

    let ca_file = v.string("server.ca_file").and_then(|(value, source)| {
        let path = v.absolute_path("server.ca_file", &value, &source)?;
        match check_ca_file(&path) {
            Ok(()) => Some(path),
            Err((what, fix)) => {
                v.problems.push(Problem::new("server.ca_file", what, fix));
                None
            }
        }
    });

    let pin_sha256 = v.string("server.pin_sha256").and_then(|(value, source)| {
        match parse_pin(&value) {
            Some(pin) => Some(pin),
            None => {
                v.problems.push(Problem::new(
                    "server.pin_sha256",
                    format!("{value:?}{} is not a SHA-256 digest (64 hex or 43/44 base64 characters)", from_note(&source)),
                    "compute it from the server certificate: openssl x509 -in cert.pem -outform DER | sha256sum",
                ));
                None
            }
        }
    });

    let device_id = match v.string("device.id") {
        None => {
            if !v.problems.iter().any(|p| p.key == "device.id") {
                v.missing(
                    "device.id",
                    "CODEMANTLE_DEVICE_ID",
                    "--device-id",
                    "\"build-box-0001\"",
                );
            }
            None
        }
        Some((id, source)) => {
            if is_device_id(&id) {
                Some(id)
            } else {
                v.problems.push(Problem::new(
                    "device.id",
                    format!("{id:?}{} is not a valid device id", from_note(&source)),
                    "use 12 to 32 characters from A-Z a-z 0-9 _ - (the control plane requires this), e.g. build-box-0001",
                ));
                None
            }
        }
    };

    let key_file = match v.string("device.key_file") {
        None => {
            if !v.problems.iter().any(|p| p.key == "device.key_file") {
                v.missing(
                    "device.key_file",
                    "CODEMANTLE_KEY_FILE",
                    "--key-file",
                    "\"/etc/codemantle/device.key\"",
                );
            }
            None
        }
        Some((value, source)) => v
            .absolute_path("device.key_file", &value, &source)
            .and_then(|path| match check_key_file_path(&path) {
                Ok(()) => Some(path),
                Err((what, fix)) => {
                    v.problems.push(Problem::new("device.key_file", what, fix));
                    None
                }
            }),
    };

    let data_dir = {
        let (value, source) = v
            .string("data_dir")
            .unwrap_or_else(|| (DEFAULT_DATA_DIR.to_owned(), Source::File));
        v.absolute_path("data_dir", &value, &source)
            .and_then(|path| match check_data_dir(&path) {
                Ok(()) => Some(path),
                Err((what, fix)) => {
                    v.problems.push(Problem::new("data_dir", what, fix));
                    None
                }
            })
    };

    // Roots: every remaining `roots.*` key.
    let root_keys: Vec<String> = v
        .layer
        .settings
        .keys()
        .filter(|k| k.starts_with("roots."))
        .cloned()
        .collect();
    let mut roots = BTreeMap::new();
    for key in root_keys {
        let alias = key["roots.".len()..].to_owned();
        let Some((value, source)) = v.string(&key) else {
            continue;
        };
        if !is_root_alias(&alias) {
            v.problems.push(Problem::new(
                &key,
                format!("{alias:?} is not a valid root alias"),
                "use 1 to 16 characters from A-Z a-z 0-9 _ -",
            ));
            continue;
        }
        if KEYS.iter().any(|d| d.key == alias) {
            v.warnings.push(Problem::new(
                &key,
                format!("a root named {alias:?} looks like the top-level setting {alias} placed after [roots]"),
                format!("in TOML every key after a [section] header belongs to that section; move {alias} above the first [section] if it was meant as a setting"),
            ));
        }
        let Some(path) = v.absolute_path(&key, &value, &source) else {
            continue;
        };
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {
                roots.insert(alias, path);
            }
            Ok(_) => v.problems.push(Problem::new(
                &key,
                format!("{} is not a directory", path.display()),
                "point the root at a directory",
            )),
            Err(e) => v.problems.push(Problem::new(
                &key,
                format!("{}{}: {e}", path.display(), from_note(&source)),
                "create the directory or fix the path (the daemon does not create roots)",
            )),
        }
    }
    if !roots.contains_key("cwd") && !v.problems.iter().any(|p| p.key == "roots.cwd") {
        v.missing(
            "roots.cwd",
            "CODEMANTLE_ROOT_CWD",
            "--root cwd=/srv/project",
            "\"/srv/project\" (under [roots])",
        );
    }

    let reconnect_base = v.number("reconnect.base_ms", 1000, 1, 3_600_000);
    let reconnect_cap = v.number("reconnect.cap_ms", 30_000, 1, 3_600_000);
    if reconnect_cap < reconnect_base {
        v.problems.push(Problem::new(
            "reconnect.cap_ms",
            format!("{reconnect_cap} is smaller than reconnect.base_ms ({reconnect_base})"),
            "make cap_ms at least base_ms",
        ));
    }
    let stable_after_s = v.number("reconnect.stable_after_s", 60, 0, 86_400);
    let handshake_timeout_s = v.number("handshake_timeout_s", 10, 1, 300);
    let retention_s = v.number("idempotency.retention_s", 86_400, 60, 30 * 86_400);
    let exposed_ports = match v.string("exposed_ports") {
        None => Vec::new(),
        Some((list, source)) => match parse_ports(&list) {
            Ok(ports) => ports,
            Err(what) => {
                v.problems.push(Problem::new(
                    "exposed_ports",
                    format!("{list:?}{} {what}", from_note(&source)),
                    format!(
                        "list up to {MAX_EXPOSED_PORTS} TCP ports from 1 to 65535, e.g. exposed_ports = [3000, 8080] (env: CODEMANTLE_EXPOSED_PORTS=3000,8080)"
                    ),
                ));
                Vec::new()
            }
        },
    };

    let process = process::validate_process(&mut v, &roots, data_dir.as_deref());
    let config_push = config_push::validate_config_push(&mut v);
    let git = git::validate_git(&mut v, &process);
    let session = session::validate_session(&mut v, &process);

    let format = match v.string("log.format") {
        None => LogFormat::Text,
        Some((f, source)) => match f.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            _ => {
                v.problems.push(Problem::new(
                    "log.format",
                    format!("{f:?}{} is not a log format", from_note(&source)),
                    "use \"text\" (journald, terminals) or \"json\"",
                ));
                LogFormat::Text
            }
        },
    };
    let level = match v.string("log.level") {
        None => "info".to_owned(),
        Some((l, source)) => {
            if tracing_subscriber::EnvFilter::try_new(&l).is_err() {
                v.problems.push(Problem::new(
                    "log.level",
                    format!("{l:?}{} is not a log filter", from_note(&source)),
                    "use error, warn, info, debug or trace (or a tracing filter like codemantle_daemon=debug)",
                ));
            }
            l
        }
    };

    // Whatever is left was never consumed: unknown keys (from flags or a future layer).
    let leftovers: Vec<String> = v.layer.settings.keys().cloned().collect();
    for key in leftovers {
        v.problems.push(unknown_key(&key));
    }

    let config = match (url, device_id, key_file, data_dir) {
        (Some(url), Some(id), Some(key_file), Some(data_dir)) => Some(DaemonConfig {
            server: ServerConfig {
                url,
                ca_file,
                pin_sha256,
            },
            device: DeviceConfig { id, key_file },
            data_dir,
            roots,
            reconnect: ReconnectConfig {
                base_ms: reconnect_base,
                cap_ms: reconnect_cap,
                stable_after_s,
            },
            handshake_timeout_s,
            idempotency: IdempotencyConfig { retention_s },
            log: LogConfig { format, level },
            exposed_ports,
            process,
            config_push,
            git,
            session,
        }),
        _ => None,
    };
    (config, v.problems, v.warnings)
}

/// The files that hold or steer the daemon's trust (device key, journal, config file) must not
/// lie inside a root: everything in a root is reachable by commands from the control plane,
/// which could then read the key, rewrite the journal or, once files can be written, re-point
/// the daemon at another control plane (0.1.50's `cu` takeover, its §15.1.3).
fn trust_files_outside_roots(config: &DaemonConfig, config_file: Option<&Path>) -> Vec<Problem> {
    let roots: Vec<(&String, PathBuf)> = config
        .roots
        .iter()
        .map(|(alias, p)| (alias, real_prefix(p)))
        .collect();
    let mut checks: Vec<(&str, PathBuf, &str)> = vec![
        (
            "device.key_file",
            config.device.key_file.clone(),
            "move the key file outside every root",
        ),
        (
            "data_dir",
            config.data_dir.clone(),
            "choose a data_dir outside every root",
        ),
    ];
    if let Some(f) = config_file {
        checks.push((
            "config file",
            f.to_owned(),
            "keep the config file outside every root (e.g. /etc/codemantle)",
        ));
    }
    let mut problems = Vec::new();
    for (key, path, fix) in checks {
        let real = real_prefix(&path);
        for (alias, root) in &roots {
            if real.starts_with(root) {
                problems.push(Problem::new(
                    key,
                    format!(
                        "{} is inside root `{alias}` ({}): commands from the control plane could reach it",
                        path.display(),
                        root.display()
                    ),
                    fix,
                ));
            }
        }
    }
    problems
}

/// `path` with its longest existing prefix resolved by the kernel (symlinks, `..`), and the
/// rest appended as written.
fn real_prefix(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut cur = path;
    loop {
        if let Ok(real) = std::fs::canonicalize(cur) {
            return rest.iter().rev().fold(real, |acc: PathBuf, c| acc.join(c));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                cur = parent;
            }
            _ => return path.to_owned(),
        }
    }
}

/// Parse a `ws://` or `wss://` URL. The error says what is wrong (without the fix).
pub fn parse_server_url(raw: &str) -> Result<ServerUrl, String> {
    let (tls, rest) = if let Some(rest) = raw.strip_prefix("wss://") {
        (true, rest)
    } else if let Some(rest) = raw.strip_prefix("ws://") {
        (false, rest)
    } else {
        let scheme = raw.split_once("://").map_or("no", |(s, _)| s);
        return Err(format!(
            "has {scheme} scheme; the control plane is reached over WebSocket (ws:// or wss://)"
        ));
    };
    if raw.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or control characters".to_owned());
    }
    if raw.contains('#') {
        return Err("has a #fragment, which WebSocket URLs cannot have".to_owned());
    }
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    if authority.contains('@') {
        return Err(
            "carries user:password@; credentials never go in the URL (the device key file holds the secret)"
                .to_owned(),
        );
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| "has an unclosed [IPv6] host".to_owned())?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| "has junk after the [IPv6] host".to_owned())?,
            ),
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("has no host".to_owned());
    }
    let port = match port {
        None => {
            if tls {
                443
            } else {
                80
            }
        }
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("has an invalid port {p:?}"))?,
    };
    Ok(ServerUrl {
        raw: raw.to_owned(),
        tls,
        host: host.to_owned(),
        port,
    })
}

/// 64 hex characters, or standard/URL-safe base64 (padded or not) of 32 bytes; an optional
/// `sha256/` prefix is accepted.
fn parse_pin(value: &str) -> Option<[u8; 32]> {
    let v = value.trim();
    let v = v.strip_prefix("sha256/").unwrap_or(v);
    let bytes = if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
        (0..32)
            .map(|i| u8::from_str_radix(&v[2 * i..2 * i + 2], 16).ok())
            .collect::<Option<Vec<u8>>>()?
    } else {
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
            .iter()
            .find_map(|e| e.decode(v).ok())?
    };
    bytes.try_into().ok()
}

/// A comma-separated port list (`3000,8080`; spaces allowed) → ascending, unique ports.
fn parse_ports(list: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.parse::<u16>() {
            Ok(p) if p != 0 => ports.push(p),
            _ => return Err(format!("has {item:?}, which is not a port from 1 to 65535")),
        }
    }
    ports.sort_unstable();
    ports.dedup();
    if ports.len() > MAX_EXPOSED_PORTS {
        return Err(format!(
            "lists {} ports; at most {MAX_EXPOSED_PORTS} are announced",
            ports.len()
        ));
    }
    Ok(ports)
}

fn is_device_id(id: &str) -> bool {
    (12..=32).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The wire's root alias rule (`^[A-Za-z0-9_-]{1,16}$`).
pub fn is_root_alias(alias: &str) -> bool {
    (1..=16).contains(&alias.len())
        && alias
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

type Refusal = (String, String);

fn check_ca_file(path: &Path) -> Result<(), Refusal> {
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| {
        (
            format!("cannot open {shown}: {e}"),
            "point server.ca_file at a readable PEM file of CA certificates".to_owned(),
        )
    })?;
    let mut reader = std::io::BufReader::new(file.take(MAX_CONFIG_BYTES));
    let certs: Result<Vec<_>, _> = rustls_pemfile::certs(&mut reader).collect();
    match certs {
        Ok(c) if !c.is_empty() => Ok(()),
        Ok(_) => Err((
            format!("{shown} contains no PEM certificate"),
            "it must hold one or more -----BEGIN CERTIFICATE----- blocks".to_owned(),
        )),
        Err(e) => Err((
            format!("{shown} is not valid PEM: {e}"),
            "it must hold one or more -----BEGIN CERTIFICATE----- blocks".to_owned(),
        )),
    }
}

fn key_file_rules(path: &Path, meta: &std::fs::Metadata) -> Result<(), Refusal> {
    let shown = path.display();
    if !meta.is_file() {
        return Err((
            format!("{shown} is not a regular file"),
            "point device.key_file at the file holding the device key".to_owned(),
        ));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err((
            format!(
                "{shown} is owned by uid {}, but the daemon runs as uid {euid}",
                meta.uid()
            ),
            format!("chown the file to the daemon's user: chown {euid} {shown}"),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err((
            format!("{shown} has mode {mode:04o}: other users can read or change the device key"),
            format!("chmod 600 {shown} (and rotate the key if others could read it)"),
        ));
    }
    if meta.len() == 0 {
        return Err((
            format!("{shown} is empty"),
            "write the device key issued by the control plane into it".to_owned(),
        ));
    }
    if meta.len() > MAX_KEY_BYTES {
        return Err((
            format!(
                "{shown} is {} bytes, too large for a device key",
                meta.len()
            ),
            "it must hold only the device key".to_owned(),
        ));
    }
    Ok(())
}

fn check_key_file_path(path: &Path) -> Result<(), Refusal> {
    let shown = path.display();
    let meta = std::fs::symlink_metadata(path).map_err(|e| {
        (
            format!("cannot read {shown}: {e}"),
            format!(
                "create it with the device key: install -m 600 /dev/null {shown}, then write the key into it"
            ),
        )
    })?;
    if meta.file_type().is_symlink() {
        return Err((
            format!("{shown} is a symlink"),
            "point device.key_file at the real file, so its owner and mode are what is checked"
                .to_owned(),
        ));
    }
    key_file_rules(path, &meta)
}

/// Read the device key from `path`: the file must be a regular file (not a symlink) owned by
/// the daemon's user with mode 0600 or stricter; checked on the opened fd. Surrounding
/// whitespace (a trailing newline) is removed.
pub fn read_device_key(path: &Path) -> Result<Secret, Problem> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let key = "device.key_file";
    let shown = path.display();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                Problem::new(
                    key,
                    format!("{shown} is a symlink"),
                    "point device.key_file at the real file",
                )
            } else {
                Problem::new(
                    key,
                    format!("cannot open {shown}: {e}"),
                    "check the path and that the daemon's user can read it",
                )
            }
        })?;
    let meta = file
        .metadata()
        .map_err(|e| Problem::new(key, format!("cannot stat {shown}: {e}"), "check the file"))?;
    key_file_rules(path, &meta).map_err(|(what, fix)| Problem::new(key, what, fix))?;
    let mut buf = Vec::new();
    file.by_ref()
        .take(MAX_KEY_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Problem::new(key, format!("cannot read {shown}: {e}"), "check the file"))?;
    let text = String::from_utf8(buf).map_err(|_| {
        Problem::new(
            key,
            format!("{shown} is not UTF-8 text"),
            "write the device key as issued (text)",
        )
    })?;
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(Problem::new(
            key,
            format!("{shown} is empty"),
            "write the device key into it",
        ));
    }
    Ok(Secret::new(trimmed.to_owned()))
}

/// The data directory: if it exists, a directory owned by the daemon's user and not
/// world-writable; every existing ancestor that is world-writable must be sticky (like /tmp),
/// or anyone could swap the directory underneath us.
fn check_data_dir(path: &Path) -> Result<(), Refusal> {
    match std::fs::metadata(path) {
        Ok(_) => private_dir_rules(path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err((
                format!("cannot read {}: {e}", path.display()),
                "check the path and permissions".to_owned(),
            ));
        }
    }
    for ancestor in path.ancestors().skip(1) {
        let Ok(meta) = std::fs::metadata(ancestor) else {
            continue;
        };
        let mode = meta.mode();
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            return Err((
                format!(
                    "its ancestor {} is world-writable and not sticky (mode {:04o}): anyone could replace the data directory",
                    ancestor.display(),
                    mode & 0o7777
                ),
                format!(
                    "chmod o-w {} (or chmod +t if it must be shared, like /tmp), or choose another data_dir",
                    ancestor.display()
                ),
            ));
        }
    }
    Ok(())
}

fn private_dir_rules(path: &Path) -> Result<(), Refusal> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| {
        (
            format!("cannot read {shown}: {e}"),
            "check the path and permissions".to_owned(),
        )
    })?;
    if !meta.is_dir() {
        return Err((
            format!("{shown} is not a directory"),
            "point data_dir at a directory".to_owned(),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o002 != 0 {
        return Err((
            format!(
                "{shown} is world-writable (mode {mode:04o}): anyone could tamper with the journal"
            ),
            format!("chmod 700 {shown}"),
        ));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err((
            format!(
                "{shown} is owned by uid {}, but the daemon runs as uid {euid}",
                meta.uid()
            ),
            format!("chown {euid} {shown}, or choose a data_dir the daemon's user owns"),
        ));
    }
    Ok(())
}

/// The data directory rules (private, ours, no loose ancestor), as one message (for the journal).
pub fn check_private_dir(path: &Path) -> Result<(), String> {
    check_data_dir(path).map_err(|(what, fix)| format!("{what} — {fix}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_server_url("wss://cp.example.com/ws").unwrap();
        assert!(u.tls);
        assert_eq!((u.host.as_str(), u.port), ("cp.example.com", 443));
        let u = parse_server_url("ws://127.0.0.1:8787").unwrap();
        assert!(!u.tls && u.is_loopback());
        assert_eq!(u.port, 8787);
        let u = parse_server_url("wss://[::1]:9000/ws?x=1").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9000));
        for bad in [
            "https://cp.example.com",
            "cp.example.com",
            "wss://",
            "wss://:443/ws",
            "wss://u:p@cp/ws",
            "wss://cp:0/",
            "wss://cp:99999/",
            "wss://cp/ws#frag",
            "wss://c p/",
            "wss://[::1/",
        ] {
            assert!(parse_server_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pins() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let pin = parse_pin(hex).unwrap();
        assert_eq!(pin[1], 0x11);
        let b64 = base64::engine::general_purpose::STANDARD.encode(pin);
        assert_eq!(parse_pin(&b64), Some(pin));
        assert_eq!(parse_pin(&format!("sha256/{b64}")), Some(pin));
        assert_eq!(parse_pin("abcd"), None);
        assert_eq!(parse_pin(&hex[2..]), None);
    }

    #[test]
    fn port_lists() {
        assert_eq!(parse_ports("8080, 3000,3000"), Ok(vec![3000, 8080]));
        assert_eq!(parse_ports(""), Ok(vec![]));
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("70000").is_err());
        assert!(parse_ports("x").is_err());
        let many: Vec<String> = (1..=25).map(|p| p.to_string()).collect();
        assert!(parse_ports(&many.join(",")).is_err());
        let (layer, problems) = Layer::from_toml_str("exposed_ports = [8080, 3000]\n");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            layer.settings["exposed_ports"].raw,
            Raw::Str("8080,3000".to_owned())
        );
        let (layer, _) = Layer::from_toml_str("exposed_ports = [\"x\"]\n");
        assert_eq!(
            layer.settings["exposed_ports"].raw,
            Raw::Other("an array with non-integer items")
        );
    }

    #[test]
    fn ids_and_aliases() {
        assert!(is_device_id("build-box-0001"));
        assert!(!is_device_id("short"));
        assert!(!is_device_id("has space in it!"));
        assert!(is_root_alias("cwd"));
        assert!(!is_root_alias(""));
        assert!(!is_root_alias("a/b"));
    }

    #[test]
    fn toml_types_and_unknowns() {
        let (layer, problems) = Layer::from_toml_str(
            "data_dir = 5\nbogus = 1\n[server]\nulr = \"x\"\n[reconnect]\nbase_ms = \"10\"\n[roots]\ncwd = 1\n[extra]\nx = 1\n",
        );
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["bogus", "extra", "roots.cwd", "server.ulr"]);
        let (_, problems, _) = validate(layer);
        assert!(
            problems
                .iter()
                .any(|p| p.key == "data_dir" && p.what.contains("expected a string"))
        );
        assert!(
            problems
                .iter()
                .any(|p| p.key == "reconnect.base_ms" && p.fix.contains("without quotes"))
        );
        let (_, problems) = Layer::from_toml_str("[server\n");
        assert!(problems[0].what.contains("line 1"), "{problems:?}");
    }

    #[test]
    fn env_layer() {
        let (layer, unknown) = Layer::from_env([
            ("CODEMANTLE_SERVER_URL".to_owned(), "wss://x/ws".to_owned()),
            ("CODEMANTLE_ROOT_CWD".to_owned(), "/srv".to_owned()),
            ("CODEMANTLE_DEVICE_ID".to_owned(), String::new()),
            ("CODEMANTLE_CONFIG".to_owned(), "/x".to_owned()),
            ("CODEMANTLE_TOKEN".to_owned(), "t".to_owned()),
            ("PATH".to_owned(), "/bin".to_owned()),
        ]);
        assert_eq!(unknown, ["CODEMANTLE_TOKEN"]);
        assert!(layer.settings.contains_key("server.url"));
        assert!(layer.settings.contains_key("roots.cwd"));
        assert!(!layer.settings.contains_key("device.id"));
    }

    #[test]
    fn debug_redacts_url_secrets() {
        let u = parse_server_url("wss://cp/ws?token=hunter2&x=1").unwrap();
        assert!(!format!("{u:?} {u}").contains("hunter2"));
    }
}
