//! The durable watermark: events become visible only once they are on disk, and one flusher
//! makes many appends durable at once (group commit).
//!
//! # Why
//!
//! A store write lands in the backend's memory first and on disk at the next flush. If events
//! were served (`GET /events`, SSE) as soon as they were written, a crash before the flush
//! would lose events that clients had already seen, and after the restart their sequence
//! numbers would be handed to *other* events: a client that saw seq N would later find a
//! different event N, or miss the new one. So readers see only seq ≤ the **watermark**, the
//! highest seq known to be flushed, and the live bus is fed only when the watermark passes an
//! event. Seqs past the watermark that a crash loses are reused after the restart, but nobody
//! has seen them.
//!
//! # How
//!
//! Writers hand every committed event to [`Durability::push`] in seq order (under the store's
//! writer lock) and go on; one **flusher thread** loops: note the highest pushed seq `S`,
//! flush the backend once, move the watermark to `S`, publish the events up to `S` to the bus in
//! order, then wake the waiters whose seq is now covered. While a flush runs, new appends pile
//! up and the next flush covers them all, so a burst of N appends costs a handful of flushes,
//! not N, and no writer waits for a flush it does not need:
//! - hot-path appends (command records, connects on the tunnel's recorder thread) never wait;
//!   when nobody waits for pending events, the flusher lets them pile up for [`COALESCE`]
//!   before flushing (a connect storm costs a flush per few milliseconds, not per event);
//! - callers that must not answer before their record is durable (entity changes, the HTTP
//!   reply of a command) wait for the flush that covers their seq ([`Durability::when_durable`]),
//!   together with everyone else who appended meanwhile;
//! - [`Durability::flush_round`] waits for a flush that starts after the call, for writes that
//!   are not events (stream chunks, idempotency records).
//!
//! # Failures
//!
//! A failed flush wakes the waiters it was meant to cover with its error (the write may or may
//! not be on disk), keeps the events unpublished, and is retried with a back-off up to
//! [`MAX_RETRY_DELAY`]. [`Durability::health`] reports the failure (and a flush that hangs for
//! more than [`STALL_AFTER`]) to the health probe, so `GET /health` and the systemd watchdog see
//! it. A full disk is normally caught before anything is written (see `store::sled`); the
//! flusher only sees the rare ENOSPC that slipped past that check.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{DurableWait, StoreError, StoreResult};
use crate::events::{Event, EventBus};

/// Longest pause between retries of a failing flush.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(2);
/// A flush running longer than this makes [`Durability::health`] fail (a hung data disk).
pub const STALL_AFTER: Duration = Duration::from_secs(10);
/// When nobody waits for the pending events (fire-and-forget appends: connects, a connect
/// storm), the flusher lets them pile up this long before flushing, so a storm costs one flush
/// per few milliseconds instead of one per handful of events. A waiter cuts it short.
pub const COALESCE: Duration = Duration::from_millis(4);

/// What a waiter waits for.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// The watermark reaching this seq.
    Seq(u64),
    /// Flush round `n` (a flush that started after round `n` was requested) completing.
    Round(u64),
}

struct State {
    /// Highest seq pushed (durable or not).
    appended: u64,
    /// Pushed, not yet durable, ascending.
    pending: VecDeque<Event>,
    /// Flush rounds requested / completed (successfully or not).
    requested: u64,
    done: u64,
    waiters: Vec<(Target, async_channel::Sender<StoreResult<()>>)>,
    /// The flusher sleeps on the condvar (a push must wake it).
    idle: bool,
    /// ... and that sleep is the [`COALESCE`] pause: only a waiter wakes it.
    coalescing: bool,
    /// Live [`FlushHold`]s: no flush starts while any exists.
    held: u32,
    shutdown: bool,
    /// The last flush failed with this error (cleared by the next success).
    failure: Option<StoreError>,
    /// When the running flush started.
    flushing_since: Option<Instant>,
    flushes: u64,
    flushed_events: u64,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// The watermark, readable without the lock.
    durable: AtomicU64,
    /// The highest seq published to the bus: equal to `durable` except while the flusher is
    /// publishing. Waiters are woken only once their event is published too.
    published: AtomicU64,
    bus: EventBus,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock; a panic elsewhere does not poison it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Counters of the flusher, for benches and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Successful flushes that made at least one event or a requested round durable.
    pub flushes: u64,
    /// Events made durable by them.
    pub events: u64,
}

/// The watermark, the events waiting for it, and the flusher thread (see the module docs).
pub struct Durability {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Durability {
    /// Starts the flusher. `durable` is the seq of the last event already on disk (at open);
    /// `flush` makes every write made before it was called durable.
    pub fn start(
        durable: u64,
        bus: EventBus,
        flush: impl FnMut() -> StoreResult<()> + Send + 'static,
    ) -> StoreResult<Durability> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                appended: durable,
                pending: VecDeque::new(),
                requested: 0,
                done: 0,
                waiters: Vec::new(),
                idle: false,
                coalescing: false,
                held: 0,
                shutdown: false,
                failure: None,
                flushing_since: None,
                flushes: 0,
                flushed_events: 0,
            }),
            wake: Condvar::new(),
            durable: AtomicU64::new(durable),
            published: AtomicU64::new(durable),
            bus,
        });
        let thread = std::thread::Builder::new()
            .name("store-flusher".into())
            .spawn({
                let shared = shared.clone();
                move || run_flusher(&shared, flush)
            })
            .map_err(|e| StoreError::Backend(format!("cannot start the store flusher: {e}")))?;
        Ok(Durability {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands over a committed (not yet durable) event. Call in seq order, under the writer lock.
    pub fn push(&self, event: Event) {
        let mut st = self.shared.lock();
        st.appended = st.appended.max(event.seq);
        st.pending.push_back(event);
        if !st.coalescing {
            self.nudge(&mut st);
        }
    }

    /// The watermark: every event up to it is durable.
    pub fn durable(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }

    /// Resolves once the watermark reaches `seq` (a seq not handed over yet counts as the last
    /// one that was).
    pub fn when_durable(&self, seq: u64) -> DurableWait {
        let published = || self.shared.published.load(Ordering::Acquire);
        if seq <= published() {
            return DurableWait::ready();
        }
        let mut st = self.shared.lock();
        let seq = seq.min(st.appended);
        // `published` moves under the lock, and the flusher picks the waiters to wake under
        // the lock after moving it: a waiter registered now is either covered or woken.
        if seq <= published() {
            return DurableWait::ready();
        }
        let (tx, rx) = async_channel::bounded(1);
        st.waiters.push((Target::Seq(seq), tx));
        self.nudge(&mut st);
        DurableWait::pending(rx)
    }

    /// Resolves once every event handed over before the call is durable.
    pub fn when_all_durable(&self) -> DurableWait {
        self.when_durable(u64::MAX)
    }

    /// Resolves after a flush that started after this call (for writes that are not events).
    pub fn flush_round(&self) -> DurableWait {
        let mut st = self.shared.lock();
        st.requested += 1;
        let round = st.requested;
        let (tx, rx) = async_channel::bounded(1);
        st.waiters.push((Target::Round(round), tx));
        self.nudge(&mut st);
        DurableWait::pending(rx)
    }

    /// `Err` while flushes fail (the last one did) or hang (one runs for over
    /// [`STALL_AFTER`]).
    pub fn health(&self) -> StoreResult<()> {
        let st = self.shared.lock();
        if let Some(e) = &st.failure {
            return Err(e.clone());
        }
        match st.flushing_since {
            Some(since) if since.elapsed() > STALL_AFTER => Err(StoreError::Backend(format!(
                "a flush of the store has been running for {} s: the data disk does not \
                 complete writes; new events stay invisible until it does",
                since.elapsed().as_secs()
            ))),
            _ => Ok(()),
        }
    }

    /// The live bus (fed by the flusher only).
    pub fn bus(&self) -> &EventBus {
        &self.shared.bus
    }

    pub fn stats(&self) -> FlushStats {
        let st = self.shared.lock();
        FlushStats {
            flushes: st.flushes,
            events: st.flushed_events,
        }
    }

    /// Holds every flush that has not started yet until the returned guard is dropped: events
    /// appended meanwhile stay invisible. For tests that look at the store before a flush.
    pub fn hold_flushes(&self) -> FlushHold<'_> {
        self.shared.lock().held += 1;
        FlushHold { durability: self }
    }

    fn nudge(&self, st: &mut State) {
        if st.idle {
            st.idle = false;
            self.shared.wake.notify_one();
        }
    }
}

/// See [`Durability::hold_flushes`].
pub struct FlushHold<'a> {
    durability: &'a Durability,
}

impl Drop for FlushHold<'_> {
    fn drop(&mut self) {
        let mut st = self.durability.shared.lock();
        st.held = st.held.saturating_sub(1);
        st.idle = false;
        self.durability.shared.wake.notify_one();
    }
}

impl Drop for Durability {
    /// Flushes what is pending (publishing it) and stops the flusher, so the backend is
    /// released when the store is dropped.
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_flusher(shared: &Shared, mut flush: impl FnMut() -> StoreResult<()>) {
    let mut retry_delay = Duration::from_millis(50);
    loop {
        let (target_seq, target_round) = {
            let mut st = shared.lock();
            let mut coalesced = false;
            loop {
                let work = !st.pending.is_empty() || st.requested > st.done;
                if work && (st.held == 0 || st.shutdown) {
                    let urgent = !st.waiters.is_empty() || st.requested > st.done || st.shutdown;
                    if urgent || coalesced {
                        break;
                    }
                    // Nobody waits: let more appends join this flush.
                    st.idle = true;
                    st.coalescing = true;
                    st = shared
                        .wake
                        .wait_timeout(st, COALESCE)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                    st.coalescing = false;
                    coalesced = true;
                    continue;
                }
                if st.shutdown {
                    return;
                }
                st.idle = true;
                st = shared.wake.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.idle = false;
            st.flushing_since = Some(Instant::now());
            (st.appended, st.requested)
        };
        let result = flush();
        let mut st = shared.lock();
        st.flushing_since = None;
        st.done = st.done.max(target_round);
        let (covered, outcome): (Vec<_>, StoreResult<()>) = match result {
            Ok(()) => {
                shared.durable.fetch_max(target_seq, Ordering::AcqRel);
                let n = st.pending.partition_point(|e| e.seq <= target_seq);
                let now_durable: Vec<Event> = st.pending.drain(..n).collect();
                st.failure = None;
                st.flushes += 1;
                st.flushed_events += now_durable.len() as u64;
                drop(st);
                // Only this thread publishes, so the bus sees seq order.
                for event in &now_durable {
                    shared.bus.publish(event);
                }
                let mut st = shared.lock();
                shared.published.fetch_max(target_seq, Ordering::AcqRel);
                let (done, waiting) = std::mem::take(&mut st.waiters)
                    .into_iter()
                    .partition(|(t, _)| covers(*t, target_seq, target_round));
                st.waiters = waiting;
                drop(st);
                retry_delay = Duration::from_millis(50);
                (done, Ok(()))
            }
            Err(e) => {
                tracing::error!(
                    error = %e,
                    pending = st.pending.len(),
                    "store flush failed; new events stay invisible until a flush succeeds"
                );
                st.failure = Some(e.clone());
                // Everyone this flush was meant for learns it failed; later waiters wait for
                // the retry.
                let (done, waiting) = std::mem::take(&mut st.waiters)
                    .into_iter()
                    .partition(|(t, _)| covers(*t, target_seq, target_round));
                st.waiters = waiting;
                let shutdown = st.shutdown;
                drop(st);
                for (_, tx) in &done {
                    let _ = tx.try_send(Err(e.clone()));
                }
                if shutdown {
                    return;
                }
                std::thread::sleep(retry_delay);
                retry_delay = (retry_delay * 2).min(MAX_RETRY_DELAY);
                continue;
            }
        };
        for (_, tx) in covered {
            let _ = tx.try_send(outcome.clone());
        }
    }
}

fn covers(target: Target, seq: u64, round: u64) -> bool {
    match target {
        Target::Seq(s) => s <= seq,
        Target::Round(r) => r <= round,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventDraft;
    use crate::store::TenantId;
    use std::sync::atomic::AtomicBool;

    fn event(seq: u64) -> Event {
        EventDraft::new(
            &TenantId::default_tenant(),
            1,
            "system",
            "x",
            serde_json::json!({}),
        )
        .into_event(seq)
    }

    /// A flush that blocks while `gate` is closed and counts its calls.
    struct Gate {
        open: Mutex<bool>,
        cv: Condvar,
        calls: AtomicU64,
        fail: AtomicBool,
    }

    impl Gate {
        fn new() -> Arc<Gate> {
            Arc::new(Gate {
                open: Mutex::new(false),
                cv: Condvar::new(),
                calls: AtomicU64::new(0),
                fail: AtomicBool::new(false),
            })
        }
        fn flush(&self) -> StoreResult<()> {
            let mut open = self.open.lock().expect("gate");
            while !*open {
                open = self.cv.wait(open).expect("gate");
            }
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.fail.load(Ordering::SeqCst) {
                Err(StoreError::Backend("disk on fire".into()))
            } else {
                Ok(())
            }
        }
        fn set(&self, open: bool) {
            *self.open.lock().expect("gate") = open;
            self.cv.notify_all();
        }
    }

    #[test]
    fn events_are_published_only_after_the_flush_that_covers_them() {
        let gate = Gate::new();
        let d = Durability::start(0, EventBus::default(), {
            let gate = gate.clone();
            move || gate.flush()
        })
        .expect("start");
        let live = d.bus().subscribe(None);
        d.push(event(1));
        d.push(event(2));
        let wait = d.when_durable(2);
        // The flush is held: nothing is durable or published.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(d.durable(), 0);
        assert!(live.try_recv().is_err());
        gate.set(true);
        wait.wait_blocking().expect("durable");
        assert_eq!(d.durable(), 2);
        assert_eq!(live.try_recv().map(|e| e.seq), Ok(1));
        assert_eq!(live.try_recv().map(|e| e.seq), Ok(2));
        d.when_all_durable()
            .wait_blocking()
            .expect("nothing pending");
    }

    #[test]
    fn appends_during_a_flush_share_the_next_one() {
        let gate = Gate::new();
        let d = Durability::start(0, EventBus::default(), {
            let gate = gate.clone();
            move || gate.flush()
        })
        .expect("start");
        d.push(event(1));
        let first = d.when_durable(1);
        // The flusher is now stuck in the flush for seq 1; 100 more appends arrive meanwhile.
        std::thread::sleep(Duration::from_millis(20));
        let waits: Vec<DurableWait> = (2..=101)
            .map(|s| {
                d.push(event(s));
                d.when_durable(s)
            })
            .collect();
        gate.set(true);
        first.wait_blocking().expect("first");
        for w in waits {
            w.wait_blocking().expect("durable");
        }
        assert_eq!(d.durable(), 101);
        let calls = gate.calls.load(Ordering::SeqCst);
        assert!(calls <= 3, "101 appends took {calls} flushes");
        assert_eq!(d.stats().events, 101);
    }

    #[test]
    fn a_failed_flush_fails_its_waiters_publishes_nothing_and_is_retried() {
        let gate = Gate::new();
        gate.fail.store(true, Ordering::SeqCst);
        gate.set(true);
        let d = Durability::start(0, EventBus::default(), {
            let gate = gate.clone();
            move || gate.flush()
        })
        .expect("start");
        let live = d.bus().subscribe(None);
        d.push(event(1));
        let err = d.when_durable(1).wait_blocking();
        assert!(matches!(err, Err(StoreError::Backend(_))), "{err:?}");
        assert!(d.health().is_err());
        assert_eq!(d.durable(), 0);
        assert!(live.try_recv().is_err());
        // The disk recovers: the retry makes it durable and publishes it.
        gate.fail.store(false, Ordering::SeqCst);
        d.when_durable(1).wait_blocking().expect("retried");
        assert_eq!(live.try_recv().map(|e| e.seq), Ok(1));
        assert!(d.health().is_ok());
    }

    #[test]
    fn a_flush_round_waits_for_a_flush_that_starts_after_it() {
        let gate = Gate::new();
        gate.set(true);
        let d = Durability::start(7, EventBus::default(), {
            let gate = gate.clone();
            move || gate.flush()
        })
        .expect("start");
        assert_eq!(d.durable(), 7);
        d.when_durable(7).wait_blocking().expect("already durable");
        assert_eq!(gate.calls.load(Ordering::SeqCst), 0);
        d.flush_round().wait_blocking().expect("round");
        assert_eq!(gate.calls.load(Ordering::SeqCst), 1);
    }
}
