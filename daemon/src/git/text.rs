//! Text hygiene for everything git prints or is told: credential redaction, the `gq` line
//! normalisation of 0.1.50, and length limits counted the way the wire counts them (UTF-16
//! units).
//!
//! Why redact git's output at all: git echoes the URL it was given in its error messages
//! ("unable to access 'https://user:token@host/…'"), and clone URLs are where operators put
//! tokens. 0.1.50 masked userinfo in live lines but sent the same text unredacted in the
//! reply's summary; here both go through [`redact`].

use crate::redact::redact_text;

/// What credentials in a URL are replaced with.
pub const MASK: &str = "***";

/// Longest `gq` line, in UTF-16 units (the wire's `gq.m` limit).
pub const MAX_LOG_LINE_UNITS: usize = codemantle_protocol::limits::GIT_LOG_LINE.max;

/// Longest summary or failure text in a reply, in UTF-16 units (0.1.50's 1200-character cut,
/// which is also the `gv.m` limit).
pub const MAX_SUMMARY_UNITS: usize = 1200;

/// Mask credentials in `text`:
///
/// - the userinfo of every `scheme://user:pass@host` URL becomes `***` (`https://***@host`),
///   whether or not it has a password part (a token alone is a valid username for most
///   forges);
/// - every query value of such a URL becomes `***` (`?token=***&ref=***`): a query in a git URL
///   is almost always a signed or token-bearing link;
/// - then the daemon-wide rule: `NAME=value` and `"NAME":"value"` where the name contains
///   TOKEN, SECRET, PASSWORD, AUTH or API_KEY ([`redact_text`]).
pub fn redact(text: &str) -> String {
    redact_text(&mask_urls(text))
}

/// Characters that end a URL in free text.
fn ends_url(c: char) -> bool {
    c.is_whitespace() || c.is_control() || matches!(c, '\'' | '"' | '<' | '>' | '`')
}

fn mask_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find("://") {
        // The scheme: letters, digits, `+ . -` immediately before `://`.
        let scheme_len = rest[..pos]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '.' | '-'))
            .count();
        let after = pos + 3;
        if scheme_len == 0 {
            out.push_str(&rest[..after]);
            rest = &rest[after..];
            continue;
        }
        out.push_str(&rest[..after]);
        let tail = &rest[after..];
        let url_len = tail.find(ends_url).unwrap_or(tail.len());
        out.push_str(&mask_one_url(&tail[..url_len]));
        rest = &tail[url_len..];
    }
    out.push_str(rest);
    out
}

/// `body` is what follows `scheme://` up to the end of the URL.
fn mask_one_url(body: &str) -> String {
    let query_at = body.find(['?', '#']).unwrap_or(body.len());
    // The last `@` before the query: a password with an unencoded `/` or `@` in it must not
    // leave a piece of itself behind, so this over-masks rather than under-masks.
    let (userinfo_end, host_start) = match body[..query_at].rfind('@') {
        Some(at) => (Some(at), at + 1),
        None => (None, 0),
    };
    let mut out = String::with_capacity(body.len());
    if userinfo_end.is_some() {
        out.push_str(MASK);
        out.push('@');
    }
    out.push_str(&body[host_start..query_at]);
    let query = &body[query_at..];
    if let Some(q) = query.strip_prefix('?') {
        let (q, fragment) = match q.find('#') {
            Some(h) => (&q[..h], &q[h..]),
            None => (q, ""),
        };
        out.push('?');
        for (i, pair) in q.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((name, _)) => {
                    out.push_str(name);
                    out.push('=');
                    out.push_str(MASK);
                }
                None => out.push_str(pair),
            }
        }
        out.push_str(fragment);
    } else {
        out.push_str(query);
    }
    out
}

/// One live output line as 0.1.50 normalised it: ESC characters removed, secrets redacted,
/// whitespace runs collapsed to one space, trimmed, cut to 500 UTF-16 units. `None` when
/// nothing is left (empty lines are not sent).
pub fn log_line(raw: &str) -> Option<String> {
    let without_esc: String = raw.chars().filter(|&c| c != '\u{1b}').collect();
    let redacted = redact(&without_esc);
    let mut collapsed = String::with_capacity(redacted.len());
    for word in redacted.split_whitespace() {
        if !collapsed.is_empty() {
            collapsed.push(' ');
        }
        collapsed.push_str(word);
    }
    // Remaining control characters (other than whitespace) are shown, not passed through.
    let visible: String = collapsed
        .chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    let cut = truncate_units(&visible, MAX_LOG_LINE_UNITS, "…");
    (!cut.is_empty()).then_some(cut)
}

/// `s` cut to at most `max` UTF-16 units, with `ellipsis` appended (within the limit) when
/// something was cut. Never splits a character.
pub fn truncate_units(s: &str, max: usize, ellipsis: &str) -> String {
    if s.encode_utf16().count() <= max {
        return s.to_owned();
    }
    let budget = max.saturating_sub(ellipsis.encode_utf16().count());
    let mut used = 0;
    let mut end = 0;
    for (i, c) in s.char_indices() {
        if used + c.len_utf16() > budget {
            break;
        }
        used += c.len_utf16();
        end = i + c.len_utf8();
    }
    let mut out = s[..end].to_owned();
    out.push_str(ellipsis);
    out
}

/// A short, safe rendering of wire input for a refusal message: redacted, control characters
/// escaped (a newline shows as `\n`), cut to 80 characters.
pub fn shown_input(s: &str) -> String {
    let redacted = redact(s);
    let escaped: String = redacted.chars().flat_map(char::escape_debug).collect();
    truncate_units(&escaped, 80, "…")
}

/// One argument of the `$ git …` meta line: redacted, JSON-quoted when it contains whitespace
/// or is empty (as 0.1.50 showed it).
pub fn shown_arg(arg: &str) -> String {
    let redacted = redact(arg);
    if redacted.is_empty() || redacted.chars().any(char::is_whitespace) {
        serde_json::to_string(&redacted).unwrap_or(redacted)
    } else {
        redacted
    }
}

/// The reply text of a command: trimmed stderr, then trimmed stdout, joined by a newline
/// (0.1.50's order), redacted, cut to [`MAX_SUMMARY_UNITS`] with `...`. Empty when git said
/// nothing.
pub fn summary(stderr: &[u8], stdout: &[u8]) -> String {
    let err = String::from_utf8_lossy(stderr);
    let out = String::from_utf8_lossy(stdout).replace('\0', "\n");
    let parts: Vec<&str> = [err.trim(), out.trim()]
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    let joined = redact(&parts.join("\n"));
    truncate_units(&joined, MAX_SUMMARY_UNITS, "...")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_userinfo_and_query_values() {
        assert_eq!(
            redact("fatal: unable to access 'https://user:s3cret@127.0.0.1:9/repo.git/': refused"),
            "fatal: unable to access 'https://***@127.0.0.1:9/repo.git/': refused"
        );
        assert_eq!(
            redact("https://ghp_tok@github.com/o/r"),
            "https://***@github.com/o/r"
        );
        // (`token=` is then also caught by the NAME=value rule; either way nothing is left.)
        assert_eq!(
            redact("https://h/r.git?sig=abc&ref=main#frag x"),
            "https://h/r.git?sig=***&ref=***#frag x"
        );
        assert!(!redact("https://h/r.git?token=abc").contains("abc"));
        // A password with an unencoded `/` or `@` leaves nothing of itself behind.
        assert_eq!(redact("http://u:a/b@c@host/x"), "http://***@host/x");
        assert_eq!(redact("no url here"), "no url here");
        assert_eq!(redact("://odd"), "://odd");
        assert_eq!(
            redact("two https://a:b@h1/x and ssh://git@h2/y"),
            "two https://***@h1/x and ssh://***@h2/y"
        );
        // The daemon-wide NAME=value rule applies too.
        assert_eq!(
            redact("GIT_TOKEN=abc"),
            format!("GIT_TOKEN={}", crate::redact::REDACTED)
        );
    }

    #[test]
    fn log_lines_are_normalised() {
        assert_eq!(
            log_line("\u{1b}[31m  remote:   hello\t world  ").as_deref(),
            Some("[31m remote: hello world")
        );
        assert_eq!(log_line("   "), None);
        assert_eq!(log_line(""), None);
        let long = "é".repeat(600);
        let line = log_line(&long).unwrap();
        assert_eq!(line.encode_utf16().count(), MAX_LOG_LINE_UNITS);
        // Astral characters count two units each and are never split.
        let emoji = "😀".repeat(300);
        let line = log_line(&emoji).unwrap();
        assert!(line.encode_utf16().count() <= MAX_LOG_LINE_UNITS);
        assert!(line.ends_with('…'));
    }

    #[test]
    fn summaries_put_stderr_first_and_redact() {
        assert_eq!(summary(b"  err \n", b"\nout\n"), "err\nout");
        assert_eq!(summary(b"", b""), "");
        assert_eq!(
            summary(b"Cloning into 'x'...\nfatal: https://u:p@h/r", b""),
            "Cloning into 'x'...\nfatal: https://***@h/r"
        );
        let big = "x".repeat(5000);
        let s = summary(big.as_bytes(), b"");
        assert_eq!(s.encode_utf16().count(), MAX_SUMMARY_UNITS);
        assert!(s.ends_with("..."));
    }

    #[test]
    fn shown_input_escapes_and_redacts() {
        assert_eq!(shown_input("a\nb"), "a\\nb");
        assert_eq!(shown_input("https://u:p@h/x"), "https://***@h/x");
        assert!(shown_input(&"y".repeat(200)).chars().count() <= 80);
        assert_eq!(shown_arg("a b"), "\"a b\"");
        assert_eq!(shown_arg("https://u:p@h"), "https://***@h");
        assert_eq!(shown_arg(""), "\"\"");
    }
}
