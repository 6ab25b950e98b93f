//! CodeMantle wire protocol `v=1`, sans-io.
//!
//! This crate owns the message vocabulary shared by the daemon and the control plane, the two
//! codecs (CBOR in binary frames between native peers, JSON in text frames for CodeMantle 0.1.x
//! peers), the size limits, the handshake, and the canonical digest of config payloads.
//!
//! It must never do I/O: no sockets, no async runtime, no clock and no RNG of its own. Callers
//! pass the current time and random bytes in.
//!
//! Map:
//! - [`message`]: one Rust type per `t`, the [`message::Message`] enum, the envelope.
//! - [`codec`]: CBOR (native, binary frames) and JSON (0.1.x compat, text frames) over the same types.
//! - [`limits`]: frame size, string lengths, counts; checked before allocating.
//! - [`error`]: wire error codes (`e` frames) and decode errors.
//! - [`handshake`]: key id, h1/h2 MACs, skew window, nonce replay cache, protocol floor.
//! - [`canonical`]: canonical JSON and the SHA-256/base64url digest of config payloads.
//! - [`config_signature`]: the device-key signature (`alg`/`sg`) of a config push.
//! - [`jit`]: the JIT credential token format.

pub mod canonical;
pub mod codec;
pub mod config_signature;
pub mod error;
pub mod handshake;
pub mod jit;
pub mod limits;
pub mod message;
