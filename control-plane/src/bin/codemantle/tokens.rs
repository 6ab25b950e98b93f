//! `codemantle tokens list|create|revoke`.

use clap::Subcommand;
use serde_json::json;

use crate::api::{Api, CliError, new_idempotency_key};
use crate::devices::path_escape;
use crate::output::{Output, table, text, when};

#[derive(Subcommand)]
pub enum TokensCommand {
    /// List tokens of your tenant.
    List,
    /// Mint a token (at most your own role); prints it once.
    Create {
        #[arg(long)]
        name: String,
        /// viewer, operator, admin or owner.
        #[arg(long)]
        role: String,
        /// Another tenant (installation owners only).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a token by id.
    Revoke { id: String },
}

pub async fn run(api: &Api, out: &Output, cmd: TokensCommand) -> Result<(), CliError> {
    match cmd {
        TokensCommand::List => {
            let body = api.get("/tokens").await?;
            if out.json {
                out.print_json(&body);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = body["tokens"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|t| {
                    let revoked = if t["revoked"].as_bool() == Some(true) {
                        when(&t["revoked_ms"])
                    } else {
                        "-".into()
                    };
                    vec![
                        text(&t["id"]),
                        text(&t["name"]),
                        text(&t["role"]),
                        when(&t["created_ms"]),
                        text(&t["created_by"]),
                        revoked,
                    ]
                })
                .collect();
            print!(
                "{}",
                table(&["ID", "NAME", "ROLE", "CREATED", "BY", "REVOKED"], &rows)
            );
        }
        TokensCommand::Create { name, role, tenant } => {
            let mut body = json!({ "name": name, "role": role });
            if let Some(t) = tenant {
                body["tenant"] = json!(t);
            }
            // No idempotency key: the server refuses one here (a replay would store the secret).
            let created = api.mutate("POST", "/tokens", Some(&body), None).await?;
            if out.json {
                out.print_json(&created);
                return Ok(());
            }
            eprintln!(
                "token {} ({}) minted; it is shown only now:",
                text(&created["token"]["id"]),
                text(&created["token"]["role"])
            );
            println!("{}", text(&created["secret"]));
        }
        TokensCommand::Revoke { id } => {
            let key = new_idempotency_key();
            let path = format!("/tokens/{}/revoke", path_escape(&id));
            let body = api.mutate("POST", &path, None, Some(&key)).await?;
            if out.json {
                out.print_json(&body);
            } else if body["already_revoked"].as_bool() == Some(true) {
                println!("token {id} was already revoked");
            } else {
                println!("revoked {id}");
            }
        }
    }
    Ok(())
}
