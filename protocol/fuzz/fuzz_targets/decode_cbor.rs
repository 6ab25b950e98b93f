//! Arbitrary bytes → CBOR (native) decoder. Nothing may panic; whatever decodes must re-encode,
//! decode again to the same message, and — when it has a JSON form — reach a JSON peer as
//! `to_compat()`.

#![no_main]

use codemantle_protocol::codec::{Codec, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = decode(data, Codec::Cbor) else {
        return;
    };
    let cbor = encode(&msg, Codec::Cbor).expect("a CBOR-decoded message re-encodes");
    assert_eq!(decode(&cbor, Codec::Cbor).as_ref(), Ok(&msg), "CBOR round trip");
    if let Ok(text) = encode(&msg, Codec::Json) {
        assert_eq!(
            decode(&text, Codec::Json),
            Ok(msg.to_compat()),
            "JSON sees the compat view"
        );
    }
});
