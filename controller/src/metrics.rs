//! Prometheus metrics: counters the reconciler bumps as things happen, and
//! gauges filled from the store at scrape time (so they can never drift
//! from what `/services` shows, and services that left disappear).
//!
//! Counter names are registered without `_total`: prometheus-client adds
//! the suffix (and panics in debug builds when it is already there).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::leader::LeaderState;
use crate::store::{Reason, Store};
use registry::watcher::WatchState;

/// Labels of per-service, per-state gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceState {
    /// Service name.
    pub service: String,
    /// healthy, draining, failing, unknown (a partition by the latest
    /// probe), or invalid (invalid values, overlapping the others).
    pub state: String,
}

/// Labels of per-service series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    /// Service name.
    pub service: String,
}

/// Labels of deletions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeletionLabels {
    /// Service name.
    pub service: String,
    /// Why (see [`crate::store::Reason`]).
    pub reason: String,
}

/// Labels of probes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    /// serving, not_serving, unimplemented, answered, failed.
    pub result: String,
}

/// Every metric of the controller.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Members per service and state.
    pub members: Family<ServiceState, Gauge>,
    /// Keys under the prefix outside the schema.
    pub invalid_keys: Gauge,
    /// Probes by result.
    pub probes: Family<ProbeLabels, Counter>,
    /// Completed probe passes.
    pub passes: Counter,
    /// Deletions by service and reason.
    pub deletions: Family<DeletionLabels, Counter>,
    /// Deletions skipped because the key changed after its probe.
    pub deletions_skipped: Counter,
    /// Safety-valve trips per service.
    pub valve_trips: Family<ServiceLabel, Counter>,
    /// 1 while the service's safety valve holds deletions back.
    pub valve_active: Family<ServiceLabel, Gauge>,
    /// Global safety-valve trips.
    pub global_valve_trips: Counter,
    /// 1 while the global safety valve holds every deletion back.
    pub global_valve_active: Gauge,
    /// 1 while this replica leads.
    pub leader: Gauge,
    /// 1 once synced, while the watch is connected.
    pub etcd_up: Gauge,
    /// Seconds since etcd last confirmed the view.
    pub watch_lag: Gauge<f64, AtomicU64>,
    /// Revision the view reflects.
    pub revision: Gauge,
    /// JSON views built from the store (whole, filtered or one service):
    /// shows whether readers share renders or each pay for their own.
    pub view_renders: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers everything.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Self {
            members: Family::default(),
            invalid_keys: Gauge::default(),
            probes: Family::default(),
            passes: Counter::default(),
            deletions: Family::default(),
            deletions_skipped: Counter::default(),
            valve_trips: Family::default(),
            valve_active: Family::default(),
            global_valve_trips: Counter::default(),
            global_valve_active: Gauge::default(),
            leader: Gauge::default(),
            etcd_up: Gauge::default(),
            watch_lag: Gauge::default(),
            revision: Gauge::default(),
            view_renders: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "registry_members",
            "Registered members per service and state: healthy, draining, failing and unknown (latest probe) add up to all members; invalid counts those whose value is invalid",
            m.members.clone(),
        );
        registry.register(
            "registry_invalid_keys",
            "Keys under the prefix that are not <service>/<addr>",
            m.invalid_keys.clone(),
        );
        registry.register(
            "controller_probes",
            "Health probes by result",
            m.probes.clone(),
        );
        registry.register(
            "controller_probe_passes",
            "Completed probe passes",
            m.passes.clone(),
        );
        registry.register(
            "controller_deletions",
            "Stale entries deleted, by service and reason",
            m.deletions.clone(),
        );
        registry.register(
            "controller_deletions_skipped",
            "Deletions not made because the key changed after its probe",
            m.deletions_skipped.clone(),
        );
        registry.register(
            "controller_safety_valve_trips",
            "Times the safety valve held a service's deletions back",
            m.valve_trips.clone(),
        );
        registry.register(
            "controller_safety_valve_active",
            "1 while the safety valve holds the service's deletions back",
            m.valve_active.clone(),
        );
        registry.register(
            "controller_safety_valve_global_trips",
            "Times the global safety valve held every deletion back (too many members across services looked dead at once)",
            m.global_valve_trips.clone(),
        );
        registry.register(
            "controller_safety_valve_global_active",
            "1 while the global safety valve holds every deletion back",
            m.global_valve_active.clone(),
        );
        registry.register(
            "controller_leader",
            "1 while this replica is the elected leader (the only one that deletes)",
            m.leader.clone(),
        );
        registry.register(
            "controller_etcd_up",
            "1 while the watch on etcd is connected",
            m.etcd_up.clone(),
        );
        registry.register(
            "controller_watch_lag_seconds",
            "Seconds since etcd last confirmed the view (event or progress notice)",
            m.watch_lag.clone(),
        );
        registry.register(
            "controller_view_revision",
            "etcd revision the view reflects",
            m.revision.clone(),
        );
        registry.register(
            "controller_view_renders",
            "JSON views built from the store (whole, filtered or one service) for HTTP readers",
            m.view_renders.clone(),
        );
        Self { registry, ..m }
    }

    /// Refreshes the gauges from the current state and encodes everything
    /// in the Prometheus text format.
    pub fn render(&self, store: &Store, watch: &WatchState, leader: &LeaderState) -> String {
        let (counts, invalid_keys) = store.counts();
        self.members.clear();
        for (service, c) in &counts {
            for (state, n) in [
                ("healthy", c.healthy),
                ("draining", c.draining),
                ("failing", c.failing),
                ("unknown", c.unknown),
                ("invalid", c.invalid),
            ] {
                self.members
                    .get_or_create(&ServiceState {
                        service: service.to_string(),
                        state: state.to_owned(),
                    })
                    .set(n as i64);
            }
        }
        // Counters of known services exist from 0, so rates and alerts
        // work before the first event.
        for service in counts.keys() {
            for reason in [
                Reason::Unreachable,
                Reason::NoLeaseUnreachable,
                Reason::InvalidValue,
            ] {
                let _ = self.deletions.get_or_create(&DeletionLabels {
                    service: service.to_string(),
                    reason: reason.as_str().to_owned(),
                });
            }
            let _ = self.valve_trips.get_or_create(&ServiceLabel {
                service: service.to_string(),
            });
        }
        self.invalid_keys.set(invalid_keys as i64);
        self.valve_active.clear();
        let valves = store.valves();
        for service in counts.keys() {
            let active = valves.contains_key(service);
            self.valve_active
                .get_or_create(&ServiceLabel {
                    service: service.to_string(),
                })
                .set(i64::from(active));
        }
        self.global_valve_active
            .set(i64::from(store.global_valve().is_some()));
        self.leader
            .set(i64::from(leader.valid(Instant::now()).is_some()));
        self.etcd_up.set(i64::from(watch.connected));
        self.watch_lag
            .set(watch.age().map_or(f64::NAN, |a| a.as_secs_f64()));
        self.revision.set(store.revision());
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}
