//! The load-aware picker on real connections: one server made slow (a
//! proxy holding its requests 250 ms: in a debug build on two cores the
//! fast ones' own peaks reach tens of ms; `greet-bench uneven` measures
//! 50 ms against 1 ms with release binaries) among three of equal weight loses its
//! traffic, and wins its share back once it is fast again; the round-robin
//! picker keeps sending it a third.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Result;
use etcd_lb::{Balancer, BalancerConfig, Picker, RetryPolicy};
use etcd_lb_registry::schema::Addr;
use etcd_lb_testkit::Proxy;
use greet_proto::paths::{MORNING, NIGHT};
use greet_proto::{GreetClient, GreetRequest, GreetServer};
use greet_server::GreetService;
use tonic::transport::server::TcpIncoming;

async fn serve(name: &str) -> Result<Proxy> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GreetServer::new(
                GreetService::new(name).with_latency(Duration::from_millis(1)),
            ))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    Ok(Proxy::start(addr).await?)
}

/// Calls for `secs`, 16 at a time; returns the calls each server answered.
async fn drive(bal: &Balancer, secs: f64) -> Result<HashMap<String, usize>> {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let mut c = GreetClient::new(bal.clone());
        tasks.push(tokio::spawn(async move {
            let mut seen = HashMap::<String, usize>::new();
            while Instant::now() < end {
                let r = c.morning(GreetRequest { name: "t".into() }).await?;
                *seen.entry(r.into_inner().from).or_default() += 1;
            }
            Ok::<_, tonic::Status>(seen)
        }));
    }
    let mut all = HashMap::new();
    for t in tasks {
        for (k, v) in t.await?? {
            *all.entry(k).or_default() += v;
        }
    }
    Ok(all)
}

fn share(calls: &HashMap<String, usize>, who: &str) -> f64 {
    let total: usize = calls.values().sum();
    calls.get(who).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

async fn fleet(picker: Picker) -> Result<(Balancer, Vec<Proxy>)> {
    let bal = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        picker,
        ..BalancerConfig::new("greet_service")
    });
    let mut proxies = Vec::new();
    for name in ["slow", "fast1", "fast2"] {
        let p = serve(name).await?;
        bal.upsert(&Addr::from_socket(p.addr), 100, "");
        proxies.push(p);
    }
    Ok((bal, proxies))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_loses_traffic_and_wins_it_back() -> Result<()> {
    let (bal, proxies) = fleet(Picker::default()).await?;
    drive(&bal, 0.5).await?;
    proxies[0].set_delay(Duration::from_millis(250));
    drive(&bal, 1.0).await?;
    let slow = drive(&bal, 2.0).await?;
    eprintln!("250 ms server: {slow:?} {:?}", bal.endpoints());
    assert!(share(&slow, "slow") < 0.05, "{slow:?}");

    proxies[0].set_delay(Duration::ZERO);
    let recovering = drive(&bal, 4.0).await?;
    let recovered = drive(&bal, 1.0).await?;
    eprintln!("recovering: {recovering:?}, recovered: {recovered:?}");
    assert!(
        (share(&recovered, "slow") - 1.0 / 3.0).abs() < 0.05,
        "its third back within 5 s: {recovered:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_round_robin_picker_keeps_sending_the_slow_one_a_third() -> Result<()> {
    let (bal, proxies) = fleet(Picker::RoundRobin).await?;
    proxies[0].set_delay(Duration::from_millis(50));
    let calls = drive(&bal, 1.0).await?;
    assert!(
        (share(&calls, "slow") - 1.0 / 3.0).abs() < 0.02,
        "{calls:?}"
    );
    Ok(())
}

/// The picker's view is in the metrics: each endpoint's latency estimate
/// (the slow one's above 250 ms) and attempts in flight (none once the
/// calls are over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_is_in_the_metrics() -> Result<()> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = etcd_lb::metrics::ClientMetrics::register(&mut registry);
    let bal = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        metrics: Some(metrics),
        ..BalancerConfig::new("greet_service")
    });
    let slow = serve("slow").await?;
    let fast = serve("fast").await?;
    slow.set_delay(Duration::from_millis(250));
    for p in [&slow, &fast] {
        bal.upsert(&Addr::from_socket(p.addr), 100, "");
    }
    drive(&bal, 1.0).await?;
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    let value = |name: &str, addr: std::net::SocketAddr| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains(&addr.to_string()))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let est = "lb_endpoint_latency_estimate_seconds{";
    assert!(value(est, slow.addr) > 0.25, "{text}");
    assert!(value(est, fast.addr) < 0.25, "{text}");
    for p in [&slow, &fast] {
        assert_eq!(value("lb_endpoint_in_flight{", p.addr), 0.0, "{text}");
    }
    Ok(())
}
