//! Durable session output: every chunk is in sled before it is sent, and stays there until the
//! control plane acknowledges it.
//!
//! # Why
//!
//! 0.1.50 sent its few `sc` chunks back to back and ignored `sa`: a link that dropped mid-stream
//! lost output silently. Here the link is allowed to drop (and the daemon to restart) at any
//! moment without losing or reordering a byte of what OpenCode produced:
//!
//! - **Persist, then send.** [`StreamJournal::append_event`] writes the chunk to sled; the link
//!   pulls frames with [`StreamJournal::next_frame`], which makes sure the chunk is on disk
//!   (one fsync covers every chunk written so far, so a fast stream costs few of them) before
//!   handing it over.
//! - **Acks delete.** `sa {x, q}` acknowledges chunk `q` of stream `x` *and every earlier one*
//!   (cumulative: the link is one ordered WebSocket, so the control plane has them all); they
//!   are deleted.
//! - **Reconnect re-sends.** [`StreamJournal::link_up`] (called by the link right after each
//!   handshake) queues every unacknowledged chunk again, in the order it was written. The
//!   control plane may therefore see a chunk twice; `(x, q)` identifies it.
//! - **A cap, never a silent gap.** A control plane that stops acknowledging must not fill the
//!   disk. Each session's unacknowledged output is capped ([`StreamLimits`]); when an event does
//!   not fit, the stream gets a `codemantle.output.truncated` marker and further events are
//!   dropped (and counted) until acks make room; the next event that fits, or the end of the
//!   stream, is preceded by a `codemantle.output.resumed` marker saying how many events and
//!   bytes were dropped. Markers and a stream's last chunk are always written, so a reader
//!   always learns about the gap and always sees the end (`e: 1`).
//!
//! - **Chunks are filled** (the session manager's setting, "coalescing"). With it on, an
//!   event is appended to the stream's newest chunk while no flush has started since that chunk
//!   was opened, up to the 8 KiB limit; what does not fit opens the next chunk (an event may
//!   straddle two chunks: the stream text is one byte sequence, and 0.1.50 splits its log
//!   replay the same way). Chunks opened since the last flush live in memory; the next flush
//!   writes all of them, for every stream, in one sled transaction and never changes them
//!   again — so nothing of them was durable, sent or acknowledged before. An event read but
//!   still in memory when the daemon dies is lost, like one still in the socket from OpenCode;
//!   nothing sent ever is. OpenCode's deltas are tens of bytes and a tool result can be
//!   kilobytes: full chunks divide the per-chunk costs (sled write, frame, the control plane's
//!   store write, ack, SSE event) by as much. Latency does not grow: chunks are frozen as soon
//!   as a flush starts, which happens whenever the link is ready to send.
//!
//! # Stream text
//!
//! A stream's text (the `d` of its chunks, concatenated) is newline-delimited JSON: one
//! OpenCode event per line (`{"type":…,"properties":…}` as OpenCode sends it on `/event`),
//! plus CodeMantle's own `codemantle.*` records. Chunk boundaries carry no meaning: readers
//! concatenate. A chunk holds at most 8192 UTF-8 bytes (within the 8192-character wire limit);
//! an event is split across consecutive chunks where needed, never inside a UTF-8 character;
//! the cap admits or drops whole events.
//!
//! # Layout in sled
//!
//! - `stream_chunks`: `x ‖ 0x00 ‖ q (u32 BE)` → `order (u64 BE) ‖ last (u8) ‖ len(session)
//!   (u8) ‖ session ‖ text`. `order` is a daemon-wide counter: re-sends go in write order.
//! - `streams`: `x` → JSON [`StreamRecord`] (owning session, next `q`, closed, drop counters).
//!   Stream records are kept after the stream ends: a re-sent `sp` with the same `x` is
//!   recognised and not prompted again.
//!
//! Chunks and their stream's record are written in one sled transaction, so a crash never
//! leaves a `q` that the next chunk would reuse.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use codemantle_protocol::message::{Message, StreamChunk};
use serde::{Deserialize, Serialize};
use sled::Transactional as _;
use sled::transaction::ConflictableTransactionError;

use crate::journal::{Journal, JournalError};

/// Most UTF-8 bytes of text in one `sc` (0.1.50's `MAX_STREAM_CHUNK_BYTES`; the wire limit is
/// 8192 characters, and a character is at least one byte).
pub const MAX_CHUNK_BYTES: usize = 8192;

const TREE_CHUNKS: &str = "stream_chunks";
const TREE_STREAMS: &str = "streams";

/// The per-session cap on unacknowledged output (`[session] journal_max_bytes`,
/// `journal_max_chunks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    pub max_unacked_bytes: u64,
    pub max_unacked_chunks: u64,
}

impl Default for StreamLimits {
    fn default() -> StreamLimits {
        StreamLimits {
            max_unacked_bytes: 16 << 20,
            max_unacked_chunks: 8192,
        }
    }
}

/// What is stored per stream id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamRecord {
    /// The session whose output this is.
    pub session: String,
    /// The `q` of the next chunk.
    pub next_q: u32,
    /// The last chunk (`e: 1`) was written.
    pub closed: bool,
    /// While output is being dropped: events and bytes dropped so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<Dropped>,
}

/// Output dropped because the cap was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub events: u64,
    pub bytes: u64,
}

/// What [`StreamJournal::append_event`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored as this many chunks (markers included).
    Stored { chunks: usize },
    /// Dropped: the session's unacknowledged output is at its cap.
    Dropped,
    /// The stream is unknown or already ended.
    NoStream,
}

/// Unacknowledged output of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub chunks: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ChunkKey {
    stream: String,
    seq: u32,
}

#[derive(Debug, Default)]
struct State {
    next_order: u64,
    /// What the current link still has to send: order → chunk.
    pending: BTreeMap<u64, ChunkKey>,
    usage: HashMap<String, Usage>,
    streams: HashMap<String, StreamRecord>,
    /// Coalescing: each stream's chunks written since the last flush started — in memory
    /// only, written to sled (with the stream record, all streams in one transaction) when the
    /// next flush starts. Only the newest may still grow; the others are full.
    tails: HashMap<String, Vec<Tail>>,
    /// Chunks written by a flush and not sent yet, by order: the link sends them from here
    /// instead of reading them back from sled. At most [`READY_MAX_BYTES`] of text; what does
    /// not fit (a long offline spell) is read from sled when its turn comes.
    ready: HashMap<u64, StreamChunk>,
    ready_bytes: usize,
}

impl State {
    /// Counts a new chunk of `session`'s stream `x` against its cap and queues it for the link.
    fn queue_chunk(&mut self, order: u64, x: &str, seq: u32, session: &str, bytes: usize) {
        let usage = self.usage.entry(session.to_owned()).or_default();
        usage.chunks += 1;
        usage.bytes += bytes as u64;
        self.pending.insert(
            order,
            ChunkKey {
                stream: x.to_owned(),
                seq,
            },
        );
    }
}

/// The `q` of stream `x`'s next chunk; moves the record past it.
fn claim_seq(x: &str, record: &mut StreamRecord) -> Result<u32, StreamError> {
    let seq = record.next_q;
    record.next_q = seq
        .checked_add(1)
        .ok_or_else(|| StreamError::SequenceExhausted {
            stream: x.to_owned(),
            seq,
        })?;
    Ok(seq)
}

/// Most text kept in [`State::ready`].
const READY_MAX_BYTES: usize = 4 << 20;

/// An in-memory chunk of a stream; see [`State::tails`].
#[derive(Debug)]
struct Tail {
    seq: u32,
    order: u64,
    session: String,
    text: String,
    last: bool,
}

/// The durable output streams of every session; see the module doc. Shared by the session
/// manager (which appends and acks) and the tunnel link (which sends).
pub struct StreamJournal {
    chunks: sled::Tree,
    streams: sled::Tree,
    limits: StreamLimits,
    state: Mutex<State>,
    /// Chunks with an order below this are known to be on disk.
    flushed_below: Arc<AtomicU64>,
    /// A flush is running on the blocking pool.
    flushing: Arc<AtomicBool>,
    /// Small events are appended to the stream's last chunk while no flush covers it yet.
    coalesce: bool,
    wake_tx: async_channel::Sender<()>,
    wake_rx: async_channel::Receiver<()>,
}

impl std::fmt::Debug for StreamJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamJournal")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Why a journal operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("stream journal storage error: {0}")]
    Storage(#[from] sled::Error),
    #[error("stream {stream} has {seq} chunks, the most one stream can hold — start a new stream")]
    SequenceExhausted { stream: String, seq: u32 },
}

impl From<sled::transaction::TransactionError<()>> for StreamError {
    fn from(e: sled::transaction::TransactionError<()>) -> Self {
        match e {
            sled::transaction::TransactionError::Storage(e) => StreamError::Storage(e),
            sled::transaction::TransactionError::Abort(()) => StreamError::Storage(
                sled::Error::ReportableBug("stream transaction aborted".to_owned()),
            ),
        }
    }
}

impl StreamJournal {
    /// Open the stream trees of `journal` and load what a previous run left: unacknowledged
    /// chunks (queued for the next link) and stream records.
    pub fn open(journal: &Journal, limits: StreamLimits) -> Result<StreamJournal, StreamError> {
        let chunks = journal.tree(TREE_CHUNKS)?;
        let streams = journal.tree(TREE_STREAMS)?;
        let mut state = State::default();
        for item in streams.iter() {
            let (k, v) = item?;
            let (Ok(x), Ok(record)) = (
                String::from_utf8(k.to_vec()),
                serde_json::from_slice::<StreamRecord>(&v),
            ) else {
                tracing::warn!("dropping an unreadable stream record from the journal");
                streams.remove(k)?;
                continue;
            };
            state.streams.insert(x, record);
        }
        for item in chunks.iter() {
            let (k, v) = item?;
            let (Some(key), Some(value)) = (decode_key(&k), decode_value(&v)) else {
                tracing::warn!("dropping an unreadable output chunk from the journal");
                chunks.remove(k)?;
                continue;
            };
            let usage = state.usage.entry(value.session.to_owned()).or_default();
            usage.chunks += 1;
            usage.bytes += value.text.len() as u64;
            state.next_order = state.next_order.max(value.order + 1);
            state.pending.insert(value.order, key);
        }
        let flushed_below = Arc::new(AtomicU64::new(state.next_order));
        let (wake_tx, wake_rx) = async_channel::bounded(1);
        Ok(StreamJournal {
            chunks,
            streams,
            limits,
            state: Mutex::new(state),
            flushed_below,
            flushing: Arc::new(AtomicBool::new(false)),
            coalesce: false,
            wake_tx,
            wake_rx,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wake(&self) {
        let _ = self.wake_tx.try_send(());
    }

    /// Coalesce small events into the stream's last chunk (see the module doc). Off by
    /// default (one chunk per event, which unit tests rely on); the session manager turns it on.
    pub fn with_coalescing(mut self, on: bool) -> StreamJournal {
        self.coalesce = on;
        self
    }

    /// The cap in force.
    pub fn limits(&self) -> StreamLimits {
        self.limits
    }

    /// Register stream `x` for `session`. `Ok(false)` if `x` is already known (a re-sent
    /// request): nothing changes.
    pub fn open_stream(&self, x: &str, session: &str) -> Result<bool, StreamError> {
        let mut state = self.lock();
        if state.streams.contains_key(x) {
            return Ok(false);
        }
        let record = StreamRecord {
            session: session.to_owned(),
            next_q: 0,
            closed: false,
            dropped: None,
        };
        self.streams
            .insert(x, serde_json::to_vec(&record).unwrap_or_default())?;
        state.streams.insert(x.to_owned(), record);
        Ok(true)
    }

    /// The record of stream `x`, if known.
    pub fn stream(&self, x: &str) -> Option<StreamRecord> {
        self.lock().streams.get(x).cloned()
    }

    /// Unacknowledged output of `session`.
    pub fn usage(&self, session: &str) -> Usage {
        self.lock().usage.get(session).copied().unwrap_or_default()
    }

    /// Chunks the current link has not sent yet.
    pub fn queued(&self) -> usize {
        self.lock().pending.len()
    }

    /// Append one event's text (a JSON line, `\n` included) to stream `x`; with `last`, it is
    /// the stream's final record and the stream closes. See the module doc for the cap.
    pub fn append_event(&self, x: &str, text: &str, last: bool) -> Result<Appended, StreamError> {
        let mut state = self.lock();
        let Some(record) = state.streams.get(x).cloned() else {
            return Ok(Appended::NoStream);
        };
        if record.closed {
            return Ok(Appended::NoStream);
        }
        let usage = state
            .usage
            .get(&record.session)
            .copied()
            .unwrap_or_default();
        let pieces = split_utf8(text, MAX_CHUNK_BYTES);
        let fits = usage.chunks + pieces.len() as u64 <= self.limits.max_unacked_chunks
            && usage.bytes + text.len() as u64 <= self.limits.max_unacked_bytes;
        let mut record = record;
        if self.coalesce && record.dropped.is_none() {
            // Fill the open chunk to the limit, then open as many new ones as the rest needs:
            // the stream text is one byte sequence, so an event may straddle two chunks (as
            // 0.1.50 splits its log replay), and every chunk but the newest is full.
            let room = state
                .tails
                .get(x)
                .and_then(|t| t.last())
                .map_or(0, |t| MAX_CHUNK_BYTES - t.text.len());
            let (head, rest) = text.split_at(floor_char_boundary(text, room));
            let new_chunks = if rest.is_empty() {
                u64::from(room == 0)
            } else {
                split_utf8(rest, MAX_CHUNK_BYTES).len() as u64
            };
            if usage.chunks + new_chunks <= self.limits.max_unacked_chunks
                && usage.bytes + text.len() as u64 <= self.limits.max_unacked_bytes
            {
                let chunks = self.coalesce_event(&mut state, x, &mut record, head, rest, last)?;
                return Ok(Appended::Stored { chunks });
            }
        }
        if state.tails.contains_key(x) {
            // Everything below writes to sled: the open tail goes first, keeping seq order.
            self.materialize(&mut state, x)?;
        }
        let mut written = 0;
        if !fits && !last {
            let dropped = record.dropped.get_or_insert(Dropped {
                events: 0,
                bytes: 0,
            });
            let first = dropped.events == 0;
            dropped.events += 1;
            dropped.bytes += text.len() as u64;
            if first {
                // The marker goes in before the counters are saved with the record.
                let marker = truncated_marker(usage, self.limits);
                let dropped_now = record.dropped.take();
                written += self.write_pieces(&mut state, x, &mut record, &[&marker], false)?;
                record.dropped = dropped_now;
            }
            self.save_record(&mut state, x, &record)?;
            return Ok(if written > 0 {
                Appended::Stored { chunks: written }
            } else {
                Appended::Dropped
            });
        }
        if let Some(dropped) = record.dropped.take() {
            let marker = resumed_marker(dropped);
            written += self.write_pieces(&mut state, x, &mut record, &[&marker], false)?;
        }
        written += self.write_pieces(&mut state, x, &mut record, &pieces, last)?;
        Ok(Appended::Stored { chunks: written })
    }

    /// Appends `head` to stream `x`'s open in-memory chunk (it fits) and `rest` as new
    /// in-memory chunks; with `last`, the final one ends the stream. Returns the chunks opened.
    fn coalesce_event(
        &self,
        state: &mut State,
        x: &str,
        record: &mut StreamRecord,
        head: &str,
        rest: &str,
        last: bool,
    ) -> Result<usize, StreamError> {
        let open = state.tails.get_mut(x).and_then(|t| t.last_mut());
        let mut opened = 0;
        match open {
            Some(tail) if rest.is_empty() => {
                tail.text.push_str(head);
                tail.last = last;
                record.closed = last;
                state.usage.entry(record.session.clone()).or_default().bytes += head.len() as u64;
                state.streams.insert(x.to_owned(), record.clone());
            }
            open => {
                if let Some(tail) = open {
                    tail.text.push_str(head);
                    state.usage.entry(record.session.clone()).or_default().bytes +=
                        head.len() as u64;
                }
                let pieces = split_utf8(rest, MAX_CHUNK_BYTES);
                let n = pieces.len();
                for (i, piece) in pieces.into_iter().enumerate() {
                    self.open_tail(state, x, record, piece, last && i + 1 == n)?;
                    opened += 1;
                }
            }
        }
        self.wake();
        Ok(opened)
    }

    /// Start stream `x`'s next chunk in memory (see [`State::tails`]).
    fn open_tail(
        &self,
        state: &mut State,
        x: &str,
        record: &mut StreamRecord,
        text: &str,
        last: bool,
    ) -> Result<(), StreamError> {
        let seq = claim_seq(x, record)?;
        record.closed = last;
        let order = state.next_order;
        state.next_order += 1;
        state.queue_chunk(order, x, seq, &record.session, text.len());
        let mut text_buf = String::with_capacity(MAX_CHUNK_BYTES);
        text_buf.push_str(text);
        state.tails.entry(x.to_owned()).or_default().push(Tail {
            seq,
            order,
            session: record.session.clone(),
            text: text_buf,
            last,
        });
        state.streams.insert(x.to_owned(), record.clone());
        self.wake();
        Ok(())
    }

    /// Write stream `x`'s in-memory chunks to sled (with its stream record, one transaction).
    fn materialize(&self, state: &mut State, x: &str) -> Result<(), StreamError> {
        self.materialize_streams(state, &[x.to_owned()])
    }

    /// Write every in-memory chunk to sled.
    fn materialize_all(&self, state: &mut State) -> Result<(), StreamError> {
        let open: Vec<String> = state.tails.keys().cloned().collect();
        self.materialize_streams(state, &open)
    }

    /// Write the in-memory chunks of streams `xs` and their stream records in one sled
    /// transaction: a flush of a fast stream costs one transaction, not one per chunk.
    fn materialize_streams(&self, state: &mut State, xs: &[String]) -> Result<(), StreamError> {
        let taken: Vec<(String, Vec<Tail>)> = xs
            .iter()
            .filter_map(|x| state.tails.remove(x).map(|t| (x.clone(), t)))
            .collect();
        if taken.is_empty() {
            return Ok(());
        }
        let mut rows = Vec::new();
        let mut records = Vec::with_capacity(taken.len());
        for (x, tails) in &taken {
            for t in tails {
                rows.push((
                    encode_key(x, t.seq),
                    encode_value(t.order, t.last, &t.session, &t.text),
                ));
            }
            let record = state
                .streams
                .get(x)
                .map(|r| serde_json::to_vec(r).unwrap_or_default())
                .unwrap_or_default();
            records.push((x.as_bytes(), record));
        }
        let written = (&self.chunks, &self.streams).transaction(|(chunks, streams)| {
            for (k, v) in &rows {
                chunks.insert(k.as_slice(), v.as_slice())?;
            }
            for (x, r) in &records {
                streams.insert(*x, r.as_slice())?;
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        if let Err(e) = written {
            drop(records);
            for (x, t) in taken {
                state.tails.insert(x, t);
            }
            return Err(e.into());
        }
        drop(records);
        for (x, tails) in taken {
            for t in tails {
                if state.ready_bytes + t.text.len() > READY_MAX_BYTES {
                    continue;
                }
                state.ready_bytes += t.text.len();
                state.ready.insert(
                    t.order,
                    StreamChunk {
                        stream_id: x.clone(),
                        seq: t.seq,
                        last: t.last,
                        data: t.text,
                    },
                );
            }
        }
        Ok(())
    }

    fn save_record(
        &self,
        state: &mut State,
        x: &str,
        record: &StreamRecord,
    ) -> Result<(), StreamError> {
        self.streams
            .insert(x, serde_json::to_vec(record).unwrap_or_default())?;
        state.streams.insert(x.to_owned(), record.clone());
        Ok(())
    }

    /// Write `pieces` as consecutive chunks of `x` (the last one flagged `last`), each in one
    /// transaction with the updated stream record.
    fn write_pieces(
        &self,
        state: &mut State,
        x: &str,
        record: &mut StreamRecord,
        pieces: &[&str],
        last: bool,
    ) -> Result<usize, StreamError> {
        for (i, piece) in pieces.iter().enumerate() {
            let is_last = last && i + 1 == pieces.len();
            let seq = claim_seq(x, record)?;
            let order = state.next_order;
            record.closed = is_last;
            let key = encode_key(x, seq);
            let value = encode_value(order, is_last, &record.session, piece);
            let record_bytes = serde_json::to_vec(&*record).unwrap_or_default();
            (&self.chunks, &self.streams).transaction(|(chunks, streams)| {
                chunks.insert(key.as_slice(), value.as_slice())?;
                streams.insert(x.as_bytes(), record_bytes.as_slice())?;
                Ok::<(), ConflictableTransactionError<()>>(())
            })?;
            state.next_order += 1;
            state.queue_chunk(order, x, seq, &record.session, piece.len());
            state.streams.insert(x.to_owned(), record.clone());
        }
        if !pieces.is_empty() {
            self.wake();
        }
        Ok(pieces.len())
    }

    /// `sa {x, q}`: chunk `q` of `x` and every earlier one were received; delete them. Returns
    /// how many were deleted (0 for an unknown stream or a repeated ack).
    pub fn ack(&self, x: &str, q: u32) -> Result<usize, StreamError> {
        let mut state = self.lock();
        let Some(session) = state.streams.get(x).map(|r| r.session.clone()) else {
            return Ok(0);
        };
        let start = encode_key(x, 0);
        let end = encode_key(x, q);
        let mut removed = 0;
        let mut freed = Usage::default();
        for item in self.chunks.range(start.as_slice()..=end.as_slice()) {
            let (k, v) = item?;
            if let Some(value) = decode_value(&v) {
                state.pending.remove(&value.order);
                if let Some(c) = state.ready.remove(&value.order) {
                    state.ready_bytes -= c.data.len();
                }
                freed.chunks += 1;
                freed.bytes += value.text.len() as u64;
            }
            self.chunks.remove(k)?;
            removed += 1;
        }
        if let Some(usage) = state.usage.get_mut(&session) {
            usage.chunks = usage.chunks.saturating_sub(freed.chunks);
            usage.bytes = usage.bytes.saturating_sub(freed.bytes);
            if usage.chunks == 0 {
                state.usage.remove(&session);
            }
        }
        Ok(removed)
    }

    /// A link came up: queue every unacknowledged chunk again, in write order.
    pub fn link_up(&self) {
        let mut state = self.lock();
        let mut pending = BTreeMap::new();
        for (k, v) in self.chunks.iter().flatten() {
            if let (Some(key), Some(value)) = (decode_key(&k), decode_value(&v)) {
                pending.insert(value.order, key);
            }
        }
        for (x, tails) in &state.tails {
            for t in tails {
                pending.insert(
                    t.order,
                    ChunkKey {
                        stream: x.clone(),
                        seq: t.seq,
                    },
                );
            }
        }
        state.pending = pending;
        drop(state);
        self.wake();
    }

    /// The next frame for the link: stored chunks in write order, each flushed to disk before
    /// it is returned. Waits while there is nothing to send. Cancel-safe: a chunk is only taken
    /// off the queue when it is returned.
    pub async fn next_frame(&self) -> Message {
        loop {
            let needs_flush = {
                let mut state = self.lock();
                match state
                    .pending
                    .first_key_value()
                    .map(|(o, k)| (*o, k.clone()))
                {
                    Some((order, key)) if order < self.flushed_below.load(Ordering::SeqCst) => {
                        state.pending.remove(&order);
                        if let Some(c) = state.ready.remove(&order) {
                            state.ready_bytes -= c.data.len();
                            return Message::StreamChunk(c);
                        }
                        if let Some(msg) = self.load(&key) {
                            return msg;
                        }
                        // Acknowledged meanwhile (or unreadable): next.
                        continue;
                    }
                    Some(_) => Some(state.next_order),
                    None => None,
                }
            };
            if let Some(upto) = needs_flush {
                self.start_flush(upto);
            }
            let _ = self.wake_rx.recv().await;
        }
    }

    /// Flush everything written so far on the blocking pool, unless a flush is running; when it
    /// is done, chunks below `upto` may be sent. Detached, so a dropped `next_frame` (the link
    /// picks another event) never loses a flush that was under way.
    fn start_flush(&self, upto: u64) {
        {
            // Under the state lock: open tails are written to sled first, so the flush covers
            // them, and no append can change them afterwards (it opens a new chunk).
            let mut state = self.lock();
            if self.flushing.load(Ordering::SeqCst) {
                return;
            }
            if let Err(e) = self.materialize_all(&mut state) {
                // Not flushing now: nothing past this point may be sent before it is stored.
                tracing::error!("cannot store session output ({e}); retrying at the next send");
                return;
            }
            self.flushing.store(true, Ordering::SeqCst);
        }
        let tree = self.chunks.clone();
        let flushed_below = Arc::clone(&self.flushed_below);
        let flushing = Arc::clone(&self.flushing);
        let wake = self.wake_tx.clone();
        smol::unblock(move || {
            let started = std::time::Instant::now();
            let flushed = tree.flush();
            tracing::debug!(
                bytes = flushed.as_ref().map_or(0, |b| *b),
                micros = started.elapsed().as_micros() as u64,
                "session output flushed"
            );
            match flushed {
                Ok(_) => {
                    flushed_below.fetch_max(upto, Ordering::SeqCst);
                }
                Err(e) => {
                    tracing::error!(
                        "cannot flush session output to disk ({e}); retrying in 1 s — check the data_dir's disk"
                    );
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
            flushing.store(false, Ordering::SeqCst);
            let _ = wake.try_send(());
        })
        .detach();
    }

    /// Stored chunk `key` as an `sc`.
    fn load(&self, key: &ChunkKey) -> Option<Message> {
        let v = self.chunks.get(encode_key(&key.stream, key.seq)).ok()??;
        let value = decode_value(&v)?;
        Some(Message::StreamChunk(StreamChunk {
            stream_id: key.stream.clone(),
            seq: key.seq,
            last: value.last,
            data: value.text.to_owned(),
        }))
    }

    /// Every stored (unacknowledged) chunk of stream `x`, in order (for tests and diagnostics).
    pub fn stored(&self, x: &str) -> Vec<StreamChunk> {
        let start = encode_key(x, 0);
        let end = encode_key(x, u32::MAX);
        self.chunks
            .range(start.as_slice()..=end.as_slice())
            .flatten()
            .filter_map(|(k, v)| {
                let key = decode_key(&k)?;
                let value = decode_value(&v)?;
                Some(StreamChunk {
                    stream_id: key.stream,
                    seq: key.seq,
                    last: value.last,
                    data: value.text.to_owned(),
                })
            })
            .collect()
    }

    /// Flush to disk now.
    pub fn flush(&self) -> Result<(), StreamError> {
        self.materialize_all(&mut self.lock())?;
        self.chunks.flush()?;
        Ok(())
    }
}

impl crate::tunnel::DurableOutbox for StreamJournal {
    fn link_up(&self) {
        StreamJournal::link_up(self);
    }

    fn next_frame(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Message> + Send + '_>> {
        Box::pin(StreamJournal::next_frame(self))
    }
}

fn truncated_marker(usage: Usage, limits: StreamLimits) -> String {
    let line = serde_json::json!({
        "type": "codemantle.output.truncated",
        "properties": {
            "reason": "the session's unacknowledged output reached its cap; events are dropped until the control plane acknowledges",
            "unackedChunks": usage.chunks,
            "unackedBytes": usage.bytes,
            "maxChunks": limits.max_unacked_chunks,
            "maxBytes": limits.max_unacked_bytes,
        }
    });
    format!("{line}\n")
}

fn resumed_marker(dropped: Dropped) -> String {
    let line = serde_json::json!({
        "type": "codemantle.output.resumed",
        "properties": { "droppedEvents": dropped.events, "droppedBytes": dropped.bytes }
    });
    format!("{line}\n")
}

/// The largest `i <= max` (and `<= text.len()`) at a character boundary of `text`.
fn floor_char_boundary(text: &str, max: usize) -> usize {
    if max >= text.len() {
        return text.len();
    }
    let mut i = max;
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// `text` in pieces of at most `max` bytes, never splitting a character; one empty piece for
/// empty text.
pub fn split_utf8(text: &str, max: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = text;
    while rest.len() > max {
        let mut end = max;
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (head, tail) = rest.split_at(end);
        pieces.push(head);
        rest = tail;
    }
    if !rest.is_empty() || pieces.is_empty() {
        pieces.push(rest);
    }
    pieces
}

fn encode_key(x: &str, q: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(x.len() + 5);
    k.extend_from_slice(x.as_bytes());
    k.push(0);
    k.extend_from_slice(&q.to_be_bytes());
    k
}

fn decode_key(k: &[u8]) -> Option<ChunkKey> {
    let (x, q) = k.split_at(k.len().checked_sub(5)?);
    if q[0] != 0 {
        return None;
    }
    Some(ChunkKey {
        stream: String::from_utf8(x.to_vec()).ok()?,
        seq: u32::from_be_bytes(q[1..].try_into().ok()?),
    })
}

struct ChunkValue<'a> {
    order: u64,
    last: bool,
    session: &'a str,
    text: &'a str,
}

fn encode_value(order: u64, last: bool, session: &str, text: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(10 + session.len() + text.len());
    v.extend_from_slice(&order.to_be_bytes());
    v.push(u8::from(last));
    // Session ids are at most 64 bytes (wire limit).
    v.push(session.len().min(255) as u8);
    v.extend_from_slice(&session.as_bytes()[..session.len().min(255)]);
    v.extend_from_slice(text.as_bytes());
    v
}

fn decode_value(v: &[u8]) -> Option<ChunkValue<'_>> {
    let order = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let last = *v.get(8)? != 0;
    let len = usize::from(*v.get(9)?);
    let session = std::str::from_utf8(v.get(10..10 + len)?).ok()?;
    let text = std::str::from_utf8(v.get(10 + len..)?).ok()?;
    Some(ChunkValue {
        order,
        last,
        session,
        text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path, limits: StreamLimits) -> (Journal, StreamJournal) {
        let j = Journal::open(&dir.join("data"), 3600).unwrap();
        let s = StreamJournal::open(&j, limits).unwrap();
        (j, s)
    }

    fn frames(s: &StreamJournal) -> Vec<StreamChunk> {
        let mut out = Vec::new();
        while s.queued() > 0 {
            match smol::block_on(s.next_frame()) {
                Message::StreamChunk(c) => out.push(c),
                other => panic!("{other:?}"),
            }
        }
        out
    }

    #[test]
    fn splitting_respects_characters() {
        assert_eq!(split_utf8("", 4), [""]);
        assert_eq!(split_utf8("abcd", 4), ["abcd"]);
        assert_eq!(split_utf8("abcde", 4), ["abcd", "e"]);
        assert_eq!(split_utf8("aé€b", 3), ["aé", "€", "b"]);
        let big = "é".repeat(5000);
        let pieces = split_utf8(&big, MAX_CHUNK_BYTES);
        assert!(pieces.iter().all(|p| p.len() <= MAX_CHUNK_BYTES));
        assert_eq!(pieces.concat(), big);
    }

    #[test]
    fn persist_send_ack_resend() {
        let dir = tempfile::tempdir().unwrap();
        let (_j, s) = open(dir.path(), StreamLimits::default());
        assert!(s.open_stream("streamAAA1", "ses1").unwrap());
        assert!(!s.open_stream("streamAAA1", "ses1").unwrap());
        for i in 0..3 {
            s.append_event("streamAAA1", &format!("{{\"n\":{i}}}\n"), i == 2)
                .unwrap();
        }
        assert_eq!(
            s.usage("ses1"),
            Usage {
                chunks: 3,
                bytes: 24
            }
        );
        let sent = frames(&s);
        assert_eq!(sent.iter().map(|c| c.seq).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(sent[2].last && !sent[1].last);
        assert_eq!(s.ack("streamAAA1", 0).unwrap(), 1);
        // Reconnect: 1 and 2 again, not 0.
        s.link_up();
        let again = frames(&s);
        assert_eq!(again.iter().map(|c| c.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(s.ack("streamAAA1", 2).unwrap(), 2);
        assert_eq!(s.ack("streamAAA1", 2).unwrap(), 0);
        assert_eq!(s.usage("ses1"), Usage::default());
        s.link_up();
        assert_eq!(s.queued(), 0);
        // Closed: nothing more is accepted.
        assert_eq!(
            s.append_event("streamAAA1", "x\n", false).unwrap(),
            Appended::NoStream
        );
    }

    #[test]
    fn small_events_share_a_chunk_until_it_is_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("data"), 3600).unwrap();
        let s = StreamJournal::open(&j, StreamLimits::default())
            .unwrap()
            .with_coalescing(true);
        s.open_stream("streamKKK1", "ses1").unwrap();
        for i in 0..3 {
            s.append_event("streamKKK1", &format!("{{\"n\":{i}}}\n"), false)
                .unwrap();
        }
        assert_eq!(s.queued(), 1, "three small events, one chunk");
        assert!(
            s.stored("streamKKK1").is_empty(),
            "the open chunk is written when a flush starts, not per event"
        );
        assert_eq!(
            s.usage("ses1"),
            Usage {
                chunks: 1,
                bytes: 24
            }
        );
        let sent = frames(&s);
        assert_eq!(sent.len(), 1);
        assert_eq!(s.stored("streamKKK1"), sent, "sent only once stored");
        assert_eq!(
            (sent[0].seq, sent[0].data.as_str()),
            (0, "{\"n\":0}\n{\"n\":1}\n{\"n\":2}\n")
        );
        // Sent (so flushed): the next event starts chunk 1. Chunks are filled to the limit and
        // an event straddles two when it does not fit; a chunk never outgrows the limit.
        let big = "y".repeat(MAX_CHUNK_BYTES - 1);
        s.append_event("streamKKK1", "a\n", false).unwrap();
        assert_eq!(
            s.append_event("streamKKK1", &big, false).unwrap(),
            Appended::Stored { chunks: 1 },
            "one new chunk for the byte that did not fit"
        );
        s.append_event("streamKKK1", "end\n", true).unwrap();
        assert_eq!(
            s.usage("ses1"),
            Usage {
                chunks: 3,
                bytes: 24 + 2 + big.len() as u64 + 4
            }
        );
        let sent = frames(&s);
        assert_eq!(
            sent.iter()
                .map(|c| (c.seq, c.data.len(), c.last))
                .collect::<Vec<_>>(),
            [(1, MAX_CHUNK_BYTES, false), (2, 1 + 4, true)]
        );
        assert_eq!(
            sent.iter().map(|c| c.data.as_str()).collect::<String>(),
            format!("a\n{big}end\n")
        );
        // What was sent is what is stored, and it survives a reopen for re-sending.
        drop(s);
        let s = StreamJournal::open(&j, StreamLimits::default()).unwrap();
        let stored = s.stored("streamKKK1");
        assert_eq!(stored.len(), 3);
        assert_eq!(stored[1..], sent[..]);
        assert_eq!(stored[2].data, "yend\n");
        assert!(stored[2].last);
    }

    #[test]
    fn filled_chunks_split_events_on_characters_and_respect_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("data"), 3600).unwrap();
        let limits = StreamLimits {
            max_unacked_bytes: 1 << 20,
            max_unacked_chunks: 3,
        };
        let s = StreamJournal::open(&j, limits)
            .unwrap()
            .with_coalescing(true);
        s.open_stream("streamFFF1", "ses1").unwrap();
        // 8191 bytes, then a 3-byte character: it cannot be split, so it opens chunk 1.
        let first = "x".repeat(MAX_CHUNK_BYTES - 1);
        s.append_event("streamFFF1", &first, false).unwrap();
        s.append_event("streamFFF1", "€€\n", false).unwrap();
        // An event of two and a half chunks needs three more: over the cap of 3, dropped
        // with a marker (the marker itself is written).
        let huge = "z".repeat(MAX_CHUNK_BYTES * 5 / 2);
        s.append_event("streamFFF1", &huge, false).unwrap();
        s.append_event("streamFFF1", "end\n", true).unwrap();
        let sent = frames(&s);
        assert!(sent.iter().all(|c| c.data.len() <= MAX_CHUNK_BYTES));
        assert_eq!(sent[0].data, first);
        assert!(
            sent[1].data.starts_with("€€\n"),
            "{:?}",
            &sent[1].data[..20]
        );
        let text: String = sent.iter().map(|c| c.data.as_str()).collect();
        assert!(
            !text.contains('z'),
            "the event over the cap is dropped whole"
        );
        assert!(text.contains("codemantle.output.truncated"));
        assert!(text.contains("codemantle.output.resumed"));
        assert!(text.ends_with("end\n") && sent.last().unwrap().last);
        let seqs: Vec<u32> = sent.iter().map(|c| c.seq).collect();
        assert_eq!(seqs, (0..sent.len() as u32).collect::<Vec<_>>());
        // Sent from memory, nothing of it is kept there.
        assert!(s.lock().ready.is_empty());
        assert_eq!(s.lock().ready_bytes, 0);
    }

    #[test]
    fn flushed_chunks_wait_in_memory_until_sent_or_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("data"), 3600).unwrap();
        let s = StreamJournal::open(&j, StreamLimits::default())
            .unwrap()
            .with_coalescing(true);
        s.open_stream("streamRRR1", "ses1").unwrap();
        let text = "r".repeat(MAX_CHUNK_BYTES * 2 + 10);
        s.append_event("streamRRR1", &text, false).unwrap();
        s.flush().unwrap();
        assert_eq!(s.lock().ready.len(), 3);
        assert_eq!(s.lock().ready_bytes, text.len());
        // The first goes out from memory; a reconnect re-queues all three (from sled for the
        // one already sent); an ack drops what it covers from memory too.
        let first = smol::block_on(s.next_frame());
        assert_eq!(s.lock().ready.len(), 2);
        s.link_up();
        assert_eq!(s.ack("streamRRR1", 1).unwrap(), 2);
        assert_eq!(s.lock().ready.len(), 1);
        assert_eq!(s.lock().ready_bytes, 10);
        let rest = frames(&s);
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].seq, rest[0].data.len()), (2, 10));
        assert_eq!(
            first,
            Message::StreamChunk(StreamChunk {
                stream_id: "streamRRR1".into(),
                seq: 0,
                last: false,
                data: "r".repeat(MAX_CHUNK_BYTES),
            })
        );
        assert!(s.lock().ready.is_empty());
    }

    #[test]
    fn survives_reopen_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_j, s) = open(dir.path(), StreamLimits::default());
            s.open_stream("streamBBB1", "ses1").unwrap();
            s.open_stream("streamCCC1", "ses2").unwrap();
            s.append_event("streamBBB1", "b0\n", false).unwrap();
            s.append_event("streamCCC1", "c0\n", false).unwrap();
            s.append_event("streamBBB1", "b1\n", false).unwrap();
            s.flush().unwrap();
        }
        let (_j, s) = open(dir.path(), StreamLimits::default());
        let sent: Vec<String> = frames(&s).into_iter().map(|c| c.data).collect();
        assert_eq!(sent, ["b0\n", "c0\n", "b1\n"]);
        s.append_event("streamBBB1", "b2\n", true).unwrap();
        let last = frames(&s);
        assert_eq!((last[0].seq, last[0].last), (2, true));
    }

    #[test]
    fn cap_gives_markers_never_a_silent_gap() {
        let dir = tempfile::tempdir().unwrap();
        let limits = StreamLimits {
            max_unacked_bytes: 1 << 20,
            max_unacked_chunks: 3,
        };
        let (_j, s) = open(dir.path(), limits);
        s.open_stream("streamDDD1", "ses1").unwrap();
        for i in 0..6 {
            s.append_event("streamDDD1", &format!("e{i}\n"), false)
                .unwrap();
        }
        let sent = frames(&s);
        let texts: Vec<&str> = sent.iter().map(|c| c.data.as_str()).collect();
        assert_eq!(&texts[..3], ["e0\n", "e1\n", "e2\n"]);
        assert!(
            texts[3].contains("codemantle.output.truncated"),
            "{texts:?}"
        );
        assert_eq!(texts.len(), 4);
        // Acks make room: the next event comes after a `resumed` marker counting the gap.
        s.ack("streamDDD1", 3).unwrap();
        s.append_event("streamDDD1", "e6\n", false).unwrap();
        let sent = frames(&s);
        assert!(
            sent[0].data.contains("\"droppedEvents\":3"),
            "{:?}",
            sent[0]
        );
        assert_eq!(sent[1].data, "e6\n");
        assert_eq!(sent[1].seq, 5);
        // Full again; the end of the stream is never dropped and reports the gap first.
        for i in 7..12 {
            s.append_event("streamDDD1", &format!("e{i}\n"), false)
                .unwrap();
        }
        s.append_event("streamDDD1", "end\n", true).unwrap();
        let sent = frames(&s);
        let texts: Vec<&str> = sent.iter().map(|c| c.data.as_str()).collect();
        let n = texts.len();
        assert!(
            texts[n - 2].contains("codemantle.output.resumed"),
            "{texts:?}"
        );
        assert_eq!(texts[n - 1], "end\n");
        assert!(sent[n - 1].last);
        let seqs: Vec<u32> = sent.iter().map(|c| c.seq).collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    }

    #[test]
    fn big_events_span_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let (_j, s) = open(dir.path(), StreamLimits::default());
        s.open_stream("streamEEE1", "ses1").unwrap();
        let big = format!("{}\n", "z".repeat(MAX_CHUNK_BYTES * 2 + 10));
        assert_eq!(
            s.append_event("streamEEE1", &big, true).unwrap(),
            Appended::Stored { chunks: 3 }
        );
        let sent = frames(&s);
        assert_eq!(sent.len(), 3);
        assert!(sent[2].last && !sent[0].last);
        assert_eq!(
            sent.iter().map(|c| c.data.as_str()).collect::<String>(),
            big
        );
    }

    #[test]
    fn keys_and_values_round_trip() {
        let k = encode_key("abcdefgh", 7);
        assert_eq!(
            decode_key(&k),
            Some(ChunkKey {
                stream: "abcdefgh".into(),
                seq: 7
            })
        );
        assert_eq!(decode_key(b"x"), None);
        let v = encode_value(9, true, "ses", "text");
        let d = decode_value(&v).unwrap();
        assert_eq!(
            (d.order, d.last, d.session, d.text),
            (9, true, "ses", "text")
        );
        assert!(decode_value(&v[..9]).is_none());
    }
}
