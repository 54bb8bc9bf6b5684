//! The retry budget against a fleet that sheds load: three servers answer
//! `UNAVAILABLE` to every call, and the attempts they see are counted by
//! their own metrics (`grpc_server_handled_total`), as an operator would.

use std::sync::Arc;

use anyhow::{Context, Result};
use etcd_lb::{Balancer, BalancerConfig, RetryBudgetConfig, RetryPolicy};
use etcd_lb_registry::schema::Addr;
use greet_proto::paths::{MORNING, NIGHT};
use greet_proto::{GreetClient, GreetRequest, GreetServer};
use greet_server::metrics::{MetricsLayer, ServerMetrics};
use greet_server::{Fault, GreetService};
use tonic::transport::server::TcpIncoming;
use tonic::Code;

/// A Greet server refusing everything, measured by greet-server's metrics.
async fn refusing(name: &str) -> Result<(std::net::SocketAddr, Arc<ServerMetrics>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let metrics = Arc::new(ServerMetrics::new());
    let service = GreetService::new(name).with_fault(Fault::new(1.0, 0, Code::Unavailable));
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(MetricsLayer::new(metrics.clone()))
            .add_service(GreetServer::new(service))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    Ok((addr, metrics))
}

/// Greet calls a server handled, whatever their code.
fn handled(metrics: &ServerMetrics) -> Result<u64> {
    let mut n = 0;
    for line in metrics.render().lines() {
        if line.starts_with("grpc_server_handled_total{") && line.contains("Morning") {
            let v = line.rsplit(' ').next().context("a sample has a value")?;
            n += v
                .parse::<f64>()
                .with_context(|| format!("value of {line}"))? as u64;
        }
    }
    Ok(n)
}

/// Sends `calls` calls (16 at a time); returns how many failed.
async fn drive(bal: &Balancer, calls: usize) -> Result<usize> {
    let mut tasks = Vec::new();
    for w in 0..16 {
        let client = GreetClient::new(bal.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = client;
            let mut failed = 0;
            for _ in (w..calls).step_by(16) {
                if c.morning(GreetRequest { name: "t".into() }).await.is_err() {
                    failed += 1;
                }
            }
            failed
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await?;
    }
    Ok(failed)
}

async fn attempts_per_call(budget: Option<RetryBudgetConfig>, calls: usize) -> Result<f64> {
    let mut servers = Vec::new();
    for name in ["a", "b", "c"] {
        servers.push(refusing(name).await?);
    }
    let bal = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        retry_budget: budget,
        ..BalancerConfig::new("greet_service")
    });
    for (addr, _) in &servers {
        bal.upsert(&Addr::from_socket(*addr), 100, "");
    }
    let failed = drive(&bal, calls).await?;
    assert_eq!(failed, calls, "every call fails: the fleet refuses all");
    let mut attempts = 0;
    for (_, m) in &servers {
        attempts += handled(m)?;
    }
    Ok(attempts as f64 / calls as f64)
}

/// Must-show 5: 1,000 calls to a fleet that refuses everything make at
/// most 1.2 attempts per call with the default budget; without a budget
/// the same policy makes several (the contrast shows the count is real).
#[tokio::test]
async fn retries_to_a_refusing_fleet_stay_within_the_budget() -> Result<()> {
    let with_budget = attempts_per_call(Some(RetryBudgetConfig::default()), 1_000).await?;
    assert!(
        with_budget <= 1.2,
        "attempts per call with the default budget: {with_budget:.3}"
    );
    assert!(
        with_budget >= 1.0,
        "every call reached a server: {with_budget:.3}"
    );
    let unbounded = attempts_per_call(None, 100).await?;
    eprintln!(
        "attempts per call: {with_budget:.3} with the default budget, {unbounded:.3} without"
    );
    assert!(
        unbounded > 2.0,
        "without a budget the policy retries each call: {unbounded:.3}"
    );
    Ok(())
}
