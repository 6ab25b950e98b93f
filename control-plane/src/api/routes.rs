//! The route table: method + path → [`Route`]. Pure, so it is easy to test and extend (device
//! command routes slot in under `/devices/:id/...`). Keep it in step with [`super::openapi`].

use hyper::{Method, StatusCode};

use super::error::ApiError;

/// A matched route with its path parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Tunnel,
    Health,
    OpenApi,
    Metrics,
    DevicesList,
    DevicesCreate,
    DeviceGet(String),
    DeviceRemove(String),
    TokensList,
    TokensCreate,
    TokenRevoke(String),
    EventsList,
    EventsStream,
    MethodNotAllowed { allow: &'static str },
    NotFound,
}

/// Matches a request. `segments` are the percent-decoded path segments.
pub fn route(method: &Method, segments: &[String]) -> Route {
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let m = method;
    match segs.as_slice() {
        ["ws"] => Route::Tunnel,
        ["health"] => only(m, &Method::GET, Route::Health, "GET"),
        ["openapi.json"] => only(m, &Method::GET, Route::OpenApi, "GET"),
        ["metrics"] => only(m, &Method::GET, Route::Metrics, "GET"),
        ["devices"] => match *m {
            Method::GET => Route::DevicesList,
            Method::POST => Route::DevicesCreate,
            _ => Route::MethodNotAllowed { allow: "GET, POST" },
        },
        ["devices", id] => match *m {
            Method::GET => Route::DeviceGet((*id).to_owned()),
            Method::DELETE => Route::DeviceRemove((*id).to_owned()),
            _ => Route::MethodNotAllowed {
                allow: "GET, DELETE",
            },
        },
        ["tokens"] => match *m {
            Method::GET => Route::TokensList,
            Method::POST => Route::TokensCreate,
            _ => Route::MethodNotAllowed { allow: "GET, POST" },
        },
        ["tokens", id, "revoke"] => only(
            m,
            &Method::POST,
            Route::TokenRevoke((*id).to_owned()),
            "POST",
        ),
        ["events"] => only(m, &Method::GET, Route::EventsList, "GET"),
        ["events", "stream"] => only(m, &Method::GET, Route::EventsStream, "GET"),
        _ => Route::NotFound,
    }
}

fn only(method: &Method, expected: &Method, route: Route, allow: &'static str) -> Route {
    if method == expected {
        route
    } else {
        Route::MethodNotAllowed { allow }
    }
}

pub fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; GET /openapi.json lists every route",
    )
}

pub fn method_not_allowed(allow: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this route accepts {allow}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(method: Method, path: &str) -> Route {
        let segs: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        route(&method, &segs)
    }

    #[test]
    fn matches_routes_and_methods() {
        assert_eq!(r(Method::GET, "/devices"), Route::DevicesList);
        assert_eq!(
            r(Method::DELETE, "/devices/dev_x"),
            Route::DeviceRemove("dev_x".into())
        );
        assert_eq!(
            r(Method::POST, "/tokens/abc/revoke"),
            Route::TokenRevoke("abc".into())
        );
        assert_eq!(r(Method::GET, "/ws"), Route::Tunnel);
        assert_eq!(
            r(Method::PUT, "/devices"),
            Route::MethodNotAllowed { allow: "GET, POST" }
        );
        assert_eq!(r(Method::GET, "/nope"), Route::NotFound);
        assert_eq!(r(Method::GET, "/events/stream"), Route::EventsStream);
    }
}
