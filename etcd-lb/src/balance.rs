//! The weighted balancer: a `tower::Service` over one HTTP/2 connection per
//! endpoint (hyper's sender, or a tonic `Channel` for TLS; see
//! [`crate::conn`]), that a generated client (`EchoClient::new(balancer)`,
//! any tonic client) wraps.
//!
//! - Picks with the [`crate::picker`]: the [`Scheduler`]'s smooth weighted
//!   round-robin (O(log n)), passed over for a far less loaded endpoint
//!   when one is (latency and calls in flight, [`crate::load`]); or, with
//!   [`Picker::RoundRobin`], the scheduler alone.
//! - Updates touch only the endpoints that changed: an unchanged endpoint
//!   keeps its channel and its established connection.
//! - Weight 0 (draining) takes an endpoint out of the schedule but keeps its
//!   channel, so calls already running on it finish.
//! - An endpoint whose connection fails is marked down and skipped; a
//!   background task reconnects it with backoff and puts it back when the
//!   connection is up again (readiness, not a fixed timeout).
//! - A call that was never sent is retried on another endpoint whatever
//!   its method, without asking the retry budget (it put no load on any
//!   server; [`RetryPolicy::decide`] bounds it at 8 + endpoints tries,
//!   within its deadline). A call lost after sending is retried when its
//!   method is retryable, within its `grpc-timeout` and the retry budget.
//!   A request body that is complete at once and within 64 KiB (unary and
//!   server-streaming calls) is kept so it can be replayed; an open request
//!   stream (client- and bidi-streaming) or a larger body is sent once as
//!   it comes, never buffered, never retried. A retryable call's response
//!   of one message within 4 MiB is read to its end before it is handed on,
//!   so a server that dies mid-response costs a retry too (gRPC itself
//!   commits at the headers); at a second message or past 4 MiB it streams
//!   through and is committed; other responses stream through untouched.
//!   A server's refusal (`UNAVAILABLE`, in the headers or the trailers) is
//!   retried too. List as retryable (idempotent) the unary methods that are
//!   safe to run twice.
//! - Slow is not dead: an attempt past its per-try bound is not given up
//!   but checked: a health check on the same connection that gets an
//!   answer means the server is alive and slow, so the call keeps waiting
//!   (to its deadline); only a check with no answer (a silent connection)
//!   marks the endpoint down and sends the call elsewhere. The caller's own
//!   deadline passing is `DEADLINE_EXCEEDED` and never marks anything down.
//! - Hedging ([`crate::hedge`], off by default): the first attempt of a
//!   retryable call that has not answered within the 95th percentile of
//!   recent latency gets a second attempt on another endpoint, charged to
//!   the retry budget; the first answer wins, the other is cancelled.
//! - Drains never cut a call: a connection the server sent GOAWAY on is
//!   draining. Its calls run to their own deadline (its keepalive still
//!   ends them if the peer dies), nothing new is sent on it, and a health
//!   check it refuses is not taken as proof of death.
//! - Outlier ejection never empties a service: its cap counts endpoints in
//!   rotation only (up, weight > 0), the last of them is never ejected, and
//!   while fewer than the healthy share (50 %) are not ejected, ejection is
//!   ignored (Envoy's panic mode).
//! - With nothing usable, calls fail at once with `UNAVAILABLE` and a
//!   message that says why (none registered, all draining, all unreachable,
//!   all ejected, or how many of each).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_lb_registry::backoff::Backoff;
use etcd_lb_registry::grpc_status::{code_of, OnStatus, Report};
use etcd_lb_registry::schema::Addr;
use tokio::time::Instant;
use tonic::body::Body;
use tonic::transport::Endpoint;
use tonic::{Code, Status};
use tracing::{debug, info, warn};

use crate::body::{read_whole, replayable, Read, Replay, RESPONSE_CAP};
use crate::budget::{RetryBudget, RetryBudgetConfig};
use crate::conn::{Conn, Dialer, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::hedge::{Hedger, Hedgers, HedgingConfig};
use crate::load::Load;
use crate::metrics::{ClientMetrics, EndpointMetrics, RetryReason};
use crate::outlier::{verdict, Ejector, OutlierConfig, Tracker, Verdict};
use crate::picker::Picker;
use crate::retry::{grpc_timeout, not_sent, timed_out, Decision, Failed, RetryPolicy, Tries};
use crate::scheduler::Scheduler;
use crate::watch::{watch, Watched};

/// Batches of at most this many changes log each endpoint at info; larger
/// ones log each at debug and one summary at info.
pub const LOUD_BATCH: usize = 16;

/// `grpc-timeout`, as a name: looking up by a string parses it first.
static GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// The endpoint table's hasher: foldhash, not SipHash. Keys are the
/// fleet's own registered addresses, and SipHash's flood resistance cost
/// about 500 instructions a call across this table and the scheduler's.
type Hasher = foldhash::fast::RandomState;

/// One change to the balancer's endpoints, for [`Balancer::apply`].
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// Add the endpoint, or update its weight and version.
    Upsert {
        /// The endpoint (the key suffix).
        addr: &'a Addr,
        /// Its weight; 0 is draining.
        weight: u32,
        /// Its advertised version.
        version: &'a str,
    },
    /// Forget the endpoint; calls running on it finish on their own.
    Remove(&'a Addr),
}

/// What one [`Balancer::apply`] did, for its summary line.
#[derive(Debug, Default)]
struct Applied {
    added: usize,
    updated: usize,
    reweighted: usize,
    removed: usize,
}

/// Boxed error, as tonic's `GrpcService` expects.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Balancer settings.
#[derive(Debug, Clone)]
pub struct BalancerConfig {
    /// Service name, for error messages.
    pub service: String,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Caps retries of every kind at a share of recent calls, so retries
    /// never multiply the load on a fleet that sheds it; `None`: no cap
    /// (only the policy's per-call limits).
    pub retry_budget: Option<RetryBudgetConfig>,
    /// Ejects an endpoint that fails calls in a row (see
    /// [`crate::outlier`]); `None`: never.
    pub outlier: Option<OutlierConfig>,
    /// Ramp a new endpoint's weight from 10 % to 100 % over this window.
    pub slow_start: Option<Duration>,
    /// How endpoints are picked: load-aware (default) or plain smooth
    /// weighted round-robin.
    pub picker: Picker,
    /// Hedge retryable calls (see [`crate::hedge`]); `None`: never.
    pub hedging: Option<HedgingConfig>,
    /// TCP connect timeout per endpoint.
    pub connect_timeout: Duration,
    /// Connect to new endpoints at once (true) or on their first call.
    pub eager_connect: bool,
    /// Dial servers over TLS verified with this configuration.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
    /// Record calls, retries and endpoint states here (see
    /// [`crate::metrics`]); `None`: no metrics.
    pub metrics: Option<Arc<ClientMetrics>>,
}

/// The defaults of [`BalancerConfig::new`] with no service name yet:
/// [`crate::connect`] fills it in from the [`crate::DiscoveryConfig`], so a
/// service is named once.
impl Default for BalancerConfig {
    fn default() -> Self {
        Self::new("")
    }
}

impl BalancerConfig {
    /// Defaults for a service: retry policy none, the default retry budget
    /// (10 % of calls plus 5/s), outlier detection (5 failures in a row,
    /// 30 s, at most half), 1 s connect timeout, eager.
    pub fn new(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            retry: RetryPolicy::none(),
            retry_budget: Some(RetryBudgetConfig::default()),
            outlier: Some(OutlierConfig::default()),
            slow_start: None,
            picker: Picker::default(),
            hedging: None,
            connect_timeout: Duration::from_secs(1),
            eager_connect: true,
            tls: None,
            metrics: None,
        }
    }
}

/// What the balancer knows about one endpoint (for logs, tests, tables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Address (the key suffix).
    pub addr: Addr,
    /// Configured weight.
    pub weight: u32,
    /// Advertised version.
    pub version: String,
    /// Whether its connection is not known to be down.
    pub up: bool,
    /// Whether outlier detection has taken it out of rotation for now.
    pub ejected: bool,
    /// Its calls in flight (load-aware picker only; else 0).
    pub in_flight: u32,
    /// Its latency estimate (load-aware picker only).
    pub latency: Option<Duration>,
}

struct Ep {
    /// Created on first use when not connecting eagerly, so 10,000 known
    /// but idle endpoints cost no connection (and no task) each.
    conn: Option<Conn>,
    weight: u32,
    version: String,
    up: bool,
    since: Instant,
    recovering: bool,
    generation: u64,
    metrics: Option<EndpointMetrics>,
    /// The failure streak, when outlier detection is on.
    tracker: Option<Arc<Tracker>>,
    /// Until when it is ejected, if it is.
    ejected_until: Option<Instant>,
    /// Ejections in a row (decays by one per base time in service).
    ejections: u32,
    /// When it last came back into service (or was added).
    in_service_since: Instant,
    /// Latency and calls in flight, for the load-aware picker.
    load: Option<Arc<Load>>,
}

impl Ep {
    /// Whether it is in rotation: up and not draining (ejected or not).
    /// The ejection cap and the panic threshold count these only.
    fn member(&self) -> bool {
        self.up && self.weight > 0
    }

    /// What it adds to [`Rotation`]: (member, ejected member).
    fn class(&self) -> (bool, bool) {
        let member = self.member();
        (member, member && self.ejected_until.is_some())
    }

    /// Whether the scheduler should hold it (weight aside): up, and not
    /// ejected unless the balancer panics.
    fn schedulable(&self, panic: bool) -> bool {
        self.up && (panic || self.ejected_until.is_none())
    }
}

/// The endpoints in rotation (up, weight > 0) and how many of them are
/// ejected: what the ejection cap and the panic threshold are shares of.
/// Kept up to date on every change, so neither costs a walk of the table.
#[derive(Debug, Default, Clone, Copy)]
struct Rotation {
    members: usize,
    ejected: usize,
}

impl Rotation {
    /// Replaces an endpoint's old [`Ep::class`] with its new one.
    fn update(&mut self, before: (bool, bool), after: (bool, bool)) {
        self.members = self.members + usize::from(after.0) - usize::from(before.0);
        self.ejected = self.ejected + usize::from(after.1) - usize::from(before.1);
    }
}

/// What [`Balancer::pick`] hands an attempt.
pub(crate) struct Picked {
    pub(crate) addr: Addr,
    conn: Conn,
    generation: u64,
    metrics: Option<EndpointMetrics>,
    tracker: Option<Arc<Tracker>>,
    load: Option<Arc<Load>>,
}

struct Pool {
    sched: Scheduler<Addr>,
    /// Members of the rotation, and ejected ones among them.
    rotation: Rotation,
    /// Whether too few members are healthy (Envoy's panic mode): ejected
    /// members are scheduled again until enough are.
    panic: bool,
    /// Boxed: an `Ep` is a few hundred bytes, and a table of 100,000 of
    /// them inline is one 47 MB allocation (doubled while it grows).
    endpoints: HashMap<Addr, Box<Ep>, Hasher>,
    next_generation: u64,
    /// Why the pool is empty when it is, as discovery knows it (not synced
    /// with etcd yet, every registered endpoint filtered out); `None`:
    /// nothing registered.
    empty_reason: Option<Arc<str>>,
}

struct Inner {
    cfg: BalancerConfig,
    budget: Option<RetryBudget>,
    /// What a failure streak calls to eject its endpoint; trackers hold it
    /// weakly, so they never keep the balancer alive.
    ejector: Arc<Ejector>,
    pool: Mutex<Pool>,
    /// Bumped on every applied change: lets callers (tests, the propagation
    /// benchmark) observe the moment an update takes effect.
    changes: tokio::sync::watch::Sender<u64>,
    /// Attempts in flight on all endpoints (load-aware picker only).
    in_flight: std::sync::atomic::AtomicU32,
    /// Recent latency and the hedging delay of each retryable method,
    /// when hedging.
    hedgers: Option<Hedgers>,
}

/// A cheap-to-clone handle; every clone balances over the same pool.
///
/// Any generated tonic client takes it in place of a `Channel`. A
/// [`crate::Discovery`] keeps its endpoints in step with etcd; they can also
/// be set by hand, as here (no connection is made until the first call):
///
/// ```
/// use etcd_lb::{Balancer, BalancerConfig};
///
/// let balancer = Balancer::new(BalancerConfig {
///     eager_connect: false,
///     ..BalancerConfig::new("echo")
/// });
/// balancer.upsert(&"127.0.0.1:50051".parse().unwrap(), 100, "1.0.0");
/// balancer.upsert(&"127.0.0.1:50052".parse().unwrap(), 0, "1.0.0"); // draining
/// assert_eq!(balancer.len(), 2);
/// assert_eq!(balancer.weight_of(&"127.0.0.1:50052".parse().unwrap()), Some(0));
/// // let mut client = EchoClient::new(balancer.clone());
/// ```
#[derive(Clone)]
pub struct Balancer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("service", &self.inner.cfg.service)
            .field("endpoints", &self.endpoints().len())
            .finish()
    }
}

impl Balancer {
    /// An empty balancer; feed it with [`Balancer::upsert`] /
    /// [`Balancer::remove`] (usually through [`crate::discover`]).
    pub fn new(cfg: BalancerConfig) -> Self {
        Self {
            inner: Arc::new_cyclic(|me: &std::sync::Weak<Inner>| {
                let me = me.clone();
                Inner {
                    budget: cfg.retry_budget.as_ref().map(RetryBudget::new),
                    hedgers: cfg.hedging.map(|h| {
                        Hedgers::new(h, &cfg.retry.retryable_methods, |path| {
                            cfg.metrics
                                .as_ref()
                                .map(|m| m.hedging_delay(&cfg.service, path))
                        })
                    }),
                    ejector: Arc::new(move |addr: &Addr, generation: u64| {
                        if let Some(inner) = me.upgrade() {
                            Balancer { inner }.eject(addr, generation);
                        }
                    }),
                    cfg,
                    pool: Mutex::new(Pool {
                        sched: Scheduler::new(),
                        rotation: Rotation::default(),
                        panic: false,
                        endpoints: HashMap::default(),
                        next_generation: 0,
                        empty_reason: None,
                    }),
                    changes: tokio::sync::watch::Sender::new(0),
                    in_flight: std::sync::atomic::AtomicU32::new(0),
                }
            }),
        }
    }

    fn pool(&self) -> MutexGuard<'_, Pool> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.inner.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an endpoint or updates its weight and version. An existing
    /// endpoint keeps its channel and connection.
    pub fn upsert(&self, addr: &Addr, weight: u32, version: &str) {
        self.apply([Change::Upsert {
            addr,
            weight,
            version,
        }]);
    }

    /// Removes an endpoint; calls running on it finish on their own.
    pub fn remove(&self, addr: &Addr) {
        self.apply([Change::Remove(addr)]);
    }

    /// Says why the balancer has no endpoints, for the error calls get
    /// while it has none (discovery sets it: not synced with etcd yet,
    /// every registered endpoint filtered out); `None` means none are
    /// registered.
    pub fn set_empty_reason(&self, reason: Option<String>) {
        self.pool().empty_reason = reason.map(Arc::from);
    }

    /// Applies many changes under one lock, as discovery does with a list:
    /// one wake-up of [`Balancer::changes`] for the lot, and past
    /// [`LOUD_BATCH`] changes one summary line instead of a line per
    /// endpoint (100,000 endpoints at start-up are not 100,000 log lines).
    pub fn apply<'a>(&self, changes: impl IntoIterator<Item = Change<'a>>) {
        let changes = changes.into_iter();
        let loud = changes.size_hint().1.is_some_and(|n| n <= LOUD_BATCH);
        let mut done = Applied::default();
        let mut pool = self.pool();
        for change in changes {
            match change {
                Change::Upsert {
                    addr,
                    weight,
                    version,
                } => self.upsert_in(&mut pool, addr, weight, version, loud, &mut done),
                Change::Remove(addr) => self.remove_in(&mut pool, addr, loud, &mut done),
            }
        }
        drop(pool);
        if done.added + done.updated + done.removed > 0 {
            self.inner.changes.send_modify(|g| *g += 1);
        }
        if !loud && done.added + done.removed + done.reweighted > 0 {
            info!(
                added = done.added,
                removed = done.removed,
                reweighted = done.reweighted,
                endpoints = self.len(),
                "endpoints updated"
            );
        }
    }

    fn upsert_in(
        &self,
        pool: &mut Pool,
        addr: &Addr,
        weight: u32,
        version: &str,
        loud: bool,
        done: &mut Applied,
    ) {
        if let Some(ep) = pool.endpoints.get_mut(addr) {
            if ep.weight != weight {
                if loud {
                    info!(%addr, from = ep.weight, to = weight, "endpoint weight changed");
                }
                done.reweighted += 1;
            }
            let before = ep.class();
            ep.weight = weight;
            if ep.version != version {
                ep.version = version.to_owned();
            }
            pool.rotation.update(before, ep.class());
            if ep.schedulable(pool.panic) {
                pool.sched.set(addr.clone(), weight);
            }
            self.settle(pool);
            done.updated += 1;
            return;
        }
        let dialer = match self.dialer(addr) {
            Ok(d) => d,
            Err(e) => {
                warn!(%addr, error = %e, "cannot dial this address; ignoring it");
                return;
            }
        };
        pool.next_generation += 1;
        let eager = self.inner.cfg.eager_connect;
        pool.endpoints.insert(
            addr.clone(),
            Box::new(Ep {
                conn: eager.then(|| dialer.lazy()),
                weight,
                version: version.to_owned(),
                up: true,
                since: Instant::now(),
                recovering: false,
                generation: pool.next_generation,
                metrics: self.inner.cfg.metrics.as_ref().map(|m| {
                    m.transition(&self.inner.cfg.service, None, Some(true));
                    m.endpoint(&self.inner.cfg.service, addr.as_str())
                }),
                tracker: self.inner.cfg.outlier.map(|o| {
                    Arc::new(Tracker::new(
                        addr.clone(),
                        pool.next_generation,
                        o.consecutive_failures,
                        Arc::downgrade(&self.inner.ejector),
                    ))
                }),
                ejected_until: None,
                ejections: 0,
                in_service_since: Instant::now(),
                load: self
                    .inner
                    .cfg
                    .picker
                    .load()
                    .map(|_| Arc::new(Load::new(Instant::now()))),
            }),
        );
        pool.rotation.update((false, false), (weight > 0, false));
        pool.sched.set(addr.clone(), weight);
        self.settle(pool);
        done.added += 1;
        if loud {
            info!(%addr, weight, version, "endpoint added");
        } else {
            debug!(%addr, weight, version, "endpoint added");
        }
        if eager {
            let conn = pool.endpoints.get_mut(addr).and_then(|e| {
                e.recovering = true;
                e.conn.clone()
            });
            if let Some(conn) = conn {
                self.spawn_connect(addr.clone(), pool.next_generation, dialer, Some(conn));
            }
        }
    }

    fn remove_in(&self, pool: &mut Pool, addr: &Addr, loud: bool, done: &mut Applied) {
        if let Some(ep) = pool.endpoints.remove(addr) {
            if let (Some(all), Some(m)) = (&self.inner.cfg.metrics, &ep.metrics) {
                all.transition(&self.inner.cfg.service, Some(ep.up), None);
                if ep.ejected_until.is_some() {
                    m.reinstated();
                }
                all.forget(m);
            }
            pool.rotation.update(ep.class(), (false, false));
            pool.sched.remove(addr);
            self.settle(pool);
            done.removed += 1;
            if loud {
                info!(%addr, "endpoint removed");
            } else {
                debug!(%addr, "endpoint removed");
            }
        }
    }

    /// The service's name, as configured.
    pub(crate) fn service(&self) -> &str {
        &self.inner.cfg.service
    }

    /// The metrics this balancer records into, if any.
    pub(crate) fn metrics(&self) -> Option<Arc<ClientMetrics>> {
        self.inner.cfg.metrics.clone()
    }

    /// A counter bumped each time an update from discovery is applied.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// Number of endpoints known (any weight, up or down).
    pub fn len(&self) -> usize {
        self.pool().endpoints.len()
    }

    /// Whether no endpoint is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How long an attempt of the method at `path` (`/pkg.Service/Method`)
    /// runs before it is hedged now; `None` when hedging is off, the method
    /// is not listed as idempotent, or too few of its answers were seen.
    /// The same figure as `lb_hedging_delay_seconds`.
    pub fn hedging_delay(&self, path: &str) -> Option<std::time::Duration> {
        self.hedger(path, true).and_then(Hedger::delay)
    }

    /// The weight the balancer holds for `addr`, if known.
    pub fn weight_of(&self, addr: &Addr) -> Option<u32> {
        self.pool().endpoints.get(addr).map(|e| e.weight)
    }

    /// The endpoints, sorted by address.
    pub fn endpoints(&self) -> Vec<EndpointInfo> {
        let now = Instant::now();
        let load_cfg = self.inner.cfg.picker.load().copied();
        let pool = self.pool();
        let mut v: Vec<_> = pool
            .endpoints
            .iter()
            .map(|(addr, ep)| EndpointInfo {
                addr: addr.clone(),
                weight: ep.weight,
                version: ep.version.clone(),
                up: ep.up,
                ejected: ep.ejected_until.is_some(),
                in_flight: ep.load.as_ref().map_or(0, |l| l.in_flight()),
                latency: ep
                    .load
                    .as_ref()
                    .zip(load_cfg.as_ref())
                    .map(|(l, cfg)| l.estimate(now, cfg)),
            })
            .collect();
        v.sort_by(|a, b| a.addr.cmp(&b.addr));
        v
    }

    /// How to connect to `addr`: the same TCP, keepalive and TLS settings
    /// for a `Channel` and for the balancer's own connection.
    fn dialer(&self, addr: &Addr) -> Result<Dialer, tonic::transport::Error> {
        let cfg = &self.inner.cfg;
        let endpoint: Endpoint = etcd_lb_registry::grpc_tls::endpoint(addr, cfg.tls.as_ref())?
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT);
        Ok(Dialer::new(
            addr,
            endpoint,
            cfg.tls.is_some(),
            cfg.connect_timeout,
        ))
    }

    /// Picks an endpoint, or says why none can take a call.
    pub(crate) fn pick(&self, avoid: Option<&Addr>) -> Result<Picked, Status> {
        let mut pool = self.pool();
        let pool = &mut *pool;
        let slow_start = self.inner.cfg.slow_start.filter(|w| !w.is_zero());
        // The clock is read only when slow start needs it.
        let now = slow_start.map(|_| Instant::now());
        let tries = if avoid.is_some() { 2 } else { 1 };
        for _ in 0..tries {
            let endpoints = &pool.endpoints;
            let weight = |addr: &Addr, w: u32| {
                let w = f64::from(w);
                // Without slow start, no lookup: the weight is as set.
                let Some((window, now)) = slow_start.zip(now) else {
                    return w;
                };
                match endpoints.get(addr) {
                    Some(ep) => {
                        let frac = (now.duration_since(ep.since).as_secs_f64()
                            / window.as_secs_f64())
                        .min(1.0);
                        w * (0.1 + 0.9 * frac)
                    }
                    None => w,
                }
            };
            // A retry goes elsewhere whenever anything else is usable,
            // however the weights lean (10000:1 would otherwise hand the
            // failed endpoint back every time).
            let picked = match avoid {
                Some(failed) if pool.sched.active() > 1 => pool.sched.pick_except(failed, weight),
                _ => crate::picker::pick(
                    &self.inner.cfg.picker,
                    &mut pool.sched,
                    weight,
                    self.inner
                        .in_flight
                        .load(std::sync::atomic::Ordering::Relaxed),
                    |k| {
                        let ep = endpoints.get(k)?;
                        Some((ep.load.as_deref()?, ep.weight))
                    },
                ),
            };
            let Some(addr) = picked else { break };
            if let Some(ep) = pool.endpoints.get_mut(&addr) {
                let conn = match &ep.conn {
                    Some(c) => c.clone(),
                    // First use of a lazily connected endpoint: this call
                    // waits for the connection dialled now, which the
                    // background connect proves and installs.
                    None => match self.dialer(&addr) {
                        Ok(d) => {
                            let conn = ep.conn.insert(d.lazy()).clone();
                            if !ep.recovering {
                                ep.recovering = true;
                                let warm = Some(conn.clone());
                                self.spawn_connect(addr.clone(), ep.generation, d, warm);
                            }
                            conn
                        }
                        Err(_) => continue,
                    },
                };
                return Ok(Picked {
                    addr,
                    conn,
                    generation: ep.generation,
                    metrics: ep.metrics.clone(),
                    tracker: ep.tracker.clone(),
                    load: ep.load.clone(),
                });
            }
        }
        if let (true, Some(reason)) = (pool.endpoints.is_empty(), &pool.empty_reason) {
            return Err(Status::unavailable(format!(
                "no endpoints for {}: {reason}",
                self.inner.cfg.service
            )));
        }
        Err(Status::unavailable(why_none(
            &self.inner.cfg.service,
            pool.endpoints.values().map(|e| e.as_ref()),
        )))
    }

    /// Whether the retry budget allows one more retry (always, without a
    /// budget).
    pub(crate) fn may_retry(&self) -> bool {
        self.inner
            .budget
            .as_ref()
            .is_none_or(|b| b.withdraw(&self.inner.cfg.service))
    }

    fn count_retry(&self, reason: RetryReason) {
        if let Some(m) = &self.inner.cfg.metrics {
            m.retry(&self.inner.cfg.service, reason);
        }
    }

    /// Takes an endpoint out of rotation for a while after a failure
    /// streak, unless that would eject more than the allowed share of the
    /// endpoints in rotation (up, weight > 0) or the last one of them. Its
    /// connection stays.
    fn eject(&self, addr: &Addr, generation: u64) {
        let Some(cfg) = self.inner.cfg.outlier else {
            return;
        };
        let mut pool = self.pool();
        let pool = &mut *pool;
        let Rotation { members, ejected } = pool.rotation;
        let Some(ep) = pool.endpoints.get_mut(addr) else {
            return;
        };
        if ep.generation != generation || ep.ejected_until.is_some() || !ep.member() {
            return;
        }
        if !cfg.may_eject(ejected, members) {
            debug!(%addr, ejected, members, "failing endpoint not ejected: the most allowed are");
            return;
        }
        let before = ep.class();
        let now = Instant::now();
        let base = cfg.base_ejection_time.max(Duration::from_millis(1));
        let decay = (now.duration_since(ep.in_service_since).as_secs_f64() / base.as_secs_f64())
            .min(f64::from(u32::MAX)) as u32;
        ep.ejections = ep.ejections.saturating_sub(decay).saturating_add(1);
        let time = cfg.ejection_time(ep.ejections);
        ep.ejected_until = Some(now + time);
        pool.rotation.update(before, ep.class());
        if !ep.schedulable(pool.panic) {
            pool.sched.remove(addr);
        }
        if let Some(m) = &ep.metrics {
            m.ejected();
        }
        warn!(%addr, ejections = ep.ejections, for_ = ?time, "endpoint fails every call; ejected");
        self.settle(pool);
        let weak = Arc::downgrade(&self.inner);
        let addr = addr.clone();
        tokio::spawn(async move {
            tokio::time::sleep(time).await;
            if let Some(inner) = weak.upgrade() {
                Balancer { inner }.reinstate(&addr, generation);
            }
        });
    }

    /// Puts an ejected endpoint back when its time is up.
    fn reinstate(&self, addr: &Addr, generation: u64) {
        let mut pool = self.pool();
        let pool = &mut *pool;
        let Some(ep) = pool.endpoints.get_mut(addr) else {
            return;
        };
        if ep.generation != generation || ep.ejected_until.is_none() {
            return;
        }
        let before = ep.class();
        ep.ejected_until = None;
        pool.rotation.update(before, ep.class());
        ep.in_service_since = Instant::now();
        if let Some(t) = &ep.tracker {
            t.reset();
        }
        if let Some(m) = &ep.metrics {
            m.reinstated();
        }
        if ep.schedulable(pool.panic) {
            pool.sched.set(addr.clone(), ep.weight);
        }
        self.settle(pool);
        info!(%addr, "ejection over; endpoint back in rotation");
    }

    /// Enters or leaves panic mode after a change to the rotation: while
    /// fewer than the outlier config's healthy share of the members are
    /// not ejected, ejection is ignored and calls spread over all members
    /// (Envoy's panic threshold). Walks the table only when the mode flips.
    fn settle(&self, pool: &mut Pool) {
        let threshold = self
            .inner
            .cfg
            .outlier
            .map_or(0, |o| usize::from(o.panic_threshold_percent.min(100)));
        let Rotation { members, ejected } = pool.rotation;
        let panic = ejected > 0 && (members - ejected) * 100 < threshold * members;
        if panic == pool.panic {
            return;
        }
        pool.panic = panic;
        if panic {
            warn!(
                members,
                ejected, "too few endpoints healthy; ignoring ejection (panic mode)"
            );
        } else {
            info!(
                members,
                ejected, "enough endpoints healthy again; panic mode over"
            );
        }
        for (addr, ep) in &pool.endpoints {
            if ep.ejected_until.is_some() && ep.up {
                if panic {
                    pool.sched.set(addr.clone(), ep.weight);
                } else {
                    pool.sched.remove(addr);
                }
            }
        }
    }

    /// Counts an endpoint that just went from up to down.
    fn note_down(&self, ep: &Ep) {
        if let (Some(all), Some(m)) = (&self.inner.cfg.metrics, &ep.metrics) {
            all.transition(&self.inner.cfg.service, Some(true), Some(false));
            m.marked_down();
        }
    }

    /// Takes an endpoint out of the schedule until a fresh connection to it
    /// succeeds.
    fn mark_down(&self, addr: &Addr, generation: u64, why: &str) {
        let dialer = {
            let mut pool = self.pool();
            let pool = &mut *pool;
            let Some(ep) = pool.endpoints.get_mut(addr) else {
                return;
            };
            if ep.generation != generation || !ep.up {
                return;
            }
            let before = ep.class();
            ep.up = false;
            pool.rotation.update(before, ep.class());
            self.note_down(ep);
            pool.sched.remove(addr);
            self.settle(pool);
            let Some(ep) = pool.endpoints.get_mut(addr) else {
                return;
            };
            if ep.recovering {
                return;
            }
            ep.recovering = true;
            warn!(%addr, reason = why, "endpoint unreachable; skipping it until it reconnects");
            match self.dialer(addr) {
                Ok(d) => d,
                Err(_) => return,
            }
        };
        self.spawn_connect(addr.clone(), generation, dialer, None);
    }

    /// Connects in the background and proves the connection with a health
    /// check. With `warm`, the endpoint is new and calls may already wait
    /// on its lazy connection: that one is connected ahead of (or beside)
    /// its first call and installed. Without, the endpoint is down and a
    /// fresh connection replaces its old one once it answers. Stops when
    /// the endpoint is removed.
    fn spawn_connect(&self, addr: Addr, generation: u64, dialer: Dialer, warm: Option<Conn>) {
        let recover = warm.is_none();
        let weak = Arc::downgrade(&self.inner);
        let limit = self.inner.cfg.connect_timeout;
        tokio::spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
            let mut first = true;
            loop {
                let conn = match &warm {
                    Some(lazy) if first || dialer.reuses_lazy() => lazy.clone().ready().await,
                    _ => dialer.dial().await,
                };
                first = false;
                let result = match conn {
                    Ok(conn) => probe(conn, limit).await,
                    Err(e) => Err(e),
                };
                let Some(inner) = weak.upgrade() else { return };
                let me = Balancer { inner };
                if me.connected(&addr, generation, result, recover) {
                    return;
                }
                drop(me);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        });
    }

    /// Applies a background connection attempt; returns whether to stop.
    fn connected(
        &self,
        addr: &Addr,
        generation: u64,
        result: Result<Conn, String>,
        recover: bool,
    ) -> bool {
        let mut pool = self.pool();
        let pool = &mut *pool;
        let Some(ep) = pool.endpoints.get_mut(addr) else {
            return true;
        };
        if ep.generation != generation {
            return true;
        }
        match result {
            Ok(conn) => {
                ep.conn = Some(conn);
                if recover || !ep.up {
                    if let Some(m) = &self.inner.cfg.metrics {
                        m.transition(&self.inner.cfg.service, Some(ep.up), Some(true));
                    }
                    let before = ep.class();
                    ep.up = true;
                    pool.rotation.update(before, ep.class());
                    ep.since = Instant::now();
                    if ep.schedulable(pool.panic) {
                        pool.sched.set(addr.clone(), ep.weight);
                    }
                    info!(%addr, "endpoint reachable again");
                }
                ep.recovering = false;
                self.settle(pool);
                true
            }
            Err(e) if !recover && ep.up => {
                // First connection failed: skip it like any other
                // unreachable endpoint until it answers.
                let before = ep.class();
                ep.up = false;
                pool.rotation.update(before, ep.class());
                self.note_down(ep);
                ep.recovering = true;
                pool.sched.remove(addr);
                warn!(%addr, error = %e, "cannot connect to new endpoint; skipping it until it answers");
                self.settle(pool);
                false
            }
            Err(e) => {
                debug!(%addr, error = %e, "still unreachable");
                false
            }
        }
    }

    /// Sends one call with retries; see the module docs. Each attempt is
    /// [`Balancer::attempt`]; whether to go again is the policy's pure
    /// [`RetryPolicy::decide`], then the budget's say.
    async fn send(self, req: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        let (mut parts, body) = req.into_parts();
        // Only the first attempt carries the caller's extensions (the
        // channels below ignore them): cloning them per call cost an
        // allocation that a profile showed on every call.
        let mut extensions = Some(std::mem::take(&mut parts.extensions));
        let deadline = parts
            .headers
            .get(&GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(grpc_timeout)
            .map(|d| Instant::now() + d);
        if let Some(b) = &self.inner.budget {
            b.deposit();
        }
        let bytes = match replayable(body)? {
            Ok(bytes) => bytes,
            // A request stream still open (client- or bidi-streaming), or
            // past the replay cap: sent once, as it comes, never retried.
            Err(body) => {
                let picked = self.pick(None)?;
                let mut req = http::Request::from_parts(parts, body);
                if let Some(ext) = extensions.take() {
                    *req.extensions_mut() = ext;
                }
                return match self.attempt(picked, req, false, None, deadline).await {
                    Outcome::Answered(resp) => Ok(resp),
                    Outcome::Failed(_, status) | Outcome::DeadlineExceeded(status) => {
                        Err(status.into())
                    }
                };
            }
        };
        let policy = &self.inner.cfg.retry;
        let retryable = policy.is_retryable(parts.uri.path());
        let mut tries = Tries::default();
        let mut avoid: Option<Addr> = None;
        loop {
            let picked = self.pick(avoid.as_ref())?;
            let make = || {
                let mut req = http::Request::new(Body::new(Replay(Some(bytes.clone()))));
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = parts.uri.clone();
                *req.version_mut() = parts.version;
                *req.headers_mut() = parts.headers.clone();
                req
            };
            let mut req = make();
            if let Some(ext) = extensions.take() {
                *req.extensions_mut() = ext;
            }
            let first = avoid.is_none() && tries == Tries::default();
            let hedger = self.hedger(parts.uri.path(), retryable);
            let (addr, outcome) = match hedger {
                Some(h) if first => self.hedged(h, picked, req, make, deadline).await,
                _ => {
                    let addr = picked.addr.clone();
                    let out = self.attempt(picked, req, retryable, hedger, deadline);
                    (addr, out.await)
                }
            };
            let (failed, status) = match outcome {
                Outcome::Answered(resp) => return Ok(resp),
                Outcome::DeadlineExceeded(status) => return Err(status.into()),
                Outcome::Failed(failed, status) => (failed, status),
            };
            let endpoints = self.len();
            let decision = policy.decide(
                retryable,
                failed,
                &mut tries,
                endpoints,
                Instant::now(),
                deadline,
                crate::retry::random(),
            );
            // An unsent call put no load on any server: the budget is not
            // asked (the policy bounds its tries, the deadline its time).
            let pause = match decision {
                Decision::Retry(pause) if failed == Failed::Unsent || self.may_retry() => pause,
                Decision::Retry(_) | Decision::Return => return Err(status.into()),
                Decision::DeadlineExceeded => {
                    return Err(Status::deadline_exceeded(status.message().to_owned()).into())
                }
            };
            debug!(%addr, ?failed, attempt = tries.lost, "retrying on another endpoint");
            self.count_retry(match failed {
                Failed::Unsent => RetryReason::Unsent,
                Failed::Lost => RetryReason::Lost,
                Failed::Silent => RetryReason::Silent,
                Failed::Refused => RetryReason::Answered,
            });
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            avoid = Some(addr);
        }
    }

    /// The hedging record of the method at `path`, when hedging and the
    /// call is retryable.
    fn hedger(&self, path: &str, retryable: bool) -> Option<&Hedger> {
        self.inner
            .hedgers
            .as_ref()
            .filter(|_| retryable)
            .and_then(|h| h.get(path))
    }

    /// Sends one attempt to the picked endpoint and says what happened.
    /// Marks the endpoint down on connection-level evidence only, and feeds
    /// its metrics and failure streak.
    ///
    /// A retryable call's attempt is watched: past its per-try bound, the
    /// same connection is probed with a health check. A server that answers
    /// is alive and merely slow, so the attempt keeps waiting (to the
    /// deadline); one that does not is behind a silent connection (a
    /// partition drops packets, no reset comes) and costs one bounded
    /// attempt, not the whole deadline. An answered attempt's latency goes
    /// to `hedger`, the method's hedging record, when it has one.
    pub(crate) async fn attempt(
        &self,
        picked: Picked,
        req: http::Request<Body>,
        retryable: bool,
        hedger: Option<&Hedger>,
        deadline: Option<Instant>,
    ) -> Outcome {
        let Picked {
            addr,
            conn,
            generation,
            metrics,
            tracker,
            load,
        } = picked;
        let policy = &self.inner.cfg.retry;
        let per_try = policy.per_try_timeout.filter(|_| retryable);
        if let Some(m) = &metrics {
            m.attempt();
        }
        // The clock is read only for what needs it: latency metrics, the
        // load-aware picker and the per-try bound.
        let sent_at =
            (metrics.is_some() || per_try.is_some() || load.is_some() || hedger.is_some())
                .then(Instant::now);
        let took = || sent_at.map_or(Duration::ZERO, |t| t.elapsed());
        // Counted in flight until this attempt ends (for a streamed answer:
        // at its headers), then its latency is recorded; a failure costs
        // the failure penalty.
        let _in_flight = load.as_deref().map(|l| l.start(&self.inner.in_flight));
        let _gauge = metrics
            .as_ref()
            .filter(|_| load.is_some())
            .map(EndpointMetrics::in_flight);
        // A call that waits for its endpoint's first connection measures
        // the dial too: not the server's latency.
        let dialing = matches!(conn, Conn::Dialing(_));
        let observe = |failed: bool| {
            if dialing && !failed {
                return;
            }
            if let (Some(l), Some(cfg), Some(at)) = (&load, self.inner.cfg.picker.load(), sent_at) {
                let now = Instant::now();
                l.observe(now.saturating_duration_since(at), failed, now, cfg);
                if let Some(m) = &metrics {
                    m.estimate(l.estimate(now, cfg));
                }
            }
        };
        let enforced = conn.enforces_deadline();
        // The watch probes the attempt's own connection (the pool's may
        // have been replaced, or the endpoint removed, meanwhile).
        let watched = per_try.map(|_| conn.clone());
        let attempt = async {
            let resp = conn.send(req).await.map_err(Lost::Send)?;
            if retryable {
                read_whole(resp, RESPONSE_CAP).await.map_err(Lost::Body)
            } else {
                Ok(Read::Streaming(resp))
            }
        };
        let sent = match (per_try.zip(watched), deadline) {
            (Some((bound, conn)), _) => {
                let started = sent_at.unwrap_or_else(Instant::now);
                watch(attempt, conn, started, bound, deadline).await
            }
            // hyper's sender does not read `grpc-timeout`: bound it here.
            (None, Some(at)) if !enforced => match tokio::time::timeout_at(at, attempt).await {
                Ok(sent) => Watched::Done(sent),
                Err(_) => Watched::DeadlineExceeded,
            },
            (None, _) => Watched::Done(attempt.await),
        };
        let deadline_exceeded = || {
            // The caller's deadline, not evidence against the server: the
            // endpoint stays up and keeps its connection.
            observe(false);
            if let Some(m) = &metrics {
                m.answered(took(), Some(Code::DeadlineExceeded));
            }
            Outcome::DeadlineExceeded(Status::deadline_exceeded(format!(
                "{addr}: no answer within the call's deadline"
            )))
        };
        let sent = match sent {
            Watched::Done(sent) => sent,
            Watched::DeadlineExceeded => return deadline_exceeded(),
            Watched::Silent(why) => {
                observe(true);
                if let Some(m) = &metrics {
                    m.answered(took(), Some(Code::Unavailable));
                }
                self.mark_down(&addr, generation, &why);
                return Outcome::Failed(
                    Failed::Silent,
                    Status::unavailable(format!(
                        "{addr}: no answer within the per-try timeout, and {why}"
                    )),
                );
            }
        };
        match sent {
            // The channel enforces `grpc-timeout` itself: its expiry is the
            // caller's deadline, not a broken connection.
            Err(Lost::Send(e) | Lost::Body(e)) if timed_out(&*e) => deadline_exceeded(),
            Err(Lost::Send(e)) => {
                observe(true);
                if let Some(m) = &metrics {
                    m.answered(took(), Some(Code::Unavailable));
                }
                let failed = if not_sent(&*e) {
                    Failed::Unsent
                } else {
                    Failed::Lost
                };
                self.mark_down(&addr, generation, &e.to_string());
                Outcome::Failed(failed, Status::unavailable(format!("{addr}: {e}")))
            }
            // Sent, and the server died before the response ended (SIGKILL
            // after the headers): the call is lost, not failed.
            Err(Lost::Body(e)) => {
                observe(true);
                if let Some(m) = &metrics {
                    m.answered(took(), Some(Code::Unavailable));
                }
                self.mark_down(&addr, generation, &e.to_string());
                Outcome::Failed(Failed::Lost, Status::unavailable(format!("{addr}: {e}")))
            }
            // The status is in the headers (trailers-only: how a server
            // refuses a call) or, for a response read whole, in the
            // trailers.
            Ok(read) => {
                // A response streaming through (not read whole) is
                // committed: whatever its code, it is not retried.
                let (resp, trailer_code, whole) = match read {
                    Read::Whole(resp, code) => (resp, code, true),
                    Read::Streaming(resp) => (resp, None, false),
                };
                let code = code_of(resp.headers()).or(trailer_code);
                let failed = code.is_some_and(|c| verdict(c) == Verdict::Failure);
                observe(failed);
                if let (Some(h), false) = (hedger, failed) {
                    h.record(took());
                }
                if let Some(m) = &metrics {
                    m.answered(took(), code);
                }
                if let (Some(t), Some(code)) = (&tracker, code) {
                    t.observe(code);
                }
                match code {
                    Some(code) if retryable && whole && policy.retryable_codes.contains(&code) => {
                        Outcome::Failed(
                            Failed::Refused,
                            Status::new(code, format!("{addr} answered {code:?}")),
                        )
                    }
                    // The status comes with the trailers of a streamed
                    // answer: count it when they pass.
                    None => Outcome::Answered(match (metrics, tracker) {
                        (None, None) => resp,
                        (m, t) => OnStatus::wrap(resp, Observer(m, t)).map(Body::new),
                    }),
                    Some(_) => Outcome::Answered(resp),
                }
            }
        }
    }
}

/// Why no endpoint can take a call, naming the cause: none registered,
/// all draining, all unreachable, all ejected, or the mix.
fn why_none<'a>(service: &str, endpoints: impl Iterator<Item = &'a Ep>) -> String {
    let (mut total, mut draining, mut down, mut ejected) = (0, 0, 0, 0);
    for e in endpoints {
        total += 1;
        if e.weight == 0 {
            draining += 1;
        } else if !e.up {
            down += 1;
        } else if e.ejected_until.is_some() {
            ejected += 1;
        }
    }
    match total {
        0 => format!("no endpoints registered for {service}"),
        n if draining == n => format!("all {n} endpoints of {service} are draining (weight 0)"),
        n if down == n => format!("all {n} endpoints of {service} are unreachable"),
        n if ejected == n => {
            format!("all {n} endpoints of {service} are ejected (they failed calls in a row)")
        }
        n => format!(
            "none of the {n} endpoints of {service} can take a call: \
             {draining} draining (weight 0), {down} unreachable, {ejected} ejected"
        ),
    }
}

/// What one attempt came to.
pub(crate) enum Outcome {
    /// A response to hand back (success, or an answer not retried).
    Answered(http::Response<Body>),
    /// Failed in a way the retry decision weighs.
    Failed(Failed, Status),
    /// The call's deadline passed.
    DeadlineExceeded(Status),
}

/// Proves a fresh connection reaches a gRPC server with
/// [`etcd_lb_registry::health`]'s rule: any gRPC-level answer to a health check
/// (even UNIMPLEMENTED from a server without the health service, as the
/// original Go servers are) counts; a TCP connection alone, or an answer
/// that is not gRPC, does not.
async fn probe(conn: Conn, limit: Duration) -> Result<Conn, String> {
    match etcd_lb_registry::health::check(conn.clone(), limit).await {
        etcd_lb_registry::health::Outcome::Failed(why) => Err(format!("health check: {why}")),
        _ => Ok(conn),
    }
}

/// Reports a streamed answer's status to the endpoint's metrics and its
/// failure streak.
struct Observer(Option<EndpointMetrics>, Option<Arc<Tracker>>);

impl Report for Observer {
    fn report(self, code: Code) {
        if let Some(m) = self.0 {
            m.report(code);
        }
        if let Some(t) = self.1 {
            t.observe(code);
        }
    }
}

/// Why an attempt did not bring back a whole response.
enum Lost {
    /// The request failed in the channel (maybe before it was sent).
    Send(BoxError),
    /// The response started but its body broke off.
    Body(BoxError),
}

impl tower::Service<http::Request<Body>> for Balancer {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Picking happens per call (and per retry), so a call never waits
        // for an endpoint that died between readiness and the call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}
