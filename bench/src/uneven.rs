//! Scenario 8: an uneven fleet. Fleet F is three greet-servers at
//! `--latency 1ms`; fleet H is two of them and one at `--latency 50ms`, all
//! of equal weight. Each client runs F and H alternately (F, H, F, H) at
//! concurrency 16, so a slow spell of this shared machine hits both; the
//! figure is H's calls/s over F's. Three clients on the same servers: our
//! balancer with the load-aware picker (the default), with smooth WRR
//! alone, and tower's `p2c::Balance` over `PeakEwma` (linkerd's defaults:
//! 30 ms default RTT, 10 s decay; no weights) behind a `Buffer`, the anchor
//! a tonic user would reach for.

use std::time::{Duration, Instant};

use anyhow::Result;
use etcd_lb::{Balancer, BalancerConfig, Picker, RetryPolicy};
use etcd_lb_registry::schema::Addr;
use etcd_lb_testkit::{bin_path, free_port, Etcd, Proc};
use greet_proto::paths::{MORNING, NIGHT};
use greet_proto::{GreetClient, GreetRequest};
use tonic::transport::Channel;

use crate::stats::Table;

/// A greet-server process at `--latency latency`, with `extra` flags.
pub fn server(etcd: &Etcd, port: u16, latency: &str, extra: &[&str]) -> Result<Proc> {
    let mut args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--latency",
        latency,
        "--io-threads",
        "1",
        "--drain",
        "0s",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(
        &format!("server:{port}"),
        bin_path("greet-server"),
        &args,
        &[("RUST_LOG", "warn")],
    )
}

/// The load-aware picker's settings: the defaults, or for tuning runs
/// `BENCH_DECAY_MS`, `BENCH_DEVIATION`, `BENCH_FLOOR_US` (printed).
fn load_config() -> etcd_lb::LoadConfig {
    let mut c = etcd_lb::LoadConfig::default();
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<f64>().ok());
    if let Some(ms) = env("BENCH_DECAY_MS") {
        c.decay = Duration::from_secs_f64(ms / 1e3);
    }
    if let Some(k) = env("BENCH_DEVIATION") {
        c.deviation = k;
    }
    if let Some(us) = env("BENCH_FLOOR_US") {
        c.floor = Duration::from_secs_f64(us / 1e6);
    }
    c
}

/// One run of one client on one fleet.
struct Run {
    rps: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
    /// Share of the calls the 50 ms server answered.
    slow_share: f64,
}

/// Calls Morning for `secs` from `concurrency` callers; `slow` is the
/// address the slow server signs its answers with.
async fn drive<T>(client: GreetClient<T>, concurrency: usize, secs: f64, slow: &str) -> Run
where
    T: crate::timed::Transport,
{
    let run = crate::timed::drive(client, concurrency, secs, Some(Duration::from_secs(5))).await;
    Run {
        rps: run.rps,
        p50_us: run.hist.value_at_quantile(0.5),
        p99_us: run.hist.value_at_quantile(0.99),
        errors: run.errors,
        slow_share: run.share_of(slow),
    }
}

/// Our balancer over `fleet` with `picker`.
fn ours(fleet: &[Addr], picker: Picker) -> Balancer {
    let b = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        picker,
        ..BalancerConfig::new("greet_service")
    });
    for a in fleet {
        b.upsert(a, 100, "");
    }
    b
}

/// tower's P2C over PeakEWMA over one tonic `Channel` per server.
type Tower = tower::buffer::Buffer<
    http::Request<tonic::body::Body>,
    <tower::balance::p2c::Balance<
        tower::discover::ServiceList<Vec<tower::load::PeakEwma<Channel>>>,
        http::Request<tonic::body::Body>,
    > as tower::Service<http::Request<tonic::body::Body>>>::Future,
>;

async fn tower_p2c(fleet: &[Addr]) -> Result<Tower> {
    let mut services = Vec::new();
    for a in fleet {
        let ch = Channel::from_shared(a.uri())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        services.push(tower::load::PeakEwma::new(
            ch,
            Duration::from_millis(30),
            Duration::from_secs(10).as_nanos() as f64,
            tower::load::CompleteOnResponse::default(),
        ));
    }
    let balance = tower::balance::p2c::Balance::new(tower::discover::ServiceList::new(services));
    Ok(tower::buffer::Buffer::new(balance, 1024))
}

/// Runs the scenario: `secs` per run, `rounds` F/H pairs per client.
pub async fn run(secs: f64, rounds: usize) -> Result<Table> {
    let etcd = Etcd::start().await?;
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let _servers: Vec<Proc> = ports
        .iter()
        .zip(["1ms", "1ms", "1ms", "50ms"])
        .map(|(p, l)| server(&etcd, *p, l, &[]))
        .collect::<Result<_>>()?;
    let addrs: Vec<Addr> = ports
        .iter()
        .map(|p| Addr::new(&format!("127.0.0.1:{p}")))
        .collect::<Result<_, _>>()?;
    wait_answering(&addrs).await?;
    let fast_fleet = [addrs[0].clone(), addrs[1].clone(), addrs[2].clone()];
    let uneven = [addrs[0].clone(), addrs[1].clone(), addrs[3].clone()];
    let slow = addrs[3].as_str().to_owned();
    const CONCURRENCY: usize = 16;

    let mut t = Table::new(
        "8. Uneven fleet: one 50 ms server among three of equal weight (concurrency 16)",
        &[
            "client",
            "F calls/s",
            "H calls/s",
            "H/F",
            "H p50",
            "H p99",
            "errors",
            "H share of the 50 ms server",
        ],
    );
    for client in [
        "ours: load-aware (ewma)",
        "ours: smooth WRR",
        "tower p2c PeakEwma",
    ] {
        let (mut f, mut h) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            for (fleet, out) in [(&fast_fleet, &mut f), (&uneven, &mut h)] {
                let r = match client {
                    "tower p2c PeakEwma" => {
                        let c = GreetClient::new(tower_p2c(fleet).await?);
                        drive(c.clone(), CONCURRENCY, 0.5, &slow).await;
                        drive(c, CONCURRENCY, secs, &slow).await
                    }
                    name => {
                        let picker = if name.contains("WRR") {
                            Picker::RoundRobin
                        } else {
                            Picker::LoadAware(load_config())
                        };
                        let c = GreetClient::new(ours(fleet, picker));
                        drive(c.clone(), CONCURRENCY, 0.5, &slow).await;
                        drive(c, CONCURRENCY, secs, &slow).await
                    }
                };
                out.push(r);
            }
        }
        let mean = |v: &[Run], f: fn(&Run) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
        let (f_rps, h_rps) = (mean(&f, |r| r.rps), mean(&h, |r| r.rps));
        let worst_p99 = h.iter().map(|r| r.p99_us).max().unwrap_or(0);
        let p50 = h.iter().map(|r| r.p50_us).max().unwrap_or(0);
        let errors: u64 = f.iter().chain(&h).map(|r| r.errors).sum();
        t.row(vec![
            client.to_owned(),
            format!("{f_rps:.0}"),
            format!("{h_rps:.0}"),
            format!("{:.3}", h_rps / f_rps),
            format!("{:.2} ms", p50 as f64 / 1e3),
            format!("{:.2} ms", worst_p99 as f64 / 1e3),
            errors.to_string(),
            format!("{:.2} %", 100.0 * mean(&h, |r| r.slow_share)),
        ]);
    }
    t.note(format!(
        "{rounds} rounds of F then H per client, {secs} s each after 0.5 s of warm-up; calls/s \
         are means over rounds, p50/p99 the worst round's; greet-servers with --io-threads 1"
    ));
    t.note(format!("load-aware picker: {:?}", load_config()));
    t.note("target (issue 34): H/F >= 0.85, H p99 <= 10 ms, 0 errors, no worse than tower's P2C");
    Ok(t)
}

/// Waits until every server answers a call.
pub async fn wait_answering(addrs: &[Addr]) -> Result<()> {
    for a in addrs {
        let started = Instant::now();
        loop {
            let ok = async {
                let mut c = GreetClient::new(crate::overhead::plain_channel(a).await?);
                c.morning(GreetRequest { name: "up".into() }).await?;
                Ok::<_, anyhow::Error>(())
            };
            if ok.await.is_ok() {
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(20),
                "{a} never answered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}
