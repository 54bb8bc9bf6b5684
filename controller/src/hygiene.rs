//! Override hygiene: the leader removes operators' overrides that can never
//! apply again, so they neither pile up nor mislead whoever reads them.
//!
//! An override is removed when
//! - its expiry has passed (`--for`), or
//! - it was made for an incarnation that is gone for good: its lease no
//!   longer exists in etcd (no process can register on a dead lease), or,
//!   for a lease-less registration, the key is absent or was created at
//!   another revision (a re-put key gets a new creation revision).
//!
//! A server re-registering on its lease (its key deleted and put again)
//! keeps its lease, so its override stays; a sticky override (made for the
//! address, not an incarnation) stays until it expires or an operator
//! removes it. A value that cannot be read, or a key that is not an
//! endpoint override, is left alone (an operator's key is never removed
//! on a guess).
//!
//! Each removal is one transaction fenced like the reconciler's deletions
//! ([`crate::reconcile::delete_if_unchanged`]): the override's mod revision
//! as read, and the election key's creation revision. An override an
//! operator rewrote meanwhile, or a leader deposed meanwhile, removes
//! nothing. At most the per-pass deletion budget's worth go per pass.

use std::time::SystemTime;

use etcd_client::GetOptions;
use etcd_lb_registry::etcd::EtcdError;
use etcd_lb_registry::overrides::{self, EndpointOverride, Incarnation};
use etcd_lb_registry::schema::{self, Addr, ServiceName};
use etcd_lb_registry::session::Session;
use tracing::{debug, info, warn};

use crate::leader::Leadership;
use crate::reconcile::{delete_if_unchanged, DeleteOutcome};

/// At most this many overrides are removed per pass: a sweep stays bounded
/// however many lapsed at once (the rest go in later passes).
pub const SWEEP_PER_PASS: usize = 100;

/// Why an override was removed (the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lapsed {
    /// Its expiry passed.
    Expired,
    /// The incarnation it was made for is gone for good.
    IncarnationGone,
}

impl Lapsed {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Lapsed::Expired => "expired",
            Lapsed::IncarnationGone => "incarnation_gone",
        }
    }
}

/// One stored endpoint override, as read with its key's mod revision.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its etcd key.
    pub key: String,
    /// Its key's mod revision when read (the removal's fence).
    pub mod_revision: i64,
    /// Service and address it names.
    pub service: ServiceName,
    /// The endpoint's address.
    pub addr: Addr,
    /// The value.
    pub value: EndpointOverride,
}

/// What is known of an override's incarnation now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incarnated {
    /// It may still be there (or it is not known: etcd did not say).
    MaybeAlive,
    /// Gone for good.
    Gone,
}

/// The pure decision: whether `o` can never apply again at `now`, given
/// what is known of its incarnation.
pub fn lapsed(o: &EndpointOverride, incarnation: Incarnated, now: SystemTime) -> Option<Lapsed> {
    if o.expired(now) {
        return Some(Lapsed::Expired);
    }
    match (o.incarnation, incarnation) {
        (Some(_), Incarnated::Gone) => Some(Lapsed::IncarnationGone),
        _ => None,
    }
}

/// Reads every endpoint override under `overrides_root` with its mod
/// revision; keys that are not endpoint overrides, or values that cannot be
/// read, are skipped (and logged at debug: the view reports them).
async fn list(session: &mut Session, overrides_root: &str) -> Result<Vec<Stored>, EtcdError> {
    let root = overrides_root.to_owned();
    let resp = session
        .call(|mut c| async move { c.get(root, Some(GetOptions::new().with_prefix())).await })
        .await?;
    let mut out = Vec::new();
    for kv in resp.kvs() {
        let parsed = overrides::parse_key(overrides_root, kv.key())
            .and_then(|(service, addr)| Ok((service, addr, overrides::parse_value(kv.value())?)));
        match parsed {
            Ok((service, addr, value)) => out.push(Stored {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                mod_revision: kv.mod_revision(),
                service,
                addr,
                value,
            }),
            Err(e) => {
                debug!(key = %String::from_utf8_lossy(kv.key()), error = %e, "not an endpoint override; left alone")
            }
        }
    }
    Ok(out)
}

/// Whether `o`'s incarnation is gone for good: a lease that etcd no longer
/// has, or a lease-less key absent or created at another revision.
async fn incarnation(
    session: &mut Session,
    root: &str,
    o: &Stored,
) -> Result<Incarnated, EtcdError> {
    Ok(match o.value.incarnation {
        None => Incarnated::MaybeAlive,
        Some(Incarnation::Lease(id)) => {
            let resp = session
                .call(|mut c| async move { c.lease_time_to_live(id, None).await })
                .await?;
            // etcd answers TTL -1 for a lease it does not have.
            if resp.ttl() < 0 {
                Incarnated::Gone
            } else {
                Incarnated::MaybeAlive
            }
        }
        Some(Incarnation::CreateRevision(rev)) => {
            let key = schema::key(root, &o.service, &o.addr);
            let resp = session
                .call(|mut c| async move { c.get(key, None).await })
                .await?;
            match resp.kvs().first() {
                Some(kv) if kv.create_revision() == rev => Incarnated::MaybeAlive,
                _ => Incarnated::Gone,
            }
        }
    })
}

/// What a sweep did (also when it stopped on an etcd error: what it
/// removed before stays removed, and is counted).
#[derive(Debug, Default)]
pub struct Swept {
    /// Removed, with why.
    pub removed: Vec<(String, Lapsed)>,
    /// Rewritten by an operator since read: kept.
    pub changed: usize,
    /// The leadership was lost: the sweep stopped.
    pub not_leader: bool,
    /// etcd failed: the sweep stopped there.
    pub failed: Option<EtcdError>,
}

/// One sweep, on the leader: removes at most `budget` overrides that can
/// never apply again (see the module doc). An etcd failure ends it, in
/// [`Swept::failed`].
pub async fn sweep(
    session: &mut Session,
    root: &str,
    overrides_root: &str,
    budget: usize,
    leadership: &Leadership,
) -> Swept {
    let mut swept = Swept::default();
    if let Err(e) = sweep_into(
        session,
        root,
        overrides_root,
        budget,
        leadership,
        &mut swept,
    )
    .await
    {
        swept.failed = Some(e);
    }
    swept
}

async fn sweep_into(
    session: &mut Session,
    root: &str,
    overrides_root: &str,
    budget: usize,
    leadership: &Leadership,
    swept: &mut Swept,
) -> Result<(), EtcdError> {
    let now = SystemTime::now();
    for o in list(session, overrides_root).await? {
        if swept.removed.len() >= budget {
            debug!(budget, "override sweep budget spent; the rest waits");
            break;
        }
        let known = if o.value.expired(now) {
            Incarnated::MaybeAlive
        } else {
            incarnation(session, root, &o).await?
        };
        let Some(why) = lapsed(&o.value, known, now) else {
            continue;
        };
        match delete_if_unchanged(session, &o.key, o.mod_revision, leadership).await? {
            DeleteOutcome::Deleted => {
                info!(service = %o.service, addr = %o.addr, key = %o.key, reason = why.as_str(),
                      by = %o.value.by, why = %o.value.reason, at = %o.value.at,
                      "removed an override that can no longer apply");
                swept.removed.push((o.key, why));
            }
            DeleteOutcome::Changed => {
                debug!(key = %o.key, "override rewritten since read; kept");
                swept.changed += 1;
            }
            DeleteOutcome::NotLeader => {
                warn!("the election key is no longer ours; stopping the override sweep");
                swept.not_leader = true;
                break;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn drain(incarnation: Option<Incarnation>, expires: Option<SystemTime>) -> EndpointOverride {
        EndpointOverride {
            drain: true,
            weight: None,
            incarnation,
            reason: "t".into(),
            by: "t".into(),
            at: overrides::now_rfc3339(),
            expires: expires.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        }
    }

    #[test]
    fn only_overrides_that_can_never_apply_again_lapse() {
        let now = SystemTime::now();
        let past = Some(now - Duration::from_secs(5));
        let ahead = Some(now + Duration::from_secs(60));
        let lease = Some(Incarnation::Lease(7));
        // Expired: whatever the incarnation, sticky too.
        assert_eq!(
            lapsed(&drain(None, past), Incarnated::MaybeAlive, now),
            Some(Lapsed::Expired)
        );
        assert_eq!(
            lapsed(&drain(lease, past), Incarnated::MaybeAlive, now),
            Some(Lapsed::Expired)
        );
        // Its incarnation gone: lapsed; maybe alive (or unknown): kept.
        assert_eq!(
            lapsed(&drain(lease, ahead), Incarnated::Gone, now),
            Some(Lapsed::IncarnationGone)
        );
        assert_eq!(
            lapsed(&drain(lease, None), Incarnated::MaybeAlive, now),
            None
        );
        // Sticky: never for an incarnation.
        assert_eq!(lapsed(&drain(None, None), Incarnated::Gone, now), None);
        assert_eq!(lapsed(&drain(None, ahead), Incarnated::Gone, now), None);
    }
}
