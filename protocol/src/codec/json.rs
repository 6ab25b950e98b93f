//! JSON framing for CodeMantle 0.1.x peers (text frames).
//!
//! **Writing** reproduces what 0.1.50's `JSON.stringify` produces: no whitespace, keys in the
//! order the message declares them (which is the order 0.1.50 builds its objects in), integers
//! without a fraction, strings escaped exactly like JavaScript does (only `"`, `\` and control
//! characters; `\b \f \n \r \t` short forms, other controls as lowercase `\u00xx`; `/` and
//! non-ASCII are left alone). Re-encoding a captured 0.1.50 frame gives the same bytes.
//!
//! **Reading** parses with serde_json into a borrowed tree ([`JRaw`]) with a depth limit and a
//! value budget, because the message type (`t`) may come after other keys and the JSON grammar
//! gives no way to skip a value without parsing it.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use super::val::{BASE64, JRaw};
use super::{Codec, Sink};
use crate::error::DecodeError;
use crate::limits::{MAX_DEPTH, MAX_VALUES};

/// Parses one JSON frame into a tree. The frame must be a single value (surrounding whitespace
/// allowed, as `JSON.parse` does).
pub(crate) fn parse(bytes: &[u8]) -> Result<JRaw<'_>, DecodeError> {
    let state = ParseState {
        budget: Cell::new(MAX_VALUES),
        limit: Cell::new(None),
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let seed = RawSeed {
        depth: 1,
        state: &state,
    };
    let raw = seed.deserialize(&mut de).map_err(|e| {
        if let Some(limit) = state.limit.take() {
            return limit;
        }
        match e.classify() {
            serde_json::error::Category::Eof => DecodeError::Truncated,
            _ => DecodeError::Json(e.to_string()),
        }
    })?;
    de.end().map_err(|_| DecodeError::TrailingBytes)?;
    Ok(raw)
}

/// Limits shared by every level of one parse.
struct ParseState {
    budget: Cell<usize>,
    /// The limit that stopped the parse, if one did (serde errors cannot carry it).
    limit: Cell<Option<DecodeError>>,
}

impl ParseState {
    fn fail<E: de::Error>(&self, e: DecodeError) -> E {
        let msg = e.to_string();
        self.limit.set(Some(e));
        E::custom(msg)
    }

    fn spend<E: de::Error>(&self) -> Result<(), E> {
        match self.budget.get().checked_sub(1) {
            Some(left) => {
                self.budget.set(left);
                Ok(())
            }
            None => Err(self.fail(DecodeError::TooManyValues { max: MAX_VALUES })),
        }
    }
}

#[derive(Clone, Copy)]
struct RawSeed<'s> {
    /// Level of the value being parsed; the frame is level 1.
    depth: usize,
    state: &'s ParseState,
}

impl<'de> DeserializeSeed<'de> for RawSeed<'_> {
    type Value = JRaw<'de>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RawSeed<'_> {
    type Value = JRaw<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.state.spend()?;
        Ok(JRaw::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        self.state.spend()?;
        Ok(JRaw::Bool(v))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.state.spend()?;
        Ok(JRaw::Uint(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.state.spend()?;
        Ok(if v >= 0 {
            JRaw::Uint(v as u64)
        } else {
            JRaw::Int(v)
        })
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        self.state.spend()?;
        Ok(JRaw::Float(v))
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        self.state.spend()?;
        Ok(JRaw::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.state.spend()?;
        Ok(JRaw::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        self.state.spend()?;
        Ok(JRaw::Str(Cow::Owned(v)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        self.state.spend()?;
        let child = self.child()?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(child)? {
            items.push(item);
        }
        Ok(JRaw::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        self.state.spend()?;
        let child = self.child()?;
        let mut entries = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let value = map.next_value_seed(child)?;
            entries.push((key, value));
        }
        Ok(JRaw::Object(entries))
    }
}

impl<'s> RawSeed<'s> {
    fn child<E: de::Error>(self) -> Result<RawSeed<'s>, E> {
        if self.depth >= MAX_DEPTH {
            return Err(self.state.fail(DecodeError::TooDeep { max: MAX_DEPTH }));
        }
        Ok(RawSeed {
            depth: self.depth + 1,
            state: self.state,
        })
    }
}

/// Object keys, borrowed when they contain no escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(KeySeed)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// Writes JSON text into a `Vec`.
pub(crate) struct JsonSink {
    out: Vec<u8>,
    /// A value was written at the current level, so the next key or item needs a comma.
    comma: bool,
}

impl JsonSink {
    pub(crate) fn new(out: Vec<u8>) -> Self {
        JsonSink { out, comma: false }
    }

    pub(crate) fn into_inner(self) -> Vec<u8> {
        self.out
    }

    fn sep(&mut self) {
        if self.comma {
            self.out.push(b',');
        }
        self.comma = true;
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.out.extend_from_slice(b"null"),
            Value::Bool(true) => self.out.extend_from_slice(b"true"),
            Value::Bool(false) => self.out.extend_from_slice(b"false"),
            Value::Number(n) => self.out.extend_from_slice(n.to_string().as_bytes()),
            Value::String(s) => write_string(&mut self.out, s),
            Value::Array(items) => {
                self.out.push(b'[');
                for (n, item) in items.iter().enumerate() {
                    if n > 0 {
                        self.out.push(b',');
                    }
                    self.value(item);
                }
                self.out.push(b']');
            }
            Value::Object(map) => {
                self.out.push(b'{');
                for (n, (k, item)) in map.iter().enumerate() {
                    if n > 0 {
                        self.out.push(b',');
                    }
                    write_string(&mut self.out, k);
                    self.out.push(b':');
                    self.value(item);
                }
                self.out.push(b'}');
            }
        }
    }
}

impl Sink for JsonSink {
    const CODEC: Codec = Codec::Json;

    fn begin_frame(&mut self, version: u64, tag: &str, _fields: usize) {
        self.out.extend_from_slice(b"{\"v\":");
        write_uint(&mut self.out, version);
        self.out.extend_from_slice(b",\"t\":");
        write_string(&mut self.out, tag);
        self.comma = true;
    }

    fn end_frame(&mut self) {
        self.out.push(b'}');
        self.comma = true;
    }

    fn begin_object(&mut self, _fields: usize) {
        self.sep();
        self.out.push(b'{');
        self.comma = false;
    }

    fn end_object(&mut self) {
        self.out.push(b'}');
        self.comma = true;
    }

    fn key(&mut self, key: &str) {
        self.sep();
        write_string(&mut self.out, key);
        self.out.push(b':');
        self.comma = false;
    }

    fn uint(&mut self, v: u64) {
        self.sep();
        write_uint(&mut self.out, v);
    }

    fn flag(&mut self, v: bool) {
        self.sep();
        self.out.push(if v { b'1' } else { b'0' });
    }

    fn text(&mut self, s: &str) {
        self.sep();
        write_string(&mut self.out, s);
    }

    fn bytes(&mut self, b: &[u8]) {
        use base64::Engine as _;
        self.sep();
        self.out.push(b'"');
        let start = self.out.len();
        self.out.resize(start + b.len().div_ceil(3) * 4, 0);
        let written = BASE64.encode_slice(b, &mut self.out[start..]).unwrap_or(0);
        self.out.truncate(start + written);
        self.out.push(b'"');
    }

    fn begin_array(&mut self, _len: usize) {
        self.sep();
        self.out.push(b'[');
        self.comma = false;
    }

    fn end_array(&mut self) {
        self.out.push(b']');
        self.comma = true;
    }

    fn json(&mut self, v: &Value) {
        self.sep();
        self.value(v);
    }
}

/// Decimal digits of `v`.
fn write_uint(out: &mut Vec<u8>, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A JSON string literal escaped the way `JSON.stringify` escapes it.
pub(crate) fn write_string(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short = match b {
            b'"' => b'"',
            b'\\' => b'\\',
            0x08 => b'b',
            0x0c => b'f',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            0x00..=0x1f => 0,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        out.push(b'\\');
        if short == 0 {
            out.extend_from_slice(b"u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.push(short);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(s: &str) -> String {
        let mut v = Vec::new();
        write_string(&mut v, s);
        String::from_utf8(v).unwrap_or_default()
    }

    #[test]
    fn escapes_like_javascript() {
        assert_eq!(esc("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(esc("\n\r\t\u{8}\u{c}"), r#""\n\r\t\b\f""#);
        assert_eq!(esc("\u{1}\u{1f}"), r#""\u0001\u001f""#);
        assert_eq!(esc("/é😀\u{7f}\u{2028}"), "\"/é😀\u{7f}\u{2028}\"");
    }

    #[test]
    fn numbers() {
        for n in [0u64, 9, 10, 4294967295, u64::MAX] {
            let mut v = Vec::new();
            write_uint(&mut v, n);
            assert_eq!(v, n.to_string().into_bytes());
        }
    }

    #[test]
    fn parse_limits() {
        let deep = "[".repeat(40) + &"]".repeat(40);
        assert_eq!(
            parse(deep.as_bytes()),
            Err(DecodeError::TooDeep { max: MAX_DEPTH })
        );
        assert_eq!(parse(b"{\"a\":"), Err(DecodeError::Truncated));
        assert_eq!(parse(b"{} x"), Err(DecodeError::TrailingBytes));
        assert!(matches!(parse(b"{nope"), Err(DecodeError::Json(_))));
    }
}
