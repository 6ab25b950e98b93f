//! Operational routes: `/health`, `/metrics`, `/openapi.json`.

use std::sync::Arc;

use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::json;

use super::App;
use super::error::ApiError;
use super::http::{Body, full, json_response};
use crate::auth::Principal;
use crate::store::StoreError;

/// `GET /health` (public): 200 `{"ok":true,"store":"ok"}` if the store passes a write/read
/// probe, else 503 with the reason (`"store":"full"`, `storage_full` when the disk is full:
/// reads still work then, writes do not).
pub async fn health(app: &Arc<App>) -> Response<Body> {
    let store = app.store.clone();
    match smol::unblock(move || store.probe()).await {
        Ok(()) => json_response(StatusCode::OK, &json!({ "ok": true, "store": "ok" })),
        Err(StoreError::StorageFull { message, .. }) => {
            tracing::error!(error = %message, "health probe: storage full");
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({
                    "ok": false,
                    "store": "full",
                    "error": "storage_full",
                    "message": message,
                }),
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "health probe failed");
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({
                    "ok": false,
                    "store": "error",
                    "error": "store_unavailable",
                    "message": format!("the store failed its probe ({e}); check disk space and the data dir"),
                }),
            )
        }
    }
}

/// `GET /metrics` for an authenticated caller: the counters are installation-wide, so only
/// principals of the default tenant may read them.
pub fn metrics_authorized(
    app: &Arc<App>,
    principal: &Principal,
) -> Result<Response<Body>, ApiError> {
    if principal.tenant.as_str() != crate::store::TenantId::DEFAULT {
        return Err(ApiError::forbidden(
            "metrics cover the whole installation: use a token of the default tenant",
        ));
    }
    Ok(metrics(app))
}

/// The Prometheus text exposition.
pub fn metrics(app: &Arc<App>) -> Response<Body> {
    let mut resp = Response::new(full(app.metrics.render(app.gauges())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    resp
}

/// `GET /openapi.json` (public).
pub fn openapi() -> Response<Body> {
    json_response(StatusCode::OK, &super::openapi::document())
}
