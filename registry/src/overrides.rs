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
//! - Version splits (canaries) are service-level overrides under
//!   `<root><service>/split`, in [`split`]; readers take a split service's
//!   weights from [`split_weights`], over the effective weights.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use etcd_client::{EventType, GetOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::etcd::{EtcdConfig, EtcdError};
use crate::schema::{self, Addr, SchemaError, ServiceName, MAX_WEIGHT};
use crate::session::Session;
use crate::watcher::Entry;

pub mod split;

pub use split::{
    parse_lane, parse_selector, parse_split_value, split_key, split_weights, version_matches, Lane,
    Side, Split, SplitApplies, SplitMap, SplitOutcome, Weighed,
};

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

/// What an override key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverrideKey {
    /// One endpoint's override (`<root><service>/endpoints/<addr>`).
    Endpoint(ServiceName, Addr),
    /// A service's version split (`<root><service>/split`).
    Split(ServiceName),
}

/// Reads any override key under `root`.
///
/// # Errors
/// A key that is neither an endpoint override's nor a split's.
pub fn parse_any_key(root: &str, key: &[u8]) -> Result<OverrideKey, SchemaError> {
    if let Ok((s, a)) = parse_key(root, key) {
        return Ok(OverrideKey::Endpoint(s, a));
    }
    let bad = |why: &str| SchemaError::Value(format!("override key: {why}"));
    let key = std::str::from_utf8(key).map_err(|_| bad("not UTF-8"))?;
    let service = key
        .strip_prefix(root)
        .and_then(|rest| rest.strip_suffix("/split"))
        .ok_or_else(|| bad("neither <service>/endpoints/<addr> nor <service>/split"))?;
    Ok(OverrideKey::Split(ServiceName::new(service)?))
}

/// The directory of everything overriding one service (its endpoints'
/// overrides and its split): what a client of that service watches.
pub fn service_dir(root: &str, service: &ServiceName) -> String {
    format!("{root}{service}/")
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
        .filter_map(|e| expiry_ahead(e, now))
        .min()
}

/// How far ahead of `now` an RFC 3339 expiry lies; `None` when it is
/// unreadable or not ahead.
fn expiry_ahead(expires: &str, now: SystemTime) -> Option<Duration> {
    humantime::parse_rfc3339_weak(expires)
        .ok()
        .and_then(|t| t.duration_since(now).ok())
        .filter(|d| !d.is_zero())
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
pub async fn first_list(rx: &mut watch::Receiver<Arc<Overrides>>, limit: Duration) -> bool {
    tokio::time::timeout(limit, rx.changed())
        .await
        .is_ok_and(|r| r.is_ok())
}

/// Now as RFC 3339 (seconds), for `at`.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Every endpoint override under a root (or of one service), by service
/// and address.
pub type OverrideMap = HashMap<(ServiceName, Addr), EndpointOverride>;

/// Everything operators override under a root (or of one service): the
/// endpoints' overrides and the services' splits, as one snapshot so a
/// reader never sees one without the other.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// Endpoint overrides (drain, weight).
    pub endpoints: OverrideMap,
    /// Version splits, by service.
    pub splits: SplitMap,
}

impl Overrides {
    /// How long until the next endpoint override or split lapses, by
    /// [`next_expiry`]'s rule: readers re-weigh then.
    pub fn next_expiry(&self, now: SystemTime) -> Option<Duration> {
        let splits = self
            .splits
            .values()
            .filter_map(|s| s.expires.as_deref())
            .filter_map(|e| expiry_ahead(e, now))
            .min();
        next_expiry(self.endpoints.values(), now)
            .into_iter()
            .chain(splits)
            .min()
    }
}

/// Each etcd request's bound.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the watch asks etcd for a progress notice.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// A watch that has answered nothing (no event, no progress notice) for
/// this long is taken as stuck on a member that cannot serve it: it is
/// ended and the overrides are listed again from the next member.
const SILENCE: Duration = Duration::from_secs(6);

/// Keeps the overrides under `root` (of `service` only, when given:
/// its endpoints' overrides and its split) current from etcd until
/// `cancel`: list, then watch from the list's revision; relist after any
/// break. The receiver sees its first change when the first list is in
/// ([`first_list`]). While etcd is unreachable the last known overrides
/// stay (an operator's drain is not undone by an outage). Invalid values
/// are ignored with a warning naming the key.
///
/// A member cut off from its peers would keep a watch open and silent, and
/// an operator's drain written through the majority would not be seen until
/// the partition healed. So, as the registry's watcher does, requests and
/// the watch ask for etcd's leader (the member cancels the watch when it
/// loses it), the watch asks for progress notices every
/// 2 s, and a watch silent for 6 s (a paused
/// member answers nothing at all) is ended; each break moves to the next
/// member and lists again. Listing again from scratch after every break
/// also covers an etcd wiped or restored from a snapshot: the new list is
/// the truth, whatever its revision.
///
/// # Panics
/// Outside a Tokio runtime.
pub fn spawn_watch(
    etcd: EtcdConfig,
    root: String,
    service: Option<ServiceName>,
    cancel: CancellationToken,
) -> watch::Receiver<Arc<Overrides>> {
    let (tx, rx) = watch::channel(Arc::new(Overrides::default()));
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut session = Session::new(etcd.require_leader()).with_timeout(REQUEST_TIMEOUT);
        let prefix = match &service {
            Some(s) => service_dir(&root, s),
            None => root.clone(),
        };
        loop {
            let ended = tokio::select! {
                () = cancel.cancelled() => return,
                r = follow(&mut session, &root, &prefix, &tx, &mut backoff) => r,
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

fn apply_kv(map: &mut Overrides, root: &str, key: &[u8], value: Option<&[u8]>) {
    let Ok(id) = parse_any_key(root, key) else {
        return;
    };
    match id {
        OverrideKey::Endpoint(s, a) => match value.map(parse_value) {
            None => {
                map.endpoints.remove(&(s, a));
            }
            Some(Ok(o)) => {
                map.endpoints.insert((s, a), o);
            }
            Some(Err(e)) => {
                warn!(key = %String::from_utf8_lossy(key), error = %e, "invalid override ignored");
                map.endpoints.remove(&(s, a));
            }
        },
        OverrideKey::Split(s) => match value.map(parse_split_value) {
            None => {
                map.splits.remove(&s);
            }
            Some(Ok(split)) => {
                map.splits.insert(s, split);
            }
            Some(Err(e)) => {
                warn!(key = %String::from_utf8_lossy(key), error = %e,
                      "invalid version split ignored: plain weights apply");
                map.splits.remove(&s);
            }
        },
    }
}

/// One list + watch; returns when the watch breaks, is cancelled (a member
/// without a leader cancels it) or stays silent for [`SILENCE`].
async fn follow(
    session: &mut Session,
    root: &str,
    prefix: &str,
    tx: &watch::Sender<Arc<Overrides>>,
    backoff: &mut Backoff,
) -> Result<(), EtcdError> {
    let client = session.client().await?;
    let resp = session
        .bounded(
            client
                .kv_client()
                .get(prefix, Some(GetOptions::new().with_prefix())),
        )
        .await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut map = Overrides::default();
    for kv in resp.kvs() {
        apply_kv(&mut map, root, kv.key(), Some(kv.value()));
    }
    tx.send_replace(Arc::new(map.clone()));
    let mut stream = session
        .bounded(
            client.watch_client().watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_progress_notify()
                        .with_start_revision(revision + 1),
                ),
            ),
        )
        .await?;
    backoff.reset();
    let mut heard = Instant::now();
    loop {
        let msg = tokio::select! {
            msg = stream.message() => msg,
            () = tokio::time::sleep(PROGRESS_INTERVAL) => {
                if heard.elapsed() >= SILENCE {
                    session.reset();
                    return Err(EtcdError::Timeout(SILENCE));
                }
                stream.request_progress().await.map_err(|e| session.check(e))?;
                continue;
            }
        };
        let Some(resp) = msg.map_err(|e| session.check(e))? else {
            return Ok(());
        };
        heard = Instant::now();
        if resp.canceled() {
            // No leader on this member (or compaction): another member.
            debug!(
                reason = resp.cancel_reason(),
                "override watch cancelled by etcd"
            );
            session.reset();
            return Ok(());
        }
        if resp.compact_revision() > 0 {
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

    #[test]
    fn split_keys_and_values_reach_the_snapshot_and_garbage_does_not() {
        let s = ServiceName::new("greet_service").unwrap();
        let key = split_key(DEFAULT_ROOT, &s);
        assert_eq!(key, "/lb-overrides/greet_service/split");
        assert_eq!(
            parse_any_key(DEFAULT_ROOT, key.as_bytes()).unwrap(),
            OverrideKey::Split(s.clone())
        );
        assert!(key.starts_with(&service_dir(DEFAULT_ROOT, &s)));
        assert!(parse_any_key(DEFAULT_ROOT, b"/lb-overrides/greet_service/other").is_err());
        assert!(parse_any_key(DEFAULT_ROOT, b"/lb-overrides/Bad Name/split").is_err());
        let mut map = Overrides::default();
        let good = br#"{"lanes":[{"version":"2.0.0","percent":5}],"at":"2026-12-07T00:00:00Z"}"#;
        apply_kv(&mut map, DEFAULT_ROOT, key.as_bytes(), Some(good));
        assert_eq!(map.splits[&s].lanes[0].percent, 5.0);
        // Malformed: a warning, the split dropped (plain weights), no panic.
        for bad in [
            &br#"{"lanes":[{"version":"2.0.0","percent":500}],"at":"x"}"#[..],
            b"\xff\x00",
            b"null",
        ] {
            apply_kv(&mut map, DEFAULT_ROOT, key.as_bytes(), Some(good));
            apply_kv(&mut map, DEFAULT_ROOT, key.as_bytes(), Some(bad));
            assert!(map.splits.is_empty());
        }
        apply_kv(&mut map, DEFAULT_ROOT, key.as_bytes(), Some(good));
        apply_kv(&mut map, DEFAULT_ROOT, key.as_bytes(), None);
        assert!(map.splits.is_empty());
        // The next expiry looks at splits too.
        let now = SystemTime::now();
        let soon = now + Duration::from_secs(90);
        let mut split = parse_split_value(good).unwrap();
        split.expires = Some(humantime::format_rfc3339_seconds(soon).to_string());
        map.splits.insert(s, split);
        let next = map.next_expiry(now).unwrap();
        assert!(next > Duration::from_secs(85), "{next:?}");
    }
}
