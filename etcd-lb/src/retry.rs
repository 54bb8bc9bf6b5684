//! When a failed call may be sent again, as gRPC's retryPolicy decides it.
//!
//! Two kinds of failure are told apart:
//! - *not sent*: the connection could not be made (refused, timed out), so
//!   no server saw the request; always safe to retry on another endpoint;
//! - *lost*: the request may have reached a server that then died (the
//!   connection reset, or the server answered `UNAVAILABLE`); retried only
//!   for methods marked retryable (idempotent), within the call's deadline.

use std::collections::HashSet;
use std::error::Error as StdError;
use std::time::Duration;

use tokio::time::Instant;

use tonic::Code;

/// Which calls are retried, how often, with what pause.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// gRPC paths (`/Greet/Morning`) whose calls are idempotent.
    pub retryable_methods: HashSet<String>,
    /// Status codes that make a retryable call go again.
    pub retryable_codes: Vec<Code>,
    /// Attempts in all, first included, for *lost* calls (gRPC caps at 5).
    pub max_attempts: u32,
    /// First pause between lost-call attempts; doubles, jittered.
    pub initial_backoff: Duration,
    /// Largest pause.
    pub max_backoff: Duration,
    /// When an attempt of a retryable call passes this, its connection is
    /// probed with a health check: answered, the attempt keeps waiting (a
    /// slow call is not a dead server); unanswered, the connection is
    /// silent and the call is retried elsewhere, costing one bounded
    /// attempt, not the deadline.
    pub per_try_timeout: Option<Duration>,
}

impl RetryPolicy {
    /// Retries only calls that were never sent.
    pub fn none() -> Self {
        Self {
            retryable_methods: HashSet::new(),
            retryable_codes: vec![Code::Unavailable],
            max_attempts: 1,
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
            per_try_timeout: None,
        }
    }

    /// Retries calls to these idempotent methods (gRPC paths, as
    /// `/pkg.Service/Method`) on `UNAVAILABLE`, up to 5 attempts, and bounds
    /// each attempt at 1 s before probing its connection.
    ///
    /// A call past the bound is not failed: the balancer health-checks the
    /// same connection and keeps waiting while it answers, so 2 s calls need
    /// no tuning; only a connection that went silent costs the attempt.
    ///
    /// ```
    /// let policy = etcd_lb::RetryPolicy::idempotent(["/echo.Echo/Say"]);
    /// assert!(policy.is_retryable("/echo.Echo/Say"));
    /// assert!(!policy.is_retryable("/echo.Echo/Store"));
    /// ```
    pub fn idempotent<S: Into<String>>(methods: impl IntoIterator<Item = S>) -> Self {
        Self {
            retryable_methods: methods.into_iter().map(Into::into).collect(),
            max_attempts: 5,
            per_try_timeout: Some(Duration::from_secs(1)),
            ..Self::none()
        }
    }

    /// Whether calls to `path` may be retried after being sent.
    pub fn is_retryable(&self, path: &str) -> bool {
        self.retryable_methods.contains(path)
    }

    /// Pause before lost-call attempt `n` (2, 3, ...).
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.backoff_with(attempt, random())
    }

    /// [`RetryPolicy::backoff`] with its random part given: between half
    /// and all of the exponential pause.
    fn backoff_with(&self, attempt: u32, random: u64) -> Duration {
        let exp = self
            .initial_backoff
            .saturating_mul(1 << attempt.saturating_sub(2).min(16))
            .min(self.max_backoff);
        let half = exp / 2;
        half + Duration::from_micros(random % (half.as_micros() as u64 + 1))
    }

    /// What to do after a failed attempt: a pure function of the policy,
    /// the failure, the attempts so far (updated when it says retry), the
    /// time and the call's deadline. `endpoints` is how many the balancer
    /// knows (an unsent call may try each once, and a few more); `random`
    /// feeds the backoff's jitter. The retry budget is not asked here: the
    /// caller asks it when this says retry.
    #[allow(clippy::too_many_arguments)]
    pub fn decide(
        &self,
        retryable: bool,
        failed: Failed,
        tries: &mut Tries,
        endpoints: usize,
        now: Instant,
        deadline: Option<Instant>,
        random: u64,
    ) -> Decision {
        if deadline.is_some_and(|d| now >= d) {
            return Decision::DeadlineExceeded;
        }
        match failed {
            Failed::Unsent => {
                tries.unsent += 1;
                if u64::from(tries.unsent) > 8 + endpoints as u64 {
                    return Decision::Return;
                }
                Decision::Retry(Duration::ZERO)
            }
            // Only retryable calls get a per-try bound, so only they are
            // ever silent.
            Failed::Silent => {
                if tries.lost >= self.max_attempts {
                    return Decision::Return;
                }
                tries.lost += 1;
                Decision::Retry(Duration::ZERO)
            }
            Failed::Lost | Failed::Refused => {
                if !retryable || tries.lost >= self.max_attempts {
                    return Decision::Return;
                }
                let pause = self.backoff_with(tries.lost + 1, random);
                if deadline.is_some_and(|d| now + pause >= d) {
                    return Decision::Return;
                }
                tries.lost += 1;
                Decision::Retry(pause)
            }
        }
    }
}

/// How an attempt failed, as far as retrying cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// Nothing reached a server (connection refused, not connected).
    Unsent,
    /// Sent; the connection died before the whole answer.
    Lost,
    /// No answer within the per-try bound, and the connection did not
    /// answer a health check either.
    Silent,
    /// The server answered a code the policy retries.
    Refused,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send again elsewhere after this pause (zero: at once).
    Retry(Duration),
    /// Return the attempt's error.
    Return,
    /// The deadline has passed: return `DEADLINE_EXCEEDED`.
    DeadlineExceeded,
}

/// Attempts of one call so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tries {
    /// Attempts that were sent (the first included).
    pub lost: u32,
    /// Attempts that never left.
    pub unsent: u32,
}

impl Default for Tries {
    /// Before the first attempt's outcome: one sent.
    fn default() -> Self {
        Self { lost: 1, unsent: 0 }
    }
}

/// A random number for the backoff's jitter.
pub(crate) fn random() -> u64 {
    rand_below(u64::MAX)
}

fn rand_below(n: u64) -> u64 {
    // Cheap jitter without a dependency: the low bits of the clock.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    u64::from(nanos) % n.max(1)
}

/// Whether a transport error happened before the request left this process.
pub fn not_sent(err: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<tonic::ConnectError>()
            || e.is::<crate::conn::NotSent>()
            || e.is::<crate::conn::NotConnected>()
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        // h2's REFUSED_STREAM: the server did not process the stream.
        if e.to_string().contains("refused stream") {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Whether a transport error is the channel's own enforcement of the
/// call's `grpc-timeout` (tonic's `TimeoutExpired`): the caller's deadline
/// passed, which says nothing against the server or its connection.
pub fn timed_out(err: &(dyn StdError + 'static)) -> bool {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// Parses the `grpc-timeout` header (`"100m"`, `"5S"`, ...).
pub fn grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MORNING: &str = "/Greet/Morning";
    const NIGHT: &str = "/Greet/Night";

    #[test]
    fn timeouts_parse() {
        assert_eq!(grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "m", "10x", "1234567890S", "-1S"] {
            assert_eq!(grpc_timeout(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_given_methods_are_retryable() {
        let p = RetryPolicy::idempotent([MORNING, NIGHT]);
        assert!(p.is_retryable("/Greet/Morning"));
        assert!(p.is_retryable("/Greet/Night"));
        assert!(!p.is_retryable("/Other/Write"));
        assert!(!RetryPolicy::none().is_retryable("/Greet/Morning"));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::idempotent([MORNING, NIGHT]);
        assert!(p.backoff(2) <= Duration::from_millis(20));
        assert!(p.backoff(30) <= p.max_backoff);
        assert!(p.backoff(30) >= p.max_backoff / 2);
    }

    fn decide_all(p: &RetryPolicy, retryable: bool, failed: Failed) -> Vec<Decision> {
        let now = Instant::now();
        let mut tries = Tries::default();
        let mut out = Vec::new();
        loop {
            let d = p.decide(retryable, failed, &mut tries, 3, now, None, 0);
            out.push(d);
            if !matches!(d, Decision::Retry(_)) || out.len() > 100 {
                return out;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lost_calls_retry_up_to_max_attempts_with_growing_pauses() {
        let p = RetryPolicy::idempotent([MORNING, NIGHT]);
        let d = decide_all(&p, true, Failed::Lost);
        // random 0: the lower half of each pause.
        assert_eq!(
            d,
            vec![
                Decision::Retry(Duration::from_millis(10)),
                Decision::Retry(Duration::from_millis(20)),
                Decision::Retry(Duration::from_millis(40)),
                Decision::Retry(Duration::from_millis(80)),
                Decision::Return,
            ]
        );
        assert_eq!(decide_all(&p, false, Failed::Lost), vec![Decision::Return]);
        assert_eq!(
            decide_all(&p, false, Failed::Refused),
            vec![Decision::Return]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unsent_calls_always_retry_at_once_a_bounded_number_of_times() {
        let p = RetryPolicy::none();
        let d = decide_all(&p, false, Failed::Unsent);
        assert_eq!(d.len(), 8 + 3 + 1, "each endpoint once, and 8 more");
        assert!(d[..11]
            .iter()
            .all(|d| *d == Decision::Retry(Duration::ZERO)));
        assert_eq!(d[11], Decision::Return);
    }

    #[tokio::test(start_paused = true)]
    async fn silent_attempts_retry_at_once_within_max_attempts() {
        let p = RetryPolicy::idempotent([MORNING, NIGHT]);
        let d = decide_all(&p, true, Failed::Silent);
        assert_eq!(d.len(), 5);
        assert_eq!(d[4], Decision::Return);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_bounds_every_retry() {
        let p = RetryPolicy::idempotent([MORNING, NIGHT]);
        let start = Instant::now();
        let deadline = Some(start + Duration::from_millis(15));
        let mut tries = Tries::default();
        // A pause of 10..20 ms: 10 fits before the deadline, 19 does not.
        assert_eq!(
            p.decide(true, Failed::Lost, &mut tries, 3, start, deadline, 0),
            Decision::Retry(Duration::from_millis(10))
        );
        let mut tries = Tries::default();
        assert_eq!(
            p.decide(true, Failed::Lost, &mut tries, 3, start, deadline, 9_000),
            Decision::Return
        );
        assert_eq!(tries, Tries::default(), "no attempt counted");
        tokio::time::advance(Duration::from_millis(15)).await;
        for failed in [
            Failed::Unsent,
            Failed::Lost,
            Failed::Silent,
            Failed::Refused,
        ] {
            assert_eq!(
                p.decide(
                    true,
                    failed,
                    &mut Tries::default(),
                    3,
                    Instant::now(),
                    deadline,
                    0
                ),
                Decision::DeadlineExceeded
            );
        }
    }

    #[test]
    fn connect_errors_count_as_not_sent() {
        let e = tonic::ConnectError(Box::new(std::io::Error::from(
            std::io::ErrorKind::ConnectionRefused,
        )));
        assert!(not_sent(&e));
        let other = std::io::Error::other("connection reset");
        assert!(!not_sent(&other));
        assert!(!timed_out(&other));
        assert!(timed_out(&tonic::TimeoutExpired(())));
    }
}
