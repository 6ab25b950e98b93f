//! CodeMantle wire protocol `v=1`, sans-io.
//!
//! This crate owns the message vocabulary shared by the daemon and the control plane, the two
//! codecs (CBOR in binary frames between native peers, JSON in text frames for CodeMantle 0.1.x
//! peers), the size limits, the handshake, and the canonical digest of config payloads.
//!
//! It must never do I/O: no sockets, no async runtime, no clock and no RNG of its own. Callers
//! pass the current time and random bytes in.
