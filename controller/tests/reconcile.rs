//! The reconcile loop against a real etcd and real greet-servers:
//! what is deleted, what is kept, and the guards (issue 4, points 1-4).

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::*;
use controller::leader::Leadership;
use controller::reconcile::{delete_if_unchanged, DeleteOutcome};
use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_registry::session::Session;
use etcd_lb_testkit::{free_port, Etcd};
use nix::sys::signal::Signal;

/// Point 1: a lease-less key for an address where nothing listens goes
/// within --dead-after + one probe interval; a live lease-less legacy entry
/// (a server without a health service: UNIMPLEMENTED) is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_less_dead_key_goes_live_legacy_entry_stays() -> Result<()> {
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    let ctl = Ctl::start(&etcd, fast_config()).await?;
    eventually_leader(&ctl).await?;

    let (legacy, _stop) = legacy_server().await?;
    let legacy_key = key("greet_service", &legacy);
    put_plain(&client, &legacy_key, &legacy).await?;
    let dead = dead_addr();
    let dead_key = key("greet_service", &dead);
    let put_at = Instant::now();
    put_plain(
        &client,
        &dead_key,
        &format!(r#"{{"addr":"{dead}","version":"1.0.0","weight":100}}"#),
    )
    .await?;

    // Slack of 1 s for the watch and the test's own polling.
    wait_gone(
        &client,
        &dead_key,
        DEAD_AFTER + PROBE_INTERVAL + Duration::from_secs(1),
    )
    .await?;
    eprintln!("lease-less dead key deleted after {:?}", put_at.elapsed());

    // Several --dead-after later the live legacy entry is still there.
    tokio::time::sleep(DEAD_AFTER * 2).await;
    ensure!(
        exists(&client, &legacy_key).await?,
        "live legacy entry was deleted"
    );
    let m = ctl
        .member("greet_service", &legacy)
        .await?
        .context("legacy member in the view")?;
    assert_eq!(m["healthy"], true, "{m}");
    assert_eq!(m["status"], "unimplemented", "{m}");
    assert_eq!(m["kind"], "legacy");
    assert_eq!(m["lease"], serde_json::Value::Null);
    assert_eq!(m["consecutive_failures"], 0);
    let problems = m["problems"].to_string();
    assert!(
        problems.contains("legacy") && problems.contains("no lease"),
        "{problems}"
    );
    assert!(ctl.member("greet_service", &dead).await?.is_none());

    let metrics = ctl.metrics().await?;
    assert_eq!(
        sample(
            &metrics,
            "controller_deletions_total",
            r#"service="greet_service",reason="no_lease_unreachable""#
        ),
        Some(1.0),
        "{metrics}"
    );
    ctl.stop().await
}

/// Point 2: a SIGSTOPped greet-server (lease far longer than the test) is
/// removed after --dead-after, not before; after SIGCONT it re-registers and
/// shows healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_removed_and_comes_back_after_sigcont() -> Result<()> {
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    let ports = [free_port(), free_port(), free_port()];
    let servers = ports
        .iter()
        .map(|p| greet_server(&etcd, *p, &[]))
        .collect::<Result<Vec<_>>>()?;
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    for a in &addrs {
        wait_key(&client, &key("greet_service", a), Duration::from_secs(15)).await?;
    }
    let ctl = Ctl::start(&etcd, fast_config()).await?;
    eventually_leader(&ctl).await?;
    for a in &addrs {
        ctl.wait_member(
            "greet_service",
            a,
            Duration::from_secs(10),
            "healthy",
            |m| m["healthy"] == true,
        )
        .await?;
    }

    let victim = &servers[0];
    let victim_key = key("greet_service", &addrs[0]);
    victim.signal(Signal::SIGSTOP)?;
    let stopped_at = Instant::now();
    wait_gone(&client, &victim_key, DEAD_AFTER + Duration::from_secs(5))
        .await
        .context(victim.log())?;
    let took = stopped_at.elapsed();
    assert!(
        took >= DEAD_AFTER,
        "deleted after {took:?}, before --dead-after"
    );
    for a in &addrs[1..] {
        assert!(
            exists(&client, &key("greet_service", a)).await?,
            "{a} was deleted"
        );
    }
    let metrics = ctl.metrics().await?;
    assert_eq!(
        sample(
            &metrics,
            "controller_deletions_total",
            r#"service="greet_service",reason="unreachable""#
        ),
        Some(1.0),
        "{metrics}"
    );

    victim.signal(Signal::SIGCONT)?;
    wait_key(&client, &victim_key, Duration::from_secs(10))
        .await
        .context(victim.log())?;
    ctl.wait_member(
        "greet_service",
        &addrs[0],
        Duration::from_secs(10),
        "the server healthy again after SIGCONT",
        |m| m["healthy"] == true && m["lease"].is_string(),
    )
    .await?;
    ctl.stop().await
}

/// Point 3: the compare-on-mod_revision guard, directly: a key re-put after
/// the revision the decision was based on survives; the current revision
/// is deleted; a deposed leader deletes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mod_revision_guard_keeps_a_rewritten_key() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut client = etcd.client().await?;
    let lease = client.lease_grant(60, None).await?.id();
    let won = client.campaign("/test/election", "me", lease).await?;
    let lk = won.leader().context("leader key")?;
    let leadership = Leadership {
        key: lk.key().to_vec(),
        create_revision: lk.rev(),
        lease,
        valid_until: tokio::time::Instant::now() + Duration::from_secs(60),
    };

    let mut session = Session::new(EtcdConfig::plain([etcd.endpoint()]));
    let k = key("greet_service", "127.0.0.1:9");
    let probed = put_plain(&client, &k, "127.0.0.1:9").await?;
    let rewritten = put_plain(&client, &k, r#"{"addr":"127.0.0.1:9","weight":5}"#).await?;
    assert!(rewritten > probed);

    let out = delete_if_unchanged(&mut session, &k, probed, &leadership).await?;
    assert_eq!(out, DeleteOutcome::Changed);
    assert!(exists(&client, &k).await?, "the re-put entry survives");

    let deposed = Leadership {
        create_revision: leadership.create_revision + 1000,
        ..leadership.clone()
    };
    let out = delete_if_unchanged(&mut session, &k, rewritten, &deposed).await?;
    assert_eq!(out, DeleteOutcome::NotLeader);
    assert!(
        exists(&client, &k).await?,
        "a deposed leader deletes nothing"
    );

    let out = delete_if_unchanged(&mut session, &k, rewritten, &leadership).await?;
    assert_eq!(out, DeleteOutcome::Deleted);
    assert!(!exists(&client, &k).await?);

    // A key that is gone is "changed", not an error.
    let out = delete_if_unchanged(&mut session, &k, rewritten, &leadership).await?;
    assert_eq!(out, DeleteOutcome::Changed);
    Ok(())
}

/// Point 4: two of three servers stop at once: the safety valve holds,
/// nothing is deleted, the view and the metrics say why; when they resume
/// the valve closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_valve_holds_when_most_of_a_service_looks_dead() -> Result<()> {
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    let ports = [free_port(), free_port(), free_port()];
    let servers = ports
        .iter()
        .map(|p| greet_server(&etcd, *p, &[]))
        .collect::<Result<Vec<_>>>()?;
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    for a in &addrs {
        wait_key(&client, &key("greet_service", a), Duration::from_secs(15)).await?;
    }
    let ctl = Ctl::start(&etcd, fast_config()).await?;
    eventually_leader(&ctl).await?;
    for a in &addrs {
        ctl.wait_member(
            "greet_service",
            a,
            Duration::from_secs(10),
            "healthy",
            |m| m["healthy"] == true,
        )
        .await?;
    }

    servers[0].signal(Signal::SIGSTOP)?;
    servers[1].signal(Signal::SIGSTOP)?;
    // Well past --dead-after: without the valve both would be gone.
    tokio::time::sleep(DEAD_AFTER * 3).await;
    for a in &addrs {
        assert!(
            exists(&client, &key("greet_service", a)).await?,
            "{a} deleted despite the valve"
        );
    }
    let (status, svc) = ctl.get("/services/greet_service").await?;
    assert_eq!(status, 200);
    let valve = &svc["safety_valve"];
    assert_eq!(valve["dead"], 2, "{svc}");
    assert_eq!(valve["members"], 3);
    assert_eq!(valve["withheld"], 2);
    assert!(valve["since"].is_string());
    assert_eq!(svc["counts"]["failing"], 2);
    let metrics = ctl.metrics().await?;
    assert_eq!(
        sample(
            &metrics,
            "controller_safety_valve_active",
            r#"service="greet_service""#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "controller_safety_valve_trips_total",
            r#"service="greet_service""#
        ),
        Some(1.0),
        "tripped once, counted once:\n{metrics}"
    );
    for reason in ["unreachable", "no_lease_unreachable", "invalid_value"] {
        assert_eq!(
            sample(
                &metrics,
                "controller_deletions_total",
                &format!(r#"service="greet_service",reason="{reason}""#)
            ),
            Some(0.0),
            "no deletion counted:\n{metrics}"
        );
    }

    servers[0].signal(Signal::SIGCONT)?;
    servers[1].signal(Signal::SIGCONT)?;
    etcd_lb_testkit::eventually(Duration::from_secs(10), "the valve to close", || async {
        let (_, svc) = ctl.get("/services/greet_service").await.ok()?;
        (svc["safety_valve"].is_null() && svc["counts"]["healthy"] == 3).then_some(())
    })
    .await?;
    let metrics = ctl.metrics().await?;
    assert_eq!(
        sample(
            &metrics,
            "controller_safety_valve_active",
            r#"service="greet_service""#
        ),
        Some(0.0)
    );
    for a in &addrs {
        assert!(exists(&client, &key("greet_service", a)).await?);
    }
    ctl.stop().await
}

/// An invalid value is reported at once and deleted only after
/// --dead-after; one bad entry does not hide the good ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_value_is_reported_then_deleted_after_dead_after() -> Result<()> {
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    let (legacy, _stop) = legacy_server().await?;
    put_plain(&client, &key("greet_service", &legacy), &legacy).await?;
    let ctl = Ctl::start(&etcd, fast_config()).await?;
    eventually_leader(&ctl).await?;

    // An invalid value on a live address, on a long lease.
    let mut c = client.clone();
    let lease = c.lease_grant(300, None).await?.id();
    let (addr2, _stop2) = legacy_server().await?;
    let bad_key = key("greet_service", &addr2);
    let put_at = Instant::now();
    c.put(
        bad_key.as_str(),
        r#"{"addr":"x","weight":"heavy"}"#,
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await?;
    let m = ctl
        .wait_member(
            "greet_service",
            &addr2,
            Duration::from_secs(5),
            "the invalid member",
            |m| m["healthy"] == true,
        )
        .await?;
    assert_eq!(m["kind"], "invalid");
    assert_eq!(m["weight"], serde_json::Value::Null);
    assert!(
        m["problems"].to_string().contains("weight is a string"),
        "{m}"
    );
    wait_gone(&client, &bad_key, DEAD_AFTER + Duration::from_secs(5)).await?;
    assert!(
        put_at.elapsed() >= DEAD_AFTER,
        "deleted before --dead-after"
    );
    assert!(exists(&client, &key("greet_service", &legacy)).await?);
    let metrics = ctl.metrics().await?;
    assert_eq!(
        sample(
            &metrics,
            "controller_deletions_total",
            r#"service="greet_service",reason="invalid_value""#
        ),
        Some(1.0),
        "{metrics}"
    );
    ctl.stop().await
}

async fn eventually_leader(ctl: &Ctl) -> Result<()> {
    etcd_lb_testkit::eventually(Duration::from_secs(10), "leadership", || async {
        let (_, r) = ctl.get("/readyz").await.ok()?;
        (r["leader"] == true).then_some(())
    })
    .await
}

/// etcd restarted with its data, then wiped: the servers come back by
/// themselves, the controller deletes none of them, and afterwards it
/// leads and reconciles again (a stale key put after the wipe goes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarts_delete_nothing_that_should_stay() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    let ports = [free_port(), free_port(), free_port()];
    let _servers = ports
        .iter()
        .map(|p| greet_server(&etcd, *p, &[]))
        .collect::<Result<Vec<_>>>()?;
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let client = etcd.client().await?;
    for a in &addrs {
        wait_key(&client, &key("greet_service", a), Duration::from_secs(15)).await?;
    }
    let ctl = Ctl::start(&etcd, fast_config()).await?;
    eventually_leader(&ctl).await?;

    for wipe in [false, true] {
        etcd.restart(wipe).await?;
        let client = etcd.client().await?;
        for a in &addrs {
            wait_key(&client, &key("greet_service", a), Duration::from_secs(20)).await?;
        }
        ctl.wait_ready().await?;
        eventually_leader(&ctl).await?;
        tokio::time::sleep(DEAD_AFTER * 2).await;
        for a in &addrs {
            assert!(
                exists(&client, &key("greet_service", a)).await?,
                "{a} gone after a restart (wipe: {wipe})"
            );
            ctl.wait_member("greet_service", a, Duration::from_secs(5), "healthy", |m| {
                m["healthy"] == true && m["lease"].is_string()
            })
            .await?;
        }
        let metrics = ctl.metrics().await?;
        let deleted: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("controller_deletions_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum();
        assert_eq!(deleted, 0.0, "wipe: {wipe}\n{metrics}");
    }

    let client = etcd.client().await?;
    let stale = key("greet_service", &dead_addr());
    put_plain(&client, &stale, r#"{"weight":1}"#).await?;
    wait_gone(&client, &stale, Duration::from_secs(10)).await?;
    ctl.stop().await
}

/// Issue 12, defect 3: a controller whose probes all fail at once (every
/// server SIGSTOPped; as good as its own network being cut) deletes
/// nothing, though each of the 20 services has a single member that the
/// per-service valve cannot protect. The global valve says why, in the
/// view and the metrics, and closes when the servers answer again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_valve_keeps_every_single_member_service_when_all_probes_fail() -> Result<()> {
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    let mut servers = Vec::new();
    let mut keys = Vec::new();
    for i in 0..20 {
        let port = free_port();
        let service = format!("one_{i:02}");
        servers.push(greet_server(&etcd, port, &["--service", &service])?);
        keys.push(key(&service, &format!("127.0.0.1:{port}")));
    }
    for k in &keys {
        wait_key(&client, k, Duration::from_secs(20)).await?;
    }
    let ctl = Ctl::start(&etcd, fast_config()).await?;
    eventually_leader(&ctl).await?;
    etcd_lb_testkit::eventually(Duration::from_secs(15), "all 20 healthy", || async {
        let (_, v) = ctl.get("/services").await.ok()?;
        let healthy = v["services"]
            .as_array()?
            .iter()
            .filter(|s| s["counts"]["healthy"] == 1)
            .count();
        (healthy == 20).then_some(())
    })
    .await?;

    for s in &servers {
        s.signal(Signal::SIGSTOP)?;
    }
    // Well past --dead-after: without a global valve all 20 would be gone.
    tokio::time::sleep(DEAD_AFTER * 3).await;
    let mut gone = Vec::new();
    for k in &keys {
        if !exists(&client, k).await? {
            gone.push(k.clone());
        }
    }
    // `/services` may answer with the render before the last change once.
    let view =
        etcd_lb_testkit::eventually(Duration::from_secs(5), "the valve in the view", || async {
            let (_, v) = ctl.get("/services").await.ok()?;
            (!v["safety_valve"].is_null()).then_some(v)
        })
        .await;
    let metrics = ctl.metrics().await?;
    for s in &servers {
        s.signal(Signal::SIGCONT)?;
    }
    let view = view?;
    assert!(
        gone.is_empty(),
        "deleted despite all probes failing: {gone:?}"
    );
    let valve = &view["safety_valve"];
    assert_eq!(valve["dead"], 20, "{valve}");
    assert_eq!(valve["members"], 20, "{valve}");
    assert_eq!(valve["withheld"], 20, "{valve}");
    assert_eq!(
        sample(&metrics, "controller_safety_valve_global_active", ""),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "controller_safety_valve_global_trips_total", ""),
        Some(1.0),
        "{metrics}"
    );

    etcd_lb_testkit::eventually(
        Duration::from_secs(15),
        "the global valve to close",
        || async {
            let (_, v) = ctl.get("/services").await.ok()?;
            v["safety_valve"].is_null().then_some(())
        },
    )
    .await?;
    let metrics = ctl.metrics().await?;
    assert_eq!(
        sample(&metrics, "controller_safety_valve_global_active", ""),
        Some(0.0)
    );
    for k in &keys {
        assert!(exists(&client, k).await?, "{k}");
    }
    ctl.stop().await
}
