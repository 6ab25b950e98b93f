//! Label selectors: which devices a fleet push goes to.
//!
//! A selector is a comma-separated list of terms; a device matches when **every** term holds:
//!
//! | Term     | Holds when                                                         |
//! |----------|--------------------------------------------------------------------|
//! | `k=v`    | the device has label `k` with value exactly `v`                    |
//! | `k==v`   | same as `k=v`                                                      |
//! | `k!=v`   | the device has no label `k`, or its value is not `v`               |
//! | `k`      | the device has label `k` (any value, including empty)              |
//! | `!k`     | the device has no label `k`                                        |
//!
//! Keys follow the device label rule (1..63 of `A-Z a-z 0-9 . _ / -`). Whitespace around keys
//! and values is ignored, so `env=prod, role=build` works; a value therefore cannot start or
//! end with a space, and cannot contain `,` or `!=`. `k=` selects an empty value.
//!
//! An empty selector is an error, not "every device": a fleet push to all devices should be
//! asked for explicitly (by the caller), not be what a typo produces.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// Longest selector accepted, in bytes.
pub const MAX_SELECTOR_BYTES: usize = 4096;
/// Most terms in one selector.
pub const MAX_TERMS: usize = 32;

/// One condition on a device's labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Term {
    Equals { key: String, value: String },
    NotEquals { key: String, value: String },
    Exists { key: String },
    NotExists { key: String },
}

impl Term {
    /// Whether `labels` satisfy this term.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Term::Equals { key, value } => labels.get(key) == Some(value),
            Term::NotEquals { key, value } => labels.get(key) != Some(value),
            Term::Exists { key } => labels.contains_key(key),
            Term::NotExists { key } => !labels.contains_key(key),
        }
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Term::Equals { key, value } => write!(f, "{key}={value}"),
            Term::NotEquals { key, value } => write!(f, "{key}!={value}"),
            Term::Exists { key } => f.write_str(key),
            Term::NotExists { key } => write!(f, "!{key}"),
        }
    }
}

/// A parsed selector: all terms must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSelector {
    terms: Vec<Term>,
}

/// Why a selector did not parse. The message shows the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("the selector is empty — give at least one term, e.g. `env=prod`")]
    Empty,
    #[error("the selector is longer than {MAX_SELECTOR_BYTES} bytes")]
    TooLong,
    #[error("the selector has more than {MAX_TERMS} terms")]
    TooManyTerms,
    #[error(
        "term {index} ({term:?}): {why} — terms are `k=v`, `k!=v`, `k` (has label) or `!k` (lacks label), separated by commas"
    )]
    BadTerm {
        index: usize,
        term: String,
        why: &'static str,
    },
}

impl SelectorError {
    /// The API error code.
    pub fn code(&self) -> &'static str {
        "invalid_selector"
    }
}

fn key_ok(k: &str) -> bool {
    (1..=63).contains(&k.len())
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b))
}

impl LabelSelector {
    /// Parses `k=v,k2!=v2,k3,!k4`.
    pub fn parse(s: &str) -> Result<LabelSelector, SelectorError> {
        if s.len() > MAX_SELECTOR_BYTES {
            return Err(SelectorError::TooLong);
        }
        if s.trim().is_empty() {
            return Err(SelectorError::Empty);
        }
        let mut terms = Vec::new();
        for (index, raw) in s.split(',').enumerate() {
            if terms.len() == MAX_TERMS {
                return Err(SelectorError::TooManyTerms);
            }
            let bad = |why| SelectorError::BadTerm {
                index,
                term: raw.chars().take(80).collect(),
                why,
            };
            let t = raw.trim();
            if t.is_empty() {
                return Err(bad("empty term (two commas in a row, or a trailing comma)"));
            }
            if t.chars().any(char::is_control) {
                return Err(bad("control characters are not allowed"));
            }
            let term = if let Some((k, v)) = t.split_once("!=") {
                Term::NotEquals {
                    key: k.trim().to_owned(),
                    value: v.trim().to_owned(),
                }
            } else if let Some((k, v)) = t.split_once('=') {
                let v = v.strip_prefix('=').unwrap_or(v);
                Term::Equals {
                    key: k.trim().to_owned(),
                    value: v.trim().to_owned(),
                }
            } else if let Some(k) = t.strip_prefix('!') {
                Term::NotExists {
                    key: k.trim().to_owned(),
                }
            } else {
                Term::Exists { key: t.to_owned() }
            };
            let (Term::Equals { key, .. }
            | Term::NotEquals { key, .. }
            | Term::Exists { key }
            | Term::NotExists { key }) = &term;
            if !key_ok(key) {
                return Err(bad(
                    "the key must be 1..63 characters of A-Z a-z 0-9 . _ / -",
                ));
            }
            if let Term::Equals { value, .. } | Term::NotEquals { value, .. } = &term {
                if value.chars().count() > 256 {
                    return Err(bad("the value is longer than 256 characters"));
                }
            }
            terms.push(term);
        }
        Ok(LabelSelector { terms })
    }

    /// The terms, in the order given.
    pub fn terms(&self) -> &[Term] {
        &self.terms
    }

    /// Whether a device with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| t.matches(labels))
    }
}

impl FromStr for LabelSelector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LabelSelector::parse(s)
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.terms.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{t}")?;
        }
        Ok(())
    }
}
