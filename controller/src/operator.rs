//! The operator's commands: `controller drain|undrain|weight|split|unsplit|overrides`.
//! They write and read [`etcd_lb_registry::overrides`] keys, beside the
//! registry, so a server's own registrar never overwrites them and every
//! reader (client library, xDS, `/services`) applies the same effective
//! weight.
//!
//! An override is made for the registration at the address now (its lease,
//! or creation revision): when another process takes the address it no
//! longer applies. `--sticky` makes it apply to any registration at the
//! address. A service or address with nothing registered is an error
//! unless `--force` (then the override is sticky, pre-staged for what will
//! register there).
//!
//! `split` writes a service's version split (`<root><service>/split`),
//! checked before it is written (lanes readable, percentages in 0..=100,
//! summing to at most 100), and says what it does to the service as
//! registered now, through the same [`overrides::split_weights`] every
//! reader applies.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use etcd_client::{Client, GetOptions};
use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_registry::overrides::{
    self, Applies, EndpointOverride, Incarnation, OverrideKey, Side, Split, SplitApplies,
};
use etcd_lb_registry::schema::{self, Addr, ServiceName};
use etcd_lb_registry::watcher::Entry;

/// Why a command failed, in the operator's words.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// Nothing registered where the override would apply.
    #[error("{0} (use --force to pre-stage an override for what will register there)")]
    NotRegistered(String),
    /// etcd refused or could not be reached.
    #[error("etcd: {0}")]
    Etcd(String),
}

/// What a drain or weight command asks for.
#[derive(Debug, Clone)]
pub struct Change {
    /// Drain (weight 0) or this weight.
    pub weight: Option<u32>,
    /// Why.
    pub reason: String,
    /// Who; default the etcd user, else `$USER`.
    pub by: Option<String>,
    /// Lapses after this long.
    pub for_: Option<Duration>,
    /// Any registration at the address, not only the current one.
    pub sticky: bool,
    /// Write it even when nothing is registered there.
    pub force: bool,
}

fn etcd_err(e: impl std::fmt::Display) -> OperatorError {
    OperatorError::Etcd(e.to_string())
}

async fn registration(
    c: &mut Client,
    root: &str,
    service: &ServiceName,
    addr: &Addr,
) -> Result<Option<Entry>, OperatorError> {
    let key = schema::key(root, service, addr);
    let resp = c.get(key, None).await.map_err(etcd_err)?;
    Ok(resp.kvs().first().map(|kv| Entry::from_kv(root, kv)))
}

/// Writes an endpoint override; returns the line to print.
///
/// # Errors
/// Bad names, nothing registered (without `force`), etcd refusing.
pub async fn set(
    etcd: &EtcdConfig,
    root: &str,
    overrides_root: &str,
    service: &str,
    addr: &str,
    change: Change,
) -> Result<String, OperatorError> {
    let service = ServiceName::new(service).map_err(|e| OperatorError::Usage(e.to_string()))?;
    let addr = Addr::new(addr).map_err(|e| OperatorError::Usage(e.to_string()))?;
    if let Some(w) = change.weight.filter(|w| *w > schema::MAX_WEIGHT) {
        return Err(OperatorError::Usage(format!(
            "weight {w} is above the maximum of {}",
            schema::MAX_WEIGHT
        )));
    }
    let mut c = etcd.connect().await.map_err(etcd_err)?;
    let entry = registration(&mut c, root, &service, &addr).await?;
    let incarnation = match (&entry, change.sticky, change.force) {
        (_, true, _) => None,
        (Some(e), false, _) => Some(Incarnation::of(e)),
        (None, false, true) => None,
        (None, false, false) => {
            return Err(OperatorError::NotRegistered(format!(
                "nothing is registered at {}",
                schema::key(root, &service, &addr)
            )))
        }
    };
    let by = change
        .by
        .or_else(|| etcd.user().map(str::to_owned))
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into());
    let expires = change
        .for_
        .map(|d| humantime::format_rfc3339_seconds(SystemTime::now() + d).to_string());
    let ov = EndpointOverride {
        drain: change.weight.is_none(),
        weight: change.weight,
        incarnation,
        reason: change.reason,
        by,
        at: overrides::now_rfc3339(),
        expires,
    };
    let key = overrides::endpoint_key(overrides_root, &service, &addr);
    c.put(key.clone(), ov.to_json(), None)
        .await
        .map_err(etcd_err)?;
    let what = match ov.weight {
        None => "drained".to_owned(),
        Some(w) => format!("weight {w}"),
    };
    let scope = match (ov.incarnation, entry.is_some()) {
        (Some(Incarnation::Lease(l)), _) => format!("this registration (lease {l:x})"),
        (Some(Incarnation::CreateRevision(r)), _) => {
            format!("this registration (created at revision {r})")
        }
        (None, true) => "any registration at this address (sticky)".to_owned(),
        (None, false) => "what will register at this address (pre-staged, sticky)".to_owned(),
    };
    let until = ov
        .expires
        .as_deref()
        .map(|e| format!(" until {e}"))
        .unwrap_or_default();
    Ok(format!(
        "{service} {addr}: {what} for {scope}{until} ({key})"
    ))
}

/// Removes an endpoint override; returns the line to print.
///
/// # Errors
/// Bad names, no such override, etcd refusing.
pub async fn clear(
    etcd: &EtcdConfig,
    overrides_root: &str,
    service: &str,
    addr: &str,
) -> Result<String, OperatorError> {
    let service = ServiceName::new(service).map_err(|e| OperatorError::Usage(e.to_string()))?;
    let addr = Addr::new(addr).map_err(|e| OperatorError::Usage(e.to_string()))?;
    let mut c = etcd.connect().await.map_err(etcd_err)?;
    let key = overrides::endpoint_key(overrides_root, &service, &addr);
    let resp = c.delete(key.clone(), None).await.map_err(etcd_err)?;
    if resp.deleted() == 0 {
        return Err(OperatorError::Usage(format!(
            "no override for {service} {addr} ({key})"
        )));
    }
    Ok(format!("{service} {addr}: override removed ({key})"))
}

/// What a split command asks for.
#[derive(Debug, Clone)]
pub struct SplitChange {
    /// Lanes as written, `<version>=<percent>`.
    pub lanes: Vec<String>,
    /// Why.
    pub reason: String,
    /// Who; default the etcd user, else `$USER`.
    pub by: Option<String>,
    /// Lapses after this long.
    pub for_: Option<Duration>,
    /// Write it even when nothing of the service is registered.
    pub force: bool,
}

fn usage(e: impl std::fmt::Display) -> OperatorError {
    OperatorError::Usage(e.to_string())
}

fn by_default(etcd: &EtcdConfig, by: Option<String>) -> String {
    by.or_else(|| etcd.user().map(str::to_owned))
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// A service's registrations and endpoint overrides, as `(version,
/// effective weight)` of each valid member: what [`overrides::split_weights`]
/// takes.
async fn service_members(
    c: &mut Client,
    root: &str,
    overrides_root: &str,
    service: &ServiceName,
) -> Result<Vec<(String, u32)>, OperatorError> {
    let resp = c
        .get(
            schema::service_prefix(root, service),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(etcd_err)?;
    let entries: Vec<Entry> = resp
        .kvs()
        .iter()
        .map(|kv| Entry::from_kv(root, kv))
        .collect();
    let resp = c
        .get(
            overrides::service_prefix(overrides_root, service),
            Some(GetOptions::new().with_prefix()),
        )
        .await
        .map_err(etcd_err)?;
    let ovs: std::collections::HashMap<Addr, EndpointOverride> = resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let (_, addr) = overrides::parse_key(overrides_root, kv.key()).ok()?;
            Some((addr, overrides::parse_value(kv.value()).ok()?))
        })
        .collect();
    let now = SystemTime::now();
    Ok(entries
        .iter()
        .filter_map(|e| {
            let (_, addr) = e.id.as_ref()?;
            let m = e.member.as_ref().ok()?;
            let w = overrides::effective_weight(m.weight, Some(e), ovs.get(addr), now);
            Some((m.version.clone(), w))
        })
        .collect())
}

/// The sides of `split` over `members`, with what each gets now.
fn sides_of(split: &Split, members: &[(String, u32)]) -> (SplitApplies, Vec<Side>) {
    let input: Vec<(&str, u32)> = members.iter().map(|(v, w)| (v.as_str(), *w)).collect();
    match overrides::split_weights(Some(split), &input, SystemTime::now()).split {
        Some(o) => (o.applies, o.sides),
        None => (SplitApplies::Invalid, Vec::new()),
    }
}

fn side_name(s: &Side) -> &str {
    s.lane.as_deref().unwrap_or("rest")
}

/// Writes a service's version split (replacing one it has); returns the
/// lines to print: the split, and what each side gets now.
///
/// # Errors
/// A bad service name, lane or percentage, lanes above 100 % (usage);
/// nothing of the service registered (without `force`); etcd refusing.
pub async fn split(
    etcd: &EtcdConfig,
    root: &str,
    overrides_root: &str,
    service: &str,
    change: SplitChange,
) -> Result<String, OperatorError> {
    let service = ServiceName::new(service).map_err(usage)?;
    let lanes = change
        .lanes
        .iter()
        .map(|l| overrides::parse_lane(l))
        .collect::<Result<Vec<_>, _>>()
        .map_err(usage)?;
    let value = Split {
        lanes,
        reason: change.reason,
        by: by_default(etcd, change.by),
        at: overrides::now_rfc3339(),
        expires: change
            .for_
            .map(|d| humantime::format_rfc3339_seconds(SystemTime::now() + d).to_string()),
    };
    value.selectors().map_err(usage)?;
    let mut c = etcd.connect().await.map_err(etcd_err)?;
    let members = service_members(&mut c, root, overrides_root, &service).await?;
    if members.is_empty() && !change.force {
        return Err(OperatorError::NotRegistered(format!(
            "nothing of {service} is registered under {}",
            schema::service_prefix(root, &service)
        )));
    }
    let key = overrides::split_key(overrides_root, &service);
    c.put(key.clone(), value.to_json(), None)
        .await
        .map_err(etcd_err)?;
    let until = value
        .expires
        .as_deref()
        .map(|e| format!(" until {e}"))
        .unwrap_or_default();
    let mut out = format!("{service}: split {}{until} ({key})\n", value.describe());
    let (_, sides) = sides_of(&value, &members);
    for s in &sides {
        let _ = writeln!(
            out,
            "  {}: asked {}%, gets {}% now ({} endpoints)",
            side_name(s),
            s.requested,
            s.effective,
            s.endpoints
        );
    }
    for s in sides
        .iter()
        .filter(|s| s.endpoints == 0 && s.requested > 0.0)
    {
        let _ = writeln!(
            out,
            "  note: no endpoint in use falls in {}: it gets no calls until one registers, the others take its share",
            side_name(s)
        );
    }
    Ok(out)
}

/// Removes a service's version split; returns the line to print.
///
/// # Errors
/// A bad service name, no split (usage); etcd refusing.
pub async fn unsplit(
    etcd: &EtcdConfig,
    overrides_root: &str,
    service: &str,
) -> Result<String, OperatorError> {
    let service = ServiceName::new(service).map_err(usage)?;
    let mut c = etcd.connect().await.map_err(etcd_err)?;
    let key = overrides::split_key(overrides_root, &service);
    let resp = c.delete(key.clone(), None).await.map_err(etcd_err)?;
    if resp.deleted() == 0 {
        return Err(OperatorError::Usage(format!(
            "{service} has no split ({key})"
        )));
    }
    Ok(format!(
        "{service}: split removed, plain weights again ({key})"
    ))
}

/// One override as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    /// `endpoint`.
    pub kind: &'static str,
    /// Service.
    pub service: String,
    /// Address.
    pub addr: String,
    /// The stored override.
    #[serde(flatten)]
    pub value: EndpointOverride,
    /// Whether it applies now.
    pub applies: Applies,
    /// The registered weight, when something is registered.
    pub registered_weight: Option<u32>,
    /// The weight readers use now.
    pub effective_weight: Option<u32>,
}

/// One split as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ListedSplit {
    /// `split`.
    pub kind: &'static str,
    /// Service.
    pub service: String,
    /// The stored split.
    #[serde(flatten)]
    pub value: Split,
    /// Whether it applies now.
    pub applies: SplitApplies,
    /// Each lane, then the rest: asked, effective share, endpoints.
    pub sides: Vec<Side>,
}

/// What `controller overrides` lists.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Endpoint overrides.
    pub endpoints: Vec<Listed>,
    /// Version splits.
    pub splits: Vec<ListedSplit>,
}

impl Listing {
    /// One JSON array: the endpoint overrides, then the splits, each row
    /// with its `kind`.
    pub fn to_json(&self) -> String {
        let rows: Vec<serde_json::Value> = self
            .endpoints
            .iter()
            .filter_map(|r| serde_json::to_value(r).ok())
            .chain(
                self.splits
                    .iter()
                    .filter_map(|r| serde_json::to_value(r).ok()),
            )
            .collect();
        serde_json::to_string_pretty(&rows).unwrap_or_default()
    }
}

/// Every override and split (of `service`, or all), joined with the
/// registry.
///
/// # Errors
/// etcd refusing; a bad service name.
pub async fn list(
    etcd: &EtcdConfig,
    root: &str,
    overrides_root: &str,
    service: Option<&str>,
) -> Result<Listing, OperatorError> {
    let prefix = match service {
        Some(s) => overrides::service_dir(
            overrides_root,
            &ServiceName::new(s).map_err(|e| OperatorError::Usage(e.to_string()))?,
        ),
        None => overrides_root.to_owned(),
    };
    let mut c = etcd.connect().await.map_err(etcd_err)?;
    let resp = c
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .map_err(etcd_err)?;
    let now = SystemTime::now();
    let mut out = Vec::new();
    let mut splits = Vec::new();
    for kv in resp.kvs() {
        let (service, addr) = match overrides::parse_any_key(overrides_root, kv.key()) {
            Ok(OverrideKey::Endpoint(s, a)) => (s, a),
            Ok(OverrideKey::Split(service)) => {
                let Ok(value) = overrides::parse_split_value(kv.value()) else {
                    continue;
                };
                let members = service_members(&mut c, root, overrides_root, &service).await?;
                let (applies, sides) = sides_of(&value, &members);
                splits.push(ListedSplit {
                    kind: "split",
                    service: service.to_string(),
                    value,
                    applies,
                    sides,
                });
                continue;
            }
            Err(_) => continue,
        };
        let Ok(value) = overrides::parse_value(kv.value()) else {
            continue;
        };
        let entry = registration(&mut c, root, &service, &addr).await?;
        let registered = entry
            .as_ref()
            .and_then(|e| e.member.as_ref().ok())
            .map(|m| m.weight);
        let applies = value.applies(entry.as_ref(), now);
        out.push(Listed {
            kind: "endpoint",
            service: service.to_string(),
            addr: addr.to_string(),
            effective_weight: registered
                .map(|w| overrides::effective_weight(w, entry.as_ref(), Some(&value), now)),
            registered_weight: registered,
            applies,
            value,
        });
    }
    Ok(Listing {
        endpoints: out,
        splits,
    })
}

/// The overrides as a table for people: endpoint overrides, then splits
/// (EFFECTIVE: the share each side gets now).
pub fn table(listing: &Listing) -> String {
    let mut s = String::from(
        "SERVICE\tADDR\tOVERRIDE\tREGISTERED\tEFFECTIVE\tAPPLIES\tBY\tAT\tEXPIRES\tREASON\n",
    );
    for r in &listing.endpoints {
        let what = match r.value.weight {
            _ if r.value.drain => "drain".to_owned(),
            Some(w) => format!("weight {w}"),
            None => "-".to_owned(),
        };
        let applies = match (r.applies, r.value.incarnation) {
            (Applies::Yes, None) => "yes (sticky)".to_owned(),
            (a, _) => serde_json::to_value(a)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
        };
        let opt = |v: Option<u32>| v.map_or("-".to_owned(), |w| w.to_string());
        let _ = writeln!(
            s,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            r.service,
            r.addr,
            what,
            opt(r.registered_weight),
            opt(r.effective_weight),
            applies,
            r.value.by,
            r.value.at,
            r.value.expires.as_deref().unwrap_or("-"),
            r.value.reason
        );
    }
    for r in &listing.splits {
        let gets: Vec<String> = r
            .sides
            .iter()
            .map(|side| format!("{}={}", side_name(side), side.effective))
            .collect();
        let applies = serde_json::to_value(r.applies)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "{}\t-\tsplit {}\t-\t{}\t{}\t{}\t{}\t{}\t{}",
            r.service,
            r.value.describe(),
            gets.join(" "),
            applies,
            r.value.by,
            r.value.at,
            r.value.expires.as_deref().unwrap_or("-"),
            r.value.reason
        );
    }
    s
}
