//! Arbitrary bytes → `h1` fields → the server verifier (twice, to reach the replay path), plus a
//! genuine `h1` built from the same bytes so the accept path and the device-binding check run
//! too, and the client's `h2` check. Nothing here may panic.

#![no_main]

use codemantle_protocol::handshake::{
    ClientHandshake, Credential, H1Fields, H2Fields, Verifier, VerifierConfig,
};
use libfuzzer_sys::fuzz_target;

fn take_u64(data: &mut &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = data.len().min(8);
    buf[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    u64::from_le_bytes(buf)
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let ctl = take_u64(&mut data);
    let ts = take_u64(&mut data);
    // Keep `now` near `ts` most of the time so the later checks are reached.
    let now = if ctl & 0x100 == 0 {
        ts.wrapping_add((ctl >> 16) % 70_000).wrapping_sub(35_000)
    } else {
        take_u64(&mut data)
    };
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('|');
    let mut next = || parts.next().unwrap_or("");
    let (d, ak, at, n, m, secret) = (next(), next(), next(), next(), next(), next());

    let version = (ctl & 0x3) as u64;
    let key_id = (ctl & 0x4 != 0).then_some(ak);
    let token = (ctl & 0x8 != 0).then_some(at);
    let bind_to_other = ctl & 0x10 != 0;
    let cfg = VerifierConfig {
        allow_raw_token: ctl & 0x20 != 0,
        skew_ms: if ctl & 0x40 != 0 {
            30_000
        } else {
            (ctl >> 32) % 100_000
        },
        protocol_floor: (ctl >> 8) & 0x3,
        replay_capacity: ((ctl >> 12) & 0x7) as usize,
    };
    let secret = if secret.is_empty() {
        "fuzz-secret"
    } else {
        secret
    };
    let bound = if bind_to_other {
        "dev_someoneelse01"
    } else {
        d
    };
    let lookup = |_: &str| {
        Some(Credential::Device {
            device_id: bound.to_owned(),
            secret: secret.into(),
        })
    };

    let mut verifier = Verifier::new(cfg);
    let fields = H1Fields {
        version,
        device_id: d,
        key_id,
        token,
        nonce: n,
        ts_ms: ts,
        mac: m,
    };
    for _ in 0..2 {
        if let Err(e) = verifier.verify(&fields, now, &lookup) {
            let _ = (
                e.wire_code(),
                e.wire_message(),
                e.close_code(),
                e.close_reason(),
            );
        }
    }

    // A genuine h1 from the same material: must verify unless skew/binding/replay say otherwise.
    if let Ok((client, h1)) = ClientHandshake::new(secret, d, n, ts) {
        // Invariant: a genuine h1 is accepted by a fresh default verifier at its own clock,
        // exactly when the credential is bound to the claimed device.
        let fresh = Verifier::default().verify(&h1.as_fields(), ts, &lookup);
        assert_eq!(fresh.is_ok(), !bind_to_other || d == bound, "{fresh:?}");
        let first = verifier.verify(&h1.as_fields(), now, &lookup);
        let _ = verifier.verify(&h1.as_fields(), now, &lookup);
        if let Ok(peer) = first {
            let hb = (ctl >> 40) & 0xff;
            let mx = (ctl >> 48) & 0x3fff;
            let mac = peer
                .sign_h2(ak, at, hb, mx)
                .unwrap_or_else(|_| m.to_owned());
            let _ = client.handle_h2(&H2Fields {
                sid: ak,
                server_nonce: at,
                hb,
                mx,
                mac: &mac,
            });
        }
    }
});
