//! `backoff`: when to reconnect, without I/O, clock or RNG of its own.
//!
//! The tunnel asks [`Backoff::next_delay`] how long to sleep before the next dial, passing a
//! random `u64`, and reports link events with the current [`Instant`]. Keeping time and
//! randomness outside makes the policy a plain state machine that tests (and property tests)
//! drive exhaustively.
//!
//! Policy, and how it fixes 0.1.50's reconnect storm (its §2.5/§15.2.1):
//!
//! - **Full jitter**: the delay is uniform in `[0, min(cap, base·2^attempt)]` (the AWS
//!   "exponential backoff and jitter" scheme). A fleet that lost the control plane at the same
//!   moment spreads its reconnects over the whole window instead of arriving in waves.
//! - **Reset only after a stable link.** 0.1.50 reset the attempt counter on every WebSocket
//!   open, so a control plane that accepted the upgrade and then dropped the link was hammered
//!   about once a second forever. Here [`Backoff::on_connected`] is called when the handshake
//!   *succeeds*, and the counter resets only if that link then lasted `stable_after`.
//! - **Rejected mode.** After the control plane says "auth rejected" or "update required",
//!   retrying sooner cannot help; only an operator can. [`Backoff::on_rejected`] makes every
//!   following delay sit at the cap, jittered in `[cap/2, cap]` (never near zero), until a
//!   handshake succeeds again.

use std::time::{Duration, Instant};

/// Exponents beyond this no longer change `min(cap, base·2^attempt)` for any sane base; the
/// counter stops here so it can never overflow.
const MAX_EXPONENT: u32 = 62;

/// Reconnect delay policy. See the module doc.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    stable_after: Duration,
    attempt: u32,
    rejected: bool,
    connected_at: Option<Instant>,
}

impl Backoff {
    /// `base` is clamped to at least 1 ms, `cap` to at least `base`.
    pub fn new(base: Duration, cap: Duration, stable_after: Duration) -> Backoff {
        let base = base.max(Duration::from_millis(1));
        Backoff {
            base,
            cap: cap.max(base),
            stable_after,
            attempt: 0,
            rejected: false,
            connected_at: None,
        }
    }

    /// From `[reconnect]` in the daemon config.
    pub fn from_config(c: &crate::config::ReconnectConfig) -> Backoff {
        Backoff::new(
            Duration::from_millis(c.base_ms),
            Duration::from_millis(c.cap_ms),
            Duration::from_secs(c.stable_after_s),
        )
    }

    /// How long to wait before the next dial; advances the attempt counter. `rand` is any
    /// uniformly random `u64` (the caller's RNG).
    pub fn next_delay(&mut self, rand: u64) -> Duration {
        let delay = if self.rejected {
            // [cap/2, cap]
            let cap = millis(self.cap);
            let half = cap / 2;
            Duration::from_millis(half + rand % (cap - half + 1))
        } else {
            let ceiling = millis(self.ceiling());
            Duration::from_millis(rand % (ceiling + 1))
        };
        self.attempt = self.attempt.saturating_add(1).min(MAX_EXPONENT);
        delay
    }

    /// The upper bound of the next delay outside rejected mode: `min(cap, base·2^attempt)`.
    pub fn ceiling(&self) -> Duration {
        if self.attempt >= 32 {
            return self.cap;
        }
        self.base
            .checked_mul(1u32 << self.attempt)
            .map_or(self.cap, |d| d.min(self.cap))
    }

    /// The handshake succeeded at `now`: the link is up and authenticated. Leaves rejected
    /// mode. The attempt counter is *not* reset yet; that waits for a stable link.
    pub fn on_connected(&mut self, now: Instant) {
        self.rejected = false;
        self.connected_at = Some(now);
    }

    /// The link went down at `now`. If it had been up for at least `stable_after`, the next
    /// delay starts from `base` again.
    pub fn on_disconnected(&mut self, now: Instant) {
        if let Some(since) = self.connected_at.take() {
            if now.saturating_duration_since(since) >= self.stable_after {
                self.attempt = 0;
            }
        }
    }

    /// The control plane rejected us (auth failed, update required): back off at the cap until
    /// a handshake succeeds.
    pub fn on_rejected(&mut self) {
        self.rejected = true;
        self.connected_at = None;
    }

    /// Dials since the last reset (saturates).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Whether the last thing the control plane said was a rejection.
    pub fn is_rejected(&self) -> bool {
        self.rejected
    }

    /// The configured cap.
    pub fn cap(&self) -> Duration {
        self.cap
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn policy() -> impl Strategy<Value = (u64, u64, u64)> {
        // base ms, cap ms (>= base by construction below), stable_after s
        (1u64..5_000, 0u64..600_000, 0u64..600)
            .prop_map(|(base, extra, stable)| (base, base + extra, stable))
    }

    #[test]
    fn defaults_double_to_the_cap() {
        let mut b = Backoff::new(MS(1000), MS(30_000), Duration::from_secs(60));
        let ceilings: Vec<u64> = (0..8)
            .map(|_| {
                let c = millis(b.ceiling());
                b.next_delay(u64::MAX);
                c
            })
            .collect();
        assert_eq!(
            ceilings,
            [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
    }

    #[test]
    fn flapping_link_does_not_reset() {
        let t0 = Instant::now();
        let mut b = Backoff::new(MS(1000), MS(30_000), Duration::from_secs(60));
        for i in 0..10u64 {
            b.next_delay(0);
            b.on_connected(t0 + Duration::from_secs(i * 100));
            b.on_disconnected(t0 + Duration::from_secs(i * 100 + 1));
        }
        assert_eq!(b.attempt(), 10);
        assert_eq!(b.ceiling(), MS(30_000));
    }

    proptest! {
        #[test]
        fn delay_never_exceeds_cap((base, cap, stable) in policy(), rands in prop::collection::vec(any::<u64>(), 1..80)) {
            let mut b = Backoff::new(MS(base), MS(cap), Duration::from_secs(stable));
            for r in rands {
                let ceiling = b.ceiling();
                let d = b.next_delay(r);
                prop_assert!(d <= ceiling);
                prop_assert!(d <= MS(cap));
            }
        }

        #[test]
        fn ceiling_grows_then_saturates((base, cap, stable) in policy(), n in 1usize..100) {
            let mut b = Backoff::new(MS(base), MS(cap), Duration::from_secs(stable));
            let mut prev = b.ceiling();
            prop_assert_eq!(prev, MS(base).min(MS(cap)));
            for _ in 0..n {
                b.next_delay(0);
                let c = b.ceiling();
                prop_assert!(c >= prev);
                prop_assert!(c <= MS(cap));
                // Doubles until it reaches the cap.
                prop_assert!(c == MS(cap) || c == prev * 2);
                prev = c;
            }
        }

        #[test]
        fn max_random_hits_the_ceiling((base, cap, stable) in policy(), n in 0usize..40) {
            let mut b = Backoff::new(MS(base), MS(cap), Duration::from_secs(stable));
            for _ in 0..n { b.next_delay(1); }
            let ceiling = millis(b.ceiling());
            // rand % (ceiling + 1) == ceiling exactly when rand ≡ ceiling.
            prop_assert_eq!(b.next_delay(ceiling), MS(ceiling));
        }

        #[test]
        fn resets_only_after_stable_link(
            (base, cap, stable) in policy(),
            before in 1usize..30,
            up_s in 0u64..1200,
        ) {
            let t0 = Instant::now();
            let mut b = Backoff::new(MS(base), MS(cap), Duration::from_secs(stable));
            for _ in 0..before { b.next_delay(7); }
            let attempt = b.attempt();
            b.on_connected(t0);
            b.on_disconnected(t0 + Duration::from_secs(up_s));
            if up_s >= stable {
                prop_assert_eq!(b.attempt(), 0);
                prop_assert_eq!(b.ceiling(), MS(base));
            } else {
                prop_assert_eq!(b.attempt(), attempt);
            }
            // A disconnect without a preceding connect never resets.
            for _ in 0..before { b.next_delay(7); }
            let attempt = b.attempt();
            b.on_disconnected(t0 + Duration::from_secs(100_000));
            prop_assert_eq!(b.attempt(), attempt);
        }

        #[test]
        fn rejected_stays_in_upper_half_of_cap(
            (base, cap, stable) in policy(),
            rands in prop::collection::vec(any::<u64>(), 1..50),
        ) {
            let t0 = Instant::now();
            let mut b = Backoff::new(MS(base), MS(cap), Duration::from_secs(stable));
            b.on_rejected();
            for r in &rands {
                let d = b.next_delay(*r);
                prop_assert!(d <= MS(cap));
                prop_assert!(d >= MS(cap / 2));
            }
            // Even a long-lived WS open without a successful handshake does not leave the mode;
            // a successful handshake does.
            b.on_disconnected(t0 + Duration::from_secs(10_000));
            prop_assert!(b.is_rejected());
            b.on_connected(t0);
            prop_assert!(!b.is_rejected());
            let d = b.next_delay(rands[0]);
            prop_assert!(d <= MS(cap));
        }
    }
}
