//! The append-only event log: what changed, who did it, in which order.
//!
//! Every entity change appends its event **in the same atomic write** as the change (the store
//! does both in one transaction), so the log can never claim a change that did not happen or
//! miss one that did. Each event has a global, gap-free, monotonic sequence number; a tenant
//! sees the subsequence of its own events. Consumers resume by sequence number: `GET /events`
//! pages with `after`, the SSE stream replays after `Last-Event-ID` and then goes live.
//!
//! Nothing is visible before it is durable: the store serves and publishes an event only once
//! a flush has put it on disk (the durable watermark, `store::durable`), so a client never sees
//! an event that a crash could take back, or a seq that could later name another event.
//!
//! Live delivery is an in-process broadcast ([`EventBus`]) fed by the store's flusher **after**
//! the event is durable and in sequence order. Each subscriber has a bounded queue; a subscriber that falls behind is
//! dropped (its receiver ends) instead of slowing the writers, and resumes from the store by
//! sequence number. A multi-instance deployment replaces the bus, not its users.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::store::TenantId;

/// Event kinds. Kinds are open strings (new kinds must not break old readers); these are the
/// ones the control plane itself emits.
pub mod kind {
    pub const TENANT_CREATED: &str = "tenant.created";
    pub const DEVICE_ADDED: &str = "device.added";
    pub const DEVICE_REMOVED: &str = "device.removed";
    pub const DEVICE_CONNECTED: &str = "device.connected";
    pub const DEVICE_DISCONNECTED: &str = "device.disconnected";
    pub const TOKEN_CREATED: &str = "token.created";
    pub const TOKEN_REVOKED: &str = "token.revoked";
    pub const LEGACY_TOKEN_ADDED: &str = "legacy_token.added";
    pub const LEGACY_TOKEN_REVOKED: &str = "legacy_token.revoked";
    pub const TEMPLATE_PUBLISHED: &str = "template.published";
    pub const MCP_ENTRY_SAVED: &str = "mcp.saved";
    pub const SESSION_UPDATED: &str = "session.updated";
    pub const POLICY_UPDATED: &str = "policy.updated";
    pub const COMMAND: &str = "command";
    pub const CONFIG_PUSH: &str = "config.push";
}

/// Actor of changes made by the control plane itself (tunnel, housekeeping).
pub const ACTOR_SYSTEM: &str = "system";
/// Actor of changes made with the local admin subcommands on the data dir.
pub const ACTOR_LOCAL_ADMIN: &str = "local-admin";

/// A committed event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Global, gap-free, starts at 1.
    pub seq: u64,
    pub tenant: TenantId,
    pub ts_ms: u64,
    /// `token:<id>`, `system`, `local-admin`, later `user:<name>`.
    pub actor: String,
    pub kind: String,
    pub detail: Value,
}

/// An event before the store gives it a sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct EventDraft {
    pub tenant: TenantId,
    pub ts_ms: u64,
    pub actor: String,
    pub kind: String,
    pub detail: Value,
}

impl EventDraft {
    pub fn new(tenant: &TenantId, ts_ms: u64, actor: &str, kind: &str, detail: Value) -> Self {
        EventDraft {
            tenant: tenant.clone(),
            ts_ms,
            actor: actor.to_owned(),
            kind: kind.to_owned(),
            detail,
        }
    }

    pub fn into_event(self, seq: u64) -> Event {
        Event {
            seq,
            tenant: self.tenant,
            ts_ms: self.ts_ms,
            actor: self.actor,
            kind: self.kind,
            detail: self.detail,
        }
    }
}

/// One command dispatched to a device and its result; the tunnel records one per request with
/// [`crate::store::Store::append_event`] (and [`crate::metrics::Metrics::record_command`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRecord {
    pub tenant: TenantId,
    /// Who asked (`token:<id>`, ...).
    pub actor: String,
    pub device_id: String,
    /// Correlation id (`i`) of the request.
    pub request_id: String,
    /// Protocol message type (`t`), e.g. `dr`, `sq`, `gk`.
    pub command_type: String,
    /// `ok`, or an error code (`timeout`, `device_disconnected`, `E_PATH`, ...).
    pub outcome: String,
    pub duration: Duration,
    pub at_ms: u64,
}

impl CommandRecord {
    pub fn to_draft(&self) -> EventDraft {
        EventDraft::new(
            &self.tenant,
            self.at_ms,
            &self.actor,
            kind::COMMAND,
            json!({
                "device": self.device_id,
                "request_id": self.request_id,
                "type": self.command_type,
                "outcome": self.outcome,
                "duration_ms": u64::try_from(self.duration.as_millis()).unwrap_or(u64::MAX),
            }),
        )
    }
}

/// Records a finished device command: one `command` event (in the store, published live once
/// durable) and the `codemantle_commands_total` / `codemantle_command_duration_seconds`
/// metrics. It writes to the store, so call it from async code through `smol::unblock` (or the
/// tunnel's recorder thread); it does not wait for the flush — await
/// [`crate::store::Store::when_durable`] with the event's seq before answering the caller.
pub fn record_command(
    store: &dyn crate::store::Store,
    metrics: &crate::metrics::Metrics,
    record: &CommandRecord,
) -> crate::store::StoreResult<Event> {
    metrics.record_command(&record.command_type, &record.outcome, record.duration);
    store.append_event(record.to_draft())
}

/// How many events a live subscriber may have queued before it is dropped.
pub const SUBSCRIBER_QUEUE: usize = 1024;

struct Subscriber {
    tenant: Option<TenantId>,
    tx: async_channel::Sender<Event>,
}

/// In-process broadcast of committed events.
pub struct EventBus {
    subscribers: Mutex<Vec<Subscriber>>,
    queue: AtomicUsize,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::with_queue(SUBSCRIBER_QUEUE)
    }
}

impl EventBus {
    pub fn with_queue(queue: usize) -> Self {
        EventBus {
            subscribers: Mutex::new(Vec::new()),
            queue: AtomicUsize::new(queue.max(1)),
        }
    }

    /// Changes the queue length of subscribers that subscribe from now on.
    pub fn set_queue(&self, queue: usize) {
        self.queue.store(queue.max(1), Ordering::Relaxed);
    }

    /// Subscribes to committed events of one tenant (`Some`) or of all tenants (`None`, for
    /// internal consumers such as the tunnel reacting to `device.removed`). The receiver ends
    /// when the subscriber fell behind (or the bus is gone): resume from the store by seq.
    pub fn subscribe(&self, tenant: Option<TenantId>) -> async_channel::Receiver<Event> {
        let (tx, rx) = async_channel::bounded(self.queue.load(Ordering::Relaxed));
        self.lock().push(Subscriber { tenant, tx });
        rx
    }

    /// Delivers `event` to matching subscribers. Must be called once it is durable, in seq
    /// order (the store's flusher does).
    pub fn publish(&self, event: &Event) {
        self.lock().retain(|s| {
            if s.tenant.as_ref().is_some_and(|t| *t != event.tenant) {
                return !s.tx.is_closed();
            }
            // Full or closed: drop the subscriber; its receiver drains and then ends.
            s.tx.try_send(event.clone()).is_ok()
        });
    }

    /// Current number of live subscribers.
    pub fn subscriber_count(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        // A panic while holding this lock cannot leave the Vec inconsistent; keep going.
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, tenant: &str) -> Event {
        EventDraft::new(
            &TenantId::parse(tenant).expect("valid"),
            1,
            "system",
            "x",
            json!({}),
        )
        .into_event(seq)
    }

    #[test]
    fn filters_by_tenant_and_drops_slow_subscribers() {
        let bus = EventBus::with_queue(2);
        let a = bus.subscribe(Some(TenantId::parse("a").expect("valid")));
        let all = bus.subscribe(None);
        bus.publish(&ev(1, "a"));
        bus.publish(&ev(2, "b"));
        assert_eq!(a.try_recv().map(|e| e.seq), Ok(1));
        assert!(a.try_recv().is_err());
        // `all` now holds 2 events (its queue is full); the third drops it.
        bus.publish(&ev(3, "a"));
        assert_eq!(bus.subscriber_count(), 1);
        assert_eq!(all.try_recv().map(|e| e.seq), Ok(1));
        assert_eq!(all.try_recv().map(|e| e.seq), Ok(2));
        assert!(matches!(
            all.try_recv(),
            Err(async_channel::TryRecvError::Closed)
        ));
        assert_eq!(a.try_recv().map(|e| e.seq), Ok(3));
    }
}
