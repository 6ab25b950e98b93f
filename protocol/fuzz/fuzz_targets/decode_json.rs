//! Arbitrary bytes → JSON (compat) decoder. Nothing may panic, and whatever decodes must
//! re-encode (a JSON-decoded message is always sendable back as JSON), decode again to the same
//! message, and survive the CBOR codec unchanged.

#![no_main]

use codemantle_protocol::codec::{Codec, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = decode(data, Codec::Json) else {
        return;
    };
    let text = encode(&msg, Codec::Json).expect("a JSON-decoded message re-encodes as JSON");
    assert_eq!(decode(&text, Codec::Json).as_ref(), Ok(&msg), "JSON round trip");
    assert_eq!(
        encode(&msg, Codec::Json).as_deref(),
        Ok(&text[..]),
        "JSON encoding is deterministic"
    );
    let cbor = encode(&msg, Codec::Cbor).expect("a JSON-decoded message encodes as CBOR");
    assert_eq!(decode(&cbor, Codec::Cbor).as_ref(), Ok(&msg), "CBOR round trip");
});
