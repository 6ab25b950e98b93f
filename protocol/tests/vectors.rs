//! Every vector in `shared/protocol/vectors.json` that concerns the handshake, the JIT token and
//! the canonical digest, plus the worked examples from the 0.1.50 daemon reference.
//!
//! The suite reads a copy kept in the repository (`protocol/tests/data/vectors.json`), so a
//! clone builds and tests on its own; `vendored_vectors_match_the_shared_spec` checks the copy
//! against the spec's file whenever the spec sits beside the repository (`X/main`, `X/shared`).

use codemantle_protocol::canonical::{canonical_json, digest};
use serde_json::{Map, Value};

const VECTORS_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/vectors.json");

fn vectors() -> Value {
    let text = std::fs::read_to_string(VECTORS_PATH).unwrap_or_else(|e| {
        panic!(
            "cannot read the shared test vectors at {VECTORS_PATH}: {e}. The `shared` folder must \
             sit beside the repository checkout (X/main and X/shared)."
        )
    });
    serde_json::from_str(&text).expect("vectors.json is not valid JSON")
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    v.pointer(path)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("vectors.json: missing string at {path}"))
}

fn u(v: &Value, path: &str) -> u64 {
    v.pointer(path)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("vectors.json: missing integer at {path}"))
}

// ---------------------------------------------------------------------------------------------
// canonical

#[test]
fn canonical_runtime_digest() {
    let v = vectors();
    let json = s(&v, "/canonical/runtime/json");
    let value: Value = serde_json::from_str(json).unwrap();
    // The vector's text is already canonical: we must reproduce it byte for byte.
    assert_eq!(canonical_json(&value), json);
    assert_eq!(digest(&value), s(&v, "/canonical/runtime/digest"));
}

#[test]
fn canonical_session_init_digest() {
    let v = vectors();
    let json = s(&v, "/canonical/session_init/json");
    let value: Value = serde_json::from_str(json).unwrap();
    assert_eq!(canonical_json(&value), json);
    assert_eq!(digest(&value), s(&v, "/canonical/session_init/digest"));
}

#[test]
fn canonical_key_order() {
    let v = vectors();
    let keys = v
        .pointer("/canonical/key_order/input_keys")
        .unwrap()
        .as_array()
        .unwrap();
    let values = v
        .pointer("/canonical/key_order/input_values")
        .unwrap()
        .as_array()
        .unwrap();
    assert_eq!(keys.len(), values.len());
    let mut map = Map::new();
    for (k, val) in keys.iter().zip(values) {
        map.insert(k.as_str().unwrap().to_owned(), val.clone());
    }
    let want = s(&v, "/canonical/key_order/canonical");
    assert_eq!(canonical_json(&Value::Object(map.clone())), want);
    // Insertion order must not matter: build the object in reverse too.
    let mut rev = Map::new();
    for (k, val) in keys.iter().zip(values).rev() {
        rev.insert(k.as_str().unwrap().to_owned(), val.clone());
    }
    assert_eq!(canonical_json(&Value::Object(rev)), want);
}

/// Worked example from the daemon reference §9.2 (numbers, escapes, integer-like keys).
#[test]
fn canonical_daemon_reference_example() {
    let input = r#"{"tools":{"write":false,"Bash":true,"10":1,"9":2,"_x":0},"model":"openai/gpt-5","$schema":"https://opencode.ai/config.json","permission":{"edit":"ask"},"n":[1.0,2.5,1e21,"é\u0001/"]}"#;
    let value: Value = serde_json::from_str(input).unwrap();
    assert_eq!(
        canonical_json(&value),
        r#"{"$schema":"https://opencode.ai/config.json","model":"openai/gpt-5","n":[1,2.5,1e+21,"é\u0001/"],"permission":{"edit":"ask"},"tools":{"9":2,"10":1,"_x":0,"Bash":true,"write":false}}"#
    );
    assert_eq!(
        digest(&value),
        "H1P34UfBM-IuhiNjyaEIN7o_xJFBaILG-x8maDkqNAw"
    );
}

/// Session-init example with a `codenucleus` payload, daemon reference §9.2.
#[test]
fn canonical_daemon_reference_codenucleus() {
    let text = r#"{"codenucleus":{"phase":"session-init","policy":{"mode":"off"},"schemaVersion":"1.0.0","scope":"session-init","sessionInit":{"mcp":{"tools":[{"alias":"docs","serverId":"docs","status":"allow","type":"remote","version":"1"}]},"providers":["openai"],"routing":{}},"templateId":"build-box","templateVersion":"1.0.0"}}"#;
    let value: Value = serde_json::from_str(text).unwrap();
    assert_eq!(canonical_json(&value), text);
    assert_eq!(
        digest(&value),
        "FSq_KQdM16q_FafRTuK3euSgDHw9S15fUcqKkcDeiqQ"
    );
}

// ---------------------------------------------------------------------------------------------
// handshake

use codemantle_protocol::handshake::{
    ClientHandshake, Credential, H1Auth, H1Fields, H1Form, H2Fields, Verifier, VerifierConfig,
    h1_signed, h2_mac, h2_signed, key_id, mac, verify_mac,
};

#[test]
fn handshake_key_id() {
    let v = vectors();
    let token = s(&v, "/handshake/token");
    assert_eq!(key_id(token.as_bytes()), s(&v, "/handshake/key_id"));
}

#[test]
fn handshake_h1_three_forms() {
    let v = vectors();
    let token = s(&v, "/handshake/token");
    let device = s(&v, "/handshake/device");
    let nonce = s(&v, "/handshake/nonce");
    let ts = u(&v, "/handshake/ts_ms");
    let kid = s(&v, "/handshake/key_id");
    let forms = [
        ("h1_ak", H1Auth::KeyId(kid)),
        ("h1_at", H1Auth::Token(token)),
        ("h1_legacy", H1Auth::LegacyToken(token)),
    ];
    for (name, auth) in forms {
        let signed = h1_signed(device, nonce, ts, auth);
        assert_eq!(
            signed,
            s(&v, &format!("/handshake/{name}/signed")),
            "{name}"
        );
        let m = s(&v, &format!("/handshake/{name}/m"));
        assert_eq!(mac(token.as_bytes(), &signed), m, "{name}");
        assert!(verify_mac(token.as_bytes(), &signed, m), "{name}");
    }
}

#[test]
fn handshake_h1_verifier_accepts_all_forms() {
    let v = vectors();
    let token = s(&v, "/handshake/token");
    let device = s(&v, "/handshake/device");
    let nonce = s(&v, "/handshake/nonce");
    let ts = u(&v, "/handshake/ts_ms");
    let kid = s(&v, "/handshake/key_id");
    let lookup = |k: &str| {
        (k == kid).then(|| Credential::Device {
            device_id: device.to_owned(),
            secret: token.into(),
        })
    };
    let cases = [
        ("h1_ak", Some(kid), None, H1Form::KeyId),
        ("h1_at", None, Some(token), H1Form::Token),
        ("h1_legacy", None, Some(token), H1Form::LegacyToken),
    ];
    for (name, key_id, tok, form) in cases {
        let mut verifier = Verifier::new(VerifierConfig {
            allow_raw_token: true,
            ..VerifierConfig::default()
        });
        let h1 = H1Fields {
            version: 1,
            device_id: device,
            key_id,
            token: tok,
            nonce,
            ts_ms: ts,
            mac: s(&v, &format!("/handshake/{name}/m")),
        };
        let peer = verifier
            .verify(&h1, ts, &lookup)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(peer.form, form, "{name}");
        assert_eq!(peer.device_id, device);
        assert_eq!(peer.key_id, kid);
    }
}

#[test]
fn handshake_h2() {
    let v = vectors();
    let token = s(&v, "/handshake/token");
    let nonce = s(&v, "/handshake/nonce");
    let sid = s(&v, "/handshake/h2/sid");
    let srv = s(&v, "/handshake/h2/server_nonce");
    let hb = u(&v, "/handshake/h2/hb");
    let mx = u(&v, "/handshake/h2/mx");
    let m = s(&v, "/handshake/h2/m");
    assert_eq!(
        h2_signed(sid, srv, hb, mx, nonce),
        s(&v, "/handshake/h2/signed")
    );
    assert_eq!(h2_mac(token.as_bytes(), sid, srv, hb, mx, nonce), m);

    // Client side: our h1 for these inputs is the vector's, and the vector's h2 is accepted.
    let device = s(&v, "/handshake/device");
    let ts = u(&v, "/handshake/ts_ms");
    let (client, h1) = ClientHandshake::new(token, device, nonce, ts).unwrap();
    assert_eq!(h1.key_id, s(&v, "/handshake/key_id"));
    assert_eq!(h1.mac, s(&v, "/handshake/h1_ak/m"));
    let session = client
        .handle_h2(&H2Fields {
            sid,
            server_nonce: srv,
            hb,
            mx,
            mac: m,
        })
        .unwrap();
    assert_eq!(session.sid, sid);
    assert_eq!(session.heartbeat_secs, hb);
    assert_eq!(session.max_chunk_bytes, mx);
}

/// Daemon reference §3.4 worked example.
#[test]
fn handshake_daemon_reference_example() {
    let token = "example-agent-token-123";
    assert_eq!(key_id(token.as_bytes()), "bL7RPuSIvBlBz2tMC8fGA2X2");
    let (client, h1) = ClientHandshake::new(
        token,
        "dev_abcdefghijklmnop",
        "AbCdEfGhIjKlMnOpQrSt",
        1_735_689_600_000,
    )
    .unwrap();
    assert_eq!(h1.mac, "-1WC8SRgr8-7ufDox773o9K99k9EJDKEH61kmMeUyaY");
    let m = "K4V4B-dBZiVqZb01Hc1PlKiTjELjtOLs3pyw4vV2i1E";
    let h2 = H2Fields {
        sid: "SidSidSidSidSidSid",
        server_nonce: "SrvSrvSrvSrvSrvSrv",
        hb: 25,
        mx: 8192,
        mac: m,
    };
    client.handle_h2(&h2).unwrap();
}

#[test]
fn handshake_captured_frames() {
    let v = vectors();
    let token = s(&v, "/handshake_captured/token");
    assert_eq!(
        key_id(token.as_bytes()),
        s(&v, "/handshake_captured/key_id")
    );

    let h1: Value = serde_json::from_str(s(&v, "/frames/0/json")).unwrap();
    let h2: Value = serde_json::from_str(s(&v, "/frames/1/json")).unwrap();
    assert_eq!(s(&v, "/frames/0/dir"), "daemon->control-plane");
    assert_eq!(s(&h1, "/t"), "h1");
    assert_eq!(s(&h2, "/t"), "h2");
    assert_eq!(s(&h1, "/ak"), s(&v, "/handshake_captured/key_id"));

    // The captured h1 verifies against the token, through the real verifier at its own clock.
    let ts = u(&h1, "/ts");
    let fields = H1Fields {
        version: u(&h1, "/v"),
        device_id: s(&h1, "/d"),
        key_id: Some(s(&h1, "/ak")),
        token: None,
        nonce: s(&h1, "/n"),
        ts_ms: ts,
        mac: s(&h1, "/m"),
    };
    let signed = h1_signed(
        fields.device_id,
        fields.nonce,
        ts,
        H1Auth::KeyId(s(&h1, "/ak")),
    );
    assert!(verify_mac(token.as_bytes(), &signed, fields.mac));
    let lookup = |_: &str| {
        Some(Credential::Shared {
            secret: token.into(),
            allowed_devices: None,
        })
    };
    let peer = Verifier::default()
        .verify(&fields, ts + 1_234, &lookup)
        .unwrap();
    assert_eq!(peer.device_id, "dev_peer_test_0001");

    // The captured h2 was signed over the captured h1's nonce.
    let sid = s(&h2, "/s");
    let srv = s(&h2, "/n");
    let (hb, mx) = (u(&h2, "/hb"), u(&h2, "/mx"));
    assert_eq!(
        peer.sign_h2(sid, srv, hb, mx).unwrap(),
        s(&h2, "/m"),
        "our h2 MAC must equal the captured one"
    );
    assert!(verify_mac(
        token.as_bytes(),
        &h2_signed(sid, srv, hb, mx, fields.nonce),
        s(&h2, "/m")
    ));
}

// ---------------------------------------------------------------------------------------------
// JIT

use codemantle_protocol::jit::{self, EnvAllowlist, JitClaims, JitCredential};

#[test]
fn jit_token() {
    let v = vectors();
    let key = s(&v, "/jit/key").as_bytes();
    let payload_text = s(&v, "/jit/payload_json");
    let want = s(&v, "/jit/token");
    let claims: JitClaims = serde_json::from_str(payload_text).unwrap();
    assert_eq!(jit::payload_json(&claims), payload_text);
    assert_eq!(jit::mint(key, &claims).unwrap(), want);
    let now = claims.expires_at_ms - 900_000;
    assert_eq!(jit::verify(key, want, now), Ok(claims.clone()));
    assert!(matches!(
        jit::verify(key, want, claims.expires_at_ms),
        Err(jit::JitError::Expired { .. })
    ));
    assert_eq!(
        jit::verify(b"wrong-key", want, now),
        Err(jit::JitError::BadSignature)
    );
}

/// The `j` object of the captured `si` frame passes the daemon's checks at capture time, and its
/// token carries the frame's device, session and expiry.
#[test]
fn jit_captured_si_frame() {
    let v = vectors();
    let frames = v.pointer("/frames").unwrap().as_array().unwrap();
    let si = frames
        .iter()
        .map(|f| serde_json::from_str::<Value>(f["json"].as_str().unwrap()).unwrap())
        .find(|f| f["t"] == "si")
        .expect("a captured si frame");
    let j = &si["j"];
    let cred = JitCredential {
        token: s(j, "/t").to_owned(),
        expires_at_ms: u(j, "/e"),
        scope: Some(s(j, "/s").to_owned()),
        env_name: Some(s(j, "/n").to_owned()),
        credential_ref: Some(s(j, "/r").to_owned()),
        env_pairs: vec![],
    };
    // Default TTL is 900 s; the session started a moment after the handshake.
    let now = cred.expires_at_ms - 900_000;
    cred.check_usable(now, &EnvAllowlist::default()).unwrap();
    let claims = jit::decode_unverified(&cred.token).unwrap();
    let h1: Value = serde_json::from_str(s(&v, "/frames/0/json")).unwrap();
    assert_eq!(claims.device_id, s(&h1, "/d"));
    assert_eq!(claims.session_id, s(&si, "/s"));
    assert_eq!(claims.expires_at_ms, cred.expires_at_ms);
    assert_eq!(claims.scope, cred.scope.unwrap());
}

/// The vendored copy is the spec's file, byte for byte (checked when the spec is beside us).
#[test]
fn vendored_vectors_match_the_shared_spec() {
    let spec = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/protocol/vectors.json"
    );
    match std::fs::read(spec) {
        Ok(spec_bytes) => {
            let ours = std::fs::read(VECTORS_PATH).expect("vendored vectors");
            assert!(
                ours == spec_bytes,
                "protocol/tests/data/vectors.json differs from {spec}: copy the spec's file over it"
            );
        }
        Err(e) => eprintln!("{spec} not readable ({e}); only the vendored copy is used"),
    }
}
