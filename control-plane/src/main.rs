//! `codemantle-control-plane`: the server (`serve`) and local admin subcommands that work
//! directly on the data dir while the server is stopped (`init`, `device add`, `token create`,
//! `tenant add`).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use codemantle_control_plane::api::{self, ApiOptions, App, Server};
use codemantle_control_plane::config::{self, Config, LogFormat, Overrides};
use codemantle_control_plane::store::sled::SledStore;
use codemantle_control_plane::store::{Role, Store, StoreError, TenantId};
use codemantle_control_plane::tunnel::CloseCause;
use codemantle_control_plane::{admin, sdnotify, time};

#[derive(Parser)]
#[command(
    name = "codemantle-control-plane",
    version,
    about = "CodeMantle control plane: daemon tunnels and the HTTP API on one listener"
)]
struct Cli {
    /// TOML config file (env: CODEMANTLE_CONFIG).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen address IP:PORT (env: CODEMANTLE_LISTEN; default 127.0.0.1:8787).
    #[arg(long, global = true, value_name = "ADDR")]
    listen: Option<String>,
    /// Data dir of the embedded store, created 0700 (env: CODEMANTLE_DATA_DIR).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// TLS certificate chain, PEM (env: CODEMANTLE_TLS_CERT); needs --tls-key.
    #[arg(long, global = true, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// TLS private key, PEM (env: CODEMANTLE_TLS_KEY); needs --tls-cert.
    #[arg(long, global = true, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Log format on stderr: text or json (env: CODEMANTLE_LOG_FORMAT).
    #[arg(long, global = true, value_name = "FORMAT", value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    config::parse_log_format(s).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve,
    /// Create the default tenant and print its first owner token (once).
    Init,
    /// Local device administration (server stopped).
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Local API token administration (server stopped).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Local tenant administration (server stopped).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// 0.1.x shared tokens (VALID_TOKENS) for daemons without a device key (server stopped).
    #[command(subcommand, name = "legacy-token")]
    LegacyToken(LegacyTokenCommand),
}

#[derive(Subcommand)]
enum LegacyTokenCommand {
    /// Register a shared token: import one from FILE (`-` for stdin) or mint a new one.
    Add {
        #[arg(long, default_value = TenantId::DEFAULT)]
        tenant: String,
        /// Read the token to import from this file (first line), e.g. one of VALID_TOKENS.
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        /// Only these device ids may use it (repeatable; default: unbound).
        #[arg(long = "device", value_name = "ID")]
        devices: Vec<String>,
    },
    /// List the shared tokens of a tenant (key ids only).
    List {
        #[arg(long, default_value = TenantId::DEFAULT)]
        tenant: String,
    },
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Register a device; prints its id and secret once.
    Add {
        /// Display name.
        name: String,
        #[arg(long, default_value = TenantId::DEFAULT)]
        tenant: String,
        /// Label key=value (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Use this device id (e.g. an existing 0.1.x id) instead of a random one.
        #[arg(long)]
        id: Option<String>,
        /// Write the secret to FILE (mode 0600) instead of printing it.
        #[arg(long, value_name = "FILE")]
        out_key: Option<PathBuf>,
    },
    /// List the devices of a tenant.
    List {
        #[arg(long, default_value = TenantId::DEFAULT)]
        tenant: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Mint an API token; prints it once.
    Create {
        /// viewer, operator, admin or owner.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        #[arg(long, default_value = TenantId::DEFAULT)]
        tenant: String,
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant.
    Add {
        id: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// List tenants.
    List,
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| format!("{s:?} is not one of viewer, operator, admin, owner"))
}

/// Default cap of the `blocking` thread pool behind `smol::unblock` (its own default is 500).
/// Store calls are short; a connect storm of thousands of daemons would otherwise leave
/// hundreds of idle threads whose stacks and malloc arenas cost more memory than the
/// connections themselves (measured in `tests/fleet_memory.rs`). `BLOCKING_MAX_THREADS` in the
/// environment still wins.
const BLOCKING_THREADS: &str = "32";

fn main() -> ExitCode {
    if std::env::var_os("BLOCKING_MAX_THREADS").is_none() {
        // SAFETY: first statement of main, before any thread exists, so nothing can read the
        // environment concurrently.
        unsafe { std::env::set_var("BLOCKING_MAX_THREADS", BLOCKING_THREADS) };
    }
    if std::env::var_os("SMOL_THREADS").is_none() {
        // smol's global executor runs on one thread unless told otherwise; connection tasks
        // and request handlers should use every core. `SMOL_THREADS` still wins.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: as above, still before any thread exists.
        unsafe { std::env::set_var("SMOL_THREADS", cores.to_string()) };
    }
    tune_process();
    let cli = Cli::parse();
    let overrides = Overrides {
        config_file: cli.config.clone(),
        listen: cli.listen.clone(),
        data_dir: cli.data_dir.clone(),
        tls_cert: cli.tls_cert.clone(),
        tls_key: cli.tls_key.clone(),
        log_format: cli.log_format,
    };
    let config = match Config::load(&overrides, &|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("codemantle-control-plane: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config);
    let result = match cli.command {
        Command::Serve => serve(&config),
        Command::Init => cmd_init(&config),
        Command::Device(c) => cmd_device(&config, c),
        Command::Token(c) => cmd_token(&config, c),
        Command::Tenant(c) => cmd_tenant(&config, c),
        Command::LegacyToken(c) => cmd_legacy_token(&config, c),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("codemantle-control-plane: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Process-wide settings for a server holding one socket per device:
/// - `RLIMIT_NOFILE` soft limit raised to the hard limit (a fleet of N devices needs N
///   descriptors; the usual soft limit is 1024);
/// - glibc malloc limited to one arena. By default every thread that allocates under contention
///   gets its own arena (up to 8 per core), and memory freed in one arena is never reused by
///   another: a connection's long-lived pieces end up spread over the arenas of the threads that
///   happened to run its handshake, each arena keeping its own holes. With one arena RSS stays
///   close to the live heap (10 000 devices: 3.7 KiB per device instead of 4.0 with two arenas
///   and 4.1 with glibc's default), and the per-thread caches keep small allocations off the
///   arena lock (no measurable cost in the connect storm; see `tests/src/bin/cm-loadgen.rs`).
///   `MALLOC_ARENA_MAX` in the environment still wins.
fn tune_process() {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator tunables; called before any thread exists.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log_filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(config: &Config) -> anyhow::Result<()> {
    // Block SIGINT/SIGTERM before any thread exists (sled and smol start threads), so they are
    // delivered only to the dedicated signal thread.
    let signals = shutdown_signals().context("cannot set up signal handling")?;
    let tls = match &config.tls {
        Some((cert, key)) => Some(api::tls::server_config(cert, key)?),
        None => None,
    };
    let store: Arc<dyn Store> = Arc::new(SledStore::open_with_cache(
        &config.data_dir,
        config.store_cache_bytes,
    )?);
    let mut app = App::new(store.clone()).with_tunnel(config.tunnel.clone());
    app.options = ApiOptions {
        max_body_bytes: config.max_body_bytes,
        public_metrics: config.public_metrics,
        preview_host: config.preview_host.clone(),
        header_timeout: config.header_timeout,
        body_timeout: config.body_timeout,
        ..ApiOptions::default()
    };
    let app = Arc::new(app);
    let hub = app.hub.clone();
    smol::block_on(async {
        let server = Server::bind(config.listen, tls, app)
            .await
            .with_context(|| {
                format!("cannot listen on {} (in use? pass --listen)", config.listen)
            })?;
        let addr = server.local_addr()?;
        tracing::info!(data_dir = %config.data_dir.display(), "listening on {}://{addr}", server.scheme());
        sdnotify::notify("READY=1");
        spawn_housekeeping(store.clone());
        // The accept loop runs on the executor, next to the connection tasks it spawns, rather
        // than on this thread: every accepted connection then starts on a worker that is
        // already awake instead of being handed across threads (a connect storm of 10 000
        // daemons: ~10% less server CPU per handshake, measured with cm-loadgen). Dropping the
        // task stops accepting.
        let accepting = smol::spawn(async move { server.run().await.map(|()| None) });
        let outcome =
            futures_lite::future::or(accepting, async { Ok(signals.recv().await.ok()) }).await?;
        if let Some(sig) = outcome {
            tracing::info!(signal = sig, "shutting down");
        }
        // Tell daemons we are going (1001) so they reconnect to the next instance promptly.
        hub.close_all(CloseCause::ShuttingDown);
        smol::Timer::after(std::time::Duration::from_millis(200)).await;
        sdnotify::notify("STOPPING=1");
        anyhow::Ok(())
    })?;
    store.flush()?;
    Ok(())
}

/// Watchdog pings (only while the store answers, or is merely full) and hourly purge of expired
/// idempotency records.
fn spawn_housekeeping(store: Arc<dyn Store>) {
    if let Some(interval) = sdnotify::watchdog_interval() {
        let store = store.clone();
        smol::spawn(async move {
            loop {
                smol::Timer::after(interval).await;
                let s = store.clone();
                match smol::unblock(move || s.probe()).await {
                    Ok(()) => sdnotify::notify("WATCHDOG=1"),
                    // A full disk is not cured by a restart (the server still serves reads):
                    // keep the watchdog fed and say what is wrong.
                    Err(StoreError::StorageFull {
                        message,
                        restart_required: false,
                    }) => {
                        tracing::error!(error = %message, "store probe: storage full");
                        sdnotify::notify("WATCHDOG=1");
                    }
                    Err(e) => tracing::error!(error = %e, "store probe failed; withholding the watchdog ping"),
                }
            }
        })
        .detach();
    }
    smol::spawn(async move {
        loop {
            let s = store.clone();
            match smol::unblock(move || s.idempotency_purge(time::now_ms())).await {
                Ok(n) if n > 0 => {
                    tracing::debug!(purged = n, "expired idempotency records removed")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "idempotency purge failed"),
            }
            smol::Timer::after(std::time::Duration::from_secs(3600)).await;
        }
    })
    .detach();
}

/// Blocks SIGINT and SIGTERM in this (still single) thread and all threads it will create,
/// and waits for them on a dedicated thread. The receiver yields the signal number.
fn shutdown_signals() -> std::io::Result<async_channel::Receiver<i32>> {
    // SAFETY: plain libc signal-mask calls on a zero-initialised sigset_t owned by this frame.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        set
    };
    let (tx, rx) = async_channel::bounded(1);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is a valid, initialised sigset_t; `sig` is a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    let _ = tx.try_send(sig);
                }
            }
        })?;
    Ok(rx)
}

fn cmd_init(config: &Config) -> anyhow::Result<()> {
    let store = admin::open(&config.data_dir)?;
    let owner = admin::init(&store)?;
    eprintln!(
        "initialised {}: default tenant created. The owner token below is shown only now; \
         keep it in a secret manager:",
        config.data_dir.display()
    );
    println!("{}", owner.bearer);
    Ok(())
}

fn cmd_device(config: &Config, cmd: DeviceCommand) -> anyhow::Result<()> {
    let store = admin::open(&config.data_dir)?;
    match cmd {
        DeviceCommand::Add {
            name,
            tenant,
            labels,
            id,
            out_key,
        } => {
            let d = admin::add_device(&store, &tenant, &name, &labels, id, out_key.as_deref())?;
            println!("device id: {}", d.id);
            println!("key id:    {}", d.key_id);
            match out_key {
                Some(path) => println!("secret:    written to {} (mode 0600)", path.display()),
                None => {
                    println!("secret:    {}", d.secret);
                    eprintln!(
                        "the secret is shown only now: install it on the host as its device key (mode 0600)"
                    );
                }
            }
        }
        DeviceCommand::List { tenant } => {
            let tenant = TenantId::parse(&tenant)?;
            for d in store.devices(&tenant)? {
                let labels: Vec<String> =
                    d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                println!("{}\t{}\t{}", d.id, d.name, labels.join(","));
            }
        }
    }
    Ok(())
}

fn cmd_token(config: &Config, cmd: TokenCommand) -> anyhow::Result<()> {
    let store = admin::open(&config.data_dir)?;
    match cmd {
        TokenCommand::Create { role, tenant, name } => {
            let t = admin::create_token(&store, &tenant, &name, role)?;
            eprintln!(
                "token {} ({}, tenant {}) minted; it is shown only now:",
                t.token.id, t.token.role, t.token.tenant
            );
            println!("{}", t.bearer);
        }
    }
    Ok(())
}

fn cmd_tenant(config: &Config, cmd: TenantCommand) -> anyhow::Result<()> {
    let store = admin::open(&config.data_dir)?;
    match cmd {
        TenantCommand::Add { id, name } => {
            let t = admin::add_tenant(&store, &id, name.as_deref())?;
            println!("tenant {} created", t.id);
        }
        TenantCommand::List => {
            for t in store.tenants()? {
                println!("{}\t{}", t.id, t.name);
            }
        }
    }
    Ok(())
}

fn cmd_legacy_token(config: &Config, cmd: LegacyTokenCommand) -> anyhow::Result<()> {
    let store = admin::open(&config.data_dir)?;
    match cmd {
        LegacyTokenCommand::Add {
            tenant,
            from_file,
            devices,
        } => {
            let imported = from_file.map(|f| admin::read_secret_file(&f)).transpose()?;
            let minted = imported.is_none();
            let t = admin::add_legacy_token(&store, &tenant, imported, &devices)?;
            println!("key id: {}", t.key_id);
            if minted {
                println!("token:  {}", t.token);
                eprintln!("the token is shown only now: put it in the daemons' configuration");
            }
        }
        LegacyTokenCommand::List { tenant } => {
            let tenant = TenantId::parse(&tenant)?;
            for t in store.legacy_tokens(&tenant)? {
                let bound = t
                    .devices
                    .as_ref()
                    .map_or_else(|| "unbound".to_owned(), |d| d.join(","));
                let state = if t.revoked { "revoked" } else { "active" };
                println!("{}\t{state}\t{bound}", t.key_id);
            }
        }
    }
    Ok(())
}
