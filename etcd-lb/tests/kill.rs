//! A SIGKILL of a real greet-server process under a mix of unary and
//! streaming load: streams on the killed server end (nothing can save
//! them), but no unary call is lost, because unary requests fit the replay
//! buffer and Greet's methods are retryable.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use etcd_lb::{Balancer, BalancerConfig, RetryPolicy};
use etcd_lb_registry::schema::Addr;
use etcd_lb_testkit::{bin_path, eventually, free_port, Etcd, Proc};
use greet_proto::paths::{MORNING, NIGHT};
use greet_proto::{GreetClient, GreetRequest};
use nix::sys::signal::Signal;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn server(etcd: &Etcd, port: u16) -> Result<Proc> {
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--drain",
        "0s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Proc::spawn(
        &format!("server:{port}"),
        bin_path("greet-server"),
        &args,
        &[("RUST_LOG", "warn")],
    )
}

#[tokio::test]
async fn a_sigkill_under_mixed_load_loses_no_unary_call() -> Result<()> {
    let etcd = Etcd::start().await?;
    let ports = [free_port(), free_port(), free_port()];
    let mut servers = Vec::new();
    for p in ports {
        servers.push(server(&etcd, p)?);
    }
    let bal = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        ..BalancerConfig::new("greet_service")
    });
    for p in ports {
        bal.upsert(&Addr::new(&format!("127.0.0.1:{p}"))?, 100, "");
    }
    eventually(Duration::from_secs(20), "all three servers answer", || {
        let bal = bal.clone();
        async move {
            let mut c = GreetClient::new(bal);
            let mut seen = std::collections::HashSet::new();
            for _ in 0..12 {
                seen.insert(
                    c.morning(GreetRequest { name: "t".into() })
                        .await
                        .ok()?
                        .into_inner()
                        .from,
                );
            }
            (seen.len() == 3).then_some(())
        }
    })
    .await?;

    let stop = Arc::new(AtomicBool::new(false));
    let (unary_ok, unary_failed, streams) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicUsize::new(0)),
    );
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (bal, stop, ok, failed) = (
            bal.clone(),
            stop.clone(),
            unary_ok.clone(),
            unary_failed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut c = GreetClient::new(bal);
            while !stop.load(Ordering::Relaxed) {
                match c.morning(GreetRequest { name: "t".into() }).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for _ in 0..4 {
        let (bal, stop, streams) = (bal.clone(), stop.clone(), streams.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = HealthClient::new(bal);
            while !stop.load(Ordering::Relaxed) {
                let watched = async {
                    let mut s = c
                        .watch(HealthCheckRequest {
                            service: String::new(),
                        })
                        .await?
                        .into_inner();
                    s.message().await
                };
                if tokio::time::timeout(Duration::from_secs(2), watched)
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    streams.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    servers[0].signal(Signal::SIGKILL)?;
    let killed_at = unary_ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let (ok, failed) = (
        unary_ok.load(Ordering::Relaxed),
        unary_failed.load(Ordering::Relaxed),
    );
    eprintln!(
        "unary: {ok} ok ({} after the kill), {failed} failed; streams opened: {}",
        ok - killed_at,
        streams.load(Ordering::Relaxed)
    );
    assert_eq!(failed, 0, "no unary call lost to the SIGKILL");
    assert!(ok > killed_at, "calls went on after the kill");
    assert!(
        streams.load(Ordering::Relaxed) > 0,
        "the streaming load ran"
    );
    Ok(())
}
