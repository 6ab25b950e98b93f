//! Persistence: the [`Store`] trait and its backends.
//!
//! Handlers and the tunnel talk to `dyn Store` only; no storage type appears in this trait, so
//! a Postgres backend can follow the embedded [`sled`](self::sled) one without touching callers.
//!
//! Rules every backend keeps:
//! - **Atomic change + event.** Each mutating method writes the entity change and its event in
//!   one transaction and returns the committed [`Event`].
//! - **Nothing is seen before it is durable.** An event is served ([`Store::events`],
//!   [`Store::recent_events`]) and published to the live bus ([`Store::subscribe`]) only once
//!   it is on disk, in sequence order: a client that saw seq N sees the same event N after any
//!   crash, and N is never handed to another event. Entity changes return only once durable;
//!   hot-path appends (commands, connects) return at once and callers that must not answer
//!   before the record is durable wait with [`Store::when_durable`] (many appends share one
//!   flush: group commit).
//! - **Tenant scoping.** Accessors that take a [`TenantId`] return `None`/`NotFound` for a
//!   resource of another tenant, exactly as for a missing one. The only unscoped lookups are the
//!   credential lookups the tunnel needs before it knows the tenant ([`Store::device_credential`],
//!   [`Store::legacy_token`]) and [`Store::api_token`] for authentication.
//! - **Sync methods.** They may block on disk; from async code call them through
//!   `smol::unblock` when the call can be slow (scans, writes).

pub mod durable;
pub mod model;
pub mod sled;

use serde_json::Value;

use crate::events::{Event, EventDraft};
pub use model::*;

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The tenant-scoped resource does not exist (or belongs to another tenant).
    #[error("{what} not found")]
    NotFound { what: &'static str },
    /// A resource with this identity already exists (ids are never reused).
    #[error("{what} already exists")]
    AlreadyExists { what: &'static str },
    /// The change is not allowed in the current state.
    #[error("{0}")]
    Conflict(String),
    /// The backend failed (disk, corruption, lock). The message names the data dir if relevant.
    #[error("store failure: {0}")]
    Backend(String),
    /// The disk holding the store is full: writes are refused, reads still work. `message`
    /// says what to do; `restart_required` is set when the backend stopped writing for good
    /// and only a restart (after freeing space) brings writes back.
    #[error("storage full: {message}")]
    StorageFull {
        message: String,
        restart_required: bool,
    },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A wait for events to become durable (see [`Store::when_durable`]): `.wait().await` from
/// async code, [`DurableWait::wait_blocking`] from a blocking one. Dropping it abandons the
/// wait, not the write.
#[must_use = "a DurableWait does nothing unless waited for"]
pub struct DurableWait(Option<async_channel::Receiver<StoreResult<()>>>);

impl DurableWait {
    /// Already durable.
    pub fn ready() -> DurableWait {
        DurableWait(None)
    }

    /// Resolves when the backend sends the outcome on the other end of `rx`.
    pub fn pending(rx: async_channel::Receiver<StoreResult<()>>) -> DurableWait {
        DurableWait(Some(rx))
    }

    pub async fn wait(self) -> StoreResult<()> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx.recv().await.unwrap_or_else(|_| Err(flusher_gone())),
        }
    }

    pub fn wait_blocking(self) -> StoreResult<()> {
        match self.0 {
            None => Ok(()),
            Some(rx) => rx.recv_blocking().unwrap_or_else(|_| Err(flusher_gone())),
        }
    }
}

fn flusher_gone() -> StoreError {
    StoreError::Backend(
        "the store closed before the write was known to be on disk; it may or may not have \
         been saved: check the event log after a restart"
            .into(),
    )
}

/// The control plane's persistent state. Object-safe; shared as `Arc<dyn Store>`.
pub trait Store: Send + Sync + 'static {
    // ---- health -------------------------------------------------------------------------

    /// Writes and reads back a probe key; `Err` means the store cannot serve requests
    /// ([`StoreError::StorageFull`] when it cannot write for lack of disk space).
    fn probe(&self) -> StoreResult<()>;

    /// Whether a write would be accepted now, without writing anything: `Err`
    /// ([`StoreError::StorageFull`]) when the disk is full. Callers that are about to do
    /// something they must record afterwards (a device command and its event) ask first.
    fn check_writable(&self) -> StoreResult<()> {
        Ok(())
    }

    /// Flushes buffered writes to disk (on shutdown, after local admin commands, before
    /// acknowledging stream chunks); afterwards every event appended before the call is
    /// durable and visible. Concurrent callers share flushes.
    fn flush(&self) -> StoreResult<()>;

    // ---- tenants ------------------------------------------------------------------------

    /// Creates a tenant (`AlreadyExists` if the id is taken). Event: `tenant.created`.
    fn create_tenant(&self, tenant: &Tenant, actor: &str) -> StoreResult<Event>;
    fn tenant(&self, id: &TenantId) -> StoreResult<Option<Tenant>>;
    fn tenants(&self) -> StoreResult<Vec<Tenant>>;

    // ---- API tokens ---------------------------------------------------------------------

    /// Stores a new token (`NotFound` if its tenant does not exist). Event: `token.created`.
    fn create_api_token(&self, token: &ApiToken, actor: &str) -> StoreResult<Event>;
    /// Unscoped lookup by token id, for authentication only.
    fn api_token(&self, id: &str) -> StoreResult<Option<ApiToken>>;
    /// Tokens of a tenant, oldest first.
    fn api_tokens(&self, tenant: &TenantId) -> StoreResult<Vec<ApiToken>>;
    /// Marks a token revoked. `Ok(None)` if it already was (nothing written).
    /// Event: `token.revoked`.
    fn revoke_api_token(
        &self,
        tenant: &TenantId,
        id: &str,
        actor: &str,
        at_ms: u64,
    ) -> StoreResult<Option<(ApiToken, Event)>>;

    // ---- devices ------------------------------------------------------------------------

    /// Registers a device (`AlreadyExists` if the id is taken in any tenant, `NotFound` if the
    /// tenant does not exist). Event: `device.added`.
    fn create_device(&self, device: &Device, actor: &str) -> StoreResult<Event>;
    fn device(&self, tenant: &TenantId, id: &str) -> StoreResult<Option<Device>>;
    /// Devices of a tenant, ordered by id.
    fn devices(&self, tenant: &TenantId) -> StoreResult<Vec<Device>>;
    /// Removes a device; its credential stops working at once. Event: `device.removed`.
    fn remove_device(&self, tenant: &TenantId, id: &str, actor: &str) -> StoreResult<Event>;
    /// **Tunnel only**: the handshake credential of a device id, whatever its tenant.
    fn device_credential(&self, device_id: &str) -> StoreResult<Option<DeviceCredential>>;
    /// **Tunnel only**: records a successful handshake (first/last seen, agent version, host
    /// facts). `NotFound` if the device was removed meanwhile. Event: `device.connected`.
    fn device_connected(&self, device_id: &str, info: &ConnectInfo) -> StoreResult<Event>;
    /// **Tunnel only**: records the end of a connection (last seen). Event: `device.disconnected`
    /// with `reason` in its detail.
    fn device_disconnected(&self, device_id: &str, at_ms: u64, reason: &str) -> StoreResult<Event>;

    // ---- legacy shared tokens (0.1.x VALID_TOKENS) --------------------------------------

    /// Event: `legacy_token.added` (detail has the key id, never the token).
    fn add_legacy_token(&self, token: &LegacyToken, actor: &str) -> StoreResult<Event>;
    /// **Tunnel only**: unscoped lookup by key id (`ak`).
    fn legacy_token(&self, key_id: &str) -> StoreResult<Option<LegacyToken>>;
    /// **Tunnel only**: every unrevoked legacy token, for handshakes that send the raw token
    /// (`at`) instead of a key id.
    fn active_legacy_tokens(&self) -> StoreResult<Vec<LegacyToken>>;
    fn legacy_tokens(&self, tenant: &TenantId) -> StoreResult<Vec<LegacyToken>>;
    /// Event: `legacy_token.revoked`; `Ok(None)` if it already was revoked.
    fn revoke_legacy_token(
        &self,
        tenant: &TenantId,
        key_id: &str,
        actor: &str,
        at_ms: u64,
    ) -> StoreResult<Option<Event>>;

    // ---- templates and MCP registry ------------------------------------------------------

    /// Publishes an immutable template version (`AlreadyExists` if that version exists).
    /// The caller validates the id and that `version` is semver. Event: `template.published`.
    fn publish_template(&self, template: &TemplateVersion, actor: &str) -> StoreResult<Event>;
    fn template_version(
        &self,
        tenant: &TenantId,
        template_id: &str,
        version: &str,
    ) -> StoreResult<Option<TemplateVersion>>;
    /// All versions of one template, ascending by semver (non-semver versions first, by string).
    fn template_versions(
        &self,
        tenant: &TenantId,
        template_id: &str,
    ) -> StoreResult<Vec<TemplateVersion>>;
    /// Every version of every template of a tenant, by id then semver.
    fn templates(&self, tenant: &TenantId) -> StoreResult<Vec<TemplateVersion>>;
    /// The highest version by semver precedence.
    fn latest_template(
        &self,
        tenant: &TenantId,
        template_id: &str,
    ) -> StoreResult<Option<TemplateVersion>> {
        Ok(self.template_versions(tenant, template_id)?.pop())
    }

    /// Creates or replaces `serverId@version`. Event: `mcp.saved`.
    fn put_mcp_entry(&self, entry: &McpEntry, actor: &str) -> StoreResult<Event>;
    fn mcp_entry(
        &self,
        tenant: &TenantId,
        server_id: &str,
        version: &str,
    ) -> StoreResult<Option<McpEntry>>;
    fn mcp_entries(&self, tenant: &TenantId) -> StoreResult<Vec<McpEntry>>;

    // ---- sessions -----------------------------------------------------------------------

    /// Creates or updates session metadata. Event: `session.updated` (state in detail).
    fn put_session(&self, session: &SessionRecord, actor: &str) -> StoreResult<Event>;
    fn session(&self, tenant: &TenantId, session_id: &str) -> StoreResult<Option<SessionRecord>>;
    /// Sessions of a tenant, optionally of one device.
    fn sessions(
        &self,
        tenant: &TenantId,
        device_id: Option<&str>,
    ) -> StoreResult<Vec<SessionRecord>>;

    // ---- session output streams ---------------------------------------------------------

    /// Records (or updates) the session of stream `x` before or after its first chunk. Creates
    /// the stream's metadata if missing; never changes its seqs.
    fn register_stream(
        &self,
        tenant: &TenantId,
        device_id: &str,
        x: &str,
        session_id: &str,
        now_ms: u64,
    ) -> StoreResult<StreamMeta>;
    /// Appends chunk `chunk.seq` of stream `x` if it is the next one expected (the first chunk
    /// of an unknown stream starts it at its seq; the range before it is truncated). A seq
    /// already accepted, or any chunk of an ended stream, is a duplicate: nothing is written.
    /// A seq past the next expected one is `Conflict` (callers hold gaps themselves). After
    /// the append, the oldest chunks are evicted while the stream holds more than `max_bytes`
    /// (the newest chunk always stays), moving `first_kept` up. Returns the new metadata.
    ///
    /// Not durable by itself: call [`Store::flush`] before acknowledging (one flush may cover
    /// a batch of appends).
    fn append_stream_chunk(
        &self,
        tenant: &TenantId,
        device_id: &str,
        x: &str,
        chunk: &StoredChunk,
        max_bytes: u64,
        now_ms: u64,
    ) -> StoreResult<StreamMeta>;
    /// Chunks of stream `x` with seq `>= from`, ascending, at most `limit`.
    fn stream_chunks_after(
        &self,
        tenant: &TenantId,
        device_id: &str,
        x: &str,
        from: u32,
        limit: usize,
    ) -> StoreResult<Vec<StoredChunk>>;
    fn stream_meta(
        &self,
        tenant: &TenantId,
        device_id: &str,
        x: &str,
    ) -> StoreResult<Option<StreamMeta>>;
    /// The id (`x`) of the most recently updated stream of `session_id` on `device_id`, for
    /// readers that name only the session (after a restart the in-memory index is empty).
    /// Scans that device's streams only. The default knows none.
    fn latest_stream_for_session(
        &self,
        tenant: &TenantId,
        device_id: &str,
        session_id: &str,
    ) -> StoreResult<Option<String>> {
        let _ = (tenant, device_id, session_id);
        Ok(None)
    }
    /// Deletes streams (metadata and chunks) that ended before `ended_before_ms`, or whose
    /// last change is older than `idle_before_ms` (abandoned: the daemon never finished them).
    /// Returns how many streams were deleted.
    fn prune_streams(&self, ended_before_ms: u64, idle_before_ms: u64) -> StoreResult<usize>;

    // ---- config pushes ------------------------------------------------------------------

    /// Records the status of a config push. A `pending` record never replaces a finished one
    /// (the answer may be recorded first), in which case nothing is written and `Ok(None)` is
    /// returned. Event: `config.push` with the status in its detail.
    fn put_config_push(&self, record: &ConfigPushRecord, actor: &str)
    -> StoreResult<Option<Event>>;
    fn config_push(
        &self,
        tenant: &TenantId,
        device_id: &str,
        request_id: u32,
    ) -> StoreResult<Option<ConfigPushRecord>>;

    // ---- policy -------------------------------------------------------------------------

    /// Replaces the tenant's policy snapshot. Event: `policy.updated`.
    fn put_policy(
        &self,
        tenant: &TenantId,
        body: &Value,
        actor: &str,
        at_ms: u64,
    ) -> StoreResult<Event>;
    fn policy(&self, tenant: &TenantId) -> StoreResult<Option<PolicySnapshot>>;

    // ---- idempotency --------------------------------------------------------------------

    /// Atomically claims `(tenant, key)` for a request with `fingerprint`, or reports what the
    /// first request with that key did. The claim itself expires after `lease_ms` (so a crash
    /// mid-request does not block the key for the whole retention); an expired record is
    /// replaced.
    fn idempotency_claim(
        &self,
        tenant: &TenantId,
        key: &str,
        fingerprint: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> StoreResult<IdempotencyClaim>;
    /// Stores the response of a claimed key, for replay until `expires_ms`.
    fn idempotency_complete(
        &self,
        tenant: &TenantId,
        key: &str,
        response: &StoredResponse,
        expires_ms: u64,
    ) -> StoreResult<()>;
    /// Releases a claimed key without a stored response (the request may be retried).
    fn idempotency_release(&self, tenant: &TenantId, key: &str) -> StoreResult<()>;
    /// Deletes expired records; returns how many.
    fn idempotency_purge(&self, now_ms: u64) -> StoreResult<usize>;

    // ---- events -------------------------------------------------------------------------

    /// Appends an event that has no entity change of its own (commands, ...). Returns once
    /// written, **before** it is durable: the event is served and published only when a flush
    /// covers it; [`Store::when_durable`] waits for that.
    fn append_event(&self, draft: EventDraft) -> StoreResult<Event>;
    /// Durable events of a tenant with `seq > after`, ascending, at most `limit`.
    fn events(&self, tenant: &TenantId, after: u64, limit: usize) -> StoreResult<Vec<Event>>;
    /// The last `limit` durable events of a tenant, ascending (a "tail").
    fn recent_events(&self, tenant: &TenantId, limit: usize) -> StoreResult<Vec<Event>>;
    /// The durable watermark: every event up to this seq is on disk, served and published;
    /// none after it is yet (0 if none).
    fn last_event_seq(&self) -> StoreResult<u64>;
    /// Resolves once the event with sequence number `seq` (and every one before it) is
    /// durable and published; an error if the flush failed (the event may then be lost).
    fn when_durable(&self, seq: u64) -> DurableWait {
        let _ = seq;
        DurableWait::ready()
    }
    /// [`Store::when_durable`] for every event appended before the call: a read barrier for
    /// "everything that happened before this request".
    fn when_all_durable(&self) -> DurableWait {
        DurableWait::ready()
    }
    /// Live events from now on, published once durable, in seq order (see
    /// [`crate::events::EventBus::subscribe`]).
    fn subscribe(&self, tenant: Option<TenantId>) -> async_channel::Receiver<Event>;
}
