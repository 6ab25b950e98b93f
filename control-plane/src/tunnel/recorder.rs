//! The tunnel's bookkeeping writes (connects, disconnects, command records) on one thread of
//! their own.
//!
//! They used to go through `smol::unblock`, one blocking-pool hop each: a job queued, an idle
//! pool thread woken (or a new one started), the result handed back. In a connect storm that
//! kept dozens of pool threads waking and sleeping, and the context switches cost more CPU
//! than the writes themselves (they are plain sled inserts, see `store::sled`). Here one thread
//! takes the jobs in arrival order and runs them back to back: while it is busy, queueing a job
//! wakes nobody. Arrival order is also write order, so a device's disconnect is never recorded
//! before its connect.
//!
//! The thread starts on first use and ends when its [`Recorder`] is dropped.

use std::sync::OnceLock;

type Job = Box<dyn FnOnce() + Send>;

/// A queue of store writes run in order on a dedicated thread.
#[derive(Default)]
pub struct Recorder {
    tx: OnceLock<async_channel::Sender<Job>>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    fn sender(&self) -> &async_channel::Sender<Job> {
        self.tx.get_or_init(|| {
            let (tx, rx) = async_channel::unbounded::<Job>();
            let spawned = std::thread::Builder::new()
                .name("recorder".into())
                .spawn(move || {
                    while let Ok(job) = rx.recv_blocking() {
                        let started = std::time::Instant::now();
                        job();
                        let took = started.elapsed();
                        if took > std::time::Duration::from_millis(100) {
                            tracing::warn!(
                                took_ms = took.as_millis() as u64,
                                "a store write on the recorder thread was slow; check the data disk"
                            );
                        }
                    }
                });
            if let Err(e) = spawned {
                // Without the thread the queue is never drained; `run` then falls back to the
                // blocking pool (the receiver was dropped with the closure).
                tracing::error!(error = %e, "cannot start the recorder thread");
            }
            tx
        })
    }

    /// Runs `write` on the recorder thread, after every write queued before it, and returns
    /// its result.
    pub async fn run<T, F>(&self, write: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = async_channel::bounded(1);
        let job: Job = Box::new(move || {
            let _ = tx.try_send(write());
        });
        match self.sender().try_send(job) {
            Ok(()) => {}
            // No thread (could not be started): run it on the blocking pool instead.
            Err(e) => smol::unblock(e.into_inner()).await,
        }
        match rx.recv().await {
            Ok(value) => value,
            // The job was dropped without running: only if the thread died mid-job (a panic
            // in a store call, which aborts in release builds anyway).
            Err(_) => panic!("the recorder thread ended before finishing a write"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_run_in_order_and_return_their_results() {
        let recorder = Recorder::new();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        smol::block_on(async {
            let mut pending = Vec::new();
            for i in 0..100 {
                let log = log.clone();
                pending.push(recorder.run(move || {
                    log.lock().expect("log").push(i);
                    i * 2
                }));
            }
            for (i, p) in pending.into_iter().enumerate() {
                assert_eq!(p.await, i * 2);
            }
        });
        assert_eq!(*log.lock().expect("log"), (0..100).collect::<Vec<_>>());
    }
}
