//! The greet-server binary against a real etcd: registration, recovery,
//! fencing and ordered shutdown (issue: foundation).

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::{morning, TTL};
use etcd_client::Client;
use etcd_lb_testkit::{eventually, free_port, Etcd, Proc};
use greet_proto::{GreetClient, GreetRequest};
use nix::sys::signal::Signal;
use serde_json::Value;

/// The binary at version 1.4.2 (the tests check the value it writes).
fn server(etcd: &str, port: u16, extra: &[&str]) -> Result<Proc> {
    let args = [&["--service-version", "1.4.2"][..], extra].concat();
    common::server(etcd, port, &args, &[("RUST_LOG", "info,registry=debug")])
}

fn key(addr: &str) -> String {
    format!("/ns/greet_service/{addr}")
}

/// (value, lease, mod_revision) of a key, if present.
async fn read(client: &mut Client, key: &str) -> Option<(Value, i64, i64)> {
    let resp = client.get(key, None).await.ok()?;
    let kv = resp.kvs().first()?;
    let v = serde_json::from_slice(kv.value()).ok()?;
    Some((v, kv.lease(), kv.mod_revision()))
}

async fn registered(client: &mut Client, key: &str) -> Result<(Value, i64, i64)> {
    wait_key(
        client,
        key,
        Duration::from_secs(15),
        "the key to be registered",
        |_| true,
    )
    .await
}

/// Waits until `key` exists and `pred` holds for (value, lease, mod_revision).
async fn wait_key(
    client: &Client,
    key: &str,
    limit: Duration,
    what: &str,
    pred: impl Fn(&(Value, i64, i64)) -> bool + Copy,
) -> Result<(Value, i64, i64)> {
    eventually(limit, what, || {
        let mut c = client.clone();
        async move { read(&mut c, key).await.filter(|r| pred(r)) }
    })
    .await
}

#[tokio::test]
async fn registers_with_the_schema_and_a_lease_of_ttl() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut client = etcd.client().await?;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let srv = server(&etcd.endpoint(), port, &["--weight", "300"])?;

    let (value, lease, _) = registered(&mut client, &key(&addr))
        .await
        .context(srv.log())?;
    assert_eq!(
        value,
        serde_json::json!({"addr": addr, "version": "1.4.2", "weight": 300}),
        "exactly the schema's value"
    );
    assert_ne!(lease, 0, "the key is on a lease");
    let ttl = client.lease_time_to_live(lease, None).await?;
    assert_eq!(ttl.granted_ttl(), TTL as i64);
    assert!(ttl.ttl() > 0);

    // etcdctl sees the same thing: one key, JSON value.
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.endpoint(), "get", "--prefix", "/ns/"])
        .output()?;
    let text = String::from_utf8(out.stdout)?;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0], key(&addr));
    let v: Value = serde_json::from_str(lines[1])?;
    assert_eq!(v["weight"], 300);

    assert_eq!(
        morning(port).await?,
        addr,
        "`from` is the advertised address"
    );

    // The lease is kept alive past its TTL.
    tokio::time::sleep(Duration::from_secs(TTL + 2)).await;
    let (_, lease_after, _) = read(&mut client, &key(&addr))
        .await
        .context("key expired")?;
    assert_eq!(lease_after, lease);
    Ok(())
}

#[tokio::test]
async fn comes_back_after_an_outside_delete() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut client = etcd.client().await?;
    let port = free_port();
    let k = key(&format!("127.0.0.1:{port}"));
    let srv = server(&etcd.endpoint(), port, &[])?;
    let (_, lease, _) = registered(&mut client, &k).await.context(srv.log())?;

    client.delete(k.as_str(), None).await?;
    let (_, lease2, _) = wait_key(
        &client,
        &k,
        Duration::from_secs(TTL),
        "re-registration",
        |_| true,
    )
    .await
    .context(srv.log())?;
    assert_eq!(lease2, lease, "the live lease is reused");
    Ok(())
}

#[tokio::test]
async fn comes_back_after_etcd_is_wiped() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    let port = free_port();
    let k = key(&format!("127.0.0.1:{port}"));
    let srv = server(&etcd.endpoint(), port, &[])?;
    let mut client = etcd.client().await?;
    let (_, old_lease, _) = registered(&mut client, &k).await.context(srv.log())?;

    // The wiped etcd forgets key and lease. (No check that the prefix is
    // empty right after: the server may already be back by then; CI saw it
    // win that race.)
    etcd.restart(true).await?;
    let mut client = etcd.client().await?;
    let (value, lease, _) = registered(&mut client, &k).await.context(srv.log())?;
    assert_ne!(lease, 0);
    assert_ne!(lease, old_lease, "registered again on a new lease");
    assert_eq!(value["weight"], 100);
    let ttl = client.lease_time_to_live(lease, None).await?;
    assert!(
        ttl.ttl() > 0,
        "a fresh lease etcd knows (old one was {old_lease})"
    );

    // Same data: the key survives and stays on a live lease.
    etcd.restart(false).await?;
    let mut client = etcd.client().await?;
    registered(&mut client, &k).await.context(srv.log())?;
    tokio::time::sleep(Duration::from_secs(TTL + 1)).await;
    read(&mut client, &k)
        .await
        .context("key lost after a restart with data")?;
    Ok(())
}

#[tokio::test]
async fn serves_while_etcd_is_down_and_registers_when_it_answers() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    etcd.stop();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let srv = server(&etcd.endpoint(), port, &[])?;
    let from = eventually(Duration::from_secs(10), "gRPC serving", || async {
        morning(port).await.ok()
    })
    .await?;
    assert_eq!(from, addr);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        srv.log().contains("retrying"),
        "says so in the log:\n{}",
        srv.log()
    );

    etcd.restart(false).await?;
    let mut client = etcd.client().await?;
    registered(&mut client, &key(&addr))
        .await
        .context(srv.log())?;
    Ok(())
}

#[tokio::test]
async fn sigterm_drains_finishes_in_flight_calls_and_deregisters() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut client = etcd.client().await?;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let k = key(&addr);
    let mut srv = server(
        &etcd.endpoint(),
        port,
        &["--latency", "2500ms", "--drain", "1500ms"],
    )?;
    registered(&mut client, &k).await.context(srv.log())?;

    let mut greet = GreetClient::connect(format!("http://{addr}")).await?;
    let call = tokio::spawn(async move {
        greet
            .night(GreetRequest {
                name: "in-flight".into(),
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    srv.signal(Signal::SIGTERM)?;

    wait_key(
        &client,
        &k,
        Duration::from_secs(3),
        "weight 0 while draining",
        |(v, _, _)| v["weight"] == 0,
    )
    .await
    .context(srv.log())?;
    assert!(srv.is_running(), "still serving during the drain");

    let code = srv.wait_exit(Duration::from_secs(15)).await?;
    assert_eq!(code, Some(0), "{}", srv.log());
    assert!(
        read(&mut client, &k).await.is_none(),
        "key gone when the process has exited"
    );
    let reply = call.await??.into_inner();
    assert_eq!(reply.message, "Good night, in-flight");
    assert_eq!(reply.from, addr);
    let log = srv.log();
    let drain = log.find("draining").context("drain logged")?;
    let revoke = log.find("deregistered").context("revoke logged")?;
    assert!(drain < revoke, "drain before deregistration:\n{log}");
    Ok(())
}

#[tokio::test]
async fn a_second_signal_exits_at_once() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut client = etcd.client().await?;
    let port = free_port();
    let mut srv = server(&etcd.endpoint(), port, &["--drain", "60s"])?;
    registered(&mut client, &key(&format!("127.0.0.1:{port}")))
        .await
        .context(srv.log())?;
    srv.signal(Signal::SIGTERM)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(srv.is_running());
    srv.signal(Signal::SIGINT)?;
    let code = srv.wait_exit(Duration::from_secs(5)).await?;
    assert_eq!(code, Some(130));
    Ok(())
}

#[tokio::test]
async fn fencing_a_second_process_never_overwrites_a_live_owner() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut client = etcd.client().await?;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let k = key(&addr);
    let mut first = server(&etcd.endpoint(), port, &["--weight", "10"])?;
    let (_, owner, rev) = registered(&mut client, &k).await.context(first.log())?;

    let second = server(
        &etcd.endpoint(),
        free_port(),
        &["--advertise", &addr, "--weight", "20"],
    )?;
    eventually(
        Duration::from_secs(10),
        "the conflict to be logged",
        || async {
            second
                .log()
                .contains("owned by another live lease")
                .then_some(())
        },
    )
    .await
    .context(second.log())?;
    tokio::time::sleep(Duration::from_secs(TTL)).await;
    let (value, lease, rev_now) = read(&mut client, &k).await.context("key lost")?;
    assert_eq!(lease, owner, "lease unchanged");
    assert_eq!(rev_now, rev, "not rewritten");
    assert_eq!(value["weight"], 10);

    first.kill();
    let (value, lease, _) = wait_key(
        &client,
        &k,
        Duration::from_secs(TTL + 2),
        "the second process to take over",
        move |(_, l, _)| *l != owner,
    )
    .await
    .context(second.log())?;
    assert_ne!(lease, 0);
    assert_eq!(value["weight"], 20, "the second process's value");
    Ok(())
}

#[tokio::test]
async fn bad_flags_exit_with_code_2_and_a_message() -> Result<()> {
    for args in [
        &["--weight", "abc"][..],
        &["--ttl", "1s"],
        &["--listen", "0.0.0.0:3000"],
        &["--no-such-flag"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_greet-server"))
            .args(args)
            .output()?;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error"), "{args:?}: {err}");
    }
    Ok(())
}
