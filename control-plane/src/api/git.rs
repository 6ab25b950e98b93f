//! Git commands: `POST /devices/:id/git/<op>` with the 0.1.x body fields (reference §4.3).
//!
//! Every body has `root` (default `cwd`) and `path` (default `.`). The daemon runs git by
//! absolute path with a fixed argv; what we add is validation before sending: an unknown
//! `action`, a branch over 256 or a message over 1024 characters used to be dropped by the
//! daemon and cost the caller a 180 s timeout, and now are a 400 naming the field.
//! `git/status` and `git/branch` answer 200 whatever the daemon says (as 0.1.50); the others
//! 200 on `o:1`, else 400. Timeout: the git timeout (default 180 s).

use hyper::Response;
use serde::Deserialize;

use codemantle_protocol::message::{
    BranchAction, GitAdd, GitBranch, GitCheckout, GitClone, GitCommit, GitConfig, GitConfigAction,
    GitSync, Message, PathRequest,
};

use super::commands::{Command, flag, validate};
use super::error::ApiError;
use super::http::Body;
use super::routes::GitOp;

fn cwd() -> String {
    "cwd".to_owned()
}

fn dot() -> String {
    ".".to_owned()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GitBody {
    #[serde(default = "cwd")]
    root: String,
    #[serde(default = "dot")]
    path: String,
    url: Option<String>,
    branch: Option<String>,
    files: Option<String>,
    #[serde(default, deserialize_with = "flag")]
    all: bool,
    message: Option<String>,
    #[serde(default, deserialize_with = "flag")]
    amend: bool,
    remote: Option<String>,
    action: Option<String>,
    #[serde(default, deserialize_with = "flag")]
    create: bool,
    name: Option<String>,
    email: Option<String>,
    #[serde(default, deserialize_with = "flag")]
    global: bool,
    #[serde(default, deserialize_with = "flag")]
    credential_manager: bool,
}

fn required(field: &str, v: &Option<String>) -> Result<String, ApiError> {
    match v {
        Some(s) if !s.trim().is_empty() => Ok(s.clone()),
        _ => Err(ApiError::bad_request(
            "invalid_request",
            format!("`{field}` is required"),
        )),
    }
}

fn non_empty(v: &Option<String>) -> Option<String> {
    v.clone().filter(|s| !s.is_empty())
}

/// `POST /devices/:id/git/<op>`.
pub async fn handle(cmd: &Command<'_>, op: GitOp) -> Result<Response<Body>, ApiError> {
    let b: GitBody = cmd.body()?;
    let (root, path) = (b.root.clone(), b.path.clone());
    let always_200 = matches!(op, GitOp::Status | GitOp::Branch);
    let mutating = op != GitOp::Status;
    let build: Box<dyn Fn(u32) -> Message + Send + Sync> = match op {
        GitOp::Status | GitOp::Init => Box::new(move |id| {
            let req = PathRequest {
                idempotency_key: None,
                request_id: id,
                root: root.clone(),
                path: path.clone(),
            };
            if op == GitOp::Status {
                Message::GitStatus(req)
            } else {
                Message::GitInit(req)
            }
        }),
        GitOp::Clone => {
            let url = required("url", &b.url)?;
            let branch = non_empty(&b.branch);
            Box::new(move |id| {
                Message::GitClone(GitClone {
                    idempotency_key: None,
                    request_id: id,
                    root: root.clone(),
                    path: path.clone(),
                    url: url.clone(),
                    branch: branch.clone(),
                })
            })
        }
        GitOp::Add => {
            let (files, all) = (non_empty(&b.files), b.all);
            Box::new(move |id| {
                Message::GitAdd(GitAdd {
                    idempotency_key: None,
                    request_id: id,
                    root: root.clone(),
                    path: path.clone(),
                    pathspec: files.clone(),
                    all,
                })
            })
        }
        GitOp::Commit => {
            let message = required("message", &b.message)?;
            let amend = b.amend;
            Box::new(move |id| {
                Message::GitCommit(GitCommit {
                    idempotency_key: None,
                    request_id: id,
                    root: root.clone(),
                    path: path.clone(),
                    message: message.clone(),
                    amend,
                })
            })
        }
        GitOp::Push | GitOp::Pull => {
            let remote = non_empty(&b.remote).or_else(|| Some("origin".to_owned()));
            let branch = non_empty(&b.branch);
            Box::new(move |id| {
                let req = GitSync {
                    idempotency_key: None,
                    request_id: id,
                    root: root.clone(),
                    path: path.clone(),
                    remote: remote.clone(),
                    branch: branch.clone(),
                };
                if op == GitOp::Push {
                    Message::GitPush(req)
                } else {
                    Message::GitPull(req)
                }
            })
        }
        GitOp::Branch => {
            let action = match b.action.as_deref() {
                None | Some("") => BranchAction::List,
                Some(a) => BranchAction::parse(a).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_request",
                        format!("`action` must be list, create or delete, got {a:?}"),
                    )
                })?,
            };
            if action != BranchAction::List {
                required("branch", &b.branch)?;
            }
            let name = non_empty(&b.branch);
            Box::new(move |id| {
                Message::GitBranch(GitBranch {
                    idempotency_key: None,
                    request_id: id,
                    root: root.clone(),
                    path: path.clone(),
                    action: Some(action),
                    name: name.clone(),
                })
            })
        }
        GitOp::Checkout => {
            let branch = required("branch", &b.branch)?;
            let create = b.create;
            Box::new(move |id| {
                Message::GitCheckout(GitCheckout {
                    idempotency_key: None,
                    request_id: id,
                    root: root.clone(),
                    path: path.clone(),
                    branch: branch.clone(),
                    create,
                })
            })
        }
        GitOp::Config => {
            let action = match b.action.as_deref() {
                None | Some("") => GitConfigAction::Get,
                Some(a) => GitConfigAction::parse(a).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_request",
                        format!("`action` must be get or set, got {a:?}"),
                    )
                })?,
            };
            let (name, email) = (non_empty(&b.name), non_empty(&b.email));
            let (global, credential_manager) = (b.global, b.credential_manager);
            Box::new(move |id| {
                Message::GitConfig(GitConfig {
                    idempotency_key: None,
                    request_id: id,
                    root: root.clone(),
                    path: path.clone(),
                    action,
                    name: name.clone(),
                    email: email.clone(),
                    global,
                    credential_manager,
                })
            })
        }
    };
    validate(&build)?;
    cmd.run(mutating, |key| async move {
        cmd.reply(key.as_ref(), !always_200, build).await
    })
    .await
}
