//! Scenario 9: tails. Three greet-servers at `--latency 1ms`, each
//! stalling 1 % of its calls (at random) for 100 ms (`--stall-ratio 0.01
//! --stall 100ms`); our balancer with hedging off and on, alternated, at
//! concurrency 16, after a floor: three more servers that never stall,
//! hedging off (the tail this machine gives without stalls, the best any
//! hedging could reach). Prints calls/s, p50, p99, p99.9, attempts per call
//! counted at the servers (their `grpc_server_started_total` for Morning,
//! scraped from `--metrics-listen`: hedges and retries included, the
//! cancelled losers too) and by the client (`lb_attempts_total`), and
//! hedges sent and won.

use std::time::Duration;

use anyhow::Result;
use etcd_lb::metrics::ClientMetrics;
use etcd_lb::{Balancer, BalancerConfig, HedgingConfig, RetryPolicy};
use etcd_lb_registry::schema::Addr;
use etcd_lb_testkit::{free_port, Etcd, Proc};
use greet_proto::paths::{MORNING, NIGHT};
use greet_proto::{GreetClient, GreetRequest};
use hdrhistogram::Histogram;
use prometheus_client::registry::Registry;

use crate::stats::Table;
use crate::uneven::{server, wait_answering};

/// Sum of the samples of `name` in `registry`.
fn total(registry: &Registry, name: &str) -> f64 {
    let mut text = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The hedging settings: the defaults, or `BENCH_HEDGE_QUANTILE` for
/// tuning runs (printed).
fn hedging_config() -> HedgingConfig {
    let mut c = HedgingConfig::default();
    if let Some(q) = std::env::var("BENCH_HEDGE_QUANTILE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        c.quantile = q;
    }
    c
}

/// The 1-minute load average, to say how quiet the machine was.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

/// Morning calls each server started, from its `/metrics`.
async fn started_at_each(metrics: &[std::net::SocketAddr]) -> Result<Vec<f64>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut each = Vec::new();
    for addr in metrics {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        each.push(
            text.lines()
                .filter(|l| l.starts_with("grpc_server_started_total{") && l.contains("Morning"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>(),
        );
    }
    Ok(each)
}

struct Run {
    server_attempts: f64,
    calls: u64,
    rps: f64,
    errors: u64,
    hist: Histogram<u64>,
    attempts: f64,
    hedges: f64,
    won: f64,
    /// Morning's hedging delay at the end of the run.
    delay: Option<Duration>,
    /// Each server's share of the attempts it started.
    shares: Vec<f64>,
}

async fn run_one(
    fleet: &[Addr],
    metrics: &[std::net::SocketAddr],
    hedging: bool,
    secs: f64,
    weights: &[u32],
) -> Result<Run> {
    let mut registry = Registry::default();
    let bal = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        hedging: hedging.then(hedging_config),
        metrics: Some(ClientMetrics::register(&mut registry)),
        ..BalancerConfig::new("greet_service")
    });
    for (a, w) in fleet.iter().zip(weights) {
        bal.upsert(a, *w, "");
    }
    let call = |c: &mut GreetClient<Balancer>| {
        let mut req = tonic::Request::new(GreetRequest {
            name: "tail".into(),
        });
        req.set_timeout(Duration::from_secs(5));
        let mut c = c.clone();
        async move { c.morning(req).await }
    };
    // Warm-up (and the hedging delay's first answers).
    let mut c = GreetClient::new(bal.clone());
    for _ in 0..200 {
        let _ = call(&mut c).await;
    }
    let s0 = started_at_each(metrics).await?;
    let (a0, h0, w0) = (
        total(&registry, "lb_attempts_total{"),
        total(&registry, "lb_hedges_total{"),
        total(&registry, "lb_hedges_won_total{"),
    );
    let timed = crate::timed::drive(
        GreetClient::new(bal.clone()),
        16,
        secs,
        Some(Duration::from_secs(5)),
    )
    .await;
    let mut run = Run {
        server_attempts: 0.0,
        calls: timed.calls,
        rps: timed.rps,
        errors: timed.errors,
        hist: timed.hist,
        attempts: 0.0,
        hedges: 0.0,
        won: 0.0,
        delay: bal.hedging_delay(MORNING),
        shares: Vec::new(),
    };
    // The losers' cancellations reach the servers a moment later.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s1 = started_at_each(metrics).await?;
    run.shares = s1.iter().zip(&s0).map(|(a, b)| a - b).collect();
    run.server_attempts = run.shares.iter().sum();
    for share in &mut run.shares {
        *share /= run.server_attempts.max(1.0);
    }
    run.attempts = total(&registry, "lb_attempts_total{") - a0;
    run.hedges = total(&registry, "lb_hedges_total{") - h0;
    run.won = total(&registry, "lb_hedges_won_total{") - w0;
    Ok(run)
}

/// Weights issue 34 holds uniform fleets to, to see what hedging does to
/// them.
const WEIGHTS: [[u32; 3]; 2] = [[9900, 50, 50], [100, 200, 300]];

/// Runs the scenario: `rounds` of floor, off, on, `secs` each; then the
/// floor fleet at each of [`WEIGHTS`], off and on.
pub async fn run(secs: f64, rounds: usize) -> Result<Table> {
    let etcd = Etcd::start().await?;
    let (stalling, stalling_metrics, _s) = fleet(&etcd, true).await?;
    let (steady, steady_metrics, _f) = fleet(&etcd, false).await?;
    let mut t = Table::new(
        "9. Tails: 1 % of calls stall 100 ms on every server (concurrency 16)",
        &[
            "fleet, hedging",
            "calls/s",
            "p50",
            "p99",
            "p99.9",
            "attempts/call (servers)",
            "attempts/call (client)",
            "hedges sent",
            "hedges won",
            "errors",
        ],
    );
    let mut merged: Vec<Option<Run>> = vec![None, None, None];
    let load_before = load_average();
    let mut cuts = Vec::new();
    let mut delays = Vec::new();
    for _ in 0..rounds {
        let mut p999 = [0u64; 3];
        for (i, (fleet, metrics, hedging)) in [
            (&steady, &steady_metrics, false),
            (&stalling, &stalling_metrics, false),
            (&stalling, &stalling_metrics, true),
        ]
        .into_iter()
        .enumerate()
        {
            let r = run_one(fleet, metrics, hedging, secs, &[100, 100, 100]).await?;
            p999[i] = r.hist.value_at_quantile(0.999);
            if hedging {
                delays.push(r.delay);
            }
            match &mut merged[i] {
                None => merged[i] = Some(r),
                Some(m) => {
                    m.rps = (m.rps * m.calls as f64 + r.rps * r.calls as f64)
                        / (m.calls + r.calls).max(1) as f64;
                    m.calls += r.calls;
                    m.errors += r.errors;
                    m.hist.add(&r.hist)?;
                    m.attempts += r.attempts;
                    m.server_attempts += r.server_attempts;
                    m.hedges += r.hedges;
                    m.won += r.won;
                }
            }
        }
        cuts.push((p999[1] as f64 / p999[2].max(1) as f64, p999[0], p999[2]));
    }
    let ms = |us: u64| format!("{:.2} ms", us as f64 / 1e3);
    for (i, name) in ["no stalls (floor), off", "stalling, off", "stalling, on"]
        .iter()
        .enumerate()
    {
        let Some(m) = &merged[i] else { continue };
        t.row(vec![
            (*name).to_owned(),
            format!("{:.0}", m.rps),
            ms(m.hist.value_at_quantile(0.5)),
            ms(m.hist.value_at_quantile(0.99)),
            ms(m.hist.value_at_quantile(0.999)),
            format!("{:.4}", m.server_attempts / m.calls.max(1) as f64),
            format!("{:.4}", m.attempts / m.calls.max(1) as f64),
            format!("{:.0}", m.hedges),
            format!("{:.0}", m.won),
            m.errors.to_string(),
        ]);
    }
    t.note(format!(
        "{rounds} rounds of floor, off, on, {secs} s each after 200 sequential warm-up calls; \
         attempts counted at the servers (grpc_server_started_total) and by the client (lb_attempts_total)"
    ));
    if let [Some(_), Some(off), Some(on)] = &merged[..] {
        let per_round: Vec<String> = cuts
            .iter()
            .map(|(cut, floor, on)| {
                format!(
                    "{cut:.1}x (on {:.2} ms, floor {:.2} ms)",
                    *on as f64 / 1e3,
                    *floor as f64 / 1e3
                )
            })
            .collect();
        t.note(format!(
            "p99.9 cut (stalling off / on): {:.1}x over all rounds; per round {}",
            off.hist.value_at_quantile(0.999) as f64
                / on.hist.value_at_quantile(0.999).max(1) as f64,
            per_round.join(", ")
        ));
    }
    let delays: Vec<String> = delays
        .iter()
        .map(|d| {
            d.map_or("none".into(), |d| {
                format!("{:.2} ms", d.as_secs_f64() * 1e3)
            })
        })
        .collect();
    t.note(format!(
        "Morning's hedging delay at the end of each hedged run: {}",
        delays.join(", ")
    ));
    t.note(format!(
        "load average (1 min) before / after: {load_before} / {}: the hedged tail is the \
         hedging delay plus a second attempt, both stretched on a machine shared with builds",
        load_average()
    ));
    // What hedges do to weights: they put load where the weights did not
    // send it.
    for weights in WEIGHTS {
        let mut seen = Vec::new();
        for hedging in [false, true] {
            let r = run_one(&steady, &steady_metrics, hedging, secs, &weights).await?;
            let shares: Vec<String> = r
                .shares
                .iter()
                .map(|s| format!("{:.2} %", s * 100.0))
                .collect();
            seen.push(format!(
                "hedging {}: {} ({:.2} % extra attempts)",
                if hedging { "on" } else { "off" },
                shares.join(" / "),
                (r.server_attempts / r.calls.max(1) as f64 - 1.0) * 100.0
            ));
        }
        let sum: u32 = weights.iter().sum();
        let want: Vec<String> = weights
            .iter()
            .map(|w| format!("{:.2} %", f64::from(*w) * 100.0 / f64::from(sum)))
            .collect();
        t.note(format!(
            "weights {} on the floor fleet ({}), shares of the attempts the servers started: {}",
            weights.map(|w| w.to_string()).join(":"),
            want.join(" / "),
            seen.join("; ")
        ));
    }
    t.note(format!("hedging: {:?}", hedging_config()));
    t.note("target (issue 34): p99.9 at least 10x lower with hedging, at most 5 % extra attempts");
    Ok(t)
}

/// Three greet-servers at `--latency 1ms` with `--metrics-listen`, stalling
/// 1 % of calls for 100 ms or never; answering when this returns.
async fn fleet(
    etcd: &Etcd,
    stalls: bool,
) -> Result<(Vec<Addr>, Vec<std::net::SocketAddr>, Vec<Proc>)> {
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let metrics: Vec<std::net::SocketAddr> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse())
        .collect::<Result<_, _>>()?;
    let procs: Vec<Proc> = ports
        .iter()
        .zip(&metrics)
        .map(|(p, m)| {
            let m = m.to_string();
            let mut args = vec!["--metrics-listen", m.as_str()];
            if stalls {
                args.extend(["--stall-ratio", "0.01", "--stall", "100ms"]);
            }
            server(etcd, *p, "1ms", &args)
        })
        .collect::<Result<_>>()?;
    let addrs: Vec<Addr> = ports
        .iter()
        .map(|p| Addr::new(&format!("127.0.0.1:{p}")))
        .collect::<Result<_, _>>()?;
    wait_answering(&addrs).await?;
    Ok((addrs, metrics, procs))
}
