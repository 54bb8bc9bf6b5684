//! The lease keeper against a real etcd (issue 33, point 7): on a healthy
//! etcd, answered keep-alives keep the lease valid, so the silence alarm
//! (state `Unsure`, a redial, the warning "keep-alives unanswered for two
//! thirds of the TTL") never fires. That it does fire on real silence is
//! proven in `registrar.rs`
//! (`unanswered_keep_alives_are_noticed_while_the_lease_lives`).

use std::time::Duration;

use anyhow::Result;
use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_registry::lease::{LeaseKeeper, LeaseState};
use etcd_lb_registry::session::Session;
use etcd_lb_testkit::Etcd;

#[tokio::test]
async fn a_healthy_etcd_never_raises_the_silence_alarm() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut c = etcd.client().await?;
    let mut session = Session::new(EtcdConfig::plain([etcd.endpoint()]));
    // TTL 3 s: the alarm would fire 2 s after the grant, and again after
    // every redial, about seven times in 16 s.
    let keeper = LeaseKeeper::grant(&mut session, Duration::from_secs(3)).await?;
    let mut state = keeper.state();

    // Every state the keeper publishes for 16 s.
    let mut seen = Vec::new();
    let watched = tokio::time::timeout(Duration::from_secs(16), async {
        while state.changed().await.is_ok() {
            seen.push(*state.borrow_and_update());
        }
    })
    .await;
    assert!(watched.is_err(), "the keeper's task ended: {seen:?}");
    let alarms = seen
        .iter()
        .filter(|s| !matches!(s, LeaseState::Valid { .. }))
        .count();
    assert_eq!(
        alarms, 0,
        "{alarms} silence alarms on a healthy etcd in 16 s; states: {seen:?}"
    );
    assert!(
        keeper.current().is_valid(tokio::time::Instant::now()),
        "the lease is known valid now: {:?}",
        keeper.current()
    );
    // And etcd agrees the lease lives, renewed.
    let left = c.lease_time_to_live(keeper.id(), None).await?.ttl();
    assert!(left > 0, "the lease is alive in etcd (ttl {left})");
    keeper.stop().await;
    Ok(())
}
