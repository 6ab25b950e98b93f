//! Server-side `h1` verification: every refusal path, its wire code / message / close code, the
//! check order of 0.1.50, and our stricter device binding.

use codemantle_protocol::handshake::{
    ClientHandshake, ClientHandshakeError, Credential, CredentialKind, CredentialSet, H1Auth,
    H1Fields, H1Form, H1Out, H2Fields, HandshakeError, Verifier, VerifierConfig, h1_signed, key_id,
    mac,
};

const NOW: u64 = 1_700_000_000_000;
const DEVICE: &str = "dev_ABCDEFGHIJKLMNOP";
const OTHER_DEVICE: &str = "dev_OTHEROTHEROTHER";
const DEVICE_SECRET: &str = "device-secret-0123456789abcdef";
const SHARED_SECRET: &str = "test-token-0123456789";
const BOUND_SECRET: &str = "bound-shared-token-0123456789";

fn store() -> CredentialSet {
    [
        Credential::Device {
            device_id: DEVICE.into(),
            secret: DEVICE_SECRET.into(),
        },
        Credential::Shared {
            secret: SHARED_SECRET.into(),
            allowed_devices: None,
        },
        Credential::Shared {
            secret: BOUND_SECRET.into(),
            allowed_devices: Some(vec![DEVICE.into(), "dev_SECONDSECONDSEC".into()]),
        },
    ]
    .into_iter()
    .collect()
}

fn h1(secret: &str, device: &str, nonce: &str, ts: u64) -> H1Out {
    ClientHandshake::new(secret, device, nonce, ts).unwrap().1
}

fn verify_at(v: &mut Verifier, h1: &H1Out, now: u64) -> Result<CredentialKind, HandshakeError> {
    v.verify(&h1.as_fields(), now, &store())
        .map(|p| p.credential)
}

fn auth(e: &HandshakeError, reason: &str) {
    assert_eq!(e.wire_code().as_str(), "AUTH", "{e}");
    assert_eq!(e.close_code(), 1008, "{e}");
    assert_eq!(e.close_reason(), reason, "{e}");
}

#[test]
fn device_key_authenticates_its_device() {
    let mut v = Verifier::default();
    let frame = h1(DEVICE_SECRET, DEVICE, "nonceNONCEnonce00001", NOW);
    let peer = v.verify(&frame.as_fields(), NOW, &store()).unwrap();
    assert_eq!(peer.device_id, DEVICE);
    assert_eq!(peer.credential, CredentialKind::Device);
    assert_eq!(peer.key_id, key_id(DEVICE_SECRET.as_bytes()));
    assert_eq!(peer.h1_nonce(), "nonceNONCEnonce00001");
}

#[test]
fn device_key_claiming_another_device_is_refused() {
    let mut v = Verifier::default();
    let frame = h1(DEVICE_SECRET, OTHER_DEVICE, "nonceNONCEnonce00002", NOW);
    let e = verify_at(&mut v, &frame, NOW).unwrap_err();
    assert_eq!(
        e,
        HandshakeError::DeviceNotAllowed {
            device_id: OTHER_DEVICE.into()
        }
    );
    auth(&e, "key not valid for this device");
    assert_eq!(
        e.wire_message().as_deref(),
        Some("key_not_valid_for_device")
    );
}

#[test]
fn shared_tokens_bound_and_unbound() {
    let mut v = Verifier::default();
    let unbound = h1(SHARED_SECRET, OTHER_DEVICE, "nonceNONCEnonce00003", NOW);
    assert_eq!(verify_at(&mut v, &unbound, NOW), Ok(CredentialKind::Shared));
    let bound_ok = h1(
        BOUND_SECRET,
        "dev_SECONDSECONDSEC",
        "nonceNONCEnonce00004",
        NOW,
    );
    assert_eq!(
        verify_at(&mut v, &bound_ok, NOW),
        Ok(CredentialKind::Shared)
    );
    let bound_bad = h1(BOUND_SECRET, OTHER_DEVICE, "nonceNONCEnonce00005", NOW);
    let e = verify_at(&mut v, &bound_bad, NOW).unwrap_err();
    assert!(matches!(e, HandshakeError::DeviceNotAllowed { .. }));
}

#[test]
fn replayed_nonce_is_refused() {
    let mut v = Verifier::default();
    let frame = h1(SHARED_SECRET, DEVICE, "nonceNONCEnonce00006", NOW);
    assert!(verify_at(&mut v, &frame, NOW).is_ok());
    let e = verify_at(&mut v, &frame, NOW + 1_000).unwrap_err();
    assert_eq!(e, HandshakeError::Replay);
    auth(&e, "replay detected");
    // The same nonce with a fresh, validly signed h1 (another device, even) is still a replay:
    // the cache is global, as in 0.1.50.
    let other = h1(
        SHARED_SECRET,
        OTHER_DEVICE,
        "nonceNONCEnonce00006",
        NOW + 2_000,
    );
    assert_eq!(
        verify_at(&mut v, &other, NOW + 2_000),
        Err(HandshakeError::Replay)
    );
}

#[test]
fn future_dated_h1_cannot_be_replayed_inside_its_window() {
    // 0.1.50 remembers the nonce until now+skew, so an h1 stamped 29 s in the future could be
    // replayed 30..59 s later while its ts is still inside the window. We remember until ts+skew.
    let mut v = Verifier::default();
    let ts = NOW + 29_000;
    let frame = h1(SHARED_SECRET, DEVICE, "nonceNONCEnonce00007", ts);
    assert!(verify_at(&mut v, &frame, NOW).is_ok());
    assert_eq!(
        verify_at(&mut v, &frame, NOW + 45_000),
        Err(HandshakeError::Replay)
    );
    assert_eq!(
        verify_at(&mut v, &frame, ts + 30_000),
        Err(HandshakeError::Replay)
    );
    // Past the window, the skew check refuses it anyway.
    assert!(matches!(
        verify_at(&mut v, &frame, ts + 30_001),
        Err(HandshakeError::TimestampSkew { .. })
    ));
}

#[test]
fn timestamp_skew_window() {
    let mut v = Verifier::default();
    for (i, offset) in [-31_000i64, 31_000, -30_001, 30_001]
        .into_iter()
        .enumerate()
    {
        let ts = NOW.checked_add_signed(offset).unwrap();
        let frame = h1(SHARED_SECRET, DEVICE, &format!("nonceSKEWbad{i:08}"), ts);
        let e = verify_at(&mut v, &frame, NOW).unwrap_err();
        assert!(
            matches!(e, HandshakeError::TimestampSkew { diff_ms, limit_ms: 30_000, .. } if diff_ms == offset.unsigned_abs()),
            "{offset}: {e}"
        );
        auth(&e, "timestamp skew");
    }
    for (i, offset) in [-29_000i64, 29_000, -30_000, 30_000, 0]
        .into_iter()
        .enumerate()
    {
        let ts = NOW.checked_add_signed(offset).unwrap();
        let frame = h1(SHARED_SECRET, DEVICE, &format!("nonceSKEWgood{i:07}"), ts);
        assert!(verify_at(&mut v, &frame, NOW).is_ok(), "{offset}");
    }
}

#[test]
fn skew_window_is_configurable() {
    let mut v = Verifier::new(VerifierConfig {
        skew_ms: 5_000,
        ..VerifierConfig::default()
    });
    let frame = h1(SHARED_SECRET, DEVICE, "nonceNONCEnonce00008", NOW - 6_000);
    assert!(matches!(
        verify_at(&mut v, &frame, NOW),
        Err(HandshakeError::TimestampSkew {
            limit_ms: 5_000,
            ..
        })
    ));
}

#[test]
fn wrong_mac_is_a_bad_signature_and_does_not_burn_the_nonce() {
    let mut v = Verifier::default();
    let good = h1(SHARED_SECRET, DEVICE, "nonceNONCEnonce00009", NOW);
    let mut bad = good.clone();
    bad.mac = mac(b"not-the-secret", "whatever");
    let e = verify_at(&mut v, &bad, NOW).unwrap_err();
    assert_eq!(e, HandshakeError::BadSignature);
    auth(&e, "invalid signature");
    // A MAC over a different device id is equally bad.
    let mut moved = good.clone();
    moved.device_id = OTHER_DEVICE.into();
    assert_eq!(
        verify_at(&mut v, &moved, NOW),
        Err(HandshakeError::BadSignature)
    );
    // Garbage never enters the replay cache: the genuine frame still goes through.
    assert!(v.replay_cache().is_empty());
    assert!(verify_at(&mut v, &good, NOW).is_ok());
}

#[test]
fn unknown_key_is_an_invalid_token() {
    let mut v = Verifier::default();
    let frame = h1("some-other-secret-xyz", DEVICE, "nonceNONCEnonce00010", NOW);
    let e = verify_at(&mut v, &frame, NOW).unwrap_err();
    assert_eq!(e, HandshakeError::UnknownCredential);
    auth(&e, "invalid token");
}

#[test]
fn version_floor_and_unsupported_version() {
    let mut v = Verifier::default();
    let mut frame = h1(SHARED_SECRET, DEVICE, "nonceNONCEnonce00011", NOW);
    frame.version = 0;
    let e = verify_at(&mut v, &frame, NOW).unwrap_err();
    assert_eq!(e.wire_code().as_str(), "UPDATE_REQUIRED");
    assert_eq!(
        e.wire_message().as_deref(),
        Some("agent_update_required:min_v1:received_v0")
    );
    assert_eq!(e.close_code(), 1008);
    assert_eq!(e.close_reason(), "update required");

    frame.version = 2;
    let e = verify_at(&mut v, &frame, NOW).unwrap_err();
    assert_eq!(e.wire_code().as_str(), "UPDATE_REQUIRED");
    assert_eq!(
        e.wire_message().as_deref(),
        Some("protocol_not_supported:control_plane_v1:received_v2")
    );
    assert_eq!(e.close_code(), 1002);
    assert_eq!(e.close_reason(), "unsupported protocol version");

    // A floor above 1 locks out v1 agents, with the floor in the message (0.1.50 behaviour).
    let mut strict = Verifier::new(VerifierConfig {
        protocol_floor: 2,
        ..VerifierConfig::default()
    });
    frame.version = 1;
    let e = verify_at(&mut strict, &frame, NOW).unwrap_err();
    assert_eq!(
        e.wire_message().as_deref(),
        Some("agent_update_required:min_v2:received_v1")
    );
    // Floor 0 behaves like 1.
    let mut lax = Verifier::new(VerifierConfig {
        protocol_floor: 0,
        ..VerifierConfig::default()
    });
    frame.version = 0;
    assert!(matches!(
        verify_at(&mut lax, &frame, NOW),
        Err(HandshakeError::UpdateRequired {
            floor: 1,
            received: 0
        })
    ));
}

#[test]
fn malformed_fields_are_proto_errors() {
    let good = h1(SHARED_SECRET, DEVICE, "nonceNONCEnonce00012", NOW);
    let long_token = "x".repeat(257);
    let base = good.as_fields();
    let cases: Vec<(&str, H1Fields<'_>)> = vec![
        (
            "d",
            H1Fields {
                device_id: "short",
                ..base
            },
        ),
        (
            "d",
            H1Fields {
                device_id: "dev_ABCDEFGHIJ/KLMN",
                ..base
            },
        ),
        (
            "d",
            H1Fields {
                device_id: "dev_ABCDEFGHIJKLMNOPQRSTUVWXYZ01234",
                ..base
            },
        ),
        (
            "ak",
            H1Fields {
                key_id: Some("tooShortKey"),
                ..base
            },
        ),
        (
            "ak",
            H1Fields {
                key_id: Some("k7AZFe8hftnrd2suRzJwsAQY="),
                ..base
            },
        ),
        (
            "ak",
            H1Fields {
                key_id: None,
                ..base
            },
        ),
        (
            "n",
            H1Fields {
                nonce: "n0nce",
                ..base
            },
        ),
        (
            "n",
            H1Fields {
                nonce: "nonceNONCEnonce12345678901",
                ..base
            },
        ),
        (
            "n",
            H1Fields {
                nonce: "nonce NONCE nonce 12",
                ..base
            },
        ),
        ("m", H1Fields { mac: "abc", ..base }),
        (
            "m",
            H1Fields {
                mac: "39SnHyLdB8uEQVZCtIKk3CVP9J1TRf6pEiGk5qWeTF+",
                ..base
            },
        ),
        (
            "at",
            H1Fields {
                token: Some(""),
                ..base
            },
        ),
        (
            "at",
            H1Fields {
                token: Some(&long_token),
                ..base
            },
        ),
    ];
    for (field, fields) in cases {
        let mut v = Verifier::default();
        let e = v.verify(&fields, NOW, &store()).unwrap_err();
        match &e {
            HandshakeError::Malformed(fe) => assert_eq!(fe.field, field, "{e}"),
            other => panic!("expected malformed {field}, got {other}"),
        }
        assert_eq!(e.wire_code().as_str(), "PROTO");
        assert_eq!(e.close_code(), 1002);
        assert_eq!(e.close_reason(), "expected handshake");
        assert_eq!(e.wire_message(), None);
    }
}

#[test]
fn check_order_matches_0_1_50() {
    let mut v = Verifier::default();
    // Unknown key AND skewed AND bad syntax elsewhere: syntax first.
    let mut frame = h1(
        "unknown-secret-abcdef",
        DEVICE,
        "nonceNONCEnonce00013",
        NOW - 60_000,
    );
    frame.device_id = "bad".into();
    assert!(matches!(
        verify_at(&mut v, &frame, NOW),
        Err(HandshakeError::Malformed(_))
    ));
    // Unknown key AND skewed: skew first.
    let frame = h1(
        "unknown-secret-abcdef",
        DEVICE,
        "nonceNONCEnonce00013",
        NOW - 60_000,
    );
    assert!(matches!(
        verify_at(&mut v, &frame, NOW),
        Err(HandshakeError::TimestampSkew { .. })
    ));
    // Replayed nonce AND unknown key: replay first.
    let ok = h1(SHARED_SECRET, DEVICE, "nonceNONCEnonce00014", NOW);
    verify_at(&mut v, &ok, NOW).unwrap();
    let frame = h1("unknown-secret-abcdef", DEVICE, "nonceNONCEnonce00014", NOW);
    assert_eq!(verify_at(&mut v, &frame, NOW), Err(HandshakeError::Replay));
    // Version before everything.
    let mut frame = h1("unknown-secret-abcdef", DEVICE, "nonceNONCEnonce00099", 0);
    frame.device_id = "bad".into();
    frame.version = 7;
    assert!(matches!(
        verify_at(&mut v, &frame, NOW),
        Err(HandshakeError::ProtocolNotSupported { received: 7 })
    ));
}

const RAW_NONCE: &str = "nonceNONCEnonce00015";

fn raw_fields<'a>(token: &'a str, m: &'a str) -> H1Fields<'a> {
    H1Fields {
        version: 1,
        device_id: DEVICE,
        key_id: None,
        token: Some(token),
        nonce: RAW_NONCE,
        ts_ms: NOW,
        mac: m,
    }
}

#[test]
fn raw_token_forms() {
    let m_at = mac(
        SHARED_SECRET.as_bytes(),
        &h1_signed(DEVICE, RAW_NONCE, NOW, H1Auth::Token(SHARED_SECRET)),
    );
    let m_legacy = mac(
        SHARED_SECRET.as_bytes(),
        &h1_signed(DEVICE, RAW_NONCE, NOW, H1Auth::LegacyToken(SHARED_SECRET)),
    );

    // Refused by default, even with a valid MAC.
    let e = Verifier::default()
        .verify(&raw_fields(SHARED_SECRET, &m_at), NOW, &store())
        .unwrap_err();
    assert_eq!(e, HandshakeError::RawTokenRefused);
    auth(&e, "invalid token");

    let cfg = VerifierConfig {
        allow_raw_token: true,
        ..VerifierConfig::default()
    };
    let peer = Verifier::new(cfg.clone())
        .verify(&raw_fields(SHARED_SECRET, &m_at), NOW, &store())
        .unwrap();
    assert_eq!(peer.form, H1Form::Token);
    let peer = Verifier::new(cfg.clone())
        .verify(&raw_fields(SHARED_SECRET, &m_legacy), NOW, &store())
        .unwrap();
    assert_eq!(peer.form, H1Form::LegacyToken);
    // A token that is not in the store (differs in the last character).
    let e = Verifier::new(cfg)
        .verify(&raw_fields("test-token-0123456780", &m_at), NOW, &store())
        .unwrap_err();
    assert_eq!(e, HandshakeError::UnknownCredential);
}

#[test]
fn closure_lookup() {
    let lookup = |k: &str| {
        (k == key_id(DEVICE_SECRET.as_bytes())).then(|| Credential::Device {
            device_id: DEVICE.into(),
            secret: DEVICE_SECRET.into(),
        })
    };
    let frame = h1(DEVICE_SECRET, DEVICE, "nonceNONCEnonce00016", NOW);
    assert!(
        Verifier::default()
            .verify(&frame.as_fields(), NOW, &lookup)
            .is_ok()
    );
}

#[test]
fn h2_roundtrip_and_client_refusals() {
    let (client, frame) =
        ClientHandshake::new(DEVICE_SECRET, DEVICE, "nonceNONCEnonce00017", NOW).unwrap();
    let peer = Verifier::default()
        .verify(&frame.as_fields(), NOW, &store())
        .unwrap();
    let (sid, srv) = ("SIDsidSIDsidSIDsid", "SRVsrvSRVsrvSRVsrv");
    let m = peer.sign_h2(sid, srv, 25, 8192).unwrap();
    let h2 = H2Fields {
        sid,
        server_nonce: srv,
        hb: 25,
        mx: 8192,
        mac: &m,
    };
    let session = client.handle_h2(&h2).unwrap();
    assert_eq!(session.heartbeat_secs, 25);
    assert_eq!(session.max_chunk_bytes, 8192);

    // Bound to our nonce: an h2 signed for another h1 is refused.
    let (other_client, _) =
        ClientHandshake::new(DEVICE_SECRET, DEVICE, "nonceNONCEnonce00018", NOW).unwrap();
    let e = other_client.handle_h2(&h2).unwrap_err();
    assert_eq!(e, ClientHandshakeError::BadSignature);
    assert_eq!(e.close_code(), 1008);
    assert_eq!(e.close_reason(), "invalid ack");

    // Tampered parameters break the MAC.
    let tampered = H2Fields { hb: 120, ..h2 };
    assert_eq!(
        client.handle_h2(&tampered),
        Err(ClientHandshakeError::BadSignature)
    );
    // Out-of-range parameters are malformed before any MAC check.
    for (hb, mx) in [(4, 8192), (121, 8192), (25, 255), (25, 8193)] {
        let e = client.handle_h2(&H2Fields { hb, mx, ..h2 }).unwrap_err();
        assert!(matches!(e, ClientHandshakeError::Malformed(_)), "{hb} {mx}");
        assert_eq!(e.close_code(), 1002);
        // And the server refuses to sign them.
        assert!(peer.sign_h2(sid, srv, hb, mx).is_err());
    }
    assert!(peer.sign_h2("short", srv, 25, 8192).is_err());
    assert!(peer.sign_h2(sid, "short", 25, 8192).is_err());
    assert!(peer.sign_h2(sid, srv, 5, 256).is_ok());
    assert!(peer.sign_h2(sid, srv, 120, 8192).is_ok());
}

#[test]
fn client_input_checks() {
    assert_eq!(
        ClientHandshake::new("", DEVICE, "nonceNONCEnonce00019", NOW)
            .unwrap_err()
            .field,
        "secret"
    );
    assert_eq!(
        ClientHandshake::new("s", "bad", "nonceNONCEnonce00019", NOW)
            .unwrap_err()
            .field,
        "d"
    );
    assert_eq!(
        ClientHandshake::new("s", DEVICE, "short", NOW)
            .unwrap_err()
            .field,
        "n"
    );
}
