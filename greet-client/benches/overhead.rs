//! Balancer overhead: unary Morning calls over (a) a plain tonic Channel to
//! one server, (b) the weighted balancer over that same server, (c) the
//! balancer over 3 servers; same process, same load, side by side.
//!
//! `cargo bench -p greet-client --bench overhead` (BENCH_SECS=3 per cell,
//! BENCH_CONCURRENCY=1,16,64). Prints a table; the target is (b)/(a) >= 0.95.

use std::time::{Duration, Instant};

use greet_client::{Balancer, BalancerConfig, RetryPolicy};
use greet_proto::{GreetClient, GreetRequest, GreetServer};
use greet_server::GreetService;
use hdrhistogram::Histogram;
use registry::schema::Addr;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Channel;

async fn start_server() -> Addr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = Addr::from_socket(listener.local_addr().expect("addr"));
    let svc = GreetServer::new(GreetService::new(addr.to_string()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    addr
}

struct Cell {
    rps: f64,
    p50: u64,
    p99: u64,
}

async fn drive<T>(client: GreetClient<T>, concurrency: usize, secs: f64) -> Cell
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
                let mut h = Histogram::<u64>::new(3).expect("histogram");
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let r = c
                        .morning(GreetRequest {
                            name: "bench".into(),
                        })
                        .await;
                    if r.is_ok() {
                        n += 1;
                        let _ = h.record(t.elapsed().as_micros() as u64);
                    }
                }
                (n, h)
            })
        })
        .collect();
    let mut total = 0;
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        let (n, h) = t.await.expect("task");
        total += n;
        let _ = hist.add(&h);
    }
    Cell {
        rps: total as f64 / start.elapsed().as_secs_f64(),
        p50: hist.value_at_quantile(0.5),
        p99: hist.value_at_quantile(0.99),
    }
}

fn balancer(addrs: &[Addr]) -> Balancer {
    let b = Balancer::new(BalancerConfig {
        retry: RetryPolicy::greet(),
        ..BalancerConfig::new("greet_service")
    });
    for a in addrs {
        b.upsert(a, 100, "");
    }
    b
}

#[tokio::main]
async fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let levels: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 16, 64]);
    let servers = [
        start_server().await,
        start_server().await,
        start_server().await,
    ];
    let plain = Channel::from_shared(servers[0].uri())
        .expect("uri")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("connect");
    let one = balancer(&servers[..1]);
    let three = balancer(&servers);
    // Warm up every path once.
    for _ in 0..2 {
        drive(GreetClient::new(plain.clone()), 4, 0.3).await;
        drive(GreetClient::new(one.clone()), 4, 0.3).await;
        drive(GreetClient::new(three.clone()), 4, 0.3).await;
    }

    println!("balancer overhead: unary Morning, {secs}s per cell, in-process servers on loopback");
    println!(
        "{:>5} | {:>22} | {:>22} | {:>22} | {:>7} | {:>7}",
        "conc",
        "(a) plain channel",
        "(b) balancer, 1 srv",
        "(c) balancer, 3 srv",
        "(b)/(a)",
        "(c)/(a)"
    );
    println!(
        "{:>5} | {:>22} | {:>22} | {:>22} |",
        "", "rps  p50/p99 µs", "rps  p50/p99 µs", "rps  p50/p99 µs"
    );
    for &c in &levels {
        // Interleave the three variants twice and keep the better run of
        // each, so a noisy neighbour hurts all of them alike.
        let mut best: [Option<Cell>; 3] = [None, None, None];
        for _ in 0..2 {
            let cells = [
                drive(GreetClient::new(plain.clone()), c, secs / 2.0).await,
                drive(GreetClient::new(one.clone()), c, secs / 2.0).await,
                drive(GreetClient::new(three.clone()), c, secs / 2.0).await,
            ];
            for (slot, cell) in best.iter_mut().zip(cells) {
                if slot.as_ref().is_none_or(|b| cell.rps > b.rps) {
                    *slot = Some(cell);
                }
            }
        }
        let [a, b, c3] = best.map(|x| x.expect("measured"));
        let fmt = |x: &Cell| format!("{:>8.0} {:>5}/{:<6}", x.rps, x.p50, x.p99);
        println!(
            "{:>5} | {:>22} | {:>22} | {:>22} | {:>7.3} | {:>7.3}",
            c,
            fmt(&a),
            fmt(&b),
            fmt(&c3),
            b.rps / a.rps,
            c3.rps / a.rps
        );
    }
}
