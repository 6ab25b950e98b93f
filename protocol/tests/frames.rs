//! The 38 frames captured between a real 0.1.50 daemon and control plane
//! (`shared/protocol/vectors.json`): each must decode, re-encode to the identical JSON text,
//! and survive a trip through CBOR unchanged.

use codemantle_protocol::codec::{Codec, decode, encode};
use codemantle_protocol::message::Message;

const VECTORS: &str = include_str!("data/vectors.json");

fn captured() -> Vec<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(VECTORS).expect("vectors.json parses");
    v["frames"]
        .as_array()
        .expect("frames array")
        .iter()
        .map(|f| {
            (
                f["dir"].as_str().expect("dir").to_owned(),
                f["json"].as_str().expect("json").to_owned(),
            )
        })
        .collect()
}

#[test]
fn there_are_38_frames() {
    assert_eq!(captured().len(), 38);
}

#[test]
fn captured_frames_reencode_byte_identical() {
    for (dir, json) in captured() {
        let msg =
            decode(json.as_bytes(), Codec::Json).unwrap_or_else(|e| panic!("{dir}: {json}: {e}"));
        assert!(
            !matches!(msg, Message::Unknown { .. }),
            "{json} decoded as unknown"
        );
        let again = encode(&msg, Codec::Json).unwrap_or_else(|e| panic!("{json}: {e}"));
        assert_eq!(String::from_utf8(again).expect("utf-8"), json, "{dir}");
    }
}

#[test]
fn captured_frames_survive_cbor() {
    for (_, json) in captured() {
        let msg = decode(json.as_bytes(), Codec::Json).expect("decodes");
        let cbor = encode(&msg, Codec::Cbor).expect("encodes as CBOR");
        assert_eq!(
            decode(&cbor, Codec::Cbor).expect("CBOR decodes"),
            msg,
            "{json}"
        );
        assert!(cbor.len() < json.len(), "CBOR not smaller for {json}");
    }
}

#[test]
fn captured_frames_have_the_expected_kinds() {
    let kinds: Vec<&'static str> = captured()
        .iter()
        .map(|(_, json)| {
            let msg = decode(json.as_bytes(), Codec::Json).expect("decodes");
            msg.kind().tag().expect("known")
        })
        .collect();
    assert_eq!(&kinds[..5], ["h1", "h2", "p", "dr", "ds"]);
}
