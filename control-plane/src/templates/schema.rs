//! The agent template document (schema `1.0.0`) and MCP registry entries: parsing, validation
//! and normalisation.
//!
//! The field rules are 0.1.50's (control-plane reference §6.1, §6.2) so a template written for
//! 0.1.50 is accepted here and compiles to the same bytes. What differs, on purpose:
//!
//! - **Every problem is reported**, each with its field path (`routing.intents[2].rules[0]`)
//!   and 0.1.50's error code, instead of only the first. Fixing a template should take one
//!   round trip, not one per mistake.
//! - `templateVersion` must also be a semantic version (see [`crate::semver`]), because our
//!   "latest" is semver precedence and published versions are immutable.
//! - `policy` may carry allowlists for `restricted` mode (`allowedKeys`: top-level OpenCode
//!   config keys; `allowedTools`: tools that may be enabled). They only narrow what the daemon
//!   allows; a daemon never lets a payload widen its own floor.
//! - MCP entries may be `local` (a command the host runs) as well as `remote`. A daemon in
//!   `read-only` or `restricted` mode refuses local servers.
//! - MCP header values (and a local server's environment values) are credentials: they never
//!   appear in `Debug`, and [`McpServer::redacted_for`] hides them from non-admins.
//!
//! Lengths are counted the way 0.1.50's JavaScript did (`string.length`, UTF-16 code units);
//! for ASCII that is the number of characters.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use codemantle_protocol::canonical::collate;
use codemantle_protocol::message::PolicyMode;
use serde_json::{Map, Value, json};

use crate::store::Role;

/// The only template schema version.
pub const SCHEMA_VERSION: &str = "1.0.0";
/// The `$id` of the template JSON Schema ([`template_json_schema`]).
pub const SCHEMA_ID: &str = "https://codemantle.dev/schema/agent-template.v1.json";

/// What replaces a credential for a viewer or operator.
pub const REDACTED: &str = "<redacted>";

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// One broken rule: where, which rule (a stable code), and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the offending value, e.g. `routing.intents[0].id`; empty for the document.
    pub path: String,
    /// Stable error code (0.1.50's where one existed), e.g. `invalid_intent_id`.
    pub code: &'static str,
    /// What is expected, for the operator.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{} ({})", self.message, self.code)
        } else {
            write!(f, "{}: {} ({})", self.path, self.message, self.code)
        }
    }
}

/// Every problem found in one document, in document order. Never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors {
    pub errors: Vec<FieldError>,
}

impl ValidationErrors {
    /// The distinct codes, in first-seen order (0.1.x answered with one code; the API joins
    /// these with commas for its `error` field).
    pub fn codes(&self) -> Vec<&'static str> {
        let mut seen = BTreeSet::new();
        self.errors
            .iter()
            .filter(|e| seen.insert(e.code))
            .map(|e| e.code)
            .collect()
    }

    /// `[{path, code, message}]`, for an API error body.
    pub fn to_json(&self) -> Value {
        Value::Array(
            self.errors
                .iter()
                .map(|e| json!({ "path": e.path, "code": e.code, "message": e.message }))
                .collect(),
        )
    }
}

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(f, "{n} problem{}: ", if n == 1 { "" } else { "s" })?;
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects errors while a document is walked.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, code: &'static str, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            code,
            message: message.into(),
        });
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The collected errors; `fallback` if none were recorded (a parser that returned nothing
    /// without saying why is a bug, and must not turn into "valid").
    fn finish(mut self, fallback: (&'static str, &str)) -> ValidationErrors {
        if self.0.is_empty() {
            self.add("", fallback.0, fallback.1);
        }
        ValidationErrors { errors: self.0 }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn index(path: &str, i: usize) -> String {
    format!("{path}[{i}]")
}

// ---------------------------------------------------------------------------------------------
// Lexical rules
// ---------------------------------------------------------------------------------------------

/// `string.length` in JavaScript: UTF-16 code units.
fn js_len(s: &str) -> usize {
    s.encode_utf16().count()
}

fn text_ok(s: &str, min: usize, max: usize) -> bool {
    (min..=max).contains(&js_len(s))
}

/// `^[a-z0-9][a-z0-9_-]{min-1,max-1}$`.
fn slug_ok(s: &str, min: usize, max: usize) -> bool {
    let b = s.as_bytes();
    (min..=max).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_' || *c == b'-')
}

/// Template id: `^[a-z0-9][a-z0-9_-]{2,63}$`.
pub fn is_template_id(s: &str) -> bool {
    slug_ok(s, 3, 64)
}

/// Intent, profile, MCP server, alias and gateway ids: `^[a-z0-9][a-z0-9_-]{1,63}$`.
pub fn is_ref_id(s: &str) -> bool {
    slug_ok(s, 2, 64)
}

/// Template and MCP versions on the wire: `^[A-Za-z0-9._-]{1,32}$`.
pub fn is_wire_version(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// `^[A-Za-z0-9_*:-]{1,max}$`: tool names (max 80) and permission keys (max 120).
fn tool_name_ok(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'*' | b':' | b'-'))
}

/// HTTP header names: `^[A-Za-z0-9-]{1,64}$`.
fn header_name_ok(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
}

/// Environment variable names: `^[A-Za-z_][A-Za-z0-9_]{0,127}$`.
fn env_name_ok(s: &str) -> bool {
    let b = s.as_bytes();
    (1..=128).contains(&b.len())
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// An `http(s)://host…` URL of 8..2048 characters without whitespace or control characters.
fn http_url_ok(s: &str) -> bool {
    if !text_ok(s, 8, 2048) || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"));
    match rest {
        Some(rest) => {
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            let host = authority.rsplit('@').next().unwrap_or_default();
            !host.is_empty() && !host.starts_with(':')
        }
        None => false,
    }
}

/// 0.1.50's `serverPath` normalisation: trim; `\` → `/`; leading `/` removed; 1..256 chars;
/// no NUL; must not start with `.`, contain `..` or `://`; only `[A-Za-z0-9/_-]`.
fn normalise_server_path(raw: &str) -> Option<String> {
    let p = raw.trim().replace('\\', "/");
    let p = p.trim_start_matches('/');
    let ok = text_ok(p, 1, 256)
        && !p.starts_with('.')
        && !p.contains("..")
        && !p.contains("://")
        && p.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'/' | b'_' | b'-'));
    ok.then(|| p.to_owned())
}

/// JavaScript `localeCompare` order for sorting (ties broken by code point).
fn locale_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    collate(a, b)
}

fn unknown_keys(
    obj: &Map<String, Value>,
    allowed: &[&str],
    path: &str,
    code: &'static str,
    errs: &mut Errors,
) {
    for key in obj.keys() {
        if !allowed.contains(&key.as_str()) {
            errs.add(
                join(path, key),
                code,
                format!("unknown field; allowed here: {}", allowed.join(", ")),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Template
// ---------------------------------------------------------------------------------------------

/// A tool permission (`tools.permissions` values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    Allow,
    Ask,
    Deny,
}

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Allow => "allow",
            Permission::Ask => "ask",
            Permission::Deny => "deny",
        }
    }

    pub fn parse(s: &str) -> Option<Permission> {
        match s {
            "allow" => Some(Permission::Allow),
            "ask" => Some(Permission::Ask),
            "deny" => Some(Permission::Deny),
            _ => None,
        }
    }
}

/// An MCP reference's status (`disabled` when absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum McpStatus {
    Disabled,
    Ask,
    Allow,
}

impl McpStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            McpStatus::Disabled => "disabled",
            McpStatus::Ask => "ask",
            McpStatus::Allow => "allow",
        }
    }

    pub fn parse(s: &str) -> Option<McpStatus> {
        match s {
            "disabled" => Some(McpStatus::Disabled),
            "ask" => Some(McpStatus::Ask),
            "allow" => Some(McpStatus::Allow),
            _ => None,
        }
    }
}

/// `routing.intents[]`: a rule set picked when a prompt matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub id: String,
    /// `match`.
    pub match_text: String,
    pub model: Option<String>,
    /// −1000..=1000; absent sorts as 0 but stays absent in the output.
    pub priority: Option<i64>,
    /// Sorted (localeCompare).
    pub rules: Vec<String>,
}

impl Intent {
    fn to_value(&self) -> Value {
        let mut o = Map::new();
        o.insert("id".into(), self.id.clone().into());
        o.insert("match".into(), self.match_text.clone().into());
        if let Some(m) = &self.model {
            o.insert("model".into(), m.clone().into());
        }
        if let Some(p) = self.priority {
            o.insert("priority".into(), p.into());
        }
        o.insert("rules".into(), self.rules.clone().into());
        Value::Object(o)
    }
}

/// `routing.profiles[]`: a named model chain with its rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub id: String,
    pub match_text: Option<String>,
    pub priority_chain: Vec<String>,
    /// Sorted (localeCompare).
    pub rules: Vec<String>,
}

impl Profile {
    fn to_value(&self) -> Value {
        let mut o = Map::new();
        o.insert("id".into(), self.id.clone().into());
        if let Some(m) = &self.match_text {
            o.insert("match".into(), m.clone().into());
        }
        o.insert("priorityChain".into(), self.priority_chain.clone().into());
        o.insert("rules".into(), self.rules.clone().into());
        Value::Object(o)
    }
}

/// `routing`, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    pub default_model: String,
    /// As given (kept for the normalised template; the compiled config uses the chain).
    pub fallback_order: Option<Vec<String>>,
    /// `[defaultModel, …priorityChain or else fallbackOrder]`, de-duplicated, order kept.
    pub chain: Vec<String>,
    /// Sorted by priority (descending, absent = 0), then id.
    pub intents: Vec<Intent>,
    /// Sorted by id.
    pub profiles: Vec<Profile>,
}

impl Routing {
    pub fn intents_value(&self) -> Value {
        Value::Array(self.intents.iter().map(Intent::to_value).collect())
    }

    pub fn profiles_value(&self) -> Value {
        Value::Array(self.profiles.iter().map(Profile::to_value).collect())
    }
}

/// `policy`: the mode a daemon enforces, and optional allowlists for `restricted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: PolicyMode,
    /// Top-level OpenCode config keys the compiled config may set (`$schema` and `codemantle`
    /// are always allowed). Restricted mode only; sorted, unique.
    pub allowed_keys: Option<Vec<String>>,
    /// Tools that may be enabled. Restricted mode only; sorted, unique.
    pub allowed_tools: Option<Vec<String>>,
}

impl Policy {
    /// `{mode, allowedKeys?, allowedTools?}` as it appears in the template and the compiled
    /// `codemantle.policy`.
    pub fn to_value(&self) -> Value {
        let mut o = Map::new();
        o.insert("mode".into(), self.mode.as_str().into());
        if let Some(k) = &self.allowed_keys {
            o.insert("allowedKeys".into(), k.clone().into());
        }
        if let Some(t) = &self.allowed_tools {
            o.insert("allowedTools".into(), t.clone().into());
        }
        Value::Object(o)
    }
}

/// `tools`: which tools are on, and their permissions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tools {
    pub enabled: BTreeMap<String, bool>,
    pub permissions: BTreeMap<String, Permission>,
}

impl Tools {
    /// Whether `tool` is explicitly off, the way a daemon judges it: `enabled.<tool> = false`
    /// (or `enabled["*"] = false` without `enabled.<tool> = true`), or its permission is `deny`
    /// (`write`, `patch` and `multiedit` fall under the `edit` permission).
    pub fn disables(&self, tool: &str) -> bool {
        match self.enabled.get(tool) {
            Some(false) => return true,
            Some(true) => {}
            None => {
                if self.enabled.get("*") == Some(&false) {
                    return true;
                }
            }
        }
        let permission_key = match tool {
            "write" | "patch" | "multiedit" => "edit",
            t => t,
        };
        self.permissions.get(permission_key) == Some(&Permission::Deny)
    }

    pub fn enabled_value(&self) -> Value {
        Value::Object(
            self.enabled
                .iter()
                .map(|(k, v)| (k.clone(), Value::Bool(*v)))
                .collect(),
        )
    }

    pub fn permissions_value(&self) -> Value {
        Value::Object(
            self.permissions
                .iter()
                .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                .collect(),
        )
    }
}

/// `mcpRefs[]`: a registry entry (`serverId@version`) mounted under `alias`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpRef {
    pub server_id: String,
    pub version: String,
    pub alias: String,
    pub status: McpStatus,
}

impl McpRef {
    /// `serverId@version`, the registry key.
    pub fn key(&self) -> String {
        format!("{}@{}", self.server_id, self.version)
    }

    pub fn to_value(&self) -> Value {
        json!({
            "alias": self.alias,
            "serverId": self.server_id,
            "status": self.status.as_str(),
            "version": self.version,
        })
    }
}

/// A validated, normalised agent template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub template_id: String,
    pub template_version: String,
    pub name: Option<String>,
    pub description: Option<String>,
    pub routing: Routing,
    pub policy: Policy,
    pub tools: Tools,
    /// Sorted by alias.
    pub mcp_refs: Vec<McpRef>,
}

const TEMPLATE_KEYS: &[&str] = &[
    "schemaVersion",
    "templateId",
    "templateVersion",
    "name",
    "description",
    "routing",
    "policy",
    "tools",
    "mcpRefs",
];
const ROUTING_KEYS: &[&str] = &[
    "defaultModel",
    "fallbackOrder",
    "priorityChain",
    "intents",
    "profiles",
];
const INTENT_KEYS: &[&str] = &["id", "match", "model", "priority", "rules"];
const PROFILE_KEYS: &[&str] = &["id", "match", "priorityChain", "rules"];
const POLICY_KEYS: &[&str] = &["mode", "allowedKeys", "allowedTools"];
const TOOLS_KEYS: &[&str] = &["enabled", "permissions"];
const MCP_REF_KEYS: &[&str] = &["serverId", "version", "alias", "status"];

/// Tools that write files or execute programs; `read-only` templates must switch them off.
/// Kept in step with the daemon's `config_apply::WRITE_EXEC_TOOLS`, which enforces the same.
pub const WRITE_EXEC_TOOLS: &[&str] = &["bash", "edit", "write", "patch", "multiedit"];

/// Top-level keys every compiled runtime config carries besides `$schema` and `codemantle`.
pub const COMPILED_CONFIG_KEYS: &[&str] = &["model", "permission", "tools"];

impl Template {
    /// Validates and normalises a template document, reporting every problem.
    pub fn parse(doc: &Value) -> Result<Template, ValidationErrors> {
        let mut errs = Errors::default();
        let Some(obj) = doc.as_object() else {
            errs.add(
                "",
                "template_must_be_object",
                "the template must be a JSON object",
            );
            return Err(errs.finish(("template_must_be_object", "")));
        };
        unknown_keys(
            obj,
            TEMPLATE_KEYS,
            "",
            "template_has_unknown_keys",
            &mut errs,
        );

        if obj.get("schemaVersion").and_then(Value::as_str) != Some(SCHEMA_VERSION) {
            errs.add(
                "schemaVersion",
                "unsupported_schema_version",
                format!("must be \"{SCHEMA_VERSION}\""),
            );
        }
        let template_id = match obj.get("templateId").and_then(Value::as_str) {
            Some(s) if is_template_id(s) => Some(s.to_owned()),
            _ => {
                errs.add(
                    "templateId",
                    "invalid_template_id",
                    "3..64 characters of a-z 0-9 _ -, starting with a letter or digit",
                );
                None
            }
        };
        let template_version = match obj.get("templateVersion").and_then(Value::as_str) {
            Some(s) if is_wire_version(s) && crate::semver::Version::parse(s).is_some() => {
                Some(s.to_owned())
            }
            _ => {
                errs.add(
                    "templateVersion",
                    "invalid_template_version",
                    "a semantic version such as 1.2.0 (at most 32 characters of A-Z a-z 0-9 . _ -, \
                     no +build part)",
                );
                None
            }
        };
        let name = optional_text(obj, "name", "", 120, "invalid_template_name", &mut errs);
        let description = optional_text(
            obj,
            "description",
            "",
            400,
            "invalid_template_description",
            &mut errs,
        );
        let routing = parse_routing(obj.get("routing"), &mut errs);
        let policy = parse_policy(obj.get("policy"), &mut errs);
        let tools = parse_tools(obj.get("tools"), &mut errs);
        let mcp_refs = parse_mcp_refs(obj.get("mcpRefs"), &mut errs);

        if let (Some(policy), Some(tools)) = (&policy, &tools) {
            check_policy_against_tools(policy, tools, mcp_refs.as_deref(), &mut errs);
        }

        match (
            template_id,
            template_version,
            routing,
            policy,
            tools,
            mcp_refs,
        ) {
            (
                Some(template_id),
                Some(template_version),
                Some(routing),
                Some(policy),
                Some(tools),
                Some(mcp_refs),
            ) if errs.is_empty() => Ok(Template {
                template_id,
                template_version,
                name,
                description,
                routing,
                policy,
                tools,
                mcp_refs,
            }),
            _ => Err(errs.finish((
                "invalid_template",
                "the template is invalid (no detail recorded)",
            ))),
        }
    }

    /// `templateId@templateVersion`.
    pub fn key(&self) -> String {
        format!("{}@{}", self.template_id, self.template_version)
    }

    /// The normalised template document (what `GET /config/templates` shows): sorted rules,
    /// intents, profiles and refs; the derived priority chain; defaults filled in.
    pub fn to_value(&self) -> Value {
        let mut routing = Map::new();
        routing.insert(
            "defaultModel".into(),
            self.routing.default_model.clone().into(),
        );
        if let Some(f) = &self.routing.fallback_order {
            routing.insert("fallbackOrder".into(), f.clone().into());
        }
        routing.insert("priorityChain".into(), self.routing.chain.clone().into());
        routing.insert("intents".into(), self.routing.intents_value());
        routing.insert("profiles".into(), self.routing.profiles_value());

        let mut o = Map::new();
        o.insert("schemaVersion".into(), SCHEMA_VERSION.into());
        o.insert("templateId".into(), self.template_id.clone().into());
        o.insert(
            "templateVersion".into(),
            self.template_version.clone().into(),
        );
        if let Some(n) = &self.name {
            o.insert("name".into(), n.clone().into());
        }
        if let Some(d) = &self.description {
            o.insert("description".into(), d.clone().into());
        }
        o.insert("routing".into(), Value::Object(routing));
        o.insert("policy".into(), self.policy.to_value());
        o.insert(
            "tools".into(),
            json!({
                "enabled": self.tools.enabled_value(),
                "permissions": self.tools.permissions_value(),
            }),
        );
        o.insert(
            "mcpRefs".into(),
            Value::Array(self.mcp_refs.iter().map(McpRef::to_value).collect()),
        );
        Value::Object(o)
    }
}

fn optional_text(
    obj: &Map<String, Value>,
    key: &str,
    path: &str,
    max: usize,
    code: &'static str,
    errs: &mut Errors,
) -> Option<String> {
    match obj.get(key) {
        None => None,
        Some(Value::String(s)) if text_ok(s, 1, max) => Some(s.clone()),
        Some(_) => {
            errs.add(
                join(path, key),
                code,
                format!("a string of 1..{max} characters (leave it out rather than empty)"),
            );
            None
        }
    }
}

/// A required string of `min..=max` characters.
fn required_text(
    value: Option<&Value>,
    path: String,
    min: usize,
    max: usize,
    code: &'static str,
    errs: &mut Errors,
) -> Option<String> {
    match value {
        Some(Value::String(s)) if text_ok(s, min, max) => Some(s.clone()),
        _ => {
            errs.add(path, code, format!("a string of {min}..{max} characters"));
            None
        }
    }
}

/// An array of `min..=max` strings of 1..=`item_max` characters each.
#[allow(clippy::too_many_arguments)]
fn string_list(
    value: &Value,
    path: &str,
    min: usize,
    max: usize,
    item_max: usize,
    code: &'static str,
    item_code: &'static str,
    errs: &mut Errors,
) -> Option<Vec<String>> {
    let Some(items) = value.as_array().filter(|a| (min..=max).contains(&a.len())) else {
        errs.add(
            path,
            code,
            format!("an array of {min}..{max} strings of 1..{item_max} characters"),
        );
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        match item.as_str() {
            Some(s) if text_ok(s, 1, item_max) => out.push(s.to_owned()),
            _ => {
                ok = false;
                errs.add(
                    index(path, i),
                    item_code,
                    format!("a string of 1..{item_max} characters"),
                );
            }
        }
    }
    ok.then_some(out)
}

fn sorted_rules(mut rules: Vec<String>) -> Vec<String> {
    rules.sort_by(|a, b| locale_cmp(a, b));
    rules
}

fn parse_routing(value: Option<&Value>, errs: &mut Errors) -> Option<Routing> {
    let Some(obj) = value.and_then(Value::as_object) else {
        errs.add(
            "routing",
            "invalid_routing",
            "an object with defaultModel and intents",
        );
        return None;
    };
    let path = "routing";
    unknown_keys(obj, ROUTING_KEYS, path, "routing_has_unknown_keys", errs);
    let default_model = required_text(
        obj.get("defaultModel"),
        join(path, "defaultModel"),
        1,
        120,
        "invalid_default_model",
        errs,
    );
    let fallback_order = obj.get("fallbackOrder").and_then(|v| {
        string_list(
            v,
            &join(path, "fallbackOrder"),
            0,
            8,
            120,
            "invalid_fallback_order",
            "invalid_fallback_order_model",
            errs,
        )
    });
    let priority_chain = obj.get("priorityChain").and_then(|v| {
        string_list(
            v,
            &join(path, "priorityChain"),
            1,
            12,
            120,
            "invalid_priority_chain",
            "invalid_priority_chain_model",
            errs,
        )
    });
    let intents = parse_intents(obj.get("intents"), errs);
    let profiles = match obj.get("profiles") {
        None => Some(Vec::new()),
        Some(v) => parse_profiles(v, errs),
    };

    let default_model = default_model?;
    let mut chain = vec![default_model.clone()];
    for model in priority_chain
        .as_ref()
        .or(fallback_order.as_ref())
        .into_iter()
        .flatten()
    {
        if !chain.contains(model) {
            chain.push(model.clone());
        }
    }
    Some(Routing {
        default_model,
        fallback_order,
        chain,
        intents: intents?,
        profiles: profiles?,
    })
}

fn parse_intents(value: Option<&Value>, errs: &mut Errors) -> Option<Vec<Intent>> {
    let path = "routing.intents";
    let Some(items) = value.and_then(Value::as_array).filter(|a| a.len() <= 64) else {
        errs.add(
            path,
            "invalid_intents",
            "an array of at most 64 intents (may be empty)",
        );
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    let mut ids = BTreeSet::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let Some(obj) = item.as_object() else {
            errs.add(
                &p,
                "invalid_intent_entry",
                "an object {id, match, model?, priority?, rules}",
            );
            ok = false;
            continue;
        };
        let before = errs.0.len();
        unknown_keys(obj, INTENT_KEYS, &p, "invalid_intent_entry", errs);
        let id = match obj.get("id").and_then(Value::as_str) {
            Some(s) if is_ref_id(s) => {
                if !ids.insert(s.to_owned()) {
                    errs.add(
                        join(&p, "id"),
                        "duplicate_intent_id",
                        format!("intent id {s:?} is used more than once"),
                    );
                }
                Some(s.to_owned())
            }
            _ => {
                errs.add(
                    join(&p, "id"),
                    "invalid_intent_id",
                    "2..64 characters of a-z 0-9 _ -, starting with a letter or digit",
                );
                None
            }
        };
        let match_text = required_text(
            obj.get("match"),
            join(&p, "match"),
            1,
            200,
            "invalid_intent_match",
            errs,
        );
        let model = optional_text(obj, "model", &p, 120, "invalid_intent_model", errs);
        let priority = match obj.get("priority") {
            None => None,
            Some(v) => match js_integer(v) {
                Some(n) if (-1000..=1000).contains(&n) => Some(n),
                _ => {
                    errs.add(
                        join(&p, "priority"),
                        "invalid_intent_priority",
                        "an integer from -1000 to 1000",
                    );
                    None
                }
            },
        };
        let rules = match obj.get("rules") {
            Some(v) => string_list(
                v,
                &join(&p, "rules"),
                1,
                32,
                400,
                "invalid_intent_rules",
                "invalid_intent_rule",
                errs,
            ),
            None => {
                errs.add(
                    join(&p, "rules"),
                    "invalid_intent_rules",
                    "an array of 1..32 strings of 1..400 characters",
                );
                None
            }
        };
        match (id, match_text, rules) {
            (Some(id), Some(match_text), Some(rules)) if errs.0.len() == before => {
                out.push(Intent {
                    id,
                    match_text,
                    model,
                    priority,
                    rules: sorted_rules(rules),
                })
            }
            _ => ok = false,
        }
    }
    out.sort_by(|a, b| {
        b.priority
            .unwrap_or(0)
            .cmp(&a.priority.unwrap_or(0))
            .then_with(|| locale_cmp(&a.id, &b.id))
    });
    ok.then_some(out)
}

/// An integer as JavaScript sees one: `5` and `5.0` both are.
fn js_integer(v: &Value) -> Option<i64> {
    if let Some(n) = v.as_i64() {
        return Some(n);
    }
    let f = v.as_f64()?;
    (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
}

fn parse_profiles(value: &Value, errs: &mut Errors) -> Option<Vec<Profile>> {
    let path = "routing.profiles";
    let Some(items) = value.as_array().filter(|a| a.len() <= 32) else {
        errs.add(
            path,
            "invalid_routing_profiles",
            "an array of at most 32 profiles",
        );
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    let mut ids = BTreeSet::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let Some(obj) = item.as_object() else {
            errs.add(
                &p,
                "invalid_routing_profile_entry",
                "an object {id, match?, priorityChain, rules}",
            );
            ok = false;
            continue;
        };
        let before = errs.0.len();
        unknown_keys(obj, PROFILE_KEYS, &p, "invalid_routing_profile_entry", errs);
        let id = match obj.get("id").and_then(Value::as_str) {
            Some(s) if is_ref_id(s) => {
                if !ids.insert(s.to_owned()) {
                    errs.add(
                        join(&p, "id"),
                        "duplicate_routing_profile_id",
                        format!("profile id {s:?} is used more than once"),
                    );
                }
                Some(s.to_owned())
            }
            _ => {
                errs.add(
                    join(&p, "id"),
                    "invalid_routing_profile_id",
                    "2..64 characters of a-z 0-9 _ -, starting with a letter or digit",
                );
                None
            }
        };
        let match_text =
            optional_text(obj, "match", &p, 200, "invalid_routing_profile_match", errs);
        let chain = match obj.get("priorityChain") {
            Some(v) => string_list(
                v,
                &join(&p, "priorityChain"),
                1,
                12,
                120,
                "invalid_routing_profile_priority_chain",
                "invalid_routing_profile_priority_model",
                errs,
            ),
            None => {
                errs.add(
                    join(&p, "priorityChain"),
                    "invalid_routing_profile_priority_chain",
                    "an array of 1..12 model names",
                );
                None
            }
        };
        let rules = match obj.get("rules") {
            Some(v) => string_list(
                v,
                &join(&p, "rules"),
                1,
                32,
                400,
                "invalid_routing_profile_rules",
                "invalid_routing_profile_rule",
                errs,
            ),
            None => {
                errs.add(
                    join(&p, "rules"),
                    "invalid_routing_profile_rules",
                    "an array of 1..32 strings of 1..400 characters",
                );
                None
            }
        };
        match (id, chain, rules) {
            (Some(id), Some(priority_chain), Some(rules)) if errs.0.len() == before => {
                out.push(Profile {
                    id,
                    match_text,
                    priority_chain,
                    rules: sorted_rules(rules),
                })
            }
            _ => ok = false,
        }
    }
    out.sort_by(|a, b| locale_cmp(&a.id, &b.id));
    ok.then_some(out)
}

fn parse_policy(value: Option<&Value>, errs: &mut Errors) -> Option<Policy> {
    let Some(value) = value else {
        return Some(Policy {
            mode: PolicyMode::Off,
            allowed_keys: None,
            allowed_tools: None,
        });
    };
    let Some(obj) = value.as_object() else {
        errs.add(
            "policy",
            "invalid_policy",
            "an object {mode, allowedKeys?, allowedTools?}",
        );
        return None;
    };
    unknown_keys(obj, POLICY_KEYS, "policy", "invalid_policy", errs);
    let mode = match obj
        .get("mode")
        .and_then(Value::as_str)
        .and_then(PolicyMode::parse)
    {
        Some(m) => Some(m),
        None => {
            errs.add(
                "policy.mode",
                "invalid_policy_mode",
                "one of off, read-only, restricted",
            );
            None
        }
    };
    let mut allowlist = |key: &str, item_ok: fn(&str) -> bool, what: &str| {
        let v = obj.get(key)?;
        let path = join("policy", key);
        let Some(items) = v.as_array().filter(|a| a.len() <= 256) else {
            errs.add(
                &path,
                "invalid_policy_allowlist",
                format!("an array of at most 256 {what}"),
            );
            return None;
        };
        let mut out = BTreeSet::new();
        for (i, item) in items.iter().enumerate() {
            match item.as_str() {
                Some(s) if item_ok(s) => {
                    out.insert(s.to_owned());
                }
                _ => errs.add(
                    index(&path, i),
                    "invalid_policy_allowlist_entry",
                    format!("one of the {what}"),
                ),
            }
        }
        let mut out: Vec<String> = out.into_iter().collect();
        out.sort_by(|a, b| locale_cmp(a, b));
        Some(out)
    };
    let allowed_keys = allowlist(
        "allowedKeys",
        |s| text_ok(s, 1, 64) && !s.chars().any(char::is_control),
        "top-level config key names (1..64 characters)",
    );
    let allowed_tools = allowlist(
        "allowedTools",
        |s| tool_name_ok(s, 80),
        "tool names (1..80 characters of A-Z a-z 0-9 _ * : -)",
    );
    let mode = mode?;
    if mode != PolicyMode::Restricted && (allowed_keys.is_some() || allowed_tools.is_some()) {
        errs.add(
            "policy",
            "policy_allowlist_requires_restricted",
            "allowedKeys and allowedTools only apply to mode \"restricted\"; remove them or \
             change the mode",
        );
    }
    Some(Policy {
        mode,
        allowed_keys,
        allowed_tools,
    })
}

/// In `restricted` mode with allowlists, the template itself must fit them: a daemon would
/// refuse the compiled config anyway, and the publisher should hear it now.
fn check_policy_against_tools(
    policy: &Policy,
    tools: &Tools,
    mcp_refs: Option<&[McpRef]>,
    errs: &mut Errors,
) {
    if let Some(allowed) = &policy.allowed_tools {
        for (name, on) in &tools.enabled {
            if *on && !allowed.contains(name) {
                errs.add(
                    format!("tools.enabled.{name}"),
                    "policy_tool_not_allowlisted",
                    format!(
                        "tool {name:?} is enabled but not in policy.allowedTools; add it there or \
                         disable it"
                    ),
                );
            }
        }
    }
    // Write/exec tools a daemon requires to be explicitly off: all of them in read-only, the
    // ones outside `allowedTools` in restricted (when the template lists its allowlist).
    let must_be_off: Vec<&str> = match (policy.mode, &policy.allowed_tools) {
        (PolicyMode::ReadOnly, _) => WRITE_EXEC_TOOLS.to_vec(),
        (PolicyMode::Restricted, Some(allowed)) => WRITE_EXEC_TOOLS
            .iter()
            .copied()
            .filter(|t| !allowed.iter().any(|a| a == t))
            .collect(),
        _ => Vec::new(),
    };
    for tool in must_be_off {
        if !tools.disables(tool) {
            errs.add(
                format!("tools.enabled.{tool}"),
                "policy_tool_not_disabled",
                format!(
                    "policy mode {} requires {tool:?} to be switched off explicitly \
                     (tools.enabled.{tool} = false, or its permission \"deny\"); OpenCode \
                     enables tools a config does not mention",
                    policy.mode
                ),
            );
        }
    }
    if policy.mode == PolicyMode::ReadOnly {
        for key in ["bash", "edit"] {
            if tools
                .permissions
                .get(key)
                .is_some_and(|p| *p != Permission::Deny)
            {
                errs.add(
                    format!("tools.permissions.{key}"),
                    "policy_permission_not_deny",
                    format!("policy mode read-only allows only \"deny\" for {key:?}"),
                );
            }
        }
    }
    if let Some(allowed) = &policy.allowed_keys {
        let mut needed: Vec<&str> = COMPILED_CONFIG_KEYS.to_vec();
        if mcp_refs.is_some_and(|r| !r.is_empty()) {
            needed.push("mcp");
        }
        for key in needed {
            if !allowed.iter().any(|a| a == key) {
                errs.add(
                    "policy.allowedKeys",
                    "policy_key_not_allowlisted",
                    format!(
                        "the compiled config sets {key:?}, which policy.allowedKeys does not \
                         list; add it"
                    ),
                );
            }
        }
    }
}

fn parse_tools(value: Option<&Value>, errs: &mut Errors) -> Option<Tools> {
    let Some(value) = value else {
        return Some(Tools::default());
    };
    let Some(obj) = value.as_object() else {
        errs.add("tools", "invalid_tools", "an object {enabled, permissions}");
        return None;
    };
    unknown_keys(obj, TOOLS_KEYS, "tools", "tools_has_unknown_keys", errs);
    let mut tools = Tools::default();
    let mut ok = true;
    for (key, value) in [
        ("enabled", obj.get("enabled")),
        ("permissions", obj.get("permissions")),
    ] {
        let Some(value) = value else { continue };
        let path = join("tools", key);
        let Some(map) = value.as_object() else {
            errs.add(
                &path,
                "invalid_tools_maps",
                "an object of tool name → value",
            );
            ok = false;
            continue;
        };
        if map.len() > 256 {
            errs.add(&path, "invalid_tools_maps", "at most 256 entries");
            ok = false;
        }
        for (name, v) in map {
            let p = join(&path, name);
            if key == "enabled" {
                match v.as_bool() {
                    Some(b) if tool_name_ok(name, 80) => {
                        tools.enabled.insert(name.clone(), b);
                    }
                    _ => {
                        ok = false;
                        errs.add(
                            p,
                            "invalid_tool_enabled_entry",
                            "tool names are 1..80 characters of A-Z a-z 0-9 _ * : -, values \
                             true or false",
                        );
                    }
                }
            } else if !tool_name_ok(name, 120) {
                ok = false;
                errs.add(
                    p,
                    "invalid_tool_permission_key",
                    "1..120 characters of A-Z a-z 0-9 _ * : -",
                );
            } else {
                match v.as_str().and_then(Permission::parse) {
                    Some(perm) => {
                        tools.permissions.insert(name.clone(), perm);
                    }
                    None => {
                        ok = false;
                        errs.add(p, "invalid_tool_permission_value", "allow, ask or deny");
                    }
                }
            }
        }
    }
    ok.then_some(tools)
}

fn parse_mcp_refs(value: Option<&Value>, errs: &mut Errors) -> Option<Vec<McpRef>> {
    let path = "mcpRefs";
    let Some(items) = value.and_then(Value::as_array).filter(|a| a.len() <= 64) else {
        errs.add(
            path,
            "invalid_mcp_refs",
            "an array of at most 64 references (may be empty)",
        );
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    let mut aliases = BTreeSet::new();
    let mut ok = true;
    for (i, item) in items.iter().enumerate() {
        let p = index(path, i);
        let Some(obj) = item.as_object() else {
            errs.add(
                &p,
                "invalid_mcp_ref_entry",
                "an object {serverId, version, alias, status?}",
            );
            ok = false;
            continue;
        };
        let before = errs.0.len();
        unknown_keys(obj, MCP_REF_KEYS, &p, "invalid_mcp_ref_entry", errs);
        let server_id = match obj.get("serverId").and_then(Value::as_str) {
            Some(s) if is_ref_id(s) => Some(s.to_owned()),
            _ => {
                errs.add(
                    join(&p, "serverId"),
                    "invalid_mcp_ref_server_id",
                    "2..64 characters of a-z 0-9 _ -, starting with a letter or digit",
                );
                None
            }
        };
        let version = match obj.get("version").and_then(Value::as_str) {
            Some(s) if is_wire_version(s) => Some(s.to_owned()),
            _ => {
                errs.add(
                    join(&p, "version"),
                    "invalid_mcp_ref_version",
                    "1..32 characters of A-Z a-z 0-9 . _ -",
                );
                None
            }
        };
        let alias = match obj.get("alias").and_then(Value::as_str) {
            Some(s) if is_ref_id(s) => {
                if !aliases.insert(s.to_owned()) {
                    errs.add(
                        join(&p, "alias"),
                        "duplicate_mcp_alias",
                        format!("alias {s:?} is used more than once"),
                    );
                }
                Some(s.to_owned())
            }
            _ => {
                errs.add(
                    join(&p, "alias"),
                    "invalid_mcp_ref_alias",
                    "2..64 characters of a-z 0-9 _ -, starting with a letter or digit",
                );
                None
            }
        };
        let status = match obj.get("status") {
            None => Some(McpStatus::Disabled),
            Some(v) => match v.as_str().and_then(McpStatus::parse) {
                Some(s) => Some(s),
                None => {
                    errs.add(
                        join(&p, "status"),
                        "invalid_mcp_status",
                        "disabled, ask or allow",
                    );
                    None
                }
            },
        };
        match (server_id, version, alias, status) {
            (Some(server_id), Some(version), Some(alias), Some(status))
                if errs.0.len() == before =>
            {
                out.push(McpRef {
                    server_id,
                    version,
                    alias,
                    status,
                })
            }
            _ => ok = false,
        }
    }
    out.sort_by(|a, b| locale_cmp(&a.alias, &b.alias));
    ok.then_some(out)
}

// ---------------------------------------------------------------------------------------------
// MCP registry entries
// ---------------------------------------------------------------------------------------------

/// A remote server reached through a configured MCP gateway (`<base>/<serverPath>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRef {
    pub gateway_id: String,
    /// Normalised (see the module's 0.1.50 rules).
    pub server_path: String,
}

/// How OpenCode reaches the server.
#[derive(Clone, PartialEq, Eq)]
pub enum McpEndpoint {
    /// `type: "remote"`: a URL, or a gateway reference (which wins over `url`).
    Remote {
        url: Option<String>,
        gateway: Option<GatewayRef>,
        /// Sent with every request; typically credentials.
        headers: BTreeMap<String, String>,
    },
    /// `type: "local"`: a command OpenCode starts on the host.
    Local {
        command: Vec<String>,
        /// Extra environment for the command; may hold credentials.
        environment: BTreeMap<String, String>,
    },
}

impl fmt::Debug for McpEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            McpEndpoint::Remote {
                url,
                gateway,
                headers,
            } => f
                .debug_struct("Remote")
                .field("url", url)
                .field("gateway", gateway)
                .field("headers", &headers.keys().collect::<Vec<_>>())
                .finish(),
            McpEndpoint::Local {
                command,
                environment,
            } => f
                .debug_struct("Local")
                .field("command", command)
                .field("environment", &environment.keys().collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// A validated MCP registry entry (`serverId@version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpServer {
    pub server_id: String,
    pub version: String,
    pub endpoint: McpEndpoint,
    /// Stored and shown, not used (as in 0.1.50).
    pub enabled_by_default: Option<bool>,
}

const MCP_KEYS: &[&str] = &[
    "serverId",
    "version",
    "type",
    "url",
    "gatewayRef",
    "headers",
    "command",
    "environment",
    "enabledByDefault",
];

impl McpServer {
    /// Validates and normalises a registry entry, reporting every problem.
    pub fn parse(doc: &Value) -> Result<McpServer, ValidationErrors> {
        let mut errs = Errors::default();
        let Some(obj) = doc.as_object() else {
            errs.add(
                "",
                "mcp_entry_must_be_object",
                "the entry must be a JSON object",
            );
            return Err(errs.finish(("mcp_entry_must_be_object", "")));
        };
        unknown_keys(obj, MCP_KEYS, "", "mcp_entry_has_unknown_keys", &mut errs);
        let server_id = match obj.get("serverId").and_then(Value::as_str) {
            Some(s) if is_ref_id(s) => Some(s.to_owned()),
            _ => {
                errs.add(
                    "serverId",
                    "invalid_server_id",
                    "2..64 characters of a-z 0-9 _ -, starting with a letter or digit",
                );
                None
            }
        };
        let version = match obj.get("version").and_then(Value::as_str) {
            Some(s) if is_wire_version(s) => Some(s.to_owned()),
            _ => {
                errs.add(
                    "version",
                    "invalid_server_version",
                    "1..32 characters of A-Z a-z 0-9 . _ -",
                );
                None
            }
        };
        let enabled_by_default = match obj.get("enabledByDefault") {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => {
                errs.add(
                    "enabledByDefault",
                    "invalid_enabled_by_default",
                    "true or false",
                );
                None
            }
        };
        let endpoint = match obj.get("type").and_then(Value::as_str) {
            Some("remote") => parse_remote(obj, &mut errs),
            Some("local") => parse_local(obj, &mut errs),
            _ => {
                errs.add("type", "unsupported_mcp_type", "\"remote\" or \"local\"");
                None
            }
        };
        match (server_id, version, endpoint) {
            (Some(server_id), Some(version), Some(endpoint)) if errs.is_empty() => Ok(McpServer {
                server_id,
                version,
                endpoint,
                enabled_by_default,
            }),
            _ => Err(errs.finish((
                "invalid_mcp_entry",
                "the entry is invalid (no detail recorded)",
            ))),
        }
    }

    /// `serverId@version`.
    pub fn key(&self) -> String {
        format!("{}@{}", self.server_id, self.version)
    }

    /// `"remote"` or `"local"`.
    pub fn type_name(&self) -> &'static str {
        match self.endpoint {
            McpEndpoint::Remote { .. } => "remote",
            McpEndpoint::Local { .. } => "local",
        }
    }

    /// The normalised entry, credentials included. Only for admins and the compiler; use
    /// [`McpServer::redacted_for`] for anything shown.
    pub fn to_value(&self) -> Value {
        self.render(true)
    }

    /// The entry as `role` may see it: admins and owners see header and environment values,
    /// everyone else sees the names with the value replaced by [`REDACTED`] (so they can tell a
    /// credential is configured without reading it).
    pub fn redacted_for(&self, role: Role) -> Value {
        self.render(role >= Role::Admin)
    }

    fn render(&self, show_secrets: bool) -> Value {
        let secret_map = |m: &BTreeMap<String, String>| -> Value {
            Value::Object(
                m.iter()
                    .map(|(k, v)| {
                        let shown = if show_secrets { v.as_str() } else { REDACTED };
                        (k.clone(), Value::from(shown))
                    })
                    .collect(),
            )
        };
        let mut o = Map::new();
        o.insert("serverId".into(), self.server_id.clone().into());
        o.insert("version".into(), self.version.clone().into());
        o.insert("type".into(), self.type_name().into());
        match &self.endpoint {
            McpEndpoint::Remote {
                url,
                gateway,
                headers,
            } => {
                if let Some(u) = url {
                    o.insert("url".into(), u.clone().into());
                }
                if let Some(g) = gateway {
                    o.insert(
                        "gatewayRef".into(),
                        json!({ "gatewayId": g.gateway_id, "serverPath": g.server_path }),
                    );
                }
                if !headers.is_empty() {
                    o.insert("headers".into(), secret_map(headers));
                }
            }
            McpEndpoint::Local {
                command,
                environment,
            } => {
                o.insert("command".into(), command.clone().into());
                if !environment.is_empty() {
                    o.insert("environment".into(), secret_map(environment));
                }
            }
        }
        if let Some(b) = self.enabled_by_default {
            o.insert("enabledByDefault".into(), b.into());
        }
        Value::Object(o)
    }
}

fn parse_remote(obj: &Map<String, Value>, errs: &mut Errors) -> Option<McpEndpoint> {
    for key in ["command", "environment"] {
        if obj.contains_key(key) {
            errs.add(
                key,
                "mcp_field_not_for_type",
                format!("{key} is for type \"local\"; a remote server has url or gatewayRef"),
            );
        }
    }
    let url = match obj.get("url") {
        None => None,
        Some(Value::String(s)) if http_url_ok(s) => Some(s.clone()),
        Some(_) => {
            errs.add(
                "url",
                "invalid_mcp_url",
                "an http:// or https:// URL of 8..2048 characters",
            );
            None
        }
    };
    let gateway = match obj.get("gatewayRef") {
        None => None,
        Some(Value::Object(g)) => {
            unknown_keys(
                g,
                &["gatewayId", "serverPath"],
                "gatewayRef",
                "invalid_mcp_gateway_ref",
                errs,
            );
            let id = match g.get("gatewayId").and_then(Value::as_str) {
                Some(s) if is_ref_id(s) => Some(s.to_owned()),
                _ => {
                    errs.add(
                        "gatewayRef.gatewayId",
                        "invalid_mcp_gateway_id",
                        "2..64 characters of a-z 0-9 _ -, starting with a letter or digit",
                    );
                    None
                }
            };
            let path = match g
                .get("serverPath")
                .and_then(Value::as_str)
                .and_then(normalise_server_path)
            {
                Some(p) => Some(p),
                None => {
                    errs.add(
                        "gatewayRef.serverPath",
                        "invalid_mcp_gateway_path",
                        "1..256 characters of A-Z a-z 0-9 / _ -, not starting with '.', without \
                         '..' or '://'",
                    );
                    None
                }
            };
            match (id, path) {
                (Some(gateway_id), Some(server_path)) => Some(GatewayRef {
                    gateway_id,
                    server_path,
                }),
                _ => None,
            }
        }
        Some(_) => {
            errs.add(
                "gatewayRef",
                "invalid_mcp_gateway_ref",
                "an object {gatewayId, serverPath}",
            );
            None
        }
    };
    if !obj.contains_key("url") && !obj.contains_key("gatewayRef") {
        errs.add(
            "",
            "mcp_endpoint_missing",
            "a remote server needs url or gatewayRef",
        );
    }
    let headers = match obj.get("headers") {
        None => BTreeMap::new(),
        Some(Value::Object(h)) if h.len() <= 64 => {
            let mut out = BTreeMap::new();
            for (name, v) in h {
                let p = join("headers", name);
                if !header_name_ok(name) {
                    errs.add(
                        &p,
                        "invalid_mcp_header_name",
                        "1..64 characters of A-Z a-z 0-9 -",
                    );
                }
                match v.as_str() {
                    Some(s) if text_ok(s, 1, 2048) && !s.chars().any(char::is_control) => {
                        out.insert(name.clone(), s.to_owned());
                    }
                    _ => errs.add(
                        p,
                        "invalid_mcp_header_value",
                        "a string of 1..2048 characters without control characters",
                    ),
                }
            }
            out
        }
        Some(_) => {
            errs.add(
                "headers",
                "invalid_mcp_headers",
                "an object of at most 64 header name → value",
            );
            BTreeMap::new()
        }
    };
    Some(McpEndpoint::Remote {
        url,
        gateway,
        headers,
    })
}

fn parse_local(obj: &Map<String, Value>, errs: &mut Errors) -> Option<McpEndpoint> {
    for key in ["url", "gatewayRef", "headers"] {
        if obj.contains_key(key) {
            errs.add(
                key,
                "mcp_field_not_for_type",
                format!("{key} is for type \"remote\"; a local server has command and environment"),
            );
        }
    }
    let command = match obj.get("command").and_then(Value::as_array) {
        Some(items) if (1..=64).contains(&items.len()) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                match item.as_str() {
                    Some(s) if text_ok(s, 1, 4096) && !s.contains('\0') => out.push(s.to_owned()),
                    _ => errs.add(
                        index("command", i),
                        "invalid_mcp_command",
                        "a string of 1..4096 characters without NUL",
                    ),
                }
            }
            Some(out)
        }
        _ => {
            errs.add(
                "command",
                "invalid_mcp_command",
                "an array of 1..64 strings: the program and its arguments (no shell)",
            );
            None
        }
    };
    let environment = match obj.get("environment") {
        None => BTreeMap::new(),
        Some(Value::Object(env)) if env.len() <= 64 => {
            let mut out = BTreeMap::new();
            for (name, v) in env {
                let p = join("environment", name);
                if !env_name_ok(name) {
                    errs.add(
                        &p,
                        "invalid_mcp_environment_name",
                        "1..128 characters of A-Z a-z 0-9 _, not starting with a digit",
                    );
                }
                match v.as_str() {
                    Some(s) if text_ok(s, 0, 4096) && !s.contains('\0') => {
                        out.insert(name.clone(), s.to_owned());
                    }
                    _ => errs.add(
                        p,
                        "invalid_mcp_environment_value",
                        "a string of at most 4096 characters without NUL",
                    ),
                }
            }
            out
        }
        Some(_) => {
            errs.add(
                "environment",
                "invalid_mcp_environment",
                "an object of at most 64 variable name → value",
            );
            BTreeMap::new()
        }
    };
    Some(McpEndpoint::Local {
        command: command?,
        environment,
    })
}

// ---------------------------------------------------------------------------------------------
// JSON Schema (for `GET /config/template/schema`)
// ---------------------------------------------------------------------------------------------

/// The template's JSON Schema (draft 2020-12), for editors and `GET /config/template/schema`.
/// [`Template::parse`] is what is enforced; this describes the same rules.
pub fn template_json_schema() -> Value {
    let slug = "^[a-z0-9][a-z0-9_-]{1,63}$";
    let version = "^[A-Za-z0-9._-]{1,32}$";
    let model = json!({ "type": "string", "minLength": 1, "maxLength": 120 });
    let rules = json!({
        "type": "array", "minItems": 1, "maxItems": 32,
        "items": { "type": "string", "minLength": 1, "maxLength": 400 }
    });
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "CodeMantle agent template",
        "type": "object",
        "additionalProperties": false,
        "required": ["schemaVersion", "templateId", "templateVersion", "routing", "mcpRefs"],
        "properties": {
            "schemaVersion": { "const": SCHEMA_VERSION },
            "templateId": { "type": "string", "pattern": "^[a-z0-9][a-z0-9_-]{2,63}$" },
            "templateVersion": {
                "type": "string", "pattern": version,
                "description": "a semantic version (MAJOR.MINOR.PATCH[-PRE])"
            },
            "name": { "type": "string", "minLength": 1, "maxLength": 120 },
            "description": { "type": "string", "minLength": 1, "maxLength": 400 },
            "routing": {
                "type": "object",
                "additionalProperties": false,
                "required": ["defaultModel", "intents"],
                "properties": {
                    "defaultModel": model,
                    "fallbackOrder": { "type": "array", "maxItems": 8, "items": model },
                    "priorityChain": {
                        "type": "array", "minItems": 1, "maxItems": 12, "items": model
                    },
                    "intents": {
                        "type": "array", "maxItems": 64,
                        "items": {
                            "type": "object",
                            "additionalProperties": false,
                            "required": ["id", "match", "rules"],
                            "properties": {
                                "id": { "type": "string", "pattern": slug },
                                "match": { "type": "string", "minLength": 1, "maxLength": 200 },
                                "model": model,
                                "priority": { "type": "integer", "minimum": -1000, "maximum": 1000 },
                                "rules": rules
                            }
                        }
                    },
                    "profiles": {
                        "type": "array", "maxItems": 32,
                        "items": {
                            "type": "object",
                            "additionalProperties": false,
                            "required": ["id", "priorityChain", "rules"],
                            "properties": {
                                "id": { "type": "string", "pattern": slug },
                                "match": { "type": "string", "minLength": 1, "maxLength": 200 },
                                "priorityChain": {
                                    "type": "array", "minItems": 1, "maxItems": 12, "items": model
                                },
                                "rules": rules
                            }
                        }
                    }
                }
            },
            "policy": {
                "type": "object",
                "additionalProperties": false,
                "required": ["mode"],
                "properties": {
                    "mode": { "enum": ["off", "read-only", "restricted"] },
                    "allowedKeys": {
                        "type": "array", "maxItems": 256,
                        "items": { "type": "string", "minLength": 1, "maxLength": 64 }
                    },
                    "allowedTools": {
                        "type": "array", "maxItems": 256,
                        "items": { "type": "string", "pattern": "^[A-Za-z0-9_*:-]{1,80}$" }
                    }
                }
            },
            "tools": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "enabled": {
                        "type": "object", "maxProperties": 256,
                        "propertyNames": { "pattern": "^[A-Za-z0-9_*:-]{1,80}$" },
                        "additionalProperties": { "type": "boolean" }
                    },
                    "permissions": {
                        "type": "object", "maxProperties": 256,
                        "propertyNames": { "pattern": "^[A-Za-z0-9_*:-]{1,120}$" },
                        "additionalProperties": { "enum": ["allow", "ask", "deny"] }
                    }
                }
            },
            "mcpRefs": {
                "type": "array", "maxItems": 64,
                "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["serverId", "version", "alias"],
                    "properties": {
                        "serverId": { "type": "string", "pattern": slug },
                        "version": { "type": "string", "pattern": version },
                        "alias": { "type": "string", "pattern": slug },
                        "status": { "enum": ["disabled", "ask", "allow"] }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_rules() {
        assert!(is_template_id("build-box"));
        assert!(!is_template_id("bb"));
        assert!(!is_template_id("-bb"));
        assert!(is_ref_id("ab"));
        assert!(!is_ref_id("a"));
        assert!(is_wire_version("1.0.0-rc_1"));
        assert!(!is_wire_version("1.0.0+b"));
        assert!(http_url_ok("https://mcp.example.com/docs"));
        assert!(http_url_ok("http://a.b"));
        assert!(!http_url_ok("https://"));
        assert!(!http_url_ok("ftp://example.com"));
        assert!(!http_url_ok("https://a b.com"));
        assert_eq!(
            normalise_server_path(" \\\\docs/v1 ").as_deref(),
            Some("docs/v1")
        );
        assert_eq!(normalise_server_path("../x"), None);
        assert_eq!(normalise_server_path(".hidden"), None);
        assert_eq!(normalise_server_path("a..b"), None);
        assert_eq!(js_len("é😀"), 3);
        assert_eq!(js_integer(&json!(5.0)), Some(5));
        assert_eq!(js_integer(&json!(5.5)), None);
    }
}
