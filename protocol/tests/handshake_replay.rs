//! Property tests of the nonce replay cache with injected time: it agrees with a naive model,
//! never exceeds its cap, evicts the oldest entry first, and forgets entries once they expire.

use codemantle_protocol::handshake::{ReplayCache, Replayed};
use proptest::prelude::*;

/// Obviously-correct O(n) model of the cache: (nonce, expiry, insertion seq).
#[derive(Default)]
struct Model {
    cap: usize,
    entries: Vec<(u8, u64, u64)>,
    seq: u64,
    evicted: u64,
}

impl Model {
    fn live(&self, nonce: u8, now: u64) -> bool {
        self.entries.iter().any(|&(n, e, _)| n == nonce && now <= e)
    }

    fn insert(&mut self, nonce: u8, expiry: u64, now: u64) -> Result<(), Replayed> {
        self.entries.retain(|&(_, e, _)| e >= now);
        if self.live(nonce, now) {
            return Err(Replayed);
        }
        self.entries.retain(|&(n, _, _)| n != nonce);
        if expiry < now {
            return Ok(());
        }
        while self.entries.len() >= self.cap {
            let (i, _) = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, e, s))| (*e, *s))
                .unwrap();
            self.entries.remove(i);
            self.evicted += 1;
        }
        self.entries.push((nonce, expiry, self.seq));
        self.seq += 1;
        Ok(())
    }
}

fn nonce_str(n: u8) -> String {
    format!("nonce-{n:03}-padding")
}

#[derive(Debug, Clone)]
enum Op {
    /// Advance (or, rarely, rewind) the clock, then insert `nonce` live for `ttl` ms.
    Insert { dt: i64, nonce: u8, ttl: u64 },
    /// Advance the clock and prune.
    Prune { dt: i64 },
}

fn op() -> impl Strategy<Value = Op> {
    let dt = prop_oneof![8 => 0i64..2_000, 1 => -500i64..0];
    prop_oneof![
        6 => (dt.clone(), 0u8..40, 0u64..5_000).prop_map(|(dt, nonce, ttl)| Op::Insert { dt, nonce, ttl }),
        1 => dt.prop_map(|dt| Op::Prune { dt }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn agrees_with_model(cap in 1usize..12, ops in prop::collection::vec(op(), 0..200)) {
        let mut cache = ReplayCache::new(cap);
        let mut model = Model { cap, ..Model::default() };
        let mut now: u64 = 1_000_000;
        for op in ops {
            match op {
                Op::Insert { dt, nonce, ttl } => {
                    now = now.saturating_add_signed(dt);
                    let got = cache.insert(&nonce_str(nonce), now + ttl, now);
                    let want = model.insert(nonce, now + ttl, now);
                    prop_assert_eq!(got, want);
                }
                Op::Prune { dt } => {
                    now = now.saturating_add_signed(dt);
                    cache.prune(now);
                    model.entries.retain(|&(_, e, _)| e >= now);
                }
            }
            prop_assert!(cache.len() <= cap);
            prop_assert_eq!(cache.len(), model.entries.len());
            prop_assert_eq!(cache.evicted(), model.evicted);
            for n in 0..40u8 {
                prop_assert_eq!(cache.contains(&nonce_str(n), now), model.live(n, now), "nonce {}", n);
            }
        }
    }

    /// With a monotonic clock and a fixed window, a full cache evicts the oldest insertions first:
    /// the live set is always the most recent `cap` unexpired nonces.
    #[test]
    fn evicts_oldest(cap in 1usize..16, steps in prop::collection::vec(0u64..50, 1..100), window in 1u64..500) {
        let mut cache = ReplayCache::new(cap);
        let mut now = 0u64;
        let mut inserted: Vec<(String, u64)> = Vec::new();
        for (i, dt) in steps.into_iter().enumerate() {
            now += dt;
            let nonce = format!("unique-nonce-{i:06}");
            prop_assert_eq!(cache.insert(&nonce, now + window, now), Ok(()));
            inserted.push((nonce, now + window));
            let unexpired: Vec<&(String, u64)> = inserted.iter().filter(|(_, e)| now <= *e).collect();
            let keep = unexpired.len().min(cap);
            let (evicted, kept) = unexpired.split_at(unexpired.len() - keep);
            for (n, _) in kept {
                prop_assert!(cache.contains(n, now), "{} should be live", n);
            }
            for (n, _) in evicted {
                prop_assert!(!cache.contains(n, now), "{} should be evicted", n);
            }
        }
    }

    /// An entry is a replay up to and including its expiry and free again after it.
    #[test]
    fn expiry_boundary(start in 0u64..1_000_000_000, ttl in 0u64..100_000, later in 1u64..100_000) {
        let mut cache = ReplayCache::new(4);
        prop_assert_eq!(cache.insert("nonce-under-test-1", start + ttl, start), Ok(()));
        prop_assert_eq!(cache.insert("nonce-under-test-1", start + ttl, start + ttl), Err(Replayed));
        prop_assert!(!cache.contains("nonce-under-test-1", start + ttl + 1));
        let t = start + ttl + later;
        prop_assert_eq!(cache.insert("nonce-under-test-1", t + ttl, t), Ok(()));
        prop_assert_eq!(cache.len(), 1);
    }
}

#[test]
fn capacity_is_at_least_one_and_default_is_large() {
    assert_eq!(ReplayCache::new(0).capacity(), 1);
    assert_eq!(ReplayCache::default().capacity(), 65_536);
}
