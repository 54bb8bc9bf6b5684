//! What the balancer knows about an endpoint's load: a peak-sensitive
//! moving average of its latency (linkerd's and tower's PeakEWMA) and its
//! calls in flight, and the cost the picker compares them by.
//!
//! - The latency estimate jumps up to a slower answer at once and comes
//!   down slowly (an exponential average with time constant
//!   [`LoadConfig::decay`]); while an endpoint gets no answers its estimate
//!   decays toward zero, so an endpoint avoided for being slow is tried
//!   again after a while, and wins its share back once it answers fast.
//! - A failed answer (a server-side failure, or a broken connection)
//!   counts as [`LoadConfig::failure_penalty`] of latency at least: an
//!   endpoint that fails fast must never look attractive for it (Finagle
//!   and linkerd do the same). Failures enter the average without its
//!   peak rule: one failure among successes costs little, a run of them
//!   (an endpoint that fails everything) makes it look slow within about
//!   a tenth of the decay time.
//! - Cost = estimate x (in flight + 1) / (1 + its fair share of all calls
//!   in flight). The fair share (total in flight x weight / total weight)
//!   makes costs of a fleet whose weights differ comparable: an endpoint
//!   with 99 % of the weight is expected to hold 99 % of the calls, and
//!   holding them is no sign of trouble. Plain `(in flight + 1) / weight`
//!   starves light endpoints under concurrency (weighted P2C's known drift).
//!
//! Reading a cost takes one uncontended lock and the clock; recording an
//! answer the same.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How load is measured and when it changes a pick.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadConfig {
    /// Time constant of the latency average: an estimate that stops being
    /// confirmed falls to 37 % of itself in this time (linkerd: 10 s; a
    /// shorter one wins a recovered server its share back sooner).
    pub decay: Duration,
    /// A failed answer counts as at least this much latency.
    pub failure_penalty: Duration,
    /// Latencies below this count as this: noise (a 0.1 ms answer and a
    /// 0.9 ms one on loopback are the same). Above the fleet's own
    /// latency it would make the fleet's calls in flight look costlier
    /// than they are, and a slow endpoint keep more of them (5 ms let a
    /// 50 ms server keep 1.7 % of the calls in `greet-bench uneven`).
    pub floor: Duration,
    /// The picker leaves the scheduler's choice only for an endpoint this
    /// many times cheaper: below it, weights hold exactly.
    pub deviation: f64,
}

impl Default for LoadConfig {
    /// 1 s decay, 250 ms failure penalty, 1 ms floor, 4x deviation.
    fn default() -> Self {
        Self {
            decay: Duration::from_secs(1),
            failure_penalty: Duration::from_millis(250),
            floor: Duration::from_millis(1),
            deviation: 4.0,
        }
    }
}

/// The latency average: its value (ns) when last updated, and when.
#[derive(Debug, Clone, Copy)]
struct Ewma {
    estimate: f64,
    at: Instant,
}

/// One endpoint's load, shared by the pool and its attempts.
#[derive(Debug)]
pub(crate) struct Load {
    in_flight: AtomicU32,
    ewma: Mutex<Ewma>,
}

impl Load {
    /// No answers yet: estimate zero (a new endpoint is worth a try).
    pub(crate) fn new(now: Instant) -> Self {
        Self {
            in_flight: AtomicU32::new(0),
            ewma: Mutex::new(Ewma {
                estimate: 0.0,
                at: now,
            }),
        }
    }

    fn ewma(&self) -> std::sync::MutexGuard<'_, Ewma> {
        self.ewma.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls in flight now.
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The latency estimate at `now` (decayed since the last answer).
    pub(crate) fn estimate(&self, now: Instant, cfg: &LoadConfig) -> Duration {
        Duration::from_nanos(self.estimate_ns(now, cfg) as u64)
    }

    fn estimate_ns(&self, now: Instant, cfg: &LoadConfig) -> f64 {
        let e = *self.ewma();
        e.estimate * decay(now.saturating_duration_since(e.at), cfg.decay)
    }

    /// Records one answer that took `rtt`; `failed`: the server failed it
    /// (or the connection broke), which costs the failure penalty at least.
    pub(crate) fn observe(&self, rtt: Duration, failed: bool, now: Instant, cfg: &LoadConfig) {
        let rtt = if failed {
            rtt.max(cfg.failure_penalty)
        } else {
            rtt
        };
        let rtt = rtt.as_nanos() as f64;
        let mut e = self.ewma();
        let w = decay(now.saturating_duration_since(e.at), cfg.decay);
        e.estimate = if rtt > e.estimate * w && !failed {
            rtt
        } else {
            e.estimate * w + rtt * (1.0 - w)
        };
        e.at = now;
    }

    /// The cost of sending one more call here; see the module docs.
    /// `share` is this endpoint's weight over the total weight, `total`
    /// all calls in flight on the balancer.
    pub(crate) fn cost(&self, now: Instant, cfg: &LoadConfig, share: f64, total: u32) -> f64 {
        let estimate = self.estimate_ns(now, cfg).max(cfg.floor.as_nanos() as f64);
        let fair = 1.0 + f64::from(total) * share;
        estimate * f64::from(self.in_flight() + 1) / fair
    }

    /// Counts a call in flight until the guard is dropped.
    pub(crate) fn start<'a>(&'a self, total: &'a AtomicU32) -> InFlight<'a> {
        self.enter(total);
        InFlight { load: self, total }
    }

    /// One more call in flight here and on the balancer (`total`).
    pub(crate) fn enter(&self, total: &AtomicU32) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        total.fetch_add(1, Ordering::Relaxed);
    }

    /// One call fewer in flight (after [`Load::enter`]).
    pub(crate) fn leave(&self, total: &AtomicU32) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `exp(-elapsed / tau)`: the weight an old value keeps.
fn decay(elapsed: Duration, tau: Duration) -> f64 {
    if tau.is_zero() {
        return 0.0;
    }
    (-elapsed.as_secs_f64() / tau.as_secs_f64()).exp()
}

/// A call in flight on an endpoint (and on the balancer).
#[derive(Debug)]
pub(crate) struct InFlight<'a> {
    load: &'a Load,
    total: &'a AtomicU32,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.load.leave(self.total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1e3
    }

    #[tokio::test(start_paused = true)]
    async fn jumps_up_at_once_and_decays_slowly() {
        let cfg = LoadConfig::default();
        let l = Load::new(Instant::now());
        l.observe(MS, false, Instant::now(), &cfg);
        assert_eq!(l.estimate(Instant::now(), &cfg), MS);
        tokio::time::advance(MS).await;
        l.observe(50 * MS, false, Instant::now(), &cfg);
        assert_eq!(l.estimate(Instant::now(), &cfg), 50 * MS, "a peak at once");
        // Fast answers pull it down over the decay time, not at once.
        for _ in 0..100 {
            tokio::time::advance(MS).await;
            l.observe(MS, false, Instant::now(), &cfg);
        }
        let after = ms(l.estimate(Instant::now(), &cfg));
        assert!((40.0..50.0).contains(&after), "100 ms later: {after}");
        for _ in 0..3000 {
            tokio::time::advance(MS).await;
            l.observe(MS, false, Instant::now(), &cfg);
        }
        let after = ms(l.estimate(Instant::now(), &cfg));
        assert!(after < 4.0, "3 s later, near 1 ms: {after}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_estimate_decays_toward_zero() {
        let cfg = LoadConfig::default();
        let l = Load::new(Instant::now());
        l.observe(50 * MS, false, Instant::now(), &cfg);
        tokio::time::advance(cfg.decay).await;
        let e = ms(l.estimate(Instant::now(), &cfg));
        assert!((18.0..19.0).contains(&e), "50 ms x 1/e: {e}");
        tokio::time::advance(4 * cfg.decay).await;
        assert!(ms(l.estimate(Instant::now(), &cfg)) < 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn fast_failures_cost_the_penalty_one_costs_little() {
        let cfg = LoadConfig::default();
        let (l, ok) = (Load::new(Instant::now()), Load::new(Instant::now()));
        for _ in 0..10 {
            tokio::time::advance(MS).await;
            l.observe(MS, false, Instant::now(), &cfg);
            ok.observe(MS, false, Instant::now(), &cfg);
        }
        tokio::time::advance(MS).await;
        l.observe(Duration::from_micros(100), true, Instant::now(), &cfg);
        let now = Instant::now();
        assert!(
            l.cost(now, &cfg, 0.5, 0) < 2.0 * ok.cost(now, &cfg, 0.5, 0),
            "one failure: {:?}",
            l.estimate(now, &cfg)
        );
        // Failing everything, 1,000 calls a second, for 200 ms.
        for _ in 0..200 {
            tokio::time::advance(MS).await;
            l.observe(Duration::from_micros(100), true, Instant::now(), &cfg);
            ok.observe(MS, false, Instant::now(), &cfg);
        }
        let now = Instant::now();
        assert!(
            l.cost(now, &cfg, 0.5, 0) > 8.0 * ok.cost(now, &cfg, 0.5, 0),
            "a run of failures: {:?}",
            l.estimate(now, &cfg)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cost_counts_calls_in_flight_against_the_fair_share() {
        let cfg = LoadConfig::default();
        let total = AtomicU32::new(0);
        let (heavy, light) = (Load::new(Instant::now()), Load::new(Instant::now()));
        for l in [&heavy, &light] {
            l.observe(2 * MS, false, Instant::now(), &cfg);
        }
        // 9900:50: the heavy one holds all 16 calls, as it should.
        let guards: Vec<_> = (0..16).map(|_| heavy.start(&total)).collect();
        assert_eq!(total.load(Ordering::Relaxed), 16);
        let now = Instant::now();
        let h = heavy.cost(now, &cfg, 9900.0 / 9950.0, 16);
        let l = light.cost(now, &cfg, 50.0 / 9950.0, 16);
        assert!(h / l < 1.1 && l / h < 1.1, "comparable: {h} vs {l}");
        drop(guards);
        assert_eq!(heavy.in_flight(), 0);
        assert_eq!(total.load(Ordering::Relaxed), 0);
        // Equal weights: 8 in flight against none is 9x the cost.
        let _g: Vec<_> = (0..8).map(|_| heavy.start(&total)).collect();
        let h = heavy.cost(now, &cfg, 0.5, 8);
        let l = light.cost(now, &cfg, 0.5, 8);
        assert!((h / l - 9.0).abs() < 1e-9, "{h} / {l}");
    }

    #[tokio::test(start_paused = true)]
    async fn loopback_noise_below_the_floor_is_no_difference() {
        let cfg = LoadConfig::default();
        let (a, b) = (Load::new(Instant::now()), Load::new(Instant::now()));
        a.observe(Duration::from_micros(50), false, Instant::now(), &cfg);
        b.observe(Duration::from_micros(900), false, Instant::now(), &cfg);
        let now = Instant::now();
        assert_eq!(a.cost(now, &cfg, 0.5, 0), b.cost(now, &cfg, 0.5, 0));
    }
}
