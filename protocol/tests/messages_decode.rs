//! Decoding rules: each broken rule gives its own typed error; extensions are tolerated.

use codemantle_protocol::codec::{Codec, decode, encode};
use codemantle_protocol::error::{DecodeError, ErrorCode};
use codemantle_protocol::limits;
use codemantle_protocol::message::*;
use minicbor::Encoder;

fn json(text: &str) -> Result<Message, DecodeError> {
    decode(text.as_bytes(), Codec::Json)
}

/// Writes one CBOR value.
type Writer<'a> = &'a dyn Fn(&mut Encoder<&mut Vec<u8>>);

/// Builds a CBOR map frame from `(key, writer)` pairs.
fn cbor_map(entries: &[(&str, Writer<'_>)]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut e = Encoder::new(&mut buf);
    e.map(entries.len() as u64).expect("vec");
    for (k, w) in entries {
        e.str(k).expect("vec");
        w(&mut e);
    }
    buf
}

fn dir_list() -> Message {
    Message::DirList(DirList {
        request_id: 7,
        root: "cwd".into(),
        path: "src".into(),
        limit: 50,
        cursor: None,
    })
}

#[test]
fn truncated_cbor_is_truncated() {
    let frame = encode(&dir_list(), Codec::Cbor).expect("encodes");
    for cut in 0..frame.len() {
        assert_eq!(
            decode(&frame[..cut], Codec::Cbor),
            Err(DecodeError::Truncated),
            "cut at {cut}"
        );
    }
}

#[test]
fn truncated_json_is_truncated() {
    let frame = encode(&dir_list(), Codec::Json).expect("encodes");
    for cut in [1, 5, frame.len() - 1] {
        assert_eq!(
            decode(&frame[..cut], Codec::Json),
            Err(DecodeError::Truncated)
        );
    }
}

#[test]
fn oversize_frames_are_refused_before_parsing() {
    let big = vec![b' '; limits::MAX_JSON_FRAME_BYTES + 1];
    assert_eq!(
        decode(&big, Codec::Json),
        Err(DecodeError::FrameTooLarge {
            len: limits::MAX_JSON_FRAME_BYTES + 1,
            max: limits::MAX_JSON_FRAME_BYTES
        })
    );
    let big = vec![0u8; limits::MAX_CBOR_FRAME_BYTES + 1];
    assert!(matches!(
        decode(&big, Codec::Cbor),
        Err(DecodeError::FrameTooLarge { .. })
    ));
}

#[test]
fn garbage_is_a_typed_error() {
    assert!(matches!(json("{nope"), Err(DecodeError::Json(_))));
    assert!(matches!(
        decode(&[0xff, 0x00, 0x13], Codec::Json),
        Err(DecodeError::Json(_))
    ));
    assert_eq!(json("[1,2]"), Err(DecodeError::NotAnObject));
    assert_eq!(json("\"x\""), Err(DecodeError::NotAnObject));
    assert_eq!(json("{} {}"), Err(DecodeError::TrailingBytes));
    assert_eq!(decode(&[0x01], Codec::Cbor), Err(DecodeError::NotAnObject));
    assert!(matches!(
        decode(&[0xbf, 0xff], Codec::Cbor),
        Err(DecodeError::Cbor(_))
    ));
    assert!(matches!(
        decode(&[0xc0, 0x00], Codec::Cbor),
        Err(DecodeError::NotAnObject)
    ));
    assert_eq!(decode(&[], Codec::Cbor), Err(DecodeError::Truncated));
    assert_eq!(decode(&[], Codec::Json), Err(DecodeError::Truncated));
    let mut frame = encode(&dir_list(), Codec::Cbor).expect("encodes");
    frame.push(0);
    assert_eq!(decode(&frame, Codec::Cbor), Err(DecodeError::TrailingBytes));
}

#[test]
fn envelope_rules() {
    assert_eq!(json(r#"{"t":"dr"}"#), Err(DecodeError::BadVersion));
    assert_eq!(
        json(r#"{"v":"1","t":"sq","i":1,"p":""}"#),
        Err(DecodeError::BadVersion)
    );
    assert_eq!(
        json(r#"{"v":-1,"t":"sq","i":1,"p":""}"#),
        Err(DecodeError::BadVersion)
    );
    assert_eq!(json(r#"{"v":1}"#), Err(DecodeError::BadType));
    assert_eq!(json(r#"{"v":1,"t":5}"#), Err(DecodeError::BadType));
    assert_eq!(json(r#"{"v":1,"t":""}"#), Err(DecodeError::BadType));
    assert_eq!(
        json(r#"{"v":1,"t":"0123456789abcdefX"}"#),
        Err(DecodeError::BadType)
    );
    assert_eq!(
        json(r#"{"v":2,"t":"sq","i":1,"p":""}"#),
        Err(DecodeError::UnsupportedVersion {
            t: "sq".into(),
            v: 2
        })
    );
    // 0.1.50 treats 1.0 as the integer 1.
    assert!(json(r#"{"v":1.0,"t":"sq","i":4,"p":"x"}"#).is_ok());
}

#[test]
fn hello_with_another_version_is_kept_for_update_required() {
    for codec in [Codec::Json, Codec::Cbor] {
        let msg = Message::HelloUnsupported(UnsupportedHello { version: 2 });
        let frame = encode(&msg, codec).expect("encodes");
        assert_eq!(decode(&frame, codec), Ok(msg.clone()));
    }
    // Whatever else an h1 of another version carries is not looked at.
    assert_eq!(
        json(r#"{"v":0,"t":"h1","d":5,"zz":[1,2]}"#),
        Ok(Message::HelloUnsupported(UnsupportedHello { version: 0 }))
    );
    assert_eq!(
        String::from_utf8(
            encode(
                &Message::HelloUnsupported(UnsupportedHello { version: 2 }),
                Codec::Json
            )
            .expect("encodes")
        )
        .expect("utf-8"),
        r#"{"v":2,"t":"h1"}"#
    );
}

#[test]
fn unknown_type_decodes_to_unknown_in_both_codecs() {
    assert_eq!(
        json(r#"{"v":1,"t":"zz","i":9,"whatever":{"a":[1]}}"#),
        Ok(Message::Unknown {
            t: "zz".into(),
            request_id: Some(9)
        })
    );
    assert_eq!(
        json(r#"{"v":1,"t":"zz","i":-3}"#),
        Ok(Message::Unknown {
            t: "zz".into(),
            request_id: None
        })
    );
    let frame = cbor_map(&[
        ("v", &|e| {
            e.u8(1).expect("vec");
        }),
        ("t", &|e| {
            e.str("xq").expect("vec");
        }),
        ("i", &|e| {
            e.u32(44).expect("vec");
        }),
    ]);
    let msg = decode(&frame, Codec::Cbor).expect("decodes");
    assert_eq!(
        msg,
        Message::Unknown {
            t: "xq".into(),
            request_id: Some(44)
        }
    );
    assert_eq!(msg.type_tag(), "xq");
    assert_eq!(msg.request_id(), Some(44));
    assert_eq!(encode(&msg, Codec::Cbor).expect("encodes"), frame);
}

#[test]
fn unknown_keys_are_ignored_in_native_cbor() {
    let frame = cbor_map(&[
        ("v", &|e| {
            e.u8(1).expect("vec");
        }),
        ("t", &|e| {
            e.str("sq").expect("vec");
        }),
        ("future", &|e| {
            e.array(2).expect("vec").map(1).expect("vec");
            e.str("x").expect("vec").bytes(b"\x00\x01").expect("vec");
            e.f32(1.5).expect("vec");
        }),
        ("i", &|e| {
            e.u8(4).expect("vec");
        }),
        ("p", &|e| {
            e.str("proj-a").expect("vec");
        }),
    ]);
    assert_eq!(
        decode(&frame, Codec::Cbor),
        Ok(Message::SessionStatusQuery(SessionStatusQuery {
            request_id: 4,
            folder: "proj-a".into()
        }))
    );
}

#[test]
fn unknown_keys_are_ignored_in_json_too() {
    assert_eq!(
        json(r#"{"v":1,"t":"sq","i":4,"p":"proj-a","zz":{"deep":[null,true,1.5]}}"#),
        Ok(Message::SessionStatusQuery(SessionStatusQuery {
            request_id: 4,
            folder: "proj-a".into()
        }))
    );
}

#[test]
fn native_only_keys_are_ignored_in_json_and_never_written() {
    let rd = json(r#"{"v":1,"t":"rd","i":1,"r":"cwd","p":"x","rc":1}"#).expect("decodes");
    let Message::RemoveDir(ref r) = rd else {
        panic!("not rd: {rd:?}")
    };
    assert!(!r.recursive);
    let rn = json(r#"{"v":1,"t":"rn","i":1,"r":"cwd","s":"a","d":"b","ow":0}"#).expect("decodes");
    let Message::Rename(ref r) = rn else {
        panic!("not rn")
    };
    assert!(r.overwrite, "0.1.x renames replace the destination");

    let native = Message::RemoveDir(RemoveDir {
        idempotency_key: None,
        request_id: 1,
        root: "cwd".into(),
        path: "x".into(),
        recursive: true,
    });
    let text = encode(&native, Codec::Json).expect("encodes");
    assert_eq!(text, br#"{"v":1,"t":"rd","i":1,"r":"cwd","p":"x"}"#);
    let cbor = encode(&native, Codec::Cbor).expect("encodes");
    assert_eq!(decode(&cbor, Codec::Cbor), Ok(native.clone()));
    assert_ne!(native.to_compat(), native);

    let keep = Message::Rename(Rename {
        idempotency_key: None,
        request_id: 2,
        root: "cwd".into(),
        source: "a".into(),
        dest: "b".into(),
        overwrite: false,
    });
    assert_eq!(
        decode(&encode(&keep, Codec::Cbor).expect("encodes"), Codec::Cbor),
        Ok(keep.clone())
    );
    assert_eq!(
        encode(&keep, Codec::Json).expect("encodes"),
        br#"{"v":1,"t":"rn","i":2,"r":"cwd","s":"a","d":"b"}"#
    );
}

#[test]
fn field_errors_name_type_and_key() {
    assert_eq!(
        json(r#"{"v":1,"t":"dr","i":1,"r":"cwd","p":""}"#),
        Err(DecodeError::MissingField { t: "dr", key: "l" })
    );
    assert_eq!(
        json(r#"{"v":1,"t":"dr","i":1,"r":"cwd","p":"","l":0}"#),
        Err(DecodeError::BadField {
            t: "dr",
            key: "l",
            why: "out of range"
        })
    );
    assert!(json(r#"{"v":1,"t":"dr","i":1,"r":"cwd","p":"","l":256}"#).is_ok());
    assert!(matches!(
        json(r#"{"v":1,"t":"dr","i":1,"r":"cwd","p":"","l":257}"#),
        Err(DecodeError::BadField { key: "l", .. })
    ));
    assert!(matches!(
        json(r#"{"v":1,"t":"dr","i":4294967296,"r":"cwd","p":"","l":5}"#),
        Err(DecodeError::BadField { key: "i", .. })
    ));
    assert!(matches!(
        json(r#"{"v":1,"t":"dr","i":1,"r":"c/d","p":"","l":5}"#),
        Err(DecodeError::BadField {
            key: "r",
            why: "character not allowed",
            ..
        })
    ));
    assert!(matches!(
        json(r#"{"v":1,"t":"sr","i":1,"s":"ses","o":2}"#),
        Err(DecodeError::BadField { key: "o", .. })
    ));
    // null counts as present and invalid, as in 0.1.50.
    assert!(matches!(
        json(r#"{"v":1,"t":"sr","i":1,"s":"ses","o":1,"m":null}"#),
        Err(DecodeError::BadField { key: "m", .. })
    ));
    assert_eq!(
        json(r#"{"v":1,"t":"sq","i":1,"p":"a","p":"b"}"#),
        Err(DecodeError::DuplicateKey { key: "p".into() })
    );
}

#[test]
fn length_limits_count_utf16_units() {
    let ok = format!(r#"{{"v":1,"t":"sq","i":1,"p":"{}"}}"#, "é".repeat(512));
    assert!(json(&ok).is_ok(), "512 units of 2-byte text are fine");
    let too_long = format!(r#"{{"v":1,"t":"sq","i":1,"p":"{}"}}"#, "é".repeat(513));
    assert!(matches!(
        json(&too_long),
        Err(DecodeError::BadField {
            key: "p",
            why: "too long",
            ..
        })
    ));
    let chunk = |n: usize| {
        format!(
            r#"{{"v":1,"t":"sc","x":"stream-01","q":0,"e":1,"d":"{}"}}"#,
            "a".repeat(n)
        )
    };
    assert!(json(&chunk(8192)).is_ok());
    assert!(matches!(
        json(&chunk(8193)),
        Err(DecodeError::BadField { key: "d", .. })
    ));
}

#[test]
fn cbor_declared_lengths_are_checked_before_reading() {
    // `p` declares 1 MiB of text: refused as too long from the header alone.
    let mut frame = cbor_map(&[
        ("v", &|e| {
            e.u8(1).expect("vec");
        }),
        ("t", &|e| {
            e.str("sq").expect("vec");
        }),
        ("i", &|e| {
            e.u8(1).expect("vec");
        }),
        ("p", &|e| {
            e.str_len(1 << 20).expect("vec");
        }),
    ]);
    frame.extend(std::iter::repeat_n(b'a', 1 << 20));
    assert_eq!(
        decode(&frame, Codec::Cbor),
        Err(DecodeError::BadField {
            t: "sq",
            key: "p",
            why: "too long"
        })
    );
    // `e` declares 257 entries.
    let mut frame = cbor_map(&[
        ("v", &|e| {
            e.u8(1).expect("vec");
        }),
        ("t", &|e| {
            e.str("ds").expect("vec");
        }),
        ("i", &|e| {
            e.u8(1).expect("vec");
        }),
        ("e", &|e| {
            e.array(257).expect("vec");
        }),
    ]);
    for _ in 0..257 {
        frame.extend([0x81, 0x61, b'x']);
    }
    assert_eq!(
        decode(&frame, Codec::Cbor),
        Err(DecodeError::BadField {
            t: "ds",
            key: "e",
            why: "too many items"
        })
    );
    // A count far beyond the input is a lie, caught by the scan.
    let frame = cbor_map(&[
        ("v", &|e| {
            e.u8(1).expect("vec");
        }),
        ("t", &|e| {
            e.str("ds").expect("vec");
        }),
        ("e", &|e| {
            e.array(u64::MAX).expect("vec");
        }),
    ]);
    assert_eq!(decode(&frame, Codec::Cbor), Err(DecodeError::Truncated));
    // Too many keys in the frame map.
    let mut frame = vec![0xb8, 200];
    frame.extend(std::iter::repeat_n([0x61, b'k', 0x00], 200).flatten());
    assert_eq!(
        decode(&frame, Codec::Cbor),
        Err(DecodeError::TooManyKeys {
            max: limits::MAX_MESSAGE_KEYS
        })
    );
}

#[test]
fn flags_accept_bools_and_integers() {
    let a = json(r#"{"v":1,"t":"sr","i":1,"s":"ses","o":true}"#).expect("bool");
    let b = json(r#"{"v":1,"t":"sr","i":1,"s":"ses","o":1}"#).expect("int");
    assert_eq!(a, b);
    let frame = cbor_map(&[
        ("v", &|e| {
            e.u8(1).expect("vec");
        }),
        ("t", &|e| {
            e.str("sr").expect("vec");
        }),
        ("i", &|e| {
            e.u8(1).expect("vec");
        }),
        ("s", &|e| {
            e.str("ses").expect("vec");
        }),
        ("o", &|e| {
            e.u8(1).expect("vec");
        }),
    ]);
    assert_eq!(decode(&frame, Codec::Cbor), Ok(a));
}

#[test]
fn cv_shapes_are_told_apart_by_k() {
    let setup =
        json(r#"{"v":1,"t":"cv","i":3,"o":1,"m":"saved_restart_required"}"#).expect("setup cv");
    assert_eq!(setup.kind(), MessageKind::SetupSaveResult);
    let setup_k = json(r#"{"v":1,"t":"cv","i":3,"k":"setup","o":1}"#).expect("setup cv");
    assert_eq!(setup_k.kind(), MessageKind::SetupSaveResult);
    let cfg = json(
        r#"{"v":1,"t":"cv","i":3,"k":"cfg","ph":"runtime","sc":"full","o":1,"tid":"build-box","tv":"1.0.0","st":"applied","pd":"ONZXJwtnH6lGkd_7abKdBsdsWYlcMfaZphV0Rm0NsvA","at":1700000000000,"ap":".opencode/opencode.json","pm":"off","m":"config_applied"}"#,
    )
    .expect("cfg cv");
    assert_eq!(cfg.kind(), MessageKind::ConfigResult);
    assert_eq!(cfg.type_tag(), "cv");
    assert!(matches!(
        json(r#"{"v":1,"t":"cv","i":3,"k":"other","o":1}"#),
        Err(DecodeError::BadField {
            t: "cv",
            key: "k",
            ..
        })
    ));
}

#[test]
fn directory_entries_both_shapes() {
    let text = r#"{"v":1,"t":"ds","i":1,"e":[["d","proj-a",0],["f","a.txt",3,4294967295]]}"#;
    let msg = json(text).expect("decodes");
    let Message::DirListing(ref listing) = msg else {
        panic!("not ds")
    };
    assert_eq!(
        listing.entries,
        vec![
            DirEntry::Dir {
                name: "proj-a".into()
            },
            DirEntry::File {
                name: "a.txt".into(),
                size: 3,
                mtime_ms: 4_294_967_295
            }
        ]
    );
    assert!(matches!(
        json(r#"{"v":1,"t":"ds","i":1,"e":[["x","a",0]]}"#),
        Err(DecodeError::BadField { key: "e", .. })
    ));
    assert!(matches!(
        json(r#"{"v":1,"t":"ds","i":1,"e":[["f","a",1]]}"#),
        Err(DecodeError::BadField { key: "e", .. })
    ));
    assert!(matches!(
        json(r#"{"v":1,"t":"ds","i":1,"e":[["f","a",1,4294967296]]}"#),
        Err(DecodeError::BadField { key: "e", .. })
    ));
    // Native mtimes keep their milliseconds; JSON clamps them as 0.1.50 does.
    let native = Message::DirListing(DirListing {
        request_id: 1,
        cursor: Some("next".into()),
        entries: vec![DirEntry::File {
            name: "big.bin".into(),
            size: 5 << 32,
            mtime_ms: 1_732_000_000_123,
        }],
    });
    let cbor = encode(&native, Codec::Cbor).expect("encodes");
    assert_eq!(decode(&cbor, Codec::Cbor), Ok(native.clone()));
    assert_eq!(
        encode(&native, Codec::Json).expect("encodes"),
        br#"{"v":1,"t":"ds","i":1,"k":"next","e":[["f","big.bin",4294967295,4294967295]]}"#
    );
}

#[test]
fn free_form_config_nesting_is_bounded() {
    let nest = |levels: usize| {
        let mut v = serde_json::json!(1);
        for _ in 0..levels {
            v = serde_json::json!({ "a": v });
        }
        v
    };
    let push = |cfg: serde_json::Value| {
        Message::ConfigPush(ConfigPush {
            idempotency_key: None,
            request_id: 1,
            phase: None,
            scope: None,
            template_id: "build-box".into(),
            template_version: "1.0.0".into(),
            timestamp_ms: 0,
            apply_path: ".opencode/opencode.json".into(),
            digest: "ONZXJwtnH6lGkd_7abKdBsdsWYlcMfaZphV0Rm0NsvA".into(),
            signature_alg: None,
            signature: None,
            policy_mode: None,
            config: cfg,
        })
    };
    // The deepest config the encoder accepts must decode in both codecs.
    let mut deepest = 0;
    for levels in 1..40 {
        if encode(&push(nest(levels)), Codec::Cbor).is_ok() {
            deepest = levels;
        }
    }
    assert!(deepest >= 25, "only {deepest} levels");
    for codec in [Codec::Json, Codec::Cbor] {
        let msg = push(nest(deepest));
        let frame = encode(&msg, codec).expect("encodes");
        assert_eq!(decode(&frame, codec), Ok(msg), "{codec:?}");
    }
    let deep = format!(
        r#"{{"v":1,"t":"cc","i":1,"k":"cfg","tid":"build-box","tv":"1","ts":0,"ap":"","pd":"ONZXJwtnH6lGkd_7abKdBsdsWYlcMfaZphV0Rm0NsvA","cfg":{}1{}}}"#,
        r#"{"a":"#.repeat(40),
        "}".repeat(40)
    );
    assert_eq!(
        json(&deep),
        Err(DecodeError::TooDeep {
            max: limits::MAX_DEPTH
        })
    );
    assert!(matches!(
        json(
            r#"{"v":1,"t":"cc","i":1,"k":"cfg","tid":"build-box","tv":"1","ts":0,"ap":"","pd":"ONZXJwtnH6lGkd_7abKdBsdsWYlcMfaZphV0Rm0NsvA","cfg":[1]}"#
        ),
        Err(DecodeError::BadField { key: "cfg", .. })
    ));
    assert!(matches!(
        json(
            r#"{"v":1,"t":"cc","i":1,"k":"cfg","tid":"build-box","tv":"1","ts":0,"ap":"","pd":"ONZXJwtnH6lGkd_7abKdBsdsWYlcMfaZphV0Rm0NsvA","cfg":{"a":1,"a":2}}"#
        ),
        Err(DecodeError::BadField {
            key: "cfg",
            why: "duplicate key",
            ..
        })
    ));
}

#[test]
fn dense_json_is_bounded_by_the_value_budget() {
    let dense = format!(r#"{{"v":1,"t":"zz","x":[{}0]}}"#, "0,".repeat(300_000));
    assert_eq!(
        json(&dense),
        Err(DecodeError::TooManyValues {
            max: limits::MAX_VALUES
        })
    );
}

#[test]
fn error_codes() {
    let e = json(r#"{"v":1,"t":"e","i":3,"c":"PATH"}"#).expect("decodes");
    assert_eq!(e, Message::error(ErrorCode::Path, Some(3), None));
    assert!(matches!(
        json(r#"{"v":1,"t":"e","c":"NOPE"}"#),
        Err(DecodeError::BadField {
            t: "e",
            key: "c",
            ..
        })
    ));
    let other = Message::error(ErrorCode::Other("QUOTA".into()), None, Some("later"));
    let cbor = encode(&other, Codec::Cbor).expect("native peers may get new codes");
    assert_eq!(decode(&cbor, Codec::Cbor), Ok(other.clone()));
    assert!(encode(&other, Codec::Json).is_err(), "0.1.x would drop it");
    assert!(
        encode(
            &Message::error(ErrorCode::Other("PATH".into()), None, None),
            Codec::Cbor
        )
        .is_err()
    );
}

#[test]
fn base64_bodies() {
    // Unpadded base64 is accepted (Node is lenient); output is always padded.
    let msg = json(r#"{"v":1,"t":"ps","i":11,"d":"dHJ1ZQ"}"#).expect("decodes");
    assert_eq!(
        msg,
        Message::ProxyChunk(ProxyChunk {
            request_id: 11,
            data: b"true".to_vec()
        })
    );
    assert_eq!(
        encode(&msg, Codec::Json).expect("encodes"),
        br#"{"v":1,"t":"ps","i":11,"d":"dHJ1ZQ=="}"#
    );
    assert!(matches!(
        json(r#"{"v":1,"t":"ps","i":11,"d":"***"}"#),
        Err(DecodeError::BadField {
            key: "d",
            why: "invalid base64",
            ..
        })
    ));
    // `pr.b` may be absent; it reads as empty and is written back as "".
    let pr = json(r#"{"v":1,"t":"pr","i":1,"p":80,"m":"GET","u":"/","h":[]}"#).expect("decodes");
    assert_eq!(
        encode(&pr, Codec::Json).expect("encodes"),
        br#"{"v":1,"t":"pr","i":1,"p":80,"m":"GET","u":"/","h":[],"b":""}"#
    );
}
