//! The two wire codecs over the one message vocabulary.
//!
//! - [`Codec::Cbor`] — native mode, binary WebSocket frames between CodeMantle peers of this
//!   generation. Each message is a CBOR map with the same short text keys as JSON (`"v"`, `"t"`,
//!   `"i"`, …), so frames stay self-describing and new optional keys can be added. Flags are CBOR
//!   booleans, binary data (proxy bodies) are byte strings, directory entries are `[name]` /
//!   `[name, size, mtime_ms]`, free-form payloads (`cc.cfg`) are nested maps.
//! - [`Codec::Json`] — compat mode, text frames to and from CodeMantle 0.1.x. Exactly what
//!   0.1.50 writes: same keys, same value shapes, same key order, same string escaping, so a
//!   captured 0.1.50 frame re-encodes to the identical text.
//!
//! # Decisions
//!
//! **Unknown keys are ignored by both decoders.** 0.1.50 parses with strict key whitelists and
//! silently drops a frame with one extra key, which is why its "additive-first" promise never
//! held. We never *send* a key a 0.1.x peer does not know (native-only fields are skipped in
//! JSON mode), and we accept extra keys in both directions so a later peer that adds a field
//! still gets through. Native-only keys that arrive in a JSON frame are ignored too: JSON mode
//! means the 0.1.50 vocabulary, and its fields take their 0.1.x meaning.
//!
//! **Everything else is strict**: `v`, `t` and required keys present, every known field of the
//! right type and within its limit ([`crate::limits`]), no duplicate keys, nothing after the
//! frame. Decoding is total: any input gives a [`Message`] or a [`DecodeError`] naming the
//! rule that broke, never a panic. Frame size is checked first, then CBOR declared lengths and
//! counts are checked against the input left and the field's limit before anything is read or
//! allocated; JSON is parsed under a depth limit and a value budget.
//!
//! **Frame size**: [`MAX_JSON_FRAME_BYTES`] (24 MiB, the
//! 0.1.50 `maxPayload`) and [`MAX_CBOR_FRAME_BYTES`]
//! (17 MiB: a 16 MiB proxy body as raw bytes plus headers). The WebSocket layer should use
//! [`Codec::max_frame_bytes`] as its message size limit.
//!
//! **Encoding checks too**: [`encode`] applies the same limits as the decoder and refuses a
//! message the receiver would drop, because 0.1.50 drops such frames without a reply and the
//! caller would otherwise wait for a timeout.
//!
//! **`h1` with `v ≠ 1`** decodes to [`Message::HelloUnsupported`] so the control plane can answer
//! `UPDATE_REQUIRED`; any other type with `v ≠ 1` is [`DecodeError::UnsupportedVersion`]. An
//! unknown `t` with `v = 1` decodes to [`Message::Unknown`] so the receiver can answer `e PROTO`
//! and keep the connection.

mod cbor;
pub(crate) mod field;
mod json;
pub(crate) mod val;

pub(crate) use field::wire_object;

use serde_json::Value;

use crate::error::{DecodeError, EncodeError};
use crate::limits::{MAX_CBOR_FRAME_BYTES, MAX_JSON_FRAME_BYTES};
use crate::message::Message;
use val::{JRaw, Val};

/// Which wire encoding a frame uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Native mode: CBOR in binary frames.
    Cbor,
    /// Compat mode: 0.1.x JSON in text frames.
    Json,
}

impl Codec {
    /// Largest frame this codec accepts or produces, in bytes.
    pub const fn max_frame_bytes(self) -> usize {
        match self {
            Codec::Cbor => MAX_CBOR_FRAME_BYTES,
            Codec::Json => MAX_JSON_FRAME_BYTES,
        }
    }

    /// True for the native (CBOR) codec.
    pub const fn is_native(self) -> bool {
        matches!(self, Codec::Cbor)
    }
}

/// Encodes `msg` as one frame.
pub fn encode(msg: &Message, codec: Codec) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_into(msg, codec, &mut out)?;
    Ok(out)
}

/// Encodes `msg` as one frame appended to `out` (lets a caller reuse one buffer). On error
/// `out` is left as it was.
pub fn encode_into(msg: &Message, codec: Codec, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    msg.check(codec)?;
    let start = out.len();
    let buf = std::mem::take(out);
    *out = match codec {
        Codec::Json => {
            let mut sink = json::JsonSink::new(buf);
            msg.write(&mut sink);
            sink.into_inner()
        }
        Codec::Cbor => {
            let mut sink = cbor::CborSink::new(buf);
            msg.write(&mut sink);
            sink.into_inner()
        }
    };
    let len = out.len() - start;
    if len > codec.max_frame_bytes() {
        out.truncate(start);
        return Err(EncodeError::FrameTooLarge {
            len,
            max: codec.max_frame_bytes(),
        });
    }
    Ok(())
}

/// Decodes one frame.
pub fn decode(bytes: &[u8], codec: Codec) -> Result<Message, DecodeError> {
    let max = codec.max_frame_bytes();
    if bytes.len() > max {
        return Err(DecodeError::FrameTooLarge {
            len: bytes.len(),
            max,
        });
    }
    match codec {
        Codec::Json => {
            let root = json::parse(bytes)?;
            let JRaw::Object(entries) = &root else {
                return Err(DecodeError::NotAnObject);
            };
            let entries = entries
                .iter()
                .map(|(k, v)| (k.as_ref(), Val::Json(v)))
                .collect();
            Message::from_entries(entries, codec)
        }
        Codec::Cbor => Message::from_entries(cbor::scan_frame(bytes)?, codec),
    }
}

/// Where encoders write: one implementation per codec, so message code is written once.
pub(crate) trait Sink {
    /// The codec this sink writes.
    const CODEC: Codec;
    /// Opens the frame object and writes `v` and `t`; `fields` more keys follow.
    fn begin_frame(&mut self, version: u64, tag: &str, fields: usize);
    /// Closes the frame object.
    fn end_frame(&mut self);
    /// Opens a nested object of `fields` keys (as a value).
    fn begin_object(&mut self, fields: usize);
    /// Closes a nested object.
    fn end_object(&mut self);
    /// Writes an object key; a value follows.
    fn key(&mut self, key: &str);
    /// Writes an unsigned integer.
    fn uint(&mut self, v: u64);
    /// Writes a flag.
    fn flag(&mut self, v: bool);
    /// Writes text.
    fn text(&mut self, s: &str);
    /// Writes binary data.
    fn bytes(&mut self, b: &[u8]);
    /// Opens an array of `len` items.
    fn begin_array(&mut self, len: usize);
    /// Closes an array.
    fn end_array(&mut self);
    /// Writes a free-form JSON value.
    fn json(&mut self, v: &Value);
}
