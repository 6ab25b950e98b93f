//! `[session]`: how OpenCode sessions (`si st sq sp sl jk`) run.
//!
//! Sessions are enabled by allowlisting OpenCode (`[process.allowlist] opencode =
//! "/usr/local/bin/opencode"`, a plain path: the daemon adds the fixed argv `serve --hostname
//! 127.0.0.1 --port <port>` itself); without that entry every session request is answered
//! `o:0 m:"opencode_not_enabled"`. This section tunes what [`crate::session::SessionManager`]
//! does once enabled.
//!
//! ```toml
//! [session]
//! port_range = "4100-4199"      # ports OpenCode servers listen on (127.0.0.1 only); one per folder
//! connect_ports = [4299]        # ports OpenCode may connect to besides process.connect_ports
//!                               # (a local model server, say); landlock ABI 4+
//! start_timeout_s = 30          # how long OpenCode may take to answer its health check
//! request_timeout_s = 10        # deadline of each request to OpenCode
//! stop_grace_s = 3              # SIGTERM → SIGKILL when a session is stopped
//! journal_max_bytes = 16777216  # unacknowledged output kept per session (then truncation markers)
//! journal_max_chunks = 8192
//! jit_env_allowlist = ["GITHUB_TOKEN"]  # env names a JIT credential may set, besides
//!                               # OPENCODE_SESSION_TOKEN, OPENCODE_JIT_SCOPE, OPENCODE_JIT_TOKEN_EXPIRES_AT
//! ```
//!
//! Env: `CODEMANTLE_SESSION_PORT_RANGE`, `CODEMANTLE_SESSION_CONNECT_PORTS`,
//! `CODEMANTLE_SESSION_START_TIMEOUT_S`, `CODEMANTLE_SESSION_REQUEST_TIMEOUT_S`,
//! `CODEMANTLE_SESSION_STOP_GRACE_S`, `CODEMANTLE_SESSION_JOURNAL_MAX_BYTES`,
//! `CODEMANTLE_SESSION_JOURNAL_MAX_CHUNKS`, `CODEMANTLE_SESSION_JIT_ENV_ALLOWLIST` (lists
//! comma-separated).
//!
//! The JIT allowlist must match the control plane's (`JIT_CREDENTIAL_ENV_ALLOWLIST`): a name
//! only the control plane allows makes every such session start fail with
//! `invalid_jit_credential`. Names the process guard never passes to a child (`CODEMANTLE_*`,
//! `LD_*`, `PATH`, `HOME`, …) and OpenCode's own `OPENCODE_SERVER_*` are refused here.

use std::time::Duration;

use codemantle_protocol::jit::{EnvAllowlist, valid_env_name};

use super::process::{ProcessConfig, forbidden_env_name};
use super::{Problem, Validator, from_note};
use crate::session::stream::StreamLimits;
use crate::session::{OPENCODE_PROGRAM, SessionSettings};

const LIST_KEYS: &[&str] = &["session.connect_ports", "session.jit_env_allowlist"];

/// Whether `key` (dotted) is a `session.*` list setting written as a TOML array.
pub(super) fn is_list_key(key: &str) -> bool {
    LIST_KEYS.contains(&key)
}

/// `[session]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    pub port_range: (u16, u16),
    pub connect_ports: Vec<u16>,
    pub start_timeout_s: u64,
    pub request_timeout_s: u64,
    pub stop_grace_s: u64,
    pub journal_max_bytes: u64,
    pub journal_max_chunks: u64,
    /// Extra names (the three built-in ones are always allowed).
    pub jit_env_allowlist: Vec<String>,
}

impl Default for SessionConfig {
    fn default() -> SessionConfig {
        let s = SessionSettings::default();
        SessionConfig {
            port_range: s.port_range,
            connect_ports: s.connect_ports,
            start_timeout_s: s.start_timeout.as_secs(),
            request_timeout_s: s.request_timeout.as_secs(),
            stop_grace_s: s.stop_grace.as_secs(),
            journal_max_bytes: s.limits.max_unacked_bytes,
            journal_max_chunks: s.limits.max_unacked_chunks,
            jit_env_allowlist: Vec::new(),
        }
    }
}

impl SessionConfig {
    /// What the session manager runs with.
    pub fn settings(&self) -> SessionSettings {
        SessionSettings {
            port_range: self.port_range,
            connect_ports: self.connect_ports.clone(),
            start_timeout: Duration::from_secs(self.start_timeout_s),
            request_timeout: Duration::from_secs(self.request_timeout_s),
            stop_grace: Duration::from_secs(self.stop_grace_s),
            limits: StreamLimits {
                max_unacked_bytes: self.journal_max_bytes,
                max_unacked_chunks: self.journal_max_chunks,
            },
            jit_env_allowlist: EnvAllowlist::new(&self.jit_env_allowlist),
            ..SessionSettings::default()
        }
    }
}

fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// `"4100-4199"` → (4100, 4199); both ends ≥ 1024, at most 10 000 ports.
pub fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = text
        .split_once('-')
        .ok_or_else(|| "is not a range like \"4100-4199\"".to_owned())?;
    let port = |s: &str| s.trim().parse::<u16>().ok().filter(|p| *p >= 1024);
    match (port(lo), port(hi)) {
        (Some(lo), Some(hi)) if lo <= hi && hi - lo < 10_000 => Ok((lo, hi)),
        (Some(_), Some(_)) => {
            Err("must go from low to high and hold at most 10000 ports".to_owned())
        }
        _ => Err("must use ports from 1024 to 65535".to_owned()),
    }
}

/// Validate the `session.*` settings; `process` is the validated `[process]` section (to tell
/// the operator when a setting cannot take effect).
pub(super) fn validate_session(v: &mut Validator, process: &ProcessConfig) -> SessionConfig {
    let configured: Vec<String> = v
        .layer
        .settings
        .keys()
        .filter(|k| k.starts_with("session."))
        .cloned()
        .collect();
    let defaults = SessionConfig::default();
    let port_range = match v.string("session.port_range") {
        None => defaults.port_range,
        Some((text, source)) => match parse_port_range(&text) {
            Ok(range) => range,
            Err(what) => {
                v.problems.push(Problem::new(
                    "session.port_range",
                    format!("{text:?}{} {what}", from_note(&source)),
                    "write it as port_range = \"4100-4199\" (loopback ports OpenCode may listen on, one per running folder)",
                ));
                defaults.port_range
            }
        },
    };
    let connect_ports = match v.string("session.connect_ports") {
        None => Vec::new(),
        Some((text, source)) => {
            let mut ports = Vec::new();
            for item in split_list(&text) {
                match item.parse::<u16>() {
                    Ok(p) if p > 0 => ports.push(p),
                    _ => v.problems.push(Problem::new(
                        "session.connect_ports",
                        format!("{item:?}{} is not a TCP port", from_note(&source)),
                        "list ports from 1 to 65535, e.g. connect_ports = [4299]",
                    )),
                }
            }
            ports.sort_unstable();
            ports.dedup();
            ports
        }
    };
    let jit_env_allowlist = match v.string("session.jit_env_allowlist") {
        None => Vec::new(),
        Some((text, source)) => {
            let mut names = Vec::new();
            for name in split_list(&text) {
                let why = if !valid_env_name(name) {
                    Some("is not an environment name (^[A-Z_][A-Z0-9_]{1,63}$)")
                } else if name.starts_with("OPENCODE_SERVER_") {
                    Some("would let a credential replace OpenCode's own API password")
                } else {
                    forbidden_env_name(name)
                };
                match why {
                    None => names.push(name.to_owned()),
                    Some(why) => v.problems.push(Problem::new(
                        "session.jit_env_allowlist",
                        format!("{name:?}{} {why}", from_note(&source)),
                        "remove it; list only variables a session's tools read their token from",
                    )),
                }
            }
            names
        }
    };
    let config = SessionConfig {
        port_range,
        connect_ports,
        start_timeout_s: v.number("session.start_timeout_s", defaults.start_timeout_s, 1, 600),
        request_timeout_s: v.number(
            "session.request_timeout_s",
            defaults.request_timeout_s,
            1,
            300,
        ),
        stop_grace_s: v.number("session.stop_grace_s", defaults.stop_grace_s, 0, 60),
        journal_max_bytes: v.number(
            "session.journal_max_bytes",
            defaults.journal_max_bytes,
            64 * 1024,
            1 << 30,
        ),
        journal_max_chunks: v.number(
            "session.journal_max_chunks",
            defaults.journal_max_chunks,
            16,
            1_000_000,
        ),
        jit_env_allowlist,
    };
    if !configured.is_empty() && !process.allowlist.contains_key(OPENCODE_PROGRAM) {
        v.warnings.push(Problem::new(
            configured.join(", "),
            "is set, but opencode is not in [process.allowlist], so session requests are refused",
            "add opencode = \"/path/to/opencode\" under [process.allowlist] (and process.run_as if the daemon runs as root)",
        ));
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("4100-4199"), Ok((4100, 4199)));
        assert_eq!(parse_port_range(" 5000 - 5000 "), Ok((5000, 5000)));
        assert!(parse_port_range("4199-4100").is_err());
        assert!(parse_port_range("80-90").is_err());
        assert!(parse_port_range("4100").is_err());
        assert!(parse_port_range("1024-65535").is_err());
        assert!(parse_port_range("a-b").is_err());
    }

    fn validated(toml: &str, env: &[(&str, &str)]) -> (SessionConfig, Vec<Problem>, Vec<Problem>) {
        let (file, problems) = super::super::Layer::from_toml_str(toml);
        assert!(problems.is_empty(), "{problems:?}");
        let (env, unknown) = super::super::Layer::from_env(
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        assert!(unknown.is_empty(), "{unknown:?}");
        let mut v = Validator {
            layer: file.overlay(env),
            problems: Vec::new(),
            warnings: Vec::new(),
        };
        let config = validate_session(&mut v, &ProcessConfig::default());
        assert!(v.layer.settings.is_empty(), "not consumed: {:?}", v.layer);
        (config, v.problems, v.warnings)
    }

    #[test]
    fn from_toml_and_env() {
        let (c, problems, warnings) = validated(
            "[session]\nport_range = \"5000-5009\"\nconnect_ports = [4299, 11434]\njit_env_allowlist = [\"GITHUB_TOKEN\"]\njournal_max_chunks = 64\n",
            &[("CODEMANTLE_SESSION_START_TIMEOUT_S", "45")],
        );
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.port_range, (5000, 5009));
        assert_eq!(c.connect_ports, [4299, 11434]);
        assert_eq!(c.jit_env_allowlist, ["GITHUB_TOKEN"]);
        assert_eq!(c.journal_max_chunks, 64);
        assert_eq!(c.start_timeout_s, 45);
        // Set, but opencode is not allowlisted: said so.
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0]
                .what
                .contains("opencode is not in [process.allowlist]")
        );
        // Nothing set: defaults, no warning.
        let (c, problems, warnings) = validated("", &[]);
        assert_eq!(c, SessionConfig::default());
        assert!(problems.is_empty() && warnings.is_empty());
    }

    #[test]
    fn bad_values_are_named() {
        let (_, problems, _) = validated(
            "[session]\nport_range = \"80-90\"\nconnect_ports = [0]\njit_env_allowlist = [\"LD_PRELOAD\", \"OPENCODE_SERVER_PASSWORD\", \"lower\"]\nstart_timeout_s = 0\njournal_max_bytes = 10\n",
            &[],
        );
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        for needle in [
            "session.port_range: \"80-90\"",
            "session.connect_ports: \"0\"",
            "\"LD_PRELOAD\"",
            "\"OPENCODE_SERVER_PASSWORD\" would let a credential replace",
            "\"lower\" is not an environment name",
            "session.start_timeout_s",
            "session.journal_max_bytes",
        ] {
            assert!(
                shown.iter().any(|p| p.contains(needle)),
                "{needle}: {shown:#?}"
            );
        }
        assert_eq!(problems.len(), 7, "{shown:#?}");
    }

    #[test]
    fn settings_carry_every_value() {
        let c = SessionConfig {
            port_range: (5000, 5009),
            connect_ports: vec![4299],
            start_timeout_s: 7,
            request_timeout_s: 3,
            stop_grace_s: 1,
            journal_max_bytes: 1 << 20,
            journal_max_chunks: 100,
            jit_env_allowlist: vec!["GITHUB_TOKEN".to_owned()],
        };
        let s = c.settings();
        assert_eq!(s.port_range, (5000, 5009));
        assert_eq!(s.connect_ports, [4299]);
        assert_eq!(s.start_timeout, Duration::from_secs(7));
        assert_eq!(s.request_timeout, Duration::from_secs(3));
        assert_eq!(s.stop_grace, Duration::from_secs(1));
        assert_eq!(s.limits.max_unacked_chunks, 100);
        assert!(s.jit_env_allowlist.contains("GITHUB_TOKEN"));
        assert!(s.jit_env_allowlist.contains("OPENCODE_SESSION_TOKEN"));
        assert_eq!(s.root, "cwd");
    }
}
