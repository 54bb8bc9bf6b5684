//! The controller's picture of the registry: what etcd holds (from the
//! watcher) joined with what probes saw, plus the valves the last plan
//! left. The reconciler writes it, the HTTP view, the metrics (and every
//! other reader) read it. What is stale is decided in [`crate::policy`],
//! how it is shown in [`crate::view`]; this module only holds state.
//!
//! Invariants:
//! - an entry exists here exactly while its key exists in the watcher's
//!   view; probe results for a key that left are dropped;
//! - probe state belongs to the key and survives value updates (a weight
//!   change does not make a dead endpoint look fresh), and goes with the key;
//! - the lock is a plain `RwLock`, never held across an `.await`; every
//!   change bumps a generation number that the HTTP side uses to cache
//!   rendered JSON and to wake `/services/stream`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use etcd_lb_registry::overrides::Overrides;
use etcd_lb_registry::schema::{Addr, ServiceName};
use etcd_lb_registry::watcher::Event;
use tokio::sync::watch;
use tokio::time::Instant;

pub use crate::member::{Members, ProbeState, Tracked};
use crate::policy::{self, Plan, Policy, Valve, Valves};
use crate::probe::Outcome;
use crate::view::{self, Counts, ServicesView};

/// What a probe pass looks at: one key, as it was when the pass started.
#[derive(Debug, Clone)]
pub struct Target {
    /// Service.
    pub service: ServiceName,
    /// Address to probe.
    pub addr: Addr,
    /// Mod revision at the start of the pass.
    pub mod_revision: i64,
    /// Lease (0: none).
    pub lease: i64,
}

#[derive(Debug, Default)]
struct Inner {
    services: Members,
    invalid_keys: BTreeMap<String, String>,
    revision: i64,
    synced: bool,
    /// The valves the last plan left holding.
    valves: Valves,
    passes: u64,
    /// Operators' overrides (by service and address) and splits (by
    /// service).
    overrides: Arc<Overrides>,
}

/// The shared store. Cheap reads; writers hold the lock briefly.
#[derive(Debug)]
pub struct Store {
    inner: RwLock<Inner>,
    generation: watch::Sender<u64>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

/// What one scrape of `/metrics` shows of the store, read at once.
#[derive(Debug, Clone, Default)]
pub struct MetricsSnapshot {
    /// Counts per service.
    pub counts: BTreeMap<ServiceName, Counts>,
    /// Keys outside the schema.
    pub invalid_keys: usize,
    /// Services whose valve holds.
    pub valves: std::collections::BTreeSet<ServiceName>,
    /// Whether the global valve holds.
    pub global_valve: bool,
    /// The revision reflected.
    pub revision: i64,
}

impl Store {
    /// An empty, unsynced store.
    pub fn new() -> Self {
        Self {
            inner: RwLock::new(Inner::default()),
            generation: watch::channel(0).0,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Replaces the operators' overrides and splits (every view and xDS
    /// snapshot re-renders with their effective weights). Called again
    /// with the same snapshot when one expires, so the expiry shows.
    pub fn set_overrides(&self, overrides: Arc<Overrides>) {
        self.write().overrides = overrides;
        self.bump();
    }

    /// Notified on every change; the value is the generation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The current generation (changes with every update).
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Applies one watcher event.
    pub fn apply(&self, event: Event, now: Instant) {
        {
            let mut inner = self.write();
            match event {
                Event::Synced { revision } => {
                    inner.synced = true;
                    inner.revision = inner.revision.max(revision);
                }
                Event::Applied(entry) => {
                    inner.revision = inner.revision.max(entry.mod_revision);
                    match entry.id.clone() {
                        None => {
                            let why = match &entry.member {
                                Err(e) => e.to_string(),
                                Ok(_) => "key outside the schema".to_owned(),
                            };
                            inner.invalid_keys.insert(entry.key.clone(), why);
                        }
                        Some((service, addr)) => {
                            let members = inner.services.entry(service).or_default();
                            let invalid = entry.member.is_err();
                            match members.get_mut(&addr) {
                                Some(t) => {
                                    t.invalid_since = match (invalid, t.invalid_since) {
                                        (false, _) => None,
                                        (true, since) => Some(since.unwrap_or(now)),
                                    };
                                    if t.entry.lease != entry.lease {
                                        t.lease_ttl = None;
                                    }
                                    t.entry = entry;
                                }
                                None => {
                                    members.insert(
                                        addr,
                                        Tracked {
                                            entry,
                                            invalid_since: invalid.then_some(now),
                                            probe: ProbeState::default(),
                                            lease_ttl: None,
                                        },
                                    );
                                }
                            }
                        }
                    }
                }
                Event::Removed(entry) => {
                    inner.revision = inner.revision.max(entry.mod_revision);
                    match &entry.id {
                        None => {
                            inner.invalid_keys.remove(&entry.key);
                        }
                        Some((service, addr)) => {
                            if let Some(members) = inner.services.get_mut(service) {
                                members.remove(addr);
                                if members.is_empty() {
                                    inner.services.remove(service);
                                    inner.valves.services.remove(service);
                                }
                            }
                        }
                    }
                }
            }
        }
        self.bump();
    }

    /// Raises the revision the view is known to reflect (etcd's progress
    /// notices move it without events).
    pub fn observe_revision(&self, revision: i64) {
        let changed = {
            let mut inner = self.write();
            let old = inner.revision;
            inner.revision = old.max(revision);
            inner.revision != old
        };
        if changed {
            self.bump();
        }
    }

    /// Whether a full list has been applied.
    pub fn synced(&self) -> bool {
        self.read().synced
    }

    /// The revision the view reflects.
    pub fn revision(&self) -> i64 {
        self.read().revision
    }

    /// Passes recorded so far.
    pub fn passes(&self) -> u64 {
        self.read().passes
    }

    /// Every key to probe now, with the revision it has now.
    pub fn targets(&self) -> Vec<Target> {
        let inner = self.read();
        inner
            .services
            .iter()
            .flat_map(|(service, members)| {
                members.iter().map(move |(addr, t)| Target {
                    service: service.clone(),
                    addr: addr.clone(),
                    mod_revision: t.entry.mod_revision,
                    lease: t.entry.lease,
                })
            })
            .collect()
    }

    /// Records the outcomes of a pass. Results for keys that left or were
    /// rewritten during the pass still count for the address, but the
    /// revision they vouch for is the one probed.
    pub fn record(&self, results: Vec<(Target, Outcome)>, now: Instant, wall: SystemTime) {
        {
            let mut inner = self.write();
            inner.passes += 1;
            for (target, outcome) in results {
                let Some(t) = inner
                    .services
                    .get_mut(&target.service)
                    .and_then(|m| m.get_mut(&target.addr))
                else {
                    continue;
                };
                let p = &mut t.probe;
                if outcome.is_alive() {
                    p.consecutive_failures = 0;
                    p.failing_since = None;
                } else {
                    p.consecutive_failures = p.consecutive_failures.saturating_add(1);
                    p.failing_since.get_or_insert(now);
                }
                p.last = Some(outcome);
                p.last_at = Some(wall);
                p.probed_mod_revision = target.mod_revision;
            }
        }
        self.bump();
    }

    /// Records lease lookups: lease id -> seconds left (-1: not found).
    pub fn record_lease_ttls(&self, ttls: &HashMap<i64, i64>, at: Instant) {
        {
            let mut inner = self.write();
            for members in inner.services.values_mut() {
                for t in members.values_mut() {
                    if let Some(ttl) = ttls.get(&t.entry.lease) {
                        t.lease_ttl = Some((*ttl, at));
                    }
                }
            }
        }
        // No bump: TTLs are informational and the plan that follows in the
        // same pass bumps; one re-render per pass is enough.
    }

    /// Plans a pass ([`policy::plan`] over the members as they are now)
    /// and keeps the valves it leaves for the next pass and the view.
    pub fn plan(&self, policy: &Policy, now: Instant, wall: SystemTime) -> Plan {
        let plan = {
            let mut inner = self.write();
            let (plan, valves) = policy::plan(&inner.services, &inner.valves, policy, now, wall);
            inner.valves = valves;
            plan
        };
        self.bump();
        plan
    }

    /// The global valve, while it holds.
    pub fn global_valve(&self) -> Option<Valve> {
        self.read().valves.global.clone()
    }

    /// Counts by state per service, and the number of keys outside the
    /// schema.
    pub fn counts(&self) -> (BTreeMap<ServiceName, Counts>, usize) {
        let inner = self.read();
        (counts_of(&inner.services), inner.invalid_keys.len())
    }

    /// What `/metrics` shows, all from one read of the store: counts per
    /// service, keys outside the schema, services whose valve holds,
    /// whether the global valve holds, and the revision.
    pub fn metrics_snapshot(&self) -> MetricsSnapshot {
        let inner = self.read();
        let counts = counts_of(&inner.services);
        let invalid_keys = inner.invalid_keys.len();
        MetricsSnapshot {
            counts,
            invalid_keys,
            valves: inner.valves.services.keys().cloned().collect(),
            global_valve: inner.valves.global.is_some(),
            revision: inner.revision,
        }
    }

    /// Services whose valve is tripped now.
    pub fn valves(&self) -> BTreeMap<ServiceName, Valve> {
        self.read().valves.services.clone()
    }

    /// Whether a service is known.
    pub fn has_service(&self, name: &ServiceName) -> bool {
        self.read().services.contains_key(name)
    }

    /// The whole view, or one service's, optionally only members whose
    /// `healthy` equals `healthy` (see [`view::services_view`]).
    pub fn view(
        &self,
        only: Option<&ServiceName>,
        healthy: Option<bool>,
        now: Instant,
    ) -> ServicesView {
        let inner = self.read();
        view::services_view(
            view::Source {
                members: &inner.services,
                valves: &inner.valves,
                invalid_keys: &inner.invalid_keys,
                revision: inner.revision,
                overrides: &inner.overrides,
            },
            only,
            healthy,
            now,
        )
    }
}

/// Counts by state per service (the view's counting, [`Counts::of`]).
fn counts_of(services: &Members) -> BTreeMap<ServiceName, Counts> {
    services
        .iter()
        .map(|(s, members)| (s.clone(), Counts::of(members.values())))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Budget;
    use crate::policy::Reason;
    use etcd_lb_registry::schema::{self, DEFAULT_ROOT};
    use etcd_lb_registry::watcher::Entry;

    fn entry(service: &str, addr: &str, value: &[u8], lease: i64, rev: i64) -> Arc<Entry> {
        let s = ServiceName::new(service).unwrap();
        let a = Addr::new(addr).unwrap();
        Arc::new(Entry {
            key: schema::key(DEFAULT_ROOT, &s, &a),
            member: schema::parse_value(&a, value),
            id: Some((s, a)),
            lease,
            create_revision: rev,
            mod_revision: rev,
        })
    }

    fn good(service: &str, port: u16, lease: i64, rev: i64) -> Arc<Entry> {
        let addr = format!("127.0.0.1:{port}");
        let v = format!(r#"{{"addr":"{addr}","version":"1","weight":100}}"#);
        entry(service, &addr, v.as_bytes(), lease, rev)
    }

    fn policy() -> Policy {
        Policy {
            dead_after: Duration::from_secs(10),
            budget: Budget::Percent(15.0),
            max_unhealthy_ratio: 0.5,
        }
    }

    /// Probes every target with `f(port)` at `now`.
    fn pass(store: &Store, now: Instant, f: impl Fn(u16) -> Outcome) {
        let results = store
            .targets()
            .into_iter()
            .map(|t| {
                let port: u16 = t.addr.as_str().rsplit_once(':').unwrap().1.parse().unwrap();
                let o = f(port);
                (t, o)
            })
            .collect();
        store.record(results, now, SystemTime::now());
    }

    fn dead() -> Outcome {
        Outcome::Failed("refused".into())
    }

    #[test]
    fn failing_for_dead_after_is_stale_and_recovery_resets() {
        let store = Store::new();
        let t0 = Instant::now();
        for p in 1..=4 {
            store.apply(Event::Applied(good("s", p, 7, p as i64)), t0);
        }
        pass(
            &store,
            t0,
            |p| if p == 1 { dead() } else { Outcome::Serving },
        );
        assert!(store
            .plan(&policy(), t0, SystemTime::now())
            .deletions
            .is_empty());
        let t1 = t0 + Duration::from_secs(5);
        pass(
            &store,
            t1,
            |p| if p == 1 { dead() } else { Outcome::Serving },
        );
        assert!(store
            .plan(&policy(), t1, SystemTime::now())
            .deletions
            .is_empty());
        // Recovery in between resets the clock.
        let t2 = t0 + Duration::from_secs(6);
        pass(&store, t2, |_| Outcome::Serving);
        let t3 = t0 + Duration::from_secs(11);
        pass(
            &store,
            t3,
            |p| if p == 1 { dead() } else { Outcome::Serving },
        );
        assert!(store
            .plan(&policy(), t3, SystemTime::now())
            .deletions
            .is_empty());
        let t4 = t3 + Duration::from_secs(10);
        pass(
            &store,
            t4,
            |p| if p == 1 { dead() } else { Outcome::Serving },
        );
        // Two failed probes, however far apart, are not enough (seed 328
        // of the harness): a third in a row makes it stale.
        assert!(store
            .plan(&policy(), t4, SystemTime::now())
            .deletions
            .is_empty());
        pass(
            &store,
            t4,
            |p| if p == 1 { dead() } else { Outcome::Serving },
        );
        let plan = store.plan(&policy(), t4, SystemTime::now());
        assert_eq!(plan.deletions.len(), 1);
        assert_eq!(plan.deletions[0].reason, Reason::Unreachable);
        assert_eq!(plan.deletions[0].key, "/ns/s/127.0.0.1:1");
    }

    #[test]
    fn alive_answers_never_make_an_entry_stale() {
        let store = Store::new();
        let t0 = Instant::now();
        store.apply(Event::Applied(good("s", 1, 0, 1)), t0);
        store.apply(Event::Applied(good("s", 2, 7, 2)), t0);
        for i in 0..5 {
            let t = t0 + Duration::from_secs(20 * i);
            pass(&store, t, |p| {
                if p == 1 {
                    Outcome::Unimplemented
                } else {
                    Outcome::NotServing
                }
            });
            assert!(store
                .plan(&policy(), t, SystemTime::now())
                .deletions
                .is_empty());
        }
        let view = store.view(None, None, t0);
        let m = &view.services[0].members;
        assert_eq!(
            m[0].healthy,
            Some(true),
            "UNIMPLEMENTED is alive and serving"
        );
        assert_eq!(m[1].healthy, Some(false), "NOT_SERVING is draining");
        assert_eq!(m[1].status, "not_serving");
        assert_eq!(view.services[0].counts.draining, 1);
    }

    #[test]
    fn lease_less_and_silent_is_stale_after_two_failures() {
        let store = Store::new();
        let t0 = Instant::now();
        store.apply(Event::Applied(good("s", 1, 0, 1)), t0);
        store.apply(Event::Applied(good("s", 2, 9, 2)), t0);
        pass(
            &store,
            t0,
            |p| if p == 1 { dead() } else { Outcome::Serving },
        );
        let plan = store.plan(&policy(), t0, SystemTime::now());
        assert!(plan.deletions.is_empty(), "one lost probe is not enough");
        pass(
            &store,
            t0,
            |p| if p == 1 { dead() } else { Outcome::Serving },
        );
        let plan = store.plan(&policy(), t0, SystemTime::now());
        assert_eq!(plan.deletions.len(), 1);
        assert_eq!(plan.deletions[0].reason, Reason::NoLeaseUnreachable);
    }

    #[test]
    fn invalid_values_are_stale_after_dead_after_and_forgiven_when_fixed() {
        let store = Store::new();
        let t0 = Instant::now();
        store.apply(Event::Applied(good("s", 2, 9, 1)), t0);
        store.apply(
            Event::Applied(entry("s", "127.0.0.1:1", br#"{"weight":"x"}"#, 9, 2)),
            t0,
        );
        pass(&store, t0, |_| Outcome::Serving);
        assert!(store
            .plan(&policy(), t0, SystemTime::now())
            .deletions
            .is_empty());
        let view = store.view(None, None, t0);
        let bad = &view.services[0].members[0];
        assert_eq!(bad.kind, "invalid");
        assert!(bad.problems[0].contains("weight is a string"), "{bad:?}");
        assert_eq!(bad.weight, None);

        let t1 = t0 + Duration::from_secs(10);
        pass(&store, t1, |_| Outcome::Serving);
        let plan = store.plan(&policy(), t1, SystemTime::now());
        assert_eq!(plan.deletions.len(), 1);
        assert_eq!(plan.deletions[0].reason, Reason::InvalidValue);

        // Fixed in time: forgiven.
        store.apply(Event::Applied(good("s", 1, 9, 3)), t1);
        pass(&store, t1, |_| Outcome::Serving);
        assert!(store
            .plan(&policy(), t1, SystemTime::now())
            .deletions
            .is_empty());
    }

    #[test]
    fn a_rewrite_after_the_probe_is_not_planned() {
        let store = Store::new();
        let t0 = Instant::now();
        store.apply(Event::Applied(good("s", 1, 0, 1)), t0);
        store.apply(Event::Applied(good("s", 2, 5, 2)), t0);
        pass(
            &store,
            t0,
            |p| if p == 1 { dead() } else { Outcome::Serving },
        );
        pass(
            &store,
            t0,
            |p| if p == 1 { dead() } else { Outcome::Serving },
        );
        // Re-put between probe and plan.
        store.apply(Event::Applied(good("s", 1, 0, 10)), t0);
        assert!(store
            .plan(&policy(), t0, SystemTime::now())
            .deletions
            .is_empty());
    }

    #[test]
    fn safety_valve_trips_and_clears() {
        let store = Store::new();
        let t0 = Instant::now();
        for p in 1..=3 {
            store.apply(Event::Applied(good("s", p, 0, p as i64)), t0);
        }
        pass(
            &store,
            t0,
            |p| if p == 3 { Outcome::Serving } else { dead() },
        );
        let plan = store.plan(&policy(), t0, SystemTime::now());
        assert!(plan.deletions.is_empty());
        assert_eq!(plan.tripped.len(), 1);
        assert_eq!(plan.tripped[0].1.dead, 2);
        assert_eq!(plan.tripped[0].1.withheld, 0, "not stale yet");
        // Still tripped next pass, but logged once.
        pass(
            &store,
            t0,
            |p| if p == 3 { Outcome::Serving } else { dead() },
        );
        let plan = store.plan(&policy(), t0, SystemTime::now());
        assert!(plan.tripped.is_empty() && plan.deletions.is_empty());
        let view = store.view(None, None, t0);
        let valve = view.services[0].safety_valve.clone().unwrap();
        assert_eq!((valve.dead, valve.withheld), (2, 2));
        // One comes back: 1 of 3 dead, the valve closes and deletion resumes.
        pass(
            &store,
            t0,
            |p| if p == 1 { dead() } else { Outcome::Serving },
        );
        let plan = store.plan(&policy(), t0, SystemTime::now());
        assert_eq!(plan.cleared.len(), 1);
        assert_eq!(plan.deletions.len(), 1);
        assert!(store.valves().is_empty());
    }

    #[test]
    fn the_global_valve_holds_single_member_services_and_clears() {
        let store = Store::new();
        let t0 = Instant::now();
        for p in 1..=20u16 {
            store.apply(Event::Applied(good(&format!("s{p}"), p, 7, p as i64)), t0);
        }
        let t1 = t0 + Duration::from_secs(11);
        pass(&store, t0, |_| dead());
        pass(&store, t1, |_| dead());
        pass(&store, t1, |_| dead());
        let plan = store.plan(&policy(), t1, SystemTime::now());
        assert!(plan.deletions.is_empty(), "{:?}", plan.deletions);
        let g = plan.global_tripped.expect("tripped");
        assert_eq!((g.dead, g.members, g.withheld), (20, 20, 20));
        assert!(plan.tripped.is_empty(), "no service has two members");
        assert_eq!(store.view(None, None, t1).safety_valve, Some(g));
        // Still holding, reported once.
        pass(&store, t1, |_| dead());
        let plan = store.plan(&policy(), t1, SystemTime::now());
        assert!(plan.global_tripped.is_none() && plan.deletions.is_empty());
        // 15 of 20 answer again: 25 % dead, the valve closes, the dead go.
        pass(
            &store,
            t1,
            |p| if p <= 5 { dead() } else { Outcome::Serving },
        );
        let plan = store.plan(&policy(), t1, SystemTime::now());
        assert!(plan.global_cleared);
        assert_eq!(plan.deletions.len(), 5);
        assert!(store.global_valve().is_none());
    }

    #[test]
    fn a_single_dead_member_does_not_trip_the_valve() {
        let store = Store::new();
        let t0 = Instant::now();
        store.apply(Event::Applied(good("s", 1, 0, 1)), t0);
        pass(&store, t0, |_| dead());
        pass(&store, t0, |_| dead());
        let plan = store.plan(&policy(), t0, SystemTime::now());
        assert_eq!(plan.deletions.len(), 1);
        assert!(plan.tripped.is_empty());
    }

    #[test]
    fn budget_bounds_deletions_per_service_oldest_first() {
        let store = Store::new();
        let t0 = Instant::now();
        // 20 members, 5 dead (25 % < 50 %): budget 15 % = 3.
        for p in 1..=20u16 {
            store.apply(Event::Applied(good("s", p, 7, p as i64)), t0);
        }
        store.apply(Event::Applied(good("other", 1, 0, 100)), t0);
        for (i, p) in [5u16, 4, 3, 2, 1].iter().enumerate() {
            let t = t0 + Duration::from_secs(i as u64);
            let results = store
                .targets()
                .into_iter()
                .filter(|t| {
                    t.service.as_str() == "s" && t.addr.as_str().ends_with(&format!(":{p}"))
                })
                .map(|t| (t, dead()))
                .collect();
            store.record(results, t, SystemTime::now());
        }
        for _ in 0..2 {
            pass(&store, t0 + Duration::from_secs(30), |p| {
                if p <= 5 {
                    dead()
                } else {
                    Outcome::Serving
                }
            });
        }
        // "other" (lease-less, dead, alone) has its own budget.
        let plan = store.plan(&policy(), t0 + Duration::from_secs(30), SystemTime::now());
        let s: Vec<&str> = plan
            .deletions
            .iter()
            .filter(|d| d.service.as_str() == "s")
            .map(|d| d.addr.as_str())
            .collect();
        assert_eq!(
            s,
            ["127.0.0.1:5", "127.0.0.1:4", "127.0.0.1:3"],
            "longest dead first"
        );
        assert_eq!(plan.deferred, 2);
        assert_eq!(
            plan.deletions
                .iter()
                .filter(|d| d.service.as_str() == "other")
                .count(),
            1
        );
    }

    #[test]
    fn invalid_keys_and_removal() {
        let store = Store::new();
        let t0 = Instant::now();
        let bad = Arc::new(Entry {
            key: "/ns/Bad Name/x".into(),
            id: None,
            member: Err(schema::SchemaError::Key {
                key: "/ns/Bad Name/x".into(),
                reason: "bad service name",
            }),
            lease: 0,
            create_revision: 1,
            mod_revision: 1,
        });
        store.apply(Event::Applied(bad.clone()), t0);
        store.apply(Event::Applied(good("s", 1, 3, 2)), t0);
        store.apply(Event::Synced { revision: 2 }, t0);
        let v = store.view(None, None, t0);
        assert_eq!(v.invalid_keys.len(), 1);
        assert_eq!(v.revision, 2);
        assert!(store.targets().len() == 1, "invalid keys are never probed");
        store.apply(Event::Removed(bad), t0);
        store.apply(Event::Removed(good("s", 1, 3, 2)), t0);
        let v = store.view(None, None, t0);
        assert!(v.invalid_keys.is_empty() && v.services.is_empty());
    }

    #[test]
    fn view_fields_and_filters() {
        let store = Store::new();
        let t0 = Instant::now();
        store.apply(Event::Applied(good("b", 2, 0x2a, 1)), t0);
        store.apply(
            Event::Applied(entry("a", "127.0.0.1:1", b"127.0.0.1:1", 0, 2)),
            t0,
        );
        let v = store.view(None, None, t0);
        assert_eq!(v.services[0].name.as_str(), "a", "sorted by name");
        let legacy = &v.services[0].members[0];
        assert_eq!(legacy.kind, "legacy");
        assert_eq!(legacy.healthy, None);
        assert_eq!(legacy.lease, None);
        assert!(legacy.problems.iter().any(|p| p.contains("legacy")));
        assert!(legacy.problems.iter().any(|p| p.contains("no lease")));
        let mut ttls = HashMap::new();
        ttls.insert(0x2a, 9);
        store.record_lease_ttls(&ttls, t0);
        let v = store.view(None, None, t0 + Duration::from_secs(4));
        let m = &v.services[1].members[0];
        assert_eq!(m.lease.as_deref(), Some("2a"));
        assert_eq!(m.ttl, Some(5));
        pass(
            &store,
            t0,
            |p| if p == 1 { dead() } else { Outcome::Serving },
        );
        let b = ServiceName::new("b").unwrap();
        let only = store.view(Some(&b), Some(true), t0);
        assert_eq!(only.services.len(), 1);
        assert_eq!(only.services[0].members.len(), 1);
        let unhealthy_b = store.view(Some(&b), Some(false), t0);
        assert!(unhealthy_b.services[0].members.is_empty());
        assert_eq!(unhealthy_b.services[0].counts.members, 1);
    }

    /// A split service's members show their lane and their weight under
    /// the split (after a drain), and the service shows the split; the
    /// `healthy` filter cuts members after the split is computed, so a
    /// filtered view shows the same weights.
    #[test]
    fn the_view_applies_a_split_over_effective_weights() {
        use etcd_lb_registry::overrides::{
            parse_split_value, EndpointOverride, Overrides, SplitApplies,
        };
        let store = Store::new();
        let t0 = Instant::now();
        for (port, version, weight) in [
            (1, "1.0.0", 100),
            (2, "1.0.0", 300),
            (3, "2.0.0", 100),
            (4, "2.0.0", 100),
        ] {
            let addr = format!("127.0.0.1:{port}");
            let v = format!(r#"{{"addr":"{addr}","version":"{version}","weight":{weight}}}"#);
            store.apply(Event::Applied(entry("s", &addr, v.as_bytes(), 7, 1)), t0);
        }
        let s = ServiceName::new("s").unwrap();
        let mut ov = Overrides::default();
        ov.splits.insert(
            s.clone(),
            parse_split_value(br#"{"lanes":[{"version":"2.0.0","percent":10}],"by":"ops","at":"2026-12-07T00:00:00Z"}"#)
                .unwrap(),
        );
        // One canary drained: the other takes the whole 10 %.
        ov.endpoints.insert(
            (s.clone(), Addr::new("127.0.0.1:4").unwrap()),
            EndpointOverride {
                drain: true,
                weight: None,
                incarnation: None,
                reason: String::new(),
                by: "ops".into(),
                at: "2026-12-07T00:00:00Z".into(),
                expires: None,
            },
        );
        store.set_overrides(Arc::new(ov));
        let v = store.view(None, None, t0);
        let svc = &v.services[0];
        let split = svc.split.as_ref().expect("the split shown");
        assert_eq!(split.applies, SplitApplies::Yes);
        assert_eq!(split.describe, "2.0.0=10 rest=90");
        assert_eq!((split.sides[0].endpoints, split.sides[1].endpoints), (1, 2));
        let got: Vec<(Option<u32>, Option<&str>)> = svc
            .members
            .iter()
            .map(|m| (m.weight, m.lane.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(225_000), Some("rest")),
                (Some(675_000), Some("rest")),
                (Some(100_000), Some("2.0.0")),
                (Some(0), Some("2.0.0")),
            ]
        );
        assert_eq!(svc.members[3].registered_weight, Some(100));
        pass(
            &store,
            t0,
            |p| if p == 1 { dead() } else { Outcome::Serving },
        );
        let healthy = store.view(Some(&s), Some(true), t0);
        assert_eq!(healthy.services[0].members[0].weight, Some(675_000));
        // Unsplit: plain effective weights, no lanes.
        store.set_overrides(Arc::default());
        let v = store.view(None, None, t0);
        assert!(v.services[0].split.is_none());
        assert_eq!(v.services[0].members[2].weight, Some(100));
        assert!(v.services[0].members.iter().all(|m| m.lane.is_none()));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Put {
                svc: u8,
                port: u16,
                value: Vec<u8>,
                lease: bool,
            },
            Delete {
                svc: u8,
                port: u16,
            },
            Probe {
                alive_mask: u32,
                advance_ms: u64,
            },
            BadKey(Vec<u8>),
        }

        fn op() -> impl Strategy<Value = Op> {
            let value = prop_oneof![
                Just(br#"{"weight":100}"#.to_vec()),
                Just(br#"{"weight":"x"}"#.to_vec()),
                Just(b"127.0.0.1:1".to_vec()),
                Just(b"[1,2]".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..40),
            ];
            prop_oneof![
                (0u8..3, 1u16..8, value, any::<bool>()).prop_map(|(svc, port, value, lease)| {
                    Op::Put {
                        svc,
                        port,
                        value,
                        lease,
                    }
                }),
                (0u8..3, 1u16..8).prop_map(|(svc, port)| Op::Delete { svc, port }),
                (any::<u32>(), 0u64..6000).prop_map(|(alive_mask, advance_ms)| Op::Probe {
                    alive_mask,
                    advance_ms
                }),
                proptest::collection::vec(any::<u8>(), 0..30).prop_map(Op::BadKey),
            ]
        }

        proptest! {
            /// Whatever etcd holds and probes say: no panic; deletions only
            /// of keys present, at the revision probed, within the budget;
            /// none at all for a service whose valve is tripped.
            #[test]
            fn planning_keeps_its_promises(ops in proptest::collection::vec(op(), 1..80),
                                           budget in 1usize..4) {
                let store = Store::new();
                let mut now = Instant::now();
                let mut rev = 0i64;
                let policy = Policy {
                    dead_after: Duration::from_secs(3),
                    budget: Budget::Count(budget),
                    max_unhealthy_ratio: 0.5,
                };
                store.apply(Event::Synced { revision: 0 }, now);
                for op in ops {
                    match op {
                        Op::Put { svc, port, value, lease } => {
                            rev += 1;
                            let e = entry(&format!("s{svc}"), &format!("127.0.0.1:{port}"),
                                          &value, if lease { 7 } else { 0 }, rev);
                            store.apply(Event::Applied(e), now);
                        }
                        Op::Delete { svc, port } => {
                            let e = entry(&format!("s{svc}"), &format!("127.0.0.1:{port}"),
                                          b"", 0, rev);
                            store.apply(Event::Removed(e), now);
                        }
                        Op::BadKey(k) => {
                            rev += 1;
                            let key = String::from_utf8_lossy(&k).into_owned();
                            // Keys outside the schema arrive with id None.
                            let member = schema::parse_key(DEFAULT_ROOT, &k)
                                .and(Err(schema::SchemaError::Value("outside".into())));
                            store.apply(Event::Applied(Arc::new(Entry {
                                key, id: None, member,
                                lease: 0, create_revision: rev, mod_revision: rev,
                            })), now);
                        }
                        Op::Probe { alive_mask, advance_ms } => {
                            now += Duration::from_millis(advance_ms);
                            pass(&store, now, |p| if alive_mask & (1 << p) != 0 {
                                Outcome::Serving
                            } else {
                                dead()
                            });
                            let present: HashMap<String, i64> = store
                                .view(None, None, now)
                                .services
                                .iter()
                                .flat_map(|s| s.members.iter().map(|m| (m.key.clone(), m.mod_revision)))
                                .collect();
                            let plan = store.plan(&policy, now, SystemTime::now());
                            let valves = store.valves();
                            let mut per_service: HashMap<&str, usize> = HashMap::new();
                            for d in &plan.deletions {
                                prop_assert_eq!(present.get(&d.key), Some(&d.mod_revision));
                                prop_assert!(!valves.contains_key(&d.service));
                                *per_service.entry(d.service.as_str()).or_default() += 1;
                            }
                            prop_assert!(per_service.values().all(|n| *n <= budget));
                            if store.global_valve().is_some() {
                                prop_assert!(plan.deletions.is_empty());
                            }
                            let _ = serde_json::to_string(&store.view(None, Some(true), now)).unwrap();
                        }
                    }
                }
            }
        }
    }
}
