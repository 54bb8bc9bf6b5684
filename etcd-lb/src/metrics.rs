//! Prometheus metrics of the balancer and its discovery, registered in a
//! registry the application owns: the library never opens a port (the
//! greet-client binary serves them on `--metrics-listen`).
//!
//! Per endpoint: attempts, attempts that ended in an error by gRPC code
//! (server-sent, or made up here for a connection that failed), attempt
//! latency, and how often the endpoint was taken out of rotation; with the
//! load-aware picker also its attempts in flight and its latency estimate
//! (the PeakEWMA the picker weighs, decayed to the last answer). Per
//! service: retries by reason, endpoints up and down, and the view's age and
//! revision. Series of an endpoint that left the registry are removed with
//! it, so a fleet that rolls does not grow the exposition forever.
//!
//! Counter names are registered without `_total`: prometheus-client adds the
//! suffix (and panics in debug builds when it is already there).
//!
//! ```
//! use std::sync::Arc;
//! use etcd_lb::{Balancer, BalancerConfig, metrics::ClientMetrics};
//! use prometheus_client::registry::Registry;
//!
//! let mut registry = Registry::default();
//! let metrics = ClientMetrics::register(&mut registry);
//! let balancer = Balancer::new(BalancerConfig {
//!     metrics: Some(metrics),
//!     eager_connect: false,
//!     ..BalancerConfig::new("greet_service")
//! });
//! balancer.upsert(&"127.0.0.1:3000".parse().unwrap(), 100, "1.0.0");
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
//! assert!(text.contains(r#"lb_endpoints{service="greet_service",state="up"} 1"#));
//! ```

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use etcd_lb_registry::grpc_status::{code_name, Report};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tonic::Code;

/// Attempt latency buckets (seconds): Prometheus' defaults, as
/// grpc-ecosystem's client metrics use.
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const ALL_CODES: [Code; 17] = [
    Code::Ok,
    Code::Cancelled,
    Code::Unknown,
    Code::InvalidArgument,
    Code::DeadlineExceeded,
    Code::NotFound,
    Code::AlreadyExists,
    Code::PermissionDenied,
    Code::ResourceExhausted,
    Code::FailedPrecondition,
    Code::Aborted,
    Code::OutOfRange,
    Code::Unimplemented,
    Code::Internal,
    Code::Unavailable,
    Code::DataLoss,
    Code::Unauthenticated,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    service: String,
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    service: String,
    endpoint: String,
    grpc_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    service: String,
    /// unsent (never reached a server), lost (sent, connection died),
    /// answered (a retryable code), silent (no answer within the per-try
    /// timeout).
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    service: String,
    /// up or down.
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    service: String,
    method: String,
}

/// Every metric of the client library.
#[derive(Debug)]
pub struct ClientMetrics {
    attempts: Family<EndpointLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    latency: Family<EndpointLabels, Histogram, fn() -> Histogram>,
    marked_down: Family<EndpointLabels, Counter>,
    ejections: Family<EndpointLabels, Counter>,
    ejected: Family<ServiceLabel, Gauge>,
    retries: Family<RetryLabels, Counter>,
    endpoints: Family<StateLabels, Gauge>,
    view_age: Family<ServiceLabel, Gauge<f64, AtomicU64>>,
    view_revision: Family<ServiceLabel, Gauge>,
    in_flight: Family<EndpointLabels, Gauge>,
    estimate: Family<EndpointLabels, Gauge<f64, AtomicU64>>,
    hedges: Family<ServiceLabel, Counter>,
    hedges_won: Family<ServiceLabel, Counter>,
    hedging_delay: Family<MethodLabels, Gauge<f64, AtomicU64>>,
}

/// Why a call went to another attempt (the `reason` label of
/// `lb_retries_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// Nothing reached a server.
    Unsent,
    /// Sent; the connection died before the answer.
    Lost,
    /// The server answered a retryable code.
    Answered,
    /// No answer within the per-try timeout.
    Silent,
}

impl RetryReason {
    fn label(self) -> &'static str {
        match self {
            Self::Unsent => "unsent",
            Self::Lost => "lost",
            Self::Answered => "answered",
            Self::Silent => "silent",
        }
    }
}

fn new_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

impl ClientMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let m = Self {
            attempts: Family::default(),
            errors: Family::default(),
            latency: Family::new_with_constructor(new_histogram as fn() -> Histogram),
            marked_down: Family::default(),
            ejections: Family::default(),
            ejected: Family::default(),
            retries: Family::default(),
            endpoints: Family::default(),
            view_age: Family::default(),
            view_revision: Family::default(),
            in_flight: Family::default(),
            estimate: Family::default(),
            hedges: Family::default(),
            hedges_won: Family::default(),
            hedging_delay: Family::default(),
        };
        registry.register(
            "lb_attempts",
            "Attempts sent to an endpoint (a retried call counts once per attempt)",
            m.attempts.clone(),
        );
        registry.register(
            "lb_attempt_errors",
            "Attempts that ended in an error, by gRPC code (server-sent, or Unavailable for a connection that failed)",
            m.errors.clone(),
        );
        registry.register(
            "lb_attempt_duration_seconds",
            "Time from sending an attempt until its answer (its response headers for streamed answers)",
            m.latency.clone(),
        );
        registry.register(
            "lb_endpoint_marked_down",
            "Times an endpoint was taken out of rotation for a connection-level failure",
            m.marked_down.clone(),
        );
        registry.register(
            "lb_endpoint_ejections",
            "Times outlier detection ejected an endpoint for failing calls in a row",
            m.ejections.clone(),
        );
        registry.register(
            "lb_ejected_endpoints",
            "Endpoints ejected by outlier detection now",
            m.ejected.clone(),
        );
        registry.register(
            "lb_retries",
            "Attempts after the first, by reason",
            m.retries.clone(),
        );
        registry.register(
            "lb_endpoints",
            "Endpoints the balancer knows, up (in rotation) or down",
            m.endpoints.clone(),
        );
        registry.register(
            "lb_endpoint_in_flight",
            "Attempts in flight on an endpoint (load-aware picker only)",
            m.in_flight.clone(),
        );
        registry.register(
            "lb_endpoint_latency_estimate_seconds",
            "An endpoint's latency estimate as the load-aware picker weighs it (peak-sensitive moving average, failures counted as a penalty), at its last answer",
            m.estimate.clone(),
        );
        registry.register(
            "lb_hedges",
            "Hedged attempts sent (a second attempt of a slow idempotent call, to another endpoint)",
            m.hedges.clone(),
        );
        registry.register(
            "lb_hedges_won",
            "Hedged attempts whose answer was the one used",
            m.hedges_won.clone(),
        );
        registry.register(
            "lb_hedging_delay_seconds",
            "How long an attempt of a hedged method runs before it is hedged (the configured quantile of the method's recent latency); NaN until enough answers are seen",
            m.hedging_delay.clone(),
        );
        registry.register(
            "lb_view_age_seconds",
            "Seconds since etcd last confirmed the view (an event or a progress notice)",
            m.view_age.clone(),
        );
        registry.register(
            "lb_view_revision",
            "The etcd revision the view reflects",
            m.view_revision.clone(),
        );
        Arc::new(m)
    }

    /// The handles a balancer keeps with one endpoint.
    pub(crate) fn endpoint(self: &Arc<Self>, service: &str, addr: &str) -> EndpointMetrics {
        let labels = EndpointLabels {
            service: service.to_owned(),
            endpoint: addr.to_owned(),
        };
        EndpointMetrics {
            attempts: self.attempts.get_or_create(&labels).clone(),
            latency: self.latency.get_or_create(&labels).clone(),
            in_flight: self.in_flight.get_or_create(&labels).clone(),
            estimate: self.estimate.get_or_create(&labels).clone(),
            labels,
            all: self.clone(),
        }
    }

    /// Removes every series of an endpoint that left.
    pub(crate) fn forget(&self, ep: &EndpointMetrics) {
        self.attempts.remove(&ep.labels);
        self.latency.remove(&ep.labels);
        self.marked_down.remove(&ep.labels);
        self.ejections.remove(&ep.labels);
        self.in_flight.remove(&ep.labels);
        self.estimate.remove(&ep.labels);
        for code in ALL_CODES {
            self.errors.remove(&ErrorLabels {
                service: ep.labels.service.clone(),
                endpoint: ep.labels.endpoint.clone(),
                grpc_code: code_name(code),
            });
        }
    }

    pub(crate) fn retry(&self, service: &str, reason: RetryReason) {
        self.retries
            .get_or_create(&RetryLabels {
                service: service.to_owned(),
                reason: reason.label(),
            })
            .inc();
    }

    /// The gauge of one hedged method's delay (`path`: `/pkg.Service/Method`),
    /// NaN until the method's record is warm.
    pub(crate) fn hedging_delay(&self, service: &str, path: &str) -> Gauge<f64, AtomicU64> {
        let g = self
            .hedging_delay
            .get_or_create(&MethodLabels {
                service: service.to_owned(),
                method: path.to_owned(),
            })
            .clone();
        g.set(f64::NAN);
        g
    }

    /// A hedge was sent (`won`: false), or won (true).
    pub(crate) fn hedge(&self, service: &str, won: bool) {
        let label = ServiceLabel {
            service: service.to_owned(),
        };
        if won {
            self.hedges_won.get_or_create(&label).inc();
        } else {
            self.hedges.get_or_create(&label).inc();
        }
    }

    /// Moves one endpoint between states (`None`: not known).
    pub(crate) fn transition(&self, service: &str, from: Option<bool>, to: Option<bool>) {
        let gauge = |up: bool| {
            self.endpoints
                .get_or_create(&StateLabels {
                    service: service.to_owned(),
                    state: if up { "up" } else { "down" },
                })
                .clone()
        };
        if let Some(up) = from {
            gauge(up).dec();
        }
        if let Some(up) = to {
            gauge(up).inc();
        }
    }

    pub(crate) fn view(&self, service: &str, age: Option<Duration>, revision: i64) {
        let label = ServiceLabel {
            service: service.to_owned(),
        };
        // Before the first sync the view has no age: NaN says "unknown"
        // where 0 would claim it is fresh.
        self.view_age
            .get_or_create(&label)
            .set(age.map_or(f64::NAN, |a| a.as_secs_f64()));
        self.view_revision.get_or_create(&label).set(revision);
    }
}

/// One endpoint's series, kept beside it in the pool so a call bumps
/// counters without building labels.
#[derive(Debug, Clone)]
pub(crate) struct EndpointMetrics {
    attempts: Counter,
    latency: Histogram,
    in_flight: Gauge,
    estimate: Gauge<f64, AtomicU64>,
    labels: EndpointLabels,
    all: Arc<ClientMetrics>,
}

impl EndpointMetrics {
    /// An attempt is about to be sent.
    pub(crate) fn attempt(&self) {
        self.attempts.inc();
    }

    /// An attempt got its answer after `took`; `code` when known.
    pub(crate) fn answered(&self, took: Duration, code: Option<Code>) {
        self.latency.observe(took.as_secs_f64());
        if let Some(code) = code {
            self.code(code);
        }
    }

    /// Records the final code of an attempt (errors only are counted).
    pub(crate) fn code(&self, code: Code) {
        if code != Code::Ok {
            self.all
                .errors
                .get_or_create(&ErrorLabels {
                    service: self.labels.service.clone(),
                    endpoint: self.labels.endpoint.clone(),
                    grpc_code: code_name(code),
                })
                .inc();
        }
    }

    /// Counts an attempt in flight until the guard is dropped.
    pub(crate) fn in_flight(&self) -> InFlightGauge {
        self.in_flight.inc();
        InFlightGauge(self.in_flight.clone())
    }

    /// The load-aware picker's latency estimate after an answer.
    pub(crate) fn estimate(&self, estimate: Duration) {
        self.estimate.set(estimate.as_secs_f64());
    }

    /// The endpoint was taken out of rotation.
    pub(crate) fn marked_down(&self) {
        self.all.marked_down.get_or_create(&self.labels).inc();
    }

    /// Outlier detection ejected the endpoint.
    pub(crate) fn ejected(&self) {
        self.all.ejections.get_or_create(&self.labels).inc();
        self.ejected_gauge().inc();
    }

    /// The endpoint's ejection ended (or it left while ejected).
    pub(crate) fn reinstated(&self) {
        self.ejected_gauge().dec();
    }

    fn ejected_gauge(&self) -> Gauge {
        self.all
            .ejected
            .get_or_create(&ServiceLabel {
                service: self.labels.service.clone(),
            })
            .clone()
    }
}

/// An attempt counted in `lb_endpoint_in_flight`.
#[derive(Debug)]
pub(crate) struct InFlightGauge(Gauge);

impl Drop for InFlightGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Report for EndpointMetrics {
    fn report(self, code: Code) {
        self.code(code);
    }
}
