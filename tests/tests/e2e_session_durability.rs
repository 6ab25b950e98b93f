//! Session output survives a `kill -9` of the **daemon** mid-stream: a real control plane, a
//! real daemon and a session whose (fake) OpenCode emits a numbered sequence of deltas; an API
//! client follows `GET /sessions/:sid/stream` (resuming by `Last-Event-ID` if the response
//! breaks). The daemon is killed while the prompt's turn is running, restarted on the same
//! state dir, re-adopts the still-running OpenCode (pid + start time) and the stream goes on:
//! the client ends with every chunk exactly once, in order, and every delta of the sequence
//! exactly once, in order. (The control-plane-kill variant is in `e2e_sessions.rs`.)
//!
//! Determinism: the fake runs in `step` mode — it emits delta `i` only once the test released
//! it (a step file in the session folder) and only to an open `/event` connection. The test
//! releases a first batch, reads it all, then kills the daemon: nothing is in flight between
//! OpenCode and the daemon at the kill, so the sequence must come through whole. What the
//! daemon itself held (chunks written to its sled journal but not yet acknowledged) is re-sent
//! after the restart and de-duplicated by seq at the control plane.
//!
//! SAFETY: temp dirs only (see `session_rig`); network 127.0.0.1 only; the fake's process group
//! is killed when the test ends.

use std::time::{Duration, Instant};

use codemantle_tests::session_rig::{
    SessionRig, deltas, next_event, parse_chunk, release_deltas, stream_events,
};

/// Deltas in the complete lines of what was read so far.
fn complete_deltas(chunks: &[(u32, String)]) -> usize {
    let text: String = chunks.iter().map(|c| c.1.as_str()).collect();
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .lines()
        .filter(|l| l.contains("\"message.part.delta\""))
        .count()
}

/// Reads chunk events from `sse` into `got` until `done(got)` holds (true) or the stream ends
/// (`end` → true) or the response breaks (false).
fn read_until(
    sse: &mut codemantle_control_plane::client::SseReader,
    got: &mut Vec<(u32, String)>,
    done: impl Fn(&[(u32, String)]) -> bool,
) -> Option<bool> {
    while !done(got) {
        let ev = next_event(sse, Duration::from_secs(60))?;
        match ev.event.as_deref() {
            Some("chunk") => got.push(parse_chunk(&ev)),
            Some("end") => return Some(true),
            other => panic!("unexpected event {other:?}: {}", ev.data),
        }
    }
    Some(false)
}

#[test]
fn daemon_kill_mid_stream_loses_and_repeats_nothing() {
    let mut rig = SessionRig::start();
    let project = rig.daemon.root.clone();
    let n = 40;
    let first_batch = 12;
    release_deltas(&project, 0);
    let x = rig.prompt(&format!("emit {n} step"));
    let fake_pid = rig.opencode_pid().expect("the session's OpenCode runs");

    // 1. The first batch, read until every released delta arrived.
    release_deltas(&project, first_batch);
    let mut got: Vec<(u32, String)> = Vec::new();
    let mut sse = rig.open_stream(&x, None);
    let ended = read_until(&mut sse, &mut got, |g| complete_deltas(g) >= first_batch)
        .expect("the stream broke before the first batch");
    assert!(!ended, "the turn ended after {first_batch} of {n} deltas");

    // 2. kill -9 the daemon mid-turn; OpenCode keeps running; restart on the same state dir.
    rig.daemon.kill();
    assert!(
        std::path::Path::new(&format!("/proc/{fake_pid}")).exists(),
        "OpenCode must outlive the daemon"
    );
    rig.daemon.spawn();
    rig.cp.wait_online(&rig.device);

    // 3. Release the rest; follow the same stream to its end, resuming if the response breaks.
    release_deltas(&project, n);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if read_until(&mut sse, &mut got, |_| false) == Some(true) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no end within 120 s\n{}",
            rig.daemon.log()
        );
        std::thread::sleep(Duration::from_millis(200));
        sse = rig.open_stream(&x, got.last().map(|c| c.0));
    }
    drop(sse);

    // Every chunk once, in order.
    let seqs: Vec<u32> = got.iter().map(|c| c.0).collect();
    let expected: Vec<u32> = (0..u32::try_from(got.len()).unwrap()).collect();
    assert_eq!(seqs, expected, "every chunk once, in order");
    // Every delta once, in order: parse the numbers.
    let events = stream_events(&got);
    let numbers: Vec<usize> = deltas(&events)
        .iter()
        .map(|d| {
            d.strip_prefix("part ")
                .and_then(|r| r.trim().parse().ok())
                .unwrap_or_else(|| panic!("delta {d:?}"))
        })
        .collect();
    assert_eq!(
        numbers,
        (0..n).collect::<Vec<_>>(),
        "every delta once, in order\n{}",
        rig.daemon.log()
    );
    // Prompted once; the restart is marked where it happened; the turn ended normally.
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(kinds.iter().filter(|k| **k == "fake.prompt").count(), 1);
    let gap = kinds
        .iter()
        .position(|k| *k == "codemantle.events.gap")
        .expect("the daemon restart is recorded in the stream");
    let delta_positions: Vec<usize> = kinds
        .iter()
        .enumerate()
        .filter(|(_, k)| **k == "message.part.delta")
        .map(|(i, _)| i)
        .collect();
    assert!(
        delta_positions[first_batch - 1] < gap && gap < delta_positions[first_batch],
        "the gap record sits between delta {} and {first_batch}: {kinds:?}",
        first_batch - 1
    );
    assert_eq!(kinds.last(), Some(&"session.idle"));

    // The same OpenCode process was re-adopted and still runs the session.
    let sv = rig.status();
    assert_eq!(sv["o"], 1, "{sv}");
    assert_eq!(sv["d"].as_u64(), Some(u64::from(fake_pid)), "{sv}");

    // A reader from the start gets the same stream from the control plane's store.
    let mut again = Vec::new();
    let mut sse = rig.open_stream(&x, None);
    assert_eq!(read_until(&mut sse, &mut again, |_| false), Some(true));
    assert_eq!(again, got);
}
