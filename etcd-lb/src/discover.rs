//! Feeds a [`Balancer`] from etcd: the registry's reflector lists and
//! watches `<root><service>/`, and each event becomes an upsert or removal.
//!
//! Schema rules come from the registry (legacy values count with weight
//! 100, invalid values are skipped with a warning, the key suffix is the
//! address). On top of them:
//! - [`DiscoveryConfig::version_req`]: only endpoints whose version matches
//!   a semver requirement are used (canaries); a non-semver version never
//!   matches;
//! - static stability: while etcd is unreachable the reflector emits
//!   nothing, so the balancer keeps its last endpoints;
//! - freshness: the age of the last event or progress notice is watched,
//!   and a view older than `stale_after` is logged once, as is its recovery;
//! - operator overrides ([`crate::overrides`]): an endpoint's weight is the
//!   override's while one applies to its registration (drain: 0), else the
//!   registered one; a change of an override, or its expiry, re-weighs
//!   only the endpoints it names. The registry's first list is applied
//!   with the overrides' first list (waiting up to
//!   [`etcd_lb_registry::overrides::FIRST_LIST_WAIT`] for it).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_registry::overrides::effective_weight;
use etcd_lb_registry::schema::{Addr, ServiceName};
use etcd_lb_registry::watcher::{Entry, Event, WatchState, Watcher, WatcherConfig};
use semver::{Version, VersionReq};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::balance::{Balancer, BalancerConfig, Change, LOUD_BATCH};
use crate::metrics::ClientMetrics;

/// What to discover.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Schema root, normally `/ns/`.
    pub root: String,
    /// The service to balance over.
    pub service: ServiceName,
    /// Keep only endpoints whose version satisfies this.
    pub version_req: Option<VersionReq>,
    /// Log the view as stale when etcd has been silent this long.
    pub stale_after: Duration,
    /// Where operators' overrides live ([`etcd_lb_registry::overrides`]);
    /// `None`: ignore overrides.
    pub overrides_root: Option<String>,
}

impl DiscoveryConfig {
    /// Defaults: `/ns/`, no version filter, stale after 10 s.
    pub fn new(service: ServiceName) -> Self {
        Self {
            root: etcd_lb_registry::schema::DEFAULT_ROOT.to_owned(),
            service,
            version_req: None,
            stale_after: Duration::from_secs(10),
            overrides_root: Some(etcd_lb_registry::overrides::DEFAULT_ROOT.to_owned()),
        }
    }
}

/// Why [`Discovery::wait_synced`] gave up: etcd was never reached, or it
/// was reached but the first list did not complete in time.
#[derive(Debug, Clone, thiserror::Error)]
#[error("discovery of {service} has no list from etcd after {waited:?}: {why}")]
pub struct NotSynced {
    /// The service being discovered.
    pub service: String,
    /// How long it waited.
    pub waited: Duration,
    /// What it knows: whether etcd answered at all.
    pub why: &'static str,
}

/// Starts a client of one service: a [`Balancer`] (for a generated tonic
/// client to wrap) fed by a [`Discovery`] of that service, the service
/// named once (the balancer's [`BalancerConfig::service`] is set from
/// `discovery`). Runs until `cancel`.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use etcd_lb::{BalancerConfig, CancellationToken, DiscoveryConfig, EtcdConfig, RetryPolicy, ServiceName};
///
/// let (balancer, discovery) = etcd_lb::connect(
///     EtcdConfig::plain(["127.0.0.1:2379"]),
///     DiscoveryConfig::new(ServiceName::new("echo")?),
///     BalancerConfig { retry: RetryPolicy::idempotent(["/echo.Echo/Say"]), ..Default::default() },
///     CancellationToken::new(),
/// );
/// discovery.wait_synced(Duration::from_secs(5)).await?;
/// // let mut client = EchoClient::new(balancer);
/// # Ok(()) }
/// ```
///
/// # Panics
/// Outside a Tokio runtime.
pub fn connect(
    etcd: EtcdConfig,
    discovery: DiscoveryConfig,
    mut balancer: BalancerConfig,
    cancel: CancellationToken,
) -> (Balancer, Discovery) {
    balancer.service = discovery.service.to_string();
    let balancer = Balancer::new(balancer);
    let discovery = Discovery::spawn(etcd, discovery, balancer.clone(), cancel);
    (balancer, discovery)
}

/// Whether `version` satisfies `req` (no requirement: everything does).
pub fn version_matches(req: Option<&VersionReq>, version: &str) -> bool {
    match req {
        None => true,
        Some(req) => Version::parse(version.trim_start_matches('v')).is_ok_and(|v| req.matches(&v)),
    }
}

/// A running discovery: its freshness and sync state.
#[derive(Debug, Clone)]
pub struct Discovery {
    service: ServiceName,
    state: watch::Receiver<WatchState>,
    /// Set once the first full list has been applied to the balancer (not
    /// merely received), so callers that wait for it see the endpoints.
    applied: watch::Receiver<bool>,
}

impl Discovery {
    /// Starts watching and feeding `balancer` until `cancel`. Prefer
    /// [`crate::connect`], which names the service once for both.
    ///
    /// # Panics
    /// Outside a Tokio runtime.
    pub fn spawn(
        etcd: EtcdConfig,
        cfg: DiscoveryConfig,
        balancer: Balancer,
        cancel: CancellationToken,
    ) -> Self {
        let overrides = cfg.overrides_root.clone().map(|root| {
            etcd_lb_registry::overrides::spawn_watch(
                etcd.clone(),
                root,
                Some(cfg.service.clone()),
                cancel.clone(),
            )
        });
        let watcher = Watcher::new(etcd, WatcherConfig::service(&cfg.root, &cfg.service));
        let (mut events, state, _task) = watcher.spawn(cancel.clone());
        let span = tracing::info_span!("discovery", service = %cfg.service);
        let req = cfg.version_req.clone();
        let metrics = balancer.metrics().map(|m| (m, cfg.service.to_string()));
        let (applied_tx, applied) = watch::channel(false);
        balancer.set_empty_reason(Some(
            "discovery has no list from etcd yet (etcd not reached, or still listing)".into(),
        ));
        let service = cfg.service.clone();
        let cfg_service = cfg.service.clone();
        tokio::spawn(
            async move {
                let mut view = View {
                    req,
                    excluded: HashSet::new(),
                    known: HashMap::new(),
                    overrides: Arc::default(),
                    service: cfg_service.clone(),
                };
                let mut overrides = overrides;
                // The registry's first list is applied with the overrides'
                // first list, never before it: a drained endpoint gets no
                // call from a client that just started.
                if let Some(rx) = overrides.as_mut() {
                    let wait = etcd_lb_registry::overrides::FIRST_LIST_WAIT;
                    if !etcd_lb_registry::overrides::first_list(rx, wait).await {
                        warn!(?wait, "operators' overrides not listed in time (etcd unreachable, or no read permission on the overrides prefix); using registered weights until they are");
                    }
                    view.overrides = rx.borrow_and_update().clone();
                }
                // Whatever has queued up is applied as one batch (a list of
                // 100,000 keys takes one lock and one summary line), in order,
                // up to each `Synced`.
                let mut batch = Vec::new();
                loop {
                    let expiry = view.next_expiry();
                    tokio::select! {
                        event = events.recv() => {
                            let Some(event) = event else { break };
                            batch.push(event);
                        }
                        changed = async {
                            match overrides.as_mut() {
                                Some(rx) => rx.changed().await,
                                None => std::future::pending().await,
                            }
                        } => {
                            let Some(rx) = overrides.as_mut().filter(|_| changed.is_ok()) else {
                                overrides = None;
                                continue;
                            };
                            let new = rx.borrow_and_update().clone();
                            let old = std::mem::replace(&mut view.overrides, new);
                            let affected: HashSet<Addr> = old
                                .keys()
                                .chain(view.overrides.keys())
                                .map(|(_, a)| a.clone())
                                .collect();
                            view.reweigh(&balancer, affected.iter());
                            continue;
                        }
                        () = async {
                            match expiry {
                                Some(at) => tokio::time::sleep_until(at).await,
                                None => std::future::pending().await,
                            }
                        } => {
                            let names: Vec<Addr> =
                                view.overrides.keys().map(|(_, a)| a.clone()).collect();
                            view.reweigh(&balancer, names.iter());
                            continue;
                        }
                    }
                    while batch.len() < BATCH {
                        match events.try_recv() {
                            Ok(event) => batch.push(event),
                            Err(_) => break,
                        }
                    }
                    let mut from = 0;
                    for (i, event) in batch.iter().enumerate() {
                        if let Event::Synced { revision } = event {
                            view.apply(&balancer, &batch[from..i]);
                            from = i + 1;
                            info!(revision, endpoints = balancer.len(), "in sync with etcd");
                            applied_tx.send_replace(true);
                        }
                    }
                    view.apply(&balancer, &batch[from..]);
                    batch.clear();
                    if *applied_tx.borrow() {
                        balancer.set_empty_reason(match (&view.req, view.excluded.len()) {
                            (Some(req), n) if n > 0 => Some(format!(
                                "all {n} registered endpoints are excluded by the version requirement {req}"
                            )),
                            _ => None,
                        });
                    }
                }
            }
            .instrument(span.clone()),
        );
        tokio::spawn(
            watch_freshness(state.clone(), cfg.stale_after, metrics, cancel).instrument(span),
        );
        Self {
            service,
            state,
            applied,
        }
    }

    /// Sync and freshness of the view.
    pub fn state(&self) -> WatchState {
        self.state.borrow().clone()
    }

    /// Waits until the first full list has been applied to the balancer,
    /// or `limit` passes. Calls made before then fail with `UNAVAILABLE`
    /// saying discovery has no list yet; after it, the balancer holds what
    /// etcd held (possibly nothing).
    ///
    /// # Errors
    /// [`NotSynced`], saying whether etcd was reached at all.
    pub async fn wait_synced(&self, limit: Duration) -> Result<(), NotSynced> {
        let mut applied = self.applied.clone();
        let synced = tokio::time::timeout(limit, applied.wait_for(|s| *s))
            .await
            .is_ok_and(|r| r.is_ok());
        if synced {
            return Ok(());
        }
        let state = self.state();
        Err(NotSynced {
            service: self.service.to_string(),
            waited: limit,
            why: if state.connected || state.last_contact.is_some() {
                "etcd answered but the list did not complete"
            } else {
                "etcd not reached (check the endpoints, TLS and credentials; the watcher's warnings say what failed)"
            },
        })
    }
}

/// Most events applied under one lock.
const BATCH: usize = 4096;

/// What discovery keeps to compute effective weights: the registered
/// endpoints in use, the ones the version requirement excludes, and the
/// operators' overrides.
struct View {
    req: Option<VersionReq>,
    excluded: HashSet<Addr>,
    /// Endpoints in use, with the entry their weight and incarnation come
    /// from.
    known: HashMap<Addr, Arc<Entry>>,
    overrides: Arc<etcd_lb_registry::overrides::OverrideMap>,
    service: ServiceName,
}

impl View {
    /// The weight the balancer uses for `entry` (registered `weight`).
    fn weight(&self, addr: &Addr, entry: &Entry, weight: u32) -> u32 {
        effective_weight(
            weight,
            Some(entry),
            self.overrides.get(&(self.service.clone(), addr.clone())),
            SystemTime::now(),
        )
    }

    /// When the next override with an expiry lapses, as a timer instant
    /// (just after it, so it has lapsed when re-weighed).
    fn next_expiry(&self) -> Option<tokio::time::Instant> {
        etcd_lb_registry::overrides::next_expiry(self.overrides.values(), SystemTime::now())
            .map(|d| tokio::time::Instant::now() + d + Duration::from_millis(1))
    }

    /// Upserts `addrs` (those in use) with their effective weights.
    fn reweigh<'a>(&self, balancer: &Balancer, addrs: impl Iterator<Item = &'a Addr>) {
        let changes: Vec<Change<'_>> = addrs
            .filter_map(|addr| {
                let entry = self.known.get(addr)?;
                let m = entry.member.as_ref().ok()?;
                let weight = self.weight(addr, entry, m.weight);
                Some(Change::Upsert {
                    addr,
                    weight,
                    version: &m.version,
                })
            })
            .collect();
        if !changes.is_empty() {
            debug!(endpoints = changes.len(), "overrides changed; re-weighing");
            balancer.apply(changes);
        }
    }

    /// Applies watch events (none of them `Synced`) to the balancer in one
    /// go.
    fn apply(&mut self, balancer: &Balancer, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        let loud = events.len() <= LOUD_BATCH;
        let mut changes: Vec<(Addr, Option<(u32, String)>)> = Vec::with_capacity(events.len());
        for event in events {
            match event {
                Event::Applied(entry) => {
                    let Some((_, addr)) = entry.id.as_ref() else {
                        continue;
                    };
                    self.excluded.remove(addr);
                    match &entry.member {
                        Ok(m) if version_matches(self.req.as_ref(), &m.version) => {
                            self.known.insert(addr.clone(), entry.clone());
                            let weight = self.weight(addr, entry, m.weight);
                            changes.push((addr.clone(), Some((weight, m.version.clone()))));
                        }
                        Ok(m) => {
                            self.excluded.insert(addr.clone());
                            self.known.remove(addr);
                            if loud {
                                info!(%addr, version = %m.version, "version does not match --version-req; not used");
                            } else {
                                debug!(%addr, version = %m.version, "version does not match --version-req; not used");
                            }
                            changes.push((addr.clone(), None));
                        }
                        // The reflector already warned, once per key and revision.
                        Err(_) => {
                            self.known.remove(addr);
                            changes.push((addr.clone(), None));
                        }
                    }
                }
                Event::Removed(entry) => {
                    if let Some((_, addr)) = entry.id.as_ref() {
                        self.excluded.remove(addr);
                        self.known.remove(addr);
                        changes.push((addr.clone(), None));
                    }
                }
                Event::Synced { .. } => {}
            }
        }
        balancer.apply(changes.iter().map(|(addr, up)| match up {
            Some((weight, version)) => Change::Upsert {
                addr,
                weight: *weight,
                version,
            },
            None => Change::Remove(addr),
        }));
    }
}

/// Logs staleness and its recovery; keeps the view's age and revision in
/// the metrics current (once a second).
async fn watch_freshness(
    state: watch::Receiver<WatchState>,
    stale_after: Duration,
    metrics: Option<(Arc<ClientMetrics>, String)>,
    cancel: CancellationToken,
) {
    let mut stale = false;
    let started = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = state.borrow().clone();
        let age = s.age();
        if let Some((m, service)) = &metrics {
            m.view(service, age, s.revision);
        }
        // Before the first sync the view has no age: stale only once the
        // first list is overdue.
        let is_stale = age.map_or(started.elapsed() > stale_after, |a| a > stale_after);
        if is_stale && !stale {
            warn!(age = ?age, connected = s.connected, revision = s.revision,
                  "registry view is stale: etcd silent; serving from the last known endpoints");
        } else if !is_stale && stale {
            info!(age = ?age, revision = s.revision, "registry view fresh again");
        }
        stale = is_stale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_requirements() {
        let req = VersionReq::parse("^1.2").unwrap();
        assert!(version_matches(Some(&req), "1.2.0"));
        assert!(version_matches(Some(&req), "1.9.3"));
        assert!(version_matches(Some(&req), "v1.4.2"));
        assert!(!version_matches(Some(&req), "2.0.0"));
        assert!(!version_matches(Some(&req), "1.1.9"));
        assert!(
            !version_matches(Some(&req), ""),
            "legacy entries never match"
        );
        assert!(!version_matches(Some(&req), "canary"));
        assert!(version_matches(None, ""));
    }
}
