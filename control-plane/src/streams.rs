//! Session output streams: the `sc` chunks a daemon sends for a prompt, de-duplicated by seq,
//! acknowledged with `sa`, kept in a bounded ring per stream and served to API readers
//! (`GET /sessions/:sid/stream`, SSE).
//!
//! # Keys and ownership
//!
//! One stream per prompt: the `x` the control plane puts in `sp` (and returns from
//! `POST /devices/:id/prompt`) is the stream id of the chunks the daemon sends back. State is
//! keyed by `(device, x)` and remembers the tenant of the connection that delivered it, and the
//! session the prompt was for when the prompt went through this control plane.
//!
//! # Exactly once, in order
//!
//! The daemon writes each chunk to disk before sending it and re-sends every unacknowledged
//! chunk, in order, after a reconnect. So:
//! - `q < next` is a duplicate: dropped, and acknowledged again (cumulatively);
//! - `q == next` is appended, then any buffered successors are drained;
//! - `q > next` (a gap; the daemon never skips on one link, but we are defensive) is held in a
//!   small out-of-order buffer and **not** acknowledged beyond `next - 1`, so if the buffer is
//!   full the chunk is dropped here but the daemon still has it and re-sends it later — nothing
//!   is lost silently.
//!
//! Acks are cumulative: every chunk is answered with `sa {x, q: next - 1}` (nothing before the
//! first chunk is in). A reader resumes by seq (`Last-Event-ID`), so it sees each chunk once.
//!
//! # Where chunks live: durable first, then acknowledged
//!
//! With a store ([`Streams::with_store`], what the server uses) every accepted chunk is
//! appended to the store ([`Store::append_stream_chunk`], keyed by tenant, device and `x`) and
//! the store is **flushed (fsync) before the `sa` goes out**: the daemon deletes a chunk from
//! its journal when it is acknowledged, so an acknowledged chunk must survive a `kill -9` of
//! the control plane.
//!
//! The flush is a **group commit on its own thread** ([`Streams::on_chunk_to`], what the
//! tunnel uses): a connection's task appends the chunk and goes on reading; the `stream-commit`
//! thread flushes once for every chunk appended since its previous flush (all streams, all
//! connections), then marks them durable and puts one cumulative `sa` per stream into each
//! connection's outbox ([`AckSink`]). Why: a flush costs ≈0.5–1 ms on the test machines, and
//! flushing per chunk on the connection task capped a session's output at ≈1 000 chunks/s
//! (≈4 MB/s of 4 KB events, measured by `cm-stream-bench`); with the commit thread, the cost of
//! one flush is shared by every chunk that arrived while the previous one ran. A failed flush
//! acknowledges nothing and is retried; the daemon keeps the chunks meanwhile (and re-sends
//! them after a reconnect). [`Streams::on_chunk`] is the synchronous form (flush, then return
//! the ack), for a connection that is no longer the device's current one, and for tests.
//!
//! The store keeps at most [`StreamsConfig::max_stored_bytes_per_stream`] per stream (oldest
//! evicted first, recorded as the stream's `first_kept`) and drops ended streams after
//! [`StreamsConfig::ended_retention`] (abandoned ones after [`StreamsConfig::idle_retention`]);
//! pruning runs on a helper thread at most every [`StreamsConfig::prune_every`].
//!
//! In memory, a ring of at most [`StreamsConfig::max_bytes_per_stream`] per stream and at most
//! [`StreamsConfig::max_streams`] streams (ended ones evicted first) is the hot cache for live
//! readers; a read before the ring, or of a stream not in memory (after a restart), goes to
//! the store. A stream not in memory is loaded from the store's metadata, so after a restart
//! the next expected seq is known and the daemon's re-sent duplicates are still dropped. A
//! reader that asks for chunks no longer held gets an explicit `truncated` range, never a
//! silent gap.
//!
//! Without a store ([`Streams::new`], unit tests) chunks live in the ring only, and a restart
//! loses what was acknowledged (the range before the first seq seen is reported truncated).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use codemantle_protocol::message::{StreamAck, StreamChunk};

use crate::store::{Store, StoredChunk, TenantId};

/// Limits of the in-memory stream buffers.
#[derive(Debug, Clone, Copy)]
pub struct StreamsConfig {
    /// Text kept per stream; older chunks are evicted (readers see `truncated`).
    pub max_bytes_per_stream: usize,
    /// Streams kept at once (ended ones are evicted first, then the least recently updated).
    pub max_streams: usize,
    /// Out-of-order chunks held per stream while waiting for a missing seq.
    pub max_out_of_order: usize,
    /// Text the store keeps per stream; older chunks are evicted (readers see `truncated`).
    pub max_stored_bytes_per_stream: u64,
    /// How long the store keeps an ended stream.
    pub ended_retention: Duration,
    /// How long the store keeps a stream that never ended, after its last chunk.
    pub idle_retention: Duration,
    /// How often (at most) the store is pruned.
    pub prune_every: Duration,
}

impl Default for StreamsConfig {
    fn default() -> StreamsConfig {
        StreamsConfig {
            max_bytes_per_stream: 4 << 20,
            max_streams: 1024,
            max_out_of_order: 64,
            max_stored_bytes_per_stream: 16 << 20,
            ended_retention: Duration::from_secs(24 * 3600),
            idle_retention: Duration::from_secs(7 * 24 * 3600),
            prune_every: Duration::from_secs(600),
        }
    }
}

/// One chunk as a reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub seq: u32,
    pub data: String,
    pub last: bool,
}

/// What a reader gets after a position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// Chunks `from..=to` are not held any more (evicted, or before a control-plane restart).
    Truncated {
        from: u32,
        to: u32,
    },
    Chunk(Chunk),
}

/// A read result: the items after the position, and whether the stream has ended.
#[derive(Debug, Default)]
pub struct Read {
    pub items: Vec<Item>,
    /// The stream's last chunk (`e: 1`) is in, and among what was read or before.
    pub ended: bool,
}

struct Stream {
    tenant: TenantId,
    session_id: Option<String>,
    /// Next seq expected in order.
    next: u32,
    /// Every seq below this one is durably stored (and may be acknowledged).
    durable: u32,
    /// First seq held in `ring` (everything below is evicted or was never seen).
    first_kept: u32,
    /// Whether any chunk was ever accepted (before that, `first_kept` is provisional).
    started: bool,
    ring: VecDeque<Chunk>,
    bytes: usize,
    out_of_order: BTreeMap<u32, (String, bool)>,
    ended: bool,
    touched: u64,
    watchers: Vec<async_channel::Sender<()>>,
}

impl Stream {
    fn new(tenant: TenantId, session_id: Option<String>, touched: u64) -> Stream {
        Stream {
            tenant,
            session_id,
            next: 0,
            durable: 0,
            first_kept: 0,
            started: false,
            ring: VecDeque::new(),
            bytes: 0,
            out_of_order: BTreeMap::new(),
            ended: false,
            touched,
            watchers: Vec::new(),
        }
    }

    /// Loads what the store knows of a stream not in memory (after a restart or an eviction).
    fn from_store(
        store: &dyn Store,
        tenant: &TenantId,
        device: &str,
        x: &str,
        touched: u64,
    ) -> Option<Stream> {
        let meta = match store.stream_meta(tenant, device, x) {
            Ok(m) => m?,
            Err(e) => {
                tracing::warn!(device, stream = x, error = %e, "cannot load a stream from the store");
                return None;
            }
        };
        let mut st = Stream::new(tenant.clone(), meta.session_id, touched);
        st.started = meta.started;
        st.next = meta.next_seq;
        st.durable = meta.next_seq;
        st.first_kept = meta.first_kept;
        st.ended = meta.ended;
        Some(st)
    }

    /// Adds an accepted chunk to the ring. Without a store, ring eviction is final (moves
    /// `first_kept`); with one, the evicted chunks are still read from the store.
    fn push(&mut self, seq: u32, data: String, last: bool, max_bytes: usize, stored: bool) {
        self.bytes += data.len();
        self.ring.push_back(Chunk { seq, data, last });
        self.next = seq.saturating_add(1);
        if !stored {
            self.durable = self.next;
        }
        if last {
            self.ended = true;
        }
        // Keep at least the newest chunk, so the end is always seen.
        while self.bytes > max_bytes && self.ring.len() > 1 {
            if let Some(old) = self.ring.pop_front() {
                self.bytes -= old.data.len();
                if !stored {
                    self.first_kept = old.seq.saturating_add(1);
                }
            }
        }
    }

    fn notify(&mut self) {
        self.watchers.retain(|w| match w.try_send(()) {
            Ok(()) | Err(async_channel::TrySendError::Full(())) => true,
            Err(async_channel::TrySendError::Closed(())) => false,
        });
    }
}

/// Where the commit thread delivers a connection's acks (the tunnel's connection).
pub trait AckSink: Send + Sync {
    /// Queue `sa` for the device.
    fn send_ack(&self, ack: StreamAck);
}

impl AckSink for crate::tunnel::hub::Conn {
    fn send_ack(&self, ack: StreamAck) {
        match crate::tunnel::hub::encode_frame(
            &codemantle_protocol::message::Message::StreamAck(ack),
            self.codec(),
        ) {
            Ok(frame) => self.push_frame(frame),
            Err(e) => {
                tracing::error!(device = %self.device_id(), error = %e, "cannot encode an sa")
            }
        }
    }
}

/// An ack waiting for the flush that makes its chunks durable.
struct PendingAck {
    sink: std::sync::Weak<dyn AckSink>,
    device: Box<str>,
    x: String,
    /// Every seq below this one is stored (durable after the next flush).
    target: u32,
}

/// The group-commit queue: connections push, one thread flushes and acknowledges.
#[derive(Default)]
struct Committer {
    queue: Mutex<CommitQueue>,
    wake: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Default)]
struct CommitQueue {
    pending: Vec<PendingAck>,
    shutdown: bool,
}

/// Flush failures are retried after this pause (the daemon keeps everything unacknowledged).
const COMMIT_RETRY: Duration = Duration::from_millis(200);

impl Committer {
    fn lock(&self) -> MutexGuard<'_, CommitQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, ack: PendingAck) {
        self.lock().pending.push(ack);
        self.wake.notify_one();
    }

    fn shut_down(&self) {
        self.lock().shutdown = true;
        self.wake.notify_one();
    }

    /// Flush, then ack, for everything pushed meanwhile; until shut down.
    fn run(&self, store: &dyn Store, inner: &Mutex<Inner>) {
        loop {
            let batch = {
                let mut q = self.lock();
                while q.pending.is_empty() && !q.shutdown {
                    q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
                if q.pending.is_empty() {
                    return;
                }
                std::mem::take(&mut q.pending)
            };
            let started = std::time::Instant::now();
            let flushed = store.flush();
            tracing::debug!(
                acks = batch.len(),
                micros = started.elapsed().as_micros() as u64,
                "stream chunks flushed"
            );
            if let Err(e) = flushed {
                tracing::warn!(error = %e, chunks = batch.len(), "cannot flush stream chunks; not acknowledged yet, retrying");
                let mut q = self.lock();
                let newer = std::mem::replace(&mut q.pending, batch);
                q.pending.extend(newer);
                let shutdown = q.shutdown;
                drop(q);
                if shutdown {
                    return;
                }
                std::thread::sleep(COMMIT_RETRY);
                continue;
            }
            // One ack per stream: the highest target of the batch (acks are cumulative).
            let mut best: HashMap<(Box<str>, String), PendingAck> = HashMap::new();
            for p in batch {
                let key = (p.device.clone(), p.x.clone());
                match best.get(&key) {
                    Some(b) if b.target >= p.target => {}
                    _ => {
                        best.insert(key, p);
                    }
                }
            }
            for (_, p) in best {
                let durable = {
                    let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
                    mark_durable(&mut inner, &p.device, &p.x, p.target)
                };
                if let (Some(sink), Some(q)) = (p.sink.upgrade(), durable.checked_sub(1)) {
                    sink.send_ack(StreamAck {
                        stream_id: p.x,
                        seq: q,
                    });
                }
            }
        }
    }
}

/// Every seq below `target` of stream `x` of `device` is durable; the stream's durable mark
/// (`target` if the stream is no longer in memory).
fn mark_durable(inner: &mut Inner, device: &str, x: &str, target: u32) -> u32 {
    match inner.streams.get_mut(&(Box::from(device), Box::from(x))) {
        Some(st) => {
            st.durable = st.durable.max(target);
            st.durable
        }
        None => target,
    }
}

/// Every stream of this control plane.
pub struct Streams {
    config: StreamsConfig,
    inner: Arc<Mutex<Inner>>,
    store: Option<Arc<dyn Store>>,
    committer: std::sync::OnceLock<Arc<Committer>>,
}

impl Drop for Streams {
    /// Stops the commit thread after its last round (so a store reopened afterwards sees
    /// every flush it made).
    fn drop(&mut self) {
        if let Some(c) = self.committer.get() {
            c.shut_down();
            let handle = c.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(h) = handle {
                let _ = h.join();
            }
        }
    }
}

#[derive(Default)]
struct Inner {
    streams: HashMap<(Box<str>, Box<str>), Stream>,
    clock: u64,
    last_prune_ms: u64,
}

impl Default for Streams {
    fn default() -> Streams {
        Streams::new(StreamsConfig::default())
    }
}

impl Streams {
    pub fn new(config: StreamsConfig) -> Streams {
        Streams {
            config,
            inner: Arc::new(Mutex::new(Inner::default())),
            store: None,
            committer: std::sync::OnceLock::new(),
        }
    }

    /// Streams whose chunks are stored durably in `store` before they are acknowledged.
    pub fn with_store(config: StreamsConfig, store: Arc<dyn Store>) -> Streams {
        Streams {
            config,
            inner: Arc::new(Mutex::new(Inner::default())),
            store: Some(store),
            committer: std::sync::OnceLock::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes in one `sc` from `device` (of `tenant`); returns the `sa` to send back, if any
    /// chunk of the stream is in yet. Synchronous: when the chunk was stored, the store is
    /// flushed before this returns (tests, and connections without an ack sink).
    pub fn on_chunk(
        &self,
        tenant: &TenantId,
        device: &str,
        chunk: StreamChunk,
    ) -> Option<StreamAck> {
        let (x, mut durable, flush_to) = self.accept(tenant, device, chunk);
        if let (Some(store), Some(target)) = (self.store.as_deref(), flush_to) {
            match store.flush() {
                Ok(()) => durable = self.mark_durable(device, &x, target),
                Err(e) => {
                    tracing::warn!(device, stream = %x, error = %e, "cannot flush stream chunks; not acknowledged");
                }
            }
        }
        durable.checked_sub(1).map(|q| StreamAck {
            stream_id: x,
            seq: q,
        })
    }

    /// [`Streams::on_chunk`] for a live connection: the chunk is stored at once, but the
    /// flush and the `sa` happen on the commit thread, which flushes once for every chunk that
    /// arrived meanwhile (on every connection) and then hands each stream's cumulative ack to
    /// `sink`. So the connection's task never waits for a disk; an ack still goes out only
    /// after the chunks it covers are durable. Returns an ack to send right away when nothing
    /// new was stored (a re-sent duplicate: acknowledged again with what is already durable).
    pub fn on_chunk_to(
        &self,
        tenant: &TenantId,
        device: &str,
        chunk: StreamChunk,
        sink: std::sync::Weak<dyn AckSink>,
    ) -> Option<StreamAck> {
        let (x, durable, flush_to) = self.accept(tenant, device, chunk);
        if let (Some(store), Some(target)) = (&self.store, flush_to) {
            self.committer(store).push(PendingAck {
                sink,
                device: device.into(),
                x,
                target,
            });
            return None;
        }
        durable.checked_sub(1).map(|q| StreamAck {
            stream_id: x,
            seq: q,
        })
    }

    /// The commit thread, started on first use.
    fn committer(&self, store: &Arc<dyn Store>) -> &Arc<Committer> {
        self.committer.get_or_init(|| {
            let committer = Arc::new(Committer::default());
            let (c, inner, store) = (committer.clone(), self.inner.clone(), store.clone());
            let spawned = std::thread::Builder::new()
                .name("stream-commit".into())
                .spawn(move || c.run(&*store, &inner));
            match spawned {
                Ok(h) => *committer.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(h),
                Err(e) => {
                // Without the thread nothing would ever be acknowledged: the daemon keeps the
                // chunks and re-sends them after a reconnect, so this is loud, not lossy.
                tracing::error!(error = %e, "cannot start the stream commit thread; session output will not be acknowledged");
                }
            }
            committer
        })
    }

    /// Every seq below `target` of `x` is durable; returns the stream's durable mark.
    fn mark_durable(&self, device: &str, x: &str, target: u32) -> u32 {
        mark_durable(&mut self.lock(), device, x, target)
    }

    /// De-duplicates and stores one chunk (without flushing). Returns the stream id, the seq
    /// below which everything is already durable, and — when something was stored — the
    /// durable mark a flush now reaches.
    fn accept(
        &self,
        tenant: &TenantId,
        device: &str,
        chunk: StreamChunk,
    ) -> (String, u32, Option<u32>) {
        let store = self.store.as_deref();
        let mut inner = self.lock();
        let max_streams = self.config.max_streams;
        let st = inner.get_or_insert(device, &chunk.stream_id, tenant, None, max_streams, store);
        if st.tenant != *tenant {
            // The device moved tenants (re-registered): start over under the new one.
            let fresh = store
                .and_then(|s| Stream::from_store(s, tenant, device, &chunk.stream_id, st.touched));
            *st = fresh.unwrap_or_else(|| Stream::new(tenant.clone(), None, st.touched));
        }
        let StreamChunk {
            stream_id,
            seq,
            last,
            data,
        } = chunk;
        if !st.started {
            // First chunk this control plane sees: after a restart the daemon re-sends from its
            // first unacknowledged seq; everything before it was acknowledged (and is lost).
            st.started = true;
            st.next = seq;
            st.durable = seq;
            st.first_kept = seq;
        }
        let mut accepted = Vec::new();
        if seq == st.next && !st.ended {
            accepted.push((seq, data, last));
            let (mut q, mut ended) = (seq.saturating_add(1), last);
            while !ended {
                let Some((data, last)) = st.out_of_order.remove(&q) else {
                    break;
                };
                accepted.push((q, data, last));
                q = q.saturating_add(1);
                ended = last;
            }
        } else if seq > st.next && !st.ended {
            if st.out_of_order.len() < self.config.max_out_of_order
                || st.out_of_order.contains_key(&seq)
            {
                st.out_of_order.insert(seq, (data, last));
            } else {
                tracing::debug!(device, stream = %stream_id, seq, "out-of-order buffer full; the daemon will re-send");
            }
        }
        let max_bytes = self.config.max_bytes_per_stream;
        let now = crate::time::now_ms();
        let mut appended = false;
        for (q, data, last) in accepted {
            if let Some(store) = store {
                let c = StoredChunk { seq: q, data, last };
                let max = self.config.max_stored_bytes_per_stream;
                match store.append_stream_chunk(tenant, device, &stream_id, &c, max, now) {
                    Ok(meta) => st.first_kept = st.first_kept.max(meta.first_kept),
                    Err(e) => {
                        // Not stored, so not accepted: the daemon keeps it and re-sends it.
                        tracing::warn!(device, stream = %stream_id, seq = q, error = %e, "cannot store a stream chunk");
                        break;
                    }
                }
                st.push(q, c.data, c.last, max_bytes, true);
            } else {
                st.push(q, data, last, max_bytes, false);
            }
            appended = true;
        }
        if appended {
            // Readers may see a chunk before it is durable: if the control plane dies now, the
            // daemon re-sends the same seq with the same text, and a reader resuming after it
            // skips it.
            st.notify();
        }
        let durable = st.durable;
        let target = st.next;
        if store.is_none() || !appended {
            return (stream_id, durable, None);
        }
        let prune =
            now.saturating_sub(inner.last_prune_ms) >= self.config.prune_every.as_millis() as u64;
        if prune {
            inner.last_prune_ms = now;
        }
        drop(inner);
        if prune {
            self.prune_in_background(now);
        }
        (stream_id, durable, Some(target))
    }

    fn prune_in_background(&self, now_ms: u64) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let ended_before = now_ms.saturating_sub(self.config.ended_retention.as_millis() as u64);
        let idle_before = now_ms.saturating_sub(self.config.idle_retention.as_millis() as u64);
        let spawned = std::thread::Builder::new()
            .name("stream-prune".into())
            .spawn(
                move || match store.prune_streams(ended_before, idle_before) {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(streams = n, "pruned old session output streams"),
                    Err(e) => tracing::warn!(error = %e, "cannot prune session output streams"),
                },
            );
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the stream pruning thread");
        }
    }

    /// Records that prompt `x` on `device` is for `session_id` (so readers can find it).
    pub fn register(&self, tenant: &TenantId, device: &str, x: &str, session_id: &str) {
        let store = self.store.as_deref();
        let mut inner = self.lock();
        let max_streams = self.config.max_streams;
        let st = inner.get_or_insert(device, x, tenant, Some(session_id), max_streams, store);
        if st.session_id.is_none() {
            st.session_id = Some(session_id.to_owned());
        }
        if let Some(store) = store {
            let now = crate::time::now_ms();
            if let Err(e) = store.register_stream(tenant, device, x, session_id, now) {
                tracing::warn!(device, stream = x, error = %e, "cannot record a stream's session");
            }
        }
    }

    /// The most recently registered or updated stream of `session_id` on `device`.
    pub fn latest_for_session(&self, device: &str, session_id: &str) -> Option<String> {
        let inner = self.lock();
        inner
            .streams
            .iter()
            .filter(|((d, _), s)| &**d == device && s.session_id.as_deref() == Some(session_id))
            .max_by_key(|(_, s)| s.touched)
            .map(|((_, x), _)| x.to_string())
    }

    /// Subscribes to stream `x` of `device` (created empty if unknown, so a reader may connect
    /// before the first chunk). `None` if the stream belongs to another tenant or session.
    pub fn watch(
        &self,
        tenant: &TenantId,
        device: &str,
        x: &str,
        session_id: &str,
    ) -> Option<async_channel::Receiver<()>> {
        let store = self.store.as_deref();
        let mut inner = self.lock();
        let max_streams = self.config.max_streams;
        let st = inner.get_or_insert(device, x, tenant, Some(session_id), max_streams, store);
        if st.tenant != *tenant || st.session_id.as_deref().is_some_and(|s| s != session_id) {
            return None;
        }
        let (tx, rx) = async_channel::bounded(1);
        st.watchers.push(tx);
        Some(rx)
    }

    /// Items of stream `x` after seq `after` (`None`: from the start), at most `max` chunks.
    pub fn read(&self, device: &str, x: &str, after: Option<u32>, max: usize) -> Read {
        let inner = self.lock();
        let Some(st) = inner.streams.get(&(Box::from(device), Box::from(x))) else {
            return Read::default();
        };
        let mut from = after.map_or(0, |a| a.saturating_add(1));
        let mut items = Vec::new();
        if st.started && from < st.first_kept {
            items.push(Item::Truncated {
                from,
                to: st.first_kept - 1,
            });
            from = st.first_kept;
        }
        let mut ended = st.ended && st.next <= from;
        let ring_first = st.ring.front().map_or(st.next, |c| c.seq);
        if let (Some(store), true) = (&self.store, from < ring_first && from < st.next) {
            // Before the hot ring (evicted from memory, or before a restart): the store has
            // every chunk from `first_kept` on.
            let tenant = st.tenant.clone();
            drop(inner);
            match store.stream_chunks_after(&tenant, device, x, from, max) {
                Ok(chunks) => {
                    if let Some(first) = chunks.first().map(|c| c.seq).filter(|&q| q > from) {
                        // Evicted from the store meanwhile.
                        items.push(Item::Truncated {
                            from,
                            to: first - 1,
                        });
                    }
                    for c in chunks {
                        ended |= c.last;
                        items.push(Item::Chunk(Chunk {
                            seq: c.seq,
                            data: c.data,
                            last: c.last,
                        }));
                    }
                }
                Err(e) => {
                    tracing::warn!(device, stream = x, error = %e, "cannot read stream chunks from the store");
                }
            }
            return Read { items, ended };
        }
        for c in st.ring.iter().filter(|c| c.seq >= from).take(max) {
            ended |= c.last;
            items.push(Item::Chunk(c.clone()));
        }
        Read { items, ended }
    }

    /// Number of streams held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.lock().streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Inner {
    fn get_or_insert(
        &mut self,
        device: &str,
        x: &str,
        tenant: &TenantId,
        session_id: Option<&str>,
        max_streams: usize,
        store: Option<&dyn Store>,
    ) -> &mut Stream {
        self.clock += 1;
        let now = self.clock;
        let key = (Box::from(device), Box::from(x));
        if !self.streams.contains_key(&key) {
            while self.streams.len() >= max_streams.max(1) {
                let victim = self
                    .streams
                    .iter()
                    .min_by_key(|(_, s)| (!s.ended, s.touched))
                    .map(|(k, _)| k.clone());
                match victim {
                    Some(k) => {
                        self.streams.remove(&k);
                    }
                    None => break,
                }
            }
            let loaded = store.and_then(|s| Stream::from_store(s, tenant, device, x, now));
            let st = loaded
                .unwrap_or_else(|| Stream::new(tenant.clone(), session_id.map(str::to_owned), now));
            self.streams.insert(key.clone(), st);
        }
        let st = self.streams.get_mut(&key).expect("inserted above");
        st.touched = now;
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(q: u32, d: &str, last: bool) -> StreamChunk {
        StreamChunk {
            stream_id: "xstream01".into(),
            seq: q,
            last,
            data: d.into(),
        }
    }

    fn seqs(r: &Read) -> Vec<u32> {
        r.items
            .iter()
            .filter_map(|i| match i {
                Item::Chunk(c) => Some(c.seq),
                Item::Truncated { .. } => None,
            })
            .collect()
    }

    #[test]
    fn duplicates_are_dropped_and_gaps_wait() {
        let t = TenantId::parse("t").expect("tenant");
        let s = Streams::default();
        assert_eq!(
            s.on_chunk(&t, "d", chunk(0, "a", false)).map(|a| a.seq),
            Some(0)
        );
        assert_eq!(
            s.on_chunk(&t, "d", chunk(0, "a", false)).map(|a| a.seq),
            Some(0)
        );
        // A gap: held, not acknowledged.
        assert_eq!(
            s.on_chunk(&t, "d", chunk(2, "c", false)).map(|a| a.seq),
            Some(0)
        );
        assert_eq!(seqs(&s.read("d", "xstream01", None, 100)), vec![0]);
        assert_eq!(
            s.on_chunk(&t, "d", chunk(1, "b", false)).map(|a| a.seq),
            Some(2)
        );
        assert_eq!(
            s.on_chunk(&t, "d", chunk(3, "d", true)).map(|a| a.seq),
            Some(3)
        );
        let r = s.read("d", "xstream01", None, 100);
        assert_eq!(seqs(&r), vec![0, 1, 2, 3]);
        assert!(r.ended);
        assert_eq!(seqs(&s.read("d", "xstream01", Some(1), 100)), vec![2, 3]);
        assert!(s.read("d", "xstream01", Some(3), 100).ended);
    }

    #[test]
    fn evicted_chunks_are_reported_as_truncated() {
        let t = TenantId::parse("t").expect("tenant");
        let s = Streams::new(StreamsConfig {
            max_bytes_per_stream: 4,
            ..StreamsConfig::default()
        });
        for q in 0..5 {
            s.on_chunk(&t, "d", chunk(q, "ab", false));
        }
        let r = s.read("d", "xstream01", None, 100);
        assert_eq!(r.items[0], Item::Truncated { from: 0, to: 2 });
        assert_eq!(seqs(&r), vec![3, 4]);
        // A stream first seen mid-way (control-plane restart) reports its head as truncated.
        s.on_chunk(
            &t,
            "d",
            StreamChunk {
                stream_id: "other0001".into(),
                ..chunk(7, "z", false)
            },
        );
        let r = s.read("d", "other0001", None, 100);
        assert_eq!(r.items[0], Item::Truncated { from: 0, to: 6 });
        assert_eq!(seqs(&r), vec![7]);
    }
}
