//! `codemantle sessions start|stop|status|prompt|logs`: OpenCode sessions on a device.
//!
//! `logs -f` polls the snapshot (there is no live log stream yet) and prints only the lines
//! it has not printed before.

use std::io::Read as _;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{Value, json};

use crate::api::{Api, CliError, new_idempotency_key};
use crate::devices::path_escape;
use crate::fs::device_path;
use crate::output::{Output, text};

#[derive(Subcommand)]
pub enum SessionsCommand {
    /// Start an OpenCode session for a folder (or reuse the running one).
    Start {
        device: String,
        /// Folder relative to the daemon's root.
        #[arg(long, default_value = ".")]
        path: String,
        /// Session id (default: generated).
        #[arg(long)]
        session_id: Option<String>,
        /// Give the session a JIT credential that expires after SECS (30..3600); the daemon
        /// ends the session then.
        #[arg(long, value_name = "SECS")]
        jit_ttl: Option<u64>,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Stop a session (default: the device's latest running one).
    Stop {
        device: String,
        #[arg(long)]
        session_id: Option<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Whether OpenCode runs for a folder.
    Status {
        device: String,
        #[arg(long, default_value = ".")]
        path: String,
    },
    /// Send a prompt to a session (`-` reads it from stdin).
    Prompt {
        device: String,
        session_id: String,
        /// The prompt; several words are joined with spaces.
        #[arg(required = true)]
        prompt: Vec<String>,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// The device's session log (last lines); -f keeps polling for new ones.
    Logs {
        session_id: String,
        /// Lines (1..200).
        #[arg(long, default_value_t = 100)]
        tail: u16,
        /// Keep printing new lines.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Poll interval for -f, seconds.
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
}

pub async fn run(api: &Api, out: &Output, cmd: SessionsCommand) -> Result<(), CliError> {
    match cmd {
        SessionsCommand::Start {
            device,
            path,
            session_id,
            jit_ttl,
            idempotency_key,
        } => {
            let mut body = json!({ "path": path });
            if let Some(s) = session_id {
                body["sessionId"] = Value::String(s);
            }
            if let Some(ttl) = jit_ttl {
                body["jit"] = json!({ "ttlSec": ttl });
            }
            let key = idempotency_key.unwrap_or_else(new_idempotency_key);
            let (_, reply) = api
                .device_reply(&device_path(&device, "session/start"), &body, &key)
                .await?;
            print_session_result(out, &device, &reply, "started")?;
        }
        SessionsCommand::Stop {
            device,
            session_id,
            idempotency_key,
        } => {
            let mut body = json!({});
            if let Some(s) = session_id {
                body["sessionId"] = Value::String(s);
            }
            let key = idempotency_key.unwrap_or_else(new_idempotency_key);
            let (_, reply) = api
                .device_reply(&device_path(&device, "session/terminate"), &body, &key)
                .await?;
            print_session_result(out, &device, &reply, "stopped")?;
        }
        SessionsCommand::Status { device, path } => {
            let (_, reply) = api
                .device_reply(
                    &device_path(&device, "session/status"),
                    &json!({ "path": path }),
                    &new_idempotency_key(),
                )
                .await?;
            if out.json {
                out.print_json(&reply);
                return Ok(());
            }
            let running = reply["o"] == 1;
            let rows = [
                ("folder", path),
                ("running", if running { "yes" } else { "no" }.to_owned()),
                ("session", text(&reply["s"])),
                ("port", text(&reply["p"])),
                ("pid", text(&reply["d"])),
                ("url", text(&reply["u"])),
                ("note", text(&reply["m"])),
            ];
            for (k, v) in rows {
                println!("{:<8} {v}", format!("{k}:"));
            }
        }
        SessionsCommand::Prompt {
            device,
            session_id,
            prompt,
            idempotency_key,
        } => {
            let prompt = if prompt == ["-"] {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).map_err(|e| {
                    CliError::Usage(format!("cannot read the prompt from stdin: {e}"))
                })?;
                s
            } else {
                prompt.join(" ")
            };
            let key = idempotency_key.unwrap_or_else(new_idempotency_key);
            let body = json!({ "sessionId": session_id, "prompt": prompt });
            let reply = api
                .mutate(
                    "POST",
                    &device_path(&device, "prompt"),
                    Some(&body),
                    Some(&key),
                )
                .await?;
            if out.json {
                out.print_json(&reply);
            } else {
                println!(
                    "sent to {session_id} on {device} (stream {}, request {})",
                    text(&reply["x"]),
                    text(&reply["i"])
                );
            }
        }
        SessionsCommand::Logs {
            session_id,
            tail,
            follow,
            interval,
        } => logs(api, out, &session_id, tail, follow, interval).await?,
    }
    Ok(())
}

fn print_session_result(
    out: &Output,
    device: &str,
    reply: &Value,
    verb: &str,
) -> Result<(), CliError> {
    if out.json {
        out.print_json(reply);
    }
    if reply["o"] != 1 {
        return Err(CliError::Api {
            status: 200,
            code: "refused_by_device".into(),
            message: format!(
                "the daemon on {device} did not do it: {}",
                reply["m"].as_str().unwrap_or("no reason given")
            ),
        });
    }
    if !out.json {
        let how = if reply["m"] == "session_reused" {
            "reused (already running)"
        } else {
            verb
        };
        println!("session {} {how}", text(&reply["s"]));
        if let Some(u) = reply["u"].as_str() {
            println!("url: {u}");
        }
    }
    Ok(())
}

async fn logs(
    api: &Api,
    out: &Output,
    session_id: &str,
    tail: u16,
    follow: bool,
    interval: u64,
) -> Result<(), CliError> {
    let path = format!("/session/{}/snapshot?tail={tail}", path_escape(session_id));
    let mut printed: Vec<String> = Vec::new();
    loop {
        let snap = api.get(&path).await?;
        let entries: Vec<Value> = snap["e"].as_array().cloned().unwrap_or_default();
        if out.json && !follow {
            out.print_json(&snap);
            return Ok(());
        }
        let lines: Vec<String> = entries
            .iter()
            .map(|e| {
                if out.json {
                    e.to_string()
                } else {
                    format!(
                        "{} [{}] {}",
                        e["ts"].as_str().unwrap_or("-"),
                        e["src"].as_str().unwrap_or("-"),
                        e["m"].as_str().unwrap_or("")
                    )
                }
            })
            .collect();
        for line in &lines[new_from(&printed, &lines)..] {
            println!("{line}");
        }
        printed = lines;
        if !follow {
            return Ok(());
        }
        smol::Timer::after(Duration::from_secs(interval.max(1))).await;
    }
}

/// Where the unprinted part of `now` starts: the tail window slides, so `now` begins with a
/// suffix of `before`; find the longest such overlap.
pub fn new_from(before: &[String], now: &[String]) -> usize {
    (0..before.len())
        .map(|start| &before[start..])
        .find(|suffix| now.starts_with(suffix))
        .map_or(0, <[String]>::len)
}

#[cfg(test)]
mod tests {
    use super::new_from;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn follow_prints_only_new_lines() {
        assert_eq!(new_from(&[], &v(&["a", "b"])), 0);
        assert_eq!(new_from(&v(&["a", "b", "c"]), &v(&["b", "c", "d"])), 2);
        assert_eq!(new_from(&v(&["a", "b"]), &v(&["a", "b"])), 2);
        assert_eq!(new_from(&v(&["a", "b"]), &v(&["x", "y"])), 0);
    }
}
