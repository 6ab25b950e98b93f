//! `codemantle`: the operator CLI over the control plane's HTTP API.
//!
//! Server and token come from `--server/--token`, else `CODEMANTLE_SERVER`/`CODEMANTLE_TOKEN`,
//! else `~/.config/codemantle/cli.toml` (see [`settings`]). Output is an aligned table for
//! people, or the server's JSON with `--json` for scripts. Each resource has its own module
//! (`devices`, `tokens`, `events`, `sessions`, `fs`).

mod api;
mod devices;
mod events;
mod fs;
mod output;
mod sessions;
mod settings;
mod tokens;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "codemantle",
    version,
    about = "Operate a CodeMantle fleet through its control plane"
)]
struct Cli {
    /// Control plane URL, e.g. https://cp.lab:8787 (env: CODEMANTLE_SERVER).
    #[arg(long, global = true, value_name = "URL")]
    server: Option<String>,
    /// API token `cmt_...` (env: CODEMANTLE_TOKEN). Prefer the env or cli.toml: argv is visible
    /// to other users of this host.
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// CA certificate (PEM) to trust for https (env: CODEMANTLE_CA_CERT).
    #[arg(long, global = true, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Devices of your tenant.
    #[command(subcommand)]
    Devices(devices::DevicesCommand),
    /// API tokens of your tenant (admin).
    #[command(subcommand)]
    Tokens(tokens::TokensCommand),
    /// The event log: recent events, a page after a seq, or follow live.
    Events(events::EventsArgs),
    /// OpenCode sessions on a device: start, stop, status, prompt, logs.
    #[command(subcommand)]
    Sessions(sessions::SessionsCommand),
    /// Files on a device: ls, mkdir, mv, rmdir.
    #[command(subcommand)]
    Fs(fs::FsCommand),
    /// Quick start: a control plane and a daemon on this host, connected, with a fresh owner
    /// token and device.
    Up(up::UpArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `up` makes its own server and token; it needs no settings.
    let command = match cli.command {
        Command::Up(args) => return up::run(args),
        other => other,
    };
    let settings = match settings::Settings::resolve(
        cli.server.as_deref(),
        cli.token.as_deref(),
        cli.ca_cert.as_deref(),
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("codemantle: {e}");
            return ExitCode::from(2);
        }
    };
    let api = match api::Api::new(&settings) {
        Ok(api) => api,
        Err(e) => {
            eprintln!("codemantle: {e}");
            return ExitCode::from(2);
        }
    };
    let out = output::Output { json: cli.json };
    let result = smol::block_on(async {
        match command {
            Command::Devices(c) => devices::run(&api, &out, c).await,
            Command::Tokens(c) => tokens::run(&api, &out, c).await,
            Command::Events(a) => events::run(&api, &out, a).await,
            Command::Sessions(c) => sessions::run(&api, &out, c).await,
            Command::Fs(c) => fs::run(&api, &out, c).await,
            Command::Up(_) => unreachable!("`up` returned above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("codemantle: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
