//! Codec cost on the two hot frames: an 8 KiB session-log chunk (`sc`) and a full 256-entry
//! directory listing (`ds`), CBOR (native) against JSON (0.1.x compat).
//!
//! Criterion reports time per encode and per decode; the bytes on the wire are printed once at
//! start-up. Goals: CBOR decode at least 2× faster than JSON, a `ds` at least 25% smaller.
//!
//! Run: `cargo bench -p codemantle-protocol --bench codec -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use codemantle_protocol::codec::{Codec, decode, encode};
use codemantle_protocol::message::{DirEntry, DirListing, Message, StreamChunk};
use criterion::{Criterion, criterion_group, criterion_main};

/// An `sc` chunk as the daemon sends for `sl`: session-snapshot JSONL lines joined by `\n`, cut
/// at 8192 bytes. The quotes inside the lines are what JSON has to escape.
fn log_chunk() -> Message {
    let mut data = String::new();
    let mut n = 0u32;
    loop {
        let line = format!(
            r#"{{"ts":"2026-11-24T01:35:{:02}.{:03}Z","k":"log","src":"opencode","sid":"ses_df4cdf8f0ffeKLtiQRxJlY53FF","m":"tool read: src/module_{:04}.rs (1{:03} lines), edit applied"}}"#,
            n % 60,
            n % 1000,
            n,
            n % 1000
        );
        if data.len() + line.len() + 1 > 8192 {
            break;
        }
        if !data.is_empty() {
            data.push('\n');
        }
        data.push_str(&line);
        n += 1;
    }
    Message::StreamChunk(StreamChunk {
        stream_id: "tRSLsDPMhgivql-J".into(),
        seq: 3,
        last: false,
        data,
    })
}

/// A full listing: 256 entries, one in eight a directory, file sizes from bytes to ~200 KB, real
/// millisecond mtimes (0.1.x JSON clamps those to 4294967295, as 0.1.50 does).
fn listing() -> Message {
    let entries = (0..256u64)
        .map(|i| {
            if i % 8 == 0 {
                DirEntry::Dir {
                    name: format!("src/pkg_{i:04}"),
                }
            } else {
                DirEntry::File {
                    name: format!("src/module_{i:04}.rs"),
                    size: (i * 7919) % 200_000 + 120,
                    mtime_ms: 1_732_000_000_000 + i * 61_007,
                }
            }
        })
        .collect();
    Message::DirListing(DirListing {
        request_id: 42,
        cursor: None,
        entries,
    })
}

fn bench(c: &mut Criterion) {
    let frames = [("sc_8k", log_chunk()), ("ds_256", listing())];
    for (name, msg) in &frames {
        let cbor = encode(msg, Codec::Cbor).expect("CBOR encodes");
        let json = encode(msg, Codec::Json).expect("JSON encodes");
        println!(
            "{name}: CBOR {} bytes, JSON {} bytes, CBOR/JSON = {:.3} ({:.1}% smaller)",
            cbor.len(),
            json.len(),
            cbor.len() as f64 / json.len() as f64,
            100.0 * (1.0 - cbor.len() as f64 / json.len() as f64)
        );
        for (codec, bytes) in [(Codec::Cbor, &cbor), (Codec::Json, &json)] {
            let label = if codec == Codec::Cbor { "cbor" } else { "json" };
            c.bench_function(&format!("{name}/{label}/encode"), |b| {
                b.iter(|| encode(black_box(msg), codec))
            });
            c.bench_function(&format!("{name}/{label}/decode"), |b| {
                b.iter(|| decode(black_box(bytes), codec))
            });
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
