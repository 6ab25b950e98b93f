//! Where the workspace's real binaries are, for tests that run them as processes.
//!
//! `cargo test --workspace` builds every member's binaries before any test runs, into the same
//! profile directory as the test executables (`target/<profile>/`, tests in its `deps/`), so
//! the binaries are found next to the running test rather than through `CARGO_BIN_EXE_*`,
//! which only names binaries of the test's own package.

use std::path::PathBuf;

/// The path of workspace binary `name` (e.g. `codemantle-daemon`) in the current profile.
///
/// Panics with what to run when the binary was not built.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let mut dir = exe
        .parent()
        .expect("test executable has a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace` (it builds every binary)",
        path.display()
    );
    path
}
