//! The overrides watcher against a real etcd cluster.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use etcd_client::Client;
use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_registry::overrides::{
    endpoint_key, first_list, now_rfc3339, spawn_watch, EndpointOverride, DEFAULT_ROOT,
};
use etcd_lb_registry::schema::{Addr, ServiceName};
use etcd_lb_testkit::Cluster;
use tokio_util::sync::CancellationToken;

/// An operator's drain is written through the majority while the
/// overrides watch sits on a member cut off from its peers. That member
/// sends nothing and does not end the stream; the watcher must notice (it
/// asks for etcd's leader on its watch and for progress notices, and ends
/// a silent stream) and move to another member, so the drain is seen
/// during the partition, not after it heals.
#[tokio::test]
async fn a_drain_is_seen_while_the_overrides_watch_sits_on_an_isolated_member() -> Result<()> {
    let mut cluster = Cluster::start_isolatable(3).await?;
    let cancel = CancellationToken::new();
    let service = ServiceName::new("greet_service")?;
    let mut rx = spawn_watch(
        EtcdConfig::plain(cluster.endpoints()),
        DEFAULT_ROOT.to_owned(),
        Some(service.clone()),
        cancel.clone(),
    );
    assert!(
        first_list(&mut rx, Duration::from_secs(10)).await,
        "first list"
    );
    let mut member = None;
    for i in 0..cluster.len() {
        if cluster.open_streams(i, "Watch").await? >= 1.0 {
            member = Some(i);
        }
    }
    let member = member.context("the overrides watch is on no member")?;
    cluster.isolate(member).await?;
    // Let the isolated member notice it lost the cluster.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let other = (member + 1) % cluster.len();
    let mut c = Client::connect([cluster.endpoint(other)], None).await?;
    let addr = Addr::new("127.0.0.1:5000")?;
    let drain = EndpointOverride {
        drain: true,
        weight: None,
        incarnation: None,
        reason: "partition test".into(),
        by: "test".into(),
        at: now_rfc3339(),
        expires: None,
    };
    let key = endpoint_key(DEFAULT_ROOT, &service, &addr);
    // (Retried: when the isolated member led, the others elect a new
    // leader first.)
    let until = Instant::now() + Duration::from_secs(10);
    while let Err(e) = c.put(key.as_str(), drain.to_json(), None).await {
        if Instant::now() > until {
            bail!("writing the drain: {e}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let written = Instant::now();
    let seen = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if rx
                .borrow()
                .endpoints
                .contains_key(&(service.clone(), addr.clone()))
            {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    let took = written.elapsed();
    cluster.rejoin(member).await?;
    cancel.cancel();
    assert!(
        seen.is_ok() && rx.borrow().endpoints.contains_key(&(service, addr)),
        "the drain was not seen within 15 s while the watch's member {member} was isolated ({took:?})"
    );
    Ok(())
}
