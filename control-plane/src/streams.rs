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
//! # Where chunks live, and what a restart loses
//!
//! In memory only: a ring of at most [`StreamsConfig::max_bytes_per_stream`] per stream (oldest
//! chunks evicted first) and at most [`StreamsConfig::max_streams`] streams (ended streams
//! evicted before live ones). A reader that asks for chunks no longer held gets an explicit
//! `truncated` range instead, never a silent gap. A control-plane restart loses what was
//! already acknowledged: the daemon re-sends only unacknowledged chunks, and the stream state
//! is rebuilt starting at the first seq seen (the range before it is reported as truncated).
//! Persisting chunks in the store (one capped sled tree) would close that gap; it is not done
//! yet — `sl` cannot replace it, since it replays the device log, not a stream by seq.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use codemantle_protocol::message::{StreamAck, StreamChunk};

use crate::store::TenantId;

/// Limits of the in-memory stream buffers.
#[derive(Debug, Clone, Copy)]
pub struct StreamsConfig {
    /// Text kept per stream; older chunks are evicted (readers see `truncated`).
    pub max_bytes_per_stream: usize,
    /// Streams kept at once (ended ones are evicted first, then the least recently updated).
    pub max_streams: usize,
    /// Out-of-order chunks held per stream while waiting for a missing seq.
    pub max_out_of_order: usize,
}

impl Default for StreamsConfig {
    fn default() -> StreamsConfig {
        StreamsConfig {
            max_bytes_per_stream: 4 << 20,
            max_streams: 1024,
            max_out_of_order: 64,
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

    fn push(&mut self, seq: u32, data: String, last: bool, max_bytes: usize) {
        self.bytes += data.len();
        self.ring.push_back(Chunk { seq, data, last });
        self.next = seq.saturating_add(1);
        if last {
            self.ended = true;
        }
        // Keep at least the newest chunk, so the end is always seen.
        while self.bytes > max_bytes && self.ring.len() > 1 {
            if let Some(old) = self.ring.pop_front() {
                self.bytes -= old.data.len();
                self.first_kept = old.seq.saturating_add(1);
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

/// Every stream of this control plane.
pub struct Streams {
    config: StreamsConfig,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    streams: HashMap<(Box<str>, Box<str>), Stream>,
    clock: u64,
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
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes in one `sc` from `device` (of `tenant`); returns the `sa` to send back, if any
    /// chunk of the stream is in yet.
    pub fn on_chunk(
        &self,
        tenant: &TenantId,
        device: &str,
        chunk: StreamChunk,
    ) -> Option<StreamAck> {
        let mut inner = self.lock();
        let max_streams = self.config.max_streams;
        let st = inner.get_or_insert(device, &chunk.stream_id, tenant, None, max_streams);
        if st.tenant != *tenant {
            // The device moved tenants (re-registered): start over under the new one.
            *st = Stream::new(tenant.clone(), None, st.touched);
        }
        let StreamChunk {
            stream_id,
            seq,
            last,
            data,
        } = chunk;
        let max_bytes = self.config.max_bytes_per_stream;
        if !st.started {
            // First chunk this control plane sees: after a restart the daemon re-sends from its
            // first unacknowledged seq; everything before it was acknowledged (and is lost).
            st.started = true;
            st.next = seq;
            st.first_kept = seq;
        }
        let mut changed = false;
        if seq == st.next && !st.ended {
            st.push(seq, data, last, max_bytes);
            while let Some((data, last)) = st.out_of_order.remove(&st.next) {
                let q = st.next;
                st.push(q, data, last, max_bytes);
            }
            changed = true;
        } else if seq > st.next && !st.ended {
            if st.out_of_order.len() < self.config.max_out_of_order
                || st.out_of_order.contains_key(&seq)
            {
                st.out_of_order.insert(seq, (data, last));
            } else {
                tracing::debug!(device, stream = %stream_id, seq, "out-of-order buffer full; the daemon will re-send");
            }
        }
        if changed {
            st.notify();
        }
        st.next
            .checked_sub(1)
            .map(|q| StreamAck { stream_id, seq: q })
    }

    /// Records that prompt `x` on `device` is for `session_id` (so readers can find it).
    pub fn register(&self, tenant: &TenantId, device: &str, x: &str, session_id: &str) {
        let mut inner = self.lock();
        let max_streams = self.config.max_streams;
        let st = inner.get_or_insert(device, x, tenant, Some(session_id), max_streams);
        if st.session_id.is_none() {
            st.session_id = Some(session_id.to_owned());
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
        let mut inner = self.lock();
        let max_streams = self.config.max_streams;
        let st = inner.get_or_insert(device, x, tenant, Some(session_id), max_streams);
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
        let from = after.map_or(0, |a| a.saturating_add(1));
        let mut items = Vec::new();
        if st.started && from < st.first_kept {
            items.push(Item::Truncated {
                from,
                to: st.first_kept - 1,
            });
        }
        let mut ended = st.ended && st.next <= from;
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
            self.streams.insert(
                key.clone(),
                Stream::new(tenant.clone(), session_id.map(str::to_owned), now),
            );
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
