//! The fault schedule of a run: a pure function of the seed and the run's
//! length, so a failing seed replays the same faults in the same order.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::history::FaultKind;

/// One fault: what, on which member or server, held how long, and the
/// quiet gap after it heals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// The fault.
    pub kind: FaultKind,
    /// The etcd member's or the server's index.
    pub target: usize,
    /// How long the fault is held before it heals (a drain's own time
    /// comes on top).
    pub hold: Duration,
    /// Quiet time after the heal, before the next fault.
    pub gap: Duration,
}

impl Step {
    /// A rough length of the step, for filling a run.
    fn estimate(&self) -> Duration {
        let own = match self.kind {
            FaultKind::ServerDrain => Duration::from_millis(1500),
            FaultKind::EtcdKill => Duration::from_millis(500),
            _ => Duration::ZERO,
        };
        own + self.hold + self.gap
    }
}

/// The faults of a run of `duration` from `seed`, one at a time, over
/// `members` etcd members and `servers` servers.
pub fn schedule(seed: u64, duration: Duration, members: usize, servers: usize) -> Vec<Step> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps = Vec::new();
    let mut total = Duration::ZERO;
    let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..hi));
    while total < duration {
        let kind = FaultKind::ALL[rng.random_range(0..FaultKind::ALL.len())];
        let target = rng.random_range(0..if kind.is_etcd() { members } else { servers });
        let hold = match kind {
            FaultKind::EtcdKill => ms(&mut rng, 1000, 4000),
            FaultKind::EtcdPause => ms(&mut rng, 1000, 3000),
            FaultKind::EtcdIsolate => ms(&mut rng, 1000, 4000),
            FaultKind::EtcdCompact => ms(&mut rng, 0, 500),
            FaultKind::ServerKill => ms(&mut rng, 200, 1500),
            FaultKind::ServerDrain => ms(&mut rng, 0, 500),
            FaultKind::ServerPause => ms(&mut rng, 300, 2000),
        };
        let step = Step {
            kind,
            target,
            hold,
            gap: ms(&mut rng, 500, 2000),
        };
        total += step.estimate();
        steps.push(step);
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_is_a_pure_function_of_the_seed() {
        let d = Duration::from_secs(30);
        for seed in [0, 1, 42, u64::MAX] {
            assert_eq!(schedule(seed, d, 3, 3), schedule(seed, d, 3, 3));
        }
        assert_ne!(schedule(1, d, 3, 3), schedule(2, d, 3, 3));
        // Pinned, so a change of generator (or of rand) that would make
        // recorded seeds replay other faults is noticed.
        let s = schedule(7, d, 3, 3);
        let first: Vec<_> = s.iter().take(3).map(|s| (s.kind, s.target)).collect();
        assert_eq!(first, PINNED_SEED_7, "{s:#?}");
    }

    const PINNED_SEED_7: [(FaultKind, usize); 3] = [
        (FaultKind::EtcdIsolate, 0),
        (FaultKind::ServerKill, 1),
        (FaultKind::ServerKill, 0),
    ];

    #[test]
    fn a_long_run_draws_every_kind_on_every_target() {
        let s = schedule(3, Duration::from_secs(600), 3, 3);
        for kind in FaultKind::ALL {
            for t in 0..3 {
                assert!(
                    s.iter().any(|s| s.kind == kind && s.target == t),
                    "{kind:?} on {t}"
                );
            }
        }
    }
}
