//! Scenarios 4 and 7 with real greet-server processes: failover under load,
//! and one server's own throughput, idle CPU and memory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use etcd_lb::{Balancer, BalancerConfig, Discovery, DiscoveryConfig, RetryPolicy};
use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_registry::schema::ServiceName;
use etcd_lb_testkit::{bin_path, free_port, Etcd, Proc};
use greet_proto::paths::{MORNING, NIGHT};
use greet_proto::{GreetClient, GreetRequest};
use nix::sys::signal::Signal;
use tokio_util::sync::CancellationToken;

use crate::overhead::drive;
use crate::stats::{cpu_seconds, rss_bytes, us, Table};

fn server(etcd: &Etcd, port: u16) -> Result<Proc> {
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--drain",
        "1s",
        "--ttl",
        "5s",
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

/// Scenario 4.
pub async fn failover(secs: u64, concurrency: usize) -> Result<Table> {
    let etcd = Etcd::start().await?;
    let mut servers: Vec<Proc> = (0..3)
        .map(|_| server(&etcd, free_port()))
        .collect::<Result<_>>()?;
    let cancel = CancellationToken::new();
    let balancer = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        ..BalancerConfig::new("greet_service")
    });
    let discovery = Discovery::spawn(
        EtcdConfig::plain([etcd.endpoint()]),
        DiscoveryConfig::new(ServiceName::new("greet_service")?),
        balancer.clone(),
        cancel.clone(),
    );
    discovery.wait_synced(Duration::from_secs(10)).await;
    while balancer.len() < 3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Per-second successes, failures and answering servers.
    type Second = (u64, u64, BTreeMap<String, u64>);
    let series: Arc<Mutex<Vec<Second>>> =
        Arc::new(Mutex::new(vec![Default::default(); secs as usize + 1]));
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let mut c = GreetClient::new(balancer.clone());
            let series = series.clone();
            tokio::spawn(async move {
                while Instant::now() < end {
                    let mut req = tonic::Request::new(GreetRequest {
                        name: "failover".into(),
                    });
                    req.set_timeout(Duration::from_secs(5));
                    let r = c.morning(req).await;
                    let sec = start.elapsed().as_secs() as usize;
                    let mut s = series.lock().unwrap_or_else(|e| e.into_inner());
                    let Some(slot) = s.get_mut(sec) else { continue };
                    match r {
                        Ok(resp) => {
                            slot.0 += 1;
                            *slot.2.entry(resp.into_inner().from).or_default() += 1;
                        }
                        Err(_) => slot.1 += 1,
                    }
                }
            })
        })
        .collect();
    let at = |frac: f64| start + Duration::from_secs_f64(secs as f64 * frac);
    tokio::time::sleep_until(at(0.25).into()).await;
    servers[0].kill();
    tokio::time::sleep_until(at(0.5).into()).await;
    servers[1].signal(Signal::SIGTERM)?;
    tokio::time::sleep_until(at(0.75).into()).await;
    let new_ports = [free_port(), free_port()];
    let started_new = Instant::now();
    let _new: Vec<Proc> = new_ports
        .iter()
        .map(|p| server(&etcd, *p))
        .collect::<Result<_>>()?;
    for t in tasks {
        let _ = t.await;
    }
    cancel.cancel();

    let s = series.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let failed: u64 = s.iter().map(|x| x.1).sum();
    let ok: u64 = s.iter().map(|x| x.0).sum();
    let new_addrs: Vec<String> = new_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let first_new = s
        .iter()
        .position(|x| new_addrs.iter().all(|a| x.2.contains_key(a)));
    let mut t = Table::new(
        format!("4. Failover under load: concurrency {concurrency}, {secs}s, 3 servers; SIGKILL one at 25%, SIGTERM another at 50%, two new at 75%"),
        &["second", "ok calls", "failed", "servers answering"],
    );
    for (i, x) in s.iter().enumerate().take(secs as usize) {
        t.row(vec![
            i.to_string(),
            x.0.to_string(),
            x.1.to_string(),
            x.2.len().to_string(),
        ]);
    }
    t.note(format!(
        "Calls: {ok} ok, {failed} failed (target 0 -> {}).",
        if failed == 0 { "met" } else { "MISSED" }
    ));
    t.note(match first_new {
        Some(sec) => format!(
            "Both new servers answered calls in second {sec} (they were started {:.1}s into the run).",
            (started_new - start).as_secs_f64()
        ),
        None => "The new servers took no calls before the end of the run.".into(),
    });
    Ok(t)
}

/// Scenario 7.
pub async fn server_side(secs: f64) -> Result<Table> {
    let etcd = Etcd::start().await?;
    let port = free_port();
    let p = server(&etcd, port)?;
    let pid = p.pid().as_raw() as u32;
    let channel = loop {
        match tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))?
            .tcp_nodelay(true)
            .connect()
            .await
        {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    drive(GreetClient::new(channel.clone()), 8, 0.5).await;
    let cell = drive(GreetClient::new(channel), 64, secs).await;
    let idle = 10.0;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let c0 = cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs_f64(idle)).await;
    let cpu = cpu_seconds(pid) - c0;
    let mut t = Table::new(
        "7. One greet-server (registered in etcd, TTL 5s): load at concurrency 64 from this process, then idle",
        &["measure", "value"],
    );
    t.row(vec![
        "throughput".into(),
        format!("{:.0} calls/s", cell.rps),
    ]);
    t.row(vec![
        "p50 / p99".into(),
        format!("{} / {}", us(cell.p50 as f64), us(cell.p99 as f64)),
    ]);
    t.row(vec!["errors".into(), cell.errors.to_string()]);
    t.row(vec![
        format!("idle CPU over {idle:.0}s"),
        format!("{:.2}% of one core", cpu / idle * 100.0),
    ]);
    t.row(vec![
        "resident memory".into(),
        format!("{:.1} MB", rss_bytes(Some(pid)) as f64 / 1e6),
    ]);
    Ok(t)
}
