//! The balancer as a library, with in-process servers behind cuttable
//! proxies: connection reuse, skipping unreachable endpoints until they
//! recover, responses cut off mid-way, and fail-fast messages.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use etcd_lb::{Balancer, BalancerConfig, RetryPolicy};
use etcd_lb_registry::schema::Addr;
use etcd_lb_testkit::{eventually, Proxy};
use greet_proto::paths::{MORNING, NIGHT};
use greet_proto::{GreetClient, GreetRequest, GreetServer};
use greet_server::GreetService;
use tonic::transport::server::TcpIncoming;
use tonic::Code;

async fn serve(name: &str) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GreetServer::new(GreetService::new(name)))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    Ok(addr)
}

fn balancer() -> Balancer {
    Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        ..BalancerConfig::new("greet_service")
    })
}

async fn call(b: &Balancer) -> Result<String, tonic::Status> {
    let mut c = GreetClient::new(b.clone());
    c.morning(GreetRequest { name: "t".into() })
        .await
        .map(|r| r.into_inner().from)
}

fn addr(p: &Proxy) -> Addr {
    Addr::from_socket(p.addr)
}

#[tokio::test]
async fn updates_keep_established_connections() -> Result<()> {
    let a = Proxy::start(serve("a").await?).await?;
    let b = Proxy::start(serve("b").await?).await?;
    let bal = balancer();
    bal.upsert(&addr(&a), 100, "1.0.0");
    for _ in 0..10 {
        assert_eq!(call(&bal).await?, "a");
    }
    assert_eq!(a.accepted(), 1, "one connection, warmed or first used");

    // Unrelated changes and a change of a's own weight: a keeps its one
    // connection.
    bal.upsert(&addr(&b), 100, "1.0.0");
    bal.upsert(&addr(&a), 300, "1.0.1");
    bal.remove(&addr(&b));
    bal.upsert(&addr(&b), 50, "1.0.0");
    let mut from_a = 0;
    for _ in 0..40 {
        if call(&bal).await? == "a" {
            from_a += 1;
        }
    }
    assert!(
        (33..=36).contains(&from_a),
        "300:50 split over 40 calls: {from_a}"
    );
    assert_eq!(a.accepted(), 1, "no reconnect to an unchanged endpoint");
    assert_eq!(
        b.accepted(),
        2,
        "b was removed and added again: a new channel"
    );
    Ok(())
}

#[tokio::test]
async fn unreachable_endpoints_are_skipped_until_they_recover() -> Result<()> {
    let a = Proxy::start(serve("a").await?).await?;
    let b = Proxy::start(serve("b").await?).await?;
    let bal = balancer();
    bal.upsert(&addr(&a), 100, "");
    bal.upsert(&addr(&b), 100, "");
    for _ in 0..4 {
        call(&bal).await?;
    }

    a.cut();
    for _ in 0..50 {
        assert_eq!(call(&bal).await?, "b", "every call succeeds on b");
    }
    let info = bal.endpoints();
    assert!(!info
        .iter()
        .find(|e| e.addr == addr(&a))
        .is_some_and(|e| e.up));

    a.heal();
    eventually(Duration::from_secs(10), "a back in rotation", || async {
        bal.endpoints().iter().all(|e| e.up).then_some(())
    })
    .await?;
    let mut seen_a = false;
    for _ in 0..10 {
        seen_a |= call(&bal).await? == "a";
    }
    assert!(seen_a, "a takes calls again after it recovered");
    Ok(())
}

#[tokio::test]
async fn fails_fast_with_unavailable_and_says_why() -> Result<()> {
    let bal = balancer();
    let err = call(&bal).await.expect_err("no endpoints");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("no endpoints registered"),
        "{}",
        err.message()
    );

    let a = Proxy::start(serve("a").await?).await?;
    bal.upsert(&addr(&a), 0, "");
    let err = call(&bal).await.expect_err("draining");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("draining"), "{}", err.message());

    bal.upsert(&addr(&a), 100, "");
    assert_eq!(call(&bal).await?, "a");
    a.cut();
    let started = std::time::Instant::now();
    let err = call(&bal).await.expect_err("unreachable");
    assert_eq!(err.code(), Code::Unavailable);
    let err2 = call(&bal).await.expect_err("unreachable");
    assert!(err2.message().contains("unreachable"), "{}", err2.message());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fails fast, no hang"
    );
    Ok(())
}

/// A server that dies between a response's headers and its end, as one
/// killed mid-call does: it sends `200` with gRPC headers, then drops the
/// connection. Counts the Greet calls it took (not health checks).
async fn cut_off_after_headers() -> Result<(std::net::SocketAddr, Arc<AtomicUsize>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let taken = Arc::new(AtomicUsize::new(0));
    let count = taken.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                if let Some(Ok((req, mut respond))) = conn.accept().await {
                    if req.uri().path().starts_with("/Greet/") {
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                    let head = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(())
                        .expect("static response head");
                    if respond.send_response(head, false).is_ok() {
                        // Flush the headers, then die without a body or
                        // trailers.
                        let _ =
                            tokio::time::timeout(Duration::from_millis(50), conn.accept()).await;
                    }
                }
                drop(conn);
            });
        }
    });
    Ok((addr, taken))
}

#[tokio::test]
async fn a_response_cut_off_after_its_headers_is_retried() -> Result<()> {
    let (broken, taken) = cut_off_after_headers().await?;
    let good = serve("good").await?;
    // Lazy channels: no health check reaches the broken server before the
    // first call does.
    let b = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        eager_connect: false,
        ..BalancerConfig::new("greet_service")
    });
    b.upsert(&Addr::from_socket(broken), 100, "");
    b.upsert(&Addr::from_socket(good), 100, "");
    for i in 0..20 {
        let from = call(&b)
            .await
            .map_err(|s| anyhow::anyhow!("call {i} failed: {s}"))?;
        assert_eq!(from, "good");
    }
    assert!(
        taken.load(Ordering::SeqCst) > 0,
        "the broken server took at least one call (else this proves nothing)"
    );

    // A method not marked retryable is committed at its headers, as gRPC
    // does: the caller sees the failure.
    let strict = Balancer::new(BalancerConfig {
        eager_connect: false,
        ..BalancerConfig::new("greet_service")
    });
    strict.upsert(&Addr::from_socket(broken), 100, "");
    let err = call(&strict).await.expect_err("cut-off response");
    assert_ne!(err.code(), Code::Ok);
    Ok(())
}

async fn serve_with(service: GreetService) -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GreetServer::new(service))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    Ok(addr)
}

/// Weights 10000 and 1; the heavy server answers its first call
/// UNAVAILABLE: the retry goes to the light one, whatever the weights.
#[tokio::test]
async fn a_retry_goes_to_another_endpoint_whatever_the_weights() -> Result<()> {
    let heavy = serve_with(
        GreetService::new("heavy").with_fault(greet_server::Fault::new(0.0, 1, Code::Unavailable)),
    )
    .await?;
    let light = serve_with(GreetService::new("light")).await?;
    let bal = balancer();
    bal.upsert(&Addr::from_socket(heavy), 10_000, "1.0.0");
    bal.upsert(&Addr::from_socket(light), 1, "1.0.0");
    assert_eq!(
        call(&bal).await?,
        "light",
        "the retry avoided the heavy one"
    );
    assert_eq!(
        call(&bal).await?,
        "heavy",
        "and the heavy one is not punished"
    );
    Ok(())
}

/// Discovery hands a whole list over as one batch: every endpoint lands,
/// and watchers of `changes()` are woken once per batch, not per endpoint.
#[test]
fn a_batch_of_changes_is_applied_at_once() {
    use etcd_lb::balance::Change;
    let b = Balancer::new(BalancerConfig {
        eager_connect: false,
        ..BalancerConfig::new("batch")
    });
    let mut changes = b.changes();
    let addrs: Vec<etcd_lb_registry::schema::Addr> = (0..100)
        .map(|i| format!("127.0.0.1:{}", 1000 + i).parse().unwrap())
        .collect();
    b.apply(addrs.iter().map(|addr| Change::Upsert {
        addr,
        weight: 7,
        version: "1.0.0",
    }));
    assert_eq!(b.len(), 100);
    assert_eq!(*changes.borrow_and_update(), 1, "one wake-up for the batch");
    assert_eq!(b.weight_of(&addrs[42]), Some(7));
    b.apply(addrs[..60].iter().map(Change::Remove));
    assert_eq!(b.len(), 40);
    assert_eq!(*changes.borrow_and_update(), 2);
    assert_eq!(b.weight_of(&addrs[10]), None);
    // Nothing to do: no wake-up.
    b.apply(addrs[..60].iter().map(Change::Remove));
    assert_eq!(*changes.borrow_and_update(), 2);
}
