//! The retry budget: retries are capped at a share of recent calls, so a
//! fleet that sheds load (`UNAVAILABLE` to everything) gets at most that
//! much more, never a multiple of its load.
//!
//! This is linkerd's and Finagle's budget (tower's [`TpsBudget`]): every
//! call deposits, every retry of an attempt that may have reached a server
//! (lost, silent, refused) withdraws `1 / ratio` deposits, over a sliding
//! window of `ttl`, plus a floor of `min_per_sec` retries per second so a
//! client with little traffic can still retry. When the budget is empty
//! the call returns its own error at once.
//!
//! A call that was never sent (its connection refused or closed before
//! it left this process) is retried on another endpoint without a
//! withdrawal: it put no load on any server. It is bounded per call
//! instead (8 + endpoints tries, within its deadline), and an endpoint
//! that refuses is marked down and no longer picked.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};
use tracing::warn;

/// How many retries a balancer may make, as a share of its recent calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudgetConfig {
    /// Retries allowed per call over the window (0.1: one retry per ten
    /// calls). Clamped to 0..=1000; not a number counts as 0.
    pub ratio: f32,
    /// Retries allowed per second whatever the traffic (the floor).
    pub min_per_sec: u32,
    /// How long a call's deposit counts. Clamped to 1 s..=60 s.
    pub ttl: Duration,
}

impl Default for RetryBudgetConfig {
    /// 10 % of recent calls plus 5 per second over 10 s: 1,000 calls to a
    /// fleet that refuses everything make at most 1,150 attempts.
    fn default() -> Self {
        Self {
            ratio: 0.1,
            min_per_sec: 5,
            ttl: Duration::from_secs(10),
        }
    }
}

/// Calls counted locally before they reach the window.
const BATCH: u32 = 32;

/// A budget shared by every call of one balancer.
pub(crate) struct RetryBudget {
    tokens: TpsBudget,
    /// Deposits not yet handed to `tokens`: its deposit takes a mutex, which
    /// on every call was a point of contention between callers; a batch is
    /// handed over every [`BATCH`] calls, and before every withdrawal.
    pending: AtomicU32,
    /// Whether the last withdrawal failed: the warning is logged once per
    /// episode, not per refused retry.
    tripped: AtomicBool,
}

impl std::fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBudget")
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl RetryBudget {
    /// A budget from a config; out-of-range values are clamped (tower's
    /// constructor panics on them).
    pub(crate) fn new(cfg: &RetryBudgetConfig) -> Self {
        let ratio = if cfg.ratio.is_nan() {
            0.0
        } else {
            cfg.ratio.clamp(0.0, 1000.0)
        };
        let ttl = cfg
            .ttl
            .clamp(Duration::from_secs(1), Duration::from_secs(60));
        let min_per_sec = cfg.min_per_sec.min(i32::MAX as u32 - 1);
        Self {
            tokens: TpsBudget::new(ttl, min_per_sec, ratio),
            pending: AtomicU32::new(0),
            tripped: AtomicBool::new(false),
        }
    }

    /// Counts a call (its first attempt).
    pub(crate) fn deposit(&self) {
        if self.pending.fetch_add(1, Ordering::Relaxed) + 1 >= BATCH {
            self.flush();
        }
    }

    /// Hands the pending deposits to the window.
    fn flush(&self) {
        for _ in 0..self.pending.swap(0, Ordering::Relaxed) {
            self.tokens.deposit();
        }
    }

    /// Takes one retry from the budget; `false` when it is empty (logged
    /// once until a retry is allowed again).
    pub(crate) fn withdraw(&self, service: &str) -> bool {
        self.flush();
        if self.tokens.withdraw() {
            self.tripped.store(false, Ordering::Relaxed);
            return true;
        }
        if !self.tripped.swap(true, Ordering::Relaxed) {
            warn!(
                service,
                budget = ?self.tokens,
                "retry budget exhausted; failed calls return their error without a retry"
            );
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retries_allowed(b: &RetryBudget) -> u32 {
        let mut n = 0;
        while b.withdraw("t") {
            n += 1;
            assert!(n < 100_000, "a budget that never empties");
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_calls_plus_a_floor() {
        let b = RetryBudget::new(&RetryBudgetConfig::default());
        for _ in 0..1_000 {
            b.deposit();
        }
        // 10 % of 1,000 calls, plus the floor of 5/s over 10 s.
        assert_eq!(retries_allowed(&b), 100 + 50);
        assert!(!b.withdraw("t"), "empty stays empty");
    }

    #[tokio::test(start_paused = true)]
    async fn deposits_expire_after_the_window() {
        let b = RetryBudget::new(&RetryBudgetConfig::default());
        for _ in 0..1_000 {
            b.deposit();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        // Only the floor is left once the calls have aged out.
        assert_eq!(retries_allowed(&b), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_comes_back_with_time() {
        let b = RetryBudget::new(&RetryBudgetConfig {
            ratio: 0.0,
            min_per_sec: 2,
            ttl: Duration::from_secs(5),
        });
        assert_eq!(retries_allowed(&b), 10);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(retries_allowed(&b), 10, "withdrawals age out too");
    }

    #[test]
    fn bad_values_do_not_panic() {
        for cfg in [
            RetryBudgetConfig {
                ratio: f32::NAN,
                min_per_sec: u32::MAX,
                ttl: Duration::ZERO,
            },
            RetryBudgetConfig {
                ratio: -3.0,
                min_per_sec: 0,
                ttl: Duration::from_secs(3600),
            },
            RetryBudgetConfig {
                ratio: f32::INFINITY,
                min_per_sec: 0,
                ttl: Duration::MAX,
            },
        ] {
            let b = RetryBudget::new(&cfg);
            b.deposit();
            let _ = b.withdraw("t");
        }
    }
}
