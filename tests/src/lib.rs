//! Helpers for end-to-end tests: start the real binaries on loopback, simulated daemons, a fake
//! OpenCode and a mock LLM. The tests themselves live in `tests/tests/`.
//!
//! - [`bins`]: where the real binaries are.
//! - [`harness`]: the real control plane and daemon binaries as processes on loopback.
//! - [`simdaemon`]: a simulated daemon (real handshake, in-memory file tree, fault injection).
//! - [`fake_opencode`]: a fake `opencode serve` (health, sessions, scripted prompts, SSE
//!   events, Basic auth) that any test executable can become.

pub mod bins;
pub mod fake_opencode;
pub mod harness;
pub mod simdaemon;
