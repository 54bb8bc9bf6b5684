//! The reflector against a real etcd: list, events, outages, compaction,
//! wiped etcd.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{CompactionOptions, PutOptions};
use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_registry::watcher::{Event, Watcher, WatcherConfig};
use etcd_lb_testkit::{Etcd, Proxy};

/// Applies events to a map of key -> weight (None for invalid values), and
/// of key -> lease.
#[derive(Default)]
struct View(BTreeMap<String, Option<u32>>, BTreeMap<String, i64>);

impl View {
    fn apply(&mut self, ev: &Event) {
        match ev {
            Event::Applied(e) => {
                self.0
                    .insert(e.key.clone(), e.member.as_ref().ok().map(|m| m.weight));
                self.1.insert(e.key.clone(), e.lease);
            }
            Event::Removed(e) => {
                self.0.remove(&e.key);
                self.1.remove(&e.key);
            }
            Event::Synced { .. } => {}
        }
    }
}

async fn until(
    w: &mut Watcher,
    view: &mut View,
    what: &str,
    pred: impl Fn(&View) -> bool,
) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(15), async {
        while !pred(view) {
            let ev = w.next().await;
            view.apply(&ev);
        }
    })
    .await
    .with_context(|| format!("waiting for {what}; view: {:?}", view.0))
}

/// Reads events up to and including the next `Synced`.
async fn sync(w: &mut Watcher, view: &mut View) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let ev = w.next().await;
            view.apply(&ev);
            if matches!(ev, Event::Synced { .. }) {
                return;
            }
        }
    })
    .await
    .context("waiting for a sync")
}

fn svc_cfg() -> WatcherConfig {
    WatcherConfig {
        progress_interval: Duration::from_millis(200),
        ..WatcherConfig::all("/ns/")
    }
}

#[tokio::test]
async fn lists_then_watches_and_reports_invalid_entries() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut c = etcd.client().await?;
    c.put(
        "/ns/a/127.0.0.1:1",
        r#"{"addr":"127.0.0.1:1","weight":5}"#,
        None,
    )
    .await?;
    c.put("/ns/a/127.0.0.1:2", "127.0.0.1:2", None).await?;
    c.put("/ns/a/127.0.0.1:3", r#"{"weight":"heavy"}"#, None)
        .await?;
    c.put("/other/x", "not ours", None).await?;

    let mut w = Watcher::new(EtcdConfig::plain([etcd.endpoint()]), svc_cfg());
    let state = w.state();
    let mut view = View::default();
    let mut synced = false;
    while !synced {
        let ev = w.next().await;
        synced = matches!(ev, Event::Synced { .. });
        view.apply(&ev);
    }
    assert_eq!(view.0.len(), 3);
    assert_eq!(view.0["/ns/a/127.0.0.1:1"], Some(5));
    assert_eq!(
        view.0["/ns/a/127.0.0.1:2"],
        Some(100),
        "legacy value, weight 100"
    );
    assert_eq!(
        view.0["/ns/a/127.0.0.1:3"], None,
        "invalid value reported as such"
    );
    assert!(state.borrow().synced);

    c.put(
        "/ns/a/127.0.0.1:1",
        r#"{"addr":"127.0.0.1:1","weight":0}"#,
        None,
    )
    .await?;
    c.delete("/ns/a/127.0.0.1:2", None).await?;
    until(&mut w, &mut view, "update and delete", |v| {
        v.0.get("/ns/a/127.0.0.1:1") == Some(&Some(0)) && !v.0.contains_key("/ns/a/127.0.0.1:2")
    })
    .await?;

    // Progress notices keep the view's age small on a quiet prefix.
    for _ in 0..20 {
        tokio::select! {
            ev = w.next() => view.apply(&ev),
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let age = state.borrow().age().context("age")?;
    assert!(
        age < Duration::from_secs(2),
        "view age {age:?} on a quiet prefix"
    );
    Ok(())
}

#[tokio::test]
async fn keeps_the_last_view_through_an_outage_and_relists_after_compaction() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut c = etcd.client().await?;
    let proxy = Proxy::start(format!("127.0.0.1:{}", etcd.client_port).parse()?).await?;
    for i in 1..=3 {
        c.put(
            format!("/ns/a/127.0.0.1:{i}"),
            format!("127.0.0.1:{i}"),
            None,
        )
        .await?;
    }
    let mut w = Watcher::new(EtcdConfig::plain([proxy.addr.to_string()]), svc_cfg());
    let state = w.state();
    let mut view = View::default();
    sync(&mut w, &mut view).await?;
    assert_eq!(view.0.len(), 3);

    // Cut the watcher off; etcd moves on and compacts its history.
    proxy.cut();
    let outage = tokio::time::timeout(Duration::from_secs(2), w.next()).await;
    assert!(
        outage.is_err(),
        "no events while cut off (static stability): {outage:?}"
    );
    assert!(!state.borrow().connected);
    assert_eq!(view.0.len(), 3, "the last view is kept");

    c.delete("/ns/a/127.0.0.1:1", None).await?;
    c.put("/ns/a/127.0.0.1:2", r#"{"weight":7}"#, None).await?;
    c.put("/ns/a/127.0.0.1:4", "127.0.0.1:4", None).await?;
    let rev = c
        .put("/ns/z", "bump", None)
        .await?
        .header()
        .context("header")?
        .revision();
    c.compact(rev, Some(CompactionOptions::new().with_physical()))
        .await?;
    let relists_before = state.borrow().relists;

    proxy.heal();
    until(&mut w, &mut view, "convergence after compaction", |v| {
        !v.0.contains_key("/ns/a/127.0.0.1:1")
            && v.0.get("/ns/a/127.0.0.1:2") == Some(&Some(7))
            && v.0.contains_key("/ns/a/127.0.0.1:4")
    })
    .await?;
    assert!(state.borrow().relists > relists_before, "it relisted");
    assert!(state.borrow().connected);

    // And it keeps watching after the relist.
    c.put("/ns/a/127.0.0.1:5", "127.0.0.1:5", None).await?;
    until(&mut w, &mut view, "a change after the relist", |v| {
        v.0.contains_key("/ns/a/127.0.0.1:5")
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn resumes_without_relisting_after_a_short_outage() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut c = etcd.client().await?;
    let proxy = Proxy::start(format!("127.0.0.1:{}", etcd.client_port).parse()?).await?;
    c.put("/ns/a/127.0.0.1:1", "127.0.0.1:1", None).await?;
    let mut w = Watcher::new(EtcdConfig::plain([proxy.addr.to_string()]), svc_cfg());
    let state = w.state();
    let mut view = View::default();
    sync(&mut w, &mut view).await?;
    proxy.cut();
    let _ = tokio::time::timeout(Duration::from_millis(500), w.next()).await;
    c.put("/ns/a/127.0.0.1:2", "127.0.0.1:2", None).await?;
    proxy.heal();
    until(&mut w, &mut view, "the missed put", |v| v.0.len() == 2).await?;
    assert_eq!(
        state.borrow().relists,
        1,
        "resumed from its revision, no relist"
    );
    Ok(())
}

#[tokio::test]
async fn relists_when_etcd_comes_back_wiped() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    let mut c = etcd.client().await?;
    for i in 1..=5 {
        c.put(
            format!("/ns/a/127.0.0.1:{i}"),
            format!("127.0.0.1:{i}"),
            None,
        )
        .await?;
    }
    let grace = Duration::from_secs(2);
    let cfg = WatcherConfig {
        wipe_grace: grace,
        ..svc_cfg()
    };
    let mut w = Watcher::new(EtcdConfig::plain([etcd.endpoint()]), cfg);
    let mut view = View::default();
    sync(&mut w, &mut view).await?;
    assert_eq!(view.0.len(), 5);

    etcd.restart(true).await?;
    let mut c = etcd.client().await?;
    let lease = c.lease_grant(30, None).await?.id();
    c.put(
        "/ns/a/127.0.0.1:9",
        "127.0.0.1:9",
        Some(PutOptions::new().with_lease(lease)),
    )
    .await?;
    // The relist of the wiped etcd keeps the keys it no longer has for the
    // grace period (their servers are re-registering): never an empty view.
    let relisted = std::time::Instant::now();
    sync(&mut w, &mut view).await?;
    assert!(
        view.0.len() >= 5,
        "old keys kept during the grace: {:?}",
        view.0
    );
    // One of them comes back within the grace: it stays, the others go.
    c.put("/ns/a/127.0.0.1:1", "127.0.0.1:1", None).await?;
    until(
        &mut w,
        &mut view,
        "the wiped etcd's view after the grace",
        |v| {
            v.0.len() == 2
                && v.0.contains_key("/ns/a/127.0.0.1:9")
                && v.0.contains_key("/ns/a/127.0.0.1:1")
        },
    )
    .await?;
    assert!(
        relisted.elapsed() >= grace - Duration::from_millis(200),
        "removals waited for the grace"
    );
    Ok(())
}

/// Every key under `/ns/` in etcd now, as the view sees them (weights of
/// legacy values are 100).
async fn etcd_view(c: &mut etcd_client::Client) -> Result<BTreeMap<String, Option<u32>>> {
    let resp = c
        .get("/ns/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await?;
    let mut map = BTreeMap::new();
    for kv in resp.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let addr = key.rsplit('/').next().unwrap_or_default().to_owned();
        let weight = etcd_lb_registry::schema::parse_value(&addr.parse()?, kv.value())
            .ok()
            .map(|m| m.weight);
        map.insert(key, weight);
    }
    Ok(map)
}

/// Defect 1 of issue 10: while a watch catches up, etcd sends at most 1,000
/// revisions per response but stamps each with the store's current
/// revision. A stream broken after the first such response must resume
/// after the last event it delivered, not after the header's revision.
#[tokio::test]
async fn resumes_after_the_last_delivered_event_when_cut_during_catch_up() -> Result<()> {
    use futures::StreamExt;
    let etcd = Etcd::start().await?;
    let c = etcd.client().await?;
    let proxy = Proxy::start(format!("127.0.0.1:{}", etcd.client_port).parse()?).await?;
    let mut w = Watcher::new(EtcdConfig::plain([proxy.addr.to_string()]), svc_cfg());
    let mut view = View::default();
    sync(&mut w, &mut view).await?;

    // 1,500 revisions under the prefix while the watcher is cut off.
    proxy.cut();
    let _ = tokio::time::timeout(Duration::from_millis(300), w.next()).await;
    let puts = futures::stream::iter(0..1500u32)
        .map(|i| {
            let mut c = c.clone();
            async move {
                c.put(
                    format!("/ns/a/127.0.0.1:{}", 10_000 + i),
                    format!("127.0.0.1:{}", 10_000 + i),
                    None,
                )
                .await
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    for p in puts {
        p?;
    }

    // Reconnect; break the stream right after its first response.
    proxy.heal();
    let first = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let ev = w.next().await;
            view.apply(&ev);
            if matches!(ev, Event::Applied(_)) {
                return;
            }
        }
    })
    .await;
    first.context("the first catch-up event")?;
    proxy.cut();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            let ev = w.next().await;
            view.apply(&ev);
        }
    })
    .await;
    assert!(
        view.0.len() < 1500,
        "the first response carried only part of the backlog: {}",
        view.0.len()
    );
    proxy.heal();

    let mut c = c.clone();
    let want = etcd_view(&mut c).await?;
    assert_eq!(want.len(), 1500);
    let got = tokio::time::timeout(Duration::from_secs(15), async {
        while view.0 != want {
            let ev = w.next().await;
            view.apply(&ev);
        }
    })
    .await;
    assert!(
        got.is_ok(),
        "the watcher's view never matched etcd's: {} keys of {}",
        view.0.len(),
        want.len()
    );
    Ok(())
}

/// key -> lease of every key under `/ns/` in etcd now.
async fn etcd_leases(c: &mut etcd_client::Client) -> Result<BTreeMap<String, i64>> {
    let resp = c
        .get("/ns/", Some(etcd_client::GetOptions::new().with_prefix()))
        .await?;
    Ok(resp
        .kvs()
        .iter()
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), kv.lease()))
        .collect())
}

/// Reads events until the view (weights and leases) equals etcd's, or
/// fails after 15 s saying how they differ.
async fn converge(w: &mut Watcher, view: &mut View, c: &mut etcd_client::Client) -> Result<()> {
    let want = etcd_view(c).await?;
    let want_leases = etcd_leases(c).await?;
    let done = tokio::time::timeout(Duration::from_secs(15), async {
        while view.0 != want || view.1 != want_leases {
            let ev = w.next().await;
            view.apply(&ev);
        }
    })
    .await;
    anyhow::ensure!(
        done.is_ok(),
        "the view never matched etcd's.\nview:   {:?} {:?}\netcd:   {:?} {:?}",
        view.0,
        view.1,
        want,
        want_leases
    );
    Ok(())
}

/// Defect 3 of issue 10: a wiped etcd restarted with the same name and peer
/// URLs keeps its cluster id; once its new history has passed the revision
/// the watcher saw, "revision went backwards" no longer shows the wipe. The
/// watcher must not resume into the new history as if it were the old one.
#[tokio::test]
async fn a_wiped_etcd_that_has_passed_the_old_revision_is_relisted() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    let mut c = etcd.client().await?;
    for i in 1..=5 {
        c.put(
            format!("/ns/a/127.0.0.1:{i}"),
            format!("127.0.0.1:{i}"),
            None,
        )
        .await?;
    }
    let proxy = Proxy::start(format!("127.0.0.1:{}", etcd.client_port).parse()?).await?;
    let mut w = Watcher::new(
        EtcdConfig::plain([proxy.addr.to_string()]),
        WatcherConfig {
            wipe_grace: Duration::from_millis(500),
            ..svc_cfg()
        },
    );
    let mut view = View::default();
    sync(&mut w, &mut view).await?;
    let seen = c
        .get("/ns/", None)
        .await?
        .header()
        .context("header")?
        .revision();

    proxy.cut();
    let _ = tokio::time::timeout(Duration::from_millis(300), w.next()).await;
    etcd.restart(true).await?;
    let mut c = etcd.client().await?;
    // The new history: other keys, and more revisions than the old one had.
    for i in 6..=8 {
        c.put(
            format!("/ns/a/127.0.0.1:{i}"),
            format!("127.0.0.1:{i}"),
            None,
        )
        .await?;
    }
    for _ in 0..seen + 5 {
        c.put("/other/bump", "x", None).await?;
    }
    proxy.heal();
    converge(&mut w, &mut view, &mut c).await
}

/// Defect 3 of issue 10: servers that re-register in the same order after a
/// wipe produce the same (create, mod) revisions on new leases; the relist
/// must still emit the new leases (and values).
#[tokio::test]
async fn a_wiped_etcd_refilled_in_the_same_order_shows_the_new_leases() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    let fill = |c: etcd_client::Client| async move {
        let mut c = c;
        let lease = c.lease_grant(60, None).await?.id();
        for i in 1..=3 {
            c.put(
                format!("/ns/a/127.0.0.1:{i}"),
                format!("127.0.0.1:{i}"),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        }
        anyhow::Ok(lease)
    };
    let old = fill(etcd.client().await?).await?;
    let proxy = Proxy::start(format!("127.0.0.1:{}", etcd.client_port).parse()?).await?;
    let mut w = Watcher::new(
        EtcdConfig::plain([proxy.addr.to_string()]),
        WatcherConfig {
            wipe_grace: Duration::from_millis(500),
            ..svc_cfg()
        },
    );
    let mut view = View::default();
    sync(&mut w, &mut view).await?;
    assert!(view.1.values().all(|l| *l == old));

    // Cut off while etcd is wiped and refilled, so the watcher cannot see
    // the empty store in between.
    proxy.cut();
    let _ = tokio::time::timeout(Duration::from_millis(300), w.next()).await;
    etcd.restart(true).await?;
    let new = fill(etcd.client().await?).await?;
    assert_ne!(new, old, "a new lease id");
    proxy.heal();
    let mut c = etcd.client().await?;
    converge(&mut w, &mut view, &mut c).await
}

/// Defect 2 of issue 10: 200 keys of 1.4 MiB (just under etcd's request
/// limit of 1.5 MiB) beside three good ones. A list paged by count asks for
/// all 203 keys at once, about 280 MiB, more than the client decodes; a
/// watch catching up gets them as one response of the same size. Both must
/// still complete, with the hostile keys reported as invalid.
#[tokio::test]
async fn huge_values_neither_stall_the_list_nor_the_watch() -> Result<()> {
    use futures::StreamExt;
    let etcd = Etcd::start().await?;
    let mut c = etcd.client().await?;
    for i in 1..=3 {
        c.put(
            format!("/ns/a/127.0.0.1:{i}"),
            format!(r#"{{"addr":"127.0.0.1:{i}","weight":{}}}"#, i * 100),
            None,
        )
        .await?;
    }
    // The watch path: a watcher synced before the hostile keys arrive, cut
    // off while they are written.
    let proxy = Proxy::start(format!("127.0.0.1:{}", etcd.client_port).parse()?).await?;
    let mut watching = Watcher::new(EtcdConfig::plain([proxy.addr.to_string()]), svc_cfg());
    let mut watched = View::default();
    sync(&mut watching, &mut watched).await?;
    proxy.cut();
    let _ = tokio::time::timeout(Duration::from_millis(300), watching.next()).await;

    let pad = "x".repeat(1_400 * 1024);
    let puts = futures::stream::iter(0..200u32)
        .map(|i| {
            let mut c = c.clone();
            let v = format!(r#"{{"weight":100,"pad":"{pad}"}}"#);
            async move {
                c.put(format!("/ns/a/127.0.0.1:{}", 20_000 + i), v, None)
                    .await
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await;
    for p in puts {
        p?;
    }

    // The list path: a new watcher lists everything.
    let mut listing = Watcher::new(EtcdConfig::plain([etcd.endpoint()]), svc_cfg());
    let mut listed = View::default();
    let synced = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let ev = listing.next().await;
            listed.apply(&ev);
            if matches!(ev, Event::Synced { .. }) {
                return;
            }
        }
    })
    .await;
    assert!(
        synced.is_ok(),
        "the list completed: {} keys",
        listed.0.len()
    );
    assert_eq!(listed.0.len(), 203);
    let good: Vec<_> = listed.0.iter().filter(|(_, w)| w.is_some()).collect();
    assert_eq!(good.len(), 3, "only the good keys are valid: {good:?}");
    assert_eq!(listing.state().borrow().entries, 203);

    proxy.heal();
    let caught_up = tokio::time::timeout(Duration::from_secs(60), async {
        while watched.0.len() < 203 {
            let ev = watching.next().await;
            watched.apply(&ev);
        }
    })
    .await;
    assert!(
        caught_up.is_ok(),
        "the watch caught up: {} keys of 203",
        watched.0.len()
    );
    assert_eq!(watched.0, listed.0);
    Ok(())
}
