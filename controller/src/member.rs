//! The types the controller's store, policy and view share: one tracked
//! key and its probe history. They live apart from the store that holds
//! them, the policy that judges them and the view that shows them, so
//! those three depend on this module and not on each other in a circle
//! (member <- policy <- view <- store).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use etcd_lb_registry::schema::{Addr, ServiceName};
use etcd_lb_registry::watcher::Entry;
use tokio::time::Instant;

use crate::probe::Outcome;

/// Every tracked entry: service -> address -> entry, both sorted.
pub type Members = BTreeMap<ServiceName, BTreeMap<Addr, Tracked>>;

/// Probe history of one entry.
#[derive(Debug, Clone, Default)]
pub struct ProbeState {
    /// The latest outcome, `None` before the first probe.
    pub last: Option<Outcome>,
    /// Wall-clock time of the latest probe (for people).
    pub last_at: Option<SystemTime>,
    /// Failed probes in a row.
    pub consecutive_failures: u32,
    /// Start of the current run of failures.
    pub failing_since: Option<Instant>,
    /// The key's mod revision when it was last probed: a deletion compares
    /// against it, so a value written after the probe is never removed.
    pub probed_mod_revision: i64,
}

/// One registered key with a valid `<service>/<addr>`.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// What etcd holds (shared with the reflector's copy).
    pub entry: Arc<Entry>,
    /// Since when the value has been invalid (continuously).
    pub invalid_since: Option<Instant>,
    /// What probes saw.
    pub probe: ProbeState,
    /// Seconds left on the lease when it was last looked up (-1: etcd does
    /// not know the lease), and when.
    pub lease_ttl: Option<(i64, Instant)>,
}

/// Wall-clock times in views and plans: RFC 3339 with milliseconds.
pub(crate) fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}
