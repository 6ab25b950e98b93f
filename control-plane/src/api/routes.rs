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
    /// `POST /devices/:id/<op>`: a command dispatched to the device.
    DeviceCommand(String, DeviceOp),
    /// `GET /devices/:id/config/status/:requestId`.
    ConfigStatus(String, String),
    /// `GET /session/:sessionId/snapshot`.
    SessionSnapshot(String),
    /// `GET /sessions/:sessionId/stream`: a prompt's output (SSE).
    SessionStream(String),
    /// `POST /sessions/:sessionId/jit/renew`: move the session's JIT expiry (native daemons).
    SessionJitRenew(String),
    /// `ANY /devices/:id/port/:port/*path`: the port proxy (device id, port as given).
    PortProxy(String, String),
    TemplatesList,
    TemplatesPublish,
    /// `GET /config/template/schema`.
    TemplateSchema,
    /// `POST /config/templates/:templateId/compile`.
    TemplateCompile(String),
    McpList,
    McpSave,
    /// `POST /config/push`: a template to every device matching a label selector.
    FleetConfigPush,
    MethodNotAllowed {
        allow: &'static str,
    },
    NotFound,
}

/// Git commands (`POST /devices/:id/git/<op>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GitOp {
    Status,
    Init,
    Clone,
    Add,
    Commit,
    Push,
    Pull,
    Branch,
    Checkout,
    Config,
}

/// Device commands: the 0.1.x panel's paths under `/devices/:id/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceOp {
    Dir,
    Mkdir,
    Rmdir,
    Rename,
    SessionStart,
    SessionStatus,
    SessionTerminate,
    Prompt,
    JitKill,
    SetupStatus,
    SetupSave,
    ConfigPush,
    Git(GitOp),
}

impl DeviceOp {
    /// Every device command, for the OpenAPI document and tests.
    pub const ALL: [DeviceOp; 22] = [
        DeviceOp::Dir,
        DeviceOp::Mkdir,
        DeviceOp::Rmdir,
        DeviceOp::Rename,
        DeviceOp::SessionStart,
        DeviceOp::SessionStatus,
        DeviceOp::SessionTerminate,
        DeviceOp::Prompt,
        DeviceOp::JitKill,
        DeviceOp::SetupStatus,
        DeviceOp::SetupSave,
        DeviceOp::ConfigPush,
        DeviceOp::Git(GitOp::Status),
        DeviceOp::Git(GitOp::Init),
        DeviceOp::Git(GitOp::Clone),
        DeviceOp::Git(GitOp::Add),
        DeviceOp::Git(GitOp::Commit),
        DeviceOp::Git(GitOp::Push),
        DeviceOp::Git(GitOp::Pull),
        DeviceOp::Git(GitOp::Branch),
        DeviceOp::Git(GitOp::Checkout),
        DeviceOp::Git(GitOp::Config),
    ];

    /// The path after `/devices/:id/`.
    pub fn path(self) -> &'static str {
        match self {
            DeviceOp::Dir => "dir",
            DeviceOp::Mkdir => "mkdir",
            DeviceOp::Rmdir => "rmdir",
            DeviceOp::Rename => "rename",
            DeviceOp::SessionStart => "session/start",
            DeviceOp::SessionStatus => "session/status",
            DeviceOp::SessionTerminate => "session/terminate",
            DeviceOp::Prompt => "prompt",
            DeviceOp::JitKill => "jit/kill",
            DeviceOp::SetupStatus => "setup/status",
            DeviceOp::SetupSave => "setup/save",
            DeviceOp::ConfigPush => "config/push",
            DeviceOp::Git(GitOp::Status) => "git/status",
            DeviceOp::Git(GitOp::Init) => "git/init",
            DeviceOp::Git(GitOp::Clone) => "git/clone",
            DeviceOp::Git(GitOp::Add) => "git/add",
            DeviceOp::Git(GitOp::Commit) => "git/commit",
            DeviceOp::Git(GitOp::Push) => "git/push",
            DeviceOp::Git(GitOp::Pull) => "git/pull",
            DeviceOp::Git(GitOp::Branch) => "git/branch",
            DeviceOp::Git(GitOp::Checkout) => "git/checkout",
            DeviceOp::Git(GitOp::Config) => "git/config",
        }
    }

    fn parse(rest: &[&str]) -> Option<DeviceOp> {
        DeviceOp::ALL.into_iter().find(|op| {
            let mut parts = op.path().split('/');
            rest.iter().all(|r| parts.next() == Some(r)) && parts.next().is_none()
        })
    }
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
        ["devices", id, "config", "status", rid] => only(
            m,
            &Method::GET,
            Route::ConfigStatus((*id).to_owned(), (*rid).to_owned()),
            "GET",
        ),
        ["devices", id, "port", port, ..] => Route::PortProxy((*id).to_owned(), (*port).to_owned()),
        ["devices", id, rest @ ..] => match DeviceOp::parse(rest) {
            Some(op) => only(
                m,
                &Method::POST,
                Route::DeviceCommand((*id).to_owned(), op),
                "POST",
            ),
            None => Route::NotFound,
        },
        ["sessions", sid, "stream"] => only(
            m,
            &Method::GET,
            Route::SessionStream((*sid).to_owned()),
            "GET",
        ),
        ["sessions", sid, "jit", "renew"] => only(
            m,
            &Method::POST,
            Route::SessionJitRenew((*sid).to_owned()),
            "POST",
        ),
        ["session", sid, "snapshot"] => only(
            m,
            &Method::GET,
            Route::SessionSnapshot((*sid).to_owned()),
            "GET",
        ),
        ["config", "templates"] => match *m {
            Method::GET => Route::TemplatesList,
            Method::POST => Route::TemplatesPublish,
            _ => Route::MethodNotAllowed { allow: "GET, POST" },
        },
        ["config", "template", "schema"] => only(m, &Method::GET, Route::TemplateSchema, "GET"),
        ["config", "templates", tid, "compile"] => only(
            m,
            &Method::POST,
            Route::TemplateCompile((*tid).to_owned()),
            "POST",
        ),
        ["config", "push"] => only(m, &Method::POST, Route::FleetConfigPush, "POST"),
        ["config", "mcp"] => match *m {
            Method::GET => Route::McpList,
            Method::POST => Route::McpSave,
            _ => Route::MethodNotAllowed { allow: "GET, POST" },
        },
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
        assert_eq!(
            r(Method::POST, "/devices/dev_x/git/commit"),
            Route::DeviceCommand("dev_x".into(), DeviceOp::Git(GitOp::Commit))
        );
        assert_eq!(
            r(Method::GET, "/devices/dev_x/dir"),
            Route::MethodNotAllowed { allow: "POST" }
        );
        assert_eq!(r(Method::POST, "/devices/dev_x/git"), Route::NotFound);
        assert_eq!(
            r(Method::GET, "/devices/dev_x/config/status/42"),
            Route::ConfigStatus("dev_x".into(), "42".into())
        );
        assert_eq!(
            r(Method::GET, "/session/ses_1/snapshot"),
            Route::SessionSnapshot("ses_1".into())
        );
        assert_eq!(
            r(Method::GET, "/sessions/ses_1/stream"),
            Route::SessionStream("ses_1".into())
        );
        assert_eq!(
            r(Method::POST, "/sessions/ses_1/jit/renew"),
            Route::SessionJitRenew("ses_1".into())
        );
        assert_eq!(
            r(Method::GET, "/sessions/ses_1/jit/renew"),
            Route::MethodNotAllowed { allow: "POST" }
        );
        assert_eq!(
            r(Method::GET, "/config/template/schema"),
            Route::TemplateSchema
        );
        assert_eq!(
            r(Method::POST, "/config/templates/build-box/compile"),
            Route::TemplateCompile("build-box".into())
        );
        assert_eq!(r(Method::POST, "/config/push"), Route::FleetConfigPush);
        for m in [Method::GET, Method::POST, Method::DELETE, Method::OPTIONS] {
            assert_eq!(
                r(m, "/devices/dev_x/port/4100/global/health"),
                Route::PortProxy("dev_x".into(), "4100".into())
            );
        }
        assert_eq!(
            r(Method::GET, "/devices/dev_x/port/4100"),
            Route::PortProxy("dev_x".into(), "4100".into())
        );
        assert_eq!(
            r(Method::GET, "/config/push"),
            Route::MethodNotAllowed { allow: "POST" }
        );
        for op in DeviceOp::ALL {
            let path = format!("/devices/dev_x/{}", op.path());
            assert_eq!(
                r(Method::POST, &path),
                Route::DeviceCommand("dev_x".into(), op)
            );
        }
    }
}
