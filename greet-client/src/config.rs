//! Command-line flags of the greet-client binary (each with an env fallback).

use std::time::Duration;

use clap::{Args as ClapArgs, Parser, Subcommand};
use etcd_lb::{HedgingConfig, OutlierConfig, Picker, RetryBudgetConfig};
use etcd_lb_registry::etcd::EtcdArgs;
use etcd_lb_registry::logging::LogFormat;
use etcd_lb_registry::schema::{ServiceName, DEFAULT_ROOT};
use semver::VersionReq;

/// Calls Greet on the servers registered in etcd, balanced by weight.
///
/// Default mode does what the original client did: every `--interval` call
/// Morning then Night and print the reply and which server answered. The
/// `bench` subcommand runs many calls in parallel and prints throughput,
/// latency percentiles and each endpoint's share against its weight.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub common: Common,
    /// Pause between rounds (Morning + Night) in the default mode.
    #[arg(long, env = "GREET_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Rounds to make in the default mode (default: forever).
    #[arg(long, env = "GREET_COUNT")]
    pub count: Option<u64>,
    /// Runtime worker threads that run the calls. 1 (the default): one,
    /// where a call's task, the balancer and the connections' tasks wake
    /// each other without a syscall; measured, it makes more calls per
    /// second than a worker per core when the servers share the cores
    /// (interop/bench-vs-go.sh). 0: one per CPU, for a client that is alone
    /// on a many-core machine.
    #[arg(long, global = true, env = "GREET_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
}

impl Args {
    /// The runtime `--worker-threads` asks for.
    ///
    /// # Errors
    /// The runtime could not be built (out of threads or descriptors).
    pub fn runtime(&self) -> std::io::Result<tokio::runtime::Runtime> {
        // A worker thread even for 1, not `current_thread`: a task woken by
        // another runs next (the worker's LIFO slot), so a request is
        // written as soon as its call is made. On `current_thread` it
        // waited behind every other ready task, and at concurrency 64 the
        // servers sat idle meanwhile: 1.7 of 2 cores busy against 1.9, and
        // fewer calls per second (measured when this default was chosen,
        // 62d79d4; the figures are in that commit's message, not the docs).
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if self.worker_threads > 0 {
            builder.worker_threads(self.worker_threads);
        }
        builder.enable_all().build()
    }
}

/// Flags shared by both modes (accepted before or after `bench`).
#[derive(Debug, Clone, ClapArgs)]
pub struct Common {
    /// Service to call.
    #[arg(long, global = true, env = "GREET_SERVICE", default_value = "greet_service", value_parser = parse_service)]
    pub service: ServiceName,
    /// Key root in etcd.
    #[arg(long, global = true, env = "GREET_PREFIX", default_value = DEFAULT_ROOT)]
    pub prefix: String,
    /// Name to greet.
    #[arg(long, global = true, env = "GREET_NAME", default_value = "JetWu")]
    pub name: String,
    /// Use only endpoints whose version matches this semver requirement
    /// (e.g. `^1.2`); non-semver versions never match.
    #[arg(long, global = true, env = "GREET_VERSION_REQ")]
    pub version_req: Option<VersionReq>,
    /// Ramp a newly seen endpoint from 10 % to 100 % of its weight over
    /// this window (off by default).
    #[arg(long, global = true, env = "GREET_SLOW_START", value_parser = humantime::parse_duration)]
    pub slow_start: Option<Duration>,
    /// Deadline of each call, retries included.
    #[arg(long, global = true, env = "GREET_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// How long an attempt of a retryable call runs before the client checks its connection
    /// with a health check: answered, it keeps waiting (slow is not dead);
    /// unanswered, the call is retried elsewhere (`0s` turns it off).
    #[arg(long, global = true, env = "GREET_PER_TRY_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub per_try_timeout: Duration,
    /// Retry budget: retries (of every kind) allowed per recent call, over
    /// a 10 s window; past it the original error returns at once.
    #[arg(long, global = true, env = "GREET_RETRY_BUDGET_RATIO", default_value_t = 0.1, value_parser = parse_ratio)]
    pub retry_budget_ratio: f32,
    /// Retry budget floor: retries per second allowed whatever the traffic.
    #[arg(
        long,
        global = true,
        env = "GREET_RETRY_BUDGET_MIN_PER_SEC",
        default_value_t = 5
    )]
    pub retry_budget_min_per_sec: u32,
    /// Outlier detection: server-sent failures (`UNAVAILABLE`, `INTERNAL`,
    /// `UNKNOWN`, `DATA_LOSS`) in a row that eject an endpoint; 0: never.
    #[arg(
        long,
        global = true,
        env = "GREET_OUTLIER_FAILURES",
        default_value_t = 5
    )]
    pub outlier_failures: u32,
    /// Outlier detection: the first ejection's length; the n-th in a row
    /// lasts n times this, at most ten times.
    #[arg(long, global = true, env = "GREET_OUTLIER_EJECTION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub outlier_ejection: Duration,
    /// Outlier detection: most endpoints ejected at once, in percent.
    #[arg(long, global = true, env = "GREET_OUTLIER_MAX_PERCENT", default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub outlier_max_percent: u8,
    /// How endpoints are picked: `ewma` is smooth weighted round-robin that
    /// passes over an endpoint far more loaded than another (its latency,
    /// a peak-sensitive moving average, times its calls in flight); `wrr`
    /// is smooth weighted round-robin alone, blind to load. Both keep the
    /// registered weights on a uniform fleet.
    #[arg(long, global = true, env = "GREET_PICKER", value_enum, default_value_t = PickerFlag::Ewma)]
    pub picker: PickerFlag,
    /// Hedging of Greet's (idempotent) calls: `on` sends a second attempt
    /// to another endpoint when the first has not answered within the
    /// 95th percentile of recent latency; the first answer wins, the other
    /// is cancelled; hedges are charged to the retry budget.
    #[arg(long, global = true, env = "GREET_HEDGING", value_enum, default_value_t = OnOff::Off)]
    pub hedging: OnOff,
    /// How long to wait for the first list from etcd before calling anyway.
    #[arg(long, global = true, env = "GREET_SYNC_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub sync_timeout: Duration,
    /// Serve Prometheus metrics (`GET /metrics`: per endpoint calls,
    /// errors by code, latency; retries; endpoints up and down; the view's
    /// age and revision) on this address; off when not given.
    #[arg(long, global = true, env = "GREET_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Log format.
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub tls: etcd_lb_registry::grpc_tls::ClientTlsArgs,
}

/// `--picker`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PickerFlag {
    /// Load-aware (latency and calls in flight against the weights).
    Ewma,
    /// Smooth weighted round-robin only.
    Wrr,
}

/// A switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// Modes.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Load mode: parallel calls, then a table (or JSON).
    Bench(Bench),
}

/// Load mode flags.
#[derive(Debug, Clone, ClapArgs)]
#[command(group(clap::ArgGroup::new("amount").required(true).args(["requests", "duration"])))]
pub struct Bench {
    /// Calls in flight at once.
    #[arg(long, env = "GREET_CONCURRENCY", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub concurrency: u64,
    /// Total calls.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
    /// Run for this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A finite, non-negative ratio of at most 1000 (the budget's clamp).
fn parse_ratio(s: &str) -> Result<f32, String> {
    match s.parse::<f32>() {
        Ok(r) if r.is_finite() && (0.0..=1000.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a ratio between 0 and 1000")),
    }
}

impl Common {
    /// The retry budget the flags ask for.
    pub fn retry_budget(&self) -> RetryBudgetConfig {
        RetryBudgetConfig {
            ratio: self.retry_budget_ratio,
            min_per_sec: self.retry_budget_min_per_sec,
            ..RetryBudgetConfig::default()
        }
    }

    /// The picker the flags ask for.
    pub fn picker(&self) -> Picker {
        match self.picker {
            PickerFlag::Ewma => Picker::default(),
            PickerFlag::Wrr => Picker::RoundRobin,
        }
    }

    /// The hedging the flags ask for; `None` when off.
    pub fn hedging(&self) -> Option<HedgingConfig> {
        (self.hedging == OnOff::On).then(HedgingConfig::default)
    }

    /// The outlier detection the flags ask for; `None` when turned off.
    pub fn outlier(&self) -> Option<OutlierConfig> {
        (self.outlier_failures > 0).then(|| OutlierConfig {
            consecutive_failures: self.outlier_failures,
            base_ejection_time: self.outlier_ejection,
            max_ejection_time: self.outlier_ejection.saturating_mul(10),
            max_ejection_percent: self.outlier_max_percent,
            ..OutlierConfig::default()
        })
    }
}

fn parse_service(s: &str) -> Result<ServiceName, String> {
    ServiceName::new(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("greet-client").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let a = parse(&[]).unwrap();
        assert!(a.command.is_none());
        assert_eq!(a.common.name, "JetWu");
        assert_eq!(a.interval, Duration::from_secs(1));
        assert_eq!(a.common.service.as_str(), "greet_service");
        assert!(a.count.is_none());
        let budget = a.common.retry_budget();
        assert_eq!((budget.ratio, budget.min_per_sec), (0.1, 5));
        let outlier = a.common.outlier().expect("on by default");
        assert_eq!(
            outlier.consecutive_failures,
            OutlierConfig::default().consecutive_failures
        );
        assert_eq!(outlier.max_ejection_percent, 50);
        assert_eq!(a.common.picker(), Picker::default());
        let wrr = parse(&["--picker", "wrr"]).unwrap();
        assert_eq!(wrr.common.picker(), Picker::RoundRobin);
        assert!(parse(&["--picker", "p2c"]).is_err());
        assert_eq!(a.common.hedging(), None);
        let on = parse(&["--hedging", "on"]).unwrap();
        assert_eq!(on.common.hedging(), Some(HedgingConfig::default()));
        assert!(parse(&["--hedging", "maybe"]).is_err());
    }

    #[test]
    fn budget_and_outlier_flags_reach_the_config() {
        let a = parse(&[
            "--retry-budget-ratio",
            "0.2",
            "--retry-budget-min-per-sec",
            "0",
            "--outlier-failures",
            "3",
            "--outlier-ejection",
            "2s",
            "--outlier-max-percent",
            "30",
        ])
        .unwrap();
        let budget = a.common.retry_budget();
        assert_eq!((budget.ratio, budget.min_per_sec), (0.2, 0));
        let o = a.common.outlier().unwrap();
        assert_eq!(o.consecutive_failures, 3);
        assert_eq!(o.base_ejection_time, Duration::from_secs(2));
        assert_eq!(o.max_ejection_time, Duration::from_secs(20));
        assert_eq!(o.max_ejection_percent, 30);
        assert!(parse(&["--outlier-failures", "0"])
            .unwrap()
            .common
            .outlier()
            .is_none());
    }

    #[test]
    fn bench_flags_and_global_flags_after_the_subcommand() {
        let a = parse(&[
            "bench",
            "--concurrency",
            "8",
            "--requests",
            "100",
            "--json",
            "--etcd-endpoints",
            "a:1,b:2",
            "--version-req",
            "^1.2",
        ])
        .unwrap();
        let Some(Command::Bench(b)) = a.command else {
            panic!("bench")
        };
        assert_eq!((b.concurrency, b.requests, b.json), (8, Some(100), true));
        assert_eq!(a.common.etcd.endpoints, ["a:1", "b:2"]);
        assert!(a.common.version_req.is_some());
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for bad in [
            &["--interval", "often"][..],
            &["--version-req", "not a req"],
            &["--service", "UPPER"],
            &["bench"],
            &["bench", "--requests", "0"],
            &["bench", "--concurrency", "0", "--requests", "5"],
            &["--count", "-1"],
            &["--retry-budget-ratio", "NaN"],
            &["--retry-budget-ratio", "-0.5"],
            &["--outlier-max-percent", "101"],
            &["--outlier-ejection", "soon"],
        ] {
            assert_eq!(parse(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn worker_threads_size_the_runtime() {
        let workers = |args: &[&str]| {
            parse(args)
                .unwrap()
                .runtime()
                .unwrap()
                .metrics()
                .num_workers()
        };
        assert_eq!(workers(&[]), 1);
        assert_eq!(
            workers(&["bench", "--requests", "1", "--worker-threads", "0"]),
            std::thread::available_parallelism().map_or(1, usize::from)
        );
        assert_eq!(workers(&["--worker-threads", "3"]), 3);
        assert!(parse(&["--worker-threads", "-1"]).is_err());
    }
}
