//! A short run of the HTTP API fuzzer (`codemantle_tests::apifuzz`) against a real control
//! plane with a connected simulated daemon: malformed requests of every kind must be answered
//! with documented statuses and `{"error","message"}` bodies, and the server must stay up.
//! Longer runs: `tests/fuzz/api-fuzz.sh SECONDS`.

use std::time::Duration;

use codemantle_tests::apifuzz::{self, Settings};

#[test]
fn api_fuzz_short_run() {
    let prepared = apifuzz::prepare();
    let cp = &prepared.cp;
    let settings = Settings {
        seed: 0x5EED_0001,
        duration: Duration::from_secs(12),
        workers: 2,
    };
    let report = apifuzz::run(&prepared.target, &settings, &|| apifuzz::server_alive(cp));
    eprint!("{}", report.summary());
    assert!(
        report.ok(),
        "the API broke a rule under fuzzing:\n{}\n--- server log ---\n{}",
        report.summary(),
        cp.log()
    );
    // The run reached the handlers, not just the parser.
    assert!(report.requests >= 200, "only {} requests", report.requests);
    assert!(report.by_status.get(&200).copied().unwrap_or(0) > 0);
}
