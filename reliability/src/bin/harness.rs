//! The discovery robustness harness (issue 36): runs worlds under random
//! fault schedules drawn from seeds, records their histories and checks
//! them against the invariants in docs/robustness.md.
//!
//! `harness --seed 7 --runs 10 --duration 30s` runs seeds 7..=16; a failing
//! seed is rerun with `--seed <it> --runs 1`. Exit code 1 on any violation.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use reliability::checker::{check, Bounds};
use reliability::world::{calls_by_client, run, WorldConfig};
use tokio::signal::unix::{signal, SignalKind};

/// Runs random fault schedules against a small world on loopback (3 etcd
/// members, 3 greet-servers, 2 controller replicas, 2 in-process clients)
/// and checks the recorded histories.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The first run's seed; run n uses seed + n.
    #[arg(long, env = "HARNESS_SEED", default_value_t = 1)]
    seed: u64,
    /// How many runs.
    #[arg(long, env = "HARNESS_RUNS", default_value_t = 1)]
    runs: u64,
    /// How long faults are injected in each run (quiet time comes on top).
    #[arg(long, env = "HARNESS_DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Quiet time after the last fault, before the views are judged.
    #[arg(long, env = "HARNESS_QUIET", default_value = "8s", value_parser = humantime::parse_duration)]
    quiet: Duration,
    /// Write each run's history as JSON here (`<seed>.json`), and the
    /// controllers' logs (`<seed>-controller-<i>.log`).
    #[arg(long, env = "HARNESS_HISTORY_DIR")]
    history_dir: Option<PathBuf>,
    /// Run nothing: check the histories kept in this directory again (after
    /// a change of the checker).
    #[arg(long, conflicts_with = "history_dir")]
    recheck: Option<PathBuf>,
    /// Failpoints set in this process for every run (the in-process
    /// clients), `name=actions;...`, e.g.
    /// `watch-cut-mid-revision=20%return;etcd-slow-answer=10%return(300)`.
    /// Needs a build with failpoints (docs/robustness.md, "Failpoints").
    #[arg(long, env = "HARNESS_FAILPOINTS_CLIENTS", default_value = "")]
    failpoints_clients: String,
    /// `FAILPOINTS` of every greet-server, e.g.
    /// `keepalive-answer-lost=20%return`.
    #[arg(long, env = "HARNESS_FAILPOINTS_SERVERS", default_value = "")]
    failpoints_servers: String,
    /// `FAILPOINTS` of every controller replica.
    #[arg(long, env = "HARNESS_FAILPOINTS_CONTROLLERS", default_value = "")]
    failpoints_controllers: String,
    /// Add a grpcio client (python3) that gets its endpoints over xDS from
    /// the last controller replica; its calls are judged with the others'.
    #[arg(long, env = "HARNESS_XDS")]
    xds: bool,
}

/// Checks kept histories again; exit code 1 on any violation.
fn recheck(dir: &std::path::Path) -> Result<()> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    paths.sort();
    let mut failed = Vec::new();
    for p in &paths {
        let h: reliability::history::History = serde_json::from_slice(&std::fs::read(p)?)?;
        let r = check(&h, &Bounds::default());
        println!(
            "seed {}: faults {:?}; calls {}; controller deletions {}; violations {}",
            h.seed,
            h.faults_by_kind(),
            h.calls.len(),
            h.deletions.len(),
            r.violations.len()
        );
        for v in &r.violations {
            println!("  seed {}: {v}", h.seed);
        }
        if !r.violations.is_empty() {
            failed.push(h.seed);
        }
    }
    println!(
        "{} histories rechecked; violations in seeds {failed:?}",
        paths.len()
    );
    if !failed.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.recheck {
        return recheck(dir);
    }
    let mut failed = Vec::new();
    for seed in args.seed..args.seed + args.runs {
        let mut cfg = WorldConfig::new(seed, args.duration);
        cfg.quiet = args.quiet;
        cfg.log_dir = args.history_dir.clone();
        cfg.failpoints = reliability::failpoints::Failpoints {
            clients: args.failpoints_clients.clone(),
            servers: args.failpoints_servers.clone(),
            controllers: args.failpoints_controllers.clone(),
        };
        cfg.xds_client = args.xds;
        // SIGINT or SIGTERM drops the run (its processes are killed on
        // drop) and ends the batch.
        let mut term = signal(SignalKind::terminate())?;
        let outcome = tokio::select! {
            r = run(&cfg) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
            _ = term.recv() => None,
        };
        let Some(outcome) = outcome else {
            // The run's future, and with it its processes, is gone by now.
            println!("stopped by a signal in seed {seed}");
            std::process::exit(2);
        };
        let h = match outcome {
            Ok(h) => h,
            Err(e) => {
                println!("seed {seed}: the world failed (not judged): {e:#}");
                failed.push(seed);
                continue;
            }
        };
        if let Some(dir) = &args.history_dir {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(format!("{seed}.json")), serde_json::to_vec(&h)?)?;
        }
        let r = check(&h, &Bounds::default());
        let calls: usize = h.calls.len();
        let failed_calls = h.calls.iter().filter(|c| !c.ok).count();
        println!(
            "seed {seed}: faults {:?}; calls {calls} ({failed_calls} failed; by client {:?}); etcd events {}; view changes {}; controller deletions {}; failpoints fired {:?}; violations {}",
            h.faults_by_kind(),
            calls_by_client(&h),
            h.etcd.len(),
            h.views.len(),
            h.deletions.len(),
            h.failpoint_hits,
            r.violations.len()
        );
        for v in &r.violations {
            println!("  seed {seed}: {v}");
        }
        for s in &r.skipped {
            println!("  seed {seed}: skipped {s}");
        }
        if !r.violations.is_empty() {
            failed.push(seed);
        }
    }
    if !failed.is_empty() {
        println!("violations (or a failed world) in seeds {failed:?}");
        std::process::exit(1);
    }
    Ok(())
}
