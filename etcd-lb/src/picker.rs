//! Which endpoint takes the next call: the smooth weighted round-robin
//! [`Scheduler`] proposes, and the load-aware picker may pass its choice
//! over for a far less loaded endpoint.
//!
//! Why not plain power-of-two-choices over cost (tower's `p2c`, linkerd's
//! balancer)? It has no weights, and weighted P2C drifts from them: on a
//! uniform fleet the registry's weights must hold exactly (100/200/300
//! within 1 %, 9900:50:50 within 0.5 % absolute), which only a scheduler
//! gives. So the scheduler stays the source of picks, and the load signal
//! only overrides it when the difference is large:
//!
//! 1. the scheduler's next endpoint `a` (its turn is used up either way);
//! 2. one endpoint `b` drawn at random from the others in rotation;
//! 3. `b` takes the call when its latency estimate (PeakEWMA, at least
//!    the 1 ms noise floor) or its cost (estimate x calls in flight
//!    against its fair share of them, [`crate::load`]) is `deviation`
//!    (default 4x) lower than `a`'s, and `b` is at most two of its own
//!    periods ahead of the scheduler's clock.
//!
//! The last rule is what keeps weights: what `b` takes early it does not
//! get again in turn, so no endpoint ever gets more than its weight's
//! share of the picks made; only passed-over endpoints get less, and what
//! they lose goes to the others by their weights. On a uniform fleet
//! estimates and costs stay within the deviation of each other, so the
//! picks are the scheduler's (measured through the real binaries:
//! 100/200/300 -> 0.171/0.337/0.492 over 30,000 calls at concurrency 16,
//! 9900:50:50 -> 0.9900/0.0050/0.0050). A server 50x slower than the
//! rest, or one that fails fast (failures count as 250 ms), or one piling
//! up calls is passed over (`greet-bench uneven`: a 50 ms server among
//! three keeps 0.2-0.3 % of the calls; the fleet 0.86-0.96 of the all-fast
//! one's calls/s, p99 under 7 ms). Its estimate decays while it gets no
//! answers, so it is tried again within about a second and wins its share
//! back when it answers fast. O(log n) per pick, as the scheduler.

use tokio::time::Instant;

use crate::load::{Load, LoadConfig};
use crate::scheduler::Scheduler;

/// How the balancer picks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Picker {
    /// Smooth weighted round-robin over the registry's weights, adjusted
    /// by load (see the module docs).
    LoadAware(LoadConfig),
    /// Smooth weighted round-robin only: blind to latency and calls in
    /// flight.
    RoundRobin,
}

impl Default for Picker {
    /// Load-aware with [`LoadConfig::default`].
    fn default() -> Self {
        Picker::LoadAware(LoadConfig::default())
    }
}

impl Picker {
    /// The load settings, when load-aware.
    pub fn load(&self) -> Option<&LoadConfig> {
        match self {
            Picker::LoadAware(cfg) => Some(cfg),
            Picker::RoundRobin => None,
        }
    }
}

/// What a load-aware pick compares endpoints with, read once per pick.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Costs<'a> {
    pub(crate) cfg: &'a LoadConfig,
    pub(crate) now: Instant,
    /// Calls in flight on the whole balancer.
    pub(crate) in_flight: u32,
    /// Sum of the weights in rotation.
    pub(crate) total_weight: u64,
}

impl Costs<'_> {
    /// One endpoint's cost.
    pub(crate) fn of(&self, load: &Load, weight: u32) -> f64 {
        let share = f64::from(weight) / (self.total_weight.max(1) as f64);
        load.cost(self.now, self.cfg, share, self.in_flight)
    }

    /// Whether `other` should take `next`'s turn: its latency estimate or
    /// its cost is `deviation` times lower.
    pub(crate) fn prefer(&self, next: (&Load, u32), other: (&Load, u32)) -> bool {
        let k = self.cfg.deviation;
        let floor = self.cfg.floor;
        let est = |l: &Load| l.estimate(self.now, self.cfg).max(floor).as_secs_f64();
        est(next.0) > k * est(other.0) || self.of(next.0, next.1) > k * self.of(other.0, other.1)
    }
}

/// Picks from `sched`: [`Scheduler::pick`] for round-robin, or
/// [`Scheduler::pick_or_other`] with `load(key)` giving an endpoint's load
/// and weight.
pub(crate) fn pick<'l, K: Clone + Eq + std::hash::Hash>(
    picker: &Picker,
    sched: &mut Scheduler<K>,
    weight: impl FnMut(&K, u32) -> f64,
    in_flight: u32,
    load: impl Fn(&K) -> Option<(&'l Load, u32)>,
) -> Option<K> {
    let Some(cfg) = picker.load() else {
        return sched.pick(weight);
    };
    let costs = Costs {
        cfg,
        now: Instant::now(),
        in_flight,
        total_weight: sched.total_weight(),
    };
    sched.pick_or_other(weight, |next, other| match (load(next), load(other)) {
        (Some(n), Some(o)) => costs.prefer(n, o),
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    //! A fleet simulated on paused time: `concurrency` callers, each
    //! endpoint answering after its own latency.

    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::sync::atomic::AtomicU32;
    use std::time::Duration;

    use super::*;

    struct Sim {
        sched: Scheduler<usize>,
        loads: Vec<Load>,
        weights: Vec<u32>,
        total: AtomicU32,
        picker: Picker,
    }

    impl Sim {
        fn new(weights: &[u32], picker: Picker) -> Self {
            let mut sched = Scheduler::new();
            for (i, w) in weights.iter().enumerate() {
                sched.set(i, *w);
            }
            Self {
                sched,
                loads: weights.iter().map(|_| Load::new(Instant::now())).collect(),
                weights: weights.to_vec(),
                total: AtomicU32::new(0),
                picker,
            }
        }

        /// Runs `calls` calls, `concurrency` at a time, each taking
        /// `latency(endpoint, call number)`; returns the calls per endpoint.
        async fn run(
            &mut self,
            calls: usize,
            concurrency: usize,
            latency: impl Fn(usize, usize) -> Duration,
        ) -> Vec<usize> {
            let mut counts = vec![0; self.weights.len()];
            // (finish time, sequence, endpoint, start time)
            let mut running = BinaryHeap::new();
            let mut started = 0;
            let mut seq = 0u64;
            let cfg = self.picker.load().copied().unwrap_or_default();
            while started < calls || !running.is_empty() {
                while started < calls && running.len() < concurrency {
                    let in_flight = self.total.load(std::sync::atomic::Ordering::Relaxed);
                    let (loads, weights) = (&self.loads, &self.weights);
                    let k = pick(
                        &self.picker,
                        &mut self.sched,
                        |_, w| f64::from(w),
                        in_flight,
                        |k: &usize| Some((&loads[*k], weights[*k])),
                    )
                    .expect("a pick");
                    counts[k] += 1;
                    self.loads[k].enter(&self.total);
                    let now = Instant::now();
                    running.push(Reverse((now + latency(k, started), seq, k, now)));
                    seq += 1;
                    started += 1;
                }
                let Some(Reverse((at, _, k, from))) = running.pop() else {
                    break;
                };
                tokio::time::advance(at.saturating_duration_since(Instant::now())).await;
                self.loads[k].leave(&self.total);
                self.loads[k].observe(at - from, false, at, &cfg);
            }
            counts
        }
    }

    fn shares(counts: &[usize]) -> Vec<f64> {
        let n: usize = counts.iter().sum();
        counts.iter().map(|c| *c as f64 / n as f64).collect()
    }

    const MS: Duration = Duration::from_millis(1);

    /// Jitter from the call number: latencies on a uniform fleet vary.
    fn jitter(call: usize) -> Duration {
        Duration::from_micros(((call * 7919) % 1000) as u64)
    }

    #[tokio::test(start_paused = true)]
    async fn a_uniform_fleet_keeps_its_weights_exactly() {
        for weights in [vec![100, 200, 300], vec![9900, 50, 50], vec![1, 1, 1]] {
            let mut sim = Sim::new(&weights, Picker::default());
            let counts = sim.run(30_000, 16, |_, call| 2 * MS + jitter(call)).await;
            let sum: u32 = weights.iter().sum();
            for (i, s) in shares(&counts).iter().enumerate() {
                let want = f64::from(weights[i]) / f64::from(sum);
                assert!(
                    (s - want).abs() < 0.005,
                    "{weights:?}: endpoint {i} share {s:.4}, want {want:.4}: {counts:?}"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_endpoint_loses_traffic_and_wins_it_back() {
        let mut sim = Sim::new(&[100, 100, 100], Picker::default());
        let slow = |k: usize, call: usize| {
            if k == 0 {
                50 * MS
            } else {
                MS + jitter(call) / 10
            }
        };
        let counts = sim.run(30_000, 16, slow).await;
        let s = shares(&counts);
        assert!(s[0] < 0.01, "the 50 ms one gets under 1 %: {counts:?}");
        let mut rr = Sim::new(&[100, 100, 100], Picker::RoundRobin);
        let counts = rr.run(3_000, 16, slow).await;
        assert!(shares(&counts)[0] > 0.3, "round-robin: a third: {counts:?}");

        // Recovered: within 5 s (about 35,000 calls at 16 x 1 ms) it has
        // its third back.
        let started = Instant::now();
        let _ = sim.run(35_000, 16, |_, call| MS + jitter(call) / 10).await;
        assert!(Instant::now() - started <= Duration::from_secs(5));
        let counts = sim.run(6_000, 16, |_, call| MS + jitter(call) / 10).await;
        let s = shares(&counts);
        assert!((s[0] - 1.0 / 3.0).abs() < 0.02, "share back: {counts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_robin_picker_ignores_load() {
        let mut sim = Sim::new(&[1, 1], Picker::RoundRobin);
        let counts = sim
            .run(1_000, 4, |k, _| if k == 0 { 100 * MS } else { MS })
            .await;
        assert_eq!(counts, [500, 500]);
    }
}
