//! Where the CLI finds its server and token: flags, then `CODEMANTLE_*` env, then
//! `$XDG_CONFIG_HOME/codemantle/cli.toml` (default `~/.config/codemantle/cli.toml`):
//!
//! ```toml
//! server = "https://cp.lab:8787"
//! token = "cmt_..."
//! ca_cert = "/etc/codemantle/ca.pem"
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8787";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    server: Option<String>,
    token: Option<String>,
    ca_cert: Option<PathBuf>,
}

/// The resolved connection settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: String,
    pub token: Option<String>,
    pub ca_cert: Option<PathBuf>,
}

impl Settings {
    pub fn resolve(
        server: Option<&str>,
        token: Option<&str>,
        ca_cert: Option<&Path>,
    ) -> Result<Settings, String> {
        let file = match config_path() {
            Some(p) if p.exists() => read(&p)?,
            _ => File::default(),
        };
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Ok(Settings {
            server: server
                .map(str::to_owned)
                .or_else(|| env("CODEMANTLE_SERVER"))
                .or(file.server)
                .unwrap_or_else(|| DEFAULT_SERVER.to_owned()),
            token: token
                .map(str::to_owned)
                .or_else(|| env("CODEMANTLE_TOKEN"))
                .or(file.token),
            ca_cert: ca_cert
                .map(Path::to_owned)
                .or_else(|| env("CODEMANTLE_CA_CERT").map(PathBuf::from))
                .or(file.ca_cert),
        })
    }
}

fn config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("codemantle").join("cli.toml"))
}

fn read(path: &Path) -> Result<File, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file: File =
        toml::from_str(&text).map_err(|e| format!("{} is invalid: {e}", path.display()))?;
    if file.token.is_some() {
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                eprintln!(
                    "codemantle: warning: {} holds a token but is readable by others; run chmod 600 on it",
                    path.display()
                );
            }
        }
    }
    Ok(file)
}
