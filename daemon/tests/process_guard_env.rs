//! The child's environment is built from scratch: the daemon's secrets and `CODEMANTLE_*`
//! settings never reach it. A test binary of its own, because it changes this process's
//! environment (which is only safe while no other test thread runs).

mod process_guard_support;

use process_guard_support::{World, probe_main, running_as_root};

#[test]
fn probe_entry() {
    probe_main();
}

#[test]
fn daemon_secrets_never_reach_the_child() {
    // SAFETY: the only test in this binary that changes the environment; the other test
    // (`probe_entry`) reads it only through std, which serialises with `set_var`.
    unsafe {
        std::env::set_var("CODEMANTLE_DEVICE_KEY", "device-key-must-not-leak");
        std::env::set_var("CODEMANTLE_SERVER_URL", "wss://cp.example/ws");
        std::env::set_var("AGENT_AUTH_TOKEN", "token-must-not-leak");
        std::env::set_var("LD_PRELOAD", "/nonexistent/lib.so");
        std::env::set_var("LANG", "C.UTF-8");
        std::env::set_var("TZ", "UTC");
    }
    let w = World::with_config(|c| c.env_pass = vec!["LANG".to_owned(), "TZ".to_owned()]);
    let r = w.probe_with(&["env".to_owned()], |spec| {
        spec.extra_env
            .push(("OPENCODE_SESSION_HINT".to_owned(), "from-the-caller".into()));
    });
    let vars: Vec<&str> = r[0].split('\u{1}').collect();
    let names: Vec<&str> = vars.iter().map(|v| v.split('=').next().unwrap()).collect();
    let mut expected = vec![
        "HOME",
        "LANG",
        "OPENCODE_SESSION_HINT",
        "PATH",
        "TMPDIR",
        "TZ",
    ];
    if running_as_root() {
        expected.extend(["LOGNAME", "USER"]);
    }
    // libtest itself may add RUST_* variables in the re-executed probe; nothing else.
    let names: Vec<&str> = names
        .into_iter()
        .filter(|n| !n.starts_with("RUST_"))
        .collect();
    expected.sort_unstable();
    assert_eq!(names, expected, "{vars:?}");
    let joined = r[0].replace('\u{1}', "\n");
    assert!(!joined.contains("must-not-leak"), "{joined}");
    assert!(joined.contains(&format!("HOME={}", w.private.home.display())));
    assert!(joined.contains(&format!("TMPDIR={}", w.private.tmp.display())));
    assert!(joined.contains("PATH=/usr/local/bin:/usr/bin:/bin"));
    assert!(joined.contains("OPENCODE_SESSION_HINT=from-the-caller"));
    if running_as_root() {
        assert!(joined.contains("USER=nobody"));
    }
}
