//! `[process]`: what the process guard may start, as whom, and how confined.
//!
//! ```toml
//! [process]
//! run_as = "codemantle-agent"     # or "uid:gid"; required when the daemon runs as root
//! min_protection = "fs"           # refuse to spawn below this: "none", "fs" or "fs+net"
//! max_open_files = 4096           # RLIMIT_NOFILE of every child (core dumps are always off)
//! max_processes = 4096            # RLIMIT_NPROC (counted per user, threads included)
//! max_address_space_mb = 0        # RLIMIT_AS; 0 or absent = unlimited (JS runtimes reserve a lot)
//! max_cpu_seconds = 0             # RLIMIT_CPU; 0 or absent = unlimited
//! env_pass = ["LANG", "LC_ALL", "LC_CTYPE", "TZ"]  # daemon env variables children may see
//! connect_ports = [443]           # TCP ports children may connect to (landlock ABI 4+)
//! system_paths = ["/nix/store"]   # extra read+execute directories (e.g. a toolchain)
//! private_dir = "/var/lib/codemantle-private"  # per-session HOME and TMPDIR live here
//!
//! [process.allowlist]             # name → absolute path (the only programs ever started)
//! git = "/usr/bin/git"
//! opencode = { path = "/usr/local/bin/opencode", args = ["serve"] }  # fixed argv prefix
//! ```
//!
//! Env: `CODEMANTLE_PROCESS_RUN_AS`, `CODEMANTLE_PROCESS_MIN_PROTECTION`,
//! `CODEMANTLE_PROCESS_MAX_OPEN_FILES`, `CODEMANTLE_PROCESS_MAX_PROCESSES`,
//! `CODEMANTLE_PROCESS_MAX_ADDRESS_SPACE_MB`, `CODEMANTLE_PROCESS_MAX_CPU_SECONDS`,
//! `CODEMANTLE_PROCESS_ENV_PASS`, `CODEMANTLE_PROCESS_CONNECT_PORTS`,
//! `CODEMANTLE_PROCESS_SYSTEM_PATHS` (lists comma-separated), `CODEMANTLE_PROCESS_PRIVATE_DIR`.
//! The allowlist is read from the file only: the programs the daemon may start are fixed by a
//! root-owned file, not by whatever environment the service happened to get.
//!
//! Checked here, once, at load: allowlist entries are absolute paths to existing executable
//! regular files that are not world-writable and not inside a root (the agent could replace
//! them); `run_as` resolves to an unprivileged user the daemon can switch to; env names are
//! valid and never `CODEMANTLE_*` or `LD_*`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use super::{Problem, Raw, Source, Validator, from_note};

/// The private directory unless configured.
pub const DEFAULT_PRIVATE_DIR: &str = "/var/lib/codemantle-private";

/// Env variables passed from the daemon's environment unless configured.
pub const DEFAULT_ENV_PASS: &[&str] = &["LANG", "LC_ALL", "LC_CTYPE", "TZ"];

/// TCP ports children may connect to unless configured (HTTPS: model providers, git remotes).
pub const DEFAULT_CONNECT_PORTS: &[u16] = &[443];

/// Variables the guard sets itself; neither `env_pass` nor a caller may supply them.
pub const GUARD_OWNED_ENV: &[&str] = &["PATH", "HOME", "TMPDIR", "USER", "LOGNAME"];

const LIST_KEYS: &[&str] = &[
    "process.env_pass",
    "process.connect_ports",
    "process.system_paths",
];

const ALLOWLIST_PREFIX: &str = "process.allowlist.";

/// Separator of `args` items in the layer (a NUL can never be part of an argument).
const ARG_SEP: char = '\0';

/// The least protection a spawn may run with (`process.min_protection`), ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ProtectionLevel {
    /// No landlock: file permissions and the unprivileged user only.
    None,
    /// Landlock filesystem confinement.
    Fs,
    /// Landlock filesystem and TCP port confinement (ABI 4, Linux 6.7+).
    FsNet,
}

impl ProtectionLevel {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ProtectionLevel::None => "none",
            ProtectionLevel::Fs => "fs",
            ProtectionLevel::FsNet => "fs+net",
        }
    }

    fn parse(s: &str) -> Option<ProtectionLevel> {
        match s {
            "none" => Some(ProtectionLevel::None),
            "fs" => Some(ProtectionLevel::Fs),
            "fs+net" => Some(ProtectionLevel::FsNet),
            _ => None,
        }
    }
}

impl fmt::Display for ProtectionLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One allowlisted program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedProgram {
    /// Absolute path, executed directly (no `PATH` search, no shell).
    pub path: PathBuf,
    /// Fixed arguments placed before the caller's.
    pub args: Vec<OsString>,
}

/// The user children run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    /// The user name, when configured by name (sets `USER`/`LOGNAME`).
    pub name: Option<String>,
}

/// Resource limits of every child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessLimits {
    pub max_open_files: u64,
    pub max_processes: u64,
    pub max_address_space_mb: Option<u64>,
    pub max_cpu_seconds: Option<u64>,
}

impl Default for ProcessLimits {
    fn default() -> ProcessLimits {
        ProcessLimits {
            max_open_files: 4096,
            max_processes: 4096,
            max_address_space_mb: None,
            max_cpu_seconds: None,
        }
    }
}

/// `[process]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessConfig {
    /// Allowlist name → program.
    pub allowlist: BTreeMap<String, AllowedProgram>,
    /// `None`: children run as the daemon's own user (only allowed when the daemon is not
    /// root, or nothing is allowlisted).
    pub run_as: Option<RunAs>,
    pub min_protection: ProtectionLevel,
    pub limits: ProcessLimits,
    /// Names of daemon env variables passed through.
    pub env_pass: Vec<String>,
    /// TCP ports every child may connect to (ascending, unique).
    pub connect_ports: Vec<u16>,
    /// Extra read + execute directories.
    pub system_paths: Vec<PathBuf>,
    /// Where per-session HOME and TMPDIR directories are created.
    pub private_dir: PathBuf,
}

impl Default for ProcessConfig {
    fn default() -> ProcessConfig {
        ProcessConfig {
            allowlist: BTreeMap::new(),
            run_as: None,
            min_protection: ProtectionLevel::Fs,
            limits: ProcessLimits::default(),
            env_pass: DEFAULT_ENV_PASS.iter().map(|s| (*s).to_owned()).collect(),
            connect_ports: DEFAULT_CONNECT_PORTS.to_vec(),
            system_paths: Vec::new(),
            private_dir: PathBuf::from(DEFAULT_PRIVATE_DIR),
        }
    }
}

/// Whether `key` (dotted) is a `process.*` list setting written as a TOML array.
pub(super) fn is_list_key(key: &str) -> bool {
    LIST_KEYS.contains(&key)
}

/// Turn a TOML array into the comma-separated text the env variable uses.
pub(super) fn list_from_toml(items: &[toml::Value]) -> Raw {
    let mut out = Vec::new();
    for item in items {
        match item {
            toml::Value::String(s) if !s.contains(',') => out.push(s.clone()),
            toml::Value::String(_) => return Raw::Other("an array with an item containing ','"),
            toml::Value::Integer(i) => out.push(i.to_string()),
            _ => return Raw::Other("an array with items that are not strings or numbers"),
        }
    }
    Raw::Str(out.join(","))
}

/// `[process.allowlist]`: `name = "/path"` or `name = { path = "/path", args = [...] }`.
/// Stored as `process.allowlist.<name>` (path) and `process.allowlist.<name>.args`.
pub(super) fn walk_allowlist(
    layer: &mut super::Layer,
    value: toml::Value,
    problems: &mut Vec<Problem>,
) {
    let toml::Value::Table(table) = value else {
        problems.push(Problem::new(
            "process.allowlist",
            format!("expected a table, found {}", value.type_str()),
            "write it as a [process.allowlist] section of name = \"/absolute/path\"",
        ));
        return;
    };
    for (name, entry) in table {
        let key = format!("{ALLOWLIST_PREFIX}{name}");
        match entry {
            toml::Value::String(path) => layer.set(&key, path, Source::File),
            toml::Value::Table(fields) => {
                for (field, v) in fields {
                    match (field.as_str(), v) {
                        ("path", toml::Value::String(path)) => layer.set(&key, path, Source::File),
                        ("args", toml::Value::Array(items)) => {
                            let args: Option<Vec<String>> = items
                                .iter()
                                .map(|i| i.as_str().filter(|s| !s.contains(ARG_SEP)))
                                .map(|s| s.map(str::to_owned))
                                .collect();
                            match args {
                                Some(args) => layer.set(
                                    &format!("{key}.args"),
                                    args.join(&ARG_SEP.to_string()),
                                    Source::File,
                                ),
                                None => problems.push(Problem::new(
                                    format!("{key}.args"),
                                    "must be an array of strings without NUL characters",
                                    "write it as args = [\"serve\"]",
                                )),
                            }
                        }
                        ("path" | "args", other) => problems.push(Problem::new(
                            format!("{key}.{field}"),
                            format!("has the wrong type ({})", other.type_str()),
                            "path is a string, args an array of strings",
                        )),
                        (other, _) => problems.push(Problem::new(
                            format!("{key}.{other}"),
                            "unknown key",
                            "an allowlist entry has only path and args",
                        )),
                    }
                }
            }
            other => problems.push(Problem::new(
                &key,
                format!("expected a program path string, found {}", other.type_str()),
                format!("write it as {name} = \"/usr/bin/{name}\""),
            )),
        }
    }
}

/// Allowlist names: what callers pass as `SpawnSpec::program`.
pub fn is_program_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A portable environment variable name (`[A-Za-z_][A-Za-z0-9_]*`).
pub fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Why an env variable name may never be handed to a child (or `None` if it may).
pub fn forbidden_env_name(name: &str) -> Option<&'static str> {
    if !is_env_name(name) {
        Some("is not a valid variable name (letters, digits and _, not starting with a digit)")
    } else if name.starts_with("CODEMANTLE_") {
        Some("is the daemon's own configuration or secrets, never passed to children")
    } else if name.starts_with("LD_") {
        Some("steers the dynamic loader (LD_PRELOAD, LD_LIBRARY_PATH...), never passed to children")
    } else if GUARD_OWNED_ENV.contains(&name) {
        Some("is set by the process guard itself (PATH fixed; HOME and TMPDIR per session)")
    } else {
        None
    }
}

fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// Validate the `process.*` settings. `roots` and `data_dir` are the already validated ones
/// (to keep programs and private directories out of them).
pub(super) fn validate_process(
    v: &mut Validator,
    roots: &BTreeMap<String, PathBuf>,
    data_dir: Option<&Path>,
) -> ProcessConfig {
    let mut config = ProcessConfig::default();
    let euid = nix::unistd::geteuid().as_raw();
    let real_roots: Vec<(&String, PathBuf)> = roots
        .iter()
        .map(|(alias, p)| (alias, super::real_prefix(p)))
        .collect();
    let inside_root = |path: &Path| -> Option<String> {
        let real = super::real_prefix(path);
        real_roots
            .iter()
            .find(|(_, root)| real.starts_with(root))
            .map(|(alias, root)| format!("root `{alias}` ({})", root.display()))
    };

    // Allowlist.
    let names: Vec<String> = v
        .layer
        .settings
        .keys()
        .filter_map(|k| k.strip_prefix(ALLOWLIST_PREFIX))
        .filter(|rest| !rest.ends_with(".args"))
        .map(str::to_owned)
        .collect();
    let orphan_args: Vec<String> = v
        .layer
        .settings
        .keys()
        .filter_map(|k| k.strip_prefix(ALLOWLIST_PREFIX)?.strip_suffix(".args"))
        .filter(|name| !names.iter().any(|n| n == name))
        .map(str::to_owned)
        .collect();
    for name in orphan_args {
        let key = format!("{ALLOWLIST_PREFIX}{name}");
        v.layer.take(&format!("{key}.args"));
        v.problems.push(Problem::new(
            &key,
            "has args but no path",
            format!("write it as {name} = {{ path = \"/usr/bin/{name}\", args = [...] }}"),
        ));
    }
    for name in names {
        let key = format!("{ALLOWLIST_PREFIX}{name}");
        let args = v
            .layer
            .take(&format!("{key}.args"))
            .and_then(|s| match s.raw {
                Raw::Str(joined) if joined.is_empty() => Some(Vec::new()),
                Raw::Str(joined) => Some(joined.split(ARG_SEP).map(OsString::from).collect()),
                _ => None,
            })
            .unwrap_or_default();
        let Some((value, source)) = v.string(&key) else {
            continue;
        };
        if !is_program_name(&name) {
            v.problems.push(Problem::new(
                &key,
                format!("{name:?} is not a valid program name"),
                "use 1 to 32 characters from a-z 0-9 _ -, starting with a letter (callers name programs this way)",
            ));
            continue;
        }
        let Some(path) = v.absolute_path(&key, &value, &source) else {
            continue;
        };
        if let Err((what, fix)) = check_program(&path) {
            v.problems.push(Problem::new(&key, what, fix));
            continue;
        }
        if let Some(root) = inside_root(&path) {
            v.problems.push(Problem::new(
                &key,
                format!(
                    "{} is inside {root}: a session could replace the program the daemon starts",
                    path.display()
                ),
                "install the program outside every root (e.g. /usr/local/bin)",
            ));
            continue;
        }
        config.allowlist.insert(name, AllowedProgram { path, args });
    }

    // run_as.
    config.run_as = match v.string("process.run_as") {
        None => None,
        Some((value, source)) => match resolve_run_as(&value) {
            Ok(run_as) if run_as.uid == 0 || run_as.gid == 0 => {
                v.problems.push(Problem::new(
                    "process.run_as",
                    format!("{value:?}{} is root (uid or gid 0)", from_note(&source)),
                    "create an unprivileged user for the agent (useradd --system --create-home codemantle-agent) and name it here",
                ));
                None
            }
            Ok(run_as) if euid != 0 && run_as.uid != euid => {
                v.problems.push(Problem::new(
                    "process.run_as",
                    format!(
                        "{value:?}{} is uid {}, but the daemon runs as uid {euid} and cannot switch users",
                        from_note(&source),
                        run_as.uid
                    ),
                    "remove process.run_as (children then run as the daemon's own user), or run the daemon as root",
                ));
                None
            }
            Ok(run_as) => Some(run_as),
            Err(what) => {
                v.problems.push(Problem::new(
                    "process.run_as",
                    format!("{value:?}{} {what}", from_note(&source)),
                    "name an existing user (getent passwd NAME) or write uid:gid, e.g. \"994:994\"",
                ));
                None
            }
        },
    };
    if euid != 0 && !config.allowlist.is_empty() {
        let gid = nix::unistd::getegid();
        let extra: Vec<u32> = nix::unistd::getgroups()
            .unwrap_or_default()
            .into_iter()
            .filter(|g| *g != gid)
            .map(|g| g.as_raw())
            .collect();
        if !extra.is_empty() {
            v.warnings.push(Problem::new(
                "process.run_as",
                format!(
                    "the daemon is not root, so its children keep its supplementary groups {extra:?} (group-owned files and sockets, e.g. docker's, stay reachable)"
                ),
                "run the daemon as a user with no supplementary groups, or as root with process.run_as",
            ));
        }
    }
    if euid == 0
        && config.run_as.is_none()
        && !config.allowlist.is_empty()
        && !v.problems.iter().any(|p| p.key == "process.run_as")
    {
        v.problems.push(Problem::new(
            "process.run_as",
            "is required when the daemon runs as root: the allowlisted programs would run as root",
            "create an unprivileged user (useradd --system --create-home codemantle-agent), give it the project directories, and set run_as = \"codemantle-agent\"",
        ));
    }

    // min_protection.
    if let Some((value, source)) = v.string("process.min_protection") {
        match ProtectionLevel::parse(value.trim()) {
            Some(level) => config.min_protection = level,
            None => v.problems.push(Problem::new(
                "process.min_protection",
                format!("{value:?}{} is not a protection level", from_note(&source)),
                "use \"fs\" (default: landlock filesystem confinement), \"fs+net\" (also TCP ports, Linux 6.7+) or \"none\" (no landlock; not recommended)",
            )),
        }
    }

    // Limits.
    config.limits.max_open_files = v.number("process.max_open_files", 4096, 64, 1 << 20);
    config.limits.max_processes = v.number("process.max_processes", 4096, 16, 1 << 22);
    let optional = |v: &mut Validator, key: &str, max: u64| {
        if v.layer.settings.contains_key(key) {
            Some(v.number(key, 0, 0, max)).filter(|n| *n != 0)
        } else {
            None
        }
    };
    config.limits.max_address_space_mb = optional(v, "process.max_address_space_mb", 1 << 30);
    config.limits.max_cpu_seconds = optional(v, "process.max_cpu_seconds", 365 * 86_400);

    // env_pass.
    if let Some((value, source)) = v.string("process.env_pass") {
        config.env_pass.clear();
        for name in split_list(&value) {
            if let Some(why) = forbidden_env_name(name) {
                v.problems.push(Problem::new(
                    "process.env_pass",
                    format!("{name:?}{} {why}", from_note(&source)),
                    "remove it from env_pass",
                ));
            } else {
                if crate::redact::is_secret_name(name) {
                    v.warnings.push(Problem::new(
                        "process.env_pass",
                        format!("{name} looks like a secret and is handed to every program the daemon starts"),
                        "prefer per-session credentials (JIT) so a secret reaches only the session that needs it",
                    ));
                }
                if !config.env_pass.iter().any(|n| n == name) {
                    config.env_pass.push(name.to_owned());
                }
            }
        }
    }

    // connect_ports.
    if let Some((value, source)) = v.string("process.connect_ports") {
        let mut ports = Vec::new();
        for item in split_list(&value) {
            match item.parse::<u16>() {
                Ok(p) if p != 0 => ports.push(p),
                _ => v.problems.push(Problem::new(
                    "process.connect_ports",
                    format!(
                        "{item:?}{} is not a TCP port from 1 to 65535",
                        from_note(&source)
                    ),
                    "list ports, e.g. connect_ports = [443, 22]",
                )),
            }
        }
        ports.sort_unstable();
        ports.dedup();
        config.connect_ports = ports;
    }

    // system_paths.
    if let Some((value, source)) = v.string("process.system_paths") {
        for item in split_list(&value) {
            let Some(path) = v.absolute_path("process.system_paths", item, &source) else {
                continue;
            };
            let problem = match std::fs::metadata(&path) {
                Ok(m) if !m.is_dir() => Some((
                    format!("{} is not a directory", path.display()),
                    "list directories only".to_owned(),
                )),
                Ok(m) if m.mode() & 0o002 != 0 => Some((
                    format!(
                        "{} is world-writable: anyone could plant programs the sandbox may run",
                        path.display()
                    ),
                    format!("chmod o-w {}", path.display()),
                )),
                Ok(_) => inside_root(&path).map(|root| {
                    (
                        format!(
                            "{} is inside {root}: a session could plant programs there",
                            path.display()
                        ),
                        "list only directories outside every root".to_owned(),
                    )
                }),
                Err(e) => Some((
                    format!("{}: {e}", path.display()),
                    "fix the path or remove it".to_owned(),
                )),
            };
            match problem {
                Some((what, fix)) => {
                    v.problems
                        .push(Problem::new("process.system_paths", what, fix))
                }
                None => config.system_paths.push(path),
            }
        }
    }

    // private_dir.
    if let Some((value, source)) = v.string("process.private_dir") {
        if let Some(path) = v.absolute_path("process.private_dir", &value, &source) {
            config.private_dir = path;
        }
    }
    let private = config.private_dir.clone();
    if let Some(root) = inside_root(&private) {
        v.problems.push(Problem::new(
            "process.private_dir",
            format!("{} is inside {root}", private.display()),
            "choose a private_dir outside every root (sessions' HOME must not be reachable by file commands)",
        ));
    }
    if let Some(data) = data_dir {
        let (p, d) = (super::real_prefix(&private), super::real_prefix(data));
        if p.starts_with(&d) || d.starts_with(&p) {
            v.problems.push(Problem::new(
                "process.private_dir",
                format!(
                    "{} and data_dir {} overlap",
                    private.display(),
                    data.display()
                ),
                format!(
                    "keep them apart (default private_dir is {DEFAULT_PRIVATE_DIR}): sandboxed programs can reach their private directories, never the journal"
                ),
            ));
        }
    }
    if let Ok(meta) = std::fs::metadata(&private) {
        if !meta.is_dir() {
            v.problems.push(Problem::new(
                "process.private_dir",
                format!("{} is not a directory", private.display()),
                "point private_dir at a directory (it is created if missing)",
            ));
        } else if meta.mode() & 0o002 != 0 || meta.uid() != euid {
            v.problems.push(Problem::new(
                "process.private_dir",
                format!(
                    "{} must be owned by the daemon's user (uid {euid}) and not world-writable; it is uid {} mode {:04o}",
                    private.display(),
                    meta.uid(),
                    meta.mode() & 0o7777
                ),
                format!("chown {euid} {0} && chmod 711 {0}", private.display()),
            ));
        }
    }

    // A kernel that cannot give min_protection refuses every spawn; say so now.
    if !config.allowlist.is_empty() {
        let support = crate::guard::process::landlock_support();
        let offered = crate::guard::process::level_offered(support);
        if offered < config.min_protection {
            v.problems.push(Problem::new(
                "process.min_protection",
                format!(
                    "is {} but this kernel offers only {} ({})",
                    config.min_protection,
                    offered,
                    support.explain()
                ),
                "enable landlock / upgrade the kernel (fs: Linux 5.13+, fs+net: Linux 6.7+), or lower min_protection knowingly",
            ));
        }
    }
    config
}

/// `name` or `uid:gid`.
fn resolve_run_as(value: &str) -> Result<RunAs, String> {
    let value = value.trim();
    if let Some((u, g)) = value.split_once(':') {
        let uid = u
            .parse::<u32>()
            .map_err(|_| format!("has a bad uid {u:?}"))?;
        let gid = g
            .parse::<u32>()
            .map_err(|_| format!("has a bad gid {g:?}"))?;
        return Ok(RunAs {
            uid,
            gid,
            name: None,
        });
    }
    if value.is_empty() || value.bytes().all(|b| b.is_ascii_digit()) {
        return Err("is not a user name or uid:gid".to_owned());
    }
    match nix::unistd::User::from_name(value) {
        Ok(Some(user)) => Ok(RunAs {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            name: Some(user.name),
        }),
        Ok(None) => Err("is not a user on this host".to_owned()),
        Err(e) => Err(format!("could not be looked up: {e}")),
    }
}

/// An allowlisted program: an existing, executable regular file (symlinks followed), neither it
/// nor its directory writable by everyone.
fn check_program(path: &Path) -> Result<(), (String, String)> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| {
        (
            format!("{shown}: {e}"),
            "install the program or fix the path (which PROGRAM shows where it is)".to_owned(),
        )
    })?;
    if !meta.is_file() {
        return Err((
            format!("{shown} is not a regular file"),
            "point the entry at the program's executable file".to_owned(),
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o111 == 0 {
        return Err((
            format!("{shown} is not executable (mode {mode:04o})"),
            format!("chmod 755 {shown}, or point at the real executable"),
        ));
    }
    if mode & 0o002 != 0 {
        return Err((
            format!(
                "{shown} is world-writable (mode {mode:04o}): anyone could replace what the daemon runs"
            ),
            format!("chmod o-w {shown}"),
        ));
    }
    if let Some(parent) = std::fs::canonicalize(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
    {
        if let Ok(pm) = std::fs::metadata(&parent) {
            if pm.mode() & 0o002 != 0 && pm.mode() & 0o1000 == 0 {
                return Err((
                    format!(
                        "{shown} lives in {}, which is world-writable: anyone could swap the program",
                        parent.display()
                    ),
                    "install it in a directory only root can write (e.g. /usr/local/bin)"
                        .to_owned(),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_program_name("git"));
        assert!(is_program_name("opencode-1_2"));
        assert!(!is_program_name(""));
        assert!(!is_program_name("Git"));
        assert!(!is_program_name("1git"));
        assert!(!is_program_name("/usr/bin/git"));
        assert!(forbidden_env_name("LANG").is_none());
        assert!(forbidden_env_name("CODEMANTLE_DEVICE_KEY").is_some());
        assert!(forbidden_env_name("LD_PRELOAD").is_some());
        assert!(forbidden_env_name("HOME").is_some());
        assert!(forbidden_env_name("A=B").is_some());
        assert!(forbidden_env_name("9X").is_some());
    }

    #[test]
    fn run_as_forms() {
        assert_eq!(
            resolve_run_as("65534:65533"),
            Ok(RunAs {
                uid: 65534,
                gid: 65533,
                name: None
            })
        );
        assert!(resolve_run_as("x:1").is_err());
        assert!(resolve_run_as("123").is_err());
        let root = resolve_run_as("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(resolve_run_as("no-such-user-here-xyz").is_err());
    }

    #[test]
    fn program_checks() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let exe = tmp.path().join("tool");
        std::fs::write(&exe, b"#!/bin/true\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            check_program(&exe)
                .unwrap_err()
                .0
                .contains("not executable")
        );
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o757)).unwrap();
        assert!(
            check_program(&exe)
                .unwrap_err()
                .0
                .contains("world-writable")
        );
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_program(&exe).is_ok());
        assert!(
            check_program(tmp.path())
                .unwrap_err()
                .0
                .contains("not a regular file")
        );
        assert!(
            check_program(&tmp.path().join("missing"))
                .unwrap_err()
                .1
                .contains("install")
        );
    }
}
