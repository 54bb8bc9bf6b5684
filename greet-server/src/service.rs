//! The Greet service itself: the same replies as the original Go server,
//! plus a fault mode (answer a share of calls with an error code) for tests
//! and demos of retries, budgets and outlier detection, and stalls (a share
//! of calls, at random, waits longer) for tests and demos of hedging.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use greet_proto::{Greet, GreetRequest, GreetResponse};
use tonic::{Request, Response, Status};

/// Answers `Good morning, <name>` / `Good night, <name>`, signed with the
/// advertised address so clients can see who answered.
#[derive(Debug, Clone)]
pub struct GreetService {
    from: String,
    latency: Duration,
    fault: Option<Arc<Fault>>,
    stall: Option<Arc<Stall>>,
}

/// A share of calls, drawn at random, that wait longer (a GC pause, a
/// noisy neighbour): the tail that hedging cuts.
#[derive(Debug)]
pub struct Stall {
    /// Share of calls that stall (0..=1).
    pub ratio: f64,
    /// How long a stalled call waits, on top of the latency.
    pub stall: Duration,
    rng: AtomicU64,
}

impl Stall {
    /// Stalls; `None` when no call would stall.
    pub fn new(ratio: f64, stall: Duration) -> Option<Self> {
        (ratio > 0.0 && !stall.is_zero()).then(|| Self {
            ratio: ratio.clamp(0.0, 1.0),
            stall,
            // Seeded per process, so servers started together differ.
            rng: AtomicU64::new(
                u64::from(std::process::id()).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            ),
        })
    }

    /// Whether the next call stalls (xorshift64 over a shared state).
    fn next_stalls(&self) -> bool {
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        (x >> 11) as f64 / (1u64 << 53) as f64 <= self.ratio
    }
}

/// Which calls fail, and how.
#[derive(Debug)]
pub struct Fault {
    /// Share of calls answered with `code` (0..=1), spread evenly: call n
    /// fails when floor((n+1)·ratio) > floor(n·ratio).
    pub ratio: f64,
    /// The first this many calls fail whatever the ratio.
    pub first: u64,
    /// The code failed calls are answered with.
    pub code: tonic::Code,
    calls: AtomicU64,
}

impl Fault {
    /// A fault mode; `None` when it would never fail a call.
    pub fn new(ratio: f64, first: u64, code: tonic::Code) -> Option<Self> {
        (ratio > 0.0 || first > 0).then(|| Self {
            ratio: ratio.clamp(0.0, 1.0),
            first,
            code,
            calls: AtomicU64::new(0),
        })
    }

    /// Whether the next call fails.
    fn next_fails(&self) -> bool {
        let n = self.calls.fetch_add(1, Ordering::Relaxed);
        n < self.first || ((n + 1) as f64 * self.ratio).floor() > (n as f64 * self.ratio).floor()
    }
}

impl GreetService {
    /// `from` is the address clients reach this server at.
    pub fn new(from: impl Into<String>) -> Self {
        Self {
            from: from.into(),
            latency: Duration::ZERO,
            fault: None,
            stall: None,
        }
    }

    /// Makes a share of calls wait longer, as `stall` says.
    pub fn with_stall(mut self, stall: Option<Stall>) -> Self {
        self.stall = stall.map(Arc::new);
        self
    }

    /// Answers calls with an error as `fault` says.
    pub fn with_fault(mut self, fault: Option<Fault>) -> Self {
        self.fault = fault.map(Arc::new);
        self
    }

    /// Makes every call take at least `latency` (simulated work).
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    async fn work(&self) -> Result<(), Status> {
        let stall = match &self.stall {
            Some(s) if s.next_stalls() => s.stall,
            _ => Duration::ZERO,
        };
        let wait = self.latency + stall;
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        match &self.fault {
            Some(f) if f.next_fails() => Err(Status::new(
                f.code,
                format!("{}: injected fault", self.from),
            )),
            _ => Ok(()),
        }
    }
}

#[tonic::async_trait]
impl Greet for GreetService {
    async fn morning(&self, req: Request<GreetRequest>) -> Result<Response<GreetResponse>, Status> {
        let name = req.into_inner().name;
        tracing::debug!(%name, "morning");
        self.work().await?;
        Ok(Response::new(GreetResponse {
            message: format!("Good morning, {name}"),
            from: self.from.clone(),
        }))
    }

    async fn night(&self, req: Request<GreetRequest>) -> Result<Response<GreetResponse>, Status> {
        let name = req.into_inner().name;
        tracing::debug!(%name, "night");
        self.work().await?;
        Ok(Response::new(GreetResponse {
            message: format!("Good night, {name}"),
            from: self.from.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_is_spread_evenly_and_first_comes_first() {
        let f = Fault::new(0.25, 0, tonic::Code::Internal).unwrap();
        let fails: Vec<bool> = (0..8).map(|_| f.next_fails()).collect();
        assert_eq!(fails.iter().filter(|x| **x).count(), 2, "{fails:?}");
        let f = Fault::new(0.0, 2, tonic::Code::Unavailable).unwrap();
        let fails: Vec<bool> = (0..4).map(|_| f.next_fails()).collect();
        assert_eq!(fails, [true, true, false, false]);
        assert!(Fault::new(0.0, 0, tonic::Code::Internal).is_none());
        let all = Fault::new(1.0, 0, tonic::Code::Internal).unwrap();
        assert!((0..5).all(|_| all.next_fails()));
    }

    #[test]
    fn about_the_ratio_of_calls_stall() {
        let s = Stall::new(0.01, Duration::from_millis(100)).unwrap();
        let n = (0..100_000).filter(|_| s.next_stalls()).count();
        assert!((800..1200).contains(&n), "{n} of 100,000");
        assert!(Stall::new(0.0, Duration::from_millis(100)).is_none());
        assert!(Stall::new(0.5, Duration::ZERO).is_none());
    }
}
