//! The timed call loop the throughput scenarios share: `concurrency`
//! callers of Morning for a while, every answer's latency in one
//! histogram, and the answering servers counted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use greet_proto::{GreetClient, GreetRequest};
use hdrhistogram::Histogram;

/// What a timed run saw.
pub struct Timed {
    /// Answered calls.
    pub calls: u64,
    /// Failed calls.
    pub errors: u64,
    /// Answered calls per second of the run.
    pub rps: f64,
    /// Every answered call's latency, µs.
    pub hist: Histogram<u64>,
    /// Answered calls by the server that signed them (`from`).
    pub from: HashMap<String, u64>,
}

impl Timed {
    /// The share of answered calls `server` signed.
    pub fn share_of(&self, server: &str) -> f64 {
        self.from.get(server).copied().unwrap_or(0) as f64 / self.calls.max(1) as f64
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new(3).expect("3 significant digits is valid")
}

/// What a `GreetClient<T>` needs of its transport `T` to be called from
/// spawned tasks: a tonic `Channel`, our `Balancer`, tower's balancer and
/// the bare HTTP/2 sender all qualify. Spelled once here (the bounds on
/// associated types are implied wherever `T: Transport` is written).
pub trait Transport:
    tonic::client::GrpcService<
        tonic::body::Body,
        Future: Send,
        Error: Into<BoxError>,
        ResponseBody: tonic::transport::Body<Data = bytes::Bytes, Error: Into<BoxError> + Send>
                          + Send
                          + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<T> Transport for T where
    T: tonic::client::GrpcService<
            tonic::body::Body,
            Future: Send,
            Error: Into<BoxError>,
            ResponseBody: tonic::transport::Body<
                Data = bytes::Bytes,
                Error: Into<BoxError> + Send,
            > + Send
                              + 'static,
        > + Clone
        + Send
        + 'static
{
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Calls Morning from `concurrency` callers for `secs`, each call with
/// `timeout` as its deadline when given.
pub async fn drive<T>(
    client: GreetClient<T>,
    concurrency: usize,
    secs: f64,
    timeout: Option<Duration>,
) -> Timed
where
    T: Transport,
{
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let mut run = Timed {
                    calls: 0,
                    errors: 0,
                    rps: 0.0,
                    hist: histogram(),
                    from: HashMap::new(),
                };
                while Instant::now() < end {
                    let t = Instant::now();
                    let mut req = tonic::Request::new(GreetRequest {
                        name: "bench".into(),
                    });
                    if let Some(timeout) = timeout {
                        req.set_timeout(timeout);
                    }
                    match c.morning(req).await {
                        Ok(r) => {
                            run.calls += 1;
                            let _ = run.hist.record(t.elapsed().as_micros() as u64);
                            *run.from.entry(r.into_inner().from).or_default() += 1;
                        }
                        Err(_) => run.errors += 1,
                    }
                }
                run
            })
        })
        .collect();
    let mut all = Timed {
        calls: 0,
        errors: 0,
        rps: 0.0,
        hist: histogram(),
        from: HashMap::new(),
    };
    for t in tasks {
        if let Ok(run) = t.await {
            all.calls += run.calls;
            all.errors += run.errors;
            let _ = all.hist.add(&run.hist);
            for (k, v) in run.from {
                *all.from.entry(k).or_default() += v;
            }
        }
    }
    all.rps = all.calls as f64 / start.elapsed().as_secs_f64();
    all
}
