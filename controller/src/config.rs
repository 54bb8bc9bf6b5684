//! Command-line flags (each with an env fallback) and the validated config.
//!
//! Clap checks types and ranges; [`Args::config`] checks what depends on
//! several flags at once (the election key must lie outside the watched
//! prefix, the probe timeout must fit in the probe interval, ...), so a
//! mistake stops the process at start-up with a usage error rather than
//! misbehaving later.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use etcd_lb_registry::etcd::EtcdArgs;
use etcd_lb_registry::logging::LogFormat;
use etcd_lb_registry::schema::DEFAULT_ROOT;

/// The default election key: outside `/ns/`, so the election is never
/// mistaken for a registration.
pub const DEFAULT_ELECTION_KEY: &str = "/greet-etcd/controller/leader";
/// Open `/services/stream` subscribers at most, unless configured.
pub const DEFAULT_MAX_STREAMS: usize = 100;

/// Keeps the registry in etcd honest and shows it over HTTP.
///
/// The controller watches every service under `--prefix`, probes each
/// registered endpoint with the standard gRPC health check (an UNIMPLEMENTED
/// answer, as from a server without a health service, counts as alive) and
/// deletes stale entries: endpoints that failed every probe for
/// `--dead-after`, lease-less keys whose address does not answer, and
/// invalid values older than `--dead-after`. Deletions compare the key's
/// mod revision, are bounded per pass, and stop altogether for a service
/// where most members look dead at once (the controller is then more
/// likely cut off than the fleet dead). Replicas elect one leader in etcd;
/// only the leader deletes, every replica serves the HTTP view:
/// `/services`, `/services/{name}`, `/services/stream`, `/healthz`,
/// `/readyz`, `/metrics` and a live page at `/`. With `--xds-listen`,
/// every replica also serves the registry over xDS (ADS), so any gRPC
/// client (`xds:///<service>`) or Envoy balances by the registry's weights;
/// `controller xds-bootstrap` prints the bootstrap file such a client needs.
#[derive(Debug, Clone, Parser)]
#[command(version, about, long_about)]
pub struct Args {
    /// A subcommand instead of running the controller.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Address the HTTP view listens on.
    #[arg(long, env = "CONTROLLER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where operator overrides live (outside the registry prefix).
    #[arg(long, global = true, env = "CONTROLLER_OVERRIDES_PREFIX", default_value = etcd_lb_registry::overrides::DEFAULT_ROOT)]
    pub overrides_prefix: String,
    /// Serve xDS (the v3 Aggregated Discovery Service, state of the world)
    /// on this address, e.g. `0.0.0.0:18000`; off when not given. Every
    /// replica serves it, leader or not.
    #[arg(long, env = "CONTROLLER_XDS_LISTEN")]
    pub xds_listen: Option<SocketAddr>,
    /// An HTTP client (a `/services/stream` reader above all) whose
    /// connection takes no bytes for this long while a write waits is
    /// disconnected, freeing what was queued for it.
    #[arg(long, env = "CONTROLLER_HTTP_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_positive)]
    pub http_write_timeout: Duration,
    /// Most xDS (ADS) streams open at once over all connections; past it
    /// a new stream is refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "CONTROLLER_XDS_MAX_STREAMS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub xds_max_streams: u32,
    /// Most xDS streams on one HTTP/2 connection (its
    /// SETTINGS_MAX_CONCURRENT_STREAMS).
    #[arg(long, env = "CONTROLLER_XDS_MAX_STREAMS_PER_CONNECTION", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub xds_max_streams_per_connection: u32,
    /// An xDS client that takes no response for this long while one waits
    /// is disconnected (a stuck subscriber costs bounded memory meanwhile).
    #[arg(long, env = "CONTROLLER_XDS_WRITE_TIMEOUT", default_value = "30s", value_parser = parse_positive)]
    pub xds_write_timeout: Duration,
    /// Key root watched in etcd (every service under it).
    #[arg(long, env = "CONTROLLER_PREFIX", default_value = DEFAULT_ROOT)]
    pub prefix: String,
    /// Time between probe passes.
    #[arg(long, env = "CONTROLLER_PROBE_INTERVAL", default_value = "2s", value_parser = parse_positive)]
    pub probe_interval: Duration,
    /// How long one health check may take before it counts as failed.
    #[arg(long, env = "CONTROLLER_PROBE_TIMEOUT", default_value = "1s", value_parser = parse_positive)]
    pub probe_timeout: Duration,
    /// An endpoint failing every probe for this long is stale; so is an
    /// invalid value that stays invalid this long.
    #[arg(long, env = "CONTROLLER_DEAD_AFTER", default_value = "10s", value_parser = parse_positive)]
    pub dead_after: Duration,
    /// Most deletions per service and pass: a count (`3`) or a share of the
    /// service's members (`15%`); always at least 1.
    #[arg(long, env = "CONTROLLER_MAX_DELETIONS_PER_PASS", default_value = "15%", value_parser = parse_budget)]
    pub max_deletions_per_pass: Budget,
    /// When more than this share of a service's members look dead in one
    /// pass, delete nothing for that service (safety valve); when more
    /// than this share of all members across services do, delete nothing
    /// at all (global valve).
    #[arg(long, env = "CONTROLLER_MAX_UNHEALTHY_RATIO", default_value_t = 0.5, value_parser = parse_ratio)]
    pub max_unhealthy_ratio: f64,
    /// Election key (name) in etcd; replicas sharing it elect one leader.
    #[arg(long, env = "CONTROLLER_ELECTION_KEY", default_value = DEFAULT_ELECTION_KEY)]
    pub election_key: String,
    /// Lease TTL of the election: a dead leader is replaced within it.
    #[arg(long, env = "CONTROLLER_ELECTION_TTL", default_value = "10s", value_parser = parse_ttl)]
    pub election_ttl: Duration,
    /// Most probes in flight at once.
    #[arg(long, env = "CONTROLLER_PROBE_CONCURRENCY", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub probe_concurrency: u32,
    /// Most `/services/stream` subscribers at once; more get 503.
    #[arg(long, env = "CONTROLLER_MAX_STREAMS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_streams: u32,
    /// Upper bound for a graceful shutdown (HTTP streams, resignation).
    #[arg(long, env = "CONTROLLER_SHUTDOWN_TIMEOUT", default_value = "5s", value_parser = parse_positive)]
    pub shutdown_timeout: Duration,
    /// Readable part of this replica's identity (shown in `/readyz` and as
    /// the leader's id): in Kubernetes the pod name from the downward API;
    /// default the hostname. A random suffix is always added, so replicas
    /// started alike never share an identity.
    #[arg(long, env = "POD_NAME")]
    pub replica_name: Option<String>,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub tls: etcd_lb_registry::grpc_tls::ClientTlsArgs,
}

/// What the binary can do besides running the controller.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Print the xDS bootstrap JSON a gRPC client needs to resolve
    /// `xds:///<service>` through a controller: save it to a file and point
    /// `GRPC_XDS_BOOTSTRAP` at it.
    XdsBootstrap {
        /// `host:port` of a controller's `--xds-listen` (in Kubernetes the
        /// controller's Service, e.g. `controller:18000`).
        #[arg(long, env = "XDS_SERVER")]
        server: String,
        /// The client's node id, shown in the controller's logs; default
        /// `greet-etcd-client-<hostname>`.
        #[arg(long, env = "XDS_NODE_ID")]
        node_id: Option<String>,
        /// The client's node cluster (free text for the control plane).
        #[arg(long, env = "XDS_NODE_CLUSTER", default_value = "greet-etcd")]
        node_cluster: String,
    },
    /// Take an endpoint out of rotation without touching its server: no
    /// new calls (client library, xDS clients, Envoy), running calls
    /// finish. Applies to the registration there now unless --sticky.
    Drain {
        /// The service, e.g. `greet_service`.
        service: String,
        /// The endpoint, `host:port` as registered.
        addr: String,
        #[command(flatten)]
        how: OverrideArgs,
    },
    /// Remove an endpoint's override (drain or weight): the registered
    /// weight applies again.
    Undrain {
        /// The service.
        service: String,
        /// The endpoint.
        addr: String,
    },
    /// Give an endpoint another weight than it registered (0..=10000).
    Weight {
        /// The service.
        service: String,
        /// The endpoint.
        addr: String,
        /// The weight readers use instead of the registered one.
        weight: u32,
        #[command(flatten)]
        how: OverrideArgs,
    },
    /// List the overrides (of one service, or all) with the registered and
    /// effective weights and whether each applies.
    Overrides {
        /// Only this service.
        service: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// How an override is made (drain, weight).
#[derive(Debug, Clone, clap::Args)]
pub struct OverrideArgs {
    /// Why, shown with the override.
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Who; default the etcd user, else $USER.
    #[arg(long)]
    pub by: Option<String>,
    /// Lapses after this long (`30m`, `2h`); default: until removed.
    #[arg(long = "for", value_parser = parse_positive)]
    pub for_: Option<Duration>,
    /// Apply to any registration at the address (a host in maintenance
    /// stays drained across restarts), not only the one there now.
    #[arg(long)]
    pub sticky: bool,
    /// Write it even when nothing is registered there (pre-staged; sticky).
    #[arg(long)]
    pub force: bool,
}

/// The per-pass deletion budget of one service.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// At most this many (at least 1).
    Count(usize),
    /// At most this share of the service's members, rounded down, at
    /// least 1 (Eureka evicts at most 15 % per run).
    Percent(f64),
}

impl Budget {
    /// How many deletions a service with `members` members may have in one
    /// pass. Never 0: a single stale entry can always be removed.
    pub fn limit(&self, members: usize) -> usize {
        match *self {
            Self::Count(n) => n.max(1),
            Self::Percent(p) => ((members as f64 * p / 100.0).floor() as usize).max(1),
        }
    }
}

fn parse_budget(s: &str) -> Result<Budget, String> {
    let s = s.trim();
    if let Some(p) = s.strip_suffix('%') {
        let p: f64 = p
            .trim()
            .parse()
            .map_err(|_| format!("{s:?}: want a count like 3 or a share like 15%"))?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(format!("{s:?}: a share must be in (0%, 100%]"));
        }
        return Ok(Budget::Percent(p));
    }
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(Budget::Count(n)),
        _ => Err(format!(
            "{s:?}: want a count of at least 1 (like 3) or a share (like 15%)"
        )),
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?}: want a ratio between 0 and 1, like 0.5")),
    }
}

fn parse_positive(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(d)
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_positive(s)?;
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
    /// Key root, normalised (`/ns/`).
    pub root: String,
    /// Time between probe passes.
    pub probe_interval: Duration,
    /// Bound of one health check.
    pub probe_timeout: Duration,
    /// How long failures (or an invalid value) last before an entry is stale.
    pub dead_after: Duration,
    /// Deletions per service and pass.
    pub max_deletions_per_pass: Budget,
    /// Safety valve threshold.
    pub max_unhealthy_ratio: f64,
    /// Election name in etcd.
    pub election_key: String,
    /// Election lease TTL.
    pub election_ttl: Duration,
    /// Most probes in flight.
    pub probe_concurrency: usize,
    /// Most `/services/stream` subscribers at once.
    pub max_streams: usize,
    /// Bound of a graceful shutdown.
    pub shutdown_timeout: Duration,
    /// Probe servers over TLS verified with this configuration.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Readable part of the identity (default: the hostname).
    pub name: Option<String>,
    /// Where xDS is served; `None`: not at all.
    pub xds_listen: Option<SocketAddr>,
    /// The xDS server's stream caps and write timeout.
    pub xds_limits: crate::xds::Limits,
    /// See `--http-write-timeout`.
    pub http_write_timeout: Duration,
    /// Where operators' overrides live (`--overrides-prefix`).
    pub overrides_root: String,
}

impl Config {
    /// The defaults of the flags, with `root`; for tests and embedding.
    pub fn new(root: &str) -> Self {
        Self {
            root: root.to_owned(),
            probe_interval: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(1),
            dead_after: Duration::from_secs(10),
            max_deletions_per_pass: Budget::Percent(15.0),
            max_unhealthy_ratio: 0.5,
            election_key: DEFAULT_ELECTION_KEY.to_owned(),
            election_ttl: Duration::from_secs(10),
            probe_concurrency: 64,
            max_streams: DEFAULT_MAX_STREAMS,
            shutdown_timeout: Duration::from_secs(5),
            tls: None,
            name: None,
            xds_listen: None,
            xds_limits: crate::xds::Limits::default(),
            http_write_timeout: Duration::from_secs(30),
            overrides_root: etcd_lb_registry::overrides::DEFAULT_ROOT.to_owned(),
        }
    }
}

impl Args {
    /// The registry's root and the overrides' root, normalised, and checked
    /// not to overlap (overrides must live outside the registry, where no
    /// registrar or Go client treats them as addresses). The daemon and
    /// the operator's commands both start here.
    ///
    /// # Errors
    /// A bad prefix, or two that overlap.
    pub fn roots(&self) -> Result<(String, String), String> {
        let root = etcd_lb_registry::schema::normalize_root(&self.prefix)
            .map_err(|e| format!("--prefix: {e}"))?;
        let overrides_root = etcd_lb_registry::schema::normalize_root(&self.overrides_prefix)
            .map_err(|e| format!("--overrides-prefix: {e}"))?;
        if overrides_root.starts_with(&root) || root.starts_with(&overrides_root) {
            return Err(format!(
                "--overrides-prefix {overrides_root:?} overlaps --prefix {root:?}: overrides must live outside the registry"
            ));
        }
        Ok((root, overrides_root))
    }

    /// Checks what clap cannot check alone.
    ///
    /// # Errors
    /// A bad prefix, an election key inside the prefix, or a probe timeout
    /// longer than the probe interval.
    pub fn config(&self) -> Result<Config, String> {
        let (root, overrides_root) = self.roots()?;
        let election_key = self.election_key.trim().to_owned();
        if election_key.is_empty() {
            return Err("--election-key must not be empty".into());
        }
        if election_key.starts_with(&root) || root.starts_with(&election_key) {
            return Err(format!(
                "--election-key {election_key:?} overlaps --prefix {root:?}: the election would look like a registration"
            ));
        }
        if self.probe_timeout > self.probe_interval {
            return Err(format!(
                "--probe-timeout {:?} is longer than --probe-interval {:?}",
                self.probe_timeout, self.probe_interval
            ));
        }
        Ok(Config {
            root,
            probe_interval: self.probe_interval,
            probe_timeout: self.probe_timeout,
            dead_after: self.dead_after,
            max_deletions_per_pass: self.max_deletions_per_pass,
            max_unhealthy_ratio: self.max_unhealthy_ratio,
            election_key,
            election_ttl: self.election_ttl,
            probe_concurrency: self.probe_concurrency as usize,
            max_streams: self.max_streams as usize,
            shutdown_timeout: self.shutdown_timeout,
            tls: self.tls.resolve()?,
            name: self.replica_name.clone(),
            xds_listen: self.xds_listen,
            xds_limits: crate::xds::Limits {
                max_streams: self.xds_max_streams as usize,
                max_streams_per_connection: self.xds_max_streams_per_connection,
                write_timeout: self.xds_write_timeout,
            },
            http_write_timeout: self.http_write_timeout,
            overrides_root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("controller").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_the_issue() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.listen.to_string(), "127.0.0.1:8080");
        let c = a.config().unwrap();
        assert_eq!(c.root, "/ns/");
        assert_eq!(c.probe_interval, Duration::from_secs(2));
        assert_eq!(c.probe_timeout, Duration::from_secs(1));
        assert_eq!(c.dead_after, Duration::from_secs(10));
        assert_eq!(c.max_deletions_per_pass, Budget::Percent(15.0));
        assert_eq!(c.max_unhealthy_ratio, 0.5);
        assert_eq!(c.election_key, DEFAULT_ELECTION_KEY);
        assert_eq!(c.xds_listen, None, "xDS is off unless asked for");
        assert!(a.command.is_none());
    }

    #[test]
    fn xds_flag_and_bootstrap_subcommand() {
        let a = parse(&["--xds-listen", "0.0.0.0:18000", "--listen", "127.0.0.1:1"]).unwrap();
        assert_eq!(
            a.config().unwrap().xds_listen,
            Some("0.0.0.0:18000".parse().unwrap())
        );
        let a = parse(&["xds-bootstrap", "--server", "ctl:18000"]).unwrap();
        assert!(
            matches!(a.command, Some(Command::XdsBootstrap { ref server, .. }) if server == "ctl:18000")
        );
        assert_eq!(parse(&["xds-bootstrap"]).unwrap_err().exit_code(), 2);
        assert_eq!(parse(&["--xds-listen", "x"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn humane_durations_and_budgets() {
        let a = parse(&[
            "--probe-interval",
            "200ms",
            "--probe-timeout",
            "150ms",
            "--dead-after",
            "1m",
            "--max-deletions-per-pass",
            "3",
        ])
        .unwrap();
        let c = a.config().unwrap();
        assert_eq!(c.probe_interval, Duration::from_millis(200));
        assert_eq!(c.dead_after, Duration::from_secs(60));
        assert_eq!(c.max_deletions_per_pass, Budget::Count(3));
    }

    #[test]
    fn budgets_are_at_least_one() {
        let p = Budget::Percent(15.0);
        assert_eq!(p.limit(0), 1);
        assert_eq!(p.limit(3), 1);
        assert_eq!(p.limit(10), 1);
        assert_eq!(p.limit(20), 3);
        assert_eq!(p.limit(1000), 150);
        assert_eq!(Budget::Count(2).limit(1), 2);
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for bad in [
            &["--probe-interval", "0s"][..],
            &["--probe-interval", "soon"],
            &["--max-unhealthy-ratio", "1.5"],
            &["--max-unhealthy-ratio", "x"],
            &["--max-deletions-per-pass", "0"],
            &["--max-deletions-per-pass", "0%"],
            &["--max-deletions-per-pass", "150%"],
            &["--election-ttl", "1s"],
            &["--election-ttl", "2500ms"],
            &["--listen", "nowhere"],
            &["--log-format", "xml"],
        ] {
            assert_eq!(parse(bad).unwrap_err().exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn cross_flag_checks() {
        let a = parse(&["--election-key", "/ns/leader"]).unwrap();
        assert!(a.config().unwrap_err().contains("overlaps"));
        let a = parse(&["--probe-interval", "1s", "--probe-timeout", "2s"]).unwrap();
        assert!(a.config().unwrap_err().contains("--probe-timeout"));
        let a = parse(&["--prefix", "//"]).unwrap();
        assert!(a.config().is_err());
    }
}
