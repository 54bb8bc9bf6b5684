//! Hedging (gRPC A6's hedging policy, which grpc-go does not implement):
//! an attempt of an idempotent call that has not answered after a delay
//! taken from recent latency gets a second attempt on another endpoint;
//! the first answer wins and the other attempt is cancelled.
//!
//! - Only for methods listed as retryable (idempotent) whose request fits
//!   the replay buffer, and only on a call's first attempt.
//! - The delay is a quantile (default the 95th percentile) of the
//!   method's recent answered attempts, at least [`HedgingConfig::min_delay`];
//!   until enough answers of that method are seen (64), no hedge is sent.
//!   Each retryable method keeps its own record: a slow method (a report,
//!   a scan) would otherwise set the delay of a fast one so high that the
//!   fast one's stalls were never hedged, and a fast method would make the
//!   slow one's every call look like a tail. The methods are the retry
//!   policy's list, fixed when the balancer is made, so the records are
//!   bounded by it (no path a caller sends creates one).
//! - Every hedge withdraws from the retry budget like a retry, so a slow
//!   fleet (every call past the delay) gets at most the budget's share of
//!   extra attempts, never twice its load.
//!
//! The latency record is a log-scale histogram of atomic counters (a
//! quarter-octave per bucket, about 19 %), halved every 4,096 answers so
//! it follows recent traffic; the quantile is recomputed every 256
//! answers, interpolated within its bucket (the bucket's upper bound
//! alone would hedge up to 19 % late, and every microsecond of delay is
//! in the hedged tail). Recording costs one atomic increment. The delay
//! is exported as `lb_hedging_delay_seconds{service, method}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use etcd_lb_registry::schema::Addr;
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;
use tonic::body::Body;
use tracing::debug;

use crate::balance::{Balancer, Outcome, Picked};

/// When to hedge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HedgingConfig {
    /// Which quantile of recent latency an attempt must pass before it is
    /// hedged (0.95: the slowest 5 % are).
    pub quantile: f64,
    /// Never hedge sooner than this.
    pub min_delay: Duration,
}

impl Default for HedgingConfig {
    /// The 95th percentile, at least 1 ms.
    fn default() -> Self {
        Self {
            quantile: 0.95,
            min_delay: Duration::from_millis(1),
        }
    }
}

/// Buckets: bucket `i` holds latencies up to 2^(i/4) µs; 100 buckets
/// reach 2^25 µs (33 s).
const BUCKETS: usize = 100;
/// Answers before the first hedge.
const WARM: u32 = 64;
/// The quantile is recomputed every this many answers.
const RECOMPUTE: u32 = 256;
/// The histogram is halved every this many answers.
const HALVE: u32 = 4096;

/// One [`Hedger`] per retryable method (by its path, `/pkg.Service/Method`).
#[derive(Debug)]
pub(crate) struct Hedgers {
    by_path: HashMap<String, Hedger>,
}

impl Hedgers {
    /// A record for each of `paths` (the retry policy's idempotent
    /// methods); `gauge` gives the delay's gauge of a path, when metered.
    pub(crate) fn new<'a>(
        cfg: HedgingConfig,
        paths: impl IntoIterator<Item = &'a String>,
        gauge: impl Fn(&str) -> Option<Gauge<f64, AtomicU64>>,
    ) -> Self {
        Self {
            by_path: paths
                .into_iter()
                .map(|p| {
                    let mut h = Hedger::new(cfg);
                    h.gauge = gauge(p);
                    (p.clone(), h)
                })
                .collect(),
        }
    }

    /// The record of the method at `path`; `None` for a method not listed
    /// (never hedged).
    pub(crate) fn get(&self, path: &str) -> Option<&Hedger> {
        self.by_path.get(path)
    }
}

/// Recent attempt latency of one method and the hedging delay taken from it.
#[derive(Debug)]
pub(crate) struct Hedger {
    cfg: HedgingConfig,
    buckets: [AtomicU32; BUCKETS],
    recorded: AtomicU32,
    /// The delay in ns; 0 until warm.
    delay_ns: AtomicU64,
    /// `lb_hedging_delay_seconds` of this method, when metered.
    gauge: Option<Gauge<f64, AtomicU64>>,
}

fn bucket(latency: Duration) -> usize {
    let us = latency.as_micros().max(1) as f64;
    ((us.log2() * 4.0).ceil() as usize).min(BUCKETS - 1)
}

fn upper(bucket: usize) -> Duration {
    Duration::from_micros(2f64.powf(bucket as f64 / 4.0) as u64)
}

impl Hedger {
    pub(crate) fn new(cfg: HedgingConfig) -> Self {
        Self {
            cfg,
            buckets: std::array::from_fn(|_| AtomicU32::new(0)),
            recorded: AtomicU32::new(0),
            delay_ns: AtomicU64::new(0),
            gauge: None,
        }
    }

    /// Records one answered attempt's latency.
    pub(crate) fn record(&self, latency: Duration) {
        self.buckets[bucket(latency)].fetch_add(1, Ordering::Relaxed);
        let n = self.recorded.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(HALVE) {
            for b in &self.buckets {
                let v = b.load(Ordering::Relaxed);
                b.store(v / 2, Ordering::Relaxed);
            }
        }
        if n == WARM || n.is_multiple_of(RECOMPUTE) {
            self.recompute();
        }
    }

    fn recompute(&self) {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| u64::from(b.load(Ordering::Relaxed)))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return;
        }
        let want = (total as f64 * self.cfg.quantile.clamp(0.0, 1.0)).ceil() as u64;
        let want = want.max(1);
        let mut seen = 0;
        let mut quantile = upper(BUCKETS - 1);
        for (i, &c) in counts.iter().enumerate() {
            if seen + c >= want {
                // Linear within the bucket: `want` is the (want - seen)-th
                // of its c answers.
                let lower = if i == 0 { Duration::ZERO } else { upper(i - 1) };
                let within = (want - seen) as f64 / c as f64;
                quantile = lower + (upper(i) - lower).mul_f64(within);
                break;
            }
            seen += c;
        }
        let delay = quantile.max(self.cfg.min_delay);
        self.delay_ns
            .store(delay.as_nanos() as u64, Ordering::Relaxed);
        if let Some(g) = &self.gauge {
            g.set(delay.as_secs_f64());
        }
    }

    /// How long an attempt runs before it is hedged; `None` until enough
    /// answers have been seen.
    pub(crate) fn delay(&self) -> Option<Duration> {
        match self.delay_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }
}

impl Balancer {
    /// The first attempt of a retryable call, hedged: past the hedging
    /// delay, and when the retry budget allows, a second attempt goes to
    /// another endpoint; the first answer wins, the other attempt is
    /// dropped (its stream reset: cancelled at the server). A failed one
    /// leaves the field to the other. Returns the address whose outcome it
    /// is.
    pub(crate) async fn hedged(
        &self,
        hedger: &Hedger,
        picked: Picked,
        req: http::Request<Body>,
        make: impl Fn() -> http::Request<Body>,
        deadline: Option<Instant>,
    ) -> (Addr, Outcome) {
        let first_addr = picked.addr.clone();
        let first = self.attempt(picked, req, true, Some(hedger), deadline);
        let Some(delay) = hedger.delay() else {
            return (first_addr, first.await);
        };
        let mut first = std::pin::pin!(first);
        tokio::select! {
            biased;
            out = &mut first => return (first_addr, out),
            () = tokio::time::sleep(delay) => {}
        }
        let second = match self.pick(Some(&first_addr)) {
            Ok(p) if p.addr != first_addr && self.may_retry() => p,
            _ => return (first_addr, first.await),
        };
        self.count_hedge(false);
        let second_addr = second.addr.clone();
        debug!(first = %first_addr, second = %second_addr, ?delay, "hedging");
        let mut second = std::pin::pin!(self.attempt(second, make(), true, Some(hedger), deadline));
        let settled = |o: &Outcome| !matches!(o, Outcome::Failed(..));
        tokio::select! {
            out = &mut first => {
                if settled(&out) {
                    (first_addr, out)
                } else {
                    let other = second.await;
                    if settled(&other) {
                        self.count_hedge(true);
                    }
                    (second_addr, other)
                }
            }
            out = &mut second => {
                if settled(&out) {
                    self.count_hedge(true);
                    (second_addr, out)
                } else {
                    (first_addr, first.await)
                }
            }
        }
    }

    fn count_hedge(&self, won: bool) {
        if let Some(m) = self.metrics() {
            m.hedge(self.service(), won);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn no_delay_until_warm_then_the_quantile() {
        let h = Hedger::new(HedgingConfig::default());
        for _ in 0..63 {
            h.record(2 * MS);
        }
        assert_eq!(h.delay(), None);
        h.record(2 * MS);
        let d = h.delay().expect("warm");
        assert!(d >= 2 * MS && d < 3 * MS, "{d:?}");
    }

    #[test]
    fn one_percent_of_stalls_leave_the_95th_percentile_alone() {
        let h = Hedger::new(HedgingConfig::default());
        for i in 0..10_000 {
            h.record(if i % 100 == 0 {
                100 * MS
            } else {
                MS + (i % 10) * MS / 10
            });
        }
        let d = h.delay().expect("warm");
        assert!(d >= 1800 * MS / 1000 && d < 3 * MS, "{d:?}");
    }

    #[test]
    fn the_delay_is_interpolated_within_its_bucket() {
        // 1.000-2.000 ms evenly: the 95th percentile is 1.95 ms. The
        // bucket's upper bound alone would say 2.048 ms (5 % late).
        let h = Hedger::new(HedgingConfig::default());
        for us in 1000..=2000 {
            h.record(Duration::from_micros(us));
        }
        h.recompute();
        let d = h.delay().expect("warm").as_secs_f64() * 1e6;
        assert!((d - 1950.0).abs() < 1950.0 * 0.025, "{d} us");
    }

    #[test]
    fn each_method_keeps_its_own_delay() {
        let paths = ["/g.G/Fast".to_string(), "/g.G/Slow".to_string()];
        let h = Hedgers::new(HedgingConfig::default(), &paths, |_| None);
        // Interleaved, as calls of both would come: one shared record
        // would put the fast method's delay at the slow one's latency.
        for _ in 0..1000 {
            h.get("/g.G/Fast").expect("listed").record(2 * MS);
            h.get("/g.G/Slow").expect("listed").record(40 * MS);
        }
        let fast = h.get("/g.G/Fast").and_then(Hedger::delay).expect("warm");
        let slow = h.get("/g.G/Slow").and_then(Hedger::delay).expect("warm");
        assert!(fast >= 2 * MS && fast < 3 * MS, "{fast:?}");
        assert!(slow >= 40 * MS && slow < 48 * MS, "{slow:?}");
        assert!(h.get("/g.G/Other").is_none(), "unlisted methods get none");
    }

    #[test]
    fn it_follows_recent_latency() {
        let h = Hedger::new(HedgingConfig::default());
        for _ in 0..4096 {
            h.record(MS);
        }
        for _ in 0..20_000 {
            h.record(20 * MS);
        }
        let d = h.delay().expect("warm");
        assert!(d >= 20 * MS && d < 25 * MS, "{d:?}");
        let floor = Hedger::new(HedgingConfig {
            min_delay: 5 * MS,
            ..HedgingConfig::default()
        });
        for _ in 0..100 {
            floor.record(Duration::from_micros(100));
        }
        assert_eq!(floor.delay(), Some(5 * MS));
    }
}
