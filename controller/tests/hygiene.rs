//! Override hygiene (issue 35): the leader removes overrides that can never
//! apply again (expired, or made for an incarnation whose lease is gone),
//! counts them, and keeps every other: one whose server re-registered on
//! its lease, a sticky one, one it cannot read. The real controller binary
//! writes the overrides; the controller runs in this process.

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};
use common::{fast_config, key, operate_ok, registered_servers, sample, Ctl};
use etcd_lb_testkit::{eventually, Etcd};

const SVC: &str = "greet_service";

fn override_key(addr: &str) -> String {
    format!("/lb-overrides/{SVC}/endpoints/{addr}")
}

async fn removed(ctl: &Ctl, reason: &str) -> Result<f64> {
    Ok(sample(
        &ctl.metrics().await?,
        "controller_overrides_removed_total",
        &format!("reason=\"{reason}\""),
    )
    .unwrap_or(0.0))
}

/// Waits until the removal counter for `reason` reads `n` (it is counted
/// when the sweep that removed the key ends, a moment after the removal).
async fn counted(ctl: &Ctl, reason: &str, n: f64) -> Result<()> {
    eventually(
        Duration::from_secs(5),
        &format!("{n} {reason} counted"),
        || async { (removed(ctl, reason).await.ok()? == n).then_some(()) },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_leader_removes_only_overrides_that_can_never_apply_again() -> Result<()> {
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    let ctl = Ctl::start(&etcd, fast_config()).await?;
    let (mut servers, addrs) = registered_servers(&etcd, 3).await?;
    let (a, b, c) = (&addrs[0], &addrs[1], &addrs[2]);
    operate_ok(&etcd, &["drain", SVC, a])?;
    operate_ok(&etcd, &["weight", SVC, b, "5", "--for", "2s"])?;
    operate_ok(&etcd, &["drain", SVC, c, "--sticky"])?;
    let unreadable = override_key("127.0.0.1:9");
    common::put_plain(&client, &unreadable, "{not json").await?;
    let exists = |k: String| {
        let client = client.clone();
        async move { common::exists(&client, &k).await }
    };

    // A's server re-registers on its lease (its key deleted, put again):
    // the override stays.
    let mut kv = client.clone();
    let lease_a = kv.get(key(SVC, a), None).await?.kvs()[0].lease();
    kv.delete(key(SVC, a), None).await?;
    common::wait_key(&client, &key(SVC, a), Duration::from_secs(15)).await?;

    // B's expiry passes: removed, counted.
    eventually(
        Duration::from_secs(10),
        "B's expired override removed",
        || {
            let exists = exists(override_key(b));
            async move { (!exists.await.ok()?).then_some(()) }
        },
    )
    .await?;
    counted(&ctl, "expired", 1.0).await?;
    ensure!(
        exists(override_key(a)).await?,
        "A's override was removed while its lease lives (re-registered on it)"
    );

    // A's process dies and its lease ends: that incarnation is gone for
    // good, the override goes.
    servers[0].kill();
    kv.lease_revoke(lease_a).await?;
    eventually(
        Duration::from_secs(10),
        "A's lapsed override removed",
        || {
            let exists = exists(override_key(a));
            async move { (!exists.await.ok()?).then_some(()) }
        },
    )
    .await?;
    counted(&ctl, "incarnation_gone", 1.0).await?;

    // C is sticky: its process and lease gone, it stays, as does the
    // unreadable value.
    let lease_c = kv.get(key(SVC, c), None).await?.kvs()[0].lease();
    servers[2].kill();
    kv.lease_revoke(lease_c).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        exists(override_key(c)).await?,
        "a sticky override was removed"
    );
    ensure!(
        exists(unreadable.clone()).await?,
        "an unreadable override was removed"
    );
    ensure!(removed(&ctl, "incarnation_gone").await? == 1.0);
    ensure!(removed(&ctl, "expired").await? == 1.0);
    drop(servers);
    ctl.stop().await?;
    Ok(())
}
