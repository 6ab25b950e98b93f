//! Sessions against a real (fake) OpenCode process in the real sandbox: start, status, prompt
//! with streamed output, reuse, stop. The fake is this test executable re-executed by the
//! process guard (see `session_support`); as root it runs as `nobody` in landlock.
//!
//! SAFETY: every file is inside each test's temp dir; only loopback ports of the fixture's
//! own range are bound.

mod session_support;

use std::time::Duration;

use codemantle_daemon::guard::process::{ProcessId, landlock_support, procfs};
use codemantle_protocol::message::Message;
use session_support::{
    World, collect_stream, kinds, prompt, records, start, status, stop, wait_until,
};

#[test]
fn fake_opencode_entry() {
    session_support::fake_opencode::main_if_requested();
}

const BASE: u16 = 42100;
const LONG: Duration = Duration::from_secs(20);

#[test]
fn start_prompt_stream_stop() {
    let w = World::new(BASE);
    let journal = w.journal();
    let m = w.manager(&journal);
    let streams = m.streams();
    streams.link_up();

    let sr = start(&m, "cpSessionA", "proj-a");
    assert!(sr.ok, "{sr:?}");
    assert_eq!(sr.session_id, "cpSessionA");
    assert_eq!(sr.reason, None);
    let url = sr.url.expect("editor URL");
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    assert!(url.contains("/session/ses_fake"), "{url}");

    let sessions = m.sessions();
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    let (lo, hi) = w.settings.port_range;
    assert!((lo..=hi).contains(&s.port), "{s:?}");
    assert!(s.process.is_alive());
    assert_eq!(m.ports(), [s.port]);
    if session_support::running_as_root() {
        // OpenCode runs as the unprivileged run_as user, not as the daemon's root.
        let proc_status =
            std::fs::read_to_string(format!("/proc/{}/status", s.process.pid)).unwrap();
        let uid = proc_status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uid.split_whitespace().skip(1).all(|u| u == "65534"),
            "{uid}"
        );
    }

    // sq: port, pid and the sandbox the guard obtained.
    let sv = status(&m, "proj-a");
    assert!(sv.running, "{sv:?}");
    assert_eq!(sv.session_id.as_deref(), Some("cpSessionA"));
    assert_eq!(sv.port, Some(s.port));
    assert_eq!(sv.pid, Some(s.process.pid as u32));
    let abi = landlock_support().abi().expect("landlock");
    assert_eq!(
        sv.protection.as_deref(),
        Some(
            format!(
                "landlock-v{abi}:fs+net{}",
                if abi >= 6 { "+scope" } else { "" }
            )
            .as_str()
        )
    );
    assert_eq!(sv.url.as_deref(), Some(url.as_str()));
    // Same folder spelled differently.
    assert!(status(&m, "./proj-a/").running);
    assert_eq!(status(&m, "proj-b").reason.as_deref(), Some("not_running"));
    assert_eq!(
        status(&m, "missing").reason.as_deref(),
        Some("invalid_folder_path")
    );

    // A prompt's events stream on x, in order, ending with the turn.
    assert_eq!(prompt(&m, "cpSessionA", "streamAAAA01", "emit 5"), None);
    let chunks = collect_stream(&streams, "streamAAAA01", LONG);
    let seqs: Vec<u32> = chunks.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, (0..chunks.len() as u32).collect::<Vec<_>>());
    assert!(chunks.last().unwrap().last);
    assert!(chunks[..chunks.len() - 1].iter().all(|c| !c.last));
    let recs = records(&chunks);
    let k = kinds(&recs);
    assert_eq!(k[0], "fake.prompt", "{k:?}");
    assert_eq!(
        k.iter().filter(|t| *t == "message.part.delta").count(),
        5,
        "{k:?}"
    );
    assert!(!k.iter().any(|t| t.starts_with("server.")), "{k:?}");
    assert_eq!(k.last().unwrap(), "session.idle");
    let deltas: Vec<&str> = recs
        .iter()
        .filter(|r| r["type"] == "message.part.delta")
        .map(|r| r["properties"]["delta"].as_str().unwrap())
        .collect();
    assert_eq!(
        deltas,
        ["part 0 ", "part 1 ", "part 2 ", "part 3 ", "part 4 "]
    );

    // The password reached OpenCode (it answers us) and never reaches the stream; OpenCode's
    // own session id is accepted as well as ours.
    let opencode_id = sessions[0].opencode_id.clone().unwrap();
    assert_eq!(
        prompt(
            &m,
            &opencode_id,
            "streamAAAA03",
            "env OPENCODE_SERVER_PASSWORD emit 0"
        ),
        None
    );
    let recs = records(&collect_stream(&streams, "streamAAAA03", LONG));
    let env = recs.iter().find(|r| r["type"] == "fake.env").unwrap();
    assert_eq!(env["properties"]["value"], "***REDACTED***", "{env}");

    // A re-sent sp (same stream id) is not prompted again.
    let before = m.log_tail(1600).len();
    assert_eq!(prompt(&m, "cpSessionA", "streamAAAA03", "emit 1"), None);
    std::thread::sleep(Duration::from_millis(300));
    assert!(m.log_tail(1600).len() <= before + 2);

    // st: the whole process group is gone.
    let process: ProcessId = s.process;
    let sr = stop(&m, "cpSessionA");
    assert!(sr.ok, "{sr:?}");
    assert!(!process.is_alive());
    assert!(procfs::group_members(process.pid).is_empty());
    assert!(m.sessions().is_empty());
    assert!(m.ports().is_empty());
    assert_eq!(status(&m, "proj-a").reason.as_deref(), Some("not_running"));
    let rec = m.record("cpSessionA").unwrap();
    assert!(rec.is_ended(), "{rec:?}");
    // Stopping again is fine; an unknown id is not.
    assert_eq!(
        stop(&m, "cpSessionA").reason.as_deref(),
        Some("session_not_running")
    );
    let unknown = stop(&m, "nope");
    assert!(!unknown.ok);
    assert_eq!(unknown.reason.as_deref(), Some("session_not_found"));
    // The replay log saw the lifecycle.
    let log = m.log_tail(1600).join("\n");
    assert!(log.contains("start session=cpSessionA"), "{log}");
    assert!(
        log.contains("terminate session=cpSessionA reason=stopped"),
        "{log}"
    );
    // It has the session's events, not its token stream (that is in the output stream).
    assert!(log.contains("session.idle"), "{log}");
    assert!(!log.contains("message.part.delta"), "{log}");
}

#[test]
fn a_second_start_for_the_same_folder_reuses_it() {
    let w = World::new(BASE + 200);
    let journal = w.journal();
    let m = w.manager(&journal);
    let first = start(&m, "sessOne", "proj-a");
    assert!(first.ok, "{first:?}");
    let again = start(&m, "sessTwo", "./proj-a");
    assert!(again.ok, "{again:?}");
    assert_eq!(again.session_id, "sessOne");
    assert_eq!(again.reason.as_deref(), Some("session_reused"));
    assert_eq!(again.url, first.url);
    assert_eq!(m.sessions().len(), 1);
    // The same id for another folder is refused; another folder gets its own server.
    let clash = start(&m, "sessOne", "proj-b");
    assert!(!clash.ok);
    assert_eq!(clash.reason.as_deref(), Some("session_id_in_use"));
    let other = start(&m, "sessThree", "proj-b");
    assert!(other.ok, "{other:?}");
    let sessions = m.sessions();
    assert_eq!(sessions.len(), 2);
    assert_ne!(sessions[0].port, sessions[1].port);
    for s in &sessions {
        assert!(stop(&m, &s.id).ok);
        assert!(procfs::group_members(s.process.pid).is_empty());
    }
}

#[test]
fn refusals_before_anything_starts() {
    let w = World::new(BASE + 400);
    let journal = w.journal();
    let m = w.manager(&journal);
    for folder in ["missing", "../outside", "proj-a/../../x"] {
        let sr = start(&m, "sessBad", folder);
        assert!(!sr.ok);
        assert_eq!(
            sr.reason.as_deref(),
            Some("invalid_folder_path"),
            "{folder}"
        );
    }
    assert!(m.sessions().is_empty());
    // A prompt for a session that does not run: an error, and its stream ends at once.
    let streams = m.streams();
    streams.link_up();
    let reply = prompt(&m, "noSuchSession", "streamBBBB01", "emit 1");
    assert!(
        matches!(&reply, Some(Message::Error(e)) if e.message.as_deref().unwrap_or("").contains("not running")),
        "{reply:?}"
    );
    let recs = records(&collect_stream(&streams, "streamBBBB01", LONG));
    assert_eq!(kinds(&recs), ["codemantle.prompt.failed"]);
}

#[test]
fn opencode_exiting_by_itself_ends_the_session() {
    let w = World::new(BASE + 600);
    let journal = w.journal();
    let m = w.manager(&journal);
    let streams = m.streams();
    streams.link_up();
    assert!(start(&m, "sessExit", "proj-a").ok);
    let process = m.sessions()[0].process;
    // A turn that never ends, then the process dies.
    assert_eq!(prompt(&m, "sessExit", "streamCCCC01", "hang emit 1"), None);
    wait_until("the prompt's first events", LONG, || {
        !streams.stored("streamCCCC01").is_empty()
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(process.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let chunks = collect_stream(&streams, "streamCCCC01", LONG);
    let recs = records(&chunks);
    let end = recs.last().unwrap();
    assert_eq!(end["type"], "codemantle.session.ended", "{recs:?}");
    assert_eq!(end["properties"]["reason"], "exited");
    wait_until("the session to be gone", LONG, || m.sessions().is_empty());
}
