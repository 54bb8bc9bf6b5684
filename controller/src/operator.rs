//! The operator's commands: `controller drain|undrain|weight|overrides`.
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

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use etcd_client::{Client, GetOptions};
use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_registry::overrides::{self, Applies, EndpointOverride, Incarnation};
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

/// One override as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
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

/// Every override (of `service`, or all), joined with the registry.
///
/// # Errors
/// etcd refusing; a bad service name.
pub async fn list(
    etcd: &EtcdConfig,
    root: &str,
    overrides_root: &str,
    service: Option<&str>,
) -> Result<Vec<Listed>, OperatorError> {
    let prefix = match service {
        Some(s) => overrides::service_prefix(
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
    for kv in resp.kvs() {
        let Ok((service, addr)) = overrides::parse_key(overrides_root, kv.key()) else {
            continue;
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
            service: service.to_string(),
            addr: addr.to_string(),
            effective_weight: registered
                .map(|w| overrides::effective_weight(w, entry.as_ref(), Some(&value), now)),
            registered_weight: registered,
            applies,
            value,
        });
    }
    Ok(out)
}

/// The overrides as a table for people.
pub fn table(rows: &[Listed]) -> String {
    let mut s = String::from(
        "SERVICE\tADDR\tOVERRIDE\tREGISTERED\tEFFECTIVE\tAPPLIES\tBY\tAT\tEXPIRES\tREASON\n",
    );
    for r in rows {
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
    s
}
