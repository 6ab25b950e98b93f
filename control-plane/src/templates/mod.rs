//! Agent templates: the schema, the compiler, signed config pushes, and fleet selection.
//!
//! An operator publishes a template (which models, rules, tools, permissions and MCP servers a
//! coding agent gets) once, and pushes it to many hosts. This module turns the stored template
//! document into the exact bytes a daemon receives:
//!
//! - [`schema`]: [`Template`] and [`McpServer`] — parse, validate (every problem, with its field
//!   path), normalise; MCP credentials redacted for non-admins; the template JSON Schema.
//! - [`compile`]: [`compile_runtime`] (the OpenCode config file) and [`compile_session_init`]
//!   (what a session starts with), both bit-exact with CodeMantle 0.1.50 and digested with
//!   `codemantle_protocol::canonical`; [`build_push`] makes the `cc` frame and signs it with
//!   the device key (`codemantle_protocol::config_signature`).
//! - [`selector`]: [`LabelSelector`] (`env=prod,role!=canary,gpu`) for fleet pushes.
//! - [`latest_version`]: "latest" is the highest **semver** ([`crate::semver`]), not 0.1.x's
//!   string sort in which `1.9.0` beat `1.10.0`.
//!
//! Everything here is pure: no store, no clock, no network. The HTTP routes load templates and
//! MCP entries from the store, call in here, and send the result through the tunnel.
//!
//! Typical route code:
//!
//! ```no_run
//! # use codemantle_control_plane::templates::*;
//! # fn f(template_body: &serde_json::Value, mcp_bodies: &[serde_json::Value],
//! #      secret: &codemantle_protocol::handshake::Secret) -> Result<(), Box<dyn std::error::Error>> {
//! let template = Template::parse(template_body)?;            // 400 with every problem
//! let registry = parse_registry(mcp_bodies);                  // skips (and names) broken entries
//! let compiled = compile_runtime(&template, &registry.servers, &CompileOptions::default())?;
//! let push = build_push(&compiled, secret, DEFAULT_APPLY_PATH, 42, 1_700_000_000_000)?;
//! # let _ = push; Ok(()) }
//! ```

pub mod compile;
pub mod schema;
pub mod selector;

pub use compile::{
    CompileError, CompileOptions, Compiled, DEFAULT_APPLY_PATH, MAX_CONFIG_BYTES, PushError,
    SessionInitRoot, build_push, check_apply_path, compile_runtime, compile_session_init,
    parse_gateways,
};
pub use schema::{
    FieldError, McpEndpoint, McpServer, Permission, Policy, Template, ValidationErrors,
    template_json_schema,
};
pub use selector::{LabelSelector, SelectorError, Term};

use crate::semver::Version;

/// The highest semver among `versions`; strings that are not semver are ignored (they cannot
/// be published, but may exist in old data). `None` if there is no semver at all.
pub fn latest_version<'a, I>(versions: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    versions
        .into_iter()
        .filter_map(|v| Version::parse(v).map(|parsed| (parsed, v)))
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, v)| v)
}

/// MCP registry bodies parsed for the compiler.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// The entries that are valid.
    pub servers: Vec<McpServer>,
    /// `(index, errors)` of bodies that are not: a reference to one of them compiles as missing;
    /// the caller should log or show these.
    pub invalid: Vec<(usize, ValidationErrors)>,
}

/// Parses stored MCP entry bodies. Broken entries (stored before validation existed, or by
/// hand) are set aside rather than failing every compile.
pub fn parse_registry<'a, I>(bodies: I) -> Registry
where
    I: IntoIterator<Item = &'a serde_json::Value>,
{
    let mut registry = Registry::default();
    for (i, body) in bodies.into_iter().enumerate() {
        match McpServer::parse(body) {
            Ok(server) => registry.servers.push(server),
            Err(e) => registry.invalid.push((i, e)),
        }
    }
    registry
}
