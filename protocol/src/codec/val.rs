//! A read-only view of one wire value, the same for both codecs.
//!
//! JSON frames are parsed into a small borrowed tree ([`JRaw`]) first, because serde_json
//! cannot be asked "where is `t`?" without parsing everything. CBOR frames are not parsed into
//! a tree at all: the frame scan ([`super::cbor::scan_frame`]) validates the structure once and
//! records, for each top-level key, the byte slice of its value. A [`Val`] is either a JSON tree
//! node or such a CBOR slice, and the field readers in [`super::field`] only ever see a `Val`.
//! So each field rule is written once, and CBOR values are read straight from the frame bytes:
//! a declared length is compared with the field's limit before the payload is touched, and
//! nothing is allocated until the typed value is built.

use std::borrow::Cow;

use serde_json::{Map, Number, Value};

use super::cbor;
use crate::limits::TextLimit;

/// Why a field value was refused (becomes [`crate::error::DecodeError::BadField`]'s `why`).
pub(crate) type Why = &'static str;

/// A parsed JSON value that borrows its strings from the frame when it can.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum JRaw<'a> {
    Null,
    Bool(bool),
    Uint(u64),
    /// Always negative (non-negative integers are [`JRaw::Uint`]).
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    Array(Vec<JRaw<'a>>),
    Object(Vec<(Cow<'a, str>, JRaw<'a>)>),
}

/// One value of a decoded frame.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Val<'r> {
    Json(&'r JRaw<'r>),
    /// Exactly one well-formed CBOR data item (validated by the frame scan).
    Cbor(&'r [u8]),
}

impl<'r> Val<'r> {
    /// An unsigned integer. JSON accepts integral floats (`1.0`), as JavaScript does.
    pub(crate) fn uint(self) -> Result<u64, Why> {
        match self {
            Val::Json(JRaw::Uint(n)) => Ok(*n),
            Val::Json(JRaw::Int(_)) => Err("must not be negative"),
            Val::Json(JRaw::Float(f)) => {
                if f.fract() == 0.0 && *f >= 0.0 && *f < 18_446_744_073_709_551_616.0 {
                    Ok(*f as u64)
                } else {
                    Err("expected an unsigned integer")
                }
            }
            Val::Json(_) => Err("expected an unsigned integer"),
            Val::Cbor(b) => match cbor::head(b, 0) {
                Ok(h) if h.major == cbor::UINT => Ok(h.arg),
                Ok(h) if h.major == cbor::NINT => Err("must not be negative"),
                _ => Err("expected an unsigned integer"),
            },
        }
    }

    /// A flag: `0`/`1` (as 0.1.50 writes them) or a boolean.
    pub(crate) fn flag(self) -> Result<bool, Why> {
        match self {
            Val::Json(JRaw::Bool(b)) => Ok(*b),
            Val::Cbor(b) if b == [cbor::FALSE] => Ok(false),
            Val::Cbor(b) if b == [cbor::TRUE] => Ok(true),
            other => match other.uint() {
                Ok(0) => Ok(false),
                Ok(1) => Ok(true),
                _ => Err("expected 0 or 1"),
            },
        }
    }

    /// Text that satisfies `limit`. For CBOR the declared length is checked first.
    pub(crate) fn text(self, limit: &TextLimit) -> Result<&'r str, Why> {
        let s = match self {
            Val::Json(JRaw::Str(s)) => s.as_ref(),
            Val::Json(_) => return Err("expected a string"),
            Val::Cbor(b) => {
                let h = cbor::head(b, 0).map_err(|_| "malformed")?;
                if h.major != cbor::TEXT {
                    return Err("expected a string");
                }
                if h.arg > limit.max_utf8_bytes() as u64 {
                    return Err("too long");
                }
                std::str::from_utf8(&b[h.next..]).map_err(|_| "invalid UTF-8")?
            }
        };
        limit.check(s)?;
        Ok(s)
    }

    /// Raw bytes: a CBOR byte string, or base64 text (standard alphabet) in JSON.
    pub(crate) fn bytes(self, max_base64: usize, max_bytes: usize) -> Result<Vec<u8>, Why> {
        use base64::Engine as _;
        match self {
            Val::Json(JRaw::Str(s)) => {
                if s.len() > max_base64 {
                    return Err("too long");
                }
                let out = BASE64.decode(s.as_bytes()).map_err(|_| "invalid base64")?;
                if out.len() > max_bytes {
                    return Err("too long");
                }
                Ok(out)
            }
            Val::Json(_) => Err("expected a base64 string"),
            Val::Cbor(b) => {
                let h = cbor::head(b, 0).map_err(|_| "malformed")?;
                if h.major != cbor::BYTES {
                    return Err("expected a byte string");
                }
                if h.arg > max_bytes as u64 {
                    return Err("too long");
                }
                Ok(b[h.next..].to_vec())
            }
        }
    }

    /// The items of an array of at most `max` items (checked before anything is read).
    pub(crate) fn array(self, max: usize) -> Result<Items<'r>, Why> {
        match self {
            Val::Json(JRaw::Array(items)) => {
                if items.len() > max {
                    return Err("too many items");
                }
                Ok(Items::Json(items.iter()))
            }
            Val::Json(_) => Err("expected an array"),
            Val::Cbor(b) => {
                let h = cbor::head(b, 0).map_err(|_| "malformed")?;
                if h.major != cbor::ARRAY {
                    return Err("expected an array");
                }
                if h.arg > max as u64 {
                    return Err("too many items");
                }
                Ok(Items::Cbor {
                    buf: b,
                    pos: h.next,
                    left: h.arg as usize,
                })
            }
        }
    }

    /// The entries of an object of at most `max` keys.
    pub(crate) fn object(self, max: usize) -> Result<Entries<'r>, Why> {
        match self {
            Val::Json(JRaw::Object(entries)) => {
                if entries.len() > max {
                    return Err("too many keys");
                }
                Ok(Entries::Json(entries.iter()))
            }
            Val::Json(_) => Err("expected an object"),
            Val::Cbor(b) => {
                let h = cbor::head(b, 0).map_err(|_| "malformed")?;
                if h.major != cbor::MAP {
                    return Err("expected an object");
                }
                if h.arg > max as u64 {
                    return Err("too many keys");
                }
                Ok(Entries::Cbor {
                    buf: b,
                    pos: h.next,
                    left: h.arg as usize,
                })
            }
        }
    }

    /// A free-form JSON value, spending one unit of `budget` per value.
    pub(crate) fn to_json(self, budget: &mut usize) -> Result<Value, Why> {
        *budget = budget.checked_sub(1).ok_or("too many values")?;
        match self {
            Val::Json(raw) => match raw {
                JRaw::Null => Ok(Value::Null),
                JRaw::Bool(b) => Ok(Value::Bool(*b)),
                JRaw::Uint(n) => Ok(Value::Number((*n).into())),
                JRaw::Int(n) => Ok(Value::Number((*n).into())),
                JRaw::Float(f) => Number::from_f64(*f)
                    .map(Value::Number)
                    .ok_or("non-finite number"),
                JRaw::Str(s) => Ok(Value::String(s.to_string())),
                JRaw::Array(_) => self.array_to_json(budget),
                JRaw::Object(_) => self.object_to_json(budget),
            },
            Val::Cbor(b) => {
                let h = cbor::head(b, 0).map_err(|_| "malformed")?;
                match h.major {
                    cbor::UINT => Ok(Value::Number(h.arg.into())),
                    cbor::NINT => Ok(Value::Number(cbor::negative(h.arg)?.into())),
                    cbor::BYTES => Err("byte strings have no JSON form"),
                    cbor::TEXT => std::str::from_utf8(&b[h.next..])
                        .map(|s| Value::String(s.to_owned()))
                        .map_err(|_| "invalid UTF-8"),
                    cbor::ARRAY => self.array_to_json(budget),
                    cbor::MAP => self.object_to_json(budget),
                    _ => match cbor::simple(b)? {
                        cbor::Simple::Bool(v) => Ok(Value::Bool(v)),
                        cbor::Simple::Null => Ok(Value::Null),
                        cbor::Simple::Float(f) => Number::from_f64(f)
                            .map(Value::Number)
                            .ok_or("non-finite number"),
                    },
                }
            }
        }
    }

    fn array_to_json(self, budget: &mut usize) -> Result<Value, Why> {
        let items = self.array(*budget)?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            out.push(item?.to_json(budget)?);
        }
        Ok(Value::Array(out))
    }

    fn object_to_json(self, budget: &mut usize) -> Result<Value, Why> {
        let mut out = Map::new();
        for entry in self.object(*budget)? {
            let (key, val) = entry?;
            let val = val.to_json(budget)?;
            if out.insert(key.to_owned(), val).is_some() {
                return Err("duplicate key");
            }
        }
        Ok(Value::Object(out))
    }
}

/// The base64 flavour 0.1.50 uses for bodies (`Buffer.toString('base64')`): standard alphabet,
/// padded on output; on input padding is optional, as Node's decoder does not insist on it.
pub(crate) const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(true)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Iterator over array items.
pub(crate) enum Items<'r> {
    Json(std::slice::Iter<'r, JRaw<'r>>),
    Cbor {
        buf: &'r [u8],
        pos: usize,
        left: usize,
    },
}

impl Items<'_> {
    /// Number of items not yet returned.
    pub(crate) fn len(&self) -> usize {
        match self {
            Items::Json(it) => it.len(),
            Items::Cbor { left, .. } => *left,
        }
    }
}

impl<'r> Iterator for Items<'r> {
    type Item = Result<Val<'r>, Why>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Items::Json(it) => it.next().map(|raw| Ok(Val::Json(raw))),
            Items::Cbor { buf, pos, left } => {
                if *left == 0 {
                    return None;
                }
                *left -= 1;
                let start = *pos;
                match cbor::skip(buf, start, 0) {
                    Ok(end) => {
                        *pos = end;
                        Some(Ok(Val::Cbor(&buf[start..end])))
                    }
                    Err(_) => {
                        *left = 0;
                        Some(Err("malformed"))
                    }
                }
            }
        }
    }
}

/// Iterator over object entries.
pub(crate) enum Entries<'r> {
    Json(std::slice::Iter<'r, (Cow<'r, str>, JRaw<'r>)>),
    Cbor {
        buf: &'r [u8],
        pos: usize,
        left: usize,
    },
}

impl<'r> Iterator for Entries<'r> {
    type Item = Result<(&'r str, Val<'r>), Why>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Entries::Json(it) => it.next().map(|(k, v)| Ok((k.as_ref(), Val::Json(v)))),
            Entries::Cbor { buf, pos, left } => {
                if *left == 0 {
                    return None;
                }
                *left -= 1;
                let entry = cbor::map_entry(buf, *pos).map(|(key, start, end)| {
                    *pos = end;
                    (key, Val::Cbor(&buf[start..end]))
                });
                if entry.is_err() {
                    *left = 0;
                }
                Some(entry)
            }
        }
    }
}
