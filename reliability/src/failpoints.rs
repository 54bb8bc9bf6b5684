//! Failpoints in a harness world (docs/robustness.md, "Failpoints").
//!
//! A world may break the real code on purpose, or inject faults inside it,
//! through the failpoints of `etcd_lb_registry::failpoints` and the
//! controller's: for its in-process clients by setting them in this process
//! for the run (`fail::cfg`), and for the greet-server and controller
//! processes through their `FAILPOINTS` variable, read at start. Each list
//! is in `FAILPOINTS` syntax, `name=actions;...`.
//!
//! Failpoints are global to a process, so a run that sets some in this one
//! holds it alone: the world takes a lock for every run, shared by
//! runs that set none, so tests in one binary never see each other's.
//!
//! Firings are counted (the registry counts this process's; the spawned
//! processes log `failpoint fired`, counted from their logs) into
//! [`History::failpoint_hits`], so a test can tell that its fault happened.
//! A spawned binary built without the feature logs that it ignores
//! `FAILPOINTS`: the run then fails, rather than passing for want of a
//! fault.
//!
//! Also here: two registry writes some failpoints need something to act
//! on ([`FaultKind::KeyDelete`], [`FaultKind::MultiKeyWrite`]).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use etcd_lb_registry::failpoints as fp;
use etcd_lb_testkit::Cluster;
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

#[cfg(doc)]
use crate::history::FaultKind;
use crate::history::History;
use crate::world::PREFIX;

/// The controller's failpoints (`controller::reconcile`), named here too so
/// the harness needs no controller library.
pub const CONTROLLER_DELETE_UNFENCED: &str = "controller-delete-unfenced";
/// See [`CONTROLLER_DELETE_UNFENCED`].
pub const CONTROLLER_DELETE_DELAY: &str = "controller-delete-delay";

/// The failpoints a world sets, each list in `FAILPOINTS` syntax.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failpoints {
    /// Set in this process for the run: the in-process clients' reflector
    /// and etcd calls (the library's real code).
    pub clients: String,
    /// `FAILPOINTS` of every greet-server process.
    pub servers: String,
    /// `FAILPOINTS` of every controller replica.
    pub controllers: String,
}

impl Failpoints {
    /// Whether it sets nothing anywhere.
    pub fn is_empty(&self) -> bool {
        [&self.clients, &self.servers, &self.controllers]
            .iter()
            .all(|l| l.trim().is_empty())
    }

    /// The environment of a spawned process for `list`.
    pub(crate) fn env(list: &str) -> Vec<(&'static str, &str)> {
        if list.trim().is_empty() {
            Vec::new()
        } else {
            vec![("FAILPOINTS", list)]
        }
    }
}

/// Who may set this process's failpoints now.
static IN_PROCESS: RwLock<()> = RwLock::const_new(());

/// This process's failpoints, set for one run; turned off on drop.
pub(crate) struct Armed {
    _guard: Guard,
    names: Vec<String>,
    before: BTreeMap<String, u64>,
}

enum Guard {
    Shared(#[allow(dead_code)] RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] RwLockWriteGuard<'static, ()>),
}

/// Sets `fp.clients` in this process, holding it alone while they are set
/// (shared when none are). Waits for runs that hold it.
///
/// # Errors
/// A list that does not parse, or failpoints asked for in a build without
/// them.
pub(crate) async fn arm(fp: &Failpoints) -> Result<Armed> {
    if !fp.is_empty() && !fp::ENABLED {
        bail!(
            "failpoints asked for, but this build has none: build with the `failpoints` feature \
             (`cargo test` of this crate does; see docs/robustness.md)"
        );
    }
    let guard = if fp.clients.trim().is_empty() {
        Guard::Shared(IN_PROCESS.read().await)
    } else {
        Guard::Alone(IN_PROCESS.write().await)
    };
    let names = fp::set_list(&fp.clients).context("client failpoints")?;
    let before = names.iter().map(|n| (n.clone(), fp::hits(n))).collect();
    Ok(Armed {
        _guard: guard,
        names,
        before,
    })
}

impl Armed {
    /// This process's firings of its failpoints since it was armed.
    pub(crate) fn hits(&self) -> BTreeMap<String, u64> {
        self.names
            .iter()
            .map(|n| {
                let before = self.before.get(n).copied().unwrap_or(0);
                (n.clone(), fp::hits(n).saturating_sub(before))
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        for n in &self.names {
            fp::remove(n);
        }
    }
}

/// The firings a process's log reports (`failpoint fired` lines, text or
/// JSON, naming the failpoint in a `failpoint` field).
pub fn hits_in_log(log: &str) -> BTreeMap<String, u64> {
    let mut hits = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("failpoint fired")) {
        let name = serde_json::from_str::<serde_json::Value>(line)
            .ok()
            .and_then(|v| v["fields"]["failpoint"].as_str().map(str::to_owned))
            .or_else(|| {
                let rest = &line[line.find("failpoint=")? + "failpoint=".len()..];
                let name: String = rest
                    .trim_start_matches('"')
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                    .collect();
                (!name.is_empty()).then_some(name)
            });
        if let Some(name) = name {
            *hits.entry(name).or_default() += 1;
        }
    }
    hits
}

/// Adds a process's firings to the history.
pub(crate) fn count(log: &str, h: &mut History) {
    for (name, n) in hits_in_log(log) {
        *h.failpoint_hits.entry(name).or_default() += n;
    }
}

/// Whether a process said it ignores `FAILPOINTS` (built without them).
pub(crate) fn ignored(log: &str) -> bool {
    log.contains("this build has no failpoints")
}

/// Deletes `addr`'s key, as a person (or a stray script) would: its live
/// server must register again ([`FaultKind::KeyDelete`]).
pub(crate) async fn delete_key(cluster: &Cluster, addr: &str) -> Result<()> {
    let key = format!("{PREFIX}{addr}");
    retry("deleting a key", || async {
        let mut c = cluster.client().await?;
        c.delete(key.as_str(), None).await?;
        anyhow::Ok(())
    })
    .await
}

/// Halves the weight of every registered key in one transaction, each on
/// its own lease and fenced on its mod revision: one revision with one
/// event per server, which the reflector must apply whole even when its
/// stream is cut between them ([`FaultKind::MultiKeyWrite`]). The servers'
/// registrars write their own weight back within a third of their TTL.
pub(crate) async fn halve_weights(cluster: &Cluster) -> Result<()> {
    retry("rewriting the registry", || async {
        let mut c = cluster.client().await?;
        let r = c.get(PREFIX, Some(GetOptions::new().with_prefix())).await?;
        let mut compares = Vec::new();
        let mut puts = Vec::new();
        for kv in r.kvs() {
            let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(kv.value()) else {
                continue;
            };
            let Some(w) = v.get("weight").and_then(serde_json::Value::as_u64) else {
                continue;
            };
            v["weight"] = (w / 2).max(1).into();
            compares.push(Compare::mod_revision(
                kv.key(),
                CompareOp::Equal,
                kv.mod_revision(),
            ));
            puts.push(TxnOp::put(
                kv.key(),
                serde_json::to_vec(&v)?,
                Some(PutOptions::new().with_lease(kv.lease())),
            ));
        }
        if puts.len() < 2 {
            bail!("fewer than two keys to rewrite");
        }
        if !c
            .txn(Txn::new().when(compares).and_then(puts))
            .await?
            .succeeded()
        {
            bail!("a key changed under the rewrite");
        }
        anyhow::Ok(())
    })
    .await
}

/// A few attempts, as a write right after another fault may meet a leader
/// change or a key moving.
async fn retry<F, Fut>(what: &str, mut attempt: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut last = None;
    for _ in 0..5 {
        match tokio::time::timeout(Duration::from_secs(5), attempt()).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(anyhow::anyhow!("timed out")),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Err(last.expect("attempted").context(what.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firings_are_counted_from_text_and_json_logs() {
        let log = r#"2026-12-07T05:00:00Z  WARN lease: failpoint fired failpoint="keepalive-answer-lost"
2026-12-07T05:00:01Z  WARN lease: failpoint fired failpoint=keepalive-answer-lost
{"timestamp":"x","level":"WARN","fields":{"message":"failpoint fired","failpoint":"controller-delete-delay"}}
not a firing
{"fields":{"message":"failpoint fired"}}"#;
        let hits = hits_in_log(log);
        assert_eq!(hits.get("keepalive-answer-lost"), Some(&2));
        assert_eq!(hits.get("controller-delete-delay"), Some(&1));
        assert_eq!(hits.len(), 2);
    }
}
