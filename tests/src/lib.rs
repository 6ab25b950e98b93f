//! Helpers for end-to-end tests: start the real binaries on loopback, simulated daemons, a fake
//! OpenCode and a mock LLM. The tests themselves live in `tests/tests/`.
//!
//! - [`apifuzz`]: a seeded HTTP API fuzzer for a real control plane (`cm-apifuzz`).
//! - [`bins`]: where the real binaries are.
//! - [`harness`]: the real control plane and daemon binaries as processes on loopback.
//! - [`simdaemon`]: a simulated daemon (real handshake, in-memory file tree, fault injection).
//! - [`fault`]: fault injection — signals, a small tmpfs, network namespaces and veth pairs.
//! - [`soak`]: the soak harness (`cm-soak`): everything above under faults, with invariants.
//! - [`fleet`]: many simulated daemons that reconnect with the daemon's full-jitter back-off.
//! - [`fake_opencode`]: a fake `opencode serve` (health, sessions, scripted prompts, SSE
//!   events, Basic auth) that any test executable can become.
//! - [`mock_llm`]: a mock OpenAI-compatible LLM, so the real `opencode serve` answers offline.
//! - [`session_rig`]: a control plane + daemon + one session on the fake OpenCode.

pub mod apifuzz;
pub mod bins;
pub mod fake_opencode;
pub mod fault;
pub mod fleet;
pub mod harness;
pub mod mock_llm;
pub mod session_rig;
pub mod simdaemon;
pub mod soak;
