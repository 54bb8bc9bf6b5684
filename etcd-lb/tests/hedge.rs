//! Hedging: a slow attempt of an idempotent call gets a second attempt on
//! another endpoint; the first answer wins; hedges are charged to the
//! retry budget. In-process greet-servers with stalls; the round-robin
//! picker, so the slow server keeps its share and hedging alone answers it.

use std::time::{Duration, Instant};

use anyhow::Result;
use etcd_lb::metrics::ClientMetrics;
use etcd_lb::{Balancer, BalancerConfig, HedgingConfig, Picker, RetryPolicy};
use etcd_lb_registry::schema::Addr;
use greet_proto::paths::{MORNING, NIGHT};
use greet_proto::{GreetClient, GreetRequest, GreetServer};
use greet_server::{GreetService, Stall};
use prometheus_client::registry::Registry;
use tonic::transport::server::TcpIncoming;

async fn serve(name: &str, stall: Option<Stall>) -> Result<Addr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = Addr::from_socket(listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(GreetServer::new(GreetService::new(name).with_stall(stall)))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    Ok(addr)
}

fn balancer(registry: &mut Registry, methods: &[&str]) -> Balancer {
    Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent(methods.iter().copied()),
        picker: Picker::RoundRobin,
        hedging: Some(HedgingConfig::default()),
        metrics: Some(ClientMetrics::register(registry)),
        ..BalancerConfig::new("greet_service")
    })
}

/// `calls` sequential calls; returns the slowest and the answerers.
async fn drive(bal: &Balancer, calls: usize) -> Result<(Duration, Vec<String>)> {
    let mut c = GreetClient::new(bal.clone());
    let (mut slowest, mut from) = (Duration::ZERO, Vec::new());
    for _ in 0..calls {
        let t = Instant::now();
        let r = c.morning(GreetRequest { name: "t".into() }).await?;
        slowest = slowest.max(t.elapsed());
        from.push(r.into_inner().from);
    }
    Ok((slowest, from))
}

fn sample(registry: &Registry, name: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encodes");
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// One server (weight 2 of 202: about 1 % of the calls, so the 95th
/// percentile stays fast) stalls every call 300 ms: once the hedging delay
/// is known, its calls are answered by another server after the delay, not
/// 300 ms later, and the hedges show in the metrics.
#[tokio::test]
async fn a_stalled_attempt_is_hedged_to_another_endpoint() -> Result<()> {
    let mut registry = Registry::default();
    let bal = balancer(&mut registry, &[MORNING, NIGHT]);
    bal.upsert(
        &serve("stuck", Stall::new(1.0, Duration::from_millis(300))).await?,
        2,
        "",
    );
    bal.upsert(&serve("a", None).await?, 100, "");
    bal.upsert(&serve("b", None).await?, 100, "");
    // Warm up: the delay needs 64 answers.
    drive(&bal, 202).await?;
    let (slowest, from) = drive(&bal, 404).await?;
    assert!(
        slowest < Duration::from_millis(150),
        "hedged, not waited for: {slowest:?}"
    );
    assert!(from.iter().all(|f| f != "stuck"), "{from:?}");
    let (sent, won) = (
        sample(&registry, "lb_hedges_total{"),
        sample(&registry, "lb_hedges_won_total{"),
    );
    assert!(sent >= 4.0 && won >= 4.0, "sent {sent}, won {won}");
    // The delay is exported per method, and is the one the balancer uses:
    // the 95th percentile of fast answers, far below the stall.
    let delay = bal.hedging_delay(MORNING).expect("warm");
    assert!(delay < Duration::from_millis(100), "{delay:?}");
    let exported = sample(
        &registry,
        &format!("lb_hedging_delay_seconds{{service=\"greet_service\",method=\"{MORNING}\"}}"),
    );
    assert!(
        (exported - delay.as_secs_f64()).abs() < 0.02,
        "exported {exported}, held {delay:?}"
    );
    assert_eq!(bal.hedging_delay("/greet.Greet/Other"), None);
    Ok(())
}

/// A method not listed as idempotent is never hedged.
#[tokio::test]
async fn other_methods_are_not_hedged() -> Result<()> {
    let mut registry = Registry::default();
    let bal = balancer(&mut registry, &[NIGHT]);
    bal.upsert(
        &serve("stuck", Stall::new(1.0, Duration::from_millis(100))).await?,
        100,
        "",
    );
    bal.upsert(&serve("a", None).await?, 100, "");
    let (slowest, _) = drive(&bal, 100).await?;
    assert!(slowest >= Duration::from_millis(100), "{slowest:?}");
    assert_eq!(sample(&registry, "lb_hedges_total{"), 0.0);
    Ok(())
}

/// Every call slow (30 ms, each server): hedges stay within the retry
/// budget (10 % of calls plus 5 a second).
#[tokio::test]
async fn when_every_call_is_slow_hedges_stay_within_the_budget() -> Result<()> {
    let mut registry = Registry::default();
    let bal = balancer(&mut registry, &[MORNING, NIGHT]);
    for name in ["a", "b", "c"] {
        bal.upsert(
            &serve(name, Stall::new(1.0, Duration::from_millis(30))).await?,
            100,
            "",
        );
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let bal = bal.clone();
        tasks.push(tokio::spawn(async move { drive(&bal, 40).await }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let sent = sample(&registry, "lb_hedges_total{");
    let calls = 320.0;
    assert!(
        sent <= calls * 0.1 + 5.0 * secs + 10.0,
        "{sent} hedges for {calls} calls in {secs:.1} s"
    );
    Ok(())
}

/// Morning takes 20 ms everywhere; Night answers at once, except on
/// `stuck` (about 2 % of the calls), where it takes 8 ms. Each method has
/// its own hedging delay: Night's is about a millisecond, so its stalls on
/// `stuck` are hedged and won elsewhere. One delay over both methods would
/// sit near Morning's 20 ms (a quarter of the calls), and Night's 8 ms
/// stalls would never be hedged.
#[derive(Clone)]
struct TwoSpeeds {
    from: &'static str,
    night: Duration,
}

#[tonic::async_trait]
impl greet_proto::Greet for TwoSpeeds {
    async fn morning(
        &self,
        _: tonic::Request<GreetRequest>,
    ) -> Result<tonic::Response<greet_proto::GreetResponse>, tonic::Status> {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(tonic::Response::new(greet_proto::GreetResponse {
            message: "morning".into(),
            from: self.from.into(),
        }))
    }

    async fn night(
        &self,
        _: tonic::Request<GreetRequest>,
    ) -> Result<tonic::Response<greet_proto::GreetResponse>, tonic::Status> {
        if !self.night.is_zero() {
            tokio::time::sleep(self.night).await;
        }
        Ok(tonic::Response::new(greet_proto::GreetResponse {
            message: "night".into(),
            from: self.from.into(),
        }))
    }
}

#[tokio::test]
async fn each_method_is_hedged_after_its_own_delay() -> Result<()> {
    let mut registry = Registry::default();
    let bal = balancer(&mut registry, &[MORNING, NIGHT]);
    for (from, night, weight) in [
        ("stuck", Duration::from_millis(8), 4),
        ("a", Duration::ZERO, 100),
        ("b", Duration::ZERO, 100),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = Addr::from_socket(listener.local_addr()?);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(GreetServer::new(TwoSpeeds { from, night }))
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        bal.upsert(&addr, weight, "");
    }
    // Both methods interleaved, as one client's mixed traffic: warm-up
    // (64 answers of each) then the measured calls.
    let mut c = GreetClient::new(bal.clone());
    let mut stuck_answered_night = 0;
    for i in 0..800 {
        let req = GreetRequest { name: "t".into() };
        if i % 4 == 0 {
            c.morning(req).await?;
        } else {
            let from = c.night(req).await?.into_inner().from;
            if i >= 200 && from == "stuck" {
                stuck_answered_night += 1;
            }
        }
    }
    let won = sample(&registry, "lb_hedges_won_total{");
    eprintln!("hedges won {won}, `stuck` answered {stuck_answered_night} Night calls");
    assert!(
        won >= 4.0,
        "Night's stalls on `stuck` hedged and won elsewhere: won {won}, \
         `stuck` still answered {stuck_answered_night} Night calls"
    );
    Ok(())
}
