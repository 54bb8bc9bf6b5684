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
        ("continue=v1.zz.0.a", 400),
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

    // Enough newer snapshots push it out: 410 Gone, with JSON.
    let mut n = 0u16;
    eventually(Duration::from_secs(60), "the old token to expire", || {
        n += 1;
        let addr = format!("127.0.0.1:{}", 23_000 + n);
        let (client, ctl, token) = (&client, &ctl, &token);
        async move {
            put_plain(client, &key("svc", &addr), &value(&addr))
                .await
                .ok()?;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = ctl.get("/services?limit=2").await.ok()?;
            let (status, body) = ctl
                .get(&format!("/services?limit=2&continue={token}"))
                .await
                .ok()?;
            (status == 410).then_some(body)
        }
    })
    .await
    .and_then(|body| {
        ensure!(
            body["status"] == 410 && body["error"].as_str().is_some_and(|e| e.contains("again")),
            "{body}"
        );
        Ok(())
    })?;
    ctl.stop().await
}
