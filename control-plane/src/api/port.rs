//! The port proxy: `ANY /devices/:id/port/:port/*path` → `pr` → the answer of whatever listens
//! on `127.0.0.1:<port>` on the device (a session's OpenCode server, a dev server on a port the
//! daemon exposes), streamed back as the HTTP response.
//!
//! Steps, in order: operator role → **tenant check** (404 `device_not_found` for another
//! tenant's device, before anything is read or sent) → the origin rule below → port 1..65535
//! (400 `invalid_port`) → method on the daemon's allowlist (405) → request headers (431 when
//! more than 64 would be forwarded or one is over 4096 bytes; 400 for a name or value the wire
//! cannot carry) → body ≤ 1.5 MB (413; the daemon's wire limit, so nothing is dropped
//! silently as with 0.1.50) → `pr` through the hub (the device's pending-request cap applies,
//! and open streams count against it) → the `pv` within the proxy timeout (504
//! `request_timeout`) → the response: status, filtered headers, then the body — whole, or
//! streamed chunk by chunk as `ps` frames arrive (SSE works), with backpressure end to end:
//! a native daemon keeps at most a window in flight and is granted more (`pw`) as the client
//! takes the body, so a slow client slows the upstream down; a 0.1.x daemon, which knows no
//! window, is cut off once its client is [`crate::tunnel::hub::PROXY_STREAM_BUFFER_BYTES`]
//! behind instead of being buffered for; a client that leaves makes the daemon stop (`pe`).
//!
//! Errors: the daemon refusing the port → 403 `port_not_exposed`; the upstream not answering
//! → 502 `upstream_unreachable`/`upstream_failed`/`upstream_malformed` or 504
//! `upstream_timeout`, with the daemon's explanation; the rest as every device command
//! ([`super::commands::dispatch_error`]).
//!
//! # Origins: why previews should not run on the API's origin
//!
//! Proxied content is whatever a build box serves — code from the repository being built, or
//! from an AI agent. On the API's origin it would share the browser's origin with the API and
//! with anything stored there (0.1.50 §12.1 #2: preview pages could drive the panel's API with
//! the viewer's session). So:
//!
//! - **Never forwarded upstream**: `Authorization` (it carries the API token), `Cookie` on the
//!   API origin, `Host`, hop-by-hop headers, `Accept-Encoding` (bodies travel uncompressed).
//! - **On the API origin** (no `preview_host` configured): responses get
//!   `Content-Security-Policy: sandbox allow-scripts allow-forms allow-popups allow-modals
//!   allow-downloads` — the browser runs the page in an opaque origin, so its scripts cannot
//!   read or send anything as the API's origin — and upstream `Set-Cookie`,
//!   `Strict-Transport-Security`, `Clear-Site-Data` and `Alt-Svc` are dropped (an upstream must
//!   not plant cookies, pin HSTS or wipe storage for the API's host). Root-relative URLs in
//!   proxied pages (`/assets/app.js`) do not resolve under `/devices/…/port/…`; use a
//!   preview host for real web apps.
//! - **With `preview_host = "preview.example.test"`** (control-plane config): the API origin
//!   refuses the route (421 `preview_origin_required`, naming the URL to use), and every
//!   request whose `Host` is `<port>-<device id>.preview.example.test` is proxied to that
//!   device and port with its path as is — nothing else is served on preview hosts (no API
//!   route: 404 `preview_host_only`). Each device port is its own origin: apps are isolated
//!   from the API and from one another, root-relative URLs work, and their own cookies pass
//!   (`Cookie` forwarded, `Set-Cookie` kept — they are scoped to that preview host). DNS: a
//!   wildcard `*.preview.example.test` pointing at the control plane, and a wildcard TLS
//!   certificate. Host names are case-insensitive, so the device id in the host is matched
//!   case-insensitively within the caller's tenant.
//!
//! Authentication is the same bearer token on both origins (the header is consumed here and
//! never forwarded). Browsers cannot add it to page loads, so today previews are for API
//! clients and tools; a browser sign-in for preview hosts comes with browser logins.

use std::sync::Arc;

use http_body_util::{BodyExt as _, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Response, StatusCode};

use codemantle_protocol::error::ErrorCode;
use codemantle_protocol::limits;
use codemantle_protocol::message::{Header, Message, ProxyRequest};

use super::App;
use super::commands::{checked_device, dispatch_error, validate};
use super::error::ApiError;
use super::http::{Body, full, read_body};
use crate::auth::Principal;
use crate::store::{Device, Role};
use crate::tunnel::hub::{ProxyBody, ProxyNext, ProxyReply};
use crate::tunnel::{Caller, CheckedDevice, DispatchError};

/// Methods the daemon forwards (its `proxy::ALLOWED_METHODS`).
pub const ALLOWED_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Request headers never forwarded (besides `sec-websocket-*`, and `cookie` on the API
/// origin).
const DROP_REQUEST: [&str; 14] = [
    "host",
    "authorization",
    "proxy-authorization",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "expect",
    "accept-encoding",
    "http2-settings",
];

/// Response headers never passed on (hop-by-hop).
const DROP_RESPONSE: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Response headers dropped on the API origin (see the module doc).
const DROP_RESPONSE_ON_API: [&str; 4] = [
    "set-cookie",
    "strict-transport-security",
    "clear-site-data",
    "alt-svc",
];

/// The policy proxied pages get on the API origin: an opaque origin of their own.
const API_ORIGIN_CSP: &str =
    "sandbox allow-scripts allow-forms allow-popups allow-modals allow-downloads";

/// Most bytes of request headers the daemon forwards (its `MAX_REQUEST_HEADER_BYTES`).
const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Where a request is served from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Api,
    Preview,
}

/// What the `Host` of a request means when a preview host is configured.
#[derive(Debug, PartialEq, Eq)]
pub enum PreviewHost {
    /// Not under the preview host: the API.
    Api,
    /// `<port>-<device>.<preview host>`.
    Target { port: String, device: String },
    /// The preview host itself, or a name under it that is not `<port>-<device>`.
    Malformed,
}

/// Classifies `host` (the `Host` header, or the URI authority) against `preview_host`.
pub fn classify_host(preview_host: &str, host: Option<&str>) -> PreviewHost {
    let Some(host) = host else {
        return PreviewHost::Api;
    };
    let host = host.trim().trim_end_matches('.');
    // Drop a port (`name:8787`); IPv6 literals are never preview hosts.
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    };
    let name = name.to_ascii_lowercase();
    let preview = preview_host.to_ascii_lowercase();
    if name == preview {
        return PreviewHost::Malformed;
    }
    let Some(label) = name
        .strip_suffix(preview.as_str())
        .and_then(|l| l.strip_suffix('.'))
    else {
        return PreviewHost::Api;
    };
    match label.split_once('-') {
        Some((port, device))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && !device.is_empty()
                && !device.contains('.') =>
        {
            PreviewHost::Target {
                port: port.to_owned(),
                device: device.to_owned(),
            }
        }
        _ => PreviewHost::Malformed,
    }
}

/// The `Host` a request was sent to (HTTP/1.1 `Host`, or an absolute URI's authority).
pub fn request_host(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(hyper::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
}

/// `ANY /devices/:id/port/:port/*path` on the API origin.
pub async fn api_origin(
    app: &Arc<App>,
    principal: &Principal,
    parts: &Parts,
    body: Incoming,
    id: &str,
    port: &str,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Operator)?;
    let (device, record) = checked_device(app, principal, id).await?;
    if let Some(preview) = &app.options.preview_host {
        let port = port.parse::<u16>().unwrap_or(0);
        return Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "preview_origin_required",
            format!(
                "this control plane serves proxied ports only on its preview origin, never on \
                 the API's: request {port}-{}.{preview}{} (same path, same token) instead",
                record.id.to_ascii_lowercase(),
                upstream_target(parts, true)
            ),
        ));
    }
    let port = parse_port(port)?;
    let target = upstream_target(parts, true);
    forward(
        app,
        principal,
        parts,
        body,
        device,
        record,
        port,
        target,
        Origin::Api,
    )
    .await
}

/// A request on a preview host (`<port>-<device>.<preview_host>`): proxied with its path.
pub async fn preview_origin(
    app: &Arc<App>,
    principal: &Principal,
    parts: &Parts,
    body: Incoming,
    device: &str,
    port: &str,
) -> Result<Response<Body>, ApiError> {
    principal.require(Role::Operator)?;
    let (device, record) = match checked_device(app, principal, device).await {
        Ok(found) => found,
        Err(e) if e.status == StatusCode::NOT_FOUND => {
            // Host names arrive lower-cased; device ids may have capitals.
            let (store, tenant, wanted) = (
                app.store.clone(),
                principal.tenant.clone(),
                device.to_owned(),
            );
            let matches: Vec<Device> = smol::unblock(move || store.devices(&tenant))
                .await?
                .into_iter()
                .filter(|d| d.id.eq_ignore_ascii_case(&wanted))
                .collect();
            match matches.as_slice() {
                [one] => checked_device(app, principal, &one.id).await?,
                _ => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    let port = parse_port(port)?;
    let target = upstream_target(parts, false);
    forward(
        app,
        principal,
        parts,
        body,
        device,
        record,
        port,
        target,
        Origin::Preview,
    )
    .await
}

/// The preview host refuses everything that is not `<port>-<device>.<preview host>`.
pub fn preview_host_only(preview_host: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "preview_host_only",
        format!(
            "this host only serves previews, as <port>-<device id>.{preview_host}; the API is on \
             the control plane's own address"
        ),
    )
}

fn parse_port(port: &str) -> Result<u16, ApiError> {
    port.parse::<u16>().ok().filter(|p| *p >= 1).ok_or_else(|| {
        ApiError::bad_request(
            "invalid_port",
            format!("port must be 1..65535, got {port:?}"),
        )
    })
}

/// The path (+ query) to request upstream: on the API origin what follows
/// `/devices/:id/port/:port` (default `/`), on a preview host the whole path.
fn upstream_target(parts: &Parts, strip_route: bool) -> String {
    let path = parts.uri.path();
    let rest = if strip_route {
        let trimmed = path.trim_start_matches('/');
        let mut it = trimmed.splitn(5, '/');
        let _ = (it.next(), it.next(), it.next(), it.next());
        format!("/{}", it.next().unwrap_or(""))
    } else if path.is_empty() {
        "/".to_owned()
    } else {
        path.to_owned()
    };
    match parts.uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest,
    }
}

/// The request headers to forward, or why they cannot be.
fn forward_headers(parts: &Parts, origin: Origin) -> Result<Vec<Header>, ApiError> {
    let mut out = Vec::new();
    let mut total = 0;
    for (name, value) in &parts.headers {
        let name = name.as_str();
        if DROP_REQUEST.contains(&name)
            || name.starts_with("sec-websocket-")
            || (origin == Origin::Api && name == "cookie")
        {
            continue;
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || name.len() > limits::HEADER_NAME.max
        {
            return Err(ApiError::bad_request(
                "invalid_header",
                format!(
                    "header {name:?} cannot be proxied: names must be 1..64 of A-Z a-z 0-9 -; \
                     leave it out"
                ),
            ));
        }
        let value = value.to_str().map_err(|_| {
            ApiError::bad_request(
                "invalid_header",
                format!("the value of header {name} is not visible ASCII; leave it out"),
            )
        })?;
        if value.len() > limits::HEADER_VALUE.max {
            return Err(ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header_too_large",
                format!(
                    "header {name} is {} bytes; at most {} can be proxied",
                    value.len(),
                    limits::HEADER_VALUE.max
                ),
            ));
        }
        total += name.len() + value.len();
        out.push(Header::new(name, value));
    }
    if out.len() > limits::MAX_HEADERS || total > MAX_HEADER_BYTES {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_many_headers",
            format!(
                "{} headers ({total} bytes) would be proxied; at most {} headers and \
                 {MAX_HEADER_BYTES} bytes can be",
                out.len(),
                limits::MAX_HEADERS
            ),
        ));
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn forward(
    app: &Arc<App>,
    principal: &Principal,
    parts: &Parts,
    body: Incoming,
    device: CheckedDevice,
    record: Device,
    port: u16,
    target: String,
    origin: Origin,
) -> Result<Response<Body>, ApiError> {
    let method = parts.method.as_str().to_ascii_uppercase();
    if !ALLOWED_METHODS.contains(&method.as_str()) {
        return Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!(
                "{method} is not proxied; allowed: {}",
                ALLOWED_METHODS.join(", ")
            ),
        ));
    }
    if target.len() > limits::PROXY_TARGET.max {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!(
                "the proxied path and query are {} bytes; at most {} can be proxied",
                target.len(),
                limits::PROXY_TARGET.max
            ),
        ));
    }
    let headers = forward_headers(parts, origin)?;
    let body = read_body(body, limits::MAX_PROXY_REQUEST_BYTES).await?;
    let build = |id| {
        Message::ProxyRequest(ProxyRequest {
            request_id: id,
            port,
            method: method.clone(),
            target: target.clone(),
            headers: headers.clone(),
            body: body.to_vec(),
        })
    };
    validate(build)?;
    let caller = Caller {
        tenant: principal.tenant.clone(),
        actor: principal.actor_id.clone(),
        idempotency: None,
    };
    let reply = app
        .hub
        .proxy(&caller, &device, build)
        .await
        .map_err(|e| proxy_dispatch_error(e, &record, port))?;
    respond(reply, &record.id, port, origin)
}

fn proxy_dispatch_error(e: DispatchError, device: &Device, port: u16) -> ApiError {
    match e {
        DispatchError::Remote { code, message }
            if code == ErrorCode::Auth
                && message
                    .as_deref()
                    .is_some_and(|m| m.starts_with("port_not_exposed")) =>
        {
            port_not_exposed(&device.id, port)
        }
        DispatchError::Remote {
            code: ErrorCode::Limit | ErrorCode::Proto,
            message: Some(m),
        } => ApiError::bad_request(
            "proxy_refused",
            format!("device {} refused the request: {m}", device.id),
        ),
        e => dispatch_error(e, device),
    }
}

fn port_not_exposed(device_id: &str, port: u16) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "port_not_exposed",
        format!(
            "port {port} on device {} is neither a running session's port nor in the daemon's \
             exposed_ports; start a session (POST /devices/{}/session/start) or add the port to \
             exposed_ports in the daemon's config",
            device_id, device_id
        ),
    )
}

/// Turns the daemon's `pv` (and body stream) into the HTTP response.
fn respond(
    reply: ProxyReply,
    device_id: &str,
    port: u16,
    origin: Origin,
) -> Result<Response<Body>, ApiError> {
    let ProxyReply { head, body } = reply;
    if !head.ok {
        let m = head.error.unwrap_or_else(|| "proxy_failed".to_owned());
        let code = m.split(':').next().unwrap_or("").trim();
        return Err(match code {
            "port_not_exposed" => port_not_exposed(device_id, port),
            "upstream_timeout" => ApiError::new(StatusCode::GATEWAY_TIMEOUT, "upstream_timeout", m),
            "upstream_unreachable" | "upstream_failed" | "upstream_malformed" => {
                ApiError::new(StatusCode::BAD_GATEWAY, code.to_owned(), m)
            }
            _ => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "upstream_failed",
                format!("device {device_id} could not proxy to port {port}: {m}"),
            ),
        });
    }
    let status = head
        .status
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    let streamed = body.is_some();
    let mut resp = match body {
        Some(body) => Response::new(stream_body(body)),
        None => Response::new(full(head.body.unwrap_or_default())),
    };
    *resp.status_mut() = status;
    let out = resp.headers_mut();
    for Header { name, value } in head.headers.unwrap_or_default() {
        let lower = name.to_ascii_lowercase();
        let drop = DROP_RESPONSE.contains(&lower.as_str())
            || (lower == "content-length" && !streamed)
            || (origin == Origin::Api && DROP_RESPONSE_ON_API.contains(&lower.as_str()));
        if drop {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(lower.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            out.append(n, v);
        }
    }
    if origin == Origin::Api {
        out.append(
            hyper::header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(API_ORIGIN_CSP),
        );
    }
    if streamed {
        // Reverse proxies in front of the control plane must not buffer a stream.
        out.insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    Ok(resp)
}

/// The streamed body: one HTTP chunk per `ps`. Dropping it (client gone) cancels the stream.
fn stream_body(body: ProxyBody) -> Body {
    let frames = futures_lite::stream::unfold(body, |mut body| async move {
        match body.next().await {
            ProxyNext::Data(d) => Some((
                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(d))),
                body,
            )),
            ProxyNext::End => None,
            ProxyNext::Cut => {
                tracing::warn!(
                    request = body.request_id(),
                    "proxied response cut short (device gone or client too slow)"
                );
                None
            }
        }
    });
    StreamBody::new(frames).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_hosts_name_a_port_and_a_device() {
        let p = "preview.example.test";
        assert_eq!(
            classify_host(p, Some("cp.example.test:8787")),
            PreviewHost::Api
        );
        assert_eq!(classify_host(p, None), PreviewHost::Api);
        assert_eq!(
            classify_host(p, Some("4100-dev_abc-d.Preview.Example.Test:8443")),
            PreviewHost::Target {
                port: "4100".into(),
                device: "dev_abc-d".into()
            }
        );
        assert_eq!(
            classify_host(p, Some("preview.example.test")),
            PreviewHost::Malformed
        );
        assert_eq!(
            classify_host(p, Some("x.y.preview.example.test")),
            PreviewHost::Malformed
        );
        assert_eq!(
            classify_host(p, Some("abc-dev.preview.example.test")),
            PreviewHost::Malformed
        );
        // A look-alike suffix is not under the preview host.
        assert_eq!(
            classify_host(p, Some("4100-dev.evilpreview.example.test")),
            PreviewHost::Api
        );
    }

    fn parts(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = hyper::Request::builder().uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn targets_keep_the_rest_of_the_path_and_the_query() {
        let p = parts("/devices/dev_x/port/4100/global/health?a=1&b=%20", &[]);
        assert_eq!(upstream_target(&p, true), "/global/health?a=1&b=%20");
        assert_eq!(
            upstream_target(&parts("/devices/dev_x/port/4100", &[]), true),
            "/"
        );
        assert_eq!(
            upstream_target(&parts("/devices/dev_x/port/4100/", &[]), true),
            "/"
        );
        assert_eq!(
            upstream_target(&parts("/assets/app.js?v=2", &[]), false),
            "/assets/app.js?v=2"
        );
    }

    fn answer(headers: &[(&str, &str)]) -> ProxyReply {
        ProxyReply {
            head: codemantle_protocol::message::ProxyResponse {
                request_id: 1,
                ok: true,
                status: Some(200),
                status_text: Some("OK".into()),
                headers: Some(headers.iter().map(|(n, v)| Header::new(*n, *v)).collect()),
                body: Some(b"<html></html>".to_vec()),
                error: None,
                streaming: false,
            },
            body: None,
        }
    }

    #[test]
    fn responses_on_the_api_origin_are_sandboxed_and_plant_nothing() {
        let upstream = [
            ("content-type", "text/html"),
            ("set-cookie", "sid=1; Path=/"),
            (
                "strict-transport-security",
                "max-age=999999; includeSubDomains",
            ),
            ("clear-site-data", "\"*\""),
            ("connection", "close"),
            ("content-length", "999"),
            ("x-app", "1"),
        ];
        let api = respond(answer(&upstream), "dev_x", 4100, Origin::Api).unwrap();
        let h = api.headers();
        assert_eq!(h.get("x-app").unwrap(), "1");
        assert_eq!(h.get("content-type").unwrap(), "text/html");
        for gone in [
            "set-cookie",
            "strict-transport-security",
            "clear-site-data",
            "connection",
            "content-length",
        ] {
            assert!(h.get(gone).is_none(), "{gone} passed on the API origin");
        }
        assert!(
            h.get("content-security-policy")
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("sandbox ")
        );
        let preview = respond(answer(&upstream), "dev_x", 4100, Origin::Preview).unwrap();
        let h = preview.headers();
        assert_eq!(h.get("set-cookie").unwrap(), "sid=1; Path=/");
        assert!(h.get("content-security-policy").is_none());
        assert!(h.get("connection").is_none());

        let mut failed = answer(&[]);
        failed.head.ok = false;
        failed.head.error =
            Some("upstream_timeout: 127.0.0.1:4100 did not answer within 20 s".into());
        let e = respond(failed, "dev_x", 4100, Origin::Api).unwrap_err();
        assert_eq!(
            (e.status, e.code.as_ref()),
            (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout")
        );
        let mut refused = answer(&[]);
        refused.head.ok = false;
        refused.head.error = Some("port_not_exposed".into());
        let e = respond(refused, "dev_x", 4100, Origin::Api).unwrap_err();
        assert_eq!(
            (e.status, e.code.as_ref()),
            (StatusCode::FORBIDDEN, "port_not_exposed")
        );
    }

    #[test]
    fn credentials_of_the_api_are_never_forwarded() {
        let p = parts(
            "/x",
            &[
                ("authorization", "Bearer cmt_secret"),
                ("cookie", "app=1"),
                ("host", "cp"),
                ("connection", "keep-alive"),
                ("accept-encoding", "gzip"),
                ("sec-websocket-key", "k"),
                ("accept", "text/html"),
            ],
        );
        let names = |origin| -> Vec<String> {
            forward_headers(&p, origin)
                .unwrap()
                .into_iter()
                .map(|h| h.name)
                .collect()
        };
        assert_eq!(names(Origin::Api), vec!["accept".to_owned()]);
        assert_eq!(
            names(Origin::Preview),
            vec!["cookie".to_owned(), "accept".to_owned()]
        );
        let big = "v".repeat(5000);
        let e = forward_headers(&parts("/x", &[("x-big", big.as_str())]), Origin::Api).unwrap_err();
        assert_eq!(e.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let many: Vec<(String, &str)> = (0..65).map(|i| (format!("x-h{i}"), "1")).collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        let e = forward_headers(&parts("/x", &many), Origin::Api).unwrap_err();
        assert_eq!(e.code, "too_many_headers");
    }
}
