//! Outlier detection by consecutive failures (Envoy's `consecutive_5xx`,
//! gRPC's A50 failure ejection): an endpoint that is connected but answers
//! every call with an error (a broken deploy answering `INTERNAL`) is taken
//! out of rotation for a while, longer each time it happens again, and
//! never more than a share of a service's endpoints at once, so a fleet-wide
//! failure (or a bug in the client) cannot eject everything.
//!
//! Only statuses that say the *server* failed count: `UNAVAILABLE`,
//! `INTERNAL`, `UNKNOWN`, `DATA_LOSS`. `DEADLINE_EXCEEDED` and `CANCELLED`
//! (the caller's deadline or the caller going away) count neither way; any
//! other answer (OK, NOT_FOUND, ...) proves the server works and resets the
//! count. Connection failures are the balancer's mark-down, not this.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Weak;
use std::time::Duration;

use etcd_lb_registry::schema::Addr;
use tonic::Code;

/// When an endpoint is ejected, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Failed answers in a row that eject an endpoint (at least 1).
    pub consecutive_failures: u32,
    /// Ejection time of a first ejection; the n-th in a row lasts n times
    /// this (the count decays by one per base time spent in service).
    pub base_ejection_time: Duration,
    /// Longest ejection (never less than the base time).
    pub max_ejection_time: Duration,
    /// Most endpoints of the service ejected at once, in percent of them
    /// (0..=100) of those in rotation (up, weight > 0). An ejection that
    /// would pass it, or eject the last one in rotation, does not happen.
    pub max_ejection_percent: u8,
    /// Envoy's panic threshold, in percent (0..=100): while fewer than this
    /// share of the endpoints in rotation are not ejected, the balancer
    /// ignores ejection and spreads calls over all of them. 0: never.
    pub panic_threshold_percent: u8,
}

impl Default for OutlierConfig {
    /// gRPC A50's and Envoy's defaults: 5 in a row, 30 s, at most 300 s,
    /// at most half of the endpoints (A50 says 10 %, which with three
    /// servers would eject none).
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
            panic_threshold_percent: 50,
        }
    }
}

impl OutlierConfig {
    /// How long the `multiplier`-th ejection in a row lasts.
    pub fn ejection_time(&self, multiplier: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(multiplier.max(1))
            .min(self.max_ejection_time.max(self.base_ejection_time))
    }

    /// Whether one more endpoint may be ejected when `ejected` of the
    /// `total` in rotation already are: within the share, and never the
    /// last one not ejected.
    pub fn may_eject(&self, ejected: usize, total: usize) -> bool {
        let pct = usize::from(self.max_ejection_percent.min(100));
        ejected + 1 < total && (ejected + 1).saturating_mul(100) <= pct.saturating_mul(total)
    }
}

/// What one answer says about its server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The server failed the call.
    Failure,
    /// The server did its job (whatever the answer).
    Success,
    /// Says nothing about the server (the caller's deadline or cancel).
    Neutral,
}

/// Classifies a status the server sent.
pub fn verdict(code: Code) -> Verdict {
    match code {
        Code::Unavailable | Code::Internal | Code::Unknown | Code::DataLoss => Verdict::Failure,
        Code::DeadlineExceeded | Code::Cancelled => Verdict::Neutral,
        _ => Verdict::Success,
    }
}

/// What a tracker calls to eject its endpoint (address, generation).
pub(crate) type Ejector = dyn Fn(&Addr, u64) + Send + Sync;

/// One endpoint's failure streak, shared by its calls without a lock; a
/// streak that reaches the threshold asks the balancer to eject.
pub(crate) struct Tracker {
    pub(crate) addr: Addr,
    pub(crate) generation: u64,
    threshold: u32,
    failures: AtomicU32,
    eject: Weak<Ejector>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker")
            .field("addr", &self.addr)
            .field("failures", &self.failures.load(Ordering::Relaxed))
            .finish()
    }
}

impl Tracker {
    pub(crate) fn new(addr: Addr, generation: u64, threshold: u32, eject: Weak<Ejector>) -> Self {
        Self {
            addr,
            generation,
            threshold: threshold.max(1),
            failures: AtomicU32::new(0),
            eject,
        }
    }

    /// Counts one answer.
    pub(crate) fn observe(&self, code: Code) {
        match verdict(code) {
            Verdict::Failure => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                if n >= self.threshold {
                    self.reset();
                    if let Some(eject) = self.eject.upgrade() {
                        eject(&self.addr, self.generation);
                    }
                }
            }
            // Only write when there is a streak: a healthy endpoint's calls
            // then share the counter's cache line read-only.
            Verdict::Success => {
                if self.failures.load(Ordering::Relaxed) != 0 {
                    self.reset();
                }
            }
            Verdict::Neutral => {}
        }
    }

    /// Starts a new streak (after an ejection, or its refusal).
    pub(crate) fn reset(&self) {
        self.failures.store(0, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use super::*;

    #[test]
    fn only_server_failures_count() {
        for c in [
            Code::Unavailable,
            Code::Internal,
            Code::Unknown,
            Code::DataLoss,
        ] {
            assert_eq!(verdict(c), Verdict::Failure, "{c:?}");
        }
        for c in [Code::DeadlineExceeded, Code::Cancelled] {
            assert_eq!(verdict(c), Verdict::Neutral, "{c:?}");
        }
        for c in [Code::Ok, Code::NotFound, Code::InvalidArgument] {
            assert_eq!(verdict(c), Verdict::Success, "{c:?}");
        }
    }

    #[test]
    fn ejection_time_grows_and_is_capped() {
        let c = OutlierConfig::default();
        assert_eq!(c.ejection_time(0), Duration::from_secs(30));
        assert_eq!(c.ejection_time(1), Duration::from_secs(30));
        assert_eq!(c.ejection_time(3), Duration::from_secs(90));
        assert_eq!(c.ejection_time(1_000_000), Duration::from_secs(300));
        let odd = OutlierConfig {
            max_ejection_time: Duration::ZERO,
            ..c
        };
        assert_eq!(
            odd.ejection_time(5),
            Duration::from_secs(30),
            "never below base"
        );
    }

    #[test]
    fn at_most_the_share_is_ejected() {
        let c = OutlierConfig::default();
        assert!(c.may_eject(0, 3), "one of three is 33 %");
        assert!(!c.may_eject(1, 3), "two of three is 67 %");
        assert!(!c.may_eject(0, 1), "a lone endpoint is never ejected");
        assert!(c.may_eject(1, 4) && !c.may_eject(2, 4));
        let none = OutlierConfig {
            max_ejection_percent: 0,
            ..c
        };
        assert!(!none.may_eject(0, 100));
        let all = OutlierConfig {
            max_ejection_percent: 255,
            ..c
        };
        assert!(all.may_eject(1, 3), "two of three, one left");
        assert!(!all.may_eject(2, 3), "never the last one");
    }

    #[test]
    fn a_streak_ejects_and_a_success_breaks_it() {
        let asked = Arc::new(AtomicUsize::new(0));
        let seen = asked.clone();
        let eject: Arc<Ejector> = Arc::new(move |_: &Addr, _: u64| {
            seen.fetch_add(1, Ordering::SeqCst);
        });
        let t = Tracker::new(
            Addr::new("127.0.0.1:1").expect("valid address"),
            1,
            3,
            Arc::downgrade(&eject),
        );
        t.observe(Code::Internal);
        t.observe(Code::Internal);
        t.observe(Code::Ok);
        t.observe(Code::Internal);
        t.observe(Code::DeadlineExceeded);
        t.observe(Code::Internal);
        assert_eq!(asked.load(Ordering::SeqCst), 0, "no 3 in a row yet");
        t.observe(Code::Unavailable);
        assert_eq!(asked.load(Ordering::SeqCst), 1);
        t.observe(Code::Internal);
        assert_eq!(asked.load(Ordering::SeqCst), 1, "a new streak starts");
    }
}
