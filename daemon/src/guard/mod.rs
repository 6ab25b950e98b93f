//! Guards: the only doors from the wire to the host.
//!
//! Every handler that touches the host goes through one of these. A guard takes what the wire
//! asked for (a root alias and a relative path, a program and its arguments), checks it against
//! the operator's configuration, and hands back a capability (an open directory fd, a spawned
//! sandboxed child) that cannot reach further than the check allowed.
//!
//! - [`path`]: root-confined file access. Paths are resolved by the kernel *from an open root
//!   directory fd* (`openat2` with `RESOLVE_BENEATH`), never by string checks on real paths, so
//!   there is no window between "checked" and "used".
//! - [`dirents`]: directory listing via `getdents64` (64-bit safe on 32-bit ARM too).
//! - [`process`]: the only way to start a program: allowlisted by absolute path, own session,
//!   unprivileged user, rlimits, clean environment, landlock sandbox; identity by (pid, start
//!   time) so a restarted daemon never signals a recycled pid.

pub mod dirents;
pub mod path;
pub mod process;
