//! CodeMantle host daemon.
//!
//! The host's local zero-trust boundary: it opens one outbound WebSocket to the control plane,
//! authenticates, and executes protocol commands. Nothing reaches the host except through a
//! guard: every path through the path guard (confined beneath a root, symlinks included), every
//! process through the process guard (allowlisted program, landlock, limits).
//!
//! It must never open an inbound port, run a command line from the wire, or let a path escape
//! its root.
//!
//! Map:
//! - [`config`]: `DaemonConfig` from TOML, `CODEMANTLE_*` env and flags; permission checks.
//! - [`guard::path`]: roots as open directory fds; every path resolved beneath them by the kernel.
//! - [`guard::process`]: allowlisted programs in a landlock sandbox as an unprivileged user.
//! - [`config_apply`]: config pushes (`cc`): digest, device-key signature, policy modes, apply
//!   path allowlist, atomic write with `.prev` rollback; session-init payloads kept per folder.
//! - [`fs`]: list (sorted, paged), mkdir, rmdir (recursive by fd), rename (no-overwrite default).
//! - [`git`]: the `g*` requests through the process guard (fixed argv, hardening prefix, input
//!   checked before git starts, `gq` lines redacted); enabled by allowlisting git.
//! - [`journal`]: sled-backed offline state; idempotency outcomes that survive restarts.
//! - [`backoff`]: sans-io reconnect delays with full jitter and an auth-rejected mode.
//! - [`redact`]: secret-name patterns and redaction for logs and `Debug`.
//! - [`session`]: OpenCode sessions through the process guard; their output durably streamed
//!   (`sc` persisted before sending, acknowledged by `sa`, re-sent after a reconnect).
//! - [`tunnel`]: the outbound WebSocket: TLS trust, h1/h2, CBOR-first with JSON fallback,
//!   heartbeat and liveness, reconnect.
//! - [`proxy`]: the port proxy (`pr` → `pv`/`ps`/`pe`) to running sessions' ports and the
//!   configured `exposed_ports` on 127.0.0.1, streamed with backpressure.
//! - [`dispatch`]: request → handler (the one registration `match`), idempotent mutations.

pub mod backoff;
pub mod config;
pub mod config_apply;
pub mod dispatch;
pub mod fs;
pub mod git;
pub mod guard;
pub mod journal;
pub mod proxy;
pub mod redact;
pub mod session;
pub mod tunnel;
