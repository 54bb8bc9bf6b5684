//! The staleness policy: which entries are stale, the safety valves that
//! hold deletions back, and the per-pass budget.
//!
//! [`plan`] is a pure function of the reflected members, the valves of the
//! previous pass, the thresholds and the time: it reads nothing else and
//! writes nothing, so every promise it makes is checked by a property test
//! over arbitrary states, without etcd, probes or clocks. The store calls
//! it under its lock and keeps the valves it returns for the next pass and
//! for the view.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use etcd_lb_registry::schema::{Addr, ServiceName};
use serde::Serialize;
use tokio::time::Instant;

use crate::config::Budget;
use crate::member::{ser_time, Members, Tracked};

/// Failed probes in a row after which a lease-less key is stale: two, so a
/// single lost probe (a blip, a busy host) never deletes a live endpoint
/// that nothing would put back.
pub const LEASELESS_FAILURES: u32 = 2;

/// Failed probes in a row a leased key needs, besides `--dead-after` since
/// the first, before it is stale: time alone is not enough, since passes
/// slowed by etcd trouble (lease lookups waiting on an isolated member)
/// can space two failed probes more than `--dead-after` apart, and two
/// probes lost to a busy host must not delete a live server.
pub const UNREACHABLE_FAILURES: u32 = 3;

/// Why an entry is stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Failed every probe for `--dead-after`.
    Unreachable,
    /// No lease, and the address does not answer.
    NoLeaseUnreachable,
    /// The value has been invalid for `--dead-after`.
    InvalidValue,
}

impl Reason {
    /// Every reason (the metrics make each label from 0).
    pub const ALL: [Reason; 3] = [
        Reason::Unreachable,
        Reason::NoLeaseUnreachable,
        Reason::InvalidValue,
    ];

    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::NoLeaseUnreachable => "no_lease_unreachable",
            Self::InvalidValue => "invalid_value",
        }
    }
}

/// A deletion the reconciler may make, guarded by `mod_revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deletion {
    /// Service of the key.
    pub service: ServiceName,
    /// Address of the key.
    pub addr: Addr,
    /// The full key.
    pub key: String,
    /// The revision the decision was based on.
    pub mod_revision: i64,
    /// Why.
    pub reason: Reason,
}

/// A tripped safety valve (of one service, or of the whole registry).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Valve {
    /// Members that looked dead in the pass.
    pub dead: usize,
    /// Members of the service.
    pub members: usize,
    /// Stale entries that were therefore kept.
    pub withheld: usize,
    /// Wall-clock time the valve tripped (this time).
    #[serde(serialize_with = "ser_time")]
    pub since: SystemTime,
}

/// The decisions of one pass.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Deletions within each service's budget, oldest failure first.
    pub deletions: Vec<Deletion>,
    /// Stale entries over budget, left for the next pass.
    pub deferred: usize,
    /// Services whose valve tripped in this pass but was open before.
    pub tripped: Vec<(ServiceName, Valve)>,
    /// Services whose valve closed in this pass.
    pub cleared: Vec<ServiceName>,
    /// The global valve, when it tripped in this pass (open before).
    pub global_tripped: Option<Valve>,
    /// The global valve closed in this pass.
    pub global_cleared: bool,
}

/// The thresholds a plan is made with.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Failing this long makes an entry stale (and an invalid value too).
    pub dead_after: Duration,
    /// Per service and pass.
    pub budget: Budget,
    /// Safety-valve threshold.
    pub max_unhealthy_ratio: f64,
}

/// The valves that hold: per service, and the global one. [`plan`] takes the
/// previous pass's (to keep each valve's `since` and to tell a new trip
/// from one that holds) and returns this pass's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Valves {
    /// Services whose valve holds.
    pub services: BTreeMap<ServiceName, Valve>,
    /// Set while more than the valve's share of all members, across
    /// services, look dead: nothing at all is deleted then.
    pub global: Option<Valve>,
}

/// Whether `dead` of `members` trips a valve (per service or global). One
/// dead member alone never does: it cannot tell "cut off" from "one server
/// died".
fn trips(dead: usize, members: usize, ratio: f64) -> bool {
    dead > 1 && dead as f64 > ratio * members as f64
}

/// Decides what is stale, applies the safety valves and the budget: the
/// plan of one pass, and the valves that hold after it.
///
/// Only what the latest probe saw counts, and only at the revision it
/// probed (a value rewritten since is never planned for deletion).
pub fn plan(
    members: &Members,
    previous: &Valves,
    policy: &Policy,
    now: Instant,
    wall: SystemTime,
) -> (Plan, Valves) {
    let mut plan = Plan::default();
    let mut valves = Valves::default();
    let (mut members_total, mut dead_total, mut stale_total) = (0, 0, 0);
    for (service, members) in members {
        let mut stale: Vec<(Instant, &Addr, &Tracked, Reason)> = Vec::new();
        let mut dead = 0;
        for (addr, t) in members {
            let p = &t.probe;
            let failing = p.consecutive_failures > 0;
            if failing {
                dead += 1;
            }
            // Decide only on what the latest probe saw.
            if p.last.is_none() || p.probed_mod_revision != t.entry.mod_revision {
                continue;
            }
            let since = p.failing_since.unwrap_or(now);
            let reason = if p.consecutive_failures >= LEASELESS_FAILURES && t.entry.lease == 0 {
                Some(Reason::NoLeaseUnreachable)
            } else if p.consecutive_failures >= UNREACHABLE_FAILURES
                && now.saturating_duration_since(since) >= policy.dead_after
            {
                Some(Reason::Unreachable)
            } else if t
                .invalid_since
                .is_some_and(|s| now.saturating_duration_since(s) >= policy.dead_after)
            {
                Some(Reason::InvalidValue)
            } else {
                None
            };
            if let Some(reason) = reason {
                let order = p.failing_since.or(t.invalid_since).unwrap_or(now);
                stale.push((order, addr, t, reason));
            }
        }
        let n = members.len();
        members_total += n;
        dead_total += dead;
        stale_total += stale.len();
        // One dead member alone never trips the valve: it cannot tell "cut
        // off" from "one server died".
        if trips(dead, n, policy.max_unhealthy_ratio) {
            let held = previous.services.get(service);
            let valve = Valve {
                dead,
                members: n,
                withheld: stale.len(),
                since: held.map_or(wall, |v| v.since),
            };
            if held.is_none() {
                plan.tripped.push((service.clone(), valve.clone()));
            }
            valves.services.insert(service.clone(), valve);
            continue;
        }
        if previous.services.contains_key(service) {
            plan.cleared.push(service.clone());
        }
        stale.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        let limit = policy.budget.limit(n);
        plan.deferred += stale.len().saturating_sub(limit);
        for (_, addr, t, reason) in stale.into_iter().take(limit) {
            plan.deletions.push(Deletion {
                service: service.clone(),
                addr: addr.clone(),
                key: t.entry.key.clone(),
                mod_revision: t.probe.probed_mod_revision,
                reason,
            });
        }
    }
    // The global valve: the only one that protects single-member services,
    // and the one that holds when the controller itself is cut off from
    // most of the fleet.
    if trips(dead_total, members_total, policy.max_unhealthy_ratio) {
        let valve = Valve {
            dead: dead_total,
            members: members_total,
            withheld: stale_total,
            since: previous.global.as_ref().map_or(wall, |v| v.since),
        };
        if previous.global.is_none() {
            plan.global_tripped = Some(valve.clone());
        }
        valves.global = Some(valve);
        plan.deletions.clear();
        plan.deferred = 0;
    } else {
        plan.global_cleared = previous.global.is_some();
    }
    (plan, valves)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use etcd_lb_registry::schema::{self, DEFAULT_ROOT};
    use etcd_lb_registry::watcher::Entry;
    use proptest::prelude::*;

    use super::*;
    use crate::probe::Outcome;
    use crate::store::ProbeState;

    /// One member's state, as arbitrary as the store can hold it.
    #[derive(Debug, Clone)]
    struct Arb {
        svc: u8,
        port: u16,
        lease: bool,
        invalid_for: Option<u64>,
        probed: Option<bool>,
        failures: u32,
        failing_for: u64,
        probed_current: bool,
    }

    fn arb() -> impl Strategy<Value = Arb> {
        (
            (0u8..3, 1u16..9, any::<bool>()),
            proptest::option::of(0u64..20),
            proptest::option::of(any::<bool>()),
            (0u32..5, 0u64..20, any::<bool>()),
        )
            .prop_map(
                |((svc, port, lease), invalid_for, probed, (failures, failing_for, cur))| Arb {
                    svc,
                    port,
                    lease,
                    invalid_for,
                    probed,
                    failures,
                    failing_for,
                    probed_current: cur,
                },
            )
    }

    fn members(arbs: &[Arb], now: Instant) -> Members {
        let mut m = Members::new();
        for (i, a) in arbs.iter().enumerate() {
            let s = ServiceName::new(&format!("s{}", a.svc)).unwrap();
            let addr = Addr::new(&format!("127.0.0.1:{}", a.port)).unwrap();
            let value: &[u8] = if a.invalid_for.is_some() {
                b"[1]"
            } else {
                br#"{"weight":100}"#
            };
            let rev = 10 + i as i64;
            let alive = a.probed == Some(true);
            let failures = if a.probed == Some(false) {
                a.failures.max(1)
            } else {
                0
            };
            let t = Tracked {
                entry: std::sync::Arc::new(Entry {
                    key: schema::key(DEFAULT_ROOT, &s, &addr),
                    member: schema::parse_value(&addr, value),
                    id: Some((s.clone(), addr.clone())),
                    lease: if a.lease { 7 } else { 0 },
                    create_revision: rev,
                    mod_revision: rev,
                }),
                invalid_since: a.invalid_for.map(|d| now - Duration::from_secs(d)),
                probe: ProbeState {
                    last: a.probed.map(|ok| {
                        if ok {
                            Outcome::Serving
                        } else {
                            Outcome::Failed("refused".into())
                        }
                    }),
                    last_at: None,
                    consecutive_failures: failures,
                    failing_since: (failures > 0 && !alive)
                        .then(|| now - Duration::from_secs(a.failing_for)),
                    probed_mod_revision: if a.probed_current { rev } else { rev - 1 },
                },
                lease_ttl: None,
            };
            m.entry(s).or_default().insert(addr, t);
        }
        m
    }

    /// Seed 328 of the robustness harness: the leader deleted a live
    /// server after two failed probes that its passes, slowed by an
    /// isolated etcd member, had spaced more than `--dead-after` apart.
    /// Time alone is not enough: a leased key needs a run of failures too.
    #[test]
    fn two_failed_probes_far_apart_are_not_a_dead_server() {
        let now = Instant::now() + Duration::from_secs(60);
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let member = |failures| Arb {
            svc: 0,
            port: 1,
            lease: true,
            invalid_for: None,
            probed: Some(false),
            failures,
            failing_for: 30,
            probed_current: true,
        };
        let policy = Policy {
            dead_after: Duration::from_secs(10),
            budget: Budget::Count(5),
            max_unhealthy_ratio: 1.0,
        };
        let plan_for = |failures| {
            let members = members(&[member(failures)], now);
            super::plan(&members, &Valves::default(), &policy, now, wall)
                .0
                .deletions
                .len()
        };
        assert_eq!(plan_for(2), 0, "two failures, however far apart");
        assert_eq!(plan_for(UNREACHABLE_FAILURES), 1);
    }

    proptest! {
        /// Whatever the members, the previous valves and the budget: every
        /// deletion is of a member present, at the revision its probe saw,
        /// for a reason that holds; within the budget; none for a service
        /// whose valve holds, none at all while the global valve holds;
        /// valves keep their `since`; the same inputs give the same plan.
        #[test]
        fn the_plan_keeps_its_promises(
            arbs in proptest::collection::vec(arb(), 0..24),
            held in proptest::collection::btree_set(0u8..3, 0..3),
            global_held in any::<bool>(),
            budget in 1usize..4,
            ratio in prop_oneof![Just(0.5), Just(0.0), Just(1.0)],
        ) {
            let now = Instant::now() + Duration::from_secs(60);
            let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
            let earlier = SystemTime::UNIX_EPOCH;
            let members = members(&arbs, now);
            let valve = |n| Valve { dead: n, members: n, withheld: 0, since: earlier };
            let previous = Valves {
                services: held
                    .iter()
                    .map(|s| (ServiceName::new(&format!("s{s}")).unwrap(), valve(2)))
                    .collect(),
                global: global_held.then(|| valve(9)),
            };
            let policy = Policy {
                dead_after: Duration::from_secs(10),
                budget: Budget::Count(budget),
                max_unhealthy_ratio: ratio,
            };
            let (plan, valves) = super::plan(&members, &previous, &policy, now, wall);
            let (again, valves_again) = super::plan(&members, &previous, &policy, now, wall);
            prop_assert_eq!(&plan.deletions, &again.deletions);
            prop_assert_eq!(&valves, &valves_again);

            if valves.global.is_some() {
                prop_assert!(plan.deletions.is_empty());
                prop_assert_eq!(plan.global_tripped.is_some(), !global_held);
            } else {
                prop_assert_eq!(plan.global_cleared, global_held);
            }
            if let (true, Some(v)) = (global_held, &valves.global) {
                prop_assert_eq!(v.since, earlier, "a holding valve keeps its since");
            }
            let mut per_service: BTreeMap<&ServiceName, usize> = BTreeMap::new();
            let mut seen = BTreeSet::new();
            for d in &plan.deletions {
                prop_assert!(seen.insert(d.key.clone()), "deleted twice: {}", d.key);
                prop_assert!(!valves.services.contains_key(&d.service));
                let t = members
                    .get(&d.service)
                    .and_then(|m| m.get(&d.addr))
                    .expect("a deletion of a member present");
                prop_assert_eq!(d.mod_revision, t.entry.mod_revision);
                prop_assert_eq!(t.probe.probed_mod_revision, t.entry.mod_revision);
                let p = &t.probe;
                let holds = match d.reason {
                    Reason::NoLeaseUnreachable => {
                        t.entry.lease == 0 && p.consecutive_failures >= LEASELESS_FAILURES
                    }
                    Reason::Unreachable => {
                        p.consecutive_failures >= UNREACHABLE_FAILURES
                            && p.failing_since
                                .is_some_and(|s| now.duration_since(s) >= policy.dead_after)
                    }
                    Reason::InvalidValue => t
                        .invalid_since
                        .is_some_and(|s| now.duration_since(s) >= policy.dead_after),
                };
                prop_assert!(holds, "{:?} for {:?}", d.reason, t);
                *per_service.entry(&d.service).or_default() += 1;
            }
            for (service, n) in per_service {
                prop_assert!(n <= policy.budget.limit(members[service].len()));
            }
            for (service, v) in &valves.services {
                let was = previous.services.get(service);
                prop_assert_eq!(was.is_none(), plan.tripped.iter().any(|(s, _)| s == service));
                if was.is_some() {
                    prop_assert_eq!(v.since, earlier);
                }
            }
            for service in &plan.cleared {
                prop_assert!(previous.services.contains_key(service));
                prop_assert!(!valves.services.contains_key(service));
            }
        }
    }
}
