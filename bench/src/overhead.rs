//! Scenario 1: balancer overhead against a plain tonic channel, same
//! process, same load, variants interleaved so noise hits them alike:
//! (a) a plain `Channel` to one server, (b) the balancer over that one
//! server, (c) the balancer over three, (d) hyper's HTTP/2 sender to the
//! server of (a), without a `Channel`.

use std::time::{Duration, Instant};

use etcd_lb::{Balancer, BalancerConfig, RetryPolicy};
use greet_proto::paths::{MORNING, NIGHT};
use greet_proto::{GreetClient, GreetRequest, GreetServer};
use greet_server::GreetService;
use hdrhistogram::Histogram;
use registry::schema::Addr;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;

use crate::stats::{us, Table};

/// Serves Greet in-process on a loopback port (no registration).
pub async fn start_server() -> anyhow::Result<Addr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = Addr::from_socket(listener.local_addr()?);
    let svc = GreetServer::new(GreetService::new(addr.to_string()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    Ok(addr)
}

/// Throughput and latency of one load cell.
pub struct Cell {
    /// Successful calls per second.
    pub rps: f64,
    /// Median latency, µs.
    pub p50: u64,
    /// 99th percentile, µs.
    pub p99: u64,
    /// Failed calls.
    pub errors: u64,
}

/// Drives `concurrency` callers of Morning for `secs`.
pub async fn drive<T>(client: GreetClient<T>, concurrency: usize, secs: f64) -> Cell
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Future: Send,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: tonic::transport::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::transport::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut c = client.clone();
            tokio::spawn(async move {
                let mut h = Histogram::<u64>::new(3).expect("3 digits is valid");
                let (mut n, mut errors) = (0u64, 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match c
                        .morning(GreetRequest {
                            name: "bench".into(),
                        })
                        .await
                    {
                        Ok(_) => {
                            n += 1;
                            let _ = h.record(t.elapsed().as_micros() as u64);
                        }
                        Err(_) => errors += 1,
                    }
                }
                (n, errors, h)
            })
        })
        .collect();
    let (mut total, mut errors) = (0, 0);
    let mut hist = Histogram::<u64>::new(3).expect("3 digits is valid");
    for t in tasks {
        if let Ok((n, e, h)) = t.await {
            total += n;
            errors += e;
            let _ = hist.add(&h);
        }
    }
    Cell {
        rps: total as f64 / start.elapsed().as_secs_f64(),
        p50: hist.value_at_quantile(0.5),
        p99: hist.value_at_quantile(0.99),
        errors,
    }
}

/// The balancer of variants (b) and (c): Morning and Night retryable,
/// with the default per-try timeout (`BENCH_NO_PER_TRY` drops it).
pub fn balancer(addrs: &[Addr]) -> Balancer {
    let b = Balancer::new(BalancerConfig {
        retry: if std::env::var_os("BENCH_NO_PER_TRY").is_some() {
            RetryPolicy {
                per_try_timeout: None,
                ..RetryPolicy::idempotent([MORNING, NIGHT])
            }
        } else {
            RetryPolicy::idempotent([MORNING, NIGHT])
        },
        ..BalancerConfig::new("greet_service")
    });
    for a in addrs {
        b.upsert(a, 100, "");
    }
    b
}

/// Runs the scenario.
pub async fn run(secs: f64, levels: &[usize]) -> anyhow::Result<Table> {
    let servers = [
        start_server().await?,
        start_server().await?,
        start_server().await?,
    ];
    let plain = Channel::from_shared(servers[0].uri())?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let sender = crate::h2sender::H2Sender::connect(&servers[0]).await?;
    let one = balancer(&servers[..1]);
    let three = balancer(&servers);
    for _ in 0..2 {
        drive(GreetClient::new(plain.clone()), 4, 0.3).await;
        drive(GreetClient::new(one.clone()), 4, 0.3).await;
        drive(GreetClient::new(three.clone()), 4, 0.3).await;
        drive(GreetClient::new(sender.clone()), 4, 0.3).await;
    }
    let mut t = Table::new(
        format!("1. Balancer overhead (unary Morning, in-process servers, {secs}s per cell, best of 2 interleaved rounds)"),
        &["concurrency", "(a) plain rps", "(a) p50/p99", "(b) 1 srv rps", "(b) p50/p99", "(c) 3 srv rps", "(c) p50/p99", "(b)/(a)", "(c)/(a)", "(d)/(a)", "errors"],
    );
    let mut worst_b = f64::MAX;
    for &c in levels {
        let mut best: [Option<Cell>; 4] = [None, None, None, None];
        for _ in 0..2 {
            let cells = [
                drive(GreetClient::new(plain.clone()), c, secs / 2.0).await,
                drive(GreetClient::new(one.clone()), c, secs / 2.0).await,
                drive(GreetClient::new(three.clone()), c, secs / 2.0).await,
                drive(GreetClient::new(sender.clone()), c, secs / 2.0).await,
            ];
            for (slot, cell) in best.iter_mut().zip(cells) {
                if slot.as_ref().is_none_or(|b| cell.rps > b.rps) {
                    *slot = Some(cell);
                }
            }
        }
        let [a, b, c3, d] = best.map(|x| x.expect("two rounds ran"));
        let pp = |x: &Cell| format!("{}/{}", us(x.p50 as f64), us(x.p99 as f64));
        worst_b = worst_b.min(b.rps / a.rps);
        t.row(vec![
            c.to_string(),
            format!("{:.0}", a.rps),
            pp(&a),
            format!("{:.0}", b.rps),
            pp(&b),
            format!("{:.0}", c3.rps),
            pp(&c3),
            format!("{:.3}", b.rps / a.rps),
            format!("{:.3}", c3.rps / a.rps),
            format!("{:.3}", d.rps / a.rps),
            (a.errors + b.errors + c3.errors + d.errors).to_string(),
        ]);
    }
    t.note(
        "(d): hyper's HTTP/2 sender on one connection to the server of (a), no tonic Channel (bench/src/h2sender.rs): the ceiling without the Channel's buffer task",
    );
    t.note(format!(
        "Target (b)/(a) >= 0.97: worst {:.3} -> {}",
        worst_b,
        if worst_b >= 0.97 { "met" } else { "MISSED" }
    ));
    Ok(t)
}
