//! Server configuration: a TOML file, overridden by `CODEMANTLE_*` environment variables,
//! overridden by command-line flags.
//!
//! ```toml
//! listen = "0.0.0.0:8787"
//! data_dir = "/var/lib/codemantle-cp"
//! tls_cert = "/etc/codemantle/cp.crt"    # both or neither
//! tls_key = "/etc/codemantle/cp.key"
//! log_format = "text"                    # or "json"
//! log = "info"                           # tracing filter, e.g. "info,codemantle_control_plane=debug"
//! public_metrics = false                 # serve /metrics without a token
//! max_body_bytes = 1048576
//! ```
//!
//! Env: `CODEMANTLE_CONFIG`, `CODEMANTLE_LISTEN`, `CODEMANTLE_DATA_DIR`, `CODEMANTLE_TLS_CERT`,
//! `CODEMANTLE_TLS_KEY`, `CODEMANTLE_LOG_FORMAT`, `CODEMANTLE_LOG`, `CODEMANTLE_PUBLIC_METRICS`,
//! `CODEMANTLE_MAX_BODY_BYTES`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default listener (same port as 0.1.x's daemon endpoint).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8787";
/// Default data dir when neither config nor `$STATE_DIRECTORY` (systemd) says otherwise.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/codemantle-cp";

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The file's shape; every field optional.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub log: Option<String>,
    pub public_metrics: Option<bool>,
    pub max_body_bytes: Option<usize>,
}

/// Values given on the command line (highest precedence).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
}

/// The effective configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub public_metrics: bool,
    pub max_body_bytes: usize,
}

/// A configuration problem, with the source that caused it.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl Config {
    /// Resolves file → env → flags. `env` is injectable for tests (`std::env::var` in main).
    pub fn load(
        flags: &Overrides,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let file_path = flags
            .config_file
            .clone()
            .or_else(|| env("CODEMANTLE_CONFIG").map(PathBuf::from));
        let file = match &file_path {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let from = |what: &str| match &file_path {
            Some(p) => format!("{what} (from {} or the environment)", p.display()),
            None => format!("{what} (from the environment)"),
        };

        let listen = flags
            .listen
            .clone()
            .or_else(|| env("CODEMANTLE_LISTEN"))
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen.parse().map_err(|_| {
            ConfigError(format!(
                "{} {listen:?} is not an address: use IP:PORT, e.g. 0.0.0.0:8787",
                from("listen")
            ))
        })?;

        let data_dir = flags
            .data_dir
            .clone()
            .or_else(|| env("CODEMANTLE_DATA_DIR").map(PathBuf::from))
            .or(file.data_dir)
            .or_else(|| env("STATE_DIRECTORY").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));

        let cert = flags
            .tls_cert
            .clone()
            .or_else(|| env("CODEMANTLE_TLS_CERT").map(PathBuf::from))
            .or(file.tls_cert);
        let key = flags
            .tls_key
            .clone()
            .or_else(|| env("CODEMANTLE_TLS_KEY").map(PathBuf::from))
            .or(file.tls_key);
        let tls = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(ConfigError(
                    "TLS needs both a certificate and a key: set tls_cert and tls_key \
                     (--tls-cert/--tls-key, CODEMANTLE_TLS_CERT/CODEMANTLE_TLS_KEY) or neither"
                        .into(),
                ));
            }
        };

        let log_format = match flags.log_format {
            Some(f) => f,
            None => match env("CODEMANTLE_LOG_FORMAT") {
                Some(v) => parse_log_format(&v)?,
                None => file.log_format.unwrap_or_default(),
            },
        };
        let log_filter = env("CODEMANTLE_LOG")
            .or(file.log)
            .unwrap_or_else(|| "info".to_owned());
        let public_metrics = match env("CODEMANTLE_PUBLIC_METRICS") {
            Some(v) => parse_bool("CODEMANTLE_PUBLIC_METRICS", &v)?,
            None => file.public_metrics.unwrap_or(false),
        };
        let max_body_bytes = match env("CODEMANTLE_MAX_BODY_BYTES") {
            Some(v) => v.parse().map_err(|_| {
                ConfigError(format!(
                    "CODEMANTLE_MAX_BODY_BYTES={v:?} is not a byte count"
                ))
            })?,
            None => file
                .max_body_bytes
                .unwrap_or(crate::api::http::MAX_BODY_BYTES),
        };
        Ok(Config {
            listen,
            data_dir,
            tls,
            log_format,
            log_filter,
            public_metrics,
            max_body_bytes,
        })
    }
}

/// `text` or `json`.
pub fn parse_log_format(v: &str) -> Result<LogFormat, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(ConfigError(format!(
            "log format {other:?}: use text or json"
        ))),
    }
}

fn parse_bool(name: &str, v: &str) -> Result<bool, ConfigError> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        _ => Err(ConfigError(format!("{name}={v:?}: use true or false"))),
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    toml::from_str(&text)
        .map_err(|e| ConfigError(format!("config file {} is invalid: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("cp.toml");
        std::fs::write(
            &file,
            "listen = \"10.0.0.1:1\"\ndata_dir = \"/from/file\"\nlog_format = \"json\"\n",
        )
        .expect("write");
        let flags = Overrides {
            config_file: Some(file.clone()),
            ..Default::default()
        };
        let c = Config::load(&flags, &env_of(&[])).expect("load");
        assert_eq!(c.listen.to_string(), "10.0.0.1:1");
        assert_eq!(c.data_dir, PathBuf::from("/from/file"));
        assert_eq!(c.log_format, LogFormat::Json);

        let env = env_of(&[
            ("CODEMANTLE_LISTEN", "10.0.0.2:2"),
            ("CODEMANTLE_DATA_DIR", "/from/env"),
        ]);
        let c = Config::load(&flags, &env).expect("load");
        assert_eq!(
            (c.listen.to_string().as_str(), c.data_dir.to_str()),
            ("10.0.0.2:2", Some("/from/env"))
        );

        let flags = Overrides {
            listen: Some("10.0.0.3:3".into()),
            ..flags
        };
        assert_eq!(
            Config::load(&flags, &env).expect("load").listen.to_string(),
            "10.0.0.3:3"
        );
    }

    #[test]
    fn the_shipped_example_parses() {
        let text = include_str!("../control-plane.example.toml");
        let file: FileConfig = toml::from_str(text).expect("example config parses");
        assert_eq!(file.listen.as_deref(), Some("0.0.0.0:8787"));
    }

    #[test]
    fn defaults_and_errors() {
        let c = Config::load(&Overrides::default(), &env_of(&[])).expect("load");
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert!(c.tls.is_none());
        let systemd = Config::load(
            &Overrides::default(),
            &env_of(&[("STATE_DIRECTORY", "/var/lib/x")]),
        );
        assert_eq!(systemd.expect("load").data_dir, PathBuf::from("/var/lib/x"));
        let half_tls = Overrides {
            tls_cert: Some("c".into()),
            ..Default::default()
        };
        assert!(Config::load(&half_tls, &env_of(&[])).is_err());
        assert!(
            Config::load(
                &Overrides::default(),
                &env_of(&[("CODEMANTLE_LISTEN", "nope")])
            )
            .is_err()
        );
    }
}
