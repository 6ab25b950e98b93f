//! HTTP plumbing shared by the routes: the body type, JSON responses, request bodies with a
//! size limit, path and query parsing.

use std::convert::Infallible;

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

/// Reads the whole request body, refusing more than `limit` bytes (413 `payload_too_large`).
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
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
