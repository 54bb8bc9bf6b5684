//! Leadership as the shipped manifests run it (issue 12, defect 1): two
//! replicas with the same `--listen` text and the same process id (two
//! pods, PID 1 each, both on `0.0.0.0:8080`), and an election key deleted
//! from outside. In every case one replica, and only one, leads, and stale
//! entries are still removed.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use common::*;
use controller::leader::{self, LeaderState};
use etcd_client::Client;
use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_testkit::{eventually, free_port, Etcd};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// `n` listeners on one address (SO_REUSEPORT): in-process controllers on
/// them share the `--listen` text and, being one process, the pid, which
/// is what two pods of the Deployment share.
fn shared_listeners(n: usize) -> Result<(String, Vec<tokio::net::TcpListener>)> {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let listeners = (0..n)
        .map(|_| {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.set_reuseaddr(true)?;
            s.set_reuseport(true)?;
            s.bind(addr)?;
            s.listen(128)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok((format!("http://{addr}"), listeners))
}

/// What the replicas behind `base` say in `/readyz`: id -> leading. Every
/// request opens a new connection, so the kernel's reuseport hash spreads
/// them over the replicas; stops once `want` distinct ids answered (or
/// after a bounded number of requests).
async fn replicas_by_id(base: &str, want: usize) -> BTreeMap<String, bool> {
    let mut seen = BTreeMap::new();
    let Ok(http) = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(2))
        .build()
    else {
        return seen;
    };
    for _ in 0..200 {
        if let Ok((_, r)) = get_json(&http, &format!("{base}/readyz")).await {
            if let Some(id) = r["id"].as_str() {
                seen.insert(id.to_owned(), r["leader"] == true);
            }
        }
        if seen.len() >= want {
            break;
        }
    }
    seen
}

/// Waits until `replicas` distinct ids answer behind `base` and exactly
/// one of them leads.
async fn exactly_one_leads(base: &str, replicas: usize, limit: Duration) -> Result<String> {
    let last = std::sync::Mutex::new(BTreeMap::new());
    let last = &last;
    eventually(
        limit,
        "distinct replicas, exactly one leading",
        || async move {
            let seen = replicas_by_id(base, replicas).await;
            let leaders: Vec<String> = seen
                .iter()
                .filter(|(_, l)| **l)
                .map(|(i, _)| i.clone())
                .collect();
            let done = seen.len() == replicas && leaders.len() == 1;
            *last.lock().unwrap() = seen;
            done.then(|| leaders[0].clone())
        },
    )
    .await
    .with_context(|| {
        format!(
            "last seen behind {base} (id: leading): {:?}",
            last.lock().unwrap()
        )
    })
}

/// The current leader key of the default election: (key, create revision).
async fn leader_key(client: &Client) -> Result<(Vec<u8>, i64)> {
    let mut e = client.election_client();
    let resp = e.leader(controller::config::DEFAULT_ELECTION_KEY).await?;
    let kv = resp.kv().context("a leader key")?;
    Ok((kv.key().to_vec(), kv.create_revision()))
}

/// Puts a lease-less key for a dead address and waits until a controller
/// deletes it.
async fn stale_entry_goes(client: &Client, limit: Duration) -> Result<()> {
    let stale = key("stale_svc", &dead_addr());
    put_plain(client, &stale, r#"{"weight":1}"#).await?;
    wait_gone(client, &stale, limit).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_one_listen_text_have_distinct_ids_and_one_leads() -> Result<()> {
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    let (base, mut listeners) = shared_listeners(2)?;
    let b = Ctl::spawn_on(&etcd, fast_config(), listeners.pop().context("listener")?)?;
    let a = Ctl::spawn_on(&etcd, fast_config(), listeners.pop().context("listener")?)?;
    a.wait_ready().await?;

    let first = exactly_one_leads(&base, 2, Duration::from_secs(15)).await?;
    eprintln!("leading: {first}");
    stale_entry_goes(&client, Duration::from_secs(10)).await?;

    // The election key deleted from outside (an operator, a wiped etcd
    // prefix): the other replica wins, the deposed one must notice.
    let (k, _) = leader_key(&client).await?;
    client.kv_client().delete(k, None).await?;
    let second = exactly_one_leads(&base, 2, Duration::from_secs(15)).await?;
    eprintln!("leading after the key was deleted: {second}");
    stale_entry_goes(&client, Duration::from_secs(15)).await?;
    // And it stays that way for a few election pings.
    tokio::time::sleep(Duration::from_secs(2)).await;
    exactly_one_leads(&base, 2, Duration::from_secs(1)).await?;
    a.stop().await?;
    b.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_election_key_ends_the_term_and_the_replica_campaigns_again() -> Result<()> {
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    let ctl = Ctl::start(&etcd, fast_config()).await?;
    eventually(Duration::from_secs(10), "leadership", || async {
        let (_, r) = ctl.get("/readyz").await.ok()?;
        (r["leader"] == true).then_some(())
    })
    .await?;
    stale_entry_goes(&client, Duration::from_secs(10)).await?;

    let (k, rev) = leader_key(&client).await?;
    client.kv_client().delete(k, None).await?;
    // A new term: a new election key, and deletions work again.
    stale_entry_goes(&client, Duration::from_secs(15)).await?;
    let (_, again) = leader_key(&client).await?;
    assert!(again > rev, "a new election key: {again} > {rev}");
    let (_, r) = ctl.get("/readyz").await?;
    assert_eq!(r["leader"], true, "{r}");
    ctl.stop().await
}

/// Whether `state` holds leadership over exactly the key etcd says leads.
fn holds(state: &watch::Receiver<LeaderState>, current: &(Vec<u8>, i64)) -> bool {
    state
        .borrow()
        .me
        .as_ref()
        .is_some_and(|me| me.key == current.0 && me.create_revision == current.1)
}

/// The elector alone, with one campaign value for both (`1@0.0.0.0:8080`,
/// what both pods of the old manifests campaigned with): after the
/// leader's key is deleted, the one that claims to lead is the one whose
/// key leads in etcd, and the other does not claim it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn electors_with_one_campaign_value_never_both_lead() -> Result<()> {
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    let cfg = EtcdConfig::plain([etcd.endpoint()]);
    let cancel = CancellationToken::new();
    let name = controller::config::DEFAULT_ELECTION_KEY.to_owned();
    let id = "1@0.0.0.0:8080".to_owned();
    let ttl = Duration::from_secs(3);
    let spawn = || leader::spawn(cfg.clone(), name.clone(), ttl, id.clone(), cancel.clone());
    let (a, _, ta) = spawn();
    let current = eventually(Duration::from_secs(10), "a leads", || async {
        let current = leader_key(&client).await.ok()?;
        holds(&a, &current).then_some(current)
    })
    .await?;
    let (b, _, tb) = spawn();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(b.borrow().me.is_none(), "b waits behind a");

    client.kv_client().delete(current.0.clone(), None).await?;
    eventually(
        Duration::from_secs(10),
        "exactly one elector claiming, and it holds etcd's leader key",
        || async {
            let current = leader_key(&client).await.ok()?;
            let claiming = [&a, &b].iter().filter(|s| s.borrow().me.is_some()).count();
            (claiming == 1 && (holds(&a, &current) || holds(&b, &current))).then_some(())
        },
    )
    .await
    .with_context(|| format!("a: {:?}\nb: {:?}", a.borrow().me, b.borrow().me))?;
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let _ = ta.await;
        let _ = tb.await;
    })
    .await;
    Ok(())
}

/// A write refused for leadership (the reconciler's `NotLeader`) ends the
/// term: the elector stops claiming it and campaigns again, winning a new
/// election key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_ends_the_term_and_a_new_one_begins() -> Result<()> {
    let etcd = Etcd::start().await?;
    let cancel = CancellationToken::new();
    let (state, step_down, task) = leader::spawn(
        EtcdConfig::plain([etcd.endpoint()]),
        "/test/election".to_owned(),
        Duration::from_secs(3),
        leader::identity(None),
        cancel.clone(),
    );
    let first = eventually(Duration::from_secs(10), "a term", || async {
        state.borrow().me.clone()
    })
    .await?;
    step_down.not_leader(&first);
    let second = eventually(Duration::from_secs(10), "a new term", || async {
        state
            .borrow()
            .me
            .clone()
            .filter(|me| me.create_revision != first.create_revision)
    })
    .await?;
    assert!(second.create_revision > first.create_revision);
    // A refusal of the old term does not end the new one.
    step_down.not_leader(&first);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        state.borrow().me.as_ref().map(|m| m.create_revision),
        Some(second.create_revision)
    );
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    Ok(())
}
