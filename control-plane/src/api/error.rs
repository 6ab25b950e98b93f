//! API errors: every failure becomes an HTTP status and a JSON body
//! `{"error": CODE, "message": "what happened and what to do"}`.
//!
//! Codes are stable, snake_case and meant for scripts; messages are for the operator and may
//! change. Storage failures are logged with detail and reported as 503 so clients retry; a full
//! disk is 507 `storage_full` with what to do (retrying does not help until space is freed).

use std::borrow::Cow;

use hyper::StatusCode;
use serde_json::json;

use super::http::{Body, json_response};
use crate::auth::AuthError;
use crate::store::StoreError;

/// An error answer of the API.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Cow<'static, str>,
    pub message: String,
    /// Structured detail a script can act on (e.g. every validation problem with its field
    /// path), sent as `errors`.
    pub details: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        code: impl Into<Cow<'static, str>>,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
            details: None,
        }
    }

    /// The same error with `details` sent as the body's `errors`.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 for a resource that is missing **or belongs to another tenant** (same answer).
    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("{}_not_found", what.replace(' ', "_")),
            format!("no {what} {id:?} in your tenant; list them to check the id"),
        )
    }

    /// The JSON body of this error: `{error, message}`, plus `errors` when there are details.
    pub fn body(&self) -> serde_json::Value {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let Some(d) = &self.details {
            body["errors"] = d.clone();
        }
        body
    }

    pub fn into_response(self) -> hyper::Response<Body> {
        json_response(self.status, &self.body())
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
        ApiError::new(status, e.code(), e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { what } => ApiError::new(
                StatusCode::NOT_FOUND,
                format!("{}_not_found", what.replace(' ', "_")),
                format!("{what} not found in your tenant; check the id"),
            ),
            StoreError::AlreadyExists { what } => ApiError::new(
                StatusCode::CONFLICT,
                format!("{}_exists", what.replace(' ', "_")),
                format!("{what} already exists; choose another id"),
            ),
            StoreError::Conflict(msg) => ApiError::new(StatusCode::CONFLICT, "conflict", msg),
            StoreError::StorageFull { message, .. } => {
                tracing::error!(error = %message, "store full while serving a request");
                ApiError::new(StatusCode::INSUFFICIENT_STORAGE, "storage_full", message)
            }
            StoreError::Backend(msg) => {
                tracing::error!(error = %msg, "store failure while serving a request");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the control plane's store failed; retry shortly, and if it persists check \
                     the server log, disk space and the data dir",
                )
            }
        }
    }
}
