//! `codemantle sessions start|stop|status|prompt|logs`: OpenCode sessions on a device.
//!
//! `logs SID` prints a session's output — the chunks of its latest prompt's stream (or
//! `--stream X`), as the control plane stored them (`GET /sessions/:sid/stream?follow=0`, so it
//! works while the device is offline) — and exits. `logs SID -f` follows the same stream live
//! over SSE and prints chunks as they arrive; when the connection drops (control plane
//! restarting, network) it reconnects with `Last-Event-ID` = the last chunk printed, so
//! nothing is printed twice or skipped; it exits when the stream ends (the prompt's turn
//! finished, or the session ended). Chunks the control plane no longer holds are reported on
//! stderr, never skipped silently. `--device-log` prints the device's session log instead
//! (the snapshot route, `sl` to the daemon; with `-f` it polls every `--interval` seconds).

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
        /// Give the session a JIT credential that expires after SECS (16..3600); the daemon
        /// ends the session then unless it is renewed (`POST /sessions/:sid/jit/renew`).
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
    /// A session's output (its latest prompt's stream); -f follows it live until it ends.
    Logs {
        session_id: String,
        /// Keep printing output as it arrives (resumes after a dropped connection), until the
        /// stream ends.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The stream id a prompt returned (default: the session's latest).
        #[arg(long, value_name = "X")]
        stream: Option<String>,
        /// Print the device's session log (the snapshot) instead of the output stream.
        #[arg(long)]
        device_log: bool,
        /// Lines of the device log (1..200), with --device-log.
        #[arg(long, default_value_t = 100)]
        tail: u16,
        /// Poll interval of --device-log -f, seconds.
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
            follow,
            device_log: true,
            tail,
            interval,
            ..
        } => logs(api, out, &session_id, tail, follow, interval).await?,
        SessionsCommand::Logs {
            session_id,
            follow,
            stream,
            ..
        } => output(api, out, &session_id, stream.as_deref(), follow).await?,
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

/// How a session's output stream read ended.
enum Ended {
    /// The stream's `end` event: nothing more will come.
    Stream,
    /// The response ended without it (`follow=0` served everything stored, or the connection
    /// dropped).
    Response,
}

/// `logs` of the output stream; see the module doc.
async fn output(
    api: &Api,
    out: &Output,
    session_id: &str,
    stream: Option<&str>,
    follow: bool,
) -> Result<(), CliError> {
    let mut x = stream.map(str::to_owned);
    let mut last: Option<u32> = None;
    let mut backoff = Duration::from_millis(500);
    loop {
        // After the first response, stay on the stream it named (a newer prompt must not
        // take over half-way).
        let mut path = format!("/sessions/{}/stream?", path_escape(session_id));
        if let Some(x) = &x {
            path.push_str(&format!("x={}&", path_escape(x)));
        }
        if !follow {
            path.push_str("follow=0");
        }
        let headers: Vec<(&str, String)> = last
            .map(|q| vec![("last-event-id", q.to_string())])
            .unwrap_or_default();
        let opened = match api.open_stream(&path, &headers).await {
            Ok(s) => s,
            Err(e @ CliError::Api { .. }) => return Err(e),
            Err(e) if follow => {
                eprintln!(
                    "codemantle: {e}; reconnecting in {} ms",
                    backoff.as_millis()
                );
                smol::Timer::after(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
            Err(e) => return Err(e),
        };
        backoff = Duration::from_millis(500);
        if x.is_none() {
            x = opened.header("x-stream-id").map(str::to_owned);
        }
        let mut sse = opened.into_sse();
        let ended = print_stream(out, &mut sse, &mut last).await;
        match ended {
            Ok(Ended::Stream) => return Ok(()),
            Ok(Ended::Response) if !follow => return Ok(()),
            Ok(Ended::Response) => {
                eprintln!(
                    "codemantle: the output stream was interrupted; resuming after chunk {}",
                    last.map_or("-".to_owned(), |q| q.to_string())
                );
            }
            Err(e) if follow => {
                eprintln!("codemantle: the output stream was interrupted ({e}); resuming");
            }
            Err(e) => return Err(e.into()),
        }
        smol::Timer::after(Duration::from_millis(200)).await;
    }
}

/// Prints the chunks of one SSE response; `last` is the seq of the last chunk printed.
async fn print_stream(
    out: &Output,
    sse: &mut codemantle_control_plane::client::SseReader,
    last: &mut Option<u32>,
) -> Result<Ended, codemantle_control_plane::client::ClientError> {
    use std::io::Write as _;
    while let Some(ev) = sse.next_event().await? {
        let data: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
        match ev.event.as_deref() {
            Some("chunk") => {
                let Some(q) = data["q"].as_u64().and_then(|q| u32::try_from(q).ok()) else {
                    continue;
                };
                if last.is_some_and(|l| q <= l) {
                    continue;
                }
                *last = Some(q);
                let mut stdout = std::io::stdout().lock();
                let written = if out.json {
                    writeln!(stdout, "{data}")
                } else {
                    write!(stdout, "{}", data["d"].as_str().unwrap_or(""))
                };
                let _ = written.and_then(|()| stdout.flush());
            }
            Some("truncated") => {
                let (from, to) = (text(&data["from"]), text(&data["to"]));
                eprintln!(
                    "codemantle: chunks {from}..={to} of this stream are no longer held by the control plane (evicted or from before a restart)"
                );
                if let Some(to) = data["to"].as_u64().and_then(|q| u32::try_from(q).ok()) {
                    *last = Some(last.map_or(to, |l| l.max(to)));
                }
            }
            Some("end") => return Ok(Ended::Stream),
            _ => {}
        }
    }
    Ok(Ended::Response)
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
