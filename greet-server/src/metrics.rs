//! Prometheus metrics of the server: every call by method and code, under
//! the names grpc-ecosystem's interceptors use (`grpc_server_started_total`,
//! `grpc_server_handled_total`, `grpc_server_handling_seconds`), so existing
//! dashboards and alerts work unchanged; and the registration's state.
//!
//! Labels come from a fixed table of the methods this server serves: a
//! client sending made-up paths cannot grow the label set (they are counted
//! under `grpc_service="unknown"`). A call's code is read where gRPC puts
//! it ([`etcd_lb_registry::grpc_status`]); a call whose client went away before its
//! end counts as `Canceled`, as grpc-go's server reports it.
//!
//! Counter names are registered without `_total`: prometheus-client adds the
//! suffix (and panics in debug builds when it is already there).

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use etcd_lb_registry::grpc_status::{code_name, OnStatus, Report};
use etcd_lb_registry::registrar::Status;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

/// Buckets of `grpc_server_handling_seconds`: Prometheus' default buckets,
/// which grpc-ecosystem's interceptors use too.
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// `(service, method, grpc_type)` of every method this server serves.
const METHODS: &[(&str, &str, &str)] = &[
    ("Greet", "Morning", "unary"),
    ("Greet", "Night", "unary"),
    ("grpc.health.v1.Health", "Check", "unary"),
    ("grpc.health.v1.Health", "Watch", "server_stream"),
    (
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
        "bidi_stream",
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
        "bidi_stream",
    ),
];

/// Labels of a method's series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
}

/// Labels of handled calls: the method's plus the status code's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: &'static str,
}

/// gRPC's status codes, 0 (`OK`) to 16 (`Unauthenticated`).
const CODES: usize = 17;

/// The series of one method, each looked up in its family once, on first
/// use (so the exposition lists only what was called, as before), then
/// shared: `Family::get_or_create` hashes the whole label set under a read
/// lock, and three of those were about 3 % of the server's instructions per
/// call under h2load (callgrind).
#[derive(Debug)]
struct MethodSeries {
    labels: MethodLabels,
    started: OnceLock<Counter>,
    handling: OnceLock<Histogram>,
    /// By code (`tonic::Code as usize`).
    handled: [OnceLock<Counter>; CODES],
}

/// Every metric of the server. Cheap to share (`Arc`); the call path takes
/// no lock of its own beyond the families' read locks, and those only the
/// first time a method (and code) is seen.
#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    started: Family<MethodLabels, Counter>,
    handled: Family<HandledLabels, Counter>,
    handling: Family<MethodLabels, Histogram>,
    /// One per entry of [`METHODS`], then one for every unknown path.
    series: Box<[MethodSeries]>,
    registered: Gauge,
    registrations: Counter,
    lease: Gauge,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerMetrics {
    /// A fresh set of metrics in its own registry.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let started = Family::<MethodLabels, Counter>::default();
        registry.register(
            "grpc_server_started",
            "Calls started on the server, by method",
            started.clone(),
        );
        let handled = Family::<HandledLabels, Counter>::default();
        registry.register(
            "grpc_server_handled",
            "Calls completed on the server, by method and gRPC status code",
            handled.clone(),
        );
        let handling = Family::<MethodLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(BUCKETS)) as fn() -> Histogram,
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Time from a call's start until the server sent its status",
            handling.clone(),
        );
        let registered = Gauge::default();
        registry.register(
            "greet_server_registered",
            "1 while etcd holds this server's key on its lease",
            registered.clone(),
        );
        let registrations = Counter::default();
        registry.register(
            "greet_server_registrations",
            "Times the key was (re)written after not being registered: the first registration plus every re-registration",
            registrations.clone(),
        );
        let lease = Gauge::default();
        registry.register(
            "greet_server_lease_id",
            "The etcd lease the key is on (0 while not registered)",
            lease.clone(),
        );
        let unknown = MethodLabels {
            grpc_type: "unary",
            grpc_service: "unknown",
            grpc_method: "unknown",
        };
        let series = METHODS
            .iter()
            .map(|&(grpc_service, grpc_method, grpc_type)| MethodLabels {
                grpc_type,
                grpc_service,
                grpc_method,
            })
            .chain([unknown])
            .map(|labels| MethodSeries {
                labels,
                started: OnceLock::new(),
                handling: OnceLock::new(),
                handled: std::array::from_fn(|_| OnceLock::new()),
            })
            .collect();
        Self {
            registry,
            started,
            handled,
            handling,
            series,
            registered,
            registrations,
            lease,
        }
    }

    /// The exposition text (OpenMetrics), encoded from one pass over the
    /// registry.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Follows the registrar's status until it ends, keeping the
    /// registration gauges and counter current.
    pub async fn follow_registration(self: Arc<Self>, mut status: watch::Receiver<Status>) {
        let mut was_registered = false;
        loop {
            let now = status.borrow_and_update().clone();
            match now {
                Status::Registered { lease } => {
                    if !was_registered {
                        self.registrations.inc();
                    }
                    was_registered = true;
                    self.registered.set(1);
                    self.lease.set(lease);
                }
                _ => {
                    was_registered = false;
                    self.registered.set(0);
                    self.lease.set(0);
                }
            }
            if status.changed().await.is_err() {
                return;
            }
        }
    }

    /// The index in `series` of the method a path names: its entry in
    /// [`METHODS`], or the last (unknown) one.
    fn method(path: &str) -> usize {
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        METHODS
            .iter()
            .position(|(s, m, _)| *s == service && *m == method)
            .unwrap_or(METHODS.len())
    }

    #[cfg(test)]
    fn labels(&self, method: usize) -> &MethodLabels {
        &self.series[method].labels
    }

    fn started(&self, method: usize) -> &Counter {
        let s = &self.series[method];
        s.started
            .get_or_init(|| self.started.get_or_create(&s.labels).clone())
    }

    fn handling(&self, method: usize) -> &Histogram {
        let s = &self.series[method];
        s.handling
            .get_or_init(|| self.handling.get_or_create(&s.labels).clone())
    }

    fn handled(&self, method: usize, code: tonic::Code) -> &Counter {
        let s = &self.series[method];
        // Every tonic::Code is below CODES; clamp anyway rather than index
        // out of bounds should a later tonic add one.
        s.handled[(code as usize).min(CODES - 1)].get_or_init(|| {
            let MethodLabels {
                grpc_type,
                grpc_service,
                grpc_method,
            } = s.labels;
            self.handled
                .get_or_create(&HandledLabels {
                    grpc_type,
                    grpc_service,
                    grpc_method,
                    grpc_code: code_name(code),
                })
                .clone()
        })
    }
}

/// One call being measured; [`OnStatus`] hands it the call's code once.
#[derive(Debug)]
pub struct Call {
    metrics: Arc<ServerMetrics>,
    /// Index of the method's series.
    method: usize,
    start: Instant,
}

impl Report for Call {
    fn report(self, code: tonic::Code) {
        self.metrics.handled(self.method, code).inc();
        self.metrics
            .handling(self.method)
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// Tower layer that measures every call of the server it wraps.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    metrics: Arc<ServerMetrics>,
}

impl MetricsLayer {
    /// Measures into `metrics`.
    pub fn new(metrics: Arc<ServerMetrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`MetricsLayer`] makes.
#[derive(Debug, Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<ServerMetrics>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for MetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<OnStatus<ResBody, Call>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        let method = ServerMetrics::method(req.uri().path());
        self.metrics.started(method).inc();
        let call = Call {
            metrics: self.metrics.clone(),
            method,
            start: Instant::now(),
        };
        let fut = self.inner.call(req);
        Box::pin(async move { Ok(OnStatus::wrap(fut.await?, call)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_paths_share_one_label_set() {
        let m = ServerMetrics::new();
        let a = ServerMetrics::method("/Evil/a1");
        let b = ServerMetrics::method("/x");
        assert_eq!(a, b);
        assert_eq!(m.labels(a).grpc_service, "unknown");
        assert_eq!(
            m.labels(ServerMetrics::method("/Greet/Morning"))
                .grpc_method,
            "Morning"
        );
        assert_eq!(
            m.labels(ServerMetrics::method("/grpc.health.v1.Health/Watch"))
                .grpc_type,
            "server_stream"
        );
    }

    /// The cached handles are the families' own series: counts land in the
    /// exposition, per method and code, and nothing shows before first use.
    #[test]
    fn cached_series_count_into_the_families() {
        let m = Arc::new(ServerMetrics::new());
        assert!(!m.render().contains("grpc_server_started_total{"));
        let morning = ServerMetrics::method("/Greet/Morning");
        for _ in 0..3 {
            m.started(morning).inc();
            Call {
                metrics: m.clone(),
                method: morning,
                start: Instant::now(),
            }
            .report(tonic::Code::Ok);
        }
        Call {
            metrics: m.clone(),
            method: morning,
            start: Instant::now(),
        }
        .report(tonic::Code::Unavailable);
        let text = m.render();
        let labels = r#"grpc_type="unary",grpc_service="Greet",grpc_method="Morning""#;
        assert!(
            text.contains(&format!("grpc_server_started_total{{{labels}}} 3")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "grpc_server_handled_total{{{labels},grpc_code=\"OK\"}} 3"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "grpc_server_handled_total{{{labels},grpc_code=\"Unavailable\"}} 1"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("grpc_server_handling_seconds_count{{{labels}}} 4")),
            "{text}"
        );
        assert!(!text.contains("Night"), "{text}");
    }

    #[tokio::test]
    async fn registration_gauges_follow_the_status() {
        let metrics = Arc::new(ServerMetrics::new());
        let (tx, rx) = watch::channel(Status::Connecting);
        let task = tokio::spawn(metrics.clone().follow_registration(rx));
        tx.send(Status::Registered { lease: 42 }).unwrap();
        tokio::task::yield_now().await;
        tx.send(Status::Connecting).unwrap();
        tokio::task::yield_now().await;
        tx.send(Status::Registered { lease: 43 }).unwrap();
        drop(tx);
        task.await.unwrap();
        let text = metrics.render();
        assert!(
            text.contains("greet_server_registrations_total 2"),
            "{text}"
        );
        assert!(text.contains("greet_server_registered 1"), "{text}");
        assert!(text.contains("greet_server_lease_id 43"), "{text}");
    }
}
