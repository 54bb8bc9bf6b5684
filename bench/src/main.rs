//! greet-bench: the performance targets of DESIGN.md, measured side by side.
//!
//! `cargo run --release -p greet-bench -- all` starts its own etcd and
//! servers on loopback (scenario 6 runs the controller's own bench through
//! cargo) and prints one table per scenario (`--json` for
//! scripts). Benchmarks print numbers; they never pass or fail.

mod calls;
mod controller_view;
mod fleet;
mod h2sender;
mod hedging;
mod overhead;
mod propagation;
mod round_robin;
mod stats;
mod timed;
mod uneven;
mod weights;

use clap::{Parser, Subcommand};
use stats::Table;

/// The same allocator as greet-server and greet-client, so that what this
/// process measures of the balancer and the servers is what those binaries run.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmarks of the registry, resolver and balancer.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    scenario: Scenario,
    /// Print the tables as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds per load cell (server); the overhead scenario runs each
    /// cell as 8 interleaved rounds of a quarter of this.
    #[arg(long, global = true, default_value_t = 4.0)]
    secs: f64,
    /// Endpoints under one prefix for the scale scenario, and members of
    /// the controller scenario's largest rows.
    #[arg(long, global = true, env = "BENCH_MEMBERS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
    members: u64,
}

#[derive(Debug, Clone, Subcommand, PartialEq, Eq)]
enum Scenario {
    /// 1: balancer vs plain channel.
    Overhead,
    /// 2: weight accuracy, smoothness, picker cost.
    Weights,
    /// 3: etcd change -> balancer updated.
    Propagation,
    /// 4: SIGKILL/SIGTERM/new servers under load.
    Failover,
    /// 5: `--members` endpoints (default 100,000).
    Scale,
    /// 6: the controller's GET /services at 1,000, 10,000 and `--members`.
    Controller,
    /// 7: one server's throughput, idle CPU, memory.
    Server,
    /// 8: one 50 ms server among three: our pickers and tower's P2C.
    Uneven {
        /// F/H pairs per client.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// 9: 1 % of calls stall 100 ms: hedging off and on.
    Hedging {
        /// Off/on pairs.
        #[arg(long, default_value_t = 2)]
        rounds: usize,
    },
    /// 10: an operator's override -> the client's picker re-weighed.
    Overrides,
    /// Everything above.
    All,
    /// Serves Greet on a loopback port, printing its address (for `calls`).
    Serve,
    /// A fixed number of calls through one client variant, for counting
    /// instructions per call (`bench/instructions.sh`).
    Calls {
        /// The server (`serve` prints it).
        #[arg(long)]
        target: etcd_lb_registry::schema::Addr,
        /// Which client.
        #[arg(long, value_enum)]
        variant: calls::Variant,
        /// Calls after the warm-up.
        #[arg(long, default_value_t = 10_000)]
        calls: u64,
        /// Callers at once.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// A `grpc-timeout` on every call, as greet-client sets (e.g. `1s`).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    etcd_lb_registry::logging::init(etcd_lb_registry::logging::LogFormat::Text);
    match &args.scenario {
        Scenario::Serve => return calls::serve().await,
        Scenario::Calls {
            target,
            variant,
            calls: n,
            concurrency,
            timeout,
        } => return calls::run(target, *variant, *n, *concurrency, *timeout).await,
        _ => {}
    }
    let want = |s: Scenario| args.scenario == s || args.scenario == Scenario::All;
    let mut tables: Vec<Table> = Vec::new();
    let mut emit = |t: Table| {
        if !args.json {
            print!("{}", t.render());
        }
        tables.push(t);
    };
    if want(Scenario::Overhead) {
        emit(overhead::run(args.secs, &[1, 16, 64]).await?);
    }
    if want(Scenario::Weights) {
        for t in weights::run() {
            emit(t);
        }
    }
    if want(Scenario::Propagation) {
        emit(propagation::propagation(1000).await?);
    }
    if want(Scenario::Overrides) {
        emit(propagation::overrides(1000).await?);
    }
    if want(Scenario::Failover) {
        emit(fleet::failover(20, 64).await?);
    }
    if want(Scenario::Scale) {
        emit(propagation::scale(args.members as usize).await?);
    }
    if want(Scenario::Controller) {
        emit(controller_view::run(
            args.secs.max(5.0),
            args.members as usize,
        )?);
    }
    if want(Scenario::Server) {
        emit(fleet::server_side(args.secs).await?);
    }
    match args.scenario {
        Scenario::Uneven { rounds } => emit(uneven::run(args.secs, rounds).await?),
        Scenario::Hedging { rounds } => emit(hedging::run(args.secs, rounds).await?),
        Scenario::All => {
            emit(uneven::run(args.secs, 2).await?);
            emit(hedging::run(args.secs, 2).await?);
        }
        _ => {}
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tables)?);
    }
    Ok(())
}
