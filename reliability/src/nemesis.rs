//! The fault schedule of a run: a pure function of the seed and the run's
//! length, so a failing seed replays the same faults in the same order.
//! Two tracks run side by side (etcd faults; server and controller
//! faults), each from its own random stream derived from the seed, so an
//! etcd outage can meet a server kill or a paused controller leader.

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
    /// A step of a fixed plan: `kind` on `target`, held `hold_ms`, then
    /// `gap_ms` of quiet.
    pub fn new(kind: FaultKind, target: usize, hold_ms: u64, gap_ms: u64) -> Self {
        Self {
            kind,
            target,
            hold: Duration::from_millis(hold_ms),
            gap: Duration::from_millis(gap_ms),
        }
    }

    /// A rough length of the step, for filling a run.
    fn estimate(&self) -> Duration {
        let own = match self.kind {
            FaultKind::ServerDrain => Duration::from_millis(1500),
            FaultKind::EtcdKill | FaultKind::ControllerKill => Duration::from_millis(500),
            // Three members stopped, restored and started again, and a
            // snapshot saved after.
            FaultKind::EtcdRestore | FaultKind::EtcdWipe => Duration::from_millis(3000),
            _ => Duration::ZERO,
        };
        own + self.hold + self.gap
    }
}

/// The kinds a track draws from, each with its weight: etcd faults on
/// track 0, server and controller faults on track 1 (controller kinds only
/// in a world with controllers). A loss of etcd's data (restore, wipe)
/// is drawn half as often as the other etcd kinds: each one restarts the
/// whole cluster and re-registers every server.
fn track_kinds(track: usize, controllers: usize) -> Vec<(FaultKind, u32)> {
    FaultKind::ALL
        .into_iter()
        .filter(|k| k.is_etcd() == (track == 0))
        .filter(|k| controllers > 0 || !k.is_controller())
        .map(|k| (k, if k.loses_data() { 1 } else { 2 }))
        .collect()
}

/// The number of tracks [`schedule`] draws: faults of one track follow one
/// another; the two tracks run side by side, so etcd faults overlap server
/// and controller faults.
pub const TRACKS: usize = 2;

/// The random stream of `track` of `seed`: track 0 is seeded with the seed
/// itself, track 1 with the seed mixed by a constant, so each is a pure
/// function of the seed and the two do not repeat each other.
fn track_rng(seed: u64, track: usize) -> StdRng {
    StdRng::seed_from_u64(seed ^ (track as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// The faults of a run of `duration` from `seed`, in [`TRACKS`] tracks that
/// run side by side (etcd faults on track 0; server and controller faults
/// on track 1), over `members` etcd members, `servers` servers and
/// `controllers` controller replicas (no controller faults are drawn when
/// there are none). Within a track one fault at a time.
pub fn schedule(
    seed: u64,
    duration: Duration,
    members: usize,
    servers: usize,
    controllers: usize,
) -> Vec<Vec<Step>> {
    (0..TRACKS)
        .map(|t| {
            track(
                &mut track_rng(seed, t),
                t,
                duration,
                members,
                servers,
                controllers,
            )
        })
        .collect()
}

fn track(
    rng: &mut StdRng,
    track: usize,
    duration: Duration,
    members: usize,
    servers: usize,
    controllers: usize,
) -> Vec<Step> {
    let kinds = track_kinds(track, controllers);
    let total_weight: u32 = kinds.iter().map(|(_, w)| w).sum();
    let mut steps = Vec::new();
    let mut total = Duration::ZERO;
    let ms = |rng: &mut StdRng, lo: u64, hi: u64| Duration::from_millis(rng.random_range(lo..hi));
    while total < duration {
        let mut pick = rng.random_range(0..total_weight);
        let kind = kinds
            .iter()
            .find(|(_, w)| {
                let hit = pick < *w;
                pick = pick.saturating_sub(*w);
                hit
            })
            .map(|(k, _)| *k)
            .expect("a kind within the total weight");
        let of = if kind.is_etcd() {
            members
        } else if kind.is_controller() {
            controllers
        } else {
            servers
        };
        let target = rng.random_range(0..of.max(1));
        let hold = match kind {
            FaultKind::EtcdKill => ms(rng, 1000, 4000),
            FaultKind::EtcdPause => ms(rng, 1000, 3000),
            FaultKind::EtcdIsolate => ms(rng, 1000, 4000),
            FaultKind::EtcdCompact => ms(rng, 0, 500),
            // Often past the controllers' 1 s --dead-after: deleted while dead.
            FaultKind::ServerKill => ms(rng, 200, 3000),
            FaultKind::ServerDrain => ms(rng, 0, 500),
            FaultKind::ServerPause => ms(rng, 300, 2000),
            FaultKind::ControllerKill => ms(rng, 500, 3000),
            // Up to past the world's 3 s election TTL: another replica
            // takes over and the sleeper wakes believing it leads.
            FaultKind::ControllerPause => ms(rng, 1000, 5000),
            // How long every member stays down before the restore.
            FaultKind::EtcdRestore | FaultKind::EtcdWipe => ms(rng, 0, 1000),
            // Not in FaultKind::ALL: only in fixed plans.
            FaultKind::KeyDelete | FaultKind::MultiKeyWrite => ms(rng, 0, 500),
        };
        let step = Step {
            kind,
            target,
            hold,
            gap: ms(rng, 500, 2000),
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
        let first: Vec<Vec<_>> = s
            .iter()
            .map(|t| t.iter().take(3).map(|s| (s.kind, s.target)).collect())
            .collect();
        assert_eq!(first, PINNED_SEED_7, "{s:#?}");
    }

    /// Re-pinned when the schedule became two tracks and the kinds that
    /// lose etcd's data joined (11 kinds, each track drawing from its own
    /// stream): every seed draws other faults since, and histories kept
    /// before then replay only with the binary of their commit. (Pinned
    /// before at 9 kinds, one track, when the controller kinds joined.)
    const PINNED_SEED_7: [[(FaultKind, usize); 3]; 2] = [
        [
            (FaultKind::EtcdIsolate, 0),
            (FaultKind::EtcdCompact, 1),
            (FaultKind::EtcdIsolate, 0),
        ],
        [
            (FaultKind::ServerKill, 0),
            (FaultKind::ControllerPause, 1),
            (FaultKind::ControllerKill, 1),
        ],
    ];

    #[test]
    fn each_track_draws_its_own_kinds_and_fills_the_run() {
        let d = Duration::from_secs(30);
        for seed in 0..50 {
            let s = schedule(seed, d, 3, 3, 2);
            assert_eq!(s.len(), TRACKS);
            assert!(s[0].iter().all(|s| s.kind.is_etcd()), "{s:#?}");
            assert!(s[1].iter().all(|s| !s.kind.is_etcd()), "{s:#?}");
            for t in &s {
                let filled: Duration = t.iter().map(Step::estimate).sum();
                assert!(filled >= d, "seed {seed}: {filled:?}");
            }
        }
        // The two streams differ: track 1 of a seed is not track 0 of
        // another seed shifted.
        assert_ne!(
            track_rng(5, 0).random::<u64>(),
            track_rng(5, 1).random::<u64>()
        );
    }

    #[test]
    fn a_world_without_controllers_draws_no_controller_fault() {
        let s = schedule(3, Duration::from_secs(600), 3, 3, 0);
        assert!(
            s.iter().flatten().all(|s| !s.kind.is_controller()),
            "{s:#?}"
        );
        assert!(s.iter().flatten().any(|s| s.kind == FaultKind::ServerPause));
    }

    #[test]
    fn a_long_run_draws_every_kind_on_every_target() {
        let s = schedule(3, Duration::from_secs(600), 3, 3, 2);
        for kind in FaultKind::ALL {
            let targets = if kind.is_controller() { 2 } else { 3 };
            // A loss of data hits the whole cluster; its target is unused.
            let targets = if kind.loses_data() { 1 } else { targets };
            for t in 0..targets {
                assert!(
                    s.iter().flatten().any(|s| s.kind == kind && s.target == t),
                    "{kind:?} on {t}"
                );
            }
        }
    }

    /// Restores and wipes are drawn, half as often as each other etcd kind,
    /// and hold the cluster down for under a second before it comes back.
    #[test]
    fn losses_of_etcd_data_are_drawn_at_half_weight() {
        let s = schedule(11, Duration::from_secs(3000), 3, 3, 2);
        let count = |k| s[0].iter().filter(|s| s.kind == k).count();
        let (restore, wipe, kill) = (
            count(FaultKind::EtcdRestore),
            count(FaultKind::EtcdWipe),
            count(FaultKind::EtcdKill),
        );
        assert!(restore > 0 && wipe > 0, "{restore} {wipe}");
        let ratio = (restore + wipe) as f64 / (2 * kill) as f64;
        assert!((0.3..0.8).contains(&ratio), "{restore} {wipe} {kill}");
        assert!(s[0]
            .iter()
            .filter(|s| s.kind.loses_data())
            .all(|s| s.hold < Duration::from_secs(1)));
    }
}
