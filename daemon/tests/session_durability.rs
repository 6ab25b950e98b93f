//! Durable session output and the session registry across "daemon restarts" (the session
//! manager and journal dropped and reopened over the same data dir, the OpenCode processes
//! left running), against the fake OpenCode in the real sandbox.
//!
//! SAFETY: every file is inside each test's temp dir; only loopback ports of the fixture's
//! own range are bound; the processes signalled are the fixture's own sessions.

mod session_support;

use std::time::Duration;

use codemantle_daemon::guard::process::procfs;
use codemantle_daemon::session::registry::SessionState;
use codemantle_protocol::message::StreamAck;
use nix::sys::signal::Signal;
use session_support::{
    World, collect_stream, kinds, prompt, records, start, stop, tiny_cap, wait_until,
};

#[test]
fn fake_opencode_entry() {
    session_support::fake_opencode::main_if_requested();
}

const BASE: u16 = 43100;
const LONG: Duration = Duration::from_secs(20);

fn ack(x: &str, q: u32) -> StreamAck {
    StreamAck {
        stream_id: x.to_owned(),
        seq: q,
    }
}

#[test]
fn output_is_stored_before_sending_and_resent_until_acknowledged() {
    let w = World::new(BASE);
    let journal = w.journal();
    let m = w.manager(&journal);
    let streams = m.streams();
    assert!(start(&m, "sessDurable", "proj-a").ok);
    assert_eq!(prompt(&m, "sessDurable", "streamDUR001", "emit 4"), None);

    // Nothing has been sent (no link pulled), yet the whole turn is in the journal.
    wait_until("the whole turn in the journal", LONG, || {
        streams
            .stored("streamDUR001")
            .last()
            .is_some_and(|c| c.last)
    });
    let stored = streams.stored("streamDUR001");
    let n = stored.len() as u32;
    assert!(n >= 7, "{stored:#?}");
    assert_eq!(m.streams().usage("sessDurable").chunks, u64::from(n));

    // First link: everything, in order.
    streams.link_up();
    let sent = collect_stream(&streams, "streamDUR001", LONG);
    assert_eq!(sent, stored);

    // The control plane acknowledged up to q=2, then the link dropped: the new link re-sends
    // 3.. and not what was acknowledged.
    m.ack(&ack("streamDUR001", 2));
    assert_eq!(streams.stored("streamDUR001").len() as u32, n - 3);
    streams.link_up();
    let resent = collect_stream(&streams, "streamDUR001", LONG);
    assert_eq!(
        resent.iter().map(|c| c.seq).collect::<Vec<_>>(),
        (3..n).collect::<Vec<_>>()
    );
    assert_eq!(resent[..], stored[3..]);

    // Everything acknowledged: nothing left to send on the next link.
    m.ack(&ack("streamDUR001", n - 1));
    assert!(streams.stored("streamDUR001").is_empty());
    assert_eq!(m.streams().usage("sessDurable").chunks, 0);
    streams.link_up();
    assert_eq!(streams.queued(), 0);
    // Acks for unknown streams or repeated acks are harmless.
    m.ack(&ack("streamNOPE01", 5));
    m.ack(&ack("streamDUR001", n - 1));

    assert!(stop(&m, "sessDurable").ok);
}

#[test]
fn the_cap_truncates_with_markers_never_silently() {
    let w = World::with_settings(BASE + 200, |s| s.limits = tiny_cap(6));
    let journal = w.journal();
    let m = w.manager(&journal);
    let streams = m.streams();
    streams.link_up();
    assert!(start(&m, "sessCapped", "proj-a").ok);
    assert_eq!(prompt(&m, "sessCapped", "streamCAP001", "emit 20"), None);
    let chunks = collect_stream(&streams, "streamCAP001", LONG);
    let seqs: Vec<u32> = chunks.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, (0..chunks.len() as u32).collect::<Vec<_>>());
    let recs = records(&chunks);
    let k = kinds(&recs);
    let cut = k
        .iter()
        .position(|t| t == "codemantle.output.truncated")
        .unwrap_or_else(|| panic!("no truncation marker: {k:?}"));
    assert_eq!(cut, 6, "{k:?}");
    // The end of the turn is never dropped, and the gap is counted right before it.
    assert_eq!(k.last().unwrap(), "session.idle", "{k:?}");
    let resumed = &recs[recs.len() - 2];
    assert_eq!(resumed["type"], "codemantle.output.resumed", "{k:?}");
    let dropped = resumed["properties"]["droppedEvents"].as_u64().unwrap();
    // fake.prompt, busy, 20 deltas, idle status, idle: 24 events; 6 kept before the cap.
    assert_eq!(dropped, 24 - 6 - 1, "{k:?}");
    assert!(stop(&m, "sessCapped").ok);
}

#[test]
fn a_restart_re_adopts_live_sessions_and_records_dead_ones() {
    let w = World::new(BASE + 400);
    let (alive, dead) = {
        let journal = w.journal();
        let m = w.manager(&journal);
        let streams = m.streams();
        assert!(start(&m, "sessAlive", "proj-a").ok);
        assert!(start(&m, "sessDead", "proj-b").ok);
        // A turn that is still running when the daemon goes away, with unacknowledged output.
        assert_eq!(prompt(&m, "sessAlive", "streamRST001", "hang emit 2"), None);
        wait_until("the running turn's output", LONG, || {
            streams.stored("streamRST001").len() >= 4
        });
        streams.flush().unwrap();
        let sessions = m.sessions();
        (sessions[0].clone(), sessions[1].clone())
    };
    // The daemon is gone; one OpenCode dies meanwhile.
    assert_eq!(alive.id, "sessAlive");
    dead.process.signal_group(Signal::SIGKILL).unwrap();
    wait_until("the killed session to die", LONG, || {
        !dead.process.is_alive() && procfs::group_members(dead.process.pid).is_empty()
    });

    let journal = w.journal();
    let m = w.manager(&journal);
    let streams = m.streams();
    let sessions = m.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:#?}");
    assert_eq!(sessions[0].id, "sessAlive");
    assert_eq!(sessions[0].process, alive.process);
    assert_eq!(sessions[0].port, alive.port);
    let record = m.record("sessDead").unwrap();
    assert!(
        matches!(&record.state, SessionState::Ended { reason, exit: None, .. } if reason == "gone_while_daemon_down"),
        "{record:?}"
    );
    assert_eq!(m.ports(), [alive.port]);

    // The unacknowledged output of the running turn is still there, and the restart's hole
    // is marked in the stream.
    streams.link_up();
    wait_until("the event stream to be re-subscribed", LONG, || {
        m.sessions()[0].events_connected
    });
    let stored = streams.stored("streamRST001");
    let recs = records(&stored);
    let k = kinds(&recs);
    assert_eq!(k[0], "fake.prompt", "{k:?}");
    assert_eq!(k.last().unwrap(), "codemantle.events.gap", "{k:?}");

    // The re-adopted OpenCode is reachable (its password survived) and streams again.
    assert_eq!(prompt(&m, "sessAlive", "streamRST002", "emit 2"), None);
    let chunks = collect_stream(&streams, "streamRST002", LONG);
    let k = kinds(&records(&chunks));
    // The hanging turn's stream was superseded by the new prompt.
    assert!(
        streams.stored("streamRST001").last().unwrap().last,
        "the superseded stream is closed"
    );
    assert_eq!(k.last().unwrap(), "session.idle", "{k:?}");
    assert_eq!(k.iter().filter(|t| *t == "message.part.delta").count(), 2);

    // A re-adopted process is not our child, and still stops cleanly.
    assert!(stop(&m, "sessAlive").ok);
    wait_until("the re-adopted group to be gone", LONG, || {
        procfs::group_members(alive.process.pid).is_empty()
    });
    assert!(m.sessions().is_empty());
    let record = m.record("sessAlive").unwrap();
    assert!(
        matches!(&record.state, SessionState::Ended { reason, .. } if reason == "stopped"),
        "{record:?}"
    );

    // A third start after all that: nothing left over from the first run interferes.
    drop(streams);
    drop(m);
    drop(journal);
    let journal = w.journal();
    let m = w.manager(&journal);
    assert!(m.sessions().is_empty());
    assert!(start(&m, "sessAgain", "proj-a").ok);
    assert!(stop(&m, "sessAgain").ok);
}

#[test]
fn a_session_exiting_while_the_daemon_is_down_ends_its_stream() {
    let w = World::new(BASE + 600);
    let process = {
        let journal = w.journal();
        let m = w.manager(&journal);
        assert!(start(&m, "sessGone", "proj-a").ok);
        assert_eq!(prompt(&m, "sessGone", "streamGON001", "hang emit 1"), None);
        let streams = m.streams();
        wait_until("output", LONG, || {
            !streams.stored("streamGON001").is_empty()
        });
        m.sessions()[0].process
    };
    process.signal_group(Signal::SIGKILL).unwrap();
    wait_until("the session to die", LONG, || !process.is_alive());
    let journal = w.journal();
    let m = w.manager(&journal);
    let streams = m.streams();
    streams.link_up();
    let chunks = collect_stream(&streams, "streamGON001", LONG);
    let recs = records(&chunks);
    let end = recs.last().unwrap();
    assert_eq!(end["type"], "codemantle.session.ended");
    assert_eq!(end["properties"]["reason"], "gone_while_daemon_down");
}
