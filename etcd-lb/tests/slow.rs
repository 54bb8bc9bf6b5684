//! Slow is not dead: a server whose calls take longer than the per-try
//! bound is alive (it answers a health check on the same connection), so
//! the balancer keeps waiting for it instead of marking it down and
//! reconnecting. Servers run in-process behind counting proxies, so the
//! tests see every TCP connection the balancer opens.

use std::time::Duration;

use anyhow::Result;
use etcd_lb::{Balancer, BalancerConfig, RetryPolicy};
use etcd_lb_registry::schema::Addr;
use etcd_lb_testkit::Proxy;
use greet_proto::paths::{MORNING, NIGHT};
use greet_proto::{GreetClient, GreetRequest, GreetServer};
use greet_server::GreetService;
use tonic::transport::server::TcpIncoming;
use tonic::Code;

/// Greet (with `latency` per call) plus the standard health service, as
/// greet-server serves them.
async fn serve_slow(name: &str, latency: Duration) -> Result<Proxy> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<GreetServer<GreetService>>().await;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(GreetServer::new(
                GreetService::new(name).with_latency(latency),
            ))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    // The reporter must outlive the server's health answers.
    std::mem::forget(reporter);
    Ok(Proxy::start(addr).await?)
}

/// The balancer as the greet-client binary builds it with default flags
/// (`--per-try-timeout 1s`, Greet's retry policy).
fn default_balancer() -> Balancer {
    Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        ..BalancerConfig::new("greet_service")
    })
}

async fn call(b: &Balancer, timeout: Duration) -> Result<String, tonic::Status> {
    let mut c = GreetClient::new(b.clone());
    let mut req = tonic::Request::new(GreetRequest { name: "t".into() });
    req.set_timeout(timeout);
    c.morning(req).await.map(|r| r.into_inner().from)
}

/// Must-show 1: a uniformly slow fleet (1.5 s per call, past the 1 s
/// per-try bound) with default settings: every call succeeds, no endpoint
/// is marked down, and the three connections are the only ones opened.
#[tokio::test]
async fn a_slow_fleet_works_with_default_settings() -> Result<()> {
    let mut servers = Vec::new();
    for name in ["a", "b", "c"] {
        servers.push(serve_slow(name, Duration::from_millis(1500)).await?);
    }
    let bal = default_balancer();
    for p in &servers {
        bal.upsert(&Addr::from_socket(p.addr), 100, "");
    }
    // greet-client bench --requests 12 --concurrency 4, default 5 s deadline.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let bal = bal.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..3 {
                out.push(call(&bal, Duration::from_secs(5)).await);
            }
            out
        }));
    }
    let mut failed = Vec::new();
    for t in tasks {
        for r in t.await? {
            if let Err(s) = r {
                failed.push(format!("{:?}: {}", s.code(), s.message()));
            }
        }
    }
    assert!(failed.is_empty(), "12 of 12 calls succeed: {failed:?}");
    assert!(
        bal.endpoints().iter().all(|e| e.up),
        "no endpoint marked down: {:?}",
        bal.endpoints()
    );
    let conns: u64 = servers.iter().map(Proxy::accepted).sum();
    assert_eq!(conns, 3, "one connection per server, none reopened");
    Ok(())
}

/// Must-show 2: one server at 300 ms among two fast ones, calls with a
/// 100 ms deadline: the slow one's calls fail DEADLINE_EXCEEDED (the
/// caller's deadline, not a dead server), it stays up and keeps its one
/// connection, and the fast ones answer the rest. With the round-robin
/// picker, so the slow one keeps its share of calls to miss (the
/// load-aware picker passes it over: tests/load.rs).
#[tokio::test]
async fn a_deadline_shorter_than_the_call_is_not_a_dead_server() -> Result<()> {
    let slow = serve_slow("slow", Duration::from_millis(300)).await?;
    let fast1 = serve_slow("fast1", Duration::ZERO).await?;
    let fast2 = serve_slow("fast2", Duration::ZERO).await?;
    let bal = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        picker: etcd_lb::Picker::RoundRobin,
        ..BalancerConfig::new("greet_service")
    });
    for p in [&slow, &fast1, &fast2] {
        bal.upsert(&Addr::from_socket(p.addr), 100, "");
    }
    let (mut ok, mut deadline) = (0, 0);
    for i in 0..30 {
        match call(&bal, Duration::from_millis(100)).await {
            Ok(from) => {
                assert_ne!(from, "slow", "call {i}: the slow one cannot make 100 ms");
                ok += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::DeadlineExceeded, "call {i}: {s}");
                deadline += 1;
            }
        }
    }
    assert!(
        bal.endpoints().iter().all(|e| e.up),
        "the slow one is never marked down: {:?}",
        bal.endpoints()
    );
    assert!(ok >= 15, "the fast ones answer their share: {ok} of 30");
    assert!(
        deadline >= 5,
        "the slow one got its share and missed the deadline: {deadline} of 30"
    );
    assert!(
        bal.endpoints().iter().all(|e| e.up),
        "the slow one is never marked down: {:?}",
        bal.endpoints()
    );
    for p in [&slow, &fast1, &fast2] {
        assert_eq!(p.accepted(), 1, "never reconnected");
    }
    Ok(())
}

/// A call that is never retried (no per-try bound) still ends at its
/// deadline, on the balancer's own HTTP/2 connection too (hyper's sender
/// does not read `grpc-timeout`; a tonic `Channel` did): the request is
/// held 3 s on its way to the server, the caller gives up at 100 ms, and
/// the endpoint stays up on its one connection.
#[tokio::test]
async fn a_call_without_retries_ends_at_its_deadline() -> Result<()> {
    let p = serve_slow("held", Duration::ZERO).await?;
    let bal = Balancer::new(BalancerConfig {
        retry: RetryPolicy::none(),
        ..BalancerConfig::new("greet_service")
    });
    bal.upsert(&Addr::from_socket(p.addr), 100, "");
    assert_eq!(call(&bal, Duration::from_secs(5)).await?, "held");

    p.set_delay(Duration::from_secs(3));
    let started = std::time::Instant::now();
    let err = call(&bal, Duration::from_millis(100))
        .await
        .expect_err("held past its deadline");
    let took = started.elapsed();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(
        took < Duration::from_millis(1500),
        "ended by the client at its deadline, not by the server after the hold: {took:?}"
    );
    assert!(
        bal.endpoints().iter().all(|e| e.up),
        "{:?}",
        bal.endpoints()
    );

    p.set_delay(Duration::ZERO);
    assert_eq!(call(&bal, Duration::from_secs(5)).await?, "held");
    assert_eq!(p.accepted(), 1, "the same one connection throughout");
    Ok(())
}
