//! Template → OpenCode config, its digest, and the signed `cc` push.
//!
//! Two forms, both bit-exact with CodeMantle 0.1.50 (control-plane reference §6.3, Appendix A):
//!
//! - **runtime** ([`compile_runtime`]): the OpenCode config file a daemon writes to the apply
//!   path (`$schema`, `model`, `permission`, `tools`, `mcp`, and our metadata under
//!   `codemantle`). MCP references are resolved against the registry, gateways included.
//! - **session-init** ([`compile_session_init`]): what a session is started with: providers,
//!   routing and MCP tool statuses, no URLs, headers or commands.
//!
//! The digest is `canonical::digest` of the config (the daemon recomputes it from `cfg`). The
//! `codemantle` metadata carries the policy mode, so the digest binds the mode too.
//!
//! # `codemantle` vs `codenucleus` in the session-init form
//!
//! 0.1.50's daemon only accepts a session-init payload whose single top-level key is
//! `codenucleus` (the project's earlier name), while 0.1.50's control plane emits
//! `codemantle`, so template injection never worked between the two (reference §6.6). We emit
//! `codemantle` (the vector's form, and what our daemon expects) unless
//! [`CompileOptions::session_init_root`] is [`SessionInitRoot::CodeNucleus`], which the caller
//! sets **only** when the target is a 0.1.x daemon speaking JSON: then injection works against
//! the shipped daemon. Our daemon accepts either key. The runtime form always uses `codemantle`.
//!
//! # Ordering
//!
//! Sorting (rules, intents, profiles, refs) uses `canonical::collate`, which is exact ICU for
//! ASCII. For non-ASCII rule text the order may differ from 0.1.50's; that only matters for
//! matching 0.1.50's digest of the same template, never between our control plane and a
//! daemon (the daemon digests the array as received).

use std::collections::{BTreeMap, BTreeSet};

use codemantle_protocol::canonical::{self, CanonicalError};
use codemantle_protocol::config_signature::{self, SignatureError};
use codemantle_protocol::handshake::Secret;
use codemantle_protocol::limits;
use codemantle_protocol::message::{ConfigPhase, ConfigPush, ConfigScope, PolicyMode};
use serde_json::{Map, Value, json};

use super::schema::{McpEndpoint, McpServer, McpStatus, SCHEMA_VERSION, Template, is_ref_id};

/// `$schema` of every runtime config.
pub const OPENCODE_SCHEMA_URL: &str = "https://opencode.ai/config.json";
/// Largest canonical payload a daemon accepts (0.1.50's `CONFIG_PUSH_MAX_BYTES`).
pub const MAX_CONFIG_BYTES: usize = 262_144;
/// Where 0.1.x daemons (and ours by default) write the runtime config.
pub const DEFAULT_APPLY_PATH: &str = ".opencode/opencode.json";

/// The top-level key of the session-init form. See the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionInitRoot {
    /// `codemantle`: the vector's form; native peers and our daemon.
    #[default]
    CodeMantle,
    /// `codenucleus`: only for a 0.1.x daemon on the JSON codec.
    CodeNucleus,
}

impl SessionInitRoot {
    pub fn key(self) -> &'static str {
        match self {
            SessionInitRoot::CodeMantle => "codemantle",
            SessionInitRoot::CodeNucleus => "codenucleus",
        }
    }

    /// `CodeNucleus` for a 0.1.x daemon on the JSON codec, `CodeMantle` for everyone else.
    pub fn for_peer(is_0_1_json_peer: bool) -> SessionInitRoot {
        if is_0_1_json_peer {
            SessionInitRoot::CodeNucleus
        } else {
            SessionInitRoot::CodeMantle
        }
    }
}

/// Knobs of a compilation.
#[derive(Debug, Clone, Default)]
pub struct CompileOptions {
    /// MCP gateways: id → base URL without trailing `/` (see [`parse_gateways`]).
    pub gateways: BTreeMap<String, String>,
    pub session_init_root: SessionInitRoot,
}

/// Parses 0.1.50's `MCP_GATEWAY_BASE_URLS` form, `id=https://base,id2=http://base2`. Returns
/// the gateways and the pairs that were skipped (0.1.50 skipped them silently; the caller
/// should warn).
pub fn parse_gateways(spec: &str) -> (BTreeMap<String, String>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut skipped = Vec::new();
    for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parsed = pair.split_once('=').and_then(|(id, url)| {
            let (id, url) = (id.trim(), url.trim().trim_end_matches('/'));
            let host = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"));
            let url_ok = host.is_some_and(|h| !h.is_empty() && !h.starts_with('/'))
                && !url.chars().any(|c| c.is_whitespace() || c.is_control());
            (is_ref_id(id) && url_ok).then(|| (id.to_owned(), url.to_owned()))
        });
        match parsed {
            Some((id, url)) => {
                out.insert(id, url);
            }
            None => skipped.push(pair.to_owned()),
        }
    }
    (out, skipped)
}

/// A compiled config, ready to push.
#[derive(Debug, Clone, PartialEq)]
pub struct Compiled {
    pub template_id: String,
    pub template_version: String,
    /// `runtime` or `session-init`; the scope follows (`full` or `session-init`).
    pub phase: ConfigPhase,
    pub scope: ConfigScope,
    /// The template's policy mode (`pm` of the push).
    pub policy_mode: PolicyMode,
    /// The config object (`cfg`).
    pub config: Value,
    /// `canonical::canonical_json(config)`: the exact bytes the digest is over.
    pub canonical: String,
    /// `canonical::digest(config)` (`pd`).
    pub digest: String,
}

/// Why a template did not compile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// References that could not be resolved, all of them: `serverId@version` (not in the
    /// registry), or with `:gateway_resolution_failed` / `:endpoint_missing`.
    #[error(
        "missing_mcp_refs:{} — publish the missing MCP entries (POST /config/mcp), configure the gateway, or fix the template's mcpRefs",
        refs.join(",")
    )]
    MissingMcpRefs { refs: Vec<String> },
    /// The template's policy mode (`read-only` or `restricted`) forbids local MCP servers
    /// (programs on the host), and these references resolve to local ones.
    #[error(
        "local_mcp_not_allowed:{} — policy mode {mode} does not let OpenCode start programs on the host; use remote MCP servers or another mode",
        aliases.join(",")
    )]
    LocalMcpNotAllowed {
        mode: PolicyMode,
        aliases: Vec<String>,
    },
    /// The canonical payload is larger than a daemon accepts.
    #[error(
        "the compiled config is {bytes} bytes; daemons accept at most {MAX_CONFIG_BYTES} — shorten the template's rules or drop MCP references"
    )]
    TooLarge { bytes: usize },
    /// A key whose canonical position might differ on a 0.1.x peer (cannot happen for a
    /// validated template; kept as a guard).
    #[error("the compiled config has a key a 0.1.x peer may order differently: {0}")]
    NonInteropKey(CanonicalError),
}

impl CompileError {
    /// The API error string 0.1.x used: `missing_mcp_refs:<comma list>`,
    /// `config_payload_too_large`, `config_key_not_portable`.
    pub fn api_code(&self) -> String {
        match self {
            CompileError::MissingMcpRefs { refs } => format!("missing_mcp_refs:{}", refs.join(",")),
            CompileError::LocalMcpNotAllowed { aliases, .. } => {
                format!("local_mcp_not_allowed:{}", aliases.join(","))
            }
            CompileError::TooLarge { .. } => "config_payload_too_large".to_owned(),
            CompileError::NonInteropKey(_) => "config_key_not_portable".to_owned(),
        }
    }
}

/// Finds every referenced registry entry, or lists every one that is missing.
fn resolve_refs<'a>(
    template: &Template,
    registry: &'a [McpServer],
    mut check: impl FnMut(&McpServer) -> Result<(), &'static str>,
) -> Result<Vec<&'a McpServer>, CompileError> {
    let mut found = Vec::with_capacity(template.mcp_refs.len());
    let mut missing = Vec::new();
    for r in &template.mcp_refs {
        match registry
            .iter()
            .find(|e| e.server_id == r.server_id && e.version == r.version)
        {
            None => missing.push(r.key()),
            Some(entry) => match check(entry) {
                Ok(()) => found.push(entry),
                Err(why) => missing.push(format!("{}:{why}", r.key())),
            },
        }
    }
    if missing.is_empty() {
        Ok(found)
    } else {
        Err(CompileError::MissingMcpRefs { refs: missing })
    }
}

/// A daemon refuses local MCP servers under `read-only` and `restricted`; say so now.
fn check_local_servers(template: &Template, entries: &[&McpServer]) -> Result<(), CompileError> {
    if template.policy.mode == PolicyMode::Off {
        return Ok(());
    }
    let aliases: Vec<String> = template
        .mcp_refs
        .iter()
        .zip(entries)
        .filter(|(_, e)| matches!(e.endpoint, McpEndpoint::Local { .. }))
        .map(|(r, _)| r.alias.clone())
        .collect();
    if aliases.is_empty() {
        Ok(())
    } else {
        Err(CompileError::LocalMcpNotAllowed {
            mode: template.policy.mode,
            aliases,
        })
    }
}

/// `<gateway base>/<serverPath>` as an http(s) URL of 8..2048 characters.
fn gateway_url(entry: &McpServer, gateways: &BTreeMap<String, String>) -> Option<String> {
    let McpEndpoint::Remote {
        gateway: Some(g), ..
    } = &entry.endpoint
    else {
        return None;
    };
    let base = gateways.get(&g.gateway_id)?;
    let url = format!("{}/{}", base, g.server_path.trim_start_matches('/'));
    (8..=2048)
        .contains(&url.encode_utf16().count())
        .then_some(url)
}

/// The endpoint a runtime config points OpenCode at, or why there is none.
fn runtime_url(entry: &McpServer, opts: &CompileOptions) -> Result<Option<String>, &'static str> {
    match &entry.endpoint {
        McpEndpoint::Local { .. } => Ok(None),
        McpEndpoint::Remote {
            gateway: Some(_), ..
        } => gateway_url(entry, &opts.gateways)
            .map(Some)
            .ok_or("gateway_resolution_failed"),
        McpEndpoint::Remote {
            url: Some(url),
            gateway: None,
            ..
        } => Ok(Some(url.clone())),
        McpEndpoint::Remote {
            url: None,
            gateway: None,
            ..
        } => Err("endpoint_missing"),
    }
}

fn finish(
    template: &Template,
    phase: ConfigPhase,
    scope: ConfigScope,
    config: Value,
) -> Result<Compiled, CompileError> {
    canonical::check_interop_keys(&config).map_err(CompileError::NonInteropKey)?;
    let text = canonical::canonical_json(&config);
    if text.len() > MAX_CONFIG_BYTES {
        return Err(CompileError::TooLarge { bytes: text.len() });
    }
    Ok(Compiled {
        template_id: template.template_id.clone(),
        template_version: template.template_version.clone(),
        phase,
        scope,
        policy_mode: template.policy.mode,
        digest: canonical::digest_text(&text),
        canonical: text,
        config,
    })
}

/// The runtime OpenCode config of `template`, with its MCP references resolved in `registry`.
pub fn compile_runtime(
    template: &Template,
    registry: &[McpServer],
    opts: &CompileOptions,
) -> Result<Compiled, CompileError> {
    let entries = resolve_refs(template, registry, |e| runtime_url(e, opts).map(|_| ()))?;
    check_local_servers(template, &entries)?;
    let chain = &template.routing.chain;

    let mut config = Map::new();
    config.insert("$schema".into(), OPENCODE_SCHEMA_URL.into());
    config.insert(
        "model".into(),
        chain
            .first()
            .cloned()
            .unwrap_or_else(|| template.routing.default_model.clone())
            .into(),
    );
    config.insert("permission".into(), template.tools.permissions_value());
    config.insert("tools".into(), template.tools.enabled_value());

    if !template.mcp_refs.is_empty() {
        let mut mcp = Map::new();
        for (r, entry) in template.mcp_refs.iter().zip(&entries) {
            let mut server = Map::new();
            server.insert("type".into(), entry.type_name().into());
            server.insert("enabled".into(), (r.status != McpStatus::Disabled).into());
            server.insert("status".into(), r.status.as_str().into());
            match &entry.endpoint {
                McpEndpoint::Remote {
                    gateway, headers, ..
                } => {
                    if let Ok(Some(url)) = runtime_url(entry, opts) {
                        server.insert("url".into(), url.into());
                    }
                    if !headers.is_empty() {
                        server.insert(
                            "headers".into(),
                            Value::Object(
                                headers
                                    .iter()
                                    .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                                    .collect(),
                            ),
                        );
                    }
                    if let Some(g) = gateway {
                        server.insert(
                            "gatewayRef".into(),
                            json!({ "gatewayId": g.gateway_id, "serverPath": g.server_path }),
                        );
                    }
                }
                McpEndpoint::Local {
                    command,
                    environment,
                } => {
                    server.insert("command".into(), command.clone().into());
                    if !environment.is_empty() {
                        server.insert(
                            "environment".into(),
                            Value::Object(
                                environment
                                    .iter()
                                    .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
                                    .collect(),
                            ),
                        );
                    }
                }
            }
            mcp.insert(r.alias.clone(), Value::Object(server));
        }
        config.insert("mcp".into(), Value::Object(mcp));
    }

    config.insert(
        "codemantle".into(),
        json!({
            "schemaVersion": SCHEMA_VERSION,
            "templateId": template.template_id,
            "templateVersion": template.template_version,
            "policy": template.policy.to_value(),
            "routing": {
                "fallbackOrder": chain,
                "priorityChain": chain,
                "intents": template.routing.intents_value(),
                "profiles": template.routing.profiles_value(),
            },
            "mcpRefs": template.mcp_refs.iter().map(|r| r.to_value()).collect::<Vec<_>>(),
        }),
    );
    finish(
        template,
        ConfigPhase::Runtime,
        ConfigScope::Full,
        Value::Object(config),
    )
}

/// Provider ids of a model list: the text before the first `/`, when it is an id
/// (`^[a-z0-9][a-z0-9_-]{1,63}$`).
fn provider_of(model: &str) -> Option<&str> {
    let (provider, _) = model.split_once('/')?;
    is_ref_id(provider).then_some(provider)
}

/// The session-init config of `template`. References must exist in `registry`, but nothing
/// about how to reach them is included.
pub fn compile_session_init(
    template: &Template,
    registry: &[McpServer],
    opts: &CompileOptions,
) -> Result<Compiled, CompileError> {
    let entries = resolve_refs(template, registry, |_| Ok(()))?;
    check_local_servers(template, &entries)?;
    let routing = &template.routing;

    let mut providers = BTreeSet::new();
    let models = routing
        .chain
        .iter()
        .chain(routing.intents.iter().filter_map(|i| i.model.as_ref()))
        .chain(
            routing
                .profiles
                .iter()
                .flat_map(|p| p.priority_chain.iter()),
        );
    for model in models {
        if let Some(p) = provider_of(model) {
            providers.insert(p.to_owned());
        }
    }
    let mut providers: Vec<String> = providers.into_iter().collect();
    providers.sort_by(|a, b| canonical::collate(a, b));

    let tools: Vec<Value> = template
        .mcp_refs
        .iter()
        .zip(&entries)
        .map(|(r, entry)| {
            json!({
                "alias": r.alias,
                "serverId": r.server_id,
                "version": r.version,
                "type": entry.type_name(),
                "status": r.status.as_str(),
            })
        })
        .collect();

    let body = json!({
        "schemaVersion": SCHEMA_VERSION,
        "templateId": template.template_id,
        "templateVersion": template.template_version,
        "phase": ConfigPhase::SessionInit.as_str(),
        "scope": ConfigScope::SessionInit.as_str(),
        "policy": template.policy.to_value(),
        "sessionInit": {
            "providers": providers,
            "routing": {
                "defaultModel": routing.default_model,
                "priorityChain": routing.chain,
                "intents": routing.intents_value(),
                "profiles": routing.profiles_value(),
            },
            "mcp": { "tools": tools },
        },
    });
    let mut config = Map::new();
    config.insert(opts.session_init_root.key().to_owned(), body);
    finish(
        template,
        ConfigPhase::SessionInit,
        ConfigScope::SessionInit,
        Value::Object(config),
    )
}

/// Why a push could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PushError {
    /// The apply path is not one a daemon would accept.
    #[error("invalid apply path {path:?}: {why}")]
    InvalidApplyPath { path: String, why: &'static str },
    /// The fields could not be signed.
    #[error(transparent)]
    Signature(#[from] SignatureError),
}

/// The control plane's sanity check of an apply path (the daemon decides for real, against its
/// own allowlist): relative, `/`-separated, no `..`, no NUL, ends in `.json`, ≤256 chars.
pub fn check_apply_path(path: &str) -> Result<(), PushError> {
    let bad = |why| {
        Err(PushError::InvalidApplyPath {
            path: path.chars().take(64).collect(),
            why,
        })
    };
    if path.is_empty() || path.chars().count() > limits::APPLY_PATH.max {
        return bad("must be 1..256 characters");
    }
    if path.starts_with('/') || path.contains('\\') {
        return bad("must be relative to the project root, with / as separator");
    }
    if path.split('/').any(|c| c == "..") || path.contains('\0') {
        return bad("must not contain '..' or NUL");
    }
    if !path.ends_with(".json") {
        return bad("must name a .json file");
    }
    Ok(())
}

/// The `cc` frame for `compiled`, signed with the device's key
/// ([`config_signature`], alg `hmac-sha256-devkey-v1`).
///
/// Phase, scope and policy mode come from `compiled` (they are properties of the compiled
/// payload: the runtime form is `runtime`/`full`, the session-init form `session-init`/
/// `session-init`, and the mode is the one the payload declares inside itself), so a caller
/// cannot send a payload under a phase or mode it was not compiled for. `timestamp_ms` is the
/// control plane's clock (`ts`); the idempotency key is left for the caller.
pub fn build_push(
    compiled: &Compiled,
    device_secret: &Secret,
    apply_path: &str,
    request_id: u32,
    timestamp_ms: u64,
) -> Result<ConfigPush, PushError> {
    check_apply_path(apply_path)?;
    let mut push = ConfigPush {
        request_id,
        phase: Some(compiled.phase),
        scope: Some(compiled.scope),
        template_id: compiled.template_id.clone(),
        template_version: compiled.template_version.clone(),
        timestamp_ms,
        apply_path: apply_path.to_owned(),
        digest: compiled.digest.clone(),
        signature_alg: None,
        signature: None,
        policy_mode: Some(compiled.policy_mode),
        config: compiled.config.clone(),
        idempotency_key: None,
    };
    config_signature::sign_push(&mut push, device_secret)?;
    Ok(push)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_spec() {
        let (g, skipped) =
            parse_gateways("main=https://gw.example.com/, bad, x=ftp://y, ok=http://h");
        assert_eq!(
            g.get("main").map(String::as_str),
            Some("https://gw.example.com")
        );
        assert_eq!(g.get("ok").map(String::as_str), Some("http://h"));
        assert_eq!(skipped, ["bad", "x=ftp://y"]);
    }

    #[test]
    fn providers_need_an_id_prefix() {
        assert_eq!(provider_of("anthropic/claude"), Some("anthropic"));
        assert_eq!(provider_of("gpt-5"), None);
        assert_eq!(provider_of("Bad/x"), None);
    }

    #[test]
    fn apply_path_checks() {
        assert!(check_apply_path(DEFAULT_APPLY_PATH).is_ok());
        for bad in [
            "",
            "/etc/x.json",
            "../x.json",
            "a/../../x.json",
            "a.txt",
            "a\\b.json",
        ] {
            assert!(check_apply_path(bad).is_err(), "{bad:?}");
        }
    }
}
