//! A drain survives what it must (issue 35, must-show 2): its server
//! re-registering (key deleted and put again on the same lease), an etcd
//! outage and restart (the client keeps the drain while etcd is down), a failover of the controllers (the leader SIGKILLed), and a
//! client restart. Through all of it the client library sends the drained
//! endpoint no call, and the surviving controller's view shows it drained
//! and keeps the override (its sweep removes only what can never apply
//! again). Real etcd, real greet-servers, the real controller binary.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{greet_server, key, operate_ok, wait_key};
use etcd_lb::{Addr, Balancer, CancellationToken};
use etcd_lb_testkit::{eventually, free_port, Etcd, Proc};
use greet_proto::{GreetClient, GreetRequest};
use serde_json::Value;

const SVC: &str = "greet_service";

/// A controller replica (the binary) with fast passes and a 3 s election
/// TTL; its HTTP base URL.
fn replica(etcd: &Etcd, name: &str) -> Result<(Proc, String)> {
    common::replica(etcd, Duration::from_secs(3), &["--replica-name", name])
}

async fn get(url: &str) -> Option<Value> {
    common::get_json(&reqwest::Client::new(), url)
        .await
        .ok()
        .map(|(_, v)| v)
}

/// The member `addr` of `SVC` in a replica's `/services`.
async fn member(base: &str, addr: &str) -> Option<Value> {
    let v = get(&format!("{base}/services")).await?;
    common::find_member(&v, SVC, addr)
}

async fn is_leader(base: &str) -> bool {
    let Ok(r) = reqwest::get(format!("{base}/metrics")).await else {
        return false;
    };
    let text = r.text().await.unwrap_or_default();
    common::sample(&text, "controller_leader", "") == Some(1.0)
}

/// A client of the library, synced, with both servers seen.
async fn client(etcd: &Etcd) -> Result<(Balancer, CancellationToken)> {
    let (balancer, _, cancel) = common::library_client(etcd, SVC).await?;
    eventually(Duration::from_secs(15), "both servers seen", || async {
        (balancer.len() == 2).then_some(())
    })
    .await?;
    Ok((balancer, cancel))
}

/// `n` calls; answers by server. Fails on a failed call.
async fn calls(balancer: &Balancer, n: usize) -> Result<HashMap<String, usize>> {
    let mut c = GreetClient::new(balancer.clone());
    let mut by = HashMap::new();
    for _ in 0..n {
        let from = c
            .morning(GreetRequest { name: "s".into() })
            .await
            .context("a call failed")?
            .into_inner()
            .from;
        *by.entry(from).or_insert(0) += 1;
    }
    Ok(by)
}

/// Checks that `a` is drained everywhere now: the client's weight is 0, 40
/// calls all go to `b`, and `base`'s view shows the drain.
async fn drained(balancer: &Balancer, a: &str, b: &str, base: &str, when: &str) -> Result<()> {
    let parsed: Addr = a.parse()?;
    eventually(
        Duration::from_secs(10),
        &format!("{when}: the client weighs A 0"),
        || async { (balancer.weight_of(&parsed) == Some(0)).then_some(()) },
    )
    .await?;
    let by = calls(balancer, 40).await.context(when.to_owned())?;
    ensure!(
        !by.contains_key(a) && by.get(b) == Some(&40),
        "{when}: calls went to the drained endpoint: {by:?}"
    );
    let shown = eventually(
        Duration::from_secs(10),
        &format!("{when}: the view shows A drained"),
        || async {
            let m = member(base, a).await?;
            (m["weight"] == 0 && m["registered_weight"] == 100 && m["override"]["drain"] == true)
                .then_some(())
        },
    )
    .await;
    match shown {
        Ok(()) => Ok(()),
        Err(e) => Err(e.context(format!("the view's member: {:?}", member(base, a).await))),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drain_survives_reregistration_etcd_restart_controller_failover_and_client_restart(
) -> Result<()> {
    let mut etcd = Etcd::start().await?;
    let etcd_client = etcd.client().await?;
    let (_servers, addrs) = common::registered_servers(&etcd, 2).await?;
    let (a, b) = (addrs[0].clone(), addrs[1].clone());
    let mut replicas = vec![replica(&etcd, "one")?, replica(&etcd, "two")?];
    let (balancer, cancel) = client(&etcd).await?;
    operate_ok(&etcd, &["drain", SVC, &a, "--reason", "survival"])?;
    let base = replicas[0].1.clone();
    drained(&balancer, &a, &b, &base, "after the drain").await?;

    // 1. The server re-registers on its lease.
    let mut kv = etcd_client.clone();
    kv.delete(key(SVC, &a), None).await?;
    wait_key(&etcd_client, &key(SVC, &a), Duration::from_secs(15)).await?;
    drained(&balancer, &a, &b, &base, "after re-registration").await?;

    // 2. etcd goes down, and comes back with its data: while it is down
    // the client keeps the drain (an outage undoes no operator's drain).
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        balancer.weight_of(&a.parse()?) == Some(0),
        "the drain was lost while etcd was down: {:?}",
        balancer.endpoints()
    );
    let by = calls(&balancer, 40).await.context("while etcd is down")?;
    ensure!(!by.contains_key(&a), "while etcd is down: {by:?}");
    etcd.restart(false).await?;
    drained(&balancer, &a, &b, &base, "after the etcd restart").await?;

    // 3. The leader replica is SIGKILLed; the other takes over, shows the
    // drain, and its sweeps keep the override.
    let leader = {
        let (r0, r1) = (replicas[0].1.clone(), replicas[1].1.clone());
        eventually(Duration::from_secs(15), "a leader", || async {
            if is_leader(&r0).await {
                Some(0)
            } else if is_leader(&r1).await {
                Some(1)
            } else {
                None
            }
        })
        .await?
    };
    let (mut killed, _) = replicas.remove(leader);
    killed.kill();
    let survivor = replicas[0].1.clone();
    eventually(Duration::from_secs(15), "the other replica leads", || {
        let s = survivor.clone();
        async move { is_leader(&s).await.then_some(()) }
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await; // five sweeps
    drained(&balancer, &a, &b, &survivor, "after the failover").await?;
    let key = format!("/lb-overrides/{SVC}/endpoints/{a}");
    ensure!(
        !kv.get(key.as_str(), None).await?.kvs().is_empty(),
        "the new leader removed a live drain"
    );

    // 4. The client restarts: its first view already has the drain.
    cancel.cancel();
    let (restarted, cancel) = client(&etcd).await?;
    ensure!(
        restarted.weight_of(&a.parse()?) == Some(0),
        "a restarted client's first view lacks the drain: {:?}",
        restarted.endpoints()
    );
    drained(&restarted, &a, &b, &survivor, "after the client restart").await?;
    cancel.cancel();
    Ok(())
}

/// Sticky overrides for 2,000 other addresses of the service: the
/// overrides' list is larger than the registry's, so it comes later.
async fn filler(etcd: &etcd_client::Client) -> Result<()> {
    let mut kv = etcd.clone();
    let value = r#"{"drain":true,"incarnation":null,"reason":"filler","by":"t","at":"2026-01-01T00:00:00Z"}"#;
    for chunk in (0..2000u32).collect::<Vec<_>>().chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|i| {
                etcd_client::TxnOp::put(
                    format!(
                        "/lb-overrides/{SVC}/endpoints/127.0.1.{}:{}",
                        1 + i / 1000,
                        20_000 + i % 1000
                    ),
                    value,
                    None,
                )
            })
            .collect();
        kv.txn(etcd_client::Txn::new().and_then(ops)).await?;
    }
    Ok(())
}

/// A client that starts while a drain is in place never sends the drained
/// endpoint a call, not even its first ones: discovery applies the
/// registry's first list only with the overrides' first list (or after
/// `FIRST_LIST_WAIT` without them). Several clients start back to back, as
/// a rollout of clients does, each calling at once; the overrides' list is
/// made slow to come by filling it with unrelated overrides.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_starting_under_a_drain_never_calls_the_drained_endpoint() -> Result<()> {
    let etcd = Etcd::start().await?;
    let etcd_client = etcd.client().await?;
    let (_servers, addrs) = common::registered_servers(&etcd, 2).await?;
    let a = addrs[0].clone();
    operate_ok(&etcd, &["drain", SVC, &a])?;
    filler(&etcd_client).await?;
    let parsed: Addr = a.parse()?;
    for round in 0..5 {
        let (balancer, _, cancel) = common::library_client(&etcd, SVC).await?;
        ensure!(
            balancer.weight_of(&parsed) == Some(0),
            "round {round}: the first view lacks the drain: {:?}",
            balancer.endpoints()
        );
        let by = calls(&balancer, 20).await?;
        ensure!(
            !by.contains_key(&a),
            "round {round}: the drained endpoint got calls: {by:?}"
        );
        cancel.cancel();
    }
    Ok(())
}

/// The same for the controller: from its first answer on, `/services` (and
/// so xDS, built from the same store) shows a drained endpoint drained; a
/// controller never publishes registered weights before the overrides.
#[tokio::test(flavor = "multi_thread")]
async fn a_controller_starting_under_a_drain_shows_it_from_its_first_view() -> Result<()> {
    let etcd = Etcd::start().await?;
    let etcd_client = etcd.client().await?;
    let port = free_port();
    let _server = greet_server(&etcd, port, &[])?;
    let a = format!("127.0.0.1:{port}");
    wait_key(&etcd_client, &key(SVC, &a), Duration::from_secs(15)).await?;
    operate_ok(&etcd, &["drain", SVC, &a])?;
    filler(&etcd_client).await?;
    for round in 0..3 {
        let (mut proc, base) = replica(&etcd, &format!("r{round}"))?;
        let http = reqwest::Client::new();
        let mut seen = 0;
        let started = std::time::Instant::now();
        while seen < 5 {
            ensure!(
                started.elapsed() < Duration::from_secs(20),
                "round {round}: the view never listed {a}: {}",
                proc.log()
            );
            let Ok((200, view)) = common::get_json(&http, &format!("{base}/services")).await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            if let Some(m) = common::find_member(&view, SVC, &a) {
                ensure!(
                    m["weight"] == 0,
                    "round {round}: the view showed the drained endpoint at weight {}",
                    m["weight"]
                );
                seen += 1;
            }
        }
        proc.kill();
    }
    Ok(())
}
