//! `codemantle fs ls|mkdir|mv|rmdir`: files on a device, through its daemon (paths are
//! relative to the daemon's root `cwd`; the daemon's path guard decides what is allowed).

use clap::Subcommand;
use serde_json::{Value, json};

use crate::api::{Api, CliError, new_idempotency_key};
use crate::devices::path_escape;
use crate::output::{Output, table, when};

#[derive(Subcommand)]
pub enum FsCommand {
    /// List a directory.
    Ls {
        device: String,
        /// Directory relative to the root (default `.`).
        #[arg(default_value = ".")]
        path: String,
        /// Most entries (1..256).
        #[arg(long, default_value_t = 128)]
        limit: u16,
        /// Paging cursor from a previous listing.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Create a directory (and its parents).
    Mkdir {
        device: String,
        path: String,
        /// Idempotency key (default: a fresh one; reuse one to retry safely).
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Rename or move within the root.
    Mv {
        device: String,
        source: String,
        dest: String,
        /// Replace an existing destination (without it, a move never replaces anything; a
        /// 0.1.x daemon always replaces, so it needs this flag).
        #[arg(long)]
        overwrite: bool,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Remove a directory (empty unless --recursive).
    Rmdir {
        device: String,
        path: String,
        /// Remove its contents too (needs a native daemon).
        #[arg(long)]
        recursive: bool,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

pub async fn run(api: &Api, out: &Output, cmd: FsCommand) -> Result<(), CliError> {
    match cmd {
        FsCommand::Ls {
            device,
            path,
            limit,
            cursor,
        } => {
            let mut body = json!({ "root": "cwd", "path": path, "limit": limit });
            if let Some(c) = cursor {
                body["cursor"] = Value::String(c);
            }
            let (_, reply) = api
                .device_reply(&device_path(&device, "dir"), &body, &new_idempotency_key())
                .await?;
            if out.json {
                out.print_json(&reply);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = reply["e"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(entry_row)
                .collect();
            print!("{}", table(&["TYPE", "NAME", "SIZE", "MODIFIED"], &rows));
            if let Some(next) = reply["k"].as_str() {
                eprintln!("more entries may follow: --cursor {next}");
            }
        }
        FsCommand::Mkdir {
            device,
            path,
            idempotency_key,
        } => {
            let body = json!({ "root": "cwd", "path": path });
            let what = format!("created {path}");
            done(api, out, &device, "mkdir", &body, idempotency_key, &what).await?;
        }
        FsCommand::Mv {
            device,
            source,
            dest,
            overwrite,
            idempotency_key,
        } => {
            let mut body = json!({ "root": "cwd", "source": source, "dest": dest });
            if overwrite {
                body["overwrite"] = Value::Bool(true);
            }
            let what = format!("moved {source} to {dest}");
            done(api, out, &device, "rename", &body, idempotency_key, &what).await?;
        }
        FsCommand::Rmdir {
            device,
            path,
            recursive,
            idempotency_key,
        } => {
            let body = json!({ "root": "cwd", "path": path, "recursive": recursive });
            let what = format!("removed {path}");
            done(api, out, &device, "rmdir", &body, idempotency_key, &what).await?;
        }
    }
    Ok(())
}

/// `/devices/<id>/<op>`.
pub fn device_path(device: &str, op: &str) -> String {
    format!("/devices/{}/{op}", path_escape(device))
}

/// Runs a mutating file command and reports it; `o:0` is an error naming the operation.
async fn done(
    api: &Api,
    out: &Output,
    device: &str,
    op: &str,
    body: &Value,
    key: Option<String>,
    what: &str,
) -> Result<(), CliError> {
    let key = key.unwrap_or_else(new_idempotency_key);
    let (status, reply) = api
        .device_reply(&device_path(device, op), body, &key)
        .await?;
    if out.json {
        out.print_json(&reply);
    }
    if status != 200 || reply["o"] != 1 {
        return Err(CliError::Api {
            status,
            code: "refused_by_device".into(),
            message: format!(
                "the daemon on {device} refused {op} (o:0): the path may not exist, not be \
                 empty, or the destination may exist"
            ),
        });
    }
    if !out.json {
        println!("{what}");
    }
    Ok(())
}

/// `["d", name, 0]` / `["f", name, size, mtime_ms]` → a table row.
fn entry_row(e: &Value) -> Vec<String> {
    let kind = e[0].as_str().unwrap_or("?");
    let name = e[1].as_str().unwrap_or("?").to_owned();
    match kind {
        "d" => vec!["dir".into(), format!("{name}/"), "-".into(), "-".into()],
        _ => vec![
            "file".into(),
            name,
            e[2].as_u64().map_or_else(|| "-".into(), human_size),
            when(&e[3]),
        ],
    }
}

/// `512`, `4.0K`, `1.5M`, `2.0G`.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if n < 1024 {
        return n.to_string();
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}
