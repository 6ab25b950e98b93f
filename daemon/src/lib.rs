//! CodeMantle host daemon.
//!
//! The host's local zero-trust boundary: it opens one outbound WebSocket to the control plane,
//! authenticates, and executes protocol commands. Nothing reaches the host except through a
//! guard: every path through the path guard (confined beneath a root, symlinks included), every
//! process through the process guard (allowlisted program, landlock, limits).
//!
//! It must never open an inbound port, run a command line from the wire, or let a path escape
//! its root.
