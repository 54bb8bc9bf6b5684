//! The greet-client binary against a real etcd and real greet-servers:
//! weighted shares, fleet changes under load, mixed legacy fleets, etcd
//! outages.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use etcd_client::{Client, GetOptions};
use etcd_lb_testkit::{bin_path, eventually, free_port, Etcd, Proc};
use nix::sys::signal::Signal;
use serde_json::Value;

fn server(etcd: &Etcd, port: u16, weight: u32, extra: &[&str]) -> Result<Proc> {
    let mut args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--weight",
        &weight.to_string(),
        "--drain",
        "1s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(
        &format!("server:{port}"),
        bin_path("greet-server"),
        &args,
        &[],
    )
}

fn client(etcd: &Etcd, args: &[&str]) -> Result<Proc> {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend(["--etcd-endpoints".to_owned(), etcd.endpoint()]);
    Proc::spawn(
        "greet-client",
        env!("CARGO_BIN_EXE_greet-client"),
        &all,
        &[("RUST_LOG", "info")],
    )
}

async fn wait_registered(c: &Client, n: usize) -> Result<()> {
    eventually(Duration::from_secs(20), "servers to register", || {
        let mut c = c.clone();
        async move {
            let r = c
                .get("/ns/greet_service/", Some(GetOptions::new().with_prefix()))
                .await
                .ok()?;
            (r.kvs().len() == n).then_some(())
        }
    })
    .await
}

/// Runs the client's load mode to completion and parses its JSON report.
async fn bench(etcd: &Etcd, args: &[&str], limit: Duration) -> Result<Value> {
    let mut p = client(etcd, &[&["bench", "--json"], args].concat())?;
    let code = p.wait_exit(limit).await?;
    ensure!(code == Some(0), "client failed:\n{}", p.log());
    p.json_report()
}

fn calls_of(report: &Value, addr: &str) -> u64 {
    report["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["addr"] == addr)
        .and_then(|e| e["calls"].as_u64())
        .unwrap_or(0)
}

#[tokio::test]
async fn shares_follow_weights_over_30000_calls() -> Result<()> {
    let etcd = Etcd::start().await?;
    let c = etcd.client().await?;
    let ports = [free_port(), free_port(), free_port()];
    let _servers: Vec<Proc> = ports
        .iter()
        .zip([100, 200, 300])
        .map(|(p, w)| server(&etcd, *p, w, &[]))
        .collect::<Result<_>>()?;
    wait_registered(&c, 3).await?;

    let report = bench(
        &etcd,
        &["--concurrency", "16", "--requests", "30000"],
        Duration::from_secs(120),
    )
    .await?;
    assert_eq!(report["errors"], 0, "{report:#}");
    assert_eq!(report["calls"], 30000);
    for (port, expected) in ports.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
        let share = calls_of(&report, &format!("127.0.0.1:{port}")) as f64 / 30000.0;
        eprintln!("weight share {expected:.4}: {share:.4}");
        assert!(
            (share - expected).abs() <= 0.01,
            "127.0.0.1:{port}: share {share:.4}, expected {expected:.4}\n{report:#}"
        );
    }
    Ok(())
}

/// Issue 34, must-show 2: a skewed set keeps its weights too, with the
/// load-aware picker (the default): 9900:50:50 within 0.5 % absolute.
#[tokio::test]
async fn skewed_shares_follow_weights_over_30000_calls() -> Result<()> {
    let etcd = Etcd::start().await?;
    let c = etcd.client().await?;
    let ports = [free_port(), free_port(), free_port()];
    let _servers: Vec<Proc> = ports
        .iter()
        .zip([9900, 50, 50])
        .map(|(p, w)| server(&etcd, *p, w, &[]))
        .collect::<Result<_>>()?;
    wait_registered(&c, 3).await?;

    let report = bench(
        &etcd,
        &["--concurrency", "16", "--requests", "30000"],
        Duration::from_secs(120),
    )
    .await?;
    assert_eq!(report["errors"], 0, "{report:#}");
    for (port, expected) in ports.iter().zip([0.99, 0.005, 0.005]) {
        let share = calls_of(&report, &format!("127.0.0.1:{port}")) as f64 / 30000.0;
        eprintln!("weight share {expected:.4}: {share:.4}");
        assert!(
            (share - expected).abs() <= 0.005,
            "127.0.0.1:{port}: share {share:.4}, expected {expected:.4}\n{report:#}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn fleet_changes_under_load_lose_no_calls() -> Result<()> {
    let etcd = Etcd::start().await?;
    let c = etcd.client().await?;
    let ports = [free_port(), free_port(), free_port()];
    let mut servers: Vec<Proc> = ports
        .iter()
        .map(|p| server(&etcd, *p, 100, &[]))
        .collect::<Result<_>>()?;
    wait_registered(&c, 3).await?;

    let mut load = client(
        &etcd,
        &[
            "bench",
            "--json",
            "--concurrency",
            "16",
            "--duration",
            "12s",
        ],
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let new_port = free_port();
    let _new = server(&etcd, new_port, 100, &[])?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    servers[0].signal(Signal::SIGTERM)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    servers[1].kill();

    let code = load.wait_exit(Duration::from_secs(60)).await?;
    let log = load.log();
    ensure!(code == Some(0), "client failed:\n{log}");
    let report = load.json_report()?;
    assert_eq!(report["errors"], 0, "no call failed:\n{report:#}\n{log}");
    assert!(
        calls_of(&report, &format!("127.0.0.1:{new_port}")) > 0,
        "the new server took calls: {report:#}"
    );
    assert!(calls_of(&report, &format!("127.0.0.1:{}", ports[2])) > 0);
    assert_eq!(
        servers[0].wait_exit(Duration::from_secs(10)).await?,
        Some(0)
    );
    Ok(())
}

#[tokio::test]
async fn a_new_server_gets_traffic_soon_after_its_key_appears() -> Result<()> {
    let etcd = Etcd::start().await?;
    let c = etcd.client().await?;
    let _a = server(&etcd, free_port(), 100, &[])?;
    wait_registered(&c, 1).await?;
    let cl = client(&etcd, &["--interval", "50ms"])?;
    eventually(Duration::from_secs(10), "first replies", || async {
        cl.log().contains("Good night, JetWu").then_some(())
    })
    .await?;

    let port = free_port();
    let _b = server(&etcd, port, 100, &[])?;
    wait_registered(&c, 2).await?;
    let needle = format!("(from 127.0.0.1:{port})");
    eventually(
        Duration::from_secs(5),
        "calls answered by the new server",
        || async { cl.log().contains(&needle).then_some(()) },
    )
    .await
    .with_context(|| cl.log())?;
    assert!(!cl.log().contains("call failed"), "{}", cl.log());
    Ok(())
}

#[tokio::test]
async fn mixed_legacy_and_invalid_entries() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut c = etcd.client().await?;
    let json_port = free_port();
    let legacy_port = free_port();
    let _json = server(&etcd, json_port, 100, &[])?;
    // A server of the original kind: its address under greet_service with a
    // plain value (it registers its own JSON key under another service).
    let _legacy = server(&etcd, legacy_port, 100, &["--service", "elsewhere"])?;
    let legacy_addr = format!("127.0.0.1:{legacy_port}");
    c.put(
        format!("/ns/greet_service/{legacy_addr}"),
        legacy_addr.clone(),
        None,
    )
    .await?;
    let bad_addr = format!("127.0.0.1:{}", free_port());
    c.put(
        format!("/ns/greet_service/{bad_addr}"),
        r#"{"addr":"x","weight":"heavy"}"#,
        None,
    )
    .await?;
    wait_registered(&c, 3).await?;

    let mut p = client(&etcd, &["bench", "--json", "--requests", "6000"])?;
    assert_eq!(p.wait_exit(Duration::from_secs(60)).await?, Some(0));
    let log = p.log();
    let report = p.json_report()?;
    assert_eq!(report["errors"], 0, "{report:#}");
    let legacy = calls_of(&report, &legacy_addr) as f64 / 6000.0;
    let json = calls_of(&report, &format!("127.0.0.1:{json_port}")) as f64 / 6000.0;
    assert!((legacy - 0.5).abs() < 0.01, "legacy share {legacy}");
    assert!((json - 0.5).abs() < 0.01, "json share {json}");
    assert_eq!(calls_of(&report, &bad_addr), 0);
    assert!(
        log.contains("ignoring invalid registry entry") && log.contains(&bad_addr),
        "a warning names the key:\n{log}"
    );
    Ok(())
}

#[tokio::test]
async fn keeps_calling_through_an_etcd_outage_and_sees_changes_after() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    let c = etcd.client().await?;
    let _a = server(&etcd, free_port(), 100, &["--ttl", "30s"])?;
    let _b = server(&etcd, free_port(), 100, &["--ttl", "30s"])?;
    wait_registered(&c, 2).await?;
    let cl = client(&etcd, &["--interval", "100ms"])?;
    eventually(Duration::from_secs(10), "first replies", || async {
        cl.log().contains("Good night").then_some(())
    })
    .await?;

    etcd.stop();
    let before = cl.log().matches("Good morning").count();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = cl.log().matches("Good morning").count();
    assert!(
        during >= before + 10,
        "calls kept succeeding: {before} -> {during}"
    );
    assert!(!cl.log().contains("call failed"), "{}", cl.log());

    etcd.restart(false).await?;
    let port = free_port();
    let _c = server(&etcd, port, 100, &[])?;
    let needle = format!("(from 127.0.0.1:{port})");
    eventually(
        Duration::from_secs(20),
        "the new server after etcd's return",
        || async { cl.log().contains(&needle).then_some(()) },
    )
    .await
    .with_context(|| cl.log())?;
    assert!(!cl.log().contains("call failed"), "{}", cl.log());
    Ok(())
}
