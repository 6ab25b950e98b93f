//! `codemantle devices list|show|add|remove`.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Map, Value, json};

use crate::api::{Api, CliError, new_idempotency_key};
use crate::output::{Output, ago, labels, table, text, when};

#[derive(Subcommand)]
pub enum DevicesCommand {
    /// List devices with their status.
    List,
    /// Show one device.
    Show { id: String },
    /// Register a device (admin); prints its secret once.
    Add {
        name: String,
        /// Label key=value (repeatable).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Use this device id instead of a random one.
        #[arg(long)]
        id: Option<String>,
        /// Write the secret to FILE (mode 0600) instead of printing it.
        #[arg(long, value_name = "FILE")]
        out_key: Option<PathBuf>,
        /// Idempotency key (default: a fresh one; reuse one to retry safely).
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Remove a device (admin); its key stops working at once.
    Remove {
        id: String,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
}

pub async fn run(api: &Api, out: &Output, cmd: DevicesCommand) -> Result<(), CliError> {
    match cmd {
        DevicesCommand::List => {
            let body = api.get("/devices").await?;
            if out.json {
                out.print_json(&body);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = body["devices"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|d| {
                    vec![
                        text(&d["id"]),
                        text(&d["name"]),
                        text(&d["status"]),
                        ago(&d["last_seen_ms"]),
                        text(&d["agent_version"]),
                        host(&d["host"]),
                        labels(&d["labels"]),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "ID",
                        "NAME",
                        "STATUS",
                        "LAST SEEN",
                        "VERSION",
                        "HOST",
                        "LABELS"
                    ],
                    &rows
                )
            );
        }
        DevicesCommand::Show { id } => {
            let body = api.get(&format!("/devices/{}", path_escape(&id))).await?;
            if out.json {
                out.print_json(&body);
                return Ok(());
            }
            let d = &body["device"];
            let rows = [
                ("id", text(&d["id"])),
                ("name", text(&d["name"])),
                ("status", text(&d["status"])),
                ("online since", when(&d["online_since_ms"])),
                (
                    "last seen",
                    format!("{} ({})", when(&d["last_seen_ms"]), ago(&d["last_seen_ms"])),
                ),
                ("first seen", when(&d["first_seen_ms"])),
                ("agent version", text(&d["agent_version"])),
                ("host", host(&d["host"])),
                ("labels", labels(&d["labels"])),
                ("key id", text(&d["key_id"])),
                ("created", when(&d["created_ms"])),
            ];
            for (k, v) in rows {
                println!("{:<14} {v}", format!("{k}:"));
            }
        }
        DevicesCommand::Add {
            name,
            labels: label_args,
            id,
            out_key,
            idempotency_key,
        } => {
            let mut label_map = Map::new();
            for l in &label_args {
                let (k, v) = l
                    .split_once('=')
                    .ok_or_else(|| CliError::Usage(format!("label {l:?}: expected key=value")))?;
                label_map.insert(k.to_owned(), Value::String(v.to_owned()));
            }
            if let Some(p) = &out_key {
                if p.exists() {
                    return Err(CliError::Usage(format!(
                        "{} already exists; remove it or choose another --out-key path",
                        p.display()
                    )));
                }
            }
            let mut body = json!({ "name": name, "labels": label_map });
            if let Some(id) = id {
                body["id"] = Value::String(id);
            }
            let key = idempotency_key.unwrap_or_else(new_idempotency_key);
            let created = api
                .mutate("POST", "/devices", Some(&body), Some(&key))
                .await?;
            let secret = created["secret"].as_str().unwrap_or_default().to_owned();
            if let Some(path) = &out_key {
                codemantle_control_plane::admin::write_secret_file(path, &secret).map_err(|e| {
                    CliError::Usage(format!(
                        "the device was created but writing {} failed ({e}); remove the device and add it again",
                        path.display()
                    ))
                })?;
            }
            if out.json {
                let mut shown = created.clone();
                if out_key.is_some() {
                    shown["secret"] = Value::Null;
                }
                out.print_json(&shown);
                return Ok(());
            }
            println!("device id: {}", text(&created["device"]["id"]));
            println!("key id:    {}", text(&created["key_id"]));
            match out_key {
                Some(p) => println!("secret:    written to {} (mode 0600)", p.display()),
                None => {
                    println!("secret:    {secret}");
                    eprintln!(
                        "the secret is shown only now: install it on the host as its device key (mode 0600)"
                    );
                }
            }
        }
        DevicesCommand::Remove {
            id,
            idempotency_key,
        } => {
            let key = idempotency_key.unwrap_or_else(new_idempotency_key);
            let path = format!("/devices/{}", path_escape(&id));
            let body = api.mutate("DELETE", &path, None, Some(&key)).await?;
            if out.json {
                out.print_json(&body);
            } else {
                println!("removed {id}");
            }
        }
    }
    Ok(())
}

fn host(h: &Value) -> String {
    let parts: Vec<&str> = ["hostname", "os", "arch"]
        .iter()
        .filter_map(|k| h[k].as_str())
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

/// Percent-escapes a path segment.
pub fn path_escape(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
