//! Field rules: how one Rust field maps to one wire value, in both codecs.
//!
//! A message type is declared once with [`wire_object!`]: for each field its wire key, its
//! *kind* (a value implementing [`FieldKind`] that knows the limits, the wire shape, whether the
//! field is optional, and how the two codecs differ), and whether it is native-only. The macro
//! generates the struct and its [`WireObject`] impl. Keys are written in declaration order,
//! which is the order 0.1.50 writes them, so JSON re-encoding is byte-exact.
//!
//! Native-only fields are never written in JSON mode and are ignored when reading JSON (they
//! take the kind's default), so a 0.1.x peer never sees a key it does not know.

use std::marker::PhantomData;

use serde_json::Value;

use super::val::{Val, Why};
use super::{Codec, Sink, cbor};
use crate::error::{DecodeError, EncodeError, ErrorCode};
use crate::limits::{
    self, ENTRY_NAME, MAX_DEPTH, MAX_FREE_FORM_VALUES, MAX_MESSAGE_KEYS, TextLimit,
};
use crate::message::{DirEntry, Pair};

/// How one field is checked, written and read.
pub(crate) trait FieldKind {
    /// The Rust type of the field.
    type Value: Clone;

    /// Whether the value appears on the wire (optional fields leave out `None`, defaults...).
    fn present(&self, _v: &Self::Value) -> bool {
        true
    }

    /// The value of a field whose key is absent; `None` makes the key required.
    fn absent(&self) -> Option<Self::Value> {
        None
    }

    /// Checks a value before it is written; the same rules the reader applies.
    fn check(&self, v: &Self::Value, codec: Codec) -> Result<(), Why>;

    /// Writes the value (the key has been written).
    fn write<S: Sink>(&self, v: &Self::Value, s: &mut S);

    /// Reads a present value.
    fn read(&self, v: Val<'_>, codec: Codec) -> Result<Self::Value, Why>;

    /// The value as a JSON (compat) peer will see it after a round trip.
    fn compat(&self, v: &Self::Value) -> Self::Value {
        v.clone()
    }

    /// The request id this field carries, if it is the envelope `i`.
    fn request_id(&self, _v: &Self::Value) -> Option<u32> {
        None
    }
}

/// An object whose fields are declared with [`wire_object!`].
pub(crate) trait WireObject: Sized + Clone {
    /// Number of keys [`WireObject::write_fields`] writes in `codec`.
    fn field_count(&self, codec: Codec) -> usize;
    /// Checks every field against its limits.
    fn check_fields(&self, t: &'static str, codec: Codec) -> Result<(), EncodeError>;
    /// Writes `key, value` pairs in wire order.
    fn write_fields<S: Sink>(&self, s: &mut S);
    /// Reads the object from its entries.
    fn read_fields(f: &Fields<'_>) -> Result<Self, DecodeError>;
    /// The object as a JSON peer sees it: native-only fields at their defaults, values clamped.
    fn to_compat(&self) -> Self;
    /// The envelope `i`, if the object has one.
    fn request_id(&self) -> Option<u32>;
}

// ---------------------------------------------------------------------------------------------
// Helpers called by the macro expansion
// ---------------------------------------------------------------------------------------------

/// Whether a field is written in `codec`.
pub(crate) fn is_written<K: FieldKind>(
    k: &K,
    native_only: bool,
    codec: Codec,
    v: &K::Value,
) -> bool {
    !(native_only && codec == Codec::Json) && k.present(v)
}

/// Writes `key: value` if the field is written in the sink's codec.
pub(crate) fn write<K: FieldKind, S: Sink>(
    k: &K,
    native_only: bool,
    key: &str,
    v: &K::Value,
    s: &mut S,
) {
    if is_written(k, native_only, S::CODEC, v) {
        s.key(key);
        k.write(v, s);
    }
}

/// Checks a field that will be written.
pub(crate) fn check<K: FieldKind>(
    k: &K,
    native_only: bool,
    t: &'static str,
    key: &'static str,
    codec: Codec,
    v: &K::Value,
) -> Result<(), EncodeError> {
    if is_written(k, native_only, codec, v) {
        k.check(v, codec)
            .map_err(|why| EncodeError::Limit { t, key, why })?;
    }
    Ok(())
}

/// The field as a JSON peer sees it.
pub(crate) fn compat<K: FieldKind>(k: &K, native_only: bool, v: &K::Value) -> K::Value {
    if native_only {
        k.absent().unwrap_or_else(|| k.compat(v))
    } else {
        k.compat(v)
    }
}

/// The top-level (or nested) entries of one object, for field lookup.
pub(crate) struct Fields<'r> {
    t: &'static str,
    codec: Codec,
    entries: Vec<(&'r str, Val<'r>)>,
}

impl<'r> Fields<'r> {
    /// Wraps the entries of an object of type `t`, refusing duplicate keys.
    pub(crate) fn new(
        t: &'static str,
        codec: Codec,
        entries: Vec<(&'r str, Val<'r>)>,
    ) -> Result<Self, DecodeError> {
        check_keys(&entries)?;
        Ok(Fields { t, codec, entries })
    }

    fn get(&self, key: &str) -> Option<Val<'r>> {
        self.entries
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| *v)
    }

    /// Reads field `key` with `kind`.
    pub(crate) fn read<K: FieldKind>(
        &self,
        key: &'static str,
        kind: &K,
        native_only: bool,
    ) -> Result<K::Value, DecodeError> {
        let t = self.t;
        let value = if native_only && self.codec == Codec::Json {
            None
        } else {
            self.get(key)
        };
        match value {
            None => kind.absent().ok_or(DecodeError::MissingField { t, key }),
            Some(v) => kind
                .read(v, self.codec)
                .map_err(|why| DecodeError::BadField { t, key, why }),
        }
    }

    /// Requires `key` to hold the text `value` (the `k:"cfg"` discriminator).
    pub(crate) fn expect_const(
        &self,
        key: &'static str,
        value: &'static str,
    ) -> Result<(), DecodeError> {
        let t = self.t;
        match self.get(key) {
            None => Err(DecodeError::MissingField { t, key }),
            Some(v) => match v.text(&TextLimit::new(0, 16)) {
                Ok(s) if s == value => Ok(()),
                _ => Err(DecodeError::BadField {
                    t,
                    key,
                    why: "unexpected discriminator",
                }),
            },
        }
    }
}

/// Refuses too many keys and duplicate keys (a JSON parser would keep the last one; two peers
/// disagreeing on which one counts is how parser-differential attacks start).
pub(crate) fn check_keys(entries: &[(&str, Val<'_>)]) -> Result<(), DecodeError> {
    if entries.len() > MAX_MESSAGE_KEYS {
        return Err(DecodeError::TooManyKeys {
            max: MAX_MESSAGE_KEYS,
        });
    }
    for (n, (key, _)) in entries.iter().enumerate() {
        if entries[..n].iter().any(|(k, _)| k == key) {
            return Err(DecodeError::DuplicateKey {
                key: (*key).to_owned(),
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Kinds
// ---------------------------------------------------------------------------------------------

/// Required text.
#[derive(Clone, Copy)]
pub(crate) struct Text(pub(crate) TextLimit);

impl FieldKind for Text {
    type Value = String;

    fn check(&self, v: &String, _: Codec) -> Result<(), Why> {
        self.0.check(v)
    }

    fn write<S: Sink>(&self, v: &String, s: &mut S) {
        s.text(v);
    }

    fn read(&self, v: Val<'_>, _: Codec) -> Result<String, Why> {
        v.text(&self.0).map(str::to_owned)
    }
}

/// An optional field: `None` is left out.
#[derive(Clone, Copy)]
pub(crate) struct Opt<K>(pub(crate) K);

impl<K: FieldKind> FieldKind for Opt<K> {
    type Value = Option<K::Value>;

    fn present(&self, v: &Self::Value) -> bool {
        v.is_some()
    }

    fn absent(&self) -> Option<Self::Value> {
        Some(None)
    }

    fn check(&self, v: &Self::Value, codec: Codec) -> Result<(), Why> {
        match v {
            Some(v) => self.0.check(v, codec),
            None => Ok(()),
        }
    }

    fn write<S: Sink>(&self, v: &Self::Value, s: &mut S) {
        if let Some(v) = v {
            self.0.write(v, s);
        }
    }

    fn read(&self, v: Val<'_>, codec: Codec) -> Result<Self::Value, Why> {
        self.0.read(v, codec).map(Some)
    }

    fn compat(&self, v: &Self::Value) -> Self::Value {
        v.as_ref().map(|v| self.0.compat(v))
    }

    fn request_id(&self, v: &Self::Value) -> Option<u32> {
        v.as_ref().and_then(|v| self.0.request_id(v))
    }
}

/// An unsigned integer in `min..=max`, held as `T`.
pub(crate) struct Uint<T> {
    min: u64,
    max: u64,
    _t: PhantomData<fn() -> T>,
}

impl<T> Clone for Uint<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Uint<T> {}

/// An unsigned integer field in the inclusive `range`.
pub(crate) const fn uint<T>(range: (u64, u64)) -> Uint<T> {
    Uint {
        min: range.0,
        max: range.1,
        _t: PhantomData,
    }
}

impl<T> FieldKind for Uint<T>
where
    T: Copy + Into<u64> + TryFrom<u64>,
{
    type Value = T;

    fn check(&self, v: &T, _: Codec) -> Result<(), Why> {
        let n: u64 = (*v).into();
        if n < self.min || n > self.max {
            return Err("out of range");
        }
        Ok(())
    }

    fn write<S: Sink>(&self, v: &T, s: &mut S) {
        s.uint((*v).into());
    }

    fn read(&self, v: Val<'_>, _: Codec) -> Result<T, Why> {
        let n = v.uint()?;
        if n < self.min || n > self.max {
            return Err("out of range");
        }
        T::try_from(n).map_err(|_| "out of range")
    }
}

/// The envelope request id `i` (uint32).
#[derive(Clone, Copy)]
pub(crate) struct RequestId;

impl FieldKind for RequestId {
    type Value = u32;

    fn check(&self, _: &u32, _: Codec) -> Result<(), Why> {
        Ok(())
    }

    fn write<S: Sink>(&self, v: &u32, s: &mut S) {
        s.uint(u64::from(*v));
    }

    fn read(&self, v: Val<'_>, _: Codec) -> Result<u32, Why> {
        u32::try_from(v.uint()?).map_err(|_| "out of range")
    }

    fn request_id(&self, v: &u32) -> Option<u32> {
        Some(*v)
    }
}

/// A 64-bit count that 0.1.x carries as a clamped uint32 (RSS, uptime, file size, mtime).
/// Native peers get the full value; JSON peers get `min(v, 4294967295)`, as 0.1.50 sends.
#[derive(Clone, Copy)]
pub(crate) struct Clamp32;

fn clamp32(v: u64) -> u64 {
    v.min(u64::from(u32::MAX))
}

impl FieldKind for Clamp32 {
    type Value = u64;

    fn check(&self, _: &u64, _: Codec) -> Result<(), Why> {
        Ok(())
    }

    fn write<S: Sink>(&self, v: &u64, s: &mut S) {
        s.uint(if S::CODEC == Codec::Json {
            clamp32(*v)
        } else {
            *v
        });
    }

    fn read(&self, v: Val<'_>, codec: Codec) -> Result<u64, Why> {
        let n = v.uint()?;
        if codec == Codec::Json && n > u64::from(u32::MAX) {
            return Err("out of range");
        }
        Ok(n)
    }

    fn compat(&self, v: &u64) -> u64 {
        clamp32(*v)
    }
}

/// A flag, `0`/`1` in JSON (as 0.1.50 writes them) and a boolean in CBOR.
#[derive(Clone, Copy)]
pub(crate) struct Flag {
    /// Value when the key is absent (`None`: required).
    pub(crate) default: Option<bool>,
    /// Leave the key out when the value equals `default`.
    pub(crate) omit_default: bool,
}

/// A required flag (`o`).
pub(crate) const FLAG: Flag = Flag {
    default: None,
    omit_default: false,
};
/// A flag written only when set, absent meaning unset (`ss`, `A`, `c`...).
pub(crate) const FLAG_IF_SET: Flag = Flag {
    default: Some(false),
    omit_default: true,
};
/// A flag always written, absent meaning unset (`jk.x`, which 0.1.50 always sends).
pub(crate) const FLAG_ALWAYS: Flag = Flag {
    default: Some(false),
    omit_default: false,
};
/// A flag written only when cleared, absent meaning set (`rn.ow`: 0.1.x renames overwrite).
pub(crate) const FLAG_IF_CLEARED: Flag = Flag {
    default: Some(true),
    omit_default: true,
};

impl FieldKind for Flag {
    type Value = bool;

    fn present(&self, v: &bool) -> bool {
        !(self.omit_default && self.default == Some(*v))
    }

    fn absent(&self) -> Option<bool> {
        self.default
    }

    fn check(&self, _: &bool, _: Codec) -> Result<(), Why> {
        Ok(())
    }

    fn write<S: Sink>(&self, v: &bool, s: &mut S) {
        s.flag(*v);
    }

    fn read(&self, v: Val<'_>, _: Codec) -> Result<bool, Why> {
        v.flag()
    }
}

/// An array of at most `max` items of kind `K`.
#[derive(Clone, Copy)]
pub(crate) struct List<K> {
    pub(crate) max: usize,
    pub(crate) item: K,
    /// Leave the key out when the list is empty; absent means empty.
    pub(crate) omit_empty: bool,
}

impl<K: FieldKind> FieldKind for List<K> {
    type Value = Vec<K::Value>;

    fn present(&self, v: &Self::Value) -> bool {
        !(self.omit_empty && v.is_empty())
    }

    fn absent(&self) -> Option<Self::Value> {
        self.omit_empty.then(Vec::new)
    }

    fn check(&self, v: &Self::Value, codec: Codec) -> Result<(), Why> {
        if v.len() > self.max {
            return Err("too many items");
        }
        v.iter().try_for_each(|item| self.item.check(item, codec))
    }

    fn write<S: Sink>(&self, v: &Self::Value, s: &mut S) {
        s.begin_array(v.len());
        for item in v {
            self.item.write(item, s);
        }
        s.end_array();
    }

    fn read(&self, v: Val<'_>, codec: Codec) -> Result<Self::Value, Why> {
        let items = v.array(self.max)?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            out.push(self.item.read(item?, codec)?);
        }
        Ok(out)
    }

    fn compat(&self, v: &Self::Value) -> Self::Value {
        v.iter().map(|item| self.item.compat(item)).collect()
    }
}

/// A `[name, value]` pair (HTTP header, environment variable).
#[derive(Clone, Copy)]
pub(crate) struct PairOf {
    pub(crate) name: TextLimit,
    pub(crate) value: TextLimit,
}

impl FieldKind for PairOf {
    type Value = Pair;

    fn check(&self, v: &Pair, _: Codec) -> Result<(), Why> {
        self.name.check(&v.name)?;
        self.value.check(&v.value)
    }

    fn write<S: Sink>(&self, v: &Pair, s: &mut S) {
        s.begin_array(2);
        s.text(&v.name);
        s.text(&v.value);
        s.end_array();
    }

    fn read(&self, v: Val<'_>, _: Codec) -> Result<Pair, Why> {
        let mut items = v.array(2)?;
        match (items.next(), items.next()) {
            (Some(name), Some(value)) => Ok(Pair {
                name: name?.text(&self.name)?.to_owned(),
                value: value?.text(&self.value)?.to_owned(),
            }),
            _ => Err("expected a [name, value] pair"),
        }
    }
}

/// A directory entry. JSON (0.1.x): `["d", name, 0]` / `["f", name, size, mtime_ms]` with
/// uint32 numbers (0.1.50 clamps, so real millisecond mtimes always read 4294967295). CBOR
/// (native): `[name]` / `[name, size, mtime_ms]`, full 64-bit values, kind told by arity.
#[derive(Clone, Copy)]
pub(crate) struct Entry;

impl FieldKind for Entry {
    type Value = DirEntry;

    fn check(&self, v: &DirEntry, _: Codec) -> Result<(), Why> {
        ENTRY_NAME.check(v.name())
    }

    fn write<S: Sink>(&self, v: &DirEntry, s: &mut S) {
        match (S::CODEC, v) {
            (Codec::Json, DirEntry::Dir { name }) => {
                s.begin_array(3);
                s.text("d");
                s.text(name);
                s.uint(0);
            }
            (
                Codec::Json,
                DirEntry::File {
                    name,
                    size,
                    mtime_ms,
                },
            ) => {
                s.begin_array(4);
                s.text("f");
                s.text(name);
                s.uint(clamp32(*size));
                s.uint(clamp32(*mtime_ms));
            }
            (Codec::Cbor, DirEntry::Dir { name }) => {
                s.begin_array(1);
                s.text(name);
            }
            (
                Codec::Cbor,
                DirEntry::File {
                    name,
                    size,
                    mtime_ms,
                },
            ) => {
                s.begin_array(3);
                s.text(name);
                s.uint(*size);
                s.uint(*mtime_ms);
            }
        }
        s.end_array();
    }

    fn read(&self, v: Val<'_>, codec: Codec) -> Result<DirEntry, Why> {
        match (codec, v) {
            (Codec::Cbor, Val::Cbor(b)) => read_native_entry(b, 0).map(|(entry, _)| entry),
            _ => read_compat_entry(v),
        }
    }

    fn compat(&self, v: &DirEntry) -> DirEntry {
        match v {
            DirEntry::Dir { name } => DirEntry::Dir { name: name.clone() },
            DirEntry::File {
                name,
                size,
                mtime_ms,
            } => DirEntry::File {
                name: name.clone(),
                size: clamp32(*size),
                mtime_ms: clamp32(*mtime_ms),
            },
        }
    }
}

/// `["d", name, n]` or `["f", name, size, mtime]`, numbers within uint32.
fn read_compat_entry(v: Val<'_>) -> Result<DirEntry, Why> {
    let mut items = v.array(4)?;
    let mut next = || items.next().ok_or("entry too short").and_then(|r| r);
    let kind = next()?.text(&TextLimit::new(1, 1))?;
    let name = next()?.text(&ENTRY_NAME)?.to_owned();
    let mut u32_item = || {
        let n = next()?.uint()?;
        if n > u64::from(u32::MAX) {
            return Err("out of range");
        }
        Ok(n)
    };
    let entry = match kind {
        "d" => {
            u32_item()?;
            DirEntry::Dir { name }
        }
        "f" => DirEntry::File {
            name,
            size: u32_item()?,
            mtime_ms: u32_item()?,
        },
        _ => return Err("entry kind must be \"d\" or \"f\""),
    };
    if items.len() != 0 {
        return Err("entry too long");
    }
    Ok(entry)
}

/// `[name]` or `[name, size, mtime_ms]` at `pos`, read in one pass; returns the entry and the
/// offset after it.
fn read_native_entry(b: &[u8], pos: usize) -> Result<(DirEntry, usize), Why> {
    let head = |pos| cbor::head(b, pos).map_err(|_| "malformed");
    let tuple = head(pos)?;
    if tuple.major != cbor::ARRAY {
        return Err("expected an array");
    }
    let name = head(tuple.next)?;
    if name.major != cbor::TEXT {
        return Err("expected a string");
    }
    if name.arg > ENTRY_NAME.max_utf8_bytes() as u64 {
        return Err("too long");
    }
    let name_end = name.next + name.arg as usize;
    let text = b.get(name.next..name_end).ok_or("malformed")?;
    let text = std::str::from_utf8(text).map_err(|_| "invalid UTF-8")?;
    ENTRY_NAME.check(text)?;
    let name = text.to_owned();
    match tuple.arg {
        1 => Ok((DirEntry::Dir { name }, name_end)),
        3 => {
            let size = head(name_end)?;
            let mtime = head(size.next)?;
            if size.major != cbor::UINT || mtime.major != cbor::UINT {
                return Err("expected an unsigned integer");
            }
            let entry = DirEntry::File {
                name,
                size: size.arg,
                mtime_ms: mtime.arg,
            };
            Ok((entry, mtime.next))
        }
        _ => Err("entry must have 1 or 3 items"),
    }
}

/// `ds.e`: at most `max` directory entries. Listings are the largest structured frames, so in
/// CBOR the entries are read in a single pass over the array (each tuple read straight through)
/// rather than item by item.
#[derive(Clone, Copy)]
pub(crate) struct EntryList {
    pub(crate) max: usize,
}

impl EntryList {
    fn generic(self) -> List<Entry> {
        List {
            max: self.max,
            item: Entry,
            omit_empty: false,
        }
    }
}

impl FieldKind for EntryList {
    type Value = Vec<DirEntry>;

    fn check(&self, v: &Vec<DirEntry>, codec: Codec) -> Result<(), Why> {
        self.generic().check(v, codec)
    }

    fn write<S: Sink>(&self, v: &Vec<DirEntry>, s: &mut S) {
        self.generic().write(v, s);
    }

    fn read(&self, v: Val<'_>, codec: Codec) -> Result<Vec<DirEntry>, Why> {
        let (Codec::Cbor, Val::Cbor(b)) = (codec, v) else {
            return self.generic().read(v, codec);
        };
        let list = cbor::head(b, 0).map_err(|_| "malformed")?;
        if list.major != cbor::ARRAY {
            return Err("expected an array");
        }
        if list.arg > self.max as u64 {
            return Err("too many items");
        }
        let mut out = Vec::with_capacity(list.arg as usize);
        let mut pos = list.next;
        for _ in 0..list.arg {
            let (entry, end) = read_native_entry(b, pos)?;
            out.push(entry);
            pos = end;
        }
        Ok(out)
    }

    fn compat(&self, v: &Vec<DirEntry>) -> Vec<DirEntry> {
        self.generic().compat(v)
    }
}

/// Binary data: base64 text in JSON (standard alphabet, padded), a byte string in CBOR.
#[derive(Clone, Copy)]
pub(crate) struct Bytes {
    /// Longest base64 text accepted in JSON.
    pub(crate) max_base64: usize,
    /// Most bytes once decoded.
    pub(crate) max_bytes: usize,
    /// Absent means empty (and the key is still always written).
    pub(crate) absent_empty: bool,
}

impl FieldKind for Bytes {
    type Value = Vec<u8>;

    fn absent(&self) -> Option<Vec<u8>> {
        self.absent_empty.then(Vec::new)
    }

    fn check(&self, v: &Vec<u8>, codec: Codec) -> Result<(), Why> {
        if v.len() > self.max_bytes {
            return Err("too long");
        }
        if codec == Codec::Json && v.len().div_ceil(3) * 4 > self.max_base64 {
            return Err("too long");
        }
        Ok(())
    }

    fn write<S: Sink>(&self, v: &Vec<u8>, s: &mut S) {
        s.bytes(v);
    }

    fn read(&self, v: Val<'_>, _: Codec) -> Result<Vec<u8>, Why> {
        v.bytes(self.max_base64, self.max_bytes)
    }
}

/// A closed set of text values (phase, policy mode, git action...).
pub(crate) trait WireEnum: Sized + Copy + 'static {
    /// Every value, for parsing.
    const ALL: &'static [Self];
    /// The wire spelling.
    fn as_str(self) -> &'static str;
}

/// A field holding one value of `E`.
pub(crate) struct Enum<E>(PhantomData<fn() -> E>);

impl<E> Clone for Enum<E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E> Copy for Enum<E> {}

/// A field holding one value of the enum `E`.
pub(crate) const fn enumeration<E>() -> Enum<E> {
    Enum(PhantomData)
}

impl<E: WireEnum> FieldKind for Enum<E> {
    type Value = E;

    fn check(&self, _: &E, _: Codec) -> Result<(), Why> {
        Ok(())
    }

    fn write<S: Sink>(&self, v: &E, s: &mut S) {
        s.text(v.as_str());
    }

    fn read(&self, v: Val<'_>, _: Codec) -> Result<E, Why> {
        let s = v.text(&TextLimit::new(1, 32))?;
        E::ALL
            .iter()
            .copied()
            .find(|e| e.as_str() == s)
            .ok_or("unknown value")
    }
}

/// The `c` of an `e` frame. JSON accepts only the eight v=1 codes (0.1.50 drops anything else,
/// so we could never send it back); CBOR keeps unknown codes as [`ErrorCode::Other`].
#[derive(Clone, Copy)]
pub(crate) struct Code;

impl FieldKind for Code {
    type Value = ErrorCode;

    fn check(&self, v: &ErrorCode, codec: Codec) -> Result<(), Why> {
        match v {
            ErrorCode::Other(_) if codec == Codec::Json => Err("code unknown to 0.1.x peers"),
            ErrorCode::Other(s) if ErrorCode::from_known(s).is_some() => {
                Err("known code spelled as Other")
            }
            ErrorCode::Other(s) => limits::ERROR_CODE.check(s),
            _ => Ok(()),
        }
    }

    fn write<S: Sink>(&self, v: &ErrorCode, s: &mut S) {
        s.text(v.as_str());
    }

    fn read(&self, v: Val<'_>, codec: Codec) -> Result<ErrorCode, Why> {
        let s = v.text(&limits::ERROR_CODE)?;
        match codec {
            Codec::Json => ErrorCode::from_known(s).ok_or("unknown error code"),
            Codec::Cbor => Ok(ErrorCode::from_str(s)),
        }
    }
}

/// A nested record declared with [`wire_object!`] (`si.j`).
pub(crate) struct Object<T>(PhantomData<fn() -> T>);

impl<T> Clone for Object<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Object<T> {}

/// A field holding a nested record of type `T`.
pub(crate) const fn object<T>() -> Object<T> {
    Object(PhantomData)
}

impl<T: WireObject> FieldKind for Object<T> {
    type Value = T;

    fn check(&self, v: &T, codec: Codec) -> Result<(), Why> {
        v.check_fields("", codec).map_err(|e| match e {
            EncodeError::Limit { why, .. } => why,
            _ => "invalid",
        })
    }

    fn write<S: Sink>(&self, v: &T, s: &mut S) {
        s.begin_object(v.field_count(S::CODEC));
        v.write_fields(s);
        s.end_object();
    }

    fn read(&self, v: Val<'_>, codec: Codec) -> Result<T, Why> {
        let entries = v
            .object(MAX_MESSAGE_KEYS)?
            .collect::<Result<Vec<_>, Why>>()?;
        let fields = Fields::new("", codec, entries).map_err(|_| "duplicate key")?;
        T::read_fields(&fields).map_err(|e| match e {
            DecodeError::BadField { why, .. } => why,
            DecodeError::MissingField { .. } => "missing a required key",
            _ => "malformed",
        })
    }

    fn compat(&self, v: &T) -> T {
        v.to_compat()
    }
}

/// A free-form JSON object (`cc.cfg`): a CBOR map in native mode.
#[derive(Clone, Copy)]
pub(crate) struct JsonObject;

/// Counts the values of `v`, which sits at `depth`; scalars may sit at `max_depth`, arrays and
/// objects one level above (the decoders refuse a container at the deepest level even if empty).
fn shape(v: &Value, depth: usize, max_depth: usize, count: &mut usize) -> Result<(), Why> {
    let container = v.is_array() || v.is_object();
    if depth > max_depth || (container && depth == max_depth) {
        return Err("nested too deeply");
    }
    *count += 1;
    match v {
        Value::Array(items) => items
            .iter()
            .try_for_each(|item| shape(item, depth + 1, max_depth, count)),
        Value::Object(map) => map
            .values()
            .try_for_each(|item| shape(item, depth + 1, max_depth, count)),
        _ => Ok(()),
    }
}

impl FieldKind for JsonObject {
    type Value = Value;

    fn check(&self, v: &Value, _: Codec) -> Result<(), Why> {
        if !v.is_object() {
            return Err("expected an object");
        }
        let mut count = 0;
        // The payload sits one level below the frame object.
        shape(v, 1, MAX_DEPTH - 1, &mut count)?;
        if count > MAX_FREE_FORM_VALUES {
            return Err("too many values");
        }
        Ok(())
    }

    fn write<S: Sink>(&self, v: &Value, s: &mut S) {
        s.json(v);
    }

    fn read(&self, v: Val<'_>, _: Codec) -> Result<Value, Why> {
        v.object(MAX_FREE_FORM_VALUES)?;
        let mut budget = MAX_FREE_FORM_VALUES;
        v.to_json(&mut budget)
    }
}

// ---------------------------------------------------------------------------------------------
// The declaration macro
// ---------------------------------------------------------------------------------------------

/// Declares a wire record: the struct and its [`WireObject`] impl.
///
/// ```text
/// wire_object! {
///     /// doc
///     pub struct Name {
///         /// doc
///         pub field: Type = "key" => KIND,          // first field
///         const "k" = "cfg",                         // optional fixed key after the first
///         pub other: Type = "o" => KIND; native,     // `; native`: CBOR only
///     }
/// }
/// ```
macro_rules! wire_object {
    (@native) => { false };
    (@native native) => { true };
    (
        $(#[$meta:meta])*
        pub struct $name:ident {
            $(#[$fmeta0:meta])*
            pub $f0:ident : $t0:ty = $k0:literal => $kind0:expr $(; $n0:ident)? ,
            $( const $ck:literal = $cv:literal , )?
            $(
                $(#[$fmeta:meta])*
                pub $f:ident : $t:ty = $k:literal => $kind:expr $(; $n:ident)? ,
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            $(#[$fmeta0])*
            pub $f0: $t0,
            $(
                $(#[$fmeta])*
                pub $f: $t,
            )*
        }

        impl $crate::codec::field::WireObject for $name {
            fn field_count(&self, codec: $crate::codec::Codec) -> usize {
                use $crate::codec::field::is_written;
                #[allow(unused_mut)]
                let mut n = usize::from(is_written(
                    &$kind0,
                    $crate::codec::field::wire_object!(@native $($n0)?),
                    codec,
                    &self.$f0,
                ));
                $( n += { let _ = ($ck, $cv); 1 }; )?
                $(
                    n += usize::from(is_written(
                        &$kind,
                        $crate::codec::field::wire_object!(@native $($n)?),
                        codec,
                        &self.$f,
                    ));
                )*
                n
            }

            fn check_fields(
                &self,
                t: &'static str,
                codec: $crate::codec::Codec,
            ) -> Result<(), $crate::error::EncodeError> {
                use $crate::codec::field::check;
                check(&$kind0, $crate::codec::field::wire_object!(@native $($n0)?), t, $k0, codec, &self.$f0)?;
                $(
                    check(&$kind, $crate::codec::field::wire_object!(@native $($n)?), t, $k, codec, &self.$f)?;
                )*
                Ok(())
            }

            fn write_fields<S: $crate::codec::Sink>(&self, s: &mut S) {
                use $crate::codec::field::write;
                write(&$kind0, $crate::codec::field::wire_object!(@native $($n0)?), $k0, &self.$f0, s);
                $( s.key($ck); s.text($cv); )?
                $(
                    write(&$kind, $crate::codec::field::wire_object!(@native $($n)?), $k, &self.$f, s);
                )*
            }

            fn read_fields(
                f: &$crate::codec::field::Fields<'_>,
            ) -> Result<Self, $crate::error::DecodeError> {
                $( f.expect_const($ck, $cv)?; )?
                Ok($name {
                    $f0: f.read($k0, &$kind0, $crate::codec::field::wire_object!(@native $($n0)?))?,
                    $(
                        $f: f.read($k, &$kind, $crate::codec::field::wire_object!(@native $($n)?))?,
                    )*
                })
            }

            fn to_compat(&self) -> Self {
                use $crate::codec::field::compat;
                $name {
                    $f0: compat(&$kind0, $crate::codec::field::wire_object!(@native $($n0)?), &self.$f0),
                    $(
                        $f: compat(&$kind, $crate::codec::field::wire_object!(@native $($n)?), &self.$f),
                    )*
                }
            }

            fn request_id(&self) -> Option<u32> {
                use $crate::codec::field::FieldKind as _;
                if let Some(id) = $kind0.request_id(&self.$f0) {
                    return Some(id);
                }
                $(
                    if let Some(id) = $kind.request_id(&self.$f) {
                        return Some(id);
                    }
                )*
                None
            }
        }
    };
}

pub(crate) use wire_object;
