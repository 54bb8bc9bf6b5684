//! The client library's metrics, in a registry the test owns, checked
//! against the calls made; and the binary's `--metrics-listen` exposition
//! checked with the real promtool (Debian's prometheus).

use std::time::Duration;

use anyhow::{ensure, Result};
use etcd_lb::metrics::ClientMetrics;
use etcd_lb::{Balancer, BalancerConfig, RetryPolicy};
use etcd_lb_registry::schema::Addr;
use etcd_lb_testkit::metrics::{promtool_check, sample};
use etcd_lb_testkit::{eventually, free_port, Etcd, Proc, Proxy};
use greet_proto::paths::{MORNING, NIGHT};
use greet_proto::{GreetClient, GreetRequest, GreetServer};
use greet_server::GreetService;
use prometheus_client::registry::Registry;
use tonic::transport::server::TcpIncoming;

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

fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry).expect("encoding to a String");
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn counts_match_the_calls_made_and_leavers_are_pruned() -> Result<()> {
    let a = Proxy::start(serve("a").await?).await?;
    let b = Proxy::start(serve("b").await?).await?;
    let (ea, eb) = (Addr::from_socket(a.addr), Addr::from_socket(b.addr));
    let mut registry = Registry::default();
    let metrics = ClientMetrics::register(&mut registry);
    let bal = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        metrics: Some(metrics),
        ..BalancerConfig::new("greet_service")
    });
    bal.upsert(&ea, 100, "1.0.0");
    bal.upsert(&eb, 300, "1.0.0");
    let mut client = GreetClient::new(bal.clone());
    let mut from_a = 0;
    for _ in 0..40 {
        let r = client.morning(GreetRequest { name: "m".into() }).await?;
        if r.into_inner().from == "a" {
            from_a += 1;
        }
    }
    let text = encode(&registry);
    let series =
        |ep: &Addr| format!(r#"lb_attempts_total{{service="greet_service",endpoint="{ep}"}}"#);
    ensure!(
        sample(&text, &series(&ea)) == Some(f64::from(from_a)),
        "a answered {from_a}: {text}"
    );
    ensure!(
        sample(&text, &series(&eb)) == Some(f64::from(40 - from_a)),
        "{text}"
    );
    ensure!(
        !text.contains("lb_attempt_errors_total{"),
        "no errors yet: {text}"
    );
    ensure!(
        sample(&text, r#"lb_endpoints{service="greet_service",state="up"}"#) == Some(2.0),
        "{text}"
    );
    let count =
        format!(r#"lb_attempt_duration_seconds_count{{service="greet_service",endpoint="{eb}"}}"#);
    ensure!(
        sample(&text, &count) == Some(f64::from(40 - from_a)),
        "{text}"
    );

    // b's connection is reset: the call goes to a (a retry, unsent or lost),
    // b is marked down and its error counted under Unavailable.
    b.cut();
    for _ in 0..10 {
        client.morning(GreetRequest { name: "m".into() }).await?;
    }
    let text = encode(&registry);
    let down =
        format!(r#"lb_endpoint_marked_down_total{{service="greet_service",endpoint="{eb}"}}"#);
    ensure!(sample(&text, &down) == Some(1.0), "{text}");
    let unavailable = format!(
        r#"lb_attempt_errors_total{{service="greet_service",endpoint="{eb}",grpc_code="Unavailable"}}"#
    );
    ensure!(
        sample(&text, &unavailable).is_some_and(|n| n >= 1.0),
        "{text}"
    );
    let retries: f64 = ["unsent", "lost"]
        .iter()
        .filter_map(|r| {
            sample(
                &text,
                &format!(r#"lb_retries_total{{service="greet_service",reason="{r}"}}"#),
            )
        })
        .sum();
    ensure!(retries >= 1.0, "the failed attempt was retried: {text}");
    ensure!(
        sample(
            &text,
            r#"lb_endpoints{service="greet_service",state="down"}"#
        ) == Some(1.0),
        "{text}"
    );

    // b leaves the registry: its series go with it.
    bal.remove(&eb);
    let text = encode(&registry);
    ensure!(!text.contains(&eb.to_string()), "b's series remain: {text}");
    ensure!(
        sample(
            &text,
            r#"lb_endpoints{service="greet_service",state="down"}"#
        ) == Some(0.0),
        "{text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_serves_metrics_that_promtool_accepts() -> Result<()> {
    let etcd = Etcd::start().await?;
    let port = free_port();
    let _server = Proc::spawn(
        "greet-server",
        etcd_lb_testkit::bin_path("greet-server"),
        &[
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--etcd-endpoints".to_owned(),
            etcd.endpoint(),
        ],
        &[],
    )?;
    let mport = free_port();
    let _client = Proc::spawn(
        "greet-client",
        env!("CARGO_BIN_EXE_greet-client"),
        &[
            "--etcd-endpoints".to_owned(),
            etcd.endpoint(),
            "--interval".to_owned(),
            "20ms".to_owned(),
            "--metrics-listen".to_owned(),
            format!("127.0.0.1:{mport}"),
        ],
        &[],
    )?;
    let series =
        format!(r#"lb_attempts_total{{service="greet_service",endpoint="127.0.0.1:{port}"}}"#);
    let url = format!("http://127.0.0.1:{mport}/metrics");
    let text = eventually(Duration::from_secs(20), "calls in the metrics", || {
        let (url, series) = (url.clone(), series.clone());
        async move {
            let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
            // The view's gauges are refreshed once a second.
            let revision = sample(&text, r#"lb_view_revision{service="greet_service"}"#)?;
            (sample(&text, &series)? >= 4.0 && revision > 0.0).then_some(text)
        }
    })
    .await?;
    promtool_check(&text)?;
    ensure!(
        sample(&text, r#"lb_view_age_seconds{service="greet_service"}"#)
            .is_some_and(|a| (0.0..30.0).contains(&a)),
        "{text}"
    );
    Ok(())
}
