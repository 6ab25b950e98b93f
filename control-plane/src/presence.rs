//! Which devices are connected right now.
//!
//! Presence is live, per-process state (a connection exists in exactly one process), so it is
//! not in the store; the store keeps the durable facts (first/last seen, agent version). The
//! tunnel fills the registry: [`Presence::set_online`] after a successful handshake, `touch` on
//! traffic, [`Presence::set_offline`] when the socket ends. The API reads it to report
//! `online`/`offline`/`never-seen`, and `/metrics` counts connected devices.
//!
//! Each connection gets a [`ConnectionId`]. When a device reconnects, the new connection
//! replaces the old one, and the old connection's late `set_offline` is ignored: without the id
//! a stale close would mark a connected device offline.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Identifies one connection of a device; returned by [`Presence::set_online`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u64);

/// What the registry knows about one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceState {
    Online {
        connection: ConnectionId,
        since_ms: u64,
        last_seen_ms: u64,
    },
    Offline {
        at_ms: u64,
    },
}

impl PresenceState {
    pub fn is_online(&self) -> bool {
        matches!(self, PresenceState::Online { .. })
    }

    /// Most recent moment the device was known alive.
    pub fn last_seen_ms(&self) -> u64 {
        match *self {
            PresenceState::Online { last_seen_ms, .. } => last_seen_ms,
            PresenceState::Offline { at_ms } => at_ms,
        }
    }
}

/// The presence registry. Implementations must be cheap: the API calls `get` per device.
pub trait Presence: Send + Sync + 'static {
    /// Marks `device` online from `since_ms`, replacing any previous connection.
    fn set_online(&self, device: &str, since_ms: u64) -> ConnectionId;
    /// Records traffic on `connection` (heartbeat, reply). Ignored for a stale connection.
    fn touch(&self, device: &str, connection: ConnectionId, at_ms: u64);
    /// Marks `device` offline if `connection` is still its current one; returns whether it was.
    fn set_offline(&self, device: &str, connection: ConnectionId, at_ms: u64) -> bool;
    /// Forgets a device entirely (it was removed).
    fn forget(&self, device: &str);
    fn get(&self, device: &str) -> Option<PresenceState>;
    /// Number of devices online now.
    fn online_count(&self) -> usize;
}

/// In-memory [`Presence`] for a single control-plane process.
#[derive(Default)]
pub struct MemoryPresence {
    devices: Mutex<HashMap<String, PresenceState>>,
    next_connection: AtomicU64,
}

impl MemoryPresence {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, PresenceState>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Presence for MemoryPresence {
    fn set_online(&self, device: &str, since_ms: u64) -> ConnectionId {
        let connection = ConnectionId(self.next_connection.fetch_add(1, Ordering::Relaxed) + 1);
        self.lock().insert(
            device.to_owned(),
            PresenceState::Online {
                connection,
                since_ms,
                last_seen_ms: since_ms,
            },
        );
        connection
    }

    fn touch(&self, device: &str, connection: ConnectionId, at_ms: u64) {
        if let Some(PresenceState::Online {
            connection: current,
            last_seen_ms,
            ..
        }) = self.lock().get_mut(device)
        {
            if *current == connection && at_ms > *last_seen_ms {
                *last_seen_ms = at_ms;
            }
        }
    }

    fn set_offline(&self, device: &str, connection: ConnectionId, at_ms: u64) -> bool {
        let mut devices = self.lock();
        match devices.get(device) {
            Some(PresenceState::Online { connection: c, .. }) if *c == connection => {
                devices.insert(device.to_owned(), PresenceState::Offline { at_ms });
                true
            }
            _ => false,
        }
    }

    fn forget(&self, device: &str) {
        self.lock().remove(device);
    }

    fn get(&self, device: &str) -> Option<PresenceState> {
        self.lock().get(device).copied()
    }

    fn online_count(&self) -> usize {
        self.lock().values().filter(|s| s.is_online()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_close_does_not_mark_a_reconnected_device_offline() {
        let p = MemoryPresence::new();
        let first = p.set_online("dev_a", 10);
        let second = p.set_online("dev_a", 20);
        assert!(!p.set_offline("dev_a", first, 25));
        assert!(p.get("dev_a").is_some_and(|s| s.is_online()));
        p.touch("dev_a", second, 30);
        assert_eq!(p.get("dev_a").map(|s| s.last_seen_ms()), Some(30));
        assert_eq!(p.online_count(), 1);
        assert!(p.set_offline("dev_a", second, 40));
        assert_eq!(p.get("dev_a"), Some(PresenceState::Offline { at_ms: 40 }));
        assert_eq!(p.online_count(), 0);
    }
}
