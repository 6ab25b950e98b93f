//! Error vocabulary of the wire protocol.
//!
//! Two kinds of error live here, and they must not be confused:
//! - [`ErrorCode`]: the `c` field of an `e` frame, which one peer sends the other. The eight
//!   v=1 codes are fixed by 0.1.50; a native peer may one day send a code we do not know, so
//!   decoding keeps it as [`ErrorCode::Other`] instead of failing the whole frame.
//! - [`DecodeError`]: why a byte string is not a valid frame. Each variant names the rule that
//!   broke, so a receiver can log it and answer `e` `PROTO` without guessing.

use std::fmt;

/// The `c` field of an `e` (error) frame.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Authentication failed (handshake MAC, key id, device binding). The daemon closes (1008).
    Auth,
    /// The frame broke the protocol: bad shape, unknown `t`, wrong field type.
    Proto,
    /// A path was rejected by the path guard (escape, absolute, too long...).
    Path,
    /// The named root (`r` field) is not configured on the host.
    Root,
    /// A size or count limit was exceeded.
    Limit,
    /// Flow control: too many in-flight requests or streams.
    Flow,
    /// The peer failed internally while handling the request.
    Internal,
    /// The peer's protocol version is below the floor; the daemon closes and backs off.
    UpdateRequired,
    /// A code this build does not know (native peers only; 0.1.x never sends one).
    Other(String),
}

impl ErrorCode {
    /// The eight codes defined by v=1, in wire order.
    pub const KNOWN: [ErrorCode; 8] = [
        ErrorCode::Auth,
        ErrorCode::Proto,
        ErrorCode::Path,
        ErrorCode::Root,
        ErrorCode::Limit,
        ErrorCode::Flow,
        ErrorCode::Internal,
        ErrorCode::UpdateRequired,
    ];

    /// The wire spelling (`"AUTH"`, `"UPDATE_REQUIRED"`...).
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::Auth => "AUTH",
            ErrorCode::Proto => "PROTO",
            ErrorCode::Path => "PATH",
            ErrorCode::Root => "ROOT",
            ErrorCode::Limit => "LIMIT",
            ErrorCode::Flow => "FLOW",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::UpdateRequired => "UPDATE_REQUIRED",
            ErrorCode::Other(s) => s,
        }
    }

    /// Parses a known v=1 code; `None` for anything else.
    pub fn from_known(s: &str) -> Option<ErrorCode> {
        Some(match s {
            "AUTH" => ErrorCode::Auth,
            "PROTO" => ErrorCode::Proto,
            "PATH" => ErrorCode::Path,
            "ROOT" => ErrorCode::Root,
            "LIMIT" => ErrorCode::Limit,
            "FLOW" => ErrorCode::Flow,
            "INTERNAL" => ErrorCode::Internal,
            "UPDATE_REQUIRED" => ErrorCode::UpdateRequired,
            _ => return None,
        })
    }

    /// Total parse: known codes map to their variant, anything else to [`ErrorCode::Other`].
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(s: &str) -> ErrorCode {
        ErrorCode::from_known(s).unwrap_or_else(|| ErrorCode::Other(s.to_owned()))
    }

    /// True for the eight codes defined by v=1.
    pub fn is_known(&self) -> bool {
        !matches!(self, ErrorCode::Other(_))
    }

    /// True when the receiving daemon must close the connection and back off.
    pub fn is_fatal(&self) -> bool {
        matches!(self, ErrorCode::Auth | ErrorCode::UpdateRequired)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ErrorCode {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(ErrorCode::from_str(s))
    }
}

/// Why a byte string could not be decoded into a [`crate::message::Message`].
///
/// Never carries the offending bytes themselves (they may hold secrets); only the rule, the
/// message type and the wire key involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame is larger than the codec accepts; checked before parsing anything.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
    /// The input ended in the middle of a value.
    #[error("frame truncated")]
    Truncated,
    /// The frame (or a field that must be one) is not a JSON object / CBOR map.
    #[error("frame is not an object")]
    NotAnObject,
    /// Bytes after the end of the top-level value.
    #[error("trailing bytes after the frame")]
    TrailingBytes,
    /// `v` is missing or is not an unsigned integer.
    #[error("missing or malformed protocol version `v`")]
    BadVersion,
    /// `v` is a valid integer but not 1, on a type other than `h1` (h1 keeps its `v` so the
    /// server can answer `UPDATE_REQUIRED`).
    #[error("unsupported protocol version {v} for `{t}`")]
    UnsupportedVersion { t: String, v: u64 },
    /// `t` is missing or not a string.
    #[error("missing or malformed message type `t`")]
    BadType,
    /// A required field is absent.
    #[error("`{t}`: missing field `{key}`")]
    MissingField { t: &'static str, key: &'static str },
    /// A field has the wrong type, is out of range, or breaks a limit.
    #[error("`{t}`: bad field `{key}`: {why}")]
    BadField {
        t: &'static str,
        key: &'static str,
        why: &'static str,
    },
    /// A key appears twice in the same object.
    #[error("duplicate key `{key}`")]
    DuplicateKey { key: String },
    /// A message object has more keys than any message may have.
    #[error("more than {max} keys in one object")]
    TooManyKeys { max: usize },
    /// The frame holds more values than the decoder will build.
    #[error("more than {max} values in one frame")]
    TooManyValues { max: usize },
    /// Nesting deeper than the limit.
    #[error("nesting deeper than {max}")]
    TooDeep { max: usize },
    /// The JSON text is not well-formed JSON (or not UTF-8).
    #[error("malformed JSON: {0}")]
    Json(String),
    /// The CBOR bytes are not well-formed CBOR, or use a feature we do not accept
    /// (indefinite lengths, tags, non-string map keys...).
    #[error("malformed CBOR: {0}")]
    Cbor(String),
}

/// Why a [`crate::message::Message`] could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A field breaks a rule the receiver enforces (length, range, character set, or a value a
    /// 0.1.x peer does not know in JSON mode); the receiver would drop the frame.
    #[error("`{t}`: field `{key}` cannot be sent: {why}")]
    Limit {
        t: &'static str,
        key: &'static str,
        why: &'static str,
    },
    /// The encoded frame is larger than the codec allows.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for c in ErrorCode::KNOWN {
            assert_eq!(ErrorCode::from_str(c.as_str()), c);
            assert!(c.is_known());
        }
        assert_eq!(
            ErrorCode::from_str("NOPE"),
            ErrorCode::Other("NOPE".to_owned())
        );
        assert!(ErrorCode::UpdateRequired.is_fatal());
        assert!(!ErrorCode::Path.is_fatal());
    }
}
