//! A bounded soak: random faults with a fixed seed, then agreement.
//!
//! Four servers, a controller and an in-process client under steady load.
//! Fifteen rounds, each kind of fault three times in an order shuffled
//! with a fixed seed (20261126), each on a random server: SIGKILL a server
//! and start it again on its address, SIGTERM and restart, delete a key
//! from outside, restart etcd with its data, SIGSTOP a server for a moment.
//! Faults run one at a time, never two at once.
//! At the end etcd's keys, the controller's healthy members and the
//! client's endpoint set must be the same four addresses, and no call
//! failed.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use common::{controller, http_get, key_of, keys, server, PREFIX};
use etcd_lb::{Balancer, BalancerConfig, Discovery, DiscoveryConfig, RetryPolicy};
use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_registry::schema::ServiceName;
use etcd_lb_testkit::{eventually, free_port, Etcd, Proc};
use greet_proto::paths::{MORNING, NIGHT};
use greet_proto::{GreetClient, GreetRequest};
use nix::sys::signal::Signal;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

const TTL: &str = "4s";

#[tokio::test]
async fn random_faults_then_etcd_controller_and_client_agree() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    let ep = etcd.endpoint();
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let start = |port: u16| server(&ep, port, &["--ttl", TTL], &[]);
    let mut servers: Vec<Proc> = ports.iter().map(|p| start(*p)).collect::<Result<_>>()?;
    let ctl_port = free_port();
    let ctl = controller(&ep, ctl_port, "3s")?;

    let cancel = CancellationToken::new();
    let balancer = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        ..BalancerConfig::new("greet_service")
    });
    let discovery = Discovery::spawn(
        EtcdConfig::plain([ep.clone()]),
        DiscoveryConfig::new(ServiceName::new("greet_service")?),
        balancer.clone(),
        cancel.clone(),
    );
    discovery.wait_synced(Duration::from_secs(10)).await;
    let want: BTreeSet<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    eventually(
        Duration::from_secs(20),
        "all four servers in the client",
        || async {
            let have: BTreeSet<String> = balancer
                .endpoints()
                .iter()
                .map(|e| e.addr.to_string())
                .collect();
            (have == want).then_some(())
        },
    )
    .await?;

    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (mut c, ok, failed, cancel) = (
                GreetClient::new(balancer.clone()),
                ok.clone(),
                failed.clone(),
                cancel.clone(),
            );
            tokio::spawn(async move {
                while !cancel.is_cancelled() {
                    let mut req = tonic::Request::new(GreetRequest {
                        name: "soak".into(),
                    });
                    req.set_timeout(Duration::from_secs(10));
                    match c.morning(req).await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("failed call: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();

    let mut rng = rand::rngs::StdRng::seed_from_u64(20_261_126);
    let mut client = etcd.client().await?;
    // Every kind of fault three times, in an order the seed shuffles.
    let mut faults: Vec<u32> = (0..15).map(|n| n % 5).collect();
    for k in (1..faults.len()).rev() {
        faults.swap(k, rng.random_range(0..=k));
    }
    for (round, fault) in faults.into_iter().enumerate() {
        let i = rng.random_range(0..ports.len());
        eprintln!(
            "round {round}: fault {fault} on server {i} (port {})",
            ports[i]
        );
        match fault {
            0 => {
                servers[i].kill();
                tokio::time::sleep(Duration::from_millis(300)).await;
                servers[i] = start(ports[i])?;
            }
            1 => {
                servers[i].signal(Signal::SIGTERM)?;
                servers[i].wait_exit(Duration::from_secs(15)).await?;
                servers[i] = start(ports[i])?;
            }
            2 => {
                client.delete(key_of(ports[i]), None).await?;
            }
            3 => {
                etcd.restart(false).await?;
                client = etcd.client().await?;
            }
            _ => {
                servers[i].signal(Signal::SIGSTOP)?;
                tokio::time::sleep(Duration::from_millis(1500)).await;
                servers[i].signal(Signal::SIGCONT)?;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
    }

    // Agreement: etcd, the controller's healthy members, the client.
    let want_keys: BTreeSet<String> = ports.iter().map(|p| key_of(*p)).collect();
    let converged = eventually(
        Duration::from_secs(30),
        "etcd, controller and client to agree",
        || async {
            let in_etcd = keys(&client, PREFIX).await.ok()?;
            let (status, body) = http_get(ctl_port, "/services/greet_service?healthy=true")
                .await
                .ok()?;
            let view: serde_json::Value = serde_json::from_str(&body).ok()?;
            let in_view: BTreeSet<String> = view["members"]
                .as_array()?
                .iter()
                .filter_map(|m| m["addr"].as_str().map(str::to_owned))
                .collect();
            let in_client: BTreeSet<String> = balancer
                .endpoints()
                .iter()
                .filter(|e| e.up && e.weight > 0)
                .map(|e| e.addr.to_string())
                .collect();
            (status == 200 && in_etcd == want_keys && in_view == want && in_client == want)
                .then_some(())
        },
    )
    .await;
    cancel.cancel();
    for t in load {
        let _ = t.await;
    }
    converged.with_context(|| format!("controller log:\n{}", ctl.log()))?;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("soak: {ok} calls ok, {failed} failed");
    assert!(ok > 1000, "the load ran: {ok}");
    assert_eq!(failed, 0, "no call failed through the faults");
    Ok(())
}
