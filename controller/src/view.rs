//! The HTTP view of the store: the types `/services` serializes, how one
//! member is shown, and the one way members are counted by state (used by
//! the view and by the metrics, so the two never disagree).
//!
//! A member's `weight` is the one every client uses: registered, then its
//! endpoint override, then its service's version split
//! ([`etcd_lb_registry::overrides::split_weights`], the function the
//! client library calls too); xDS sends exactly these weights.

use std::collections::BTreeMap;

use etcd_lb_registry::schema::{ServiceName, ValueKind};
use std::time::SystemTime;

use serde::Serialize;
use tokio::time::Instant;

use etcd_lb_registry::overrides::{
    effective_weight, split_weights, Applies, OverrideMap, Overrides, Side, Split, SplitApplies,
};

use crate::member::{Members, Tracked};
use crate::policy::{Valve, Valves};
use crate::probe::Outcome;

/// Counts of a service's members by state, for metrics and the view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Members.
    pub members: usize,
    /// Answering and serving.
    pub healthy: usize,
    /// Answering NOT_SERVING.
    pub draining: usize,
    /// Latest probe failed.
    pub failing: usize,
    /// Not probed yet.
    pub unknown: usize,
    /// Invalid values.
    pub invalid: usize,
}

impl Counts {
    /// Counts `members` by the state their latest probe shows: unknown
    /// before the first probe, failing when it got no answer, draining on
    /// NOT_SERVING, healthy otherwise; invalid values counted beside.
    pub fn of<'a>(members: impl IntoIterator<Item = &'a Tracked>) -> Self {
        let mut c = Counts::default();
        for t in members {
            c.members += 1;
            match &t.probe.last {
                None => c.unknown += 1,
                Some(o) if !o.is_alive() => c.failing += 1,
                Some(Outcome::NotServing) => c.draining += 1,
                Some(_) => c.healthy += 1,
            }
            if t.entry.member.is_err() {
                c.invalid += 1;
            }
        }
        c
    }
}

/// What a view is made from: the store's state at one moment.
pub struct Source<'a> {
    /// Every tracked member.
    pub members: &'a Members,
    /// The valves the last plan left.
    pub valves: &'a Valves,
    /// Keys outside the schema, with why.
    pub invalid_keys: &'a BTreeMap<String, String>,
    /// The etcd revision reflected.
    pub revision: i64,
    /// Operators' overrides and splits.
    pub overrides: &'a Overrides,
}

/// The whole view, or one service's (`only`), optionally only members
/// whose `healthy` equals `healthy`; counts are of all members.
pub fn services_view(
    src: Source<'_>,
    only: Option<&ServiceName>,
    healthy: Option<bool>,
    now: Instant,
) -> ServicesView {
    let Source {
        members,
        valves,
        invalid_keys,
        revision,
        overrides,
    } = src;
    let wall = SystemTime::now();
    let services = members
        .iter()
        .filter(|(name, _)| only.is_none_or(|o| o == *name))
        .map(|(name, members)| {
            let mut shown: Vec<MemberView> = members
                .values()
                .map(|t| member_view(t, &overrides.endpoints, now, wall))
                .collect();
            let split = overrides
                .splits
                .get(name)
                .map(|s| apply_split(s, &mut shown, wall));
            shown.retain(|m| healthy.is_none_or(|h| m.healthy == Some(h)));
            ServiceView {
                name: name.clone(),
                counts: Counts::of(members.values()),
                members: shown,
                split,
                safety_valve: valves.services.get(name).cloned(),
            }
        })
        .collect();
    ServicesView {
        revision,
        safety_valve: valves.global.clone(),
        services,
        invalid_keys: invalid_keys
            .iter()
            .map(|(key, problem)| InvalidKeyView {
                key: key.clone(),
                problem: problem.clone(),
            })
            .collect(),
    }
}

/// Weighs a split service's members (those with a valid value) with
/// [`split_weights`] over their effective weights, marks each with its
/// lane, and says what the split does.
fn apply_split(split: &Split, members: &mut [MemberView], wall: SystemTime) -> SplitView {
    let valid: Vec<usize> = (0..members.len())
        .filter(|i| members[*i].weight.is_some())
        .collect();
    let input: Vec<(&str, u32)> = valid
        .iter()
        .map(|i| {
            let m = &members[*i];
            (m.version.as_deref().unwrap_or(""), m.weight.unwrap_or(0))
        })
        .collect();
    let weighed = split_weights(Some(split), &input, wall);
    let outcome = weighed.split.expect("a split was given");
    let lanes: Vec<String> = outcome
        .sides
        .iter()
        .map(|s| s.lane.clone().unwrap_or_else(|| "rest".to_owned()))
        .collect();
    for (k, i) in valid.iter().enumerate() {
        let m = &mut members[*i];
        m.weight = Some(weighed.weights[k]);
        m.lane = outcome.side_of.get(k).and_then(|s| lanes.get(*s)).cloned();
    }
    SplitView {
        describe: split.describe(),
        applies: outcome.applies,
        sides: outcome.sides,
        reason: split.reason.clone(),
        by: split.by.clone(),
        at: split.at.clone(),
        expires: split.expires.clone(),
    }
}

/// One member as the view shows it.
fn member_view(t: &Tracked, overrides: &OverrideMap, now: Instant, wall: SystemTime) -> MemberView {
    let e = &t.entry;
    let ov = e.id.as_ref().and_then(|id| overrides.get(id));
    let mut problems = Vec::new();
    let (version, weight, kind) = match &e.member {
        Ok(m) => {
            problems.extend(m.problems.iter().cloned());
            let kind = match m.kind {
                ValueKind::Json => "json",
                ValueKind::Legacy => "legacy",
            };
            (Some(m.version.clone()), Some(m.weight), kind)
        }
        Err(err) => {
            problems.push(err.to_string());
            (None, None, "invalid")
        }
    };
    if e.lease == 0 {
        problems.push("no lease: stale as soon as the address stops answering".to_owned());
    }
    let ttl = match t.lease_ttl {
        Some((secs, _)) if secs < 0 => {
            problems.push("lease not found in etcd (expired or revoked)".to_owned());
            None
        }
        Some((secs, at)) => {
            Some((secs - now.saturating_duration_since(at).as_secs() as i64).max(0))
        }
        None => None,
    };
    let p = &t.probe;
    MemberView {
        addr: e
            .id
            .as_ref()
            .map(|(_, a)| a.to_string())
            .unwrap_or_default(),
        key: e.key.clone(),
        version,
        weight: weight.map(|w| effective_weight(w, Some(e), ov, wall)),
        registered_weight: weight,
        lane: None,
        r#override: ov.map(|o| OverrideView {
            drain: o.drain,
            weight: o.weight,
            applies: o.applies(Some(e), wall),
            sticky: o.incarnation.is_none(),
            reason: o.reason.clone(),
            by: o.by.clone(),
            at: o.at.clone(),
            expires: o.expires.clone(),
        }),
        kind,
        lease: (e.lease != 0).then(|| format!("{:x}", e.lease)),
        ttl,
        healthy: p.last.as_ref().map(Outcome::is_healthy),
        status: p.last.as_ref().map_or("unknown", Outcome::label),
        status_detail: p.last.as_ref().and_then(|o| o.detail().map(str::to_owned)),
        last_probe: p
            .last_at
            .map(|t| humantime::format_rfc3339_millis(t).to_string()),
        consecutive_failures: p.consecutive_failures,
        mod_revision: e.mod_revision,
        problems,
    }
}

/// `GET /services`: every service, sorted by name.
#[derive(Debug, Clone, Serialize)]
pub struct ServicesView {
    /// etcd revision the view reflects.
    pub revision: i64,
    /// Set while the global safety valve holds every deletion back (too
    /// many members across services look dead at once).
    pub safety_valve: Option<Valve>,
    /// Services sorted by name.
    pub services: Vec<ServiceView>,
    /// Keys under the prefix that do not follow the schema (never deleted:
    /// they may belong to someone else).
    pub invalid_keys: Vec<InvalidKeyView>,
}

/// One service.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceView {
    /// Service name.
    pub name: ServiceName,
    /// Members sorted by address.
    pub members: Vec<MemberView>,
    /// Member counts by state (before any filter).
    pub counts: Counts,
    /// The service's version split (`controller split`), applying or not:
    /// its lanes with the share each asked for and gets, who, why, when.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitView>,
    /// Set while the safety valve holds deletions back.
    pub safety_valve: Option<Valve>,
}

/// One member.
#[derive(Debug, Clone, Serialize)]
pub struct MemberView {
    /// Address (the key suffix).
    pub addr: String,
    /// Full etcd key.
    pub key: String,
    /// Version from the value; null when the value is invalid.
    pub version: Option<String>,
    /// The weight clients use: an operator override's while one applies,
    /// else the registered one, then scaled by the service's version split
    /// while one applies (then a split's weights sum to about a million:
    /// parts per million of the calls); null when the value is invalid.
    pub weight: Option<u32>,
    /// The weight in the registered value; null when it is invalid.
    pub registered_weight: Option<u32>,
    /// The split lane the member falls in (the lane's version as written,
    /// or `rest`), while its service has a split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lane: Option<String>,
    /// An operator's override of this endpoint (`controller drain|weight`),
    /// applying or not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub r#override: Option<OverrideView>,
    /// `json`, `legacy` or `invalid`.
    pub kind: &'static str,
    /// Lease id in hex (as etcdctl prints it), null without a lease.
    pub lease: Option<String>,
    /// Seconds left on the lease at the last lookup, null if unknown.
    pub ttl: Option<i64>,
    /// Answering and serving; null before the first probe.
    pub healthy: Option<bool>,
    /// Latest probe: serving, not_serving, unimplemented, answered, failed
    /// or unknown.
    pub status: &'static str,
    /// Failure reason or odd answer of the latest probe.
    pub status_detail: Option<String>,
    /// Time of the latest probe (RFC 3339).
    pub last_probe: Option<String>,
    /// Failed probes in a row.
    pub consecutive_failures: u32,
    /// Revision of the value.
    pub mod_revision: i64,
    /// Findings: legacy value, invalid value with reason, addr mismatch,
    /// no lease.
    pub problems: Vec<String>,
}

/// A service's version split as the view shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SplitView {
    /// The lanes as the command line writes them (`2.0.0=5 rest=95`).
    pub describe: String,
    /// Whether it shapes the weights (`yes`, `expired`, `invalid`).
    pub applies: SplitApplies,
    /// Each lane, then the rest: the share asked for, the share it gets
    /// (a side without endpoints in use gets none) and its endpoints.
    pub sides: Vec<Side>,
    /// Why.
    pub reason: String,
    /// Who.
    pub by: String,
    /// When (RFC 3339).
    pub at: String,
    /// When it lapses (RFC 3339).
    pub expires: Option<String>,
}

/// An operator's override as the view shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OverrideView {
    /// No new calls.
    pub drain: bool,
    /// The weight it sets, unless draining.
    pub weight: Option<u32>,
    /// Whether it applies now (`yes`, `other_incarnation`, `expired`).
    pub applies: Applies,
    /// Any registration at the address, not only the one it was made for.
    pub sticky: bool,
    /// Why.
    pub reason: String,
    /// Who.
    pub by: String,
    /// When (RFC 3339).
    pub at: String,
    /// When it lapses (RFC 3339).
    pub expires: Option<String>,
}

impl ServiceView {
    /// Whether `other` shows the same state of this service, leaving out
    /// what moves on its own (lease countdowns, probe times): what a stream
    /// subscriber is told about as a change.
    pub fn same_state(&self, other: &ServiceView) -> bool {
        self.name == other.name
            && self.counts == other.counts
            && self.safety_valve == other.safety_valve
            && self.split == other.split
            && self.members.len() == other.members.len()
            && self
                .members
                .iter()
                .zip(&other.members)
                .all(|(a, b)| a.same_state(b))
    }
}

impl MemberView {
    /// Whether `other` shows the same state of this member: every field but
    /// `ttl` (it counts down every second) and `last_probe` (it moves every
    /// pass).
    pub fn same_state(&self, other: &MemberView) -> bool {
        self.addr == other.addr
            && self.key == other.key
            && self.version == other.version
            && self.weight == other.weight
            && self.lane == other.lane
            && self.kind == other.kind
            && self.lease == other.lease
            && self.healthy == other.healthy
            && self.status == other.status
            && self.status_detail == other.status_detail
            && self.consecutive_failures == other.consecutive_failures
            && self.mod_revision == other.mod_revision
            && self.problems == other.problems
    }
}

/// A key outside the schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvalidKeyView {
    /// The key.
    pub key: String,
    /// Why it is not a registration.
    pub problem: String,
}
