//! Canonical JSON and the config digest, bit-exact with CodeMantle 0.1.50.
//!
//! A config push (`cc`) carries a digest `pd` of its payload and the daemon recomputes it from
//! `cfg`. 0.1.50 defines "canonical" as whatever Node produces for
//! `JSON.stringify(sortKeys(value))` where `sortKeys` rebuilds every object with its keys sorted by
//! `String.prototype.localeCompare`. To interoperate with a 0.1.50 peer in either direction we
//! must reproduce three JavaScript behaviours, none of which is what a Rust programmer would pick:
//!
//! 1. **Key order is ICU collation, not byte order.** `localeCompare` without a locale uses ICU's
//!    root/`en` collation at tertiary strength with non-ignorable punctuation. For ASCII this
//!    means: whitespace < punctuation and symbols (in DUCET order) < digits < letters; letters
//!    compare case-insensitively first and lowercase sorts before uppercase only as a
//!    tie-break. So `_x < a:b < A1 < apply < Bash` and `x_y < x-y < xY`. See [`collate`].
//! 2. **Integer-like keys come first.** A JS object enumerates "array index" keys (the canonical
//!    decimal strings of 0 ..= 2^32-2) before all other keys, in ascending numeric order,
//!    whatever order they were inserted in. So `{"10":…,"9":…,"b":…}` serialises as
//!    `{"9":…,"10":…,"b":…}`. See [`array_index`] and [`compare_keys`].
//! 3. **Numbers and strings are printed the way `JSON.stringify` prints them**: every number is
//!    an IEEE double printed in the shortest round-trip form (`1.0` → `1`, `1e21` → `1e+21`,
//!    `1e-7` → `1e-7`, `-0` → `0`, integers above 2^53 lose precision exactly like in JS); strings
//!    escape only `"`, `\` and U+0000..U+001F (`\b \f \n \r \t`, others `\u00xx` lowercase).
//!
//! # Collation: what is exact and what is a fallback
//!
//! We implement the UCA multi-level comparison over a hand-written weight table for ASCII that
//! follows the CLDR root order observed from Node 20 / ICU 78 (and matching DUCET's primary
//! weights): `\t \n \v \f \r space _ - , ; : ! ? . ' " ( ) [ ] { } @ * / \ & # % ` ^ + < = > | ~ $`
//! then `0..9` then `a..z` (case-folded). The other C0 controls and DEL are completely ignorable
//! in ICU (zero weight at every level); we skip them as ICU does.
//!
//! **Non-ASCII characters are a fallback, not ICU**: each non-ASCII scalar gets a primary weight
//! above every ASCII letter, ordered by code point, with no case or accent folding. ICU would sort
//! `é` next to `e`; we sort it after `z`. Config keys produced by our template compiler are ASCII
//! (tool names, MCP aliases, header names all have ASCII-only patterns), so this does not arise in
//! practice; [`check_interop_keys`] lets a producer refuse payloads whose digest might differ from
//! what a 0.1.50 peer computes.
//!
//! Two keys that ICU considers equal (they differ only in ignorable controls) are left in input
//! order by JavaScript's stable sort. We cannot know the input order (serde_json's default `Map`
//! is sorted), so we break such ties by code point, which keeps our output deterministic.
//!
//! Nothing here allocates per comparison; [`canonical_json`] is one pass after sorting each
//! object's keys. Deeply nested values recurse; values parsed by serde_json are limited to 128
//! levels by its parser.

use std::cmp::Ordering;
use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Number, Value};
use sha2::{Digest as _, Sha256};

/// Why a value's canonical form may not be byte-identical with what a 0.1.50 peer computes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CanonicalError {
    /// An object key contains a non-ASCII character: our collation is only exact for ASCII.
    #[error(
        "object key {key:?} contains non-ASCII characters; its sort position may differ from ICU"
    )]
    NonAsciiKey {
        /// The offending key.
        key: String,
    },
    /// An object key contains an ICU-ignorable control character (U+0000..U+0008,
    /// U+000E..U+001F, U+007F): two keys may then compare equal and 0.1.50 keeps input order.
    #[error(
        "object key {key:?} contains an ignorable control character; its order is input-dependent in 0.1.50"
    )]
    IgnorableInKey {
        /// The offending key.
        key: String,
    },
}

/// The canonical JSON text of `value` (no whitespace, keys in 0.1.50 order, JS number and string
/// formatting).
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

/// Appends the canonical JSON text of `value` to `out`.
pub fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_js_number(n, out),
        Value::String(s) => write_js_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => write_object(map, out),
    }
}

fn write_object(map: &Map<String, Value>, out: &mut String) {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_by(|a, b| compare_keys(a.0, b.0));
    out.push('{');
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_js_string(k, out);
        out.push(':');
        write_canonical(v, out);
    }
    out.push('}');
}

/// `base64url-nopad(SHA-256(canonical_json(value)))`, 43 characters: the `pd` of a config push.
pub fn digest(value: &Value) -> String {
    digest_text(&canonical_json(value))
}

/// `base64url-nopad(SHA-256(text))` of an already canonical text.
pub fn digest_text(canonical: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// Checks that every object key in `value` is one whose position we compute exactly as ICU does
/// (ASCII without ignorable controls). Returns the first offending key, depth first.
pub fn check_interop_keys(value: &Value) -> Result<(), CanonicalError> {
    match value {
        Value::Array(items) => items.iter().try_for_each(check_interop_keys),
        Value::Object(map) => {
            for (k, v) in map {
                if !k.is_ascii() {
                    return Err(CanonicalError::NonAsciiKey { key: k.clone() });
                }
                if k.bytes().any(|b| ascii_primary(b) == IGNORABLE) {
                    return Err(CanonicalError::IgnorableInKey { key: k.clone() });
                }
                check_interop_keys(v)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The full key order of a canonical object: array-index keys first in numeric order, then all
/// other keys by [`collate`].
pub fn compare_keys(a: &str, b: &str) -> Ordering {
    match (array_index(a), array_index(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => collate(a, b),
    }
}

/// If `key` is a JavaScript array index (the canonical decimal form of an integer in
/// `0 ..= 2^32 - 2`: no sign, no leading zero except `"0"` itself), its value.
pub fn array_index(key: &str) -> Option<u32> {
    let bytes = key.as_bytes();
    if bytes.is_empty() || bytes.len() > 10 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if bytes.len() > 1 && bytes[0] == b'0' {
        return None;
    }
    let n: u64 = key.parse().ok()?;
    if n <= u64::from(u32::MAX - 1) {
        u32::try_from(n).ok()
    } else {
        None
    }
}

/// Completely ignorable at every level (ICU root: most C0 controls and DEL).
const IGNORABLE: u32 = 0;
/// Primary weights of the digit `0`; digits follow all ASCII punctuation and symbols.
const DIGIT_BASE: u32 = 100;
/// Primary weight of the letter `a`; letters follow digits, case-folded.
const LETTER_BASE: u32 = 200;
/// Primary weights of non-ASCII scalars (fallback): above every ASCII weight, by code point.
const NON_ASCII_BASE: u32 = 1000;

/// Printable ASCII punctuation and symbols (and whitespace before them) in CLDR root / DUCET
/// primary order. Position in this string + 1 is the primary weight.
const PUNCTUATION_ORDER: &[u8] = b"\t\n\x0B\x0C\r _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$";

/// Primary weight of one ASCII byte.
const fn ascii_primary(b: u8) -> u32 {
    match b {
        b'0'..=b'9' => DIGIT_BASE + (b - b'0') as u32,
        b'a'..=b'z' => LETTER_BASE + (b - b'a') as u32,
        b'A'..=b'Z' => LETTER_BASE + (b - b'A') as u32,
        _ => {
            let mut i = 0;
            while i < PUNCTUATION_ORDER.len() {
                if PUNCTUATION_ORDER[i] == b {
                    return i as u32 + 1;
                }
                i += 1;
            }
            IGNORABLE
        }
    }
}

/// Primary weights of all ASCII bytes, computed at compile time.
const ASCII_PRIMARY: [u32; 128] = {
    let mut table = [0u32; 128];
    let mut b = 0;
    while b < 128 {
        table[b] = ascii_primary(b as u8);
        b += 1;
    }
    table
};

/// (primary, tertiary) weights of one scalar; primary 0 means ignorable. Tertiary: 0 for
/// lowercase and caseless, 1 for uppercase (ICU: lowercase before uppercase).
fn weights(c: char) -> (u32, u8) {
    if c.is_ascii() {
        let p = ASCII_PRIMARY[c as usize];
        (p, u8::from(c.is_ascii_uppercase()))
    } else {
        (NON_ASCII_BASE + c as u32, 0)
    }
}

fn non_ignorable(s: &str) -> impl Iterator<Item = (u32, u8)> + '_ {
    s.chars().map(weights).filter(|&(p, _)| p != IGNORABLE)
}

/// ICU-root-like collation of two strings (what JavaScript's `a.localeCompare(b)` returns in
/// 0.1.50's Node for ASCII), with a code-point tie-break where ICU would answer "equal".
///
/// Levels: primary weights of all non-ignorable characters (a shorter prefix sorts first), then
/// tertiary (case) weights, then the raw code points. The secondary (accent) level is constant
/// for ASCII and is not modelled.
pub fn collate(a: &str, b: &str) -> Ordering {
    non_ignorable(a)
        .map(|w| w.0)
        .cmp(non_ignorable(b).map(|w| w.0))
        .then_with(|| {
            non_ignorable(a)
                .map(|w| w.1)
                .cmp(non_ignorable(b).map(|w| w.1))
        })
        .then_with(|| a.cmp(b))
}

/// Appends `s` as a JSON string literal escaped exactly like `JSON.stringify`.
pub fn write_js_string(s: &str, out: &mut String) {
    out.reserve(s.len() + 2);
    out.push('"');
    let mut start = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            0x08 => Some("\\b"),
            0x0C => Some("\\f"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0x00..=0x1F => None,
            _ => continue,
        };
        // Every byte matched above is ASCII, so `i` is a char boundary.
        out.push_str(&s[start..i]);
        match escape {
            Some(e) => out.push_str(e),
            None => {
                let _ = write!(out, "\\u{:04x}", b);
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Appends a JSON number formatted like JavaScript's `Number.prototype.toString` (which is what
/// `JSON.stringify` uses): the value is first converted to an IEEE double, as `JSON.parse` would.
pub fn write_js_number(n: &Number, out: &mut String) {
    let x = if let Some(u) = n.as_u64() {
        u as f64
    } else if let Some(i) = n.as_i64() {
        i as f64
    } else {
        n.as_f64().unwrap_or(f64::NAN)
    };
    write_js_f64(x, out);
}

/// Appends `x` formatted like JavaScript's `Number.prototype.toString(x)` (ECMA-262
/// Number::toString with radix 10). `NaN` and infinities print as `null`, as in `JSON.stringify`.
pub fn write_js_f64(x: f64, out: &mut String) {
    if !x.is_finite() {
        out.push_str("null");
        return;
    }
    if x == 0.0 {
        // Covers -0 too: JSON.stringify(-0) === "0".
        out.push('0');
        return;
    }
    if x < 0.0 {
        out.push('-');
    }
    // Rust's `{:e}` prints the shortest digits that round-trip, like ECMA-262 requires:
    // "d[.ddd]e<exp>".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let k = digits.len() as i32;
    // Value = 0.digits × 10^n.
    let n = exp + 1;
    if k <= n && n <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.push_str(&digits[..n as usize]);
        out.push('.');
        out.push_str(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if n >= 1 { '+' } else { '-' });
        let _ = write!(out, "{}", (n - 1).abs());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn num(x: f64) -> String {
        let mut s = String::new();
        write_js_f64(x, &mut s);
        s
    }

    #[test]
    fn js_numbers() {
        let cases: &[(f64, &str)] = &[
            (1.0, "1"),
            (2.5, "2.5"),
            (-2.5, "-2.5"),
            (-0.0, "0"),
            (1e21, "1e+21"),
            (1e20, "100000000000000000000"),
            (123456789012345680000.0, "123456789012345680000"),
            (1.5e21, "1.5e+21"),
            (0.1, "0.1"),
            (0.000001, "0.000001"),
            (0.0000001, "1e-7"),
            (1.25e-7, "1.25e-7"),
            (0.1 + 0.2, "0.30000000000000004"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (9007199254740993.0, "9007199254740992"),
            (1700000000000.0, "1700000000000"),
            (123.456, "123.456"),
        ];
        for (x, want) in cases {
            assert_eq!(num(*x), *want, "formatting {x:e}");
        }
        assert_eq!(num(f64::NAN), "null");
        assert_eq!(canonical_json(&json!(u64::MAX)), "18446744073709552000");
        assert_eq!(canonical_json(&json!(i64::MIN)), "-9223372036854776000");
        assert_eq!(canonical_json(&json!(-5)), "-5");
    }

    #[test]
    fn js_strings() {
        let mut s = String::new();
        write_js_string("a\"b\\c/\u{8}\u{c}\n\r\t\u{1}\u{1f}\u{7f}é\u{2028}", &mut s);
        assert_eq!(
            s,
            "\"a\\\"b\\\\c/\\b\\f\\n\\r\\t\\u0001\\u001f\u{7f}é\u{2028}\""
        );
    }

    #[test]
    fn array_indices() {
        assert_eq!(array_index("0"), Some(0));
        assert_eq!(array_index("10"), Some(10));
        assert_eq!(array_index("4294967294"), Some(4_294_967_294));
        assert_eq!(array_index("4294967295"), None);
        assert_eq!(array_index("99999999999"), None);
        assert_eq!(array_index("01"), None);
        assert_eq!(array_index("-1"), None);
        assert_eq!(array_index("+1"), None);
        assert_eq!(array_index("1.0"), None);
        assert_eq!(array_index(""), None);
        assert_eq!(array_index("１"), None);
    }

    #[test]
    fn ascii_punctuation_follows_ducet() {
        // Each adjacent pair must be strictly increasing.
        let order = " _-,;:!?.'\"()[]{}@*/\\&#%`^+<=>|~$0123456789aAbBcCxXyYzZ";
        let chars: Vec<String> = order.chars().map(String::from).collect();
        for w in chars.windows(2) {
            assert_eq!(
                collate(&w[0], &w[1]),
                Ordering::Less,
                "{:?} < {:?}",
                w[0],
                w[1]
            );
        }
    }

    #[test]
    fn multi_level() {
        let sorted = [
            "", "_x", "a", "a:b", "A1", "ab", "aB", "Ab", "AB", "abc", "apply", "b", "Bash", "x_y",
            "x-y", "xY", "z", "é",
        ];
        for w in sorted.windows(2) {
            assert_eq!(
                collate(w[0], w[1]),
                Ordering::Less,
                "{:?} < {:?}",
                w[0],
                w[1]
            );
            assert_eq!(collate(w[1], w[0]), Ordering::Greater);
        }
        // Primary difference beats an earlier case difference.
        assert_eq!(collate("Ab", "ac"), Ordering::Less);
        // Ignorables are skipped, ties broken by code point.
        assert_eq!(collate("a\u{1}b", "ab"), Ordering::Less);
        assert_eq!(collate("a\u{1}c", "ab"), Ordering::Greater);
    }

    #[test]
    fn interop_key_check() {
        assert_eq!(check_interop_keys(&json!({"a": [{"B-c_d:*": 1}]})), Ok(()));
        assert!(matches!(
            check_interop_keys(&json!({"a": [{"é": 1}]})),
            Err(CanonicalError::NonAsciiKey { .. })
        ));
        assert!(matches!(
            check_interop_keys(&json!({"a\u{1}": 1})),
            Err(CanonicalError::IgnorableInKey { .. })
        ));
    }

    #[test]
    fn nested_and_order_independent() {
        let v = json!({"b": {"y": [1.0, {"B": null, "a": true}], "10": "x", "9": false}, "a": []});
        assert_eq!(
            canonical_json(&v),
            r#"{"a":[],"b":{"9":false,"10":"x","y":[1,{"a":true,"B":null}]}}"#
        );
    }
}
