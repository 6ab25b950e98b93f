//! `codemantle-daemon`: load and check the configuration, set up logging, open the host-side
//! pieces (roots, journal, device key, config applier, and the process guard, git and OpenCode
//! sessions when programs are allowlisted), then run the tunnel until SIGTERM/SIGINT.
//! Sessions outlive the daemon: a stop leaves OpenCode running, and the next start re-adopts it.
//!
//! systemd (`Type=notify`): `READY=1` once the configuration, key, roots and journal are open
//! (before the first dial: an unreachable control plane is not a failed start, the daemon keeps
//! retrying); `STATUS=` follows the link (connected, disconnected, rejected); `WATCHDOG=1` from
//! the event loop at half `WatchdogSec`; `STOPPING=1` on SIGTERM/SIGINT, then the link is closed
//! with 1000 and the journal flushed.
//!
//! The daemon is meant to run as an unprivileged user (`User=codemantle` in
//! `codemantle-daemon.service`). Started as root it runs, but warns: everything the control
//! plane asks for inside a root would then happen with root's rights.
//!
//! Exit codes: 0 success (`--check-config` found nothing wrong, or an orderly stop); 1
//! configuration or startup problem (every problem printed as `<key>: <what> — <fix>`).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use codemantle_daemon::config::{self, DaemonConfig, Layer, LogFormat, Source};
use codemantle_daemon::config_apply::{ConfigApplier, SessionInitStore};
use codemantle_daemon::dispatch::{Dispatcher, GIT_NOT_ENABLED};
use codemantle_daemon::git::{GIT_PROGRAM, GitRunner};
use codemantle_daemon::guard::path::{RootDir, Roots};
use codemantle_daemon::guard::process::{ProcessGuard, level_offered};
use codemantle_daemon::journal::Journal;
use codemantle_daemon::session::{OPENCODE_PROGRAM, SessionManager, SystemClock};
use codemantle_daemon::tunnel::{self, Tunnel, TunnelEvent};
use codemantle_protocol::codec::Codec;
use codemantle_sd_notify::Notifier;
use futures_lite::StreamExt as _;

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
    let started = Instant::now();
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

    match start(loaded.config, started) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Open the host-side pieces, in the order that fails fastest on a misconfigured host, then
/// run the tunnel until a stop signal.
fn start(config: DaemonConfig, started: Instant) -> anyhow::Result<ExitCode> {
    tracing::info!(
        device = %config.device.id,
        server = %config.server.url,
        version = env!("CARGO_PKG_VERSION"),
        "starting codemantle-daemon"
    );
    if nix::unistd::geteuid().is_root() {
        tracing::warn!(
            "running as root: the daemon is meant to run as an unprivileged user (User=codemantle in codemantle-daemon.service); as root, every command the control plane sends acts with root's rights inside the roots"
        );
    }
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
    let journal = Arc::new(Journal::open(
        &config.data_dir,
        config.idempotency.retention_s,
    )?);
    let roots = Arc::new(roots);
    let applier = Arc::new(config_applier(&config, &key, &journal)?);
    let session_inits = applier.shared_session_inits();
    let mut dispatcher =
        Dispatcher::new(Arc::clone(&roots), Arc::clone(&journal)).with_config_applier(applier);
    let guard = process_guard(&config)?;
    match &guard {
        Some(guard) if guard.programs().any(|p| p == GIT_PROGRAM) => {
            let runner = GitRunner::new(Arc::clone(guard))
                .with_timeout(config.git.timeout())
                .with_url_policy(config.git.url_policy());
            tracing::info!(
                timeout_s = config.git.timeout_s,
                allow_http = config.git.allow_http,
                allow_ssh = config.git.allow_ssh,
                "git enabled"
            );
            dispatcher = dispatcher.with_git(Arc::new(runner));
        }
        _ => tracing::info!("git is off: git requests are answered \"{GIT_NOT_ENABLED}\""),
    }
    let sessions = match &guard {
        Some(guard) if guard.programs().any(|p| p == OPENCODE_PROGRAM) => {
            let manager = SessionManager::open(
                config.session.settings(),
                Arc::clone(&roots),
                Arc::clone(guard),
                &journal,
                Arc::new(SystemClock),
            )?;
            manager.set_session_init_store(Arc::clone(&session_inits));
            tracing::info!(
                port_range = ?config.session.port_range,
                re_adopted = manager.sessions().len(),
                "sessions enabled"
            );
            let manager = Arc::new(manager);
            dispatcher = dispatcher.with_sessions(Arc::clone(&manager));
            Some(manager)
        }
        _ => {
            tracing::info!("sessions are off: add opencode to [process.allowlist] to enable them");
            None
        }
    };
    // The port proxy: running sessions' ports and the configured exposed_ports only.
    let proxy = codemantle_daemon::proxy::Proxy::new(
        codemantle_daemon::proxy::ProxySettings {
            exposed_ports: config.exposed_ports.clone(),
            ..Default::default()
        },
        sessions.clone(),
    );
    let dispatcher = Arc::new(dispatcher.with_proxy(Arc::new(proxy)));

    let config = Arc::new(config);
    let notifier = Arc::new(Notifier::from_env());
    let status_hook: tunnel::EventHook = {
        let notifier = Arc::clone(&notifier);
        let url = config.server.url.to_string();
        Arc::new(move |event: &TunnelEvent| {
            if let Some(status) = status_line(event, &url) {
                let _ = notifier.status(&status);
            }
        })
    };
    let mut tunnel = Tunnel::new(Arc::clone(&config), key, dispatcher, started, status_hook)?;
    if let Some(sessions) = &sessions {
        // Session output goes out over every link until acknowledged; session ports are
        // announced (`pl`) next to the configured ones.
        tunnel = tunnel.with_outbox(sessions.streams());
        let ports = tunnel.exposed_ports();
        let configured = config.exposed_ports.clone();
        let announce = move |session_ports: Vec<u16>| {
            ports.set(configured.iter().copied().chain(session_ports).collect());
        };
        announce(sessions.ports());
        sessions.on_ports_changed(announce);
    }
    let mut signals =
        async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])?;
    let (trigger, shutdown) = tunnel::shutdown_pair();

    tracing::info!("connecting to {}", config.server.url);
    if let Err(e) = notifier.ready(&format!("connecting to {}", config.server.url)) {
        tracing::warn!("cannot notify systemd: {e}");
    }

    smol::block_on(async {
        let stop_on_signal = async {
            if let Some(Ok(signal)) = signals.next().await {
                tracing::info!("received {signal:?}, shutting down");
            }
            let _ = notifier.stopping();
            trigger.trigger();
            // The tunnel closes the link and returns; this side waits for it.
            std::future::pending::<()>().await;
        };
        let watchdog = async {
            match notifier.watchdog_interval() {
                Some(every) => loop {
                    let _ = notifier.watchdog();
                    smol::Timer::after(every).await;
                },
                None => std::future::pending::<()>().await,
            }
        };
        // JIT expiry and revocations are enforced every second.
        let sweeper = async {
            match &sessions {
                Some(sessions) => sessions.run_sweeper().await,
                None => std::future::pending::<()>().await,
            }
        };
        futures_lite::future::or(
            tunnel.run(shutdown),
            futures_lite::future::or(stop_on_signal, futures_lite::future::or(watchdog, sweeper)),
        )
        .await;
    });

    // Session output still held in open chunks goes to disk with the rest.
    if let Some(sessions) = &sessions {
        if let Err(e) = sessions.streams().flush() {
            tracing::error!("storing session output at shutdown failed: {e}");
        }
    }
    if let Err(e) = journal.flush() {
        tracing::error!("flushing the journal at shutdown failed: {e}");
        return Ok(ExitCode::FAILURE);
    }
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// The process guard, when `[process.allowlist]` names any program (nothing can be started
/// otherwise, so there is nothing to guard). Logs what sandbox this kernel offers, and warns
/// when that is below `process.min_protection`: every spawn would then be refused.
fn process_guard(config: &DaemonConfig) -> anyhow::Result<Option<Arc<ProcessGuard>>> {
    if config.process.allowlist.is_empty() {
        tracing::info!("no programs allowlisted ([process.allowlist] is empty)");
        return Ok(None);
    }
    let guard = ProcessGuard::new(&config.process)?;
    let support = guard.landlock_support();
    let offered = level_offered(support);
    let (user, dropped) = guard.user();
    tracing::info!(
        programs = ?guard.programs().collect::<Vec<_>>(),
        user = %user,
        drops_privileges = dropped,
        landlock = ?support,
        level_offered = %offered,
        min_protection = %config.process.min_protection,
        "process guard ready"
    );
    if offered < config.process.min_protection {
        tracing::warn!(
            "this kernel offers `{offered}` sandboxing but process.min_protection is `{}`, so every program start will be refused: {} (or lower process.min_protection knowingly)",
            config.process.min_protection,
            support.explain()
        );
    }
    Ok(Some(Arc::new(guard)))
}

/// The config applier for the `cwd` root: signatures checked with the device key,
/// `[config_push]` settings, session-init payloads kept in the journal (a restart between
/// `cc` and the session start loses nothing).
fn config_applier(
    config: &DaemonConfig,
    key: &codemantle_daemon::redact::Secret,
    journal: &Journal,
) -> anyhow::Result<ConfigApplier> {
    let cwd = config
        .roots
        .get("cwd")
        .ok_or_else(|| anyhow::anyhow!("roots.cwd is not configured"))?;
    let root = RootDir::open("cwd", cwd)?;
    let secret = codemantle_protocol::handshake::Secret::new(key.expose().as_bytes());
    let store = SessionInitStore::with_tree(journal.tree("session_init")?)?;
    Ok(
        ConfigApplier::new(root, &secret, config.config_push.clone())?
            .with_session_init_store(store),
    )
}

/// The systemd `STATUS=` line for a tunnel event (`None`: no change worth showing).
fn status_line(event: &TunnelEvent, url: &str) -> Option<String> {
    Some(match event {
        TunnelEvent::Dialing { .. } => format!("connecting to {url}"),
        TunnelEvent::Connected { sid, codec, .. } => {
            let mode = match codec {
                Codec::Cbor => "native",
                Codec::Json => "0.1.x JSON compat",
            };
            format!("connected to {url} (session {sid}, {mode})")
        }
        TunnelEvent::Rejected { code } => {
            format!("rejected by the control plane ({code}): check device.id and device.key_file")
        }
        TunnelEvent::Disconnected { reason } => format!("disconnected: {reason}"),
        TunnelEvent::Retrying { delay, .. } => {
            format!("reconnecting in {:.1} s", delay.as_secs_f32())
        }
        TunnelEvent::JsonFallback => return None,
    })
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
