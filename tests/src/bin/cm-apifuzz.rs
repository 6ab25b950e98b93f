//! `cm-apifuzz`: HTTP API fuzzing of a real control plane for a time budget.
//!
//! ```text
//! cm-apifuzz [SECONDS] [--seed N] [--workers W]      # defaults: 60 s, seed 1, 4 workers
//! ```
//!
//! Starts `codemantle-control-plane` (from the same target directory, like the tests) on a
//! fresh data dir with a connected simulated daemon, fuzzes its API (see
//! `codemantle_tests::apifuzz` for what is generated and what every answer must satisfy),
//! prints the counts, and exits 1 if any answer broke a rule or the server died. The seed makes
//! the generated requests reproducible. `tests/fuzz/api-fuzz.sh` builds and runs it.

use std::process::ExitCode;
use std::time::Duration;

use codemantle_tests::apifuzz::{self, Settings};

const USAGE: &str = "usage: cm-apifuzz [SECONDS] [--seed N] [--workers W]";

fn main() -> ExitCode {
    let mut settings = Settings {
        seed: 1,
        duration: Duration::from_secs(60),
        workers: 4,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |what: &str| -> Option<u64> {
            let v = args.next().and_then(|v| v.parse().ok());
            if v.is_none() {
                eprintln!("{what} needs a number\n{USAGE}");
            }
            v
        };
        match arg.as_str() {
            "--seed" => match number("--seed") {
                Some(v) => settings.seed = v,
                None => return ExitCode::from(2),
            },
            "--workers" => match number("--workers") {
                Some(v) => settings.workers = usize::try_from(v).unwrap_or(1).max(1),
                None => return ExitCode::from(2),
            },
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            s => match s.parse::<u64>() {
                Ok(secs) => settings.duration = Duration::from_secs(secs),
                Err(_) => {
                    eprintln!("unexpected argument {s:?}\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
        }
    }
    let prepared = apifuzz::prepare();
    println!(
        "fuzzing {} for {:?} (seed {}, {} workers; the server log's tail is printed on failure)",
        prepared.target.addr, settings.duration, settings.seed, settings.workers,
    );
    let cp = &prepared.cp;
    let report = apifuzz::run(&prepared.target, &settings, &|| apifuzz::server_alive(cp));
    print!("{}", report.summary());
    if report.ok() {
        println!("OK");
        ExitCode::SUCCESS
    } else {
        println!("--- server log (last 40 lines) ---");
        let log = cp.log();
        let lines: Vec<&str> = log.lines().collect();
        for l in &lines[lines.len().saturating_sub(40)..] {
            println!("{l}");
        }
        ExitCode::FAILURE
    }
}
