//! The embedded store: sled under `--data-dir`.
//!
//! Layout (one sled tree per entity; keys are UTF-8 ids joined by NUL, which ids never contain;
//! values are JSON so the data stays inspectable and the schema can grow with serde defaults):
//!
//! | tree | key | value |
//! |---|---|---|
//! | `meta` | `event_seq`, `schema`, `probe` | u64 BE / bytes |
//! | `tenants` | tenant | [`Tenant`] |
//! | `api_tokens` | token id | [`ApiToken`] |
//! | `devices` | device id | [`Device`] |
//! | `devices_by_tenant` | tenant NUL device id | empty (index) |
//! | `legacy_tokens` | key id | [`LegacyToken`] |
//! | `templates` | tenant NUL template id NUL version | [`TemplateVersion`] |
//! | `mcp` | tenant NUL server id NUL version | [`McpEntry`] |
//! | `sessions` | tenant NUL session id | [`SessionRecord`] |
//! | `config_pushes` | tenant NUL device id NUL request id (decimal) | [`ConfigPushRecord`] |
//! | `policies` | tenant | [`PolicySnapshot`] |
//! | `idempotency` | tenant NUL key | [`IdempotencyRecord`] |
//! | `events` | tenant NUL seq (u64 BE) | [`Event`] |
//!
//! Every mutation runs in one sled transaction over the entity trees plus `meta` (the sequence
//! counter) and `events`, under a process-wide writer lock so that sequence numbers are handed
//! to the durable watermark ([`super::durable`]) in commit order. Events are served and
//! published only once a flush covers them; one flusher thread group-commits every write made
//! meanwhile. Entity changes wait for that flush before the call returns (a secret shown once
//! must not be lost to a crash); plain event appends (commands, connects) return at once, and
//! the tunnel waits for the flush only where it answers someone (a command's HTTP reply).
//!
//! # Hot-path writes
//!
//! A sled transaction seals the log's write buffer when it commits (`pin_log` rolls the io
//! buffer), and every sealed buffer is written and synced (`sync_file_range`) by sled's io
//! threads: one synced disk write per transaction. That is right for entity changes, but a
//! connect storm of 10 000 daemons, or 1 000 commands a second, would each pay one. So the
//! three hot-path writes skip transactions and use plain inserts under the writer lock (which
//! keeps sequence, commit and publish order), batched into sled's buffer like any non-durable
//! write:
//! - [`Store::append_event`] (command records): one insert;
//! - [`Store::device_connected`] / [`Store::device_disconnected`]: the event, then the device's
//!   record (first/last seen, agent, host). The two are not atomic: a crash may keep the event
//!   without the record update (never the other way round, as sled recovers a prefix of its
//!   log); both are last-seen bookkeeping that the next connect or disconnect rewrites.
//!
//! Plain appends do not write the counter in `meta`; on open the last sequence number is the
//! higher of the counter and the highest event key (one seek per tenant). After a crash that is
//! the last event sled recovered: every event a client saw was durable, so it is there, and
//! seqs past it (lost, and never served) are free to be assigned again.
//!
//! The data dir holds raw device secrets (HMAC keys): it is created 0700, and an existing one
//! with group/other access is tightened to 0700 with a warning.
//!
//! # A full disk
//!
//! sled appends to 512 KiB log segments, and once one of its writes fails for lack of space it
//! refuses every later write until the process restarts (the error is sticky), even after space
//! was freed. So writes stop *before* that: while the data dir's filesystem has less than
//! [`MIN_FREE_BYTES`] free, every write is refused with [`StoreError::StorageFull`] (HTTP 507
//! `storage_full`) and nothing reaches sled; reads go on, and writes resume by themselves once
//! space is freed. If sled runs out anyway (something else filled the reserve between check and
//! write), its error is reported as `StorageFull` with `restart_required`, the health probe
//! fails, and the systemd watchdog restarts the server.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ::sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use ::sled::{Transactional, Tree};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::durable::{Durability, FlushStats};
use super::*;
use crate::events::{EventBus, kind};
use crate::semver::Version;

const SCHEMA_VERSION: &[u8] = b"1";

/// Free space the store keeps in reserve on the data dir's filesystem: below it, writes are
/// refused (see "A full disk" above). A few sled segments' worth.
pub const MIN_FREE_BYTES: u64 = 4 * 1024 * 1024;
const KEY_EVENT_SEQ: &[u8] = b"event_seq";

/// sled's in-memory page cache. sled's own default is 1 GiB, which a control plane never
/// evicts from: every event it ever appended stays in memory until then (≈ 300 bytes per
/// command or connect, so a busy server's RSS grew by hundreds of MiB an hour), and at 10 000
/// devices each device's record and connect event cost ~1 KiB of RSS. 8 MiB holds the hot
/// pages (the tail of the event log, recently used credentials and tokens); everything else is
/// read back from the data dir's files, which the OS caches. `store_cache_mb` sets it.
pub const DEFAULT_CACHE_BYTES: u64 = 8 * 1024 * 1024;

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// The sled-backed [`Store`].
pub struct SledStore {
    /// The durable watermark, the events waiting for it, the live bus and the flusher (which
    /// holds the sled handle it flushes). Dropping it flushes what is pending and stops the
    /// flusher, so the data dir is unlocked once the store is dropped.
    durability: Durability,
    path: PathBuf,
    meta: Tree,
    tenants: Tree,
    api_tokens: Tree,
    devices: Tree,
    devices_by_tenant: Tree,
    legacy_tokens: Tree,
    templates: Tree,
    mcp: Tree,
    sessions: Tree,
    config_pushes: Tree,
    policies: Tree,
    idempotency: Tree,
    events: Tree,
    /// Session output streams: (tenant, device, x) → [`StreamMeta`] JSON.
    stream_meta: Tree,
    /// Their chunks: (tenant, device, x, NUL, seq BE u32) → flag byte (1 = last) + text.
    stream_chunks: Tree,
    /// Serialises writers so seq order == commit order == order handed to `durability`.
    /// Holds the last sequence number assigned.
    writer: Mutex<u64>,
}

impl SledStore {
    /// Opens (creating if needed) the store in `dir`. Fails with an operator-readable message
    /// if the dir cannot be created or another process holds it.
    pub fn open(dir: &Path) -> StoreResult<SledStore> {
        Self::open_with_cache(dir, DEFAULT_CACHE_BYTES)
    }

    /// [`SledStore::open`] with a page cache of `cache_bytes` (see [`DEFAULT_CACHE_BYTES`]).
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> StoreResult<SledStore> {
        prepare_data_dir(dir)?;
        let db = ::sled::Config::new()
            .path(dir.join("sled"))
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(500))
            .open()
            .map_err(|e| open_error(dir, e))?;
        let tree = |name: &str| {
            db.open_tree(name)
                .map_err(|e| StoreError::Backend(format!("opening tree {name}: {e}")))
        };
        let meta = tree("meta")?;
        let events = tree("events")?;
        match meta.get(b"schema").map_err(backend)? {
            None => {
                meta.insert(b"schema", SCHEMA_VERSION).map_err(backend)?;
            }
            Some(v) if v.as_ref() == SCHEMA_VERSION => {}
            Some(v) => {
                return Err(StoreError::Backend(format!(
                    "{} holds store schema {:?}, this build understands {:?}: use the matching \
                     codemantle-control-plane version",
                    dir.display(),
                    String::from_utf8_lossy(&v),
                    String::from_utf8_lossy(SCHEMA_VERSION)
                )));
            }
        }
        let seq = recover_seq(&meta, &events)?;
        // What sled recovered is the starting watermark, so it must be on disk: after a kill
        // -9 the last writes of the dead process may still sit in the page cache only (a power
        // cut now would take back events this process is about to serve).
        sync_tree(&dir.join("sled")).map_err(|e| {
            StoreError::Backend(format!(
                "cannot sync the store files in {} to disk: {e}",
                dir.display()
            ))
        })?;
        let flusher_db = db.clone();
        let durability = Durability::start(seq, EventBus::default(), move || {
            flusher_db.flush().map(|_| ()).map_err(backend)
        })?;
        Ok(SledStore {
            durability,
            meta,
            events,
            tenants: tree("tenants")?,
            api_tokens: tree("api_tokens")?,
            devices: tree("devices")?,
            devices_by_tenant: tree("devices_by_tenant")?,
            legacy_tokens: tree("legacy_tokens")?,
            templates: tree("templates")?,
            mcp: tree("mcp")?,
            sessions: tree("sessions")?,
            config_pushes: tree("config_pushes")?,
            policies: tree("policies")?,
            idempotency: tree("idempotency")?,
            stream_meta: tree("stream_meta")?,
            stream_chunks: tree("stream_chunks")?,
            path: dir.to_owned(),
            writer: Mutex::new(seq),
        })
    }

    /// Replaces the live bus with one whose subscribers may queue `queue` events (tests use a
    /// tiny queue to exercise the slow-subscriber path). Call before sharing the store.
    pub fn with_subscriber_queue(self, queue: usize) -> Self {
        self.durability.bus().set_queue(queue);
        self
    }

    /// Holds the store's flushes (none starts) until the guard is dropped: events appended
    /// meanwhile are written but not yet durable, so not served or published. For tests.
    pub fn hold_flushes(&self) -> super::durable::FlushHold<'_> {
        self.durability.hold_flushes()
    }

    /// How many flushes made how many events durable so far (group commit figures).
    pub fn flush_stats(&self) -> FlushStats {
        self.durability.stats()
    }

    /// The data dir this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Err(StorageFull)` while the data dir's filesystem has less than [`MIN_FREE_BYTES`]
    /// free for us. If the space cannot be read, the write goes ahead (sled reports for itself).
    fn ensure_space(&self) -> StoreResult<()> {
        let Some(free) = free_bytes(&self.path) else {
            return Ok(());
        };
        if free >= MIN_FREE_BYTES {
            return Ok(());
        }
        Err(StoreError::StorageFull {
            message: format!(
                "the disk holding the data dir {} is full ({} KiB free; the store keeps {} MiB \
                 in reserve): nothing was changed. Free space on that filesystem; writes resume \
                 by themselves",
                self.path.display(),
                free / 1024,
                MIN_FREE_BYTES / (1024 * 1024)
            ),
            restart_required: false,
        })
    }

    /// Runs `change` and the events it returns in one transaction over `trees` + meta + events,
    /// hands the events to the watermark (published once flushed) and, if `durable`, waits for
    /// the flush that covers them.
    fn write<T>(
        &self,
        trees: &[&Tree],
        durable: bool,
        change: impl Fn(&[TransactionalTree]) -> TxResult<(T, Vec<EventDraft>)>,
    ) -> StoreResult<(T, Vec<Event>)> {
        self.ensure_space()?;
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let start = *writer;
        let mut all: Vec<&Tree> = vec![&self.meta, &self.events];
        all.extend_from_slice(trees);
        let (value, events) = all
            .as_slice()
            .transaction(|views| {
                let (meta, events_tree) = (&views[0], &views[1]);
                let (value, drafts) = change(&views[2..])?;
                let mut seq = start;
                let mut events = Vec::with_capacity(drafts.len());
                for draft in drafts {
                    seq += 1;
                    let event = draft.into_event(seq);
                    events_tree.insert(event_key(&event.tenant, seq), encode_tx(&event)?)?;
                    events.push(event);
                }
                meta.insert(KEY_EVENT_SEQ, &seq.to_be_bytes())?;
                Ok((value, events))
            })
            .map_err(tx_error)?;
        *writer = start + events.len() as u64;
        for event in &events {
            self.durability.push(event.clone());
        }
        drop(writer);
        if durable && let Some(last) = events.last() {
            self.durability.when_durable(last.seq).wait_blocking()?;
        }
        Ok((value, events))
    }

    /// [`Self::write`] for the common case of exactly one event.
    fn write_one<T>(
        &self,
        trees: &[&Tree],
        change: impl Fn(&[TransactionalTree]) -> TxResult<(T, EventDraft)>,
    ) -> StoreResult<(T, Event)> {
        let (value, mut events) = self.write(trees, true, |views| {
            change(views).map(|(v, d)| (v, vec![d]))
        })?;
        let event = events
            .pop()
            .ok_or_else(|| StoreError::Backend("event missing after commit".into()))?;
        Ok((value, event))
    }

    fn get_json<T: DeserializeOwned>(&self, tree: &Tree, key: &[u8]) -> StoreResult<Option<T>> {
        tree.get(key)
            .map_err(backend)?
            .map(|v| decode(&v))
            .transpose()
    }

    fn scan_json<T: DeserializeOwned>(&self, tree: &Tree, prefix: &[u8]) -> StoreResult<Vec<T>> {
        tree.scan_prefix(prefix)
            .map(|kv| kv.map_err(backend).and_then(|(_, v)| decode(&v)))
            .collect()
    }

    fn device_unscoped(&self, id: &str) -> StoreResult<Option<Device>> {
        self.get_json(&self.devices, id.as_bytes())
    }

    /// Appends an event with a plain insert (see "Hot-path writes" in the module docs).
    fn append_plain(&self, draft: EventDraft) -> StoreResult<Event> {
        self.ensure_space()?;
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let event = self.insert_event(&mut writer, draft)?;
        drop(writer);
        Ok(event)
    }

    /// Under the writer lock: gives `draft` the next sequence number, inserts it (plain, not
    /// durable) and hands it to the watermark (published once flushed).
    fn insert_event(&self, writer: &mut u64, draft: EventDraft) -> StoreResult<Event> {
        let event = draft.into_event(*writer + 1);
        let value = serde_json::to_vec(&event).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.events
            .insert(event_key(&event.tenant, event.seq), value)
            .map_err(backend)?;
        *writer = event.seq;
        self.durability.push(event.clone());
        Ok(event)
    }

    /// Shared body of connect/disconnect: log the event, then update the device, with plain
    /// writes under the writer lock (see "Hot-path writes" in the module docs).
    fn touch_device(
        &self,
        device_id: &str,
        update: impl Fn(&mut Device),
        kind_: &str,
        at_ms: u64,
        detail: impl Fn(&Device) -> Value,
    ) -> StoreResult<Event> {
        self.ensure_space()?;
        // Under the writer lock, so no transactional writer (removal) runs in between the read
        // and the write: a removed device stays removed.
        let mut writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let Some(raw) = self.devices.get(device_id.as_bytes()).map_err(backend)? else {
            return Err(StoreError::NotFound { what: "device" });
        };
        let mut device: Device = decode(&raw)?;
        update(&mut device);
        let record = serde_json::to_vec(&device).map_err(|e| StoreError::Backend(e.to_string()))?;
        let draft = EventDraft::new(
            &device.tenant,
            at_ms,
            crate::events::ACTOR_SYSTEM,
            kind_,
            detail(&device),
        );
        let event = self.insert_event(&mut writer, draft)?;
        self.devices
            .insert(device_id.as_bytes(), record)
            .map_err(backend)?;
        drop(writer);
        Ok(event)
    }
}

impl Store for SledStore {
    fn probe(&self) -> StoreResult<()> {
        self.ensure_space()?;
        // Failing or hung flushes: events stay invisible, the store is not healthy.
        self.durability.health()?;
        let stamp = crate::time::now_ms().to_be_bytes();
        self.meta.insert(b"probe", &stamp).map_err(backend)?;
        match self.meta.get(b"probe").map_err(backend)? {
            Some(v) if v.as_ref() == stamp => Ok(()),
            _ => Err(StoreError::Backend(
                "probe read back a different value".into(),
            )),
        }
    }

    fn flush(&self) -> StoreResult<()> {
        self.durability.flush_round().wait_blocking()
    }

    fn check_writable(&self) -> StoreResult<()> {
        self.ensure_space()
    }

    fn create_tenant(&self, tenant: &Tenant, actor: &str) -> StoreResult<Event> {
        let (_, event) = self.write_one(&[&self.tenants], |v| {
            let key = tenant.id.as_str().as_bytes();
            if v[0].get(key)?.is_some() {
                return abort(StoreError::AlreadyExists { what: "tenant" });
            }
            v[0].insert(key, encode_tx(tenant)?)?;
            let detail = json!({ "tenant": tenant.id, "name": tenant.name });
            let draft = EventDraft::new(
                &tenant.id,
                tenant.created_ms,
                actor,
                kind::TENANT_CREATED,
                detail,
            );
            Ok(((), draft))
        })?;
        Ok(event)
    }

    fn tenant(&self, id: &TenantId) -> StoreResult<Option<Tenant>> {
        self.get_json(&self.tenants, id.as_str().as_bytes())
    }

    fn tenants(&self) -> StoreResult<Vec<Tenant>> {
        self.scan_json(&self.tenants, b"")
    }

    fn create_api_token(&self, token: &ApiToken, actor: &str) -> StoreResult<Event> {
        let (_, event) = self.write_one(&[&self.tenants, &self.api_tokens], |v| {
            if v[0].get(token.tenant.as_str().as_bytes())?.is_none() {
                return abort(StoreError::NotFound { what: "tenant" });
            }
            if v[1].get(token.id.as_bytes())?.is_some() {
                return abort(StoreError::AlreadyExists { what: "token" });
            }
            v[1].insert(token.id.as_bytes(), encode_tx(token)?)?;
            let detail = json!({ "token": token.id, "name": token.name, "role": token.role });
            let draft = EventDraft::new(
                &token.tenant,
                token.created_ms,
                actor,
                kind::TOKEN_CREATED,
                detail,
            );
            Ok(((), draft))
        })?;
        Ok(event)
    }

    fn api_token(&self, id: &str) -> StoreResult<Option<ApiToken>> {
        self.get_json(&self.api_tokens, id.as_bytes())
    }

    fn api_tokens(&self, tenant: &TenantId) -> StoreResult<Vec<ApiToken>> {
        let mut tokens: Vec<ApiToken> = self
            .scan_json::<ApiToken>(&self.api_tokens, b"")?
            .into_iter()
            .filter(|t| t.tenant == *tenant)
            .collect();
        tokens.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        Ok(tokens)
    }

    fn revoke_api_token(
        &self,
        tenant: &TenantId,
        id: &str,
        actor: &str,
        at_ms: u64,
    ) -> StoreResult<Option<(ApiToken, Event)>> {
        let (token, events) = self.write(&[&self.api_tokens], true, |v| {
            let Some(raw) = v[0].get(id.as_bytes())? else {
                return abort(StoreError::NotFound { what: "token" });
            };
            let mut token: ApiToken = decode_tx(&raw)?;
            if token.tenant != *tenant {
                return abort(StoreError::NotFound { what: "token" });
            }
            if token.revoked {
                return Ok((token, vec![]));
            }
            token.revoked = true;
            token.revoked_ms = Some(at_ms);
            v[0].insert(id.as_bytes(), encode_tx(&token)?)?;
            let detail = json!({ "token": token.id, "name": token.name, "role": token.role });
            let draft = EventDraft::new(tenant, at_ms, actor, kind::TOKEN_REVOKED, detail);
            Ok((token, vec![draft]))
        })?;
        Ok(events.into_iter().next().map(|e| (token, e)))
    }

    fn create_device(&self, device: &Device, actor: &str) -> StoreResult<Event> {
        let trees = [&self.tenants, &self.devices, &self.devices_by_tenant];
        let (_, event) = self.write_one(&trees, |v| {
            if v[0].get(device.tenant.as_str().as_bytes())?.is_none() {
                return abort(StoreError::NotFound { what: "tenant" });
            }
            if v[1].get(device.id.as_bytes())?.is_some() {
                return abort(StoreError::AlreadyExists { what: "device" });
            }
            v[1].insert(device.id.as_bytes(), encode_tx(device)?)?;
            v[2].insert(pair_key(device.tenant.as_str(), &device.id), &[])?;
            let detail = json!({
                "device": device.id,
                "name": device.name,
                "labels": device.labels,
            });
            let draft = EventDraft::new(
                &device.tenant,
                device.created_ms,
                actor,
                kind::DEVICE_ADDED,
                detail,
            );
            Ok(((), draft))
        })?;
        Ok(event)
    }

    fn device(&self, tenant: &TenantId, id: &str) -> StoreResult<Option<Device>> {
        Ok(self.device_unscoped(id)?.filter(|d| d.tenant == *tenant))
    }

    fn devices(&self, tenant: &TenantId) -> StoreResult<Vec<Device>> {
        let prefix = pair_key(tenant.as_str(), "");
        let mut out = Vec::new();
        for kv in self.devices_by_tenant.scan_prefix(&prefix) {
            let (k, _) = kv.map_err(backend)?;
            let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            // The index and the record are written in one transaction, but a plain read may
            // land between the two trees; a device mid-removal is simply skipped.
            if let Some(d) = self.device(tenant, &id)? {
                out.push(d);
            }
        }
        Ok(out)
    }

    fn remove_device(&self, tenant: &TenantId, id: &str, actor: &str) -> StoreResult<Event> {
        let (_, event) = self.write_one(&[&self.devices, &self.devices_by_tenant], |v| {
            let Some(raw) = v[0].get(id.as_bytes())? else {
                return abort(StoreError::NotFound { what: "device" });
            };
            let device: Device = decode_tx(&raw)?;
            if device.tenant != *tenant {
                return abort(StoreError::NotFound { what: "device" });
            }
            v[0].remove(id.as_bytes())?;
            v[1].remove(pair_key(tenant.as_str(), id))?;
            let detail = json!({ "device": id, "name": device.name });
            let draft = EventDraft::new(
                tenant,
                crate::time::now_ms(),
                actor,
                kind::DEVICE_REMOVED,
                detail,
            );
            Ok(((), draft))
        })?;
        Ok(event)
    }

    fn device_credential(&self, device_id: &str) -> StoreResult<Option<DeviceCredential>> {
        Ok(self.device_unscoped(device_id)?.map(|d| DeviceCredential {
            device_id: d.id,
            tenant: d.tenant,
            key_id: d.key_id,
            secret: d.secret,
        }))
    }

    fn device_connected(&self, device_id: &str, info: &ConnectInfo) -> StoreResult<Event> {
        self.touch_device(
            device_id,
            |d| {
                d.first_seen_ms.get_or_insert(info.at_ms);
                d.last_seen_ms = Some(info.at_ms);
                if info.agent_version.is_some() {
                    d.agent_version.clone_from(&info.agent_version);
                }
                let h = &info.host;
                if h.hostname.is_some() || h.os.is_some() || h.arch.is_some() {
                    d.host = h.clone();
                }
            },
            kind::DEVICE_CONNECTED,
            info.at_ms,
            |d| {
                json!({
                    "device": d.id,
                    "agent_version": d.agent_version,
                    "host": d.host,
                    "peer": info.peer,
                    "mode": info.mode,
                })
            },
        )
    }

    fn device_disconnected(&self, device_id: &str, at_ms: u64, reason: &str) -> StoreResult<Event> {
        self.touch_device(
            device_id,
            |d| d.last_seen_ms = Some(at_ms),
            kind::DEVICE_DISCONNECTED,
            at_ms,
            |d| json!({ "device": d.id, "reason": reason }),
        )
    }

    fn add_legacy_token(&self, token: &LegacyToken, actor: &str) -> StoreResult<Event> {
        let (_, event) = self.write_one(&[&self.tenants, &self.legacy_tokens], |v| {
            if v[0].get(token.tenant.as_str().as_bytes())?.is_none() {
                return abort(StoreError::NotFound { what: "tenant" });
            }
            if v[1].get(token.key_id.as_bytes())?.is_some() {
                return abort(StoreError::AlreadyExists {
                    what: "legacy token",
                });
            }
            v[1].insert(token.key_id.as_bytes(), encode_tx(token)?)?;
            let detail = json!({ "key_id": token.key_id, "devices": token.devices });
            let draft = EventDraft::new(
                &token.tenant,
                token.created_ms,
                actor,
                kind::LEGACY_TOKEN_ADDED,
                detail,
            );
            Ok(((), draft))
        })?;
        Ok(event)
    }

    fn legacy_token(&self, key_id: &str) -> StoreResult<Option<LegacyToken>> {
        self.get_json(&self.legacy_tokens, key_id.as_bytes())
    }

    fn active_legacy_tokens(&self) -> StoreResult<Vec<LegacyToken>> {
        let all: Vec<LegacyToken> = self.scan_json(&self.legacy_tokens, b"")?;
        Ok(all.into_iter().filter(|t| !t.revoked).collect())
    }

    fn legacy_tokens(&self, tenant: &TenantId) -> StoreResult<Vec<LegacyToken>> {
        let all: Vec<LegacyToken> = self.scan_json(&self.legacy_tokens, b"")?;
        Ok(all.into_iter().filter(|t| t.tenant == *tenant).collect())
    }

    fn revoke_legacy_token(
        &self,
        tenant: &TenantId,
        key_id: &str,
        actor: &str,
        at_ms: u64,
    ) -> StoreResult<Option<Event>> {
        let (_, events) = self.write(&[&self.legacy_tokens], true, |v| {
            let Some(raw) = v[0].get(key_id.as_bytes())? else {
                return abort(StoreError::NotFound {
                    what: "legacy token",
                });
            };
            let mut token: LegacyToken = decode_tx(&raw)?;
            if token.tenant != *tenant {
                return abort(StoreError::NotFound {
                    what: "legacy token",
                });
            }
            if token.revoked {
                return Ok(((), vec![]));
            }
            token.revoked = true;
            v[0].insert(key_id.as_bytes(), encode_tx(&token)?)?;
            let detail = json!({ "key_id": key_id });
            Ok((
                (),
                vec![EventDraft::new(
                    tenant,
                    at_ms,
                    actor,
                    kind::LEGACY_TOKEN_REVOKED,
                    detail,
                )],
            ))
        })?;
        Ok(events.into_iter().next())
    }

    fn publish_template(&self, t: &TemplateVersion, actor: &str) -> StoreResult<Event> {
        let key = triple_key(t.tenant.as_str(), &t.template_id, &t.version);
        let (_, event) = self.write_one(&[&self.tenants, &self.templates], |v| {
            if v[0].get(t.tenant.as_str().as_bytes())?.is_none() {
                return abort(StoreError::NotFound { what: "tenant" });
            }
            if v[1].get(&key)?.is_some() {
                return abort(StoreError::AlreadyExists {
                    what: "template version",
                });
            }
            v[1].insert(key.as_slice(), encode_tx(t)?)?;
            let detail = json!({
                "template": t.template_id,
                "version": t.version,
                "digest": t.digest,
            });
            let draft = EventDraft::new(
                &t.tenant,
                t.published_ms,
                actor,
                kind::TEMPLATE_PUBLISHED,
                detail,
            );
            Ok(((), draft))
        })?;
        Ok(event)
    }

    fn template_version(
        &self,
        tenant: &TenantId,
        template_id: &str,
        version: &str,
    ) -> StoreResult<Option<TemplateVersion>> {
        self.get_json(
            &self.templates,
            &triple_key(tenant.as_str(), template_id, version),
        )
    }

    fn template_versions(
        &self,
        tenant: &TenantId,
        template_id: &str,
    ) -> StoreResult<Vec<TemplateVersion>> {
        let mut all: Vec<TemplateVersion> = self.scan_json(
            &self.templates,
            &triple_key(tenant.as_str(), template_id, ""),
        )?;
        all.sort_by(|a, b| semver_order(&a.version, &b.version));
        Ok(all)
    }

    fn templates(&self, tenant: &TenantId) -> StoreResult<Vec<TemplateVersion>> {
        let mut all: Vec<TemplateVersion> =
            self.scan_json(&self.templates, &pair_key(tenant.as_str(), ""))?;
        all.sort_by(|a, b| {
            a.template_id
                .cmp(&b.template_id)
                .then_with(|| semver_order(&a.version, &b.version))
        });
        Ok(all)
    }

    fn put_mcp_entry(&self, entry: &McpEntry, actor: &str) -> StoreResult<Event> {
        let key = triple_key(entry.tenant.as_str(), &entry.server_id, &entry.version);
        let (_, event) = self.write_one(&[&self.tenants, &self.mcp], |v| {
            if v[0].get(entry.tenant.as_str().as_bytes())?.is_none() {
                return abort(StoreError::NotFound { what: "tenant" });
            }
            v[1].insert(key.as_slice(), encode_tx(entry)?)?;
            let detail = json!({ "server": entry.server_id, "version": entry.version });
            let draft = EventDraft::new(
                &entry.tenant,
                entry.updated_ms,
                actor,
                kind::MCP_ENTRY_SAVED,
                detail,
            );
            Ok(((), draft))
        })?;
        Ok(event)
    }

    fn mcp_entry(
        &self,
        tenant: &TenantId,
        server_id: &str,
        version: &str,
    ) -> StoreResult<Option<McpEntry>> {
        self.get_json(&self.mcp, &triple_key(tenant.as_str(), server_id, version))
    }

    fn mcp_entries(&self, tenant: &TenantId) -> StoreResult<Vec<McpEntry>> {
        self.scan_json(&self.mcp, &pair_key(tenant.as_str(), ""))
    }

    fn put_session(&self, s: &SessionRecord, actor: &str) -> StoreResult<Event> {
        let key = pair_key(s.tenant.as_str(), &s.session_id);
        let (_, event) = self.write_one(&[&self.sessions], |v| {
            v[0].insert(key.as_slice(), encode_tx(s)?)?;
            let detail = json!({
                "session": s.session_id,
                "device": s.device_id,
                "folder": s.folder,
                "state": s.state,
            });
            Ok((
                (),
                EventDraft::new(
                    &s.tenant,
                    s.updated_ms,
                    actor,
                    kind::SESSION_UPDATED,
                    detail,
                ),
            ))
        })?;
        Ok(event)
    }

    fn session(&self, tenant: &TenantId, session_id: &str) -> StoreResult<Option<SessionRecord>> {
        self.get_json(&self.sessions, &pair_key(tenant.as_str(), session_id))
    }

    fn sessions(
        &self,
        tenant: &TenantId,
        device_id: Option<&str>,
    ) -> StoreResult<Vec<SessionRecord>> {
        let all: Vec<SessionRecord> =
            self.scan_json(&self.sessions, &pair_key(tenant.as_str(), ""))?;
        Ok(all
            .into_iter()
            .filter(|s| device_id.is_none_or(|d| s.device_id == d))
            .collect())
    }

    fn put_config_push(&self, r: &ConfigPushRecord, actor: &str) -> StoreResult<Option<Event>> {
        let key = triple_key(r.tenant.as_str(), &r.device_id, &r.request_id.to_string());
        let (_, mut events) = self.write(&[&self.config_pushes], false, |v| {
            if !r.is_final() {
                if let Some(raw) = v[0].get(&key)? {
                    let existing: ConfigPushRecord = decode_tx(&raw)?;
                    if existing.is_final() {
                        return Ok(((), Vec::new()));
                    }
                }
            }
            v[0].insert(key.as_slice(), encode_tx(r)?)?;
            let detail = json!({
                "device": r.device_id,
                "request_id": r.request_id,
                "template": r.template_id,
                "version": r.template_version,
                "status": r.status,
                "digest": r.digest,
                "message": r.message,
            });
            let draft = EventDraft::new(
                &r.tenant,
                crate::time::now_ms(),
                actor,
                kind::CONFIG_PUSH,
                detail,
            );
            Ok(((), vec![draft]))
        })?;
        Ok(events.pop())
    }

    fn config_push(
        &self,
        tenant: &TenantId,
        device_id: &str,
        request_id: u32,
    ) -> StoreResult<Option<ConfigPushRecord>> {
        self.get_json(
            &self.config_pushes,
            &triple_key(tenant.as_str(), device_id, &request_id.to_string()),
        )
    }

    fn put_policy(
        &self,
        tenant: &TenantId,
        body: &Value,
        actor: &str,
        at_ms: u64,
    ) -> StoreResult<Event> {
        let snapshot = PolicySnapshot {
            tenant: tenant.clone(),
            body: body.clone(),
            updated_ms: at_ms,
            updated_by: actor.to_owned(),
        };
        let (_, event) = self.write_one(&[&self.tenants, &self.policies], |v| {
            if v[0].get(tenant.as_str().as_bytes())?.is_none() {
                return abort(StoreError::NotFound { what: "tenant" });
            }
            v[1].insert(tenant.as_str().as_bytes(), encode_tx(&snapshot)?)?;
            Ok((
                (),
                EventDraft::new(tenant, at_ms, actor, kind::POLICY_UPDATED, json!({})),
            ))
        })?;
        Ok(event)
    }

    fn policy(&self, tenant: &TenantId) -> StoreResult<Option<PolicySnapshot>> {
        self.get_json(&self.policies, tenant.as_str().as_bytes())
    }

    fn idempotency_claim(
        &self,
        tenant: &TenantId,
        key: &str,
        fingerprint: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> StoreResult<IdempotencyClaim> {
        self.ensure_space()?;
        let k = pair_key(tenant.as_str(), key);
        let fresh = IdempotencyRecord {
            tenant: tenant.clone(),
            key: key.to_owned(),
            fingerprint: fingerprint.to_owned(),
            created_ms: now_ms,
            expires_ms: now_ms.saturating_add(lease_ms),
            response: None,
        };
        let claim = self
            .idempotency
            .transaction(|t| {
                if let Some(raw) = t.get(&k)? {
                    let old: IdempotencyRecord = decode_tx(&raw)?;
                    if old.expires_ms > now_ms {
                        return Ok(if old.fingerprint != fingerprint {
                            IdempotencyClaim::Mismatch
                        } else if let Some(r) = old.response {
                            IdempotencyClaim::Replay(r)
                        } else {
                            IdempotencyClaim::InProgress
                        });
                    }
                }
                t.insert(k.as_slice(), encode_tx(&fresh)?)?;
                Ok(IdempotencyClaim::Claimed)
            })
            .map_err(tx_error)?;
        Ok(claim)
    }

    fn idempotency_complete(
        &self,
        tenant: &TenantId,
        key: &str,
        response: &StoredResponse,
        expires_ms: u64,
    ) -> StoreResult<()> {
        self.ensure_space()?;
        let k = pair_key(tenant.as_str(), key);
        self.idempotency
            .transaction(|t| {
                let Some(raw) = t.get(&k)? else {
                    return abort(StoreError::NotFound {
                        what: "idempotency record",
                    });
                };
                let mut rec: IdempotencyRecord = decode_tx(&raw)?;
                rec.response = Some(response.clone());
                rec.expires_ms = expires_ms;
                t.insert(k.as_slice(), encode_tx(&rec)?)?;
                Ok(())
            })
            .map_err(tx_error)?;
        self.durability.flush_round().wait_blocking()
    }

    fn idempotency_release(&self, tenant: &TenantId, key: &str) -> StoreResult<()> {
        self.idempotency
            .remove(pair_key(tenant.as_str(), key))
            .map(|_| ())
            .map_err(backend)
    }

    fn idempotency_purge(&self, now_ms: u64) -> StoreResult<usize> {
        let mut purged = 0;
        for kv in self.idempotency.iter() {
            let (k, v) = kv.map_err(backend)?;
            let rec: IdempotencyRecord = decode(&v)?;
            if rec.expires_ms <= now_ms {
                // Only delete what we read, so a concurrent fresh claim is kept.
                let swapped = self
                    .idempotency
                    .compare_and_swap(&k, Some(v), None as Option<&[u8]>)
                    .map_err(backend)?;
                purged += usize::from(swapped.is_ok());
            }
        }
        Ok(purged)
    }

    fn append_event(&self, draft: EventDraft) -> StoreResult<Event> {
        self.append_plain(draft)
    }

    fn events(&self, tenant: &TenantId, after: u64, limit: usize) -> StoreResult<Vec<Event>> {
        let durable = self.durability.durable();
        if after >= durable {
            return Ok(vec![]);
        }
        let start = event_key(tenant, after + 1);
        let end = event_key(tenant, durable);
        self.events
            .range(start..=end)
            .take(limit)
            .map(|kv| kv.map_err(backend).and_then(|(_, v)| decode(&v)))
            .collect()
    }

    fn recent_events(&self, tenant: &TenantId, limit: usize) -> StoreResult<Vec<Event>> {
        let durable = self.durability.durable();
        let mut events = self
            .events
            .range(event_key(tenant, 0)..=event_key(tenant, durable))
            .rev()
            .take(limit)
            .map(|kv| kv.map_err(backend).and_then(|(_, v)| decode(&v)))
            .collect::<StoreResult<Vec<Event>>>()?;
        events.reverse();
        Ok(events)
    }

    fn last_event_seq(&self) -> StoreResult<u64> {
        Ok(self.durability.durable())
    }

    fn when_durable(&self, seq: u64) -> DurableWait {
        self.durability.when_durable(seq)
    }

    fn when_all_durable(&self) -> DurableWait {
        self.durability.when_all_durable()
    }

    fn register_stream(
        &self,
        tenant: &TenantId,
        device_id: &str,
        x: &str,
        session_id: &str,
        now_ms: u64,
    ) -> StoreResult<StreamMeta> {
        let key = triple_key(tenant.as_str(), device_id, x);
        let mut meta = match self.stream_meta.get(&key).map_err(backend)? {
            Some(v) => decode::<StreamMeta>(&v)?,
            None => StreamMeta::new(None, now_ms),
        };
        if meta.session_id.is_none() {
            meta.session_id = Some(session_id.to_owned());
            meta.updated_ms = now_ms;
            let v = serde_json::to_vec(&meta)
                .map_err(|e| StoreError::Backend(format!("encoding record: {e}")))?;
            self.stream_meta.insert(key, v).map_err(backend)?;
        }
        Ok(meta)
    }

    fn append_stream_chunk(
        &self,
        tenant: &TenantId,
        device_id: &str,
        x: &str,
        chunk: &StoredChunk,
        max_bytes: u64,
        now_ms: u64,
    ) -> StoreResult<StreamMeta> {
        let key = triple_key(tenant.as_str(), device_id, x);
        let result = (&self.stream_meta, &self.stream_chunks).transaction(|(metas, chunks)| {
            let mut meta = match metas.get(&key)? {
                Some(v) => decode_tx::<StreamMeta>(&v)?,
                None => StreamMeta::new(None, now_ms),
            };
            if !meta.started {
                meta.started = true;
                meta.next_seq = chunk.seq;
                meta.first_kept = chunk.seq;
            }
            if chunk.seq < meta.next_seq || meta.ended {
                return Ok(meta);
            }
            if chunk.seq > meta.next_seq {
                return abort(StoreError::Conflict(format!(
                    "stream {x}: chunk {} is past the next expected {}",
                    chunk.seq, meta.next_seq
                )));
            }
            let mut v = Vec::with_capacity(chunk.data.len() + 1);
            v.push(u8::from(chunk.last));
            v.extend_from_slice(chunk.data.as_bytes());
            chunks.insert(chunk_key(&key, chunk.seq), v)?;
            meta.bytes += chunk.data.len() as u64;
            meta.next_seq = chunk.seq.saturating_add(1);
            meta.ended = chunk.last;
            meta.updated_ms = now_ms;
            // Oldest first; the newest chunk always stays (so the end is always seen).
            while meta.bytes > max_bytes && meta.first_kept < chunk.seq {
                if let Some(old) = chunks.remove(chunk_key(&key, meta.first_kept))? {
                    meta.bytes = meta
                        .bytes
                        .saturating_sub(old.len().saturating_sub(1) as u64);
                }
                meta.first_kept += 1;
            }
            metas.insert(key.as_slice(), encode_tx(&meta)?)?;
            Ok(meta)
        });
        result.map_err(tx_error)
    }

    fn stream_chunks_after(
        &self,
        tenant: &TenantId,
        device_id: &str,
        x: &str,
        from: u32,
        limit: usize,
    ) -> StoreResult<Vec<StoredChunk>> {
        let key = triple_key(tenant.as_str(), device_id, x);
        let start = chunk_key(&key, from);
        let end = chunk_key(&key, u32::MAX);
        let mut out = Vec::new();
        for item in self.stream_chunks.range(start..=end).take(limit) {
            let (k, v) = item.map_err(backend)?;
            let seq = k
                .get(k.len().saturating_sub(4)..)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_be_bytes)
                .ok_or_else(|| StoreError::Backend("corrupt stream chunk key".into()))?;
            let (flag, text) = v
                .split_first()
                .ok_or_else(|| StoreError::Backend("corrupt stream chunk".into()))?;
            let data = String::from_utf8(text.to_vec())
                .map_err(|_| StoreError::Backend("corrupt stream chunk text".into()))?;
            out.push(StoredChunk {
                seq,
                data,
                last: *flag == 1,
            });
        }
        Ok(out)
    }

    fn stream_meta(
        &self,
        tenant: &TenantId,
        device_id: &str,
        x: &str,
    ) -> StoreResult<Option<StreamMeta>> {
        self.get_json(
            &self.stream_meta,
            &triple_key(tenant.as_str(), device_id, x),
        )
    }

    fn latest_stream_for_session(
        &self,
        tenant: &TenantId,
        device_id: &str,
        session_id: &str,
    ) -> StoreResult<Option<String>> {
        let mut prefix = pair_key(tenant.as_str(), device_id);
        prefix.push(0);
        let mut best: Option<(u64, String)> = None;
        for item in self.stream_meta.scan_prefix(&prefix) {
            let (k, v) = item.map_err(backend)?;
            let meta: StreamMeta = decode(&v)?;
            if meta.session_id.as_deref() != Some(session_id) {
                continue;
            }
            let Ok(x) = std::str::from_utf8(&k[prefix.len()..]) else {
                continue;
            };
            if best.as_ref().is_none_or(|(at, _)| meta.updated_ms >= *at) {
                best = Some((meta.updated_ms, x.to_owned()));
            }
        }
        Ok(best.map(|(_, x)| x))
    }

    fn prune_streams(&self, ended_before_ms: u64, idle_before_ms: u64) -> StoreResult<usize> {
        let mut pruned = 0;
        for item in self.stream_meta.iter() {
            let (key, v) = item.map_err(backend)?;
            let meta: StreamMeta = decode(&v)?;
            let old = (meta.ended && meta.updated_ms < ended_before_ms)
                || meta.updated_ms < idle_before_ms;
            if !old {
                continue;
            }
            // Chunks first: a crash in between leaves metadata whose chunks are gone, which
            // the next prune removes; never chunks without metadata.
            let start = chunk_key(&key, 0);
            let end = chunk_key(&key, u32::MAX);
            for k in self.stream_chunks.range(start..=end).keys() {
                self.stream_chunks
                    .remove(k.map_err(backend)?)
                    .map_err(backend)?;
            }
            // Only if unchanged meanwhile (a late chunk revived it).
            let _ = self
                .stream_meta
                .compare_and_swap(&key, Some(&v), None as Option<&[u8]>)
                .map_err(backend)?;
            pruned += 1;
        }
        Ok(pruned)
    }

    fn subscribe(&self, tenant: Option<TenantId>) -> async_channel::Receiver<Event> {
        self.durability.bus().subscribe(tenant)
    }
}

/// Creates the data dir with mode 0700, or tightens an existing one.
fn prepare_data_dir(dir: &Path) -> StoreResult<()> {
    let io = |what: &str, e: std::io::Error| {
        StoreError::Backend(format!(
            "{what} data dir {}: {e}; pass --data-dir (or CODEMANTLE_DATA_DIR) pointing to a \
             directory this user can create and write",
            dir.display()
        ))
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("cannot create", e))?;
    let meta = std::fs::metadata(dir).map_err(|e| io("cannot inspect", e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            "data dir was accessible to group/others; it holds device secrets, tightening to 0700"
        );
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("cannot chmod 0700", e))?;
    }
    Ok(())
}

/// fsyncs every file under `dir` and the directories themselves.
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            sync_tree(&entry.path())?;
        } else if kind.is_file() {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

fn open_error(dir: &Path, e: ::sled::Error) -> StoreError {
    let msg = e.to_string();
    if msg.contains("lock") || msg.contains("WouldBlock") || msg.contains("temporarily unavailable")
    {
        StoreError::Backend(format!(
            "the data dir {} is in use by another process (a running server?): stop it before \
             running local admin commands, or use the HTTP API / `codemantle` CLI instead ({msg})",
            dir.display()
        ))
    } else {
        StoreError::Backend(format!("cannot open the store in {}: {msg}", dir.display()))
    }
}

fn pair_key(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len() + 1);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn triple_key(a: &str, b: &str, c: &str) -> Vec<u8> {
    let mut k = pair_key(a, b);
    k.push(0);
    k.extend_from_slice(c.as_bytes());
    k
}

/// The key of chunk `seq` of the stream whose metadata key is `stream`.
fn chunk_key(stream: &[u8], seq: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + 5);
    k.extend_from_slice(stream);
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn event_key(tenant: &TenantId, seq: u64) -> Vec<u8> {
    let mut k = tenant.as_str().as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Semver precedence; versions that are not semver sort first, by string.
fn semver_order(a: &str, b: &str) -> std::cmp::Ordering {
    match (Version::parse(a), Version::parse(b)) {
        (Some(x), Some(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

/// The last sequence number ever assigned: the counter in `meta` (written by transactional
/// writes) or the highest event key, whichever is higher (plain appends do not write the
/// counter). One seek per tenant: the last key of each `tenant NUL` range.
fn recover_seq(meta: &Tree, events: &Tree) -> StoreResult<u64> {
    let mut seq = match meta.get(KEY_EVENT_SEQ).map_err(backend)? {
        Some(v) => decode_seq(&v)?,
        None => 0,
    };
    let mut from: Vec<u8> = Vec::new();
    while let Some(kv) = events.range(from.as_slice()..).next() {
        let (key, _) = kv.map_err(backend)?;
        let Some(nul) = key.iter().position(|&b| b == 0) else {
            // Not an event key; step over it.
            from = key.to_vec();
            from.push(0);
            continue;
        };
        if let Some(last) = events.scan_prefix(&key[..=nul]).next_back() {
            let (last, _) = last.map_err(backend)?;
            if let Ok(b) = <[u8; 8]>::try_from(&last[nul + 1..]) {
                seq = seq.max(u64::from_be_bytes(b));
            }
        }
        // Just past every `tenant NUL ...` key.
        from = key[..nul].to_vec();
        from.push(1);
    }
    Ok(seq)
}

fn decode_seq(v: &[u8]) -> StoreResult<u64> {
    <[u8; 8]>::try_from(v)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Backend("corrupt event sequence counter".into()))
}

fn backend(e: ::sled::Error) -> StoreError {
    if let ::sled::Error::Io(io) = &e {
        if io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(libc::ENOSPC) {
            return StoreError::StorageFull {
                message: "the disk holding the data dir ran full during a write and the store \
                          stopped writing: free space on that filesystem, then restart the \
                          control plane (writes come back only after a restart)"
                    .into(),
                restart_required: true,
            };
        }
    }
    StoreError::Backend(e.to_string())
}

/// Bytes of `dir`'s filesystem this process may still write: `f_bavail`, or `f_bfree` for
/// root (which may use the blocks reserved for it). `None` if `statvfs` fails.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) with a NUL-terminated path into a zeroed struct we own; geteuid(2)
    // cannot fail.
    let (st, root) = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut st) != 0 {
            return None;
        }
        (st, libc::geteuid() == 0)
    };
    let blocks = if root { st.f_bfree } else { st.f_bavail };
    #[allow(clippy::useless_conversion)] // the field widths differ between targets
    Some(u64::from(blocks).saturating_mul(u64::from(st.f_frsize)))
}

fn tx_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => backend(e),
    }
}

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn decode<T: DeserializeOwned>(v: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(v).map_err(|e| {
        StoreError::Backend(format!(
            "corrupt record ({e}); restore the data dir from a backup"
        ))
    })
}

fn decode_tx<T: DeserializeOwned>(v: &[u8]) -> TxResult<T> {
    decode(v).map_err(ConflictableTransactionError::Abort)
}

fn encode_tx<T: Serialize>(v: &T) -> TxResult<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| {
        ConflictableTransactionError::Abort(StoreError::Backend(format!("encoding record: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_during_a_write_is_storage_full_and_asks_for_a_restart() {
        let full = backend(::sled::Error::Io(std::io::Error::from_raw_os_error(
            libc::ENOSPC,
        )));
        assert!(
            matches!(
                &full,
                StoreError::StorageFull {
                    restart_required: true,
                    ..
                }
            ),
            "{full:?}"
        );
        assert!(full.to_string().contains("restart"), "{full}");
        let other = backend(::sled::Error::Io(std::io::Error::from_raw_os_error(
            libc::EIO,
        )));
        assert!(matches!(other, StoreError::Backend(_)), "{other:?}");
    }

    #[test]
    fn free_space_is_readable_for_the_data_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(free_bytes(dir.path()).is_some());
        assert!(free_bytes(&dir.path().join("missing")).is_none());
    }
}
