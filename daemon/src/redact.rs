//! `redact`: keep secrets out of logs, `Debug` output and error messages.
//!
//! The rule (shared with 0.1.50 and DESIGN.md) is by *name*: a value whose key matches
//! `TOKEN|SECRET|PASSWORD|AUTH|API_KEY` (case-insensitive, anywhere in the name) is a secret.
//! The match is deliberately broad: `author=x` is redacted too, which costs a little log detail
//! and never leaks a credential. Values known to be secret regardless of their name (the
//! device key) are wrapped in [`Secret`], whose `Debug` and `Display` never show the content.

use std::fmt;

/// What a redacted value is replaced with.
pub const REDACTED: &str = "***REDACTED***";

const PATTERNS: [&str; 5] = ["TOKEN", "SECRET", "PASSWORD", "AUTH", "API_KEY"];

/// Whether a key, variable or field name marks its value as secret.
pub fn is_secret_name(name: &str) -> bool {
    // Case-insensitive substring search without allocating: this runs for every `key=` and
    // `"key":"` in every line of session output (a JSON event has dozens).
    let name = name.as_bytes();
    PATTERNS.iter().any(|p| {
        name.windows(p.len())
            .any(|w| w.eq_ignore_ascii_case(p.as_bytes()))
    })
}

/// `value`, or [`REDACTED`] if `name` is a secret name.
pub fn value_for_log<'a>(name: &str, value: &'a str) -> &'a str {
    if is_secret_name(name) {
        REDACTED
    } else {
        value
    }
}

/// Redact `NAME=value` pairs (and `"NAME":"value"` JSON pairs) whose name is secret, in free
/// text such as a URL query, a command's output or an error message. Values end at whitespace,
/// `&`, `;`, `,` or a quote.
pub fn redact_text(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let (sep_len, quoted) = match bytes[i] {
            b'=' => (1, false),
            b':' if i > 0 && bytes[i - 1] == b'"' && bytes.get(i + 1) == Some(&b'"') => (2, true),
            _ => {
                i += 1;
                continue;
            }
        };
        // The name: identifier characters immediately before the separator (and its quote).
        let name_end = if quoted { i - 1 } else { i };
        let mut name_start = name_end;
        while name_start > 0 && is_name_byte(bytes[name_start - 1]) {
            name_start -= 1;
        }
        let value_start = i + sep_len;
        if name_start == name_end || !is_secret_name(&text[name_start..name_end]) {
            i += 1;
            continue;
        }
        let mut value_end = value_start;
        while value_end < bytes.len() && !is_value_end(bytes[value_end], quoted) {
            value_end += 1;
        }
        out.push_str(&text[copied..value_start]);
        out.push_str(REDACTED);
        copied = value_end;
        i = value_end.max(i + 1);
    }
    out.push_str(&text[copied..]);
    out
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.'
}

fn is_value_end(b: u8, quoted: bool) -> bool {
    if quoted {
        b == b'"'
    } else {
        b.is_ascii_whitespace() || matches!(b, b'&' | b';' | b',' | b'"' | b'\'')
    }
}

/// A secret value: readable only through [`Secret::expose`]; `Debug`/`Display` print
/// [`REDACTED`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The secret itself. Call sites are where a reviewer looks for leaks.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({REDACTED})")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for n in [
            "AGENT_AUTH_TOKEN",
            "api_key",
            "db_password",
            "author",
            "x-Secret",
        ] {
            assert!(is_secret_name(n), "{n}");
        }
        for n in ["url", "device_id", "data_dir", "key_file"] {
            assert!(!is_secret_name(n), "{n}");
        }
        assert_eq!(value_for_log("token", "abc"), REDACTED);
        assert_eq!(value_for_log("url", "abc"), "abc");
    }

    #[test]
    fn text() {
        assert_eq!(
            redact_text("wss://h/ws?token=abc&x=1"),
            format!("wss://h/ws?token={REDACTED}&x=1")
        );
        assert_eq!(
            redact_text("AGENT_AUTH_TOKEN=s3cr3t other=ok"),
            format!("AGENT_AUTH_TOKEN={REDACTED} other=ok")
        );
        assert_eq!(
            redact_text(r#"{"apiKey":"x","API_KEY":"y","n":"z"}"#),
            format!(r#"{{"apiKey":"x","API_KEY":"{REDACTED}","n":"z"}}"#)
        );
        assert_eq!(redact_text("a=b c"), "a=b c");
        assert_eq!(redact_text("=x token="), format!("=x token={REDACTED}"));
        assert_eq!(redact_text("é token=ü"), format!("é token={REDACTED}"));
    }

    #[test]
    fn secret_never_prints() {
        let s = Secret::new("hunter2".into());
        assert!(!format!("{s:?} {s}").contains("hunter2"));
        assert_eq!(s.expose(), "hunter2");
    }
}
