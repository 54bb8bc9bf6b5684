//! An operator's drain reaches grpcio over xDS as it reaches the client
//! library (issue 35, must-show 1): `controller drain` under load, and
//! grpcio (resolving `xds:///greet_service` through the controller) sends
//! the drained server no call from 1 s after the command on, with no call
//! failed; `controller undrain` brings it back within 1 s.

mod xds_common;

use std::time::Duration;

use anyhow::{ensure, Result};
use tokio::time::Instant;
use xds_common::{operate, Fleet, Grpcio, SERVICE};

#[tokio::test(flavor = "multi_thread")]
async fn grpcio_over_xds_follows_an_operators_drain_within_a_second() -> Result<()> {
    let fleet = Fleet::start("300s").await?;
    let mut client = Grpcio::start(&format!("xds:///{SERVICE}"), &fleet.bootstrap)?;
    client.until_every_server_picked(&fleet).await?;
    let drained = fleet.addr(2).to_owned();

    operate(
        &fleet.etcd,
        &["drain", SERVICE, &drained, "--reason", "xds"],
    )?;
    let at = Instant::now();
    // Calls go on meanwhile; none may fail.
    let mut failed = 0;
    while at.elapsed() < Duration::from_secs(1) {
        failed += client.calls(50).await?.errors;
    }
    // From 1 s on: none to the drained server, none failed.
    let mut total = 0;
    while at.elapsed() < Duration::from_secs(3) {
        let b = client.calls(100).await?;
        ensure!(
            b.count(&drained) == 0,
            "the drained server was picked {:.1?} after the drain: {}",
            at.elapsed(),
            b.raw
        );
        failed += b.errors;
        total += b.ok;
    }
    ensure!(failed == 0, "{failed} calls failed across the drain");
    ensure!(total > 300, "too few calls to judge: {total}");

    operate(&fleet.etcd, &["undrain", SERVICE, &drained])?;
    let at = Instant::now();
    loop {
        let started = at.elapsed();
        let b = client.calls(50).await?;
        ensure!(b.errors == 0, "{}", b.raw);
        if b.count(&drained) > 0 {
            ensure!(
                started <= Duration::from_secs(1),
                "the undrained server came back only in a batch started {started:?} after the undrain"
            );
            break;
        }
        ensure!(
            at.elapsed() < Duration::from_secs(5),
            "the undrained server never came back: {}",
            b.raw
        );
    }
    Ok(())
}
