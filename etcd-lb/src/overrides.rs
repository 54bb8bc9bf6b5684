//! Operator overrides of one service, kept current from etcd (list, then
//! watch from the list's revision; relist after any break), for
//! [`crate::discover`] to compute effective weights with
//! [`etcd_lb_registry::overrides::effective_weight`].
//!
//! While etcd is unreachable the last known overrides stay (as the
//! endpoints do): an operator's drain is not undone by an outage.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use etcd_lb_registry::backoff::Backoff;
use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_registry::overrides::{self, EndpointOverride};
use etcd_lb_registry::schema::{Addr, ServiceName};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The overrides of one service by address.
pub type Overrides = HashMap<Addr, EndpointOverride>;

/// Starts keeping `service`'s overrides under `root` current until
/// `cancel`.
pub(crate) fn spawn(
    etcd: EtcdConfig,
    root: String,
    service: ServiceName,
    cancel: CancellationToken,
) -> watch::Receiver<Arc<Overrides>> {
    let (tx, rx) = watch::channel(Arc::new(Overrides::new()));
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let ended = tokio::select! {
                () = cancel.cancelled() => return,
                r = follow(&etcd, &root, &service, &tx, &mut backoff) => r,
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

fn apply(map: &mut Overrides, root: &str, key: &[u8], value: Option<&[u8]>) {
    let Ok((_, addr)) = overrides::parse_key(root, key) else {
        return;
    };
    match value.map(overrides::parse_value) {
        None => {
            map.remove(&addr);
        }
        Some(Ok(o)) => {
            map.insert(addr, o);
        }
        Some(Err(e)) => {
            warn!(key = %String::from_utf8_lossy(key), error = %e, "invalid override ignored");
            map.remove(&addr);
        }
    }
}

/// One list + watch; returns when the watch breaks.
async fn follow(
    etcd: &EtcdConfig,
    root: &str,
    service: &ServiceName,
    tx: &watch::Sender<Arc<Overrides>>,
    backoff: &mut Backoff,
) -> Result<(), etcd_client::Error> {
    let prefix = overrides::service_prefix(root, service);
    let Ok(mut client) = etcd.connect().await else {
        return Ok(());
    };
    let resp = client
        .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut map = Overrides::new();
    for kv in resp.kvs() {
        apply(&mut map, root, kv.key(), Some(kv.value()));
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
                EventType::Put => apply(&mut map, root, kv.key(), Some(kv.value())),
                EventType::Delete => apply(&mut map, root, kv.key(), None),
            }
        }
        tx.send_replace(Arc::new(map.clone()));
    }
    Ok(())
}
