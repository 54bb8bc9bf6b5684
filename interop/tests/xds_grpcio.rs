//! grpcio (gRPC's C core, pinned by scripts/setup.sh) resolving
//! `xds:///greet_service` through the controller's xDS server, bootstrapped
//! by `controller xds-bootstrap`: the registry's weights, drains, deaths
//! and deletions reach its picking.

mod xds_common;

use std::time::Duration;

use anyhow::{ensure, Result};
use nix::sys::signal::Signal;
use xds_common::{key, Fleet, Grpcio, SERVICE};

/// Calls per share check.
const CALLS: u32 = 12_000;

#[tokio::test(flavor = "multi_thread")]
async fn grpcio_over_xds_follows_weights_drains_deaths_and_deletions() -> Result<()> {
    let mut fleet = Fleet::start("300s").await?;
    let mut client = Grpcio::start(&format!("xds:///{SERVICE}"), &fleet.bootstrap)?;

    // Weights 100/200/300: within 2 % of 1/6, 2/6, 3/6 over 6,000 calls.
    // (The first calls wait for the channel's xDS resources; a batch is
    // counted once every server has been seen.)
    client.until_every_server_picked(&fleet).await?;
    let pushes = |f: &Fleet| f.ctl.proc.log().matches("xds push").count();
    let before = pushes(&fleet);
    // grpcio picks a locality at random by weight: 12,000 calls (the
    // issue's 6,000 twice) keep a 2 % bound more than 4 sigma away.
    let b = client.calls(CALLS).await?;
    let during = pushes(&fleet) - before;
    eprintln!("100/200/300: {} ({during} pushes during the batch)", b.raw);
    ensure!(b.ok == u64::from(CALLS), "failed calls: {}", b.raw);
    // Nothing changed, so nothing was pushed (a push per probe pass would
    // rebuild every client's picker for nothing).
    ensure!(
        before > 0 && during == 0,
        "{during} pushes while nothing changed ({before} before)"
    );
    ensure!(
        b.shares_match(&fleet.weights([100, 200, 300]), 0.02),
        "shares off weight/sum by more than 2 %: {}",
        b.raw
    );

    // A weight changed in etcd changes the shares.
    xds_common::set_weight(&fleet.etcd, fleet.addr(2), 100).await?;
    let w = fleet.weights([100, 200, 100]);
    let b = client
        .until(1200, Duration::from_secs(30), "shares 1/4, 2/4, 1/4", |b| {
            b.shares_match(&w, 0.04)
        })
        .await?;
    ensure!(b.errors == 0, "{}", b.raw);
    let b = client.calls(CALLS).await?;
    eprintln!("100/200/100: {}", b.raw);
    ensure!(
        b.ok == u64::from(CALLS) && b.shares_match(&w, 0.02),
        "{}",
        b.raw
    );

    // Weight 0 (draining): no new calls.
    xds_common::set_weight(&fleet.etcd, fleet.addr(1), 0).await?;
    let drained = fleet.addr(1).to_owned();
    client
        .until(
            300,
            Duration::from_secs(30),
            "no calls to the drained server",
            |b| b.count(&drained) == 0,
        )
        .await?;
    let b = client.calls(1200).await?;
    ensure!(
        b.ok == 1200 && b.count(&drained) == 0,
        "drained server still picked: {}",
        b.raw
    );

    // SIGKILL: stops being picked (the controller's probes mark it
    // UNHEALTHY; grpcio also sees the connection fail).
    let dead = fleet.addr(0).to_owned();
    fleet.servers[0].proc.signal(Signal::SIGKILL)?;
    let b = client
        .until(
            300,
            Duration::from_secs(30),
            "the killed server not picked",
            |b| b.count(&dead) == 0 && b.errors == 0,
        )
        .await?;
    ensure!(b.count(fleet.addr(2)) == 300, "{}", b.raw);

    // A key deleted from etcd: a fourth endpoint, registered by hand for a
    // server that does not register itself (it is on another prefix),
    // is picked while its key is there and not once it is deleted.
    let extra = xds_common::server_on_prefix(&fleet.etcd, "/elsewhere/").await?;
    let mut etcd = fleet.etcd.client().await?;
    etcd.put(
        key(&extra.addr),
        format!(r#"{{"addr":"{}","version":"x","weight":300}}"#, extra.addr),
        None,
    )
    .await?;
    client
        .until(
            300,
            Duration::from_secs(30),
            "the hand-registered server picked",
            |b| b.count(&extra.addr) > 0,
        )
        .await?;
    etcd.delete(key(&extra.addr), None).await?;
    client
        .until(
            300,
            Duration::from_secs(30),
            "the deleted key not picked",
            |b| b.count(&extra.addr) == 0,
        )
        .await?;
    let b = client.calls(600).await?;
    ensure!(b.ok == 600 && b.count(&extra.addr) == 0, "{}", b.raw);
    ensure!(
        fleet.ctl.proc.is_running(),
        "controller died: {}",
        fleet.ctl.proc.log()
    );
    Ok(())
}
