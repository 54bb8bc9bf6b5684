//! `/services?limit=N&continue=TOKEN`: pages of one snapshot, as
//! Kubernetes' list chunking: a walk sees every member once, in order, and
//! the state of when it started; bad tokens are 400, tokens of a snapshot
//! no longer kept are 410.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::*;
use etcd_client::{Txn, TxnOp};
use etcd_lb_testkit::{eventually, Etcd};
use serde_json::Value;

fn quiet() -> controller::Config {
    controller::Config {
        dead_after: Duration::from_secs(3600),
        ..fast_config()
    }
}

fn value(addr: &str) -> String {
    format!(r#"{{"addr":"{addr}","version":"v1","weight":100}}"#)
}

/// (service, addr) of every member of a page or view, in order.
fn members_of(v: &Value) -> Vec<(String, String)> {
    v["services"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| {
            let name = s["name"].as_str().unwrap_or_default().to_owned();
            s["members"].as_array().into_iter().flatten().map(move |m| {
                (
                    name.clone(),
                    m["addr"].as_str().unwrap_or_default().to_owned(),
                )
            })
        })
        .collect()
}

/// Walks every page from `first` on; returns the members and the pages.
async fn walk(ctl: &Ctl, query: &str, mut page: Value) -> Result<(Vec<(String, String)>, usize)> {
    let mut all = members_of(&page);
    let mut pages = 1;
    while let Some(token) = page["continue"].as_str() {
        let remaining = page["remaining"].as_u64().context("remaining")?;
        let (status, next) = ctl
            .get(&format!("/services?{query}&continue={token}"))
            .await?;
        ensure!(status == 200, "page {pages}: {status} {next}");
        let got = members_of(&next);
        ensure!(!got.is_empty(), "an empty page before the end");
        ensure!(
            next["remaining"].as_u64() == Some(remaining - got.len() as u64),
            "remaining did not count down: {remaining} then {}",
            next["remaining"]
        );
        all.extend(got);
        page = next;
        pages += 1;
    }
    ensure!(page["remaining"] == 0, "the last page has members after it");
    Ok((all, pages))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walk_sees_every_member_once_from_one_snapshot() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut client = etcd.client().await?;
    let mut ops = Vec::new();
    for s in 0..3 {
        for m in 0..10 {
            let addr = format!("127.0.0.1:{}", 21_000 + m);
            ops.push(TxnOp::put(
                key(&format!("svc_{s}"), &addr),
                value(&addr),
                None,
            ));
        }
    }
    client.txn(Txn::new().and_then(ops)).await?;
    let ctl = Ctl::start(&etcd, quiet()).await?;
    let whole = eventually(
        Duration::from_secs(20),
        "30 members in the view",
        || async {
            let (_, v) = ctl.get("/services").await.ok()?;
            (members_of(&v).len() == 30).then_some(v)
        },
    )
    .await?;

    // 7 per page: 5 pages, services cut across pages, same order as the
    // whole view, each member once.
    let (status, first) = ctl.get("/services?limit=7").await?;
    ensure!(status == 200, "{first}");
    ensure!(first["remaining"] == 23, "{}", first["remaining"]);
    let (all, pages) = walk(&ctl, "limit=7", first.clone()).await?;
    ensure!(pages == 5, "{pages} pages");
    ensure!(
        all == members_of(&whole),
        "the pages differ from the whole view"
    );
    ensure!(
        first["services"][0]["counts"]["members"] == 10,
        "counts are of the whole service"
    );

    // A member added after the walk began is not in it; a new walk has it.
    let late = "127.0.0.1:21999";
    put_plain(&client, &key("svc_0", late), &value(late)).await?;
    ctl.wait_member(
        "svc_0",
        late,
        Duration::from_secs(10),
        "the late member",
        |_| true,
    )
    .await?;
    let (all, _) = walk(&ctl, "limit=7", first).await?;
    ensure!(all.len() == 30, "the old walk sees {} members", all.len());
    let (_, fresh) = ctl.get("/services?limit=7").await?;
    let (all, _) = walk(&ctl, "limit=7", fresh).await?;
    ensure!(
        all.len() == 31 && all.iter().any(|(_, a)| a == late),
        "the new walk misses the late member"
    );

    // A filtered walk pages the filtered members (none is healthy here).
    let (status, page) = ctl.get("/services?limit=7&healthy=true").await?;
    ensure!(
        status == 200 && page["continue"].is_null() && page["remaining"] == 0,
        "{page}"
    );
    ctl.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_expired_tokens_are_refused_with_json() -> Result<()> {
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    for m in 0..4 {
        let addr = format!("127.0.0.1:{}", 22_000 + m);
        put_plain(&client, &key("svc", &addr), &value(&addr)).await?;
    }
    let ctl = Ctl::start(&etcd, quiet()).await?;
    ctl.wait_member(
        "svc",
        "127.0.0.1:22003",
        Duration::from_secs(10),
        "the members",
        |_| true,
    )
    .await?;

    for (query, want) in [
        ("limit=0", 400),
        ("limit=abc", 400),
        ("limit=10001", 400),
        ("limit=2&continue=garbage", 400),
        ("continue=v2.1.zz.0.a", 400),
        ("limit=2&colour=red", 400),
    ] {
        let (status, body) = ctl.get(&format!("/services?{query}")).await?;
        ensure!(status == want, "{query}: {status} {body}");
        ensure!(
            body["status"] == want && body["error"].is_string(),
            "{query}: {body}"
        );
    }

    let (_, first) = ctl.get("/services?limit=2").await?;
    let token = first["continue"]
        .as_str()
        .context("a next page")?
        .to_owned();
    // The token is bound to its filter.
    let (status, body) = ctl
        .get(&format!("/services?limit=2&healthy=false&continue={token}"))
        .await?;
    ensure!(status == 400, "{status} {body}");
    // Still good now.
    let (status, _) = ctl
        .get(&format!("/services?limit=2&continue={token}"))
        .await?;
    ensure!(status == 200);

    // Enough newer snapshots push out the one this token belongs to once
    // no page was cut from it for IN_USE (10 s; least recently used
    // first): 410 Gone, with JSON.
    for n in 0..14u16 {
        let addr = format!("127.0.0.1:{}", 23_000 + n);
        put_plain(&client, &key("svc", &addr), &value(&addr)).await?;
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let (status, _) = ctl.get("/services?limit=2").await?;
        ensure!(status == 200);
    }
    let (status, body) = ctl
        .get(&format!("/services?limit=2&continue={token}"))
        .await?;
    ensure!(
        status == 410
            && body["status"] == 410
            && body["error"].as_str().is_some_and(|e| e.contains("again")),
        "{status} {body}"
    );
    ctl.stop().await
}

/// 1,000 members, 24 readers walking pages of 50 with 0.2 s between
/// pages while one weight is rewritten all along: walks in progress keep
/// their snapshot (least-recently-used eviction; new walks share a recent
/// snapshot), so at most 1 % of walks end in 410 (old code, oldest-first
/// eviction by count: 183 of 222 walks did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_walks_complete_under_churn() -> Result<()> {
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    let kvs: Vec<(String, String)> = (0..1000u32)
        .map(|m| {
            let addr = format!("127.0.0.2:{}", 20_000 + m);
            (key("churn", &addr), value(&addr))
        })
        .collect();
    etcd_lb_testkit::put_in_txns(&client, kvs, None).await?;
    let ctl = Ctl::start(&etcd, quiet()).await?;
    ctl.wait_member(
        "churn",
        "127.0.0.2:20999",
        Duration::from_secs(20),
        "the members",
        |_| true,
    )
    .await?;

    let stop = tokio_util::sync::CancellationToken::new();
    let writer = tokio::spawn({
        let (client, stop) = (client.clone(), stop.clone());
        async move {
            let addr = "127.0.0.2:20000";
            let mut w = 1u32;
            while !stop.is_cancelled() {
                w = w % 9000 + 1;
                let v = format!(r#"{{"addr":"{addr}","version":"v1","weight":{w}}}"#);
                let _ = put_plain(&client, &key("churn", addr), &v).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let ctl = std::sync::Arc::new(ctl);
    let mut readers = Vec::new();
    for i in 0..24u64 {
        let ctl = ctl.clone();
        readers.push(tokio::spawn(async move {
            // Staggered, so walks start all through the run, each on a
            // newer generation.
            tokio::time::sleep(Duration::from_millis(170 * i)).await;
            let (mut complete, mut gone) = (0u32, 0u32);
            for _ in 0..3 {
                let (status, mut page) = ctl.get("/services?limit=50").await?;
                ensure!(status == 200, "first page: {status}");
                loop {
                    let Some(token) = page["continue"].as_str().map(str::to_owned) else {
                        complete += 1;
                        break;
                    };
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let (status, next) = ctl
                        .get(&format!("/services?limit=50&continue={token}"))
                        .await?;
                    if status == 410 {
                        gone += 1;
                        break;
                    }
                    ensure!(status == 200, "{status} {next}");
                    page = next;
                }
            }
            Ok::<_, anyhow::Error>((complete, gone))
        }));
    }
    let (mut complete, mut gone) = (0, 0);
    for r in readers {
        let (c, g) = r.await??;
        complete += c;
        gone += g;
    }
    stop.cancel();
    writer.await?;
    println!("walks under churn: {complete} complete, {gone} ended in 410");
    ensure!(
        f64::from(gone) <= 0.01 * f64::from(complete + gone),
        "{gone} of {} walks ended in 410 Gone",
        complete + gone
    );
    Ok(())
}

/// A token from another replica (or an earlier run) is refused with a 410
/// that says so, never answered from a different view.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_another_replica_is_refused_saying_why() -> Result<()> {
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    for m in 0..6 {
        let addr = format!("127.0.0.1:{}", 24_000 + m);
        put_plain(&client, &key("svc", &addr), &value(&addr)).await?;
    }
    let a = Ctl::start(&etcd, quiet()).await?;
    let b = Ctl::start(&etcd, quiet()).await?;
    for ctl in [&a, &b] {
        ctl.wait_member(
            "svc",
            "127.0.0.1:24005",
            Duration::from_secs(10),
            "the members",
            |_| true,
        )
        .await?;
    }
    let (_, first) = a.get("/services?limit=2").await?;
    let token = first["continue"]
        .as_str()
        .context("a next page")?
        .to_owned();
    // B has walks of its own, so a token naming any of its snapshots
    // would otherwise find one.
    let (_, _) = b.get("/services?limit=2").await?;
    let (status, body) = b
        .get(&format!("/services?limit=2&continue={token}"))
        .await?;
    ensure!(
        status == 410
            && body["error"]
                .as_str()
                .is_some_and(|e| e.contains("another controller replica")),
        "{status} {body}"
    );
    let (status, _) = a
        .get(&format!("/services?limit=2&continue={token}"))
        .await?;
    ensure!(
        status == 200,
        "the issuing replica refused its own token: {status}"
    );
    Ok(())
}
