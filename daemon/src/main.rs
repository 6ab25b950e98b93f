//! `codemantle-daemon`: load and check the configuration, set up logging, open the host-side
//! pieces (roots, journal, device key), then hand them to the tunnel.
//!
//! Exit codes: 0 success (`--check-config` found nothing wrong); 1 configuration or startup
//! problem (every problem printed as `<key>: <what> — <fix>`); 2 the tunnel is not built yet.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use codemantle_daemon::config::{self, DaemonConfig, Layer, LogFormat, Source};
use codemantle_daemon::guard::path::Roots;
use codemantle_daemon::journal::Journal;

/// CodeMantle host daemon: dials out to the control plane and carries out its commands, confined
/// to the configured roots.
#[derive(Debug, Parser)]
#[command(name = "codemantle-daemon", version)]
struct Cli {
    /// Config file (TOML). Default: /etc/codemantle/daemon.toml, which may be absent if
    /// everything is set by env or flags; a path given here or in CODEMANTLE_CONFIG must exist.
    #[arg(long, value_name = "PATH", env = "CODEMANTLE_CONFIG")]
    config: Option<PathBuf>,

    /// Validate the configuration, print "config OK" or every problem, and exit.
    #[arg(long)]
    check_config: bool,

    /// Control plane URL, ws:// or wss:// (server.url).
    #[arg(long, value_name = "URL")]
    server_url: Option<String>,

    /// PEM file of CA certificates to trust (server.ca_file).
    #[arg(long, value_name = "PATH")]
    ca_file: Option<String>,

    /// SHA-256 pin of the server's leaf certificate (server.pin_sha256).
    #[arg(long, value_name = "HEX|BASE64")]
    pin_sha256: Option<String>,

    /// This device's id (device.id).
    #[arg(long, value_name = "ID")]
    device_id: Option<String>,

    /// File holding the device key, mode 0600 (device.key_file).
    #[arg(long, value_name = "PATH")]
    key_file: Option<String>,

    /// Directory for the journal (data_dir).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<String>,

    /// A root, as ALIAS=DIR (roots.ALIAS); repeatable. `cwd` is the project root.
    #[arg(long = "root", value_name = "ALIAS=DIR")]
    roots: Vec<String>,

    /// Log format: text or json (log.format).
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,

    /// Log filter, e.g. info or codemantle_daemon=debug (log.level).
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
}

impl Cli {
    /// The flags as the top configuration layer.
    fn layer(&self) -> Layer {
        let mut layer = Layer::default();
        let mut set = |key: &str, flag: &str, value: &Option<String>| {
            if let Some(v) = value {
                layer.set(key, v.clone(), Source::Flag(flag.to_owned()));
            }
        };
        set("server.url", "--server-url", &self.server_url);
        set("server.ca_file", "--ca-file", &self.ca_file);
        set("server.pin_sha256", "--pin-sha256", &self.pin_sha256);
        set("device.id", "--device-id", &self.device_id);
        set("device.key_file", "--key-file", &self.key_file);
        set("data_dir", "--data-dir", &self.data_dir);
        set("log.format", "--log-format", &self.log_format);
        set("log.level", "--log-level", &self.log_level);
        for root in &self.roots {
            // A malformed --root becomes an unknown key `roots.<whatever>` and is reported
            // by validation with the others.
            let (alias, dir) = root.split_once('=').unwrap_or((root.as_str(), ""));
            layer.set(
                &format!("roots.{alias}"),
                dir,
                Source::Flag("--root".to_owned()),
            );
        }
        layer
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (path, required) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(config::DEFAULT_CONFIG_PATH), false),
    };
    let loaded = config::load(&path, required, std::env::vars(), cli.layer());

    if cli.check_config {
        return match loaded {
            Ok(l) => {
                for w in &l.warnings {
                    println!("warning: {w}");
                }
                println!("config OK");
                ExitCode::SUCCESS
            }
            Err(errors) => {
                for p in &errors.problems {
                    println!("{p}");
                }
                ExitCode::FAILURE
            }
        };
    }

    let loaded = match loaded {
        Ok(l) => l,
        Err(errors) => {
            // Logging is configured by the config, so this goes to stderr directly.
            eprintln!("codemantle-daemon: {errors}");
            eprintln!("(run with --check-config to see only the problems)");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&loaded.config);
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }

    match start(loaded.config) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Open the host-side pieces, in the order that fails fastest on a misconfigured host, and hand
/// them to the tunnel.
fn start(config: DaemonConfig) -> anyhow::Result<ExitCode> {
    tracing::info!(
        device = %config.device.id,
        server = %config.server.url,
        version = env!("CARGO_PKG_VERSION"),
        "starting codemantle-daemon"
    );
    let key =
        config::read_device_key(&config.device.key_file).map_err(|p| anyhow::anyhow!("{p}"))?;
    let roots = Roots::open(&config.roots)?;
    for root in roots.iter() {
        tracing::info!(
            root = root.alias(),
            path = %root.path().display(),
            resolver = ?root.resolver(),
            "root open"
        );
    }
    let journal = Journal::open(&config.data_dir, config.idempotency.retention_s)?;

    // Seam for the tunnel (issue 4): it owns the run loop from here, e.g.
    //     return smol::block_on(tunnel::run(config, key, roots, journal));
    // and dispatches file commands to `codemantle_daemon::fs` with `roots.get(alias)?`, recording
    // mutating outcomes in `journal`, reconnecting with `backoff::Backoff::from_config`.
    let _ = (key, roots, journal);
    tracing::error!(
        "configuration and host checks passed, but the tunnel is not built yet in this version; exiting"
    );
    Ok(ExitCode::from(2))
}

/// Text without ANSI colour unless stderr is a terminal (journald gets plain lines, and its own
/// timestamps when it is our stderr), or JSON if configured. `RUST_LOG` overrides `log.level`.
fn init_logging(config: &DaemonConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => {
            let tty = std::io::stderr().is_terminal();
            let builder = builder.with_ansi(tty);
            if !tty && std::env::var_os("JOURNAL_STREAM").is_some() {
                builder.without_time().init();
            } else {
                builder.init();
            }
        }
    }
}
