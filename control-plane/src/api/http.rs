//! HTTP plumbing shared by the routes: the body type, JSON responses, request bodies with a
//! size limit and a time limit, path and query parsing.
//!
//! # Body read timeout
//!
//! hyper bounds the time to receive request *headers* (`header_read_timeout`) but not the body:
//! a client that sends headers with `Content-Length: 1000000` and then trickles a byte a minute
//! (or nothing) would hold a handler, its task and its connection forever. [`read_body`] gives
//! the whole body a deadline and answers 408 `request_timeout`; the server closes such a
//! connection after the 408 (`connection: close`), since the rest of the body may still arrive
//! and cannot be told apart from the next request.
//!
//! The deadline is a property of the server, while handlers get hyper's bare
//! [`Incoming`] body and call `read_body(body, limit)`. Rather than thread it through every
//! handler, the listener runs each request inside [`with_body_timeout`], which makes the
//! configured value visible to any `read_body` polled within that request (a scoped
//! thread-local, set only while the request's future is being polled). Outside such a scope
//! (unit tests, other embedders) [`DEFAULT_BODY_TIMEOUT`] applies.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use futures_lite::FutureExt as _;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;

/// Every response body: a full buffer or a stream (SSE).
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Default limit of request bodies.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// `status` with a JSON body (`application/json; charset=utf-8`, explicit length).
pub fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(full(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// A JSON answer a handler produced; mutating routes return these so that the idempotency
/// layer can store and replay them verbatim.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonReply {
    pub status: StatusCode,
    pub body: Value,
}

impl JsonReply {
    pub fn ok(body: Value) -> Self {
        JsonReply {
            status: StatusCode::OK,
            body,
        }
    }

    pub fn created(body: Value) -> Self {
        JsonReply {
            status: StatusCode::CREATED,
            body,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        json_response(self.status, &self.body)
    }
}

/// Time a client has to send a whole request body when the server was not told otherwise
/// (`body_timeout_secs` in the config).
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);

thread_local! {
    /// The body timeout of the request whose future this thread is polling right now.
    static BODY_TIMEOUT: Cell<Option<Duration>> = const { Cell::new(None) };
}

/// Restores the previous [`BODY_TIMEOUT`] when one poll of a request ends (even by unwinding).
struct BodyTimeoutScope(Option<Duration>);

impl Drop for BodyTimeoutScope {
    fn drop(&mut self) {
        BODY_TIMEOUT.set(self.0);
    }
}

/// Runs one request's handling (`respond`) with `timeout` as the deadline of every
/// [`read_body`] in it, and marks a 408 response `connection: close` (the unread rest of the
/// body must not be parsed as the next request). See the module docs.
pub async fn with_body_timeout<F>(timeout: Duration, respond: F) -> Response<Body>
where
    F: Future<Output = Response<Body>>,
{
    let mut respond = std::pin::pin!(respond);
    let mut response = std::future::poll_fn(|cx| {
        let _scope = BodyTimeoutScope(BODY_TIMEOUT.replace(Some(timeout)));
        respond.as_mut().poll(cx)
    })
    .await;
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads the whole request body, refusing more than `limit` bytes (413 `payload_too_large`)
/// and a body that does not arrive completely within the request's body timeout (408
/// `request_timeout`; see the module docs).
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
    let timeout = BODY_TIMEOUT.get().unwrap_or(DEFAULT_BODY_TIMEOUT);
    let collected = async { Some(Limited::new(body, limit).collect().await) }
        .or(async {
            smol::Timer::after(timeout).await;
            None
        })
        .await;
    let Some(collected) = collected else {
        tracing::info!(
            timeout_ms = timeout.as_millis() as u64,
            "request body not received in time; answering 408 and closing the connection"
        );
        return Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!(
                "the request body did not arrive within {} s of the headers; send the whole \
                 body at once (check Content-Length) and retry",
                timeout.as_secs_f64()
            ),
        ));
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the request body exceeds {limit} bytes; send less"),
        )),
        Err(e) => Err(ApiError::bad_request(
            "body_read_failed",
            format!("could not read the request body ({e}); resend the request"),
        )),
    }
}

/// Parses a JSON object body into `T`. An empty body counts as `{}`. Invalid JSON or a
/// non-object → 400 `invalid_json_body`; a well-formed object of the wrong shape → 400
/// `invalid_request` with serde's explanation (e.g. "missing field `name`").
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = if bytes.iter().all(u8::is_ascii_whitespace) {
        Value::Object(Default::default())
    } else {
        serde_json::from_slice(bytes).map_err(|e| {
            ApiError::bad_request(
                "invalid_json_body",
                format!("the body is not valid JSON ({e}); send a JSON object"),
            )
        })?
    };
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "invalid_json_body",
            "the body must be a JSON object",
        ));
    }
    serde_json::from_value(value).map_err(|e| {
        ApiError::bad_request(
            "invalid_request",
            format!("{e}; see GET /openapi.json for the expected body"),
        )
    })
}

/// Splits a path into percent-decoded segments (`/devices/a%20b` → `["devices", "a b"]`).
/// A trailing slash is ignored. Malformed escapes or non-UTF-8 → 400 `invalid_path`.
pub fn path_segments(path: &str) -> Result<Vec<String>, ApiError> {
    path.trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_decode(s).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_path",
                    "the URL path has a malformed %-escape or is not UTF-8",
                )
            })
        })
        .collect()
}

/// Decodes `%XX` escapes (and nothing else: `+` stays `+`, as in paths).
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hi = (hex[0] as char).to_digit(16)?;
            let lo = (hex[1] as char).to_digit(16)?;
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Query parameters, percent-decoded (`+` means space, as in forms). Later duplicates win.
pub fn query_params(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((
                percent_decode(&k.replace('+', " "))?,
                percent_decode(&v.replace('+', " "))?,
            ))
        })
        .collect()
}

/// A non-negative integer query parameter, or 400 `invalid_query` naming it.
pub fn query_u64(params: &[(String, String)], name: &str) -> Result<Option<u64>, ApiError> {
    match params.iter().rev().find(|(k, _)| k == name) {
        None => Ok(None),
        Some((_, v)) => v.parse().map(Some).map_err(|_| {
            ApiError::bad_request(
                "invalid_query",
                format!("query parameter `{name}` must be a non-negative integer, got {v:?}"),
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_and_queries_decode() {
        assert_eq!(
            path_segments("/devices/a%20b/").ok(),
            Some(vec!["devices".into(), "a b".into()])
        );
        assert!(path_segments("/devices/%zz").is_err());
        let q = query_params(Some("after=5&limit=10&x=a+b%21"));
        assert_eq!(query_u64(&q, "after").ok(), Some(Some(5)));
        assert_eq!(query_u64(&q, "missing").ok(), Some(None));
        assert!(query_u64(&query_params(Some("after=-1")), "after").is_err());
        assert_eq!(q[2], ("x".into(), "a b!".into()));
    }

    #[test]
    fn json_bodies() {
        #[derive(serde::Deserialize, Debug)]
        struct B {
            #[allow(dead_code)]
            name: String,
        }
        let code = |body: &[u8]| parse_json::<B>(body).err().map(|e| e.code);
        assert_eq!(code(b"[1]").as_deref(), Some("invalid_json_body"));
        assert_eq!(code(b"{").as_deref(), Some("invalid_json_body"));
        assert_eq!(code(b"").as_deref(), Some("invalid_request"));
        assert!(parse_json::<B>(br#"{"name":"x"}"#).is_ok());
    }
}
