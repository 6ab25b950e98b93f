//! `[config_push]`: which config pushes (`cc`) this host accepts, and where they may write.
//!
//! A config push decides which tools the coding agent may use and which MCP servers it talks
//! to, so the host's operator — not the control plane — sets the limits here. The checks
//! themselves are in [`crate::config_apply`]; this section only feeds its
//! [`ApplySettings`].
//!
//! ```toml
//! [config_push]
//! allowed_apply_paths = [".opencode/opencode.json"]  # where runtime configs may be written,
//!                                                     # relative to roots.cwd (default shown)
//! require_signature = true        # refuse pushes not signed with this device's key (default);
//!                                 # false only for a 0.1.x control plane, which cannot sign
//! policy_floor = "off"            # the checks of this mode apply to every push, whatever the
//!                                 # push says: "off", "read-only" or "restricted"
//! restricted_keys = ["model", "small_model", "permission", "tools", "mcp", "instructions"]
//! restricted_tools = ["read", "grep", "glob", "list", "todoread", "todowrite"]
//! ```
//!
//! `restricted_keys` and `restricted_tools` are the allowlists of `restricted` pushes (a push
//! may narrow them, never widen them); the defaults are shown.
//!
//! Env: `CODEMANTLE_CONFIG_PUSH_ALLOWED_APPLY_PATHS`, `CODEMANTLE_CONFIG_PUSH_REQUIRE_SIGNATURE`,
//! `CODEMANTLE_CONFIG_PUSH_POLICY_FLOOR`, `CODEMANTLE_CONFIG_PUSH_RESTRICTED_KEYS`,
//! `CODEMANTLE_CONFIG_PUSH_RESTRICTED_TOOLS` (lists comma-separated).

use codemantle_protocol::message::PolicyMode;

use super::{Problem, Validator, from_note};
use crate::config_apply::{
    ApplySettings, EXEC_CONFIG_KEYS, WRITE_EXEC_TOOLS, parse_allowed_apply_path,
};

const LIST_KEYS: &[&str] = &[
    "config_push.allowed_apply_paths",
    "config_push.restricted_keys",
    "config_push.restricted_tools",
];

/// Longest tool or key name accepted in the allowlists (the templates' own limit is 120).
const MAX_NAME_CHARS: usize = 120;

/// Whether `key` (dotted) is a `config_push.*` list setting written as a TOML array.
pub(super) fn is_list_key(key: &str) -> bool {
    LIST_KEYS.contains(&key)
}

fn split_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A name in `restricted_keys`/`restricted_tools`: what OpenCode config keys and tool names
/// look like (`read`, `small_model`, `mcp_docs_*`).
fn is_allowlist_name(name: &str) -> bool {
    (1..=MAX_NAME_CHARS).contains(&name.chars().count())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'*' | b':' | b'$'))
}

/// Validate the `config_push.*` settings into the applier's settings.
pub(super) fn validate_config_push(v: &mut Validator) -> ApplySettings {
    let mut settings = ApplySettings::default();

    if let Some((value, source)) = v.string("config_push.allowed_apply_paths") {
        let paths = split_list(&value);
        if paths.is_empty() {
            v.problems.push(Problem::new(
                "config_push.allowed_apply_paths",
                format!("lists no path{}", from_note(&source)),
                "remove the key to allow only .opencode/opencode.json, or list the paths, e.g. allowed_apply_paths = [\".opencode/opencode.json\"]",
            ));
        }
        settings.allowed_apply_paths.clear();
        for path in paths {
            match parse_allowed_apply_path(&path) {
                Ok(_) => {
                    if !settings.allowed_apply_paths.contains(&path) {
                        settings.allowed_apply_paths.push(path);
                    }
                }
                Err(e) => v.problems.push(Problem::new(
                    "config_push.allowed_apply_paths",
                    format!("{path:?}{} is not usable", from_note(&source)),
                    e.to_string(),
                )),
            }
        }
    }

    settings.require_signature = v.boolean("config_push.require_signature", true);
    if !settings.require_signature {
        v.warnings.push(Problem::new(
            "config_push.require_signature",
            "is false: config pushes without a signature are accepted (restricted ones still need one), so whoever can speak as the control plane can change the agent's tools",
            "set it back to true once the control plane signs pushes (CodeMantle 0.2 control planes do; 0.1.x ones cannot)",
        ));
    }

    if let Some((value, source)) = v.string("config_push.policy_floor") {
        match PolicyMode::parse(value.trim()) {
            Some(mode) => settings.policy_floor = mode,
            None => v.problems.push(Problem::new(
                "config_push.policy_floor",
                format!("{value:?}{} is not a policy mode", from_note(&source)),
                "use \"off\" (default), \"read-only\" (no tool may write or execute) or \"restricted\" (only the allowlisted keys and tools)",
            )),
        }
    }

    for (key, target, risky, why) in [
        (
            "config_push.restricted_keys",
            &mut settings.restricted_keys,
            EXEC_CONFIG_KEYS,
            "makes OpenCode run programs on this host",
        ),
        (
            "config_push.restricted_tools",
            &mut settings.restricted_tools,
            WRITE_EXEC_TOOLS,
            "writes files or runs commands",
        ),
    ] {
        let Some((value, source)) = v.string(key) else {
            continue;
        };
        target.clear();
        for name in split_list(&value) {
            if !is_allowlist_name(&name) {
                v.problems.push(Problem::new(
                    key,
                    format!("{name:?}{} is not a key or tool name", from_note(&source)),
                    "use names of 1 to 120 characters from A-Z a-z 0-9 _ - * : $",
                ));
                continue;
            }
            if risky.contains(&name.as_str()) {
                v.warnings.push(Problem::new(
                    key,
                    format!("lists {name:?}, which {why}: `restricted` pushes may then enable it"),
                    "remove it unless restricted configs really need it",
                ));
            }
            if !target.contains(&name) {
                target.push(name);
            }
        }
    }
    settings
}
