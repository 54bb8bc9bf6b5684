//! The load mode: many calls in parallel, then a table of throughput,
//! latency percentiles and each endpoint's share against its weight.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use greet_proto::{GreetClient, GreetRequest};
use hdrhistogram::Histogram;
use serde::Serialize;

use etcd_lb::Balancer;

/// How much load to offer.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Calls in flight at once.
    pub concurrency: usize,
    /// Stop after this many calls in all ...
    pub requests: Option<u64>,
    /// ... or after this long.
    pub duration: Option<Duration>,
    /// Name sent in each request.
    pub name: String,
    /// Per-call deadline.
    pub timeout: Duration,
}

/// One endpoint's line in the report.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointShare {
    /// Address that answered (the reply's `from`).
    pub addr: String,
    /// Calls it answered.
    pub calls: u64,
    /// calls / successful calls.
    pub observed_share: f64,
    /// weight / sum of weights, from the balancer at the end of the run.
    pub expected_share: Option<f64>,
    /// Its weight at the end of the run.
    pub weight: Option<u32>,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Calls made.
    pub calls: u64,
    /// Calls that failed.
    pub errors: u64,
    /// Wall time, seconds.
    pub elapsed_s: f64,
    /// Successful calls per second.
    pub throughput: f64,
    /// Latency percentiles in microseconds.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Slowest call.
    pub max_us: u64,
    /// Per endpoint.
    pub endpoints: Vec<EndpointShare>,
    /// First few distinct error messages.
    pub error_samples: Vec<String>,
}

/// Runs the load and reports.
pub async fn run(balancer: &Balancer, spec: &LoadSpec) -> LoadReport {
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..spec.concurrency.max(1) {
        let mut client = GreetClient::new(balancer.clone());
        let issued = issued.clone();
        let spec = spec.clone();
        tasks.push(tokio::spawn(async move {
            let mut hist = Histogram::<u64>::new(3).expect("3 significant digits is valid");
            let mut from: BTreeMap<String, u64> = BTreeMap::new();
            let mut errors = 0u64;
            let mut samples: Vec<String> = Vec::new();
            loop {
                let n = issued.fetch_add(1, Ordering::Relaxed);
                if spec.requests.is_some_and(|r| n >= r)
                    || spec.duration.is_some_and(|d| start.elapsed() >= d)
                {
                    break;
                }
                let mut req = tonic::Request::new(GreetRequest {
                    name: spec.name.clone(),
                });
                req.set_timeout(spec.timeout);
                let t = Instant::now();
                let result = if n.is_multiple_of(2) {
                    client.morning(req).await
                } else {
                    client.night(req).await
                };
                let us = t.elapsed().as_micros() as u64;
                match result {
                    Ok(resp) => {
                        let _ = hist.record(us.max(1));
                        *from.entry(resp.into_inner().from).or_default() += 1;
                    }
                    Err(status) => {
                        errors += 1;
                        let msg = format!("{:?}: {}", status.code(), status.message());
                        if samples.len() < 5 && !samples.contains(&msg) {
                            samples.push(msg);
                        }
                    }
                }
            }
            (hist, from, errors, samples)
        }));
    }
    let mut hist = Histogram::<u64>::new(3).expect("3 significant digits is valid");
    let mut from: BTreeMap<String, u64> = BTreeMap::new();
    let mut errors = 0;
    let mut samples = Vec::new();
    for t in tasks {
        if let Ok((h, f, e, s)) = t.await {
            let _ = hist.add(&h);
            for (k, v) in f {
                *from.entry(k).or_default() += v;
            }
            errors += e;
            for m in s {
                if samples.len() < 5 && !samples.contains(&m) {
                    samples.push(m);
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ok: u64 = from.values().sum();
    let weights: BTreeMap<String, u32> = balancer
        .endpoints()
        .into_iter()
        .map(|e| (e.addr.to_string(), e.weight))
        .collect();
    let weight_sum: u64 = weights.values().map(|w| u64::from(*w)).sum();
    let mut addrs: Vec<String> = from.keys().chain(weights.keys()).cloned().collect();
    addrs.sort();
    addrs.dedup();
    let endpoints = addrs
        .into_iter()
        .map(|addr| {
            let calls = from.get(&addr).copied().unwrap_or(0);
            let weight = weights.get(&addr).copied();
            EndpointShare {
                observed_share: if ok == 0 {
                    0.0
                } else {
                    calls as f64 / ok as f64
                },
                expected_share: weight
                    .filter(|_| weight_sum > 0)
                    .map(|w| f64::from(w) / weight_sum as f64),
                weight,
                calls,
                addr,
            }
        })
        .collect();
    LoadReport {
        calls: ok + errors,
        errors,
        elapsed_s: elapsed,
        throughput: ok as f64 / elapsed.max(1e-9),
        p50_us: hist.value_at_quantile(0.50),
        p90_us: hist.value_at_quantile(0.90),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
        endpoints,
        error_samples: samples,
    }
}

impl LoadReport {
    /// The human table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "calls {}  errors {}  elapsed {:.2}s  throughput {:.0}/s\n",
            self.calls, self.errors, self.elapsed_s, self.throughput
        ));
        out.push_str(&format!(
            "latency  p50 {}  p90 {}  p99 {}  max {}\n\n",
            fmt_us(self.p50_us),
            fmt_us(self.p90_us),
            fmt_us(self.p99_us),
            fmt_us(self.max_us)
        ));
        out.push_str(&format!(
            "{:<28} {:>7} {:>10} {:>9} {:>9}\n",
            "endpoint", "weight", "calls", "observed", "expected"
        ));
        for e in &self.endpoints {
            out.push_str(&format!(
                "{:<28} {:>7} {:>10} {:>8.2}% {:>9}\n",
                e.addr,
                e.weight.map_or("-".to_owned(), |w| w.to_string()),
                e.calls,
                e.observed_share * 100.0,
                e.expected_share
                    .map_or("-".to_owned(), |s| format!("{:.2}%", s * 100.0)),
            ));
        }
        for s in &self.error_samples {
            out.push_str(&format!("error: {s}\n"));
        }
        out
    }
}

fn fmt_us(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{us}µs")
    }
}
