//! Command-line flags (each with an env fallback) and the validated config.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use etcd_lb_registry::etcd::EtcdArgs;
use etcd_lb_registry::logging::LogFormat;
use etcd_lb_registry::schema::{Addr, ServiceName, DEFAULT_ROOT, MAX_WEIGHT};

/// A Greet gRPC server that registers itself in etcd.
///
/// It puts `/ns/<service>/<advertise>` with the JSON value
/// `{"addr","version","weight"}` on a lease it keeps alive, registers again
/// whenever the key vanishes, and never overwrites a key another live
/// process owns. On SIGTERM or SIGINT it drains (weight 0) for `--drain`,
/// stops accepting, finishes in-flight calls, revokes its lease and exits 0;
/// a second signal exits at once.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, env = "GREET_LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// Address registered in etcd (in Kubernetes: the pod IP and port).
    /// Default: the listen address, which must then not be a wildcard.
    #[arg(long, env = "GREET_ADVERTISE", value_parser = parse_addr)]
    pub advertise: Option<Addr>,
    /// Service name: the key's middle segment.
    #[arg(long, env = "GREET_SERVICE", default_value = "greet_service", value_parser = parse_service)]
    pub service: ServiceName,
    /// Key root in etcd.
    #[arg(long, env = "GREET_PREFIX", default_value = DEFAULT_ROOT)]
    pub prefix: String,
    /// Relative share of calls (0..=10000; 0 registers as draining).
    #[arg(long, env = "GREET_WEIGHT", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(0..=MAX_WEIGHT as i64))]
    pub weight: u32,
    /// Version advertised in etcd.
    #[arg(long = "service-version", env = "GREET_SERVICE_VERSION", default_value = env!("CARGO_PKG_VERSION"))]
    pub service_version: String,
    /// Lease TTL (at least 2s; whole seconds).
    #[arg(long, env = "GREET_TTL", default_value = "10s", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// How long to keep serving at weight 0 before stopping, so every client
    /// has seen the drain.
    #[arg(long, env = "GREET_DRAIN", default_value = "2s", value_parser = humantime::parse_duration)]
    pub drain: Duration,
    /// Upper bound for in-flight calls to finish once accepting has stopped.
    #[arg(long, env = "GREET_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// Simulated work: each call waits this long before answering (for
    /// demos, load tests and shutdown tests; default none).
    #[arg(long, env = "GREET_LATENCY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// Fault injection: answer this share of calls (0..=1, spread evenly)
    /// with `--fail-code`, for tests and demos of retries, retry budgets
    /// and outlier detection. Default 0: never.
    #[arg(long, env = "GREET_FAIL_RATIO", default_value_t = 0.0, value_parser = parse_ratio)]
    pub fail_ratio: f64,
    /// Fault injection: the first N calls fail whatever the ratio.
    #[arg(long, env = "GREET_FAIL_FIRST", default_value_t = 0)]
    pub fail_first: u64,
    /// The gRPC code injected faults answer with (unavailable, internal,
    /// unknown, data-loss, resource-exhausted, ...: the names of gRPC's
    /// codes in lower case with dashes).
    #[arg(long, env = "GREET_FAIL_CODE", default_value = "unavailable", value_parser = parse_code)]
    pub fail_code: tonic::Code,
    /// Stalls: this share of calls (0..=1, drawn at random) waits `--stall`
    /// longer, a tail for tests and demos of hedging. Default 0: never.
    #[arg(long, env = "GREET_STALL_RATIO", default_value_t = 0.0, value_parser = parse_ratio)]
    pub stall_ratio: f64,
    /// How long a stalled call waits on top of `--latency`.
    #[arg(long, env = "GREET_STALL", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub stall: Duration,
    /// Threads that serve gRPC connections, each with its own runtime; a
    /// connection and its calls stay on one thread (no cross-thread
    /// wake-ups per call), and new connections go to the thread with the
    /// fewest. 0: one per CPU this process may use.
    #[arg(long, env = "GREET_IO_THREADS", default_value_t = 0)]
    pub io_threads: usize,
    /// Serve Prometheus metrics (`GET /metrics`) on this address; off when
    /// not given.
    #[arg(long, env = "GREET_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub tls: etcd_lb_registry::grpc_tls::ServerTlsArgs,
}

fn parse_addr(s: &str) -> Result<Addr, String> {
    Addr::new(s).map_err(|e| e.to_string())
}

fn parse_service(s: &str) -> Result<ServiceName, String> {
    ServiceName::new(s).map_err(|e| e.to_string())
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s}: want a share between 0 and 1")),
    }
}

fn parse_code(s: &str) -> Result<tonic::Code, String> {
    use tonic::Code::*;
    let code = match s.to_ascii_lowercase().replace('_', "-").as_str() {
        "ok" => Ok,
        "cancelled" | "canceled" => Cancelled,
        "unknown" => Unknown,
        "invalid-argument" => InvalidArgument,
        "deadline-exceeded" => DeadlineExceeded,
        "not-found" => NotFound,
        "already-exists" => AlreadyExists,
        "permission-denied" => PermissionDenied,
        "resource-exhausted" => ResourceExhausted,
        "failed-precondition" => FailedPrecondition,
        "aborted" => Aborted,
        "out-of-range" => OutOfRange,
        "unimplemented" => Unimplemented,
        "internal" => Internal,
        "unavailable" => Unavailable,
        "data-loss" => DataLoss,
        "unauthenticated" => Unauthenticated,
        _ => return Err(format!("{s}: not a gRPC status code name")),
    };
    if code == Ok {
        return Err("ok is not a failure".into());
    }
    std::result::Result::Ok(code)
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(2) {
        return Err(format!("{s} is below etcd's minimum lease TTL of 2s"));
    }
    if d.subsec_nanos() != 0 {
        return Err(format!("{s}: etcd leases have whole-second TTLs"));
    }
    Ok(d)
}

/// Validated settings for [`crate::run`].
#[derive(Debug, Clone)]
pub struct Config {
    /// Registered address; `None` means "the bound address".
    pub advertise: Option<Addr>,
    /// Service name.
    pub service: ServiceName,
    /// Key root, normalised (`/ns/`).
    pub root: String,
    /// Initial weight.
    pub weight: u32,
    /// Advertised version.
    pub version: String,
    /// Lease TTL.
    pub ttl: Duration,
    /// Drain period.
    pub drain: Duration,
    /// Bound for in-flight calls at shutdown.
    pub shutdown_timeout: Duration,
    /// Simulated work per call.
    pub latency: Duration,
    /// gRPC over TLS with this identity, when set.
    pub tls: Option<tonic::transport::ServerTlsConfig>,
    /// Where to serve `/metrics`; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Serving threads (at least 1).
    pub io_threads: usize,
    /// Injected faults: (ratio, first, code).
    pub fault: (f64, u64, tonic::Code),
    /// Stalls: (ratio, extra wait).
    pub stall: (f64, Duration),
}

impl Args {
    /// Checks what clap cannot check alone.
    ///
    /// # Errors
    /// A wildcard listen address without `--advertise`, or a bad prefix.
    pub fn config(&self) -> Result<Config, String> {
        if self.advertise.is_none() && self.listen.ip().is_unspecified() {
            return Err(format!(
                "--listen {} is a wildcard address: set --advertise to the address clients should dial",
                self.listen
            ));
        }
        let root =
            etcd_lb_registry::schema::normalize_root(&self.prefix).map_err(|e| e.to_string())?;
        Ok(Config {
            advertise: self.advertise.clone(),
            service: self.service.clone(),
            root,
            weight: self.weight,
            version: self.service_version.clone(),
            ttl: self.ttl,
            drain: self.drain,
            shutdown_timeout: self.shutdown_timeout,
            latency: self.latency,
            tls: self.tls.resolve()?,
            metrics_listen: self.metrics_listen,
            io_threads: crate::shards::resolve_threads(self.io_threads),
            fault: (self.fail_ratio, self.fail_first, self.fail_code),
            stall: (self.stall_ratio, self.stall),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("greet-server").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_the_original() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.listen.to_string(), "127.0.0.1:3000");
        assert_eq!(a.service.as_str(), "greet_service");
        assert_eq!(a.ttl, Duration::from_secs(10));
        assert_eq!(a.drain, Duration::from_secs(2));
        assert_eq!(a.weight, 100);
        let c = a.config().unwrap();
        assert!(c.advertise.is_none());
        assert_eq!(c.root, "/ns/");
        assert_eq!(c.io_threads, crate::shards::resolve_threads(0));
        assert!(c.io_threads >= 1);
        let c = parse(&["--io-threads", "3"]).unwrap().config().unwrap();
        assert_eq!(c.io_threads, 3);
    }

    #[test]
    fn bad_flags_are_rejected_with_usage_errors() {
        for bad in [
            &["--weight", "10001"][..],
            &["--weight", "-1"],
            &["--ttl", "1s"],
            &["--ttl", "2500ms"],
            &["--drain", "soon"],
            &["--service", "Bad/Name"],
            &["--advertise", "nope"],
            &["--listen", "1.2.3.4"],
            &["--log-format", "xml"],
            &["--etcd-cert", "c.pem"],
            &["--metrics-listen", "localhost"],
            &["--fail-ratio", "1.5"],
            &["--fail-code", "teapot"],
            &["--fail-code", "ok"],
            &["--stall-ratio", "2"],
            &["--stall", "soon"],
            &["--io-threads", "-1"],
            &["--io-threads", "many"],
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn wildcard_listen_needs_advertise() {
        let a = parse(&["--listen", "0.0.0.0:3000"]).unwrap();
        assert!(a.config().unwrap_err().contains("--advertise"));
        let a = parse(&["--listen", "0.0.0.0:3000", "--advertise", "10.0.0.7:3000"]).unwrap();
        assert_eq!(
            a.config().unwrap().advertise.unwrap().as_str(),
            "10.0.0.7:3000"
        );
    }

    #[test]
    fn endpoints_are_comma_separated() {
        let a = parse(&["--etcd-endpoints", "a:1,b:2"]).unwrap();
        assert_eq!(a.etcd.endpoints, ["a:1", "b:2"]);
    }
}
