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
//! header_timeout_secs = 30               # time to send request headers (and the TLS handshake)
//! body_timeout_secs = 30                 # time to send a whole request body; then 408 + close
//! store_cache_mb = 8                     # the store's in-memory page cache (sled), MiB
//! preview_host = "preview.example.test"  # optional: serve proxied device ports only as
//!                                        # <port>-<device id>.preview.example.test (wildcard
//!                                        # DNS + certificate), never on the API's origin;
//!                                        # see `api::port`
//!
//! [tunnel]                               # daemon connections; every key optional
//! heartbeat_secs = 25                    # `hb` sent in h2 and ping interval, 5..=120
//! handshake_timeout_secs = 10
//! max_pending_handshakes = 1024          # unauthenticated sockets; more are closed (1013)
//! legacy_tokens = false                  # accept 0.1.x shared tokens (`legacy-token add`)
//! protocol_floor = 1
//! request_timeout_secs = 15
//! git_timeout_secs = 180
//! proxy_timeout_secs = 20
//! session_start_timeout_secs = 45        # above the daemon's [session] start_timeout_s
//! max_pending_per_device = 256           # requests in flight; more get 429 device_busy
//! ```
//!
//! Env: `CODEMANTLE_CONFIG`, `CODEMANTLE_LISTEN`, `CODEMANTLE_DATA_DIR`, `CODEMANTLE_TLS_CERT`,
//! `CODEMANTLE_TLS_KEY`, `CODEMANTLE_LOG_FORMAT`, `CODEMANTLE_LOG`, `CODEMANTLE_PUBLIC_METRICS`,
//! `CODEMANTLE_MAX_BODY_BYTES`, `CODEMANTLE_HEADER_TIMEOUT_SECS`, `CODEMANTLE_BODY_TIMEOUT_SECS`,
//! `CODEMANTLE_STORE_CACHE_MB`, `CODEMANTLE_PREVIEW_HOST`, `CODEMANTLE_HEARTBEAT_SECS`,
//! `CODEMANTLE_LEGACY_TOKENS`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::time::Duration;

use serde::Deserialize;

use crate::tunnel::TunnelConfig;

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
    pub header_timeout_secs: Option<u64>,
    pub body_timeout_secs: Option<u64>,
    pub store_cache_mb: Option<u64>,
    pub preview_host: Option<String>,
    pub tunnel: Option<TunnelFileConfig>,
}

/// The `[tunnel]` table.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TunnelFileConfig {
    pub heartbeat_secs: Option<u32>,
    pub handshake_timeout_secs: Option<u64>,
    pub max_pending_handshakes: Option<usize>,
    pub legacy_tokens: Option<bool>,
    pub protocol_floor: Option<u64>,
    pub request_timeout_secs: Option<u64>,
    pub git_timeout_secs: Option<u64>,
    pub proxy_timeout_secs: Option<u64>,
    pub session_start_timeout_secs: Option<u64>,
    pub max_pending_per_device: Option<usize>,
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
    /// Time a client has to send request headers (and finish the TLS handshake).
    pub header_timeout: Duration,
    /// Time a client has to send a whole request body after its headers (then 408, closed).
    pub body_timeout: Duration,
    /// The store's page cache (see [`crate::store::sled::DEFAULT_CACHE_BYTES`]).
    pub store_cache_bytes: u64,
    /// Host name of the preview origin for proxied ports (`None`: served on the API origin,
    /// sandboxed).
    pub preview_host: Option<String>,
    pub tunnel: TunnelConfig,
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
        let header_timeout = http_timeout(
            "header_timeout_secs",
            "CODEMANTLE_HEADER_TIMEOUT_SECS",
            file.header_timeout_secs,
            env,
        )?;
        let body_timeout = http_timeout(
            "body_timeout_secs",
            "CODEMANTLE_BODY_TIMEOUT_SECS",
            file.body_timeout_secs,
            env,
        )?;
        let store_cache_mb = match env("CODEMANTLE_STORE_CACHE_MB") {
            Some(v) => Some(v.parse::<u64>().map_err(|_| {
                ConfigError(format!(
                    "CODEMANTLE_STORE_CACHE_MB={v:?} is not a whole number of MiB"
                ))
            })?),
            None => file.store_cache_mb,
        };
        let store_cache_bytes = match store_cache_mb {
            Some(0) => return Err(ConfigError("store_cache_mb must be at least 1".into())),
            Some(mb) => mb.saturating_mul(1024 * 1024),
            None => crate::store::sled::DEFAULT_CACHE_BYTES,
        };
        let preview_host = match env("CODEMANTLE_PREVIEW_HOST").or(file.preview_host) {
            Some(h) if h.trim().is_empty() => None,
            Some(h) => Some(parse_preview_host(&h)?),
            None => None,
        };
        let tunnel = tunnel_config(file.tunnel.unwrap_or_default(), env)?;
        Ok(Config {
            listen,
            data_dir,
            tls,
            log_format,
            log_filter,
            public_metrics,
            max_body_bytes,
            header_timeout,
            body_timeout,
            store_cache_bytes,
            preview_host,
            tunnel,
        })
    }
}

/// Default of `header_timeout_secs` and `body_timeout_secs`.
pub const DEFAULT_HTTP_TIMEOUT_SECS: u64 = 30;

/// An HTTP read timeout: env `var` beats file key `name`; whole seconds, at least 1.
fn http_timeout(
    name: &str,
    var: &str,
    file: Option<u64>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Duration, ConfigError> {
    let secs = match env(var) {
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map_err(|_| ConfigError(format!("{var}={v:?} is not a whole number of seconds")))?,
        None => file.unwrap_or(DEFAULT_HTTP_TIMEOUT_SECS),
    };
    if secs == 0 {
        return Err(ConfigError(format!(
            "{name} must be at least 1 second (a slow client is cut off after it)"
        )));
    }
    Ok(Duration::from_secs(secs))
}

/// A preview host: a DNS name of at least two labels, lower-cased, without port or scheme.
fn parse_preview_host(h: &str) -> Result<String, ConfigError> {
    let host = h.trim().trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.split('.').count() < 2 || !host.split('.').all(label_ok) {
        return Err(ConfigError(format!(
            "preview_host = {h:?} is not a host name: give a DNS name without scheme or port, \
             e.g. \"preview.example.com\" (proxied ports are then served as \
             <port>-<device id>.preview.example.com)"
        )));
    }
    Ok(host)
}

fn tunnel_config(
    file: TunnelFileConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<TunnelConfig, ConfigError> {
    let hb = match env("CODEMANTLE_HEARTBEAT_SECS") {
        Some(v) => v.trim().parse::<u32>().map_err(|_| {
            ConfigError(format!(
                "CODEMANTLE_HEARTBEAT_SECS={v:?} is not a whole number of seconds"
            ))
        })?,
        None => file.heartbeat_secs.unwrap_or(25),
    };
    // 0.1.x daemons silently ignore an h2 whose hb is outside 5..=120 and never finish the
    // handshake, so refuse to start rather than strand the fleet.
    if !(5..=120).contains(&hb) {
        return Err(ConfigError(format!(
            "tunnel heartbeat_secs = {hb}: must be 5..=120 (daemons reject any other value)"
        )));
    }
    let mut t = TunnelConfig::with_heartbeat(hb);
    let secs = |name: &str, v: Option<u64>, default: Duration| match v {
        Some(0) => Err(ConfigError(format!(
            "tunnel {name} must be at least 1 second"
        ))),
        Some(s) => Ok(Duration::from_secs(s)),
        None => Ok(default),
    };
    t.handshake_timeout = secs(
        "handshake_timeout_secs",
        file.handshake_timeout_secs,
        t.handshake_timeout,
    )?;
    t.dispatch.request_timeout = secs(
        "request_timeout_secs",
        file.request_timeout_secs,
        t.dispatch.request_timeout,
    )?;
    t.dispatch.git_timeout = secs(
        "git_timeout_secs",
        file.git_timeout_secs,
        t.dispatch.git_timeout,
    )?;
    t.dispatch.proxy_timeout = secs(
        "proxy_timeout_secs",
        file.proxy_timeout_secs,
        t.dispatch.proxy_timeout,
    )?;
    t.dispatch.session_start_timeout = secs(
        "session_start_timeout_secs",
        file.session_start_timeout_secs,
        t.dispatch.session_start_timeout,
    )?;
    if let Some(n) = file.max_pending_handshakes {
        t.max_unauthenticated = n;
    }
    if let Some(n) = file.max_pending_per_device {
        if n == 0 {
            return Err(ConfigError(
                "tunnel max_pending_per_device must be at least 1".into(),
            ));
        }
        t.dispatch.max_pending_per_device = n;
    }
    if let Some(floor) = file.protocol_floor {
        t.protocol_floor = floor;
    }
    t.allow_legacy_tokens = match env("CODEMANTLE_LEGACY_TOKENS") {
        Some(v) => parse_bool("CODEMANTLE_LEGACY_TOKENS", &v)?,
        None => file.legacy_tokens.unwrap_or(false),
    };
    Ok(t)
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

    #[test]
    fn tunnel_settings_and_heartbeat_range() {
        let c = Config::load(&Overrides::default(), &env_of(&[])).expect("load");
        assert_eq!(c.tunnel.heartbeat_secs, 25);
        assert_eq!(c.tunnel.dead_after, Duration::from_secs(50));
        assert!(!c.tunnel.allow_legacy_tokens);
        let env = env_of(&[
            ("CODEMANTLE_HEARTBEAT_SECS", "10"),
            ("CODEMANTLE_LEGACY_TOKENS", "yes"),
        ]);
        let c = Config::load(&Overrides::default(), &env).expect("load");
        assert_eq!(c.tunnel.heartbeat_secs, 10);
        assert!(c.tunnel.allow_legacy_tokens);
        for bad in ["4", "121", "abc"] {
            let pairs = [("CODEMANTLE_HEARTBEAT_SECS", bad)];
            let env = env_of(&pairs);
            assert!(Config::load(&Overrides::default(), &env).is_err(), "{bad}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("cp.toml");
        std::fs::write(
            &file,
            "[tunnel]\ngit_timeout_secs = 600\nmax_pending_per_device = 8\n\
             session_start_timeout_secs = 90\n",
        )
        .expect("write");
        let flags = Overrides {
            config_file: Some(file),
            ..Default::default()
        };
        let c = Config::load(&flags, &env_of(&[])).expect("load");
        assert_eq!(c.tunnel.dispatch.git_timeout, Duration::from_secs(600));
        assert_eq!(c.tunnel.dispatch.max_pending_per_device, 8);
        assert_eq!(
            c.tunnel.dispatch.session_start_timeout,
            Duration::from_secs(90)
        );
    }

    #[test]
    fn http_read_timeouts() {
        let c = Config::load(&Overrides::default(), &env_of(&[])).expect("load");
        assert_eq!(
            c.header_timeout,
            Duration::from_secs(DEFAULT_HTTP_TIMEOUT_SECS)
        );
        assert_eq!(
            c.body_timeout,
            Duration::from_secs(DEFAULT_HTTP_TIMEOUT_SECS)
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("cp.toml");
        std::fs::write(&file, "header_timeout_secs = 7\nbody_timeout_secs = 9\n").expect("write");
        let flags = Overrides {
            config_file: Some(file),
            ..Default::default()
        };
        let c = Config::load(&flags, &env_of(&[])).expect("load");
        assert_eq!(
            (c.header_timeout, c.body_timeout),
            (Duration::from_secs(7), Duration::from_secs(9))
        );
        let env = env_of(&[("CODEMANTLE_BODY_TIMEOUT_SECS", "3")]);
        let c = Config::load(&flags, &env).expect("load");
        assert_eq!(c.body_timeout, Duration::from_secs(3));
        for bad in ["0", "-1", "soon"] {
            for var in [
                "CODEMANTLE_BODY_TIMEOUT_SECS",
                "CODEMANTLE_HEADER_TIMEOUT_SECS",
            ] {
                let pairs = [(var, bad)];
                let env = env_of(&pairs);
                assert!(
                    Config::load(&Overrides::default(), &env).is_err(),
                    "{var}={bad}"
                );
            }
        }
    }

    #[test]
    fn store_cache_size() {
        let c = Config::load(&Overrides::default(), &env_of(&[])).expect("load");
        assert_eq!(c.store_cache_bytes, crate::store::sled::DEFAULT_CACHE_BYTES);
        let env = env_of(&[("CODEMANTLE_STORE_CACHE_MB", "64")]);
        let c = Config::load(&Overrides::default(), &env).expect("load");
        assert_eq!(c.store_cache_bytes, 64 * 1024 * 1024);
        for bad in ["0", "-1", "lots"] {
            let pairs = [("CODEMANTLE_STORE_CACHE_MB", bad)];
            let env = env_of(&pairs);
            assert!(Config::load(&Overrides::default(), &env).is_err(), "{bad}");
        }
    }
}
