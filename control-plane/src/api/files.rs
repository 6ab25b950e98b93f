//! Directory and file-system commands: `dir` (`dr`), `mkdir` (`md`), `rmdir` (`rd`),
//! `rename` (`rn`). Paths are relative to a daemon root (`root`, default `cwd`, the only one a
//! 0.1.x daemon knows); the daemon's path guard decides what is allowed, we only check the
//! limits so that nothing is silently dropped.
//!
//! Two options exist only for native daemons, and a 0.1.x daemon gets a 400
//! `unsupported_by_device` instead of a silently different operation:
//! - `rmdir` `recursive: true` (0.1.x removes empty directories only);
//! - `rename` without `overwrite: true` (0.1.x always replaces the destination). A rename never
//!   replaces an existing destination unless asked (`overwrite` defaults to `false`), so on a
//!   0.1.x daemon it needs an explicit `"overwrite": true` and is refused with 400
//!   `overwrite_required` otherwise.

use hyper::Response;
use serde::Deserialize;

use codemantle_protocol::message::{DirList, Message, PathRequest, RemoveDir, Rename};

use super::commands::{Command, check_len, flag, opt_flag, validate};
use super::error::ApiError;
use super::http::Body;

/// Default directory listing size (0.1.50).
pub const DEFAULT_DIR_LIMIT: u64 = 128;

fn cwd() -> String {
    "cwd".to_owned()
}

fn dot() -> String {
    ".".to_owned()
}

#[derive(Deserialize)]
struct DirBody {
    #[serde(default = "cwd")]
    root: String,
    #[serde(default = "dot")]
    path: String,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<u64>,
}

/// `POST /devices/:id/dir` → `dr` → `ds` (200).
pub async fn dir(cmd: &Command<'_>) -> Result<Response<Body>, ApiError> {
    let b: DirBody = cmd.body()?;
    let limit = b.limit.unwrap_or(DEFAULT_DIR_LIMIT);
    let limit = u16::try_from(limit)
        .ok()
        .filter(|l| (1..=256).contains(l))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_request",
                format!("`limit` must be 1..256, got {limit}"),
            )
        })?;
    let cursor = b.cursor.filter(|c| !c.is_empty());
    let build = |id| {
        Message::DirList(DirList {
            request_id: id,
            root: b.root.clone(),
            path: b.path.clone(),
            limit,
            cursor: cursor.clone(),
        })
    };
    validate(build)?;
    cmd.run(false, |key| async move {
        cmd.reply(key.as_ref(), false, build).await
    })
    .await
}

#[derive(Deserialize)]
struct PathBody {
    #[serde(default = "cwd")]
    root: String,
    #[serde(default)]
    path: String,
    #[serde(default, deserialize_with = "flag")]
    recursive: bool,
}

/// `POST /devices/:id/mkdir` → `md` → `mr` (200, or 400 if `o:0`). The daemon creates parents.
pub async fn mkdir(cmd: &Command<'_>) -> Result<Response<Body>, ApiError> {
    let b: PathBody = cmd.body()?;
    non_empty("path", &b.path)?;
    let build = |id| {
        Message::MakeDir(PathRequest {
            idempotency_key: None,
            request_id: id,
            root: b.root.clone(),
            path: b.path.clone(),
        })
    };
    validate(build)?;
    cmd.run(true, |key| async move {
        cmd.reply(key.as_ref(), true, build).await
    })
    .await
}

/// `POST /devices/:id/rmdir` → `rd` → `rr` (200, or 400 if `o:0`, e.g. not empty).
pub async fn rmdir(cmd: &Command<'_>) -> Result<Response<Body>, ApiError> {
    let b: PathBody = cmd.body()?;
    non_empty("path", &b.path)?;
    let build = |id| {
        Message::RemoveDir(RemoveDir {
            idempotency_key: None,
            request_id: id,
            root: b.root.clone(),
            path: b.path.clone(),
            recursive: b.recursive,
        })
    };
    validate(build)?;
    cmd.run(true, |key| async move {
        cmd.reply(key.as_ref(), true, build).await
    })
    .await
}

#[derive(Deserialize)]
struct RenameBody {
    #[serde(default = "cwd")]
    root: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    dest: String,
    #[serde(default, deserialize_with = "opt_flag")]
    overwrite: Option<bool>,
}

/// `POST /devices/:id/rename` → `rn` → `rp` (200, or 400 if `o:0`).
pub async fn rename(cmd: &Command<'_>) -> Result<Response<Body>, ApiError> {
    let b: RenameBody = cmd.body()?;
    non_empty("source", &b.source)?;
    non_empty("dest", &b.dest)?;
    check_len("source", &b.source, 512)?;
    let overwrite = b.overwrite.unwrap_or(false);
    let build = |id| {
        Message::Rename(Rename {
            idempotency_key: None,
            request_id: id,
            root: b.root.clone(),
            source: b.source.clone(),
            dest: b.dest.clone(),
            overwrite,
        })
    };
    validate(build)?;
    let result = cmd
        .run(true, |key| async move {
            cmd.reply(key.as_ref(), true, build).await
        })
        .await;
    match result {
        Err(e) if e.code == "unsupported_by_device" && b.overwrite.is_none() => {
            Err(ApiError::bad_request(
                "overwrite_required",
                format!(
                    "device {} runs a 0.1.x daemon, which always replaces an existing \
                     destination, and a rename replaces nothing unless asked: send \
                     \"overwrite\": true to rename on this device",
                    cmd.device.id()
                ),
            ))
        }
        other => other,
    }
}

fn non_empty(field: &str, value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::bad_request(
            "invalid_request",
            format!("`{field}` is required (a path relative to the root)"),
        ));
    }
    Ok(())
}
