//! `[git]`: how the git requests (`gs gi gk ga gp gh gm gc gx gf`) run.
//!
//! Git itself is enabled by allowlisting it (`[process.allowlist] git = "/usr/bin/git"`):
//! without that entry the daemon answers every git request with `o:0` and says how to enable
//! it. This section only tunes what [`crate::git::GitRunner`] does once it is enabled.
//!
//! ```toml
//! [git]
//! timeout_s = 120       # deadline of each git command; its whole process group is stopped then
//! allow_http = true     # clone/push/pull over plain http:// (with a warning line)
//! allow_ssh = false     # ssh:// and user@host:path (needs keys and known_hosts in git's home,
//!                       # and port 22 in process.connect_ports)
//! ```
//!
//! Env: `CODEMANTLE_GIT_TIMEOUT_S`, `CODEMANTLE_GIT_ALLOW_HTTP`, `CODEMANTLE_GIT_ALLOW_SSH`.

use std::time::Duration;

use super::process::ProcessConfig;
use super::{Problem, Validator};
use crate::git::{DEFAULT_TIMEOUT, GIT_PROGRAM, UrlPolicy};

/// How long a control plane of this generation waits for a git reply by default; a longer
/// daemon deadline only means the operator sees a 504 before git is stopped.
const CONTROL_PLANE_GIT_TIMEOUT_S: u64 = 180;

/// `[git]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitSettings {
    /// Deadline of each git command, in seconds.
    pub timeout_s: u64,
    pub allow_http: bool,
    pub allow_ssh: bool,
}

impl Default for GitSettings {
    fn default() -> GitSettings {
        let policy = UrlPolicy::default();
        GitSettings {
            timeout_s: DEFAULT_TIMEOUT.as_secs(),
            allow_http: policy.allow_http,
            allow_ssh: policy.allow_ssh,
        }
    }
}

impl GitSettings {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s)
    }

    pub fn url_policy(&self) -> UrlPolicy {
        UrlPolicy {
            allow_http: self.allow_http,
            allow_ssh: self.allow_ssh,
        }
    }
}

/// Validate the `git.*` settings; `process` is the validated `[process]` section (to tell the
/// operator when a setting cannot take effect).
pub(super) fn validate_git(v: &mut Validator, process: &ProcessConfig) -> GitSettings {
    let configured: Vec<String> = v
        .layer
        .settings
        .keys()
        .filter(|k| k.starts_with("git."))
        .cloned()
        .collect();
    let defaults = GitSettings::default();
    let settings = GitSettings {
        timeout_s: v.number("git.timeout_s", defaults.timeout_s, 5, 3600),
        allow_http: v.boolean("git.allow_http", defaults.allow_http),
        allow_ssh: v.boolean("git.allow_ssh", defaults.allow_ssh),
    };
    if !configured.is_empty() && !process.allowlist.contains_key(GIT_PROGRAM) {
        v.warnings.push(Problem::new(
            configured.join(", "),
            "is set, but git is not in [process.allowlist], so git requests are refused",
            "add git = \"/usr/bin/git\" under [process.allowlist] (and process.run_as if the daemon runs as root)",
        ));
    }
    if settings.timeout_s > CONTROL_PLANE_GIT_TIMEOUT_S {
        v.warnings.push(Problem::new(
            "git.timeout_s",
            format!(
                "{} s is longer than the control plane waits for a git reply by default ({CONTROL_PLANE_GIT_TIMEOUT_S} s)",
                settings.timeout_s
            ),
            "raise the control plane's git timeout too, or the operator gets a timeout while git still runs",
        ));
    }
    if settings.allow_ssh && !process.connect_ports.contains(&22) {
        v.warnings.push(Problem::new(
            "git.allow_ssh",
            "is true, but process.connect_ports does not include 22, so the sandbox blocks ssh connections on the usual port",
            "add 22 to process.connect_ports (or the port your ssh remotes use)",
        ));
    }
    settings
}
