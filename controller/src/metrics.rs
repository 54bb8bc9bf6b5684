//! Prometheus metrics: counters the reconciler bumps as things happen, and
//! gauges made at scrape time from one read of the store (so they can
//! never drift from what `/services` shows, services that left disappear,
//! and concurrent scrapes never see each other's half-filled families).
//!
//! Counter names are registered without `_total`: prometheus-client adds
//! the suffix (and panics in debug builds when it is already there).

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::Instant;

use crate::leader::LeaderState;
use crate::policy::Reason;
use crate::store::Store;
use etcd_lb_registry::watcher::WatchState;

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
    /// Why (see [`crate::policy::Reason`]).
    pub reason: String,
}

/// Labels of override removals.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LapsedLabels {
    /// expired or incarnation_gone (see [`crate::hygiene::Lapsed`]).
    pub reason: String,
}

/// Labels of probes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    /// serving, not_serving, unimplemented, answered, failed.
    pub result: String,
}

/// How long the counters of a service that left are kept: long enough for
/// every scraper to read their last increments (the deletion that removed
/// its last member, say), short enough that a churning fleet's departed
/// services do not pile up as series.
pub const PRUNE_AFTER: Duration = Duration::from_secs(15 * 60);

/// The controller's counters. Gauges are made fresh for every scrape
/// from one [`MetricsSnapshot`], in a registry of the scrape's own, so
/// concurrent scrapes never see each other's half-filled families.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Probes by result.
    pub probes: Family<ProbeLabels, Counter>,
    /// Completed probe passes.
    pub passes: Counter,
    /// Deletions by service and reason.
    pub deletions: Family<DeletionLabels, Counter>,
    /// Deletions skipped because the key changed after its probe.
    pub deletions_skipped: Counter,
    /// Operators' overrides the leader removed because they can never
    /// apply again, by why.
    pub overrides_removed: Family<LapsedLabels, Counter>,
    /// Safety-valve trips per service.
    pub valve_trips: Family<ServiceLabel, Counter>,
    /// Global safety-valve trips.
    pub global_valve_trips: Counter,
    /// JSON views built from the store (whole, filtered or one service):
    /// shows whether readers share renders or each pay for their own.
    pub view_renders: Counter,
    /// The xDS server's streams, pushes, ACKs and NACKs.
    pub xds: std::sync::Arc<crate::xds::XdsMetrics>,
    /// Services with per-service counters: `None` while in the store, else
    /// since when it has been gone (pruned after [`PRUNE_AFTER`]).
    services: Mutex<HashMap<String, Option<Instant>>>,
}

impl Metrics {
    /// Counters from zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one deletion of `service`'s member for `reason`.
    pub fn count_deletion(&self, service: &str, reason: Reason) {
        self.track(service);
        self.deletions
            .get_or_create(&DeletionLabels {
                service: service.to_owned(),
                reason: reason.as_str().to_owned(),
            })
            .inc();
    }

    /// Counts one override removed by the sweep.
    pub fn count_override_removal(&self, why: crate::hygiene::Lapsed) {
        self.overrides_removed
            .get_or_create(&LapsedLabels {
                reason: why.as_str().to_owned(),
            })
            .inc();
    }

    /// Counts one trip of `service`'s safety valve.
    pub fn count_valve_trip(&self, service: &str) {
        self.track(service);
        self.valve_trips
            .get_or_create(&ServiceLabel {
                service: service.to_owned(),
            })
            .inc();
    }

    /// Makes sure `service`'s counters are pruned some day, even when the
    /// service left before any scrape saw it.
    fn track(&self, service: &str) {
        let mut known = self.services.lock().unwrap_or_else(|p| p.into_inner());
        if !known.contains_key(service) {
            known.insert(service.to_owned(), None);
            self.zero_counters(service);
        }
    }

    /// Makes every per-service counter of `service` exist (from 0).
    fn zero_counters(&self, service: &str) {
        for reason in Reason::ALL {
            let _ = self.deletions.get_or_create(&DeletionLabels {
                service: service.to_owned(),
                reason: reason.as_str().to_owned(),
            });
        }
        let _ = self.valve_trips.get_or_create(&ServiceLabel {
            service: service.to_owned(),
        });
    }

    /// Counters of the services in the store exist from 0, so rates and
    /// alerts work before the first event; those of services gone for
    /// [`PRUNE_AFTER`] are removed.
    fn keep_service_counters<'a>(&self, present: impl Iterator<Item = &'a str>, now: Instant) {
        let mut known = self.services.lock().unwrap_or_else(|p| p.into_inner());
        for since in known.values_mut() {
            since.get_or_insert(now);
        }
        for service in present {
            if let Some(since) = known.get_mut(service) {
                *since = None;
                continue;
            }
            known.insert(service.to_owned(), None);
            self.zero_counters(service);
        }
        known.retain(|service, since| {
            let keep = since.is_none_or(|t| now.duration_since(t) < PRUNE_AFTER);
            if !keep {
                for reason in Reason::ALL {
                    self.deletions.remove(&DeletionLabels {
                        service: service.clone(),
                        reason: reason.as_str().to_owned(),
                    });
                }
                self.valve_trips.remove(&ServiceLabel {
                    service: service.clone(),
                });
            }
            keep
        });
    }

    /// Encodes everything in the Prometheus text format: the counters, and
    /// gauges computed from one read of the store.
    pub fn render(&self, store: &Store, watch: &WatchState, leader: &LeaderState) -> String {
        let snap = store.metrics_snapshot();
        self.keep_service_counters(snap.counts.keys().map(|s| s.as_str()), Instant::now());
        let members = Family::<ServiceState, Gauge>::default();
        let valve_active = Family::<ServiceLabel, Gauge>::default();
        for (service, c) in &snap.counts {
            for (state, n) in [
                ("healthy", c.healthy),
                ("draining", c.draining),
                ("failing", c.failing),
                ("unknown", c.unknown),
                ("invalid", c.invalid),
            ] {
                members
                    .get_or_create(&ServiceState {
                        service: service.to_string(),
                        state: state.to_owned(),
                    })
                    .set(n as i64);
            }
            valve_active
                .get_or_create(&ServiceLabel {
                    service: service.to_string(),
                })
                .set(i64::from(snap.valves.contains(service)));
        }
        let gauge = |v: i64| {
            let g = Gauge::<i64>::default();
            g.set(v);
            g
        };
        let lag = Gauge::<f64, AtomicU64>::default();
        lag.set(watch.age().map_or(f64::NAN, |a| a.as_secs_f64()));

        let mut r = Registry::default();
        r.register(
            "registry_members",
            "Registered members per service and state: healthy, draining, failing and unknown (latest probe) add up to all members; invalid counts those whose value is invalid",
            members,
        );
        r.register(
            "registry_invalid_keys",
            "Keys under the prefix that are not <service>/<addr>",
            gauge(snap.invalid_keys as i64),
        );
        r.register(
            "controller_probes",
            "Health probes by result",
            self.probes.clone(),
        );
        r.register(
            "controller_probe_passes",
            "Completed probe passes",
            self.passes.clone(),
        );
        r.register(
            "controller_deletions",
            "Stale entries deleted, by service and reason",
            self.deletions.clone(),
        );
        r.register(
            "controller_deletions_skipped",
            "Deletions not made because the key changed after its probe",
            self.deletions_skipped.clone(),
        );
        r.register(
            "controller_overrides_removed",
            "Operators' overrides removed by the leader because they can never apply again, by reason (expired, incarnation_gone)",
            self.overrides_removed.clone(),
        );
        r.register(
            "controller_safety_valve_trips",
            "Times the safety valve held a service's deletions back",
            self.valve_trips.clone(),
        );
        r.register(
            "controller_safety_valve_active",
            "1 while the safety valve holds the service's deletions back",
            valve_active,
        );
        r.register(
            "controller_safety_valve_global_trips",
            "Times the global safety valve held every deletion back (too many members across services looked dead at once)",
            self.global_valve_trips.clone(),
        );
        r.register(
            "controller_safety_valve_global_active",
            "1 while the global safety valve holds every deletion back",
            gauge(i64::from(snap.global_valve)),
        );
        r.register(
            "controller_leader",
            "1 while this replica is the elected leader (the only one that deletes)",
            gauge(i64::from(leader.valid(Instant::now()).is_some())),
        );
        r.register(
            "controller_etcd_up",
            "1 while the watch on etcd is connected",
            gauge(i64::from(watch.connected)),
        );
        r.register(
            "controller_watch_lag_seconds",
            "Seconds since etcd last confirmed the view (event or progress notice)",
            lag,
        );
        r.register(
            "controller_view_revision",
            "etcd revision the view reflects",
            gauge(snap.revision),
        );
        r.register(
            "controller_view_renders",
            "JSON views built from the store (whole, filtered or one service) for HTTP readers",
            self.view_renders.clone(),
        );
        self.xds.register(&mut r);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &r) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(m: &Metrics) -> String {
        let mut r = Registry::default();
        r.register("deletions", "d", m.deletions.clone());
        r.register("valve_trips", "v", m.valve_trips.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    /// Defect 4's second half: the counters of a service that left are
    /// pruned once every scraper has had time to read them, and the
    /// counters of services still there stay.
    #[test]
    fn counters_of_services_that_left_are_pruned_after_a_while() {
        let m = Metrics::new();
        let t0 = Instant::now();
        m.keep_service_counters(["stays", "leaves"].into_iter(), t0);
        // Deleted before any scrape saw the service: pruned too.
        m.count_deletion("brief", Reason::Unreachable);
        m.count_valve_trip("leaves");
        let text = counters(&m);
        assert!(
            text.contains(r#"service="leaves""#) && text.contains(r#"service="brief""#),
            "{text}"
        );

        m.keep_service_counters(["stays"].into_iter(), t0 + Duration::from_secs(60));
        let text = counters(&m);
        assert!(
            text.contains(r#"valve_trips_total{service="leaves"} 1"#),
            "kept while scrapers may not have read it yet: {text}"
        );

        m.keep_service_counters(
            ["stays"].into_iter(),
            t0 + PRUNE_AFTER + Duration::from_secs(61),
        );
        let text = counters(&m);
        assert!(
            !text.contains("leaves") && !text.contains("brief"),
            "{text}"
        );
        assert!(
            text.contains(r#"deletions_total{service="stays",reason="unreachable"} 0"#),
            "{text}"
        );

        // A service that comes back starts from 0 again.
        m.keep_service_counters(["stays", "leaves"].into_iter(), t0 + PRUNE_AFTER * 2);
        assert!(counters(&m).contains(r#"valve_trips_total{service="leaves"} 0"#));
    }
}
