//! Benchmark: how fast registry changes reach xDS clients, and what many
//! subscribers cost the controller (issue 13, point 6). Prints tables;
//! asserts nothing.
//!
//! ```text
//! cargo build --release -p controller -p greet-server
//! cargo bench -p interop --bench xds
//! BENCH_SUBSCRIBERS=1000 BENCH_ROUNDS=20 cargo bench -p interop --bench xds
//! ```
//!
//! Set-up, all on loopback: a real etcd, three greet-servers at 100/200/300
//! and the controller binary with `--xds-listen` (the binaries next to this
//! bench's profile). Then:
//! - fan-out: `BENCH_SUBSCRIBERS` ADS streams (tonic clients in this
//!   process, one connection each) subscribe to the service's EDS; per
//!   round one etcd put changes a weight and the bench times, from just
//!   before the put, when each subscriber received it and when all had;
//!   the controller's RSS and CPU time (from /proc) give the cost per
//!   subscriber;
//! - grpcio: a server at weight 0 is put back to 100 and the time until
//!   grpcio's first call lands on it is taken (calls back to back, so the
//!   figure includes up to one call's time);
//! - Envoy: a weight is changed and Envoy's admin `/clusters` is polled
//!   until it shows the new weight.

#[path = "../tests/xds_common/mod.rs"]
mod xds_common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use envoy_types::pb::envoy::config::core::v3::{address, socket_address, Node};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use xds_common::{Fleet, Grpcio, SERVICE};

const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// (RSS in KiB, user+system CPU in seconds) of `pid`.
fn usage(pid: i32) -> Result<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are 12 and 13 after the ')'; in
    // USER_HZ (100 on Linux).
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok((rss, ticks as f64 / 100.0))
}

/// The weight of `addr` in an EDS response.
fn weight_of(cla: &ClusterLoadAssignment, addr: &str) -> Option<u32> {
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .find_map(|e| {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                return None;
            };
            let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref()?.address.as_ref()
            else {
                return None;
            };
            let Some(socket_address::PortSpecifier::PortValue(port)) = sa.port_specifier else {
                return None;
            };
            (format!("{}:{port}", sa.address) == addr)
                .then(|| e.load_balancing_weight.map_or(0, |w| w.value))
        })
}

/// One subscriber: reports (id, weight of `addr`, when) for every response.
async fn subscriber(
    id: usize,
    xds: String,
    addr: String,
    report: mpsc::UnboundedSender<(usize, u32, Instant)>,
) -> Result<()> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}")).await?;
    let (tx, rx) = mpsc::channel(4);
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let req = |version: String, nonce: String| DiscoveryRequest {
        node: Some(Node {
            id: format!("bench-{id}"),
            ..Default::default()
        }),
        type_url: EDS.into(),
        resource_names: vec![SERVICE.into()],
        version_info: version,
        response_nonce: nonce,
        ..Default::default()
    };
    tx.send(req(String::new(), String::new())).await?;
    while let Some(r) = stream.message().await? {
        let now = Instant::now();
        if let Some(cla) = r.resources.first() {
            let cla = ClusterLoadAssignment::decode(cla.value.as_slice())?;
            if let Some(w) = weight_of(&cla, &addr) {
                let _ = report.send((id, w, now));
            }
        }
        tx.send(req(r.version_info, r.nonce)).await?;
    }
    Ok(())
}

async fn bench() -> Result<()> {
    let subscribers = etcd_lb_testkit::env_u64("BENCH_SUBSCRIBERS", 1000)? as usize;
    let rounds = etcd_lb_testkit::env_u64("BENCH_ROUNDS", 20)? as usize;
    let fleet = Fleet::start("300s").await?;
    let pid = fleet.ctl.proc.pid().as_raw();
    let target = fleet.addr(0).to_owned();
    etcd_lb_testkit::eventually(Duration::from_secs(15), "xds listening", || async {
        std::net::TcpStream::connect(&fleet.ctl.xds).ok().map(drop)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss0, _) = usage(pid)?;

    // --- fan-out ----------------------------------------------------------
    let (rtx, mut rrx) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for id in 0..subscribers {
        tasks.push(tokio::spawn(subscriber(
            id,
            fleet.ctl.xds.clone(),
            target.clone(),
            rtx.clone(),
        )));
    }
    drop(rtx);
    let mut seen = vec![false; subscribers];
    let mut n = 0;
    let connect_start = Instant::now();
    while n < subscribers {
        let (id, _, _) = tokio::time::timeout(Duration::from_secs(60), rrx.recv())
            .await
            .context("subscribers did not all get their first response")?
            .context("every subscriber ended")?;
        if !std::mem::replace(&mut seen[id], true) {
            n += 1;
        }
    }
    let connected = connect_start.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss1, cpu1) = usage(pid)?;
    let mut all = Vec::new();
    let mut each = Vec::new();
    for r in 0..rounds {
        let w = 1000 + r as u32;
        let t0 = Instant::now();
        xds_common::set_weight(&fleet.etcd, &target, w).await?;
        let mut got = vec![false; subscribers];
        let mut n = 0;
        let mut last = t0;
        while n < subscribers {
            let (id, weight, at) = tokio::time::timeout(Duration::from_secs(30), rrx.recv())
                .await
                .context("a round did not reach every subscriber")?
                .context("subscribers ended")?;
            if weight == w && !std::mem::replace(&mut got[id], true) {
                n += 1;
                each.push(at - t0);
                last = last.max(at);
            }
        }
        all.push(last - t0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, cpu2) = usage(pid)?;
    all.sort();
    each.sort();
    let per_sub_kib = (rss1.saturating_sub(rss0)) as f64 / subscribers as f64;
    let cpu_per = (cpu2 - cpu1) / (rounds * subscribers) as f64;
    println!("\n## xDS fan-out: {subscribers} ADS subscribers, {rounds} weight changes\n");
    println!("| put -> all received p50 | p99 | max | put -> one subscriber p50 | p99 | all connected and served | controller RSS idle | with subscribers | per subscriber | controller CPU per update and subscriber |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {} | {} | {} | {} | {} | {} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.1} µs |",
        ms(pct(&all, 0.5)),
        ms(pct(&all, 0.99)),
        ms(*all.last().unwrap_or(&Duration::ZERO)),
        ms(pct(&each, 0.5)),
        ms(pct(&each, 0.99)),
        ms(connected),
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        per_sub_kib,
        cpu_per * 1e6,
    );
    for t in tasks {
        t.abort();
    }

    // --- grpcio: put -> picker changed -------------------------------------
    let grpcio_rounds = etcd_lb_testkit::env_u64("BENCH_CLIENT_ROUNDS", 20)? as usize;
    match Grpcio::start(&format!("xds:///{SERVICE}"), &fleet.bootstrap) {
        Err(e) => println!("\ngrpcio: skipped ({e})"),
        Ok(mut client) => {
            client
                .until(60, Duration::from_secs(30), "all picked", |b| {
                    (0..3).all(|i| b.count(fleet.addr(i)) > 0)
                })
                .await?;
            let mut lat = Vec::new();
            for _ in 0..grpcio_rounds {
                xds_common::set_weight(&fleet.etcd, &target, 0).await?;
                client
                    .until(100, Duration::from_secs(30), "drained", |b| {
                        b.count(&target) == 0
                    })
                    .await?;
                // Start calling, then put the weight back.
                let pending = {
                    let cmd = format!("until {target} 100000");
                    let fut = client.command(&cmd);
                    let put = async {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let t0 = SystemTime::now();
                        xds_common::set_weight(&fleet.etcd, &target, 100).await?;
                        anyhow::Ok(t0)
                    };
                    tokio::join!(fut, put)
                };
                let (v, t0) = (pending.0?, pending.1?);
                if let Some(at) = v["at"].as_f64() {
                    let t0 = t0.duration_since(UNIX_EPOCH)?.as_secs_f64();
                    lat.push(Duration::from_secs_f64((at - t0).max(0.0)));
                }
            }
            lat.sort();
            println!(
                "\n## etcd put -> grpcio 1.85.1 picks the endpoint ({} rounds)\n",
                lat.len()
            );
            println!("| p50 | p99 | max |\n| --- | --- | --- |");
            println!(
                "| {} | {} | {} |",
                ms(pct(&lat, 0.5)),
                ms(pct(&lat, 0.99)),
                ms(*lat.last().unwrap_or(&Duration::ZERO))
            );
        }
    }

    // --- Envoy: put -> endpoints changed ------------------------------------
    match xds_common::envoy_bin() {
        Err(e) => println!("\nenvoy: skipped ({e})"),
        Ok(_) => {
            let envoy = Arc::new(xds_common::envoy(fleet.dir.path(), &fleet.ctl.xds).await?);
            let mut lat = Vec::new();
            for r in 0..grpcio_rounds {
                let w = 500 + r as u32;
                let line = format!("{SERVICE}::{target}::weight::{w}");
                let t0 = Instant::now();
                xds_common::set_weight(&fleet.etcd, &target, w).await?;
                loop {
                    let body = envoy.get("/clusters").await?;
                    if body.lines().any(|l| l == line) {
                        lat.push(t0.elapsed());
                        break;
                    }
                    anyhow::ensure!(
                        t0.elapsed() < Duration::from_secs(30),
                        "envoy never showed {line}"
                    );
                }
            }
            lat.sort();
            println!("\n## etcd put -> Envoy 1.40.0 shows the new endpoint weight ({} rounds, admin /clusters polled back to back)\n", lat.len());
            println!("| p50 | p99 | max |\n| --- | --- | --- |");
            println!(
                "| {} | {} | {} |",
                ms(pct(&lat, 0.5)),
                ms(pct(&lat, 0.99)),
                ms(*lat.last().unwrap_or(&Duration::ZERO))
            );
        }
    }
    Ok(())
}
