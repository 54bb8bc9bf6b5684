//! Operator overrides: drain or reweight one endpoint without touching its
//! server, stored in etcd beside the registry and never inside it.
//!
//! - Key: `<root><service>/endpoints/<addr>` under [`DEFAULT_ROOT`]
//!   (`/lb-overrides/`), outside `/ns/`: no server lease owns it, no
//!   registrar writes it, and the original Go client (which treats every
//!   key under `/ns/<service>/` as an address) never sees it.
//! - Value: JSON [`EndpointOverride`]: what it changes (`drain`, or a
//!   `weight`), why, who, when, an optional expiry, and the incarnation it
//!   was made for.
//! - Scope: by default an override applies to the incarnation it was made
//!   for, the registration's lease (or, for a key without a lease, its
//!   creation revision). When another process takes the address it gets a
//!   new lease and the override no longer applies ([`Applies::OtherIncarnation`],
//!   shown in the controller's view): a stale "offline" is never inherited.
//!   A sticky override (`incarnation: null`) names the address only: a
//!   host in maintenance stays drained across restarts.
//! - Readers (the client library, the controller's view and xDS) all take
//!   the effective weight from [`effective_weight`], so they agree.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_client::{EventType, GetOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::etcd::EtcdConfig;
use crate::schema::{self, Addr, SchemaError, ServiceName, MAX_WEIGHT};
use crate::watcher::Entry;

/// Where overrides live unless configured: beside `/ns/`, not under it.
pub const DEFAULT_ROOT: &str = "/lb-overrides/";
/// Values larger than this are invalid without being parsed.
pub const MAX_VALUE_BYTES: usize = 4096;

/// The registration an override was made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Incarnation {
    /// The registration's lease (what every registrar writes with).
    Lease(i64),
    /// A key without a lease: its creation revision.
    CreateRevision(i64),
}

impl Incarnation {
    /// The incarnation of a registry entry as it is now.
    pub fn of(entry: &Entry) -> Self {
        if entry.lease != 0 {
            Self::Lease(entry.lease)
        } else {
            Self::CreateRevision(entry.create_revision)
        }
    }
}

/// One endpoint's override, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointOverride {
    /// Send no new calls (weight 0); running calls finish.
    #[serde(default)]
    pub drain: bool,
    /// Use this weight instead of the registered one (ignored while
    /// `drain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// The registration it applies to; `None`: sticky, any registration at
    /// this address.
    pub incarnation: Option<Incarnation>,
    /// Why, as the operator said.
    #[serde(default)]
    pub reason: String,
    /// Who: the etcd user, or `--by`.
    #[serde(default)]
    pub by: String,
    /// When it was made (RFC 3339).
    pub at: String,
    /// When it stops applying (RFC 3339); `None`: until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
}

/// Whether an override applies to the registration at its address now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Applies {
    /// It does.
    Yes,
    /// It was made for another registration (a process since replaced).
    OtherIncarnation,
    /// Its expiry has passed.
    Expired,
    /// Nothing is registered at its address.
    NoEndpoint,
}

impl EndpointOverride {
    /// Whether it applies to `entry` (the address's registration, if any)
    /// at `now`.
    pub fn applies(&self, entry: Option<&Entry>, now: SystemTime) -> Applies {
        if self.expired(now) {
            return Applies::Expired;
        }
        let Some(entry) = entry else {
            return Applies::NoEndpoint;
        };
        match self.incarnation {
            Some(i) if i != Incarnation::of(entry) => Applies::OtherIncarnation,
            _ => Applies::Yes,
        }
    }

    /// Whether `expires` has passed (an unreadable expiry counts as passed:
    /// an override nobody can reason about must not hold traffic back).
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires
            .as_deref()
            .is_some_and(|e| humantime::parse_rfc3339_weak(e).map_or(true, |t| t <= now))
    }

    /// The weight it sets.
    pub fn weight(&self) -> u32 {
        if self.drain {
            0
        } else {
            self.weight.unwrap_or(schema::DEFAULT_WEIGHT)
        }
    }

    /// The stored JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain fields serialize")
    }
}

/// Parses a stored value, with the reason when it is not one.
///
/// # Errors
/// Not JSON, not this shape, a weight above [`MAX_WEIGHT`], or too large.
pub fn parse_value(bytes: &[u8]) -> Result<EndpointOverride, SchemaError> {
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(SchemaError::Value(format!(
            "override of {} bytes, above {MAX_VALUE_BYTES}",
            bytes.len()
        )));
    }
    let o: EndpointOverride =
        serde_json::from_slice(bytes).map_err(|e| SchemaError::Value(format!("override: {e}")))?;
    if let Some(w) = o.weight.filter(|w| *w > MAX_WEIGHT) {
        return Err(SchemaError::Value(format!(
            "override weight {w} above {MAX_WEIGHT}"
        )));
    }
    Ok(o)
}

/// The prefix of one service's endpoint overrides.
pub fn service_prefix(root: &str, service: &ServiceName) -> String {
    format!("{root}{service}/endpoints/")
}

/// The key of one endpoint's override.
pub fn endpoint_key(root: &str, service: &ServiceName, addr: &Addr) -> String {
    format!("{}{addr}", service_prefix(root, service))
}

/// Service and address of an override key under `root`.
///
/// # Errors
/// A key that is not `<root><service>/endpoints/<addr>` with a valid
/// service and address.
pub fn parse_key(root: &str, key: &[u8]) -> Result<(ServiceName, Addr), SchemaError> {
    let bad = |why: &str| SchemaError::Value(format!("override key: {why}"));
    let key = std::str::from_utf8(key).map_err(|_| bad("not UTF-8"))?;
    let rest = key
        .strip_prefix(root)
        .ok_or_else(|| bad("outside the root"))?;
    let (service, addr) = rest
        .split_once("/endpoints/")
        .ok_or_else(|| bad("not <service>/endpoints/<addr>"))?;
    Ok((ServiceName::new(service)?, Addr::new(addr)?))
}

/// The weight readers use for an endpoint registered with `registered`:
/// the override's when one applies, else the registered one.
pub fn effective_weight(
    registered: u32,
    entry: Option<&Entry>,
    ov: Option<&EndpointOverride>,
    now: SystemTime,
) -> u32 {
    match ov {
        Some(o) if o.applies(entry, now) == Applies::Yes => o.weight(),
        _ => registered,
    }
}

/// How long until the next of `overrides` lapses (the earliest expiry still
/// ahead of `now`), so a reader re-weighs when it does rather than polling;
/// `None` when none has an expiry ahead.
pub fn next_expiry<'a>(
    overrides: impl IntoIterator<Item = &'a EndpointOverride>,
    now: SystemTime,
) -> Option<Duration> {
    overrides
        .into_iter()
        .filter_map(|o| o.expires.as_deref())
        .filter_map(|e| humantime::parse_rfc3339_weak(e).ok())
        .filter_map(|t| t.duration_since(now).ok())
        .filter(|d| !d.is_zero())
        .min()
}

/// How long a reader waits for the overrides' first list before it uses
/// the registered weights alone: long enough for any etcd that answers,
/// short enough that an unreadable overrides prefix (no permission, say)
/// only delays a start.
pub const FIRST_LIST_WAIT: Duration = Duration::from_secs(5);

/// Waits until `rx` (from [`spawn_watch`]) holds the overrides' first list
/// (true), or `limit` passes (false). A reader applies the registry's first
/// list only after this, so a client or controller that starts while an
/// endpoint is drained never weighs it by its registered weight, not even
/// for its first calls.
pub async fn first_list(rx: &mut watch::Receiver<Arc<OverrideMap>>, limit: Duration) -> bool {
    tokio::time::timeout(limit, rx.changed())
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Now as RFC 3339 (seconds), for `at`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Every override under a root (or of one service), by service and
/// address.
pub type OverrideMap = HashMap<(ServiceName, Addr), EndpointOverride>;

/// Keeps the overrides under `root` (of `service` only, when given)
/// current from etcd until `cancel`: list, then watch from the list's
/// revision; relist after any break. The receiver sees its first change
/// when the first list is in ([`first_list`]). While etcd is unreachable the last
/// known overrides stay (an operator's drain is not undone by an outage).
///
/// # Panics
/// Outside a Tokio runtime.
pub fn spawn_watch(
    etcd: EtcdConfig,
    root: String,
    service: Option<ServiceName>,
    cancel: CancellationToken,
) -> watch::Receiver<Arc<OverrideMap>> {
    let (tx, rx) = watch::channel(Arc::new(OverrideMap::new()));
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let prefix = match &service {
            Some(s) => service_prefix(&root, s),
            None => root.clone(),
        };
        loop {
            let ended = tokio::select! {
                () = cancel.cancelled() => return,
                r = follow(&etcd, &root, &prefix, &tx, &mut backoff) => r,
            };
            if let Err(e) = ended {
                debug!(error = %e, "override watch ended; listing again");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    });
    rx
}

fn apply_kv(map: &mut OverrideMap, root: &str, key: &[u8], value: Option<&[u8]>) {
    let Ok(id) = parse_key(root, key) else {
        return;
    };
    match value.map(parse_value) {
        None => {
            map.remove(&id);
        }
        Some(Ok(o)) => {
            map.insert(id, o);
        }
        Some(Err(e)) => {
            warn!(key = %String::from_utf8_lossy(key), error = %e, "invalid override ignored");
            map.remove(&id);
        }
    }
}

/// One list + watch; returns when the watch breaks.
async fn follow(
    etcd: &EtcdConfig,
    root: &str,
    prefix: &str,
    tx: &watch::Sender<Arc<OverrideMap>>,
    backoff: &mut Backoff,
) -> Result<(), etcd_client::Error> {
    let Ok(mut client) = etcd.connect().await else {
        return Ok(());
    };
    let resp = client
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut map = OverrideMap::new();
    for kv in resp.kvs() {
        apply_kv(&mut map, root, kv.key(), Some(kv.value()));
    }
    tx.send_replace(Arc::new(map.clone()));
    let mut stream = client
        .watch(
            prefix,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await?;
    backoff.reset();
    while let Some(resp) = stream.message().await? {
        if resp.compact_revision() > 0 || resp.canceled() {
            return Ok(());
        }
        if resp.events().is_empty() {
            continue;
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            match ev.event_type() {
                EventType::Put => apply_kv(&mut map, root, kv.key(), Some(kv.value())),
                EventType::Delete => apply_kv(&mut map, root, kv.key(), None),
            }
        }
        tx.send_replace(Arc::new(map.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(lease: i64, create_revision: i64) -> Entry {
        Entry {
            key: "/ns/s/127.0.0.1:1".into(),
            id: Some((
                ServiceName::new("s").unwrap(),
                Addr::new("127.0.0.1:1").unwrap(),
            )),
            member: schema::parse_value(&Addr::new("127.0.0.1:1").unwrap(), b"127.0.0.1:1"),
            lease,
            create_revision,
            mod_revision: create_revision,
        }
    }

    fn drain(incarnation: Option<Incarnation>, expires: Option<String>) -> EndpointOverride {
        EndpointOverride {
            drain: true,
            weight: None,
            incarnation,
            reason: "test".into(),
            by: "me".into(),
            at: now_rfc3339(),
            expires,
        }
    }

    #[test]
    fn the_next_expiry_is_the_earliest_one_still_ahead() {
        let now = SystemTime::now();
        let at = |secs: i64| {
            let t = if secs >= 0 {
                now + Duration::from_secs(secs.unsigned_abs())
            } else {
                now - Duration::from_secs(secs.unsigned_abs())
            };
            Some(humantime::format_rfc3339_seconds(t).to_string())
        };
        let set = [
            drain(None, None),
            drain(None, at(-30)),
            drain(None, at(90)),
            drain(None, at(40)),
            drain(None, Some("not a time".into())),
        ];
        let next = next_expiry(&set, now).expect("two expiries ahead");
        // RFC 3339 seconds: up to a second earlier than `now + 40 s`.
        assert!(
            next <= Duration::from_secs(40) && next > Duration::from_secs(38),
            "{next:?}"
        );
        assert_eq!(next_expiry(&set[..2], now), None, "none ahead");
    }

    #[test]
    fn an_override_follows_its_incarnation_unless_sticky() {
        let now = SystemTime::now();
        let first = entry(0x10, 5);
        let replaced = entry(0x20, 9);
        let o = drain(Some(Incarnation::of(&first)), None);
        assert_eq!(o.applies(Some(&first), now), Applies::Yes);
        assert_eq!(effective_weight(100, Some(&first), Some(&o), now), 0);
        // The same process re-registered on its lease: still applies.
        let reput = entry(0x10, 12);
        assert_eq!(o.applies(Some(&reput), now), Applies::Yes);
        // A new process at the address: no longer.
        assert_eq!(o.applies(Some(&replaced), now), Applies::OtherIncarnation);
        assert_eq!(effective_weight(100, Some(&replaced), Some(&o), now), 100);
        // Sticky: any registration at the address.
        let sticky = drain(None, None);
        assert_eq!(sticky.applies(Some(&replaced), now), Applies::Yes);
        // A lease-less key is known by its creation revision.
        let bare = entry(0, 7);
        let o = drain(Some(Incarnation::of(&bare)), None);
        assert_eq!(o.applies(Some(&entry(0, 7)), now), Applies::Yes);
        assert_eq!(
            o.applies(Some(&entry(0, 8)), now),
            Applies::OtherIncarnation
        );
    }

    #[test]
    fn expiry_ends_an_override_and_garbage_is_refused() {
        let now = SystemTime::now();
        let past = humantime::format_rfc3339_seconds(now - Duration::from_secs(5)).to_string();
        let future = humantime::format_rfc3339_seconds(now + Duration::from_secs(60)).to_string();
        let e = entry(1, 1);
        assert_eq!(
            drain(None, Some(past)).applies(Some(&e), now),
            Applies::Expired
        );
        assert_eq!(
            drain(None, Some(future)).applies(Some(&e), now),
            Applies::Yes
        );
        assert_eq!(
            drain(None, Some("soon".into())).applies(Some(&e), now),
            Applies::Expired
        );
        let o = drain(Some(Incarnation::Lease(3)), None);
        assert_eq!(parse_value(o.to_json().as_bytes()).unwrap(), o);
        assert!(parse_value(b"{").is_err());
        assert!(parse_value(br#"{"weight": 20000, "at": "x", "incarnation": null}"#).is_err());
        assert!(parse_value(&vec![b' '; MAX_VALUE_BYTES + 1]).is_err());
        let s = ServiceName::new("greet_service").unwrap();
        let a = Addr::new("10.0.0.7:3000").unwrap();
        let k = endpoint_key(DEFAULT_ROOT, &s, &a);
        assert_eq!(k, "/lb-overrides/greet_service/endpoints/10.0.0.7:3000");
        assert_eq!(parse_key(DEFAULT_ROOT, k.as_bytes()).unwrap(), (s, a));
        assert!(
            !k.starts_with(schema::DEFAULT_ROOT),
            "never inside the registry"
        );
        assert!(parse_key(DEFAULT_ROOT, b"/lb-overrides/s/split").is_err());
    }
}
