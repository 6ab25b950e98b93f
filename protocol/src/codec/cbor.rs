//! CBOR (RFC 8949) framing for native peers.
//!
//! **Reading** is done here by hand, on purpose: each data item starts with a header that
//! declares its length, and reading the header ourselves lets every declared length be compared
//! with the input left and with the field's limit *before* the payload is looked at or anything
//! is allocated. The frame scan validates the whole frame once (structure, depth, accepted
//! subset); field readers then read values straight out of the frame bytes.
//!
//! Accepted subset: unsigned and negative integers (negative ones must fit `i64`), definite-length
//! byte strings, text strings, arrays and maps, `false`, `true`, `null`, and floats. Rejected:
//! tags, `undefined`, other simple values, indefinite lengths, reserved header values. Map keys
//! must be text. The same subset is what [`CborSink`] writes.
//!
//! **Writing** goes through minicbor's `Encoder`, which always picks the shortest header.

use std::convert::Infallible;

use minicbor::Encoder;
use serde_json::Value;

use super::val::{Val, Why};
use super::{Codec, Sink};
use crate::error::DecodeError;
use crate::limits::{MAX_DEPTH, MAX_KEY_BYTES, MAX_MESSAGE_KEYS};

pub(crate) const UINT: u8 = 0;
pub(crate) const NINT: u8 = 1;
pub(crate) const BYTES: u8 = 2;
pub(crate) const TEXT: u8 = 3;
pub(crate) const ARRAY: u8 = 4;
pub(crate) const MAP: u8 = 5;
pub(crate) const TAG: u8 = 6;
pub(crate) const SIMPLE: u8 = 7;
pub(crate) const FALSE: u8 = 0xf4;
pub(crate) const TRUE: u8 = 0xf5;

/// A decoded data-item header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Head {
    pub(crate) major: u8,
    pub(crate) info: u8,
    /// The argument: a value, a length, a count, or (major 7) float bits.
    pub(crate) arg: u64,
    /// Offset of the first byte after the header.
    pub(crate) next: usize,
}

/// Structural failure while scanning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ScanError {
    Truncated,
    TooDeep,
    Malformed(&'static str),
}

impl From<ScanError> for DecodeError {
    fn from(e: ScanError) -> Self {
        match e {
            ScanError::Truncated => DecodeError::Truncated,
            ScanError::TooDeep => DecodeError::TooDeep { max: MAX_DEPTH },
            ScanError::Malformed(why) => DecodeError::Cbor(why.to_owned()),
        }
    }
}

/// Reads the header at `pos`.
pub(crate) fn head(buf: &[u8], pos: usize) -> Result<Head, ScanError> {
    let first = *buf.get(pos).ok_or(ScanError::Truncated)?;
    let major = first >> 5;
    let info = first & 0x1f;
    let (arg, next) = match info {
        0..=23 => (u64::from(info), pos + 1),
        24..=27 => {
            let n = 1usize << (info - 24);
            let bytes = buf.get(pos + 1..pos + 1 + n).ok_or(ScanError::Truncated)?;
            let arg = bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
            (arg, pos + 1 + n)
        }
        31 => return Err(ScanError::Malformed("indefinite lengths are not accepted")),
        _ => return Err(ScanError::Malformed("reserved header value")),
    };
    Ok(Head {
        major,
        info,
        arg,
        next,
    })
}

/// `end` of a payload of `len` bytes starting at `start`, if the input holds it.
fn payload_end(buf: &[u8], start: usize, len: u64) -> Result<usize, ScanError> {
    let left = (buf.len() - start) as u64;
    if len > left {
        return Err(ScanError::Truncated);
    }
    Ok(start + len as usize)
}

/// Validates the data item at `pos` (nested `depth` levels below the frame) and returns the
/// offset just after it. Recursion is bounded by [`MAX_DEPTH`].
pub(crate) fn skip(buf: &[u8], pos: usize, depth: usize) -> Result<usize, ScanError> {
    let h = head(buf, pos)?;
    match h.major {
        UINT => Ok(h.next),
        NINT => {
            if h.arg > i64::MAX as u64 {
                return Err(ScanError::Malformed("negative integer out of range"));
            }
            Ok(h.next)
        }
        BYTES | TEXT => payload_end(buf, h.next, h.arg),
        ARRAY | MAP => {
            if depth + 1 >= MAX_DEPTH {
                return Err(ScanError::TooDeep);
            }
            let per_item = if h.major == MAP { 2 } else { 1 };
            // Every item takes at least one byte: a count larger than the input left is a lie.
            if h.arg.saturating_mul(per_item) > (buf.len() - h.next) as u64 {
                return Err(ScanError::Truncated);
            }
            let mut p = h.next;
            for _ in 0..h.arg {
                if h.major == MAP {
                    let k = head(buf, p)?;
                    if k.major != TEXT {
                        return Err(ScanError::Malformed("map keys must be text"));
                    }
                    p = payload_end(buf, k.next, k.arg)?;
                }
                p = skip(buf, p, depth + 1)?;
            }
            Ok(p)
        }
        TAG => Err(ScanError::Malformed("tags are not accepted")),
        _ => match h.info {
            20..=22 | 25..=27 => Ok(h.next),
            _ => Err(ScanError::Malformed("simple value not accepted")),
        },
    }
}

/// Reads one map entry at `pos`: `(key, value start, value end)`.
pub(crate) fn map_entry(buf: &[u8], pos: usize) -> Result<(&str, usize, usize), Why> {
    let k = head(buf, pos).map_err(|_| "malformed")?;
    if k.major != TEXT {
        return Err("keys must be text");
    }
    let key_end = payload_end(buf, k.next, k.arg).map_err(|_| "malformed")?;
    let key = std::str::from_utf8(&buf[k.next..key_end]).map_err(|_| "invalid UTF-8 in key")?;
    let end = skip(buf, key_end, 0).map_err(|_| "malformed")?;
    Ok((key, key_end, end))
}

/// The value of a negative-integer header.
pub(crate) fn negative(arg: u64) -> Result<i64, Why> {
    i64::try_from(arg)
        .map(|n| -1 - n)
        .map_err(|_| "integer out of range")
}

/// A major-type-7 item.
pub(crate) enum Simple {
    Bool(bool),
    Null,
    Float(f64),
}

/// Reads a major-type-7 item.
pub(crate) fn simple(b: &[u8]) -> Result<Simple, Why> {
    let h = head(b, 0).map_err(|_| "malformed")?;
    if h.major != SIMPLE {
        return Err("expected a simple value");
    }
    match h.info {
        20 => Ok(Simple::Bool(false)),
        21 => Ok(Simple::Bool(true)),
        22 => Ok(Simple::Null),
        25 => Ok(Simple::Float(f16_to_f64(h.arg as u16))),
        26 => Ok(Simple::Float(f64::from(f32::from_bits(h.arg as u32)))),
        27 => Ok(Simple::Float(f64::from_bits(h.arg))),
        _ => Err("simple value not accepted"),
    }
}

/// IEEE 754 half precision to double.
fn f16_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((bits >> 10) & 0x1f);
    let frac = f64::from(bits & 0x3ff);
    let magnitude = match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (1.0 + frac / 1024.0) * 2f64.powi(exp - 15),
    };
    sign * magnitude
}

/// Validates a whole frame and returns its top-level entries, each value as its byte slice.
pub(crate) fn scan_frame(buf: &[u8]) -> Result<Vec<(&str, Val<'_>)>, DecodeError> {
    let h = head(buf, 0)?;
    if h.major != MAP {
        return Err(DecodeError::NotAnObject);
    }
    if h.arg > MAX_MESSAGE_KEYS as u64 {
        return Err(DecodeError::TooManyKeys {
            max: MAX_MESSAGE_KEYS,
        });
    }
    let mut entries = Vec::with_capacity(h.arg as usize);
    let mut p = h.next;
    for _ in 0..h.arg {
        let k = head(buf, p)?;
        if k.major != TEXT {
            return Err(DecodeError::Cbor("map keys must be text".to_owned()));
        }
        if k.arg > MAX_KEY_BYTES as u64 {
            return Err(DecodeError::Cbor("map key too long".to_owned()));
        }
        let key_end = payload_end(buf, k.next, k.arg)?;
        let key = std::str::from_utf8(&buf[k.next..key_end])
            .map_err(|_| DecodeError::Cbor("invalid UTF-8 in map key".to_owned()))?;
        let end = skip(buf, key_end, 1)?;
        entries.push((key, Val::Cbor(&buf[key_end..end])));
        p = end;
    }
    if p != buf.len() {
        return Err(DecodeError::TrailingBytes);
    }
    Ok(entries)
}

/// Writes CBOR into a `Vec`.
pub(crate) struct CborSink {
    enc: Encoder<Vec<u8>>,
}

/// Writing into a `Vec` cannot fail; this swallows minicbor's `Result<_, Error<Infallible>>`.
fn done<T>(_: Result<T, minicbor::encode::Error<Infallible>>) {}

impl CborSink {
    pub(crate) fn new(buf: Vec<u8>) -> Self {
        CborSink {
            enc: Encoder::new(buf),
        }
    }

    pub(crate) fn into_inner(self) -> Vec<u8> {
        self.enc.into_writer()
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Null => done(self.enc.null()),
            Value::Bool(b) => done(self.enc.bool(*b)),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    done(self.enc.u64(u));
                } else if let Some(i) = n.as_i64() {
                    done(self.enc.i64(i));
                } else if let Some(f) = n.as_f64() {
                    done(self.enc.f64(f));
                }
            }
            Value::String(s) => done(self.enc.str(s)),
            Value::Array(items) => {
                done(self.enc.array(items.len() as u64));
                for item in items {
                    self.value(item);
                }
            }
            Value::Object(map) => {
                done(self.enc.map(map.len() as u64));
                for (k, item) in map {
                    done(self.enc.str(k));
                    self.value(item);
                }
            }
        }
    }
}

impl Sink for CborSink {
    const CODEC: Codec = Codec::Cbor;

    fn begin_frame(&mut self, version: u64, tag: &str, fields: usize) {
        done(self.enc.map(fields as u64 + 2));
        done(self.enc.str("v"));
        done(self.enc.u64(version));
        done(self.enc.str("t"));
        done(self.enc.str(tag));
    }

    fn end_frame(&mut self) {}

    fn begin_object(&mut self, fields: usize) {
        done(self.enc.map(fields as u64));
    }

    fn end_object(&mut self) {}

    fn key(&mut self, key: &str) {
        done(self.enc.str(key));
    }

    fn uint(&mut self, v: u64) {
        done(self.enc.u64(v));
    }

    fn flag(&mut self, v: bool) {
        done(self.enc.bool(v));
    }

    fn text(&mut self, s: &str) {
        done(self.enc.str(s));
    }

    fn bytes(&mut self, b: &[u8]) {
        done(self.enc.bytes(b));
    }

    fn begin_array(&mut self, len: usize) {
        done(self.enc.array(len as u64));
    }

    fn end_array(&mut self) {}

    fn json(&mut self, v: &Value) {
        self.value(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_floats() {
        assert_eq!(f16_to_f64(0x3c00), 1.0);
        assert_eq!(f16_to_f64(0xc000), -2.0);
        assert_eq!(f16_to_f64(0x7bff), 65504.0);
        assert_eq!(f16_to_f64(0x0001), 5.960464477539063e-8);
        assert!(f16_to_f64(0x7e00).is_nan());
    }

    #[test]
    fn skip_rejects_lies_and_tags() {
        // array declaring 2^32 items with 1 byte left
        assert_eq!(
            skip(&[0x9a, 0xff, 0xff, 0xff, 0xff, 0x00], 0, 0),
            Err(ScanError::Truncated)
        );
        assert!(matches!(
            skip(&[0xc1, 0x00], 0, 0),
            Err(ScanError::Malformed(_))
        ));
        assert!(matches!(
            skip(&[0x9f, 0xff], 0, 0),
            Err(ScanError::Malformed(_))
        ));
        // text declaring 10 bytes with 1 present
        assert_eq!(skip(&[0x6a, b'a'], 0, 0), Err(ScanError::Truncated));
    }

    #[test]
    fn depth_is_bounded() {
        let mut deep = vec![0x81u8; 100];
        deep.push(0x00);
        assert_eq!(skip(&deep, 0, 0), Err(ScanError::TooDeep));
    }
}
