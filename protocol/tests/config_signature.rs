//! Config push signatures: frozen vectors and tamper tests.
//!
//! The vectors were computed independently (Python `hmac`/`hashlib`) from the definition in
//! `config_signature`'s module doc and frozen here:
//!
//! ```text
//! secret  = "test-token-0123456789"
//! key     = HMAC-SHA256(secret, "codemantle/config-signing/v1")
//!         = 66d024f097807e50e62cc77dd3b2cb03c7ef5ddbd003c048640f2ca2cda0a9b1
//! sg      = base64url-nopad(HMAC-SHA256(key, "cfg|<tid>|<tv>|<ph>|<sc>|<ap>|<pd>"))
//! ```

use codemantle_protocol::config_signature::{
    ALG_HMAC_SHA256_DEVKEY_V1, ConfigSigningKey, SignatureError, SignedFields,
    effective_phase_scope, sign, sign_push, verify, verify_push,
};
use codemantle_protocol::handshake::{self, Secret};
use codemantle_protocol::message::{ConfigPhase, ConfigPush, ConfigScope, PolicyMode};

const SECRET: &str = "test-token-0123456789";
const RUNTIME_DIGEST: &str = "ONZXJwtnH6lGkd_7abKdBsdsWYlcMfaZphV0Rm0NsvA";
const SESSION_INIT_DIGEST: &str = "EVXZs_8_ELHbA1zpf9TNKUL6E8tyMZCOeSExeTkwems";
const APPLY_PATH: &str = ".opencode/opencode.json";

const RUNTIME_SG: &str = "g9NLGkRoq0bv5zsESZGiBG1l5tOF4IF1_vbjJy9jWgo";
const SESSION_INIT_SG: &str = "WhtkPJ5g_qn8zuTrX-Che0gWRZMmlHkoE73iC-HWq4Q";
const OTHER_PATH_SG: &str = "x4SOyuL5Fb2UVrIwbaSoSAlpXz8Mgn3uUXsU2gJbhz8";
/// HMAC with the *raw* device secret over the runtime message: what a scheme without key
/// derivation would produce. Must never verify.
const RAW_KEY_SG: &str = "wAtCaVuZnYCUdhZpAqpqzJ8P74em59nPxxB6-2uO7LI";

fn secret() -> Secret {
    Secret::from(SECRET)
}

fn runtime_fields() -> SignedFields<'static> {
    SignedFields {
        template_id: "build-box",
        template_version: "1.0.0",
        phase: ConfigPhase::Runtime,
        scope: ConfigScope::Full,
        apply_path: APPLY_PATH,
        digest: RUNTIME_DIGEST,
    }
}

fn runtime_push() -> ConfigPush {
    ConfigPush {
        idempotency_key: None,
        request_id: 7,
        phase: Some(ConfigPhase::Runtime),
        scope: Some(ConfigScope::Full),
        template_id: "build-box".into(),
        template_version: "1.0.0".into(),
        timestamp_ms: 1_700_000_000_000,
        apply_path: APPLY_PATH.into(),
        digest: RUNTIME_DIGEST.into(),
        signature_alg: None,
        signature: None,
        policy_mode: Some(PolicyMode::Off),
        config: serde_json::json!({}),
    }
}

#[test]
fn message_string_is_exact() {
    assert_eq!(
        runtime_fields().message().expect("signable"),
        "cfg|build-box|1.0.0|runtime|full|.opencode/opencode.json|ONZXJwtnH6lGkd_7abKdBsdsWYlcMfaZphV0Rm0NsvA"
    );
}

#[test]
fn frozen_vectors() {
    assert_eq!(ALG_HMAC_SHA256_DEVKEY_V1, "hmac-sha256-devkey-v1");
    assert_eq!(sign(&secret(), &runtime_fields()).unwrap(), RUNTIME_SG);
    let si = SignedFields {
        phase: ConfigPhase::SessionInit,
        scope: ConfigScope::SessionInit,
        digest: SESSION_INIT_DIGEST,
        ..runtime_fields()
    };
    assert_eq!(sign(&secret(), &si).unwrap(), SESSION_INIT_SG);
    let other = SignedFields {
        apply_path: "other/opencode.json",
        ..runtime_fields()
    };
    assert_eq!(sign(&secret(), &other).unwrap(), OTHER_PATH_SG);
}

#[test]
fn derived_key_is_not_the_raw_key() {
    // The raw-key MAC is what the handshake's `mac` would give over the same string.
    let message = runtime_fields().message().unwrap();
    assert_eq!(handshake::mac(SECRET.as_bytes(), &message), RAW_KEY_SG);
    assert_eq!(
        verify(
            &secret(),
            &runtime_fields(),
            Some(ALG_HMAC_SHA256_DEVKEY_V1),
            Some(RAW_KEY_SG)
        ),
        Err(SignatureError::Mismatch)
    );
    assert_eq!(
        format!("{:?}", ConfigSigningKey::derive(&secret())),
        "ConfigSigningKey(<redacted>)"
    );
}

#[test]
fn verifies_good_signature() {
    assert_eq!(
        verify(
            &secret(),
            &runtime_fields(),
            Some(ALG_HMAC_SHA256_DEVKEY_V1),
            Some(RUNTIME_SG)
        ),
        Ok(())
    );
}

#[test]
fn sign_push_then_verify_push() {
    let mut push = runtime_push();
    sign_push(&mut push, &secret()).unwrap();
    assert_eq!(
        push.signature_alg.as_deref(),
        Some(ALG_HMAC_SHA256_DEVKEY_V1)
    );
    assert_eq!(push.signature.as_deref(), Some(RUNTIME_SG));
    assert_eq!(verify_push(&push, &secret()), Ok(()));
}

#[test]
fn absent_phase_and_scope_sign_as_their_defaults() {
    let mut push = runtime_push();
    push.phase = None;
    push.scope = None;
    assert_eq!(
        effective_phase_scope(&push),
        (ConfigPhase::Runtime, ConfigScope::Full)
    );
    sign_push(&mut push, &secret()).unwrap();
    assert_eq!(push.signature.as_deref(), Some(RUNTIME_SG));

    push.phase = Some(ConfigPhase::SessionInit);
    assert_eq!(
        effective_phase_scope(&push),
        (ConfigPhase::SessionInit, ConfigScope::SessionInit)
    );
    // Now the same signature no longer matches: the daemon would treat it as session-init.
    assert_eq!(verify_push(&push, &secret()), Err(SignatureError::Mismatch));
}

#[test]
fn every_bound_field_is_tamper_evident() {
    let mut signed = runtime_push();
    sign_push(&mut signed, &secret()).unwrap();
    type Tamper = Box<dyn Fn(&mut ConfigPush)>;
    let tampers: Vec<(&str, Tamper)> = vec![
        ("tid", Box::new(|p| p.template_id = "build-boy".into())),
        ("tv", Box::new(|p| p.template_version = "1.0.1".into())),
        ("ph", Box::new(|p| p.phase = Some(ConfigPhase::SessionInit))),
        ("sc", Box::new(|p| p.scope = Some(ConfigScope::SessionInit))),
        (
            "ap",
            Box::new(|p| p.apply_path = "other/opencode.json".into()),
        ),
        (
            "ap (same path, other spelling)",
            Box::new(|p| p.apply_path = "./.opencode/opencode.json".into()),
        ),
        ("pd", Box::new(|p| p.digest = SESSION_INIT_DIGEST.into())),
        ("sg", Box::new(|p| p.signature = Some(OTHER_PATH_SG.into()))),
        (
            "sg (one character)",
            Box::new(|p| {
                let mut s = RUNTIME_SG.to_owned();
                s.replace_range(0..1, "h");
                p.signature = Some(s);
            }),
        ),
        (
            "sg (non-canonical last char)",
            Box::new(|p| {
                // `o` and `p` differ only in the 2 padding bits of the last base64 character.
                let mut s = RUNTIME_SG.to_owned();
                s.pop();
                s.push('p');
                p.signature = Some(s);
            }),
        ),
        ("sg (short)", Box::new(|p| p.signature = Some("abc".into()))),
    ];
    for (what, tamper) in tampers {
        let mut p = signed.clone();
        tamper(&mut p);
        assert_eq!(
            verify_push(&p, &secret()),
            Err(SignatureError::Mismatch),
            "tampered {what}"
        );
    }
    // Unbound fields may change: the request id, the timestamp, the payload (its digest is
    // what is bound; the daemon checks digest vs payload separately).
    let mut p = signed.clone();
    p.request_id = 99;
    p.timestamp_ms = 1;
    assert_eq!(verify_push(&p, &secret()), Ok(()));
}

#[test]
fn another_devices_key_does_not_verify() {
    let mut push = runtime_push();
    sign_push(&mut push, &Secret::from("another-device-secret")).unwrap();
    assert_eq!(verify_push(&push, &secret()), Err(SignatureError::Mismatch));
}

#[test]
fn missing_incomplete_and_unknown_algorithm() {
    let push = runtime_push();
    let err = verify_push(&push, &secret()).unwrap_err();
    assert_eq!(err, SignatureError::Missing);
    assert_eq!(err.code(), "signature_missing");

    let mut p = push.clone();
    p.signature = Some(RUNTIME_SG.into());
    let err = verify_push(&p, &secret()).unwrap_err();
    assert!(matches!(
        err,
        SignatureError::Incomplete {
            present: "sg",
            absent: "alg"
        }
    ));
    assert_eq!(err.code(), "signature_invalid");

    let mut p = push.clone();
    p.signature_alg = Some(ALG_HMAC_SHA256_DEVKEY_V1.into());
    assert!(matches!(
        verify_push(&p, &secret()),
        Err(SignatureError::Incomplete { present: "alg", .. })
    ));

    // 0.1.50-style opaque operator strings are refused, not waved through.
    let mut p = push;
    p.signature_alg = Some("ed25519".into());
    p.signature = Some(RUNTIME_SG.into());
    let err = verify_push(&p, &secret()).unwrap_err();
    assert_eq!(
        err,
        SignatureError::UnsupportedAlgorithm {
            alg: "ed25519".into()
        }
    );
    assert_eq!(err.code(), "signature_alg_unsupported");
}

#[test]
fn pipe_in_fixed_fields_is_refused_but_allowed_in_apply_path() {
    let bad = SignedFields {
        template_version: "1|x",
        ..runtime_fields()
    };
    assert_eq!(
        sign(&secret(), &bad),
        Err(SignatureError::UnsignableField { field: "tv" })
    );
    let piped_path = SignedFields {
        apply_path: "a|b.json",
        ..runtime_fields()
    };
    let sg = sign(&secret(), &piped_path).expect("ap may contain |");
    assert_eq!(
        verify(
            &secret(),
            &piped_path,
            Some(ALG_HMAC_SHA256_DEVKEY_V1),
            Some(&sg)
        ),
        Ok(())
    );
}
