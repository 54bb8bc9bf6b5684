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
    /// The etcd member's, the server's or the controller replica's index
    /// (a controller fault hits the leader when one leads; the index is
    /// the fallback).
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
            FaultKind::EtcdKill | FaultKind::ControllerKill => Duration::from_millis(500),
            _ => Duration::ZERO,
        };
        own + self.hold + self.gap
    }
}

/// The faults of a run of `duration` from `seed`, one at a time, over
/// `members` etcd members, `servers` servers and `controllers` controller
/// replicas (no controller faults are drawn when there are none).
pub fn schedule(
    seed: u64,
    duration: Duration,
    members: usize,
    servers: usize,
    controllers: usize,
) -> Vec<Step> {
    let kinds: Vec<FaultKind> = FaultKind::ALL
        .into_iter()
        .filter(|k| controllers > 0 || !k.is_controller())
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut steps = Vec::new();
    let mut total = Duration::ZERO;
    let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..hi));
    while total < duration {
        let kind = kinds[rng.random_range(0..kinds.len())];
        let of = if kind.is_etcd() {
            members
        } else if kind.is_controller() {
            controllers
        } else {
            servers
        };
        let target = rng.random_range(0..of.max(1));
        let hold = match kind {
            FaultKind::EtcdKill => ms(&mut rng, 1000, 4000),
            FaultKind::EtcdPause => ms(&mut rng, 1000, 3000),
            FaultKind::EtcdIsolate => ms(&mut rng, 1000, 4000),
            FaultKind::EtcdCompact => ms(&mut rng, 0, 500),
            // Often past the controllers' 1 s --dead-after: deleted while dead.
            FaultKind::ServerKill => ms(&mut rng, 200, 3000),
            FaultKind::ServerDrain => ms(&mut rng, 0, 500),
            FaultKind::ServerPause => ms(&mut rng, 300, 2000),
            FaultKind::ControllerKill => ms(&mut rng, 500, 3000),
            // Up to past the world's 3 s election TTL: another replica
            // takes over and the sleeper wakes believing it leads.
            FaultKind::ControllerPause => ms(&mut rng, 1000, 5000),
            // Not in FaultKind::ALL: only in fixed plans.
            FaultKind::KeyDelete | FaultKind::MultiKeyWrite => ms(&mut rng, 0, 500),
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
            assert_eq!(schedule(seed, d, 3, 3, 2), schedule(seed, d, 3, 3, 2));
        }
        assert_ne!(schedule(1, d, 3, 3, 2), schedule(2, d, 3, 3, 2));
        // Pinned, so a change of generator (or of rand) that would make
        // recorded seeds replay other faults is noticed.
        let s = schedule(7, d, 3, 3, 2);
        let first: Vec<_> = s.iter().take(3).map(|s| (s.kind, s.target)).collect();
        assert_eq!(first, PINNED_SEED_7, "{s:#?}");
    }

    /// Re-pinned when the controller kinds joined (9 kinds, not 7): every
    /// seed draws other faults since; histories kept before then replay
    /// only with the binary of their commit.
    const PINNED_SEED_7: [(FaultKind, usize); 3] = [
        (FaultKind::EtcdCompact, 0),
        (FaultKind::ServerDrain, 1),
        (FaultKind::ServerDrain, 0),
    ];

    #[test]
    fn a_world_without_controllers_draws_no_controller_fault() {
        let s = schedule(3, Duration::from_secs(600), 3, 3, 0);
        assert!(s.iter().all(|s| !s.kind.is_controller()), "{s:#?}");
        assert!(s.iter().any(|s| s.kind == FaultKind::ServerPause));
    }

    #[test]
    fn a_long_run_draws_every_kind_on_every_target() {
        let s = schedule(3, Duration::from_secs(600), 3, 3, 2);
        for kind in FaultKind::ALL {
            let targets = if kind.is_controller() { 2 } else { 3 };
            for t in 0..targets {
                assert!(
                    s.iter().any(|s| s.kind == kind && s.target == t),
                    "{kind:?} on {t}"
                );
            }
        }
    }
}
