//! etcd goes away for longer than the lease TTL, then comes back (with its
//! data, or wiped): every server is registered again by itself within one
//! TTL of etcd's return, on a live lease; the client kept calling its last
//! known endpoints the whole time; the controller deleted nothing.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{controller, greeter, key_set, keys, server, wait_keys, PREFIX};
use etcd_client::GetOptions;
use etcd_lb_testkit::{eventually, free_port, Etcd, Proc};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(5);
const OUTAGE: Duration = Duration::from_secs(12);

async fn outage_longer_than_the_ttl(wipe: bool) -> Result<()> {
    let mut etcd = Etcd::start().await?;
    let eps = etcd.endpoint();
    let c = etcd.client().await?;
    let ports = [free_port(), free_port(), free_port()];
    let mut servers: Vec<Proc> = ports
        .iter()
        .map(|p| server(&eps, *p, &["--ttl", "5s"], &[]))
        .collect::<Result<_>>()?;
    let want = key_set(&ports);
    wait_keys(&c, &want, Duration::from_secs(20)).await?;
    let mut ctl = controller(&eps, free_port(), "3s")?;
    let cl = greeter(&eps, "50ms", &[], &[])?;
    eventually(Duration::from_secs(15), "first replies", || async {
        (cl.log().matches("Good night").count() >= 5).then_some(())
    })
    .await
    .with_context(|| cl.log())?;

    etcd.stop();
    let before = cl.log().matches("Good morning").count();
    tokio::time::sleep(OUTAGE).await;
    let during = cl.log().matches("Good morning").count();
    // 12 s at one round per 50 ms is ~240 rounds; demand a fraction.
    assert!(
        during >= before + 50,
        "the client kept calling during the outage: {before} -> {during}\n{}",
        cl.log()
    );
    for p in ports {
        let needle = format!("(from 127.0.0.1:{p})");
        assert!(
            cl.log().contains(&needle),
            "127.0.0.1:{p} answered:\n{}",
            cl.log()
        );
    }

    etcd.restart(wipe).await?;
    let back = Instant::now();
    let c = etcd.client().await?;
    wait_keys(&c, &want, TTL)
        .await
        .with_context(|| format!("registered again within one TTL ({TTL:?}) of etcd's return"))?;
    let took = back.elapsed();
    // Every key is on a lease etcd still keeps alive.
    let mut kv = c.clone();
    let resp = kv
        .get(PREFIX, Some(GetOptions::new().with_prefix()))
        .await?;
    for entry in resp.kvs() {
        let mut lc = c.clone();
        let ttl = lc.lease_time_to_live(entry.lease(), None).await?.ttl();
        ensure!(
            entry.lease() != 0 && ttl > 0,
            "{} is on a live lease ({}, ttl {ttl})",
            entry.key_str()?,
            entry.lease()
        );
    }
    // And stays so, one more TTL later (the lease is renewed, not just
    // granted).
    tokio::time::sleep(TTL + Duration::from_secs(1)).await;
    assert_eq!(keys(&c, PREFIX).await?, want, "keys stay after {took:?}");

    // The client saw no failed call at any time and still calls.
    let now = cl.log().matches("Good morning").count();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(cl.log().matches("Good morning").count() > now);
    assert!(!cl.log().contains("call failed"), "{}", cl.log());
    for s in &mut servers {
        assert!(s.is_running(), "{}:\n{}", s.name, s.log());
    }
    assert!(ctl.is_running(), "controller:\n{}", ctl.log());
    assert!(
        !ctl.log().contains("deleted stale registration"),
        "the controller deleted a live server:\n{}",
        ctl.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_back_with_its_data_after_more_than_a_ttl() -> Result<()> {
    outage_longer_than_the_ttl(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_back_wiped_after_more_than_a_ttl() -> Result<()> {
    outage_longer_than_the_ttl(true).await
}
