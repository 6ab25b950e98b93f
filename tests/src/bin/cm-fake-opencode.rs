//! `cm-fake-opencode`: the fake `opencode serve` of [`codemantle_tests::fake_opencode`] as a
//! standalone program, for end-to-end tests that allowlist it as the daemon's `opencode`.
//!
//! The daemon starts it as `cm-fake-opencode serve --hostname 127.0.0.1 --port <port>` (with
//! `OPENCODE_SERVER_PASSWORD` set); it serves on 127.0.0.1 only, writes nothing to disk and
//! runs until killed. The prompt script (`emit N`, `size S`, `gap MS`, `hang`, `env NAME`) is
//! described in the library module.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let port = args
        .iter()
        .position(|a| a == "--port")
        .and_then(|i| args.get(i + 1))
        .and_then(|p| p.parse::<u16>().ok());
    let Some(port) = port else {
        eprintln!("usage: cm-fake-opencode serve [--hostname 127.0.0.1] --port <port>");
        std::process::exit(2);
    };
    let password = std::env::var("OPENCODE_SERVER_PASSWORD")
        .ok()
        .filter(|p| !p.is_empty());
    codemantle_tests::fake_opencode::serve(port, password)
}
