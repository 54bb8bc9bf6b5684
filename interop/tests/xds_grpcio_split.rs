//! `controller split|unsplit` through grpcio over the controller's xDS
//! (issue 35, point 4; the library's half is `controller/tests/split.rs`):
//! over three greet-servers of the demo's version 0.1.0 at weights
//! 100/200/300 and two canaries of 2.0.0 at 100/300, `greet_service
//! 2.0.0=5` sends grpcio 5 % of its calls to 2.0.0 and each side keeps its
//! weights' proportions, within 2 % on as many calls as make that bound
//! sound (below); the controller's view shows the split and the weights it
//! sent; `unsplit` restores the plain weights.

mod xds_common;

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use etcd_lb_testkit::{env_u64, eventually, free_port, Etcd};
use xds_common::{
    bootstrap, controller, operate, versioned_server, Batch, Grpcio, Server, SERVICE,
};

/// The demo's version (manifests/base/greet-server.yaml) and the canary's.
const OLD: &str = "0.1.0";
const NEW: &str = "2.0.0";
/// The fleet: versions and weights (both sides have weights whose
/// proportions can drift).
const FLEET: [(&str, u32); 5] = [(OLD, 100), (OLD, 200), (OLD, 300), (NEW, 100), (NEW, 300)];

/// grpcio picks each call's locality at random by weight, so its shares
/// are binomial: over `n` calls a share `p` has a standard deviation of
/// sqrt(p(1-p)/n). A bound is sound when it is at least 4.5 of them away
/// (a false failure below 1 in 100,000 per check).
fn sigma(p: f64, n: u64) -> f64 {
    (p * (1.0 - p) / n.max(1) as f64).sqrt()
}

/// 2.0.0's share of all calls, and each member's share of its own side
/// next to weight/side-sum, with the side's calls.
fn shares(fleet: &[Server], b: &Batch) -> (f64, Vec<(String, f64, f64, u64)>) {
    let side = |v: &str| -> (u64, u32) {
        fleet
            .iter()
            .zip(FLEET)
            .filter(|(_, (version, _))| *version == v)
            .fold((0, 0), |(c, w), (s, (_, weight))| {
                (c + b.count(&s.addr), w + weight)
            })
    };
    let within = fleet
        .iter()
        .zip(FLEET)
        .map(|(s, (version, weight))| {
            let (calls, weights) = side(version);
            (
                s.addr.clone(),
                b.count(&s.addr) as f64 / calls.max(1) as f64,
                f64::from(weight) / f64::from(weights),
                calls,
            )
        })
        .collect();
    (side(NEW).0 as f64 / b.ok.max(1) as f64, within)
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcio_over_xds_sees_the_split_through_weights_and_unsplit_undoes_it() -> Result<()> {
    // 20,000 calls: 2.0.0's 5 % has sigma 0.15 %, so 2 % is 13 sigma (the
    // check uses 4.5 sigma, 0.69 %); the rest side's proportions (19,000
    // calls, p <= 1/2) have sigma <= 0.36 %, 2 % is 5.5 sigma. The canary
    // side gets only about 1,000 calls: its proportions (p = 1/4) have
    // sigma 1.4 %, so a 2 % bound would need about 150,000 calls
    // (GRPCIO_SPLIT_CALLS=150000); with fewer the bound is 4.5 sigma of
    // the canary side's calls, and says so.
    let n = env_u64("GRPCIO_SPLIT_CALLS", 20_000)?;
    let etcd = Etcd::start().await?;
    let mut fleet = Vec::new();
    for (version, weight) in FLEET {
        fleet.push(versioned_server(&etcd, weight, version).await?);
    }
    let ctl = controller(&etcd, free_port())?;
    let dir = tempfile::tempdir()?;
    let bootstrap = bootstrap(dir.path(), &ctl.xds)?;

    operate(&etcd, &["split", SERVICE, "2.0.0=5", "--by", "ops"])?;
    // The view shows the split, each member's lane and its weight under it.
    let view = format!("http://{}/services/{SERVICE}", ctl.http);
    let svc = eventually(Duration::from_secs(20), "the split in the view", || async {
        let v: serde_json::Value = reqwest::get(&view).await.ok()?.json().await.ok()?;
        (v["split"]["applies"] == "yes"
            && v["members"].as_array()?.len() == fleet.len()
            && v["members"]
                .as_array()?
                .iter()
                .all(|m| m["healthy"] == true))
        .then_some(v)
    })
    .await
    .with_context(|| ctl.proc.log())?;
    ensure!(
        svc["split"]["describe"] == "2.0.0=5 rest=95"
            && svc["split"]["sides"][0]["effective"] == 5.0
            && svc["split"]["by"] == "ops",
        "{svc}"
    );
    let mut client = Grpcio::start(&format!("xds:///{SERVICE}"), &bootstrap)?;
    // Warm up until every server has answered: the client has the whole
    // assignment.
    client
        .until(400, Duration::from_secs(60), "every server picked", |b| {
            fleet.iter().all(|s| b.count(&s.addr) > 0)
        })
        .await?;
    let started = std::time::Instant::now();
    let b = client.calls(u32::try_from(n)?).await?;
    ensure!(
        b.ok == n && b.errors == 0,
        "grpcio calls failed: {:?}",
        b.raw
    );
    let (canary, within) = shares(&fleet, &b);
    eprintln!(
        "grpcio over xDS, split 2.0.0=5: {} calls in {:?}, 2.0.0 share {:.4} % (sigma {:.4} %), within sides {within:?}",
        b.ok,
        started.elapsed(),
        canary * 100.0,
        sigma(0.05, n) * 100.0,
    );
    // 4.5 sigma (0.69 % at 20,000 calls): inside the 2 %, and
    // tight enough to catch a split that ignores the sides' weight sums
    // (3.46 % here), which 5 % +- 2 % would let pass.
    let bound = 4.5 * sigma(0.05, n);
    ensure!(
        bound <= 0.02 && (canary - 0.05).abs() <= bound,
        "2.0.0 got {:.3} % of grpcio's calls, want 5 % +- {:.3} %: {:?}",
        canary * 100.0,
        bound * 100.0,
        b.from
    );
    for (addr, got, want, side_calls) in &within {
        let bound = 0.02_f64.max(4.5 * sigma(*want, *side_calls));
        ensure!(
            (got - want).abs() <= bound,
            "{addr}: {got:.4} of its side, want {want:.4} +- {bound:.4}: {:?}",
            b.from
        );
    }

    let weights: HashMap<String, (u64, String)> = svc["members"]
        .as_array()
        .context("members")?
        .iter()
        .map(|m| {
            (
                m["addr"].as_str().unwrap_or_default().to_owned(),
                (
                    m["weight"].as_u64().unwrap_or(0),
                    m["lane"].as_str().unwrap_or_default().to_owned(),
                ),
            )
        })
        .collect();
    // The weights xDS sent are the view's, from the one split function:
    // 5 % x 100/400 and 5 % x 300/400 of a million for the canaries.
    eprintln!("view under the split: {weights:?}");
    ensure!(
        weights[&fleet[3].addr] == (12_500, NEW.to_owned())
            && weights[&fleet[4].addr] == (37_500, NEW.to_owned())
            && weights[&fleet[0].addr].1 == "rest",
        "{weights:?}"
    );

    // Unsplit: plain weights (100/200/300/100/300) within 2 % over 12,000
    // calls (p <= 0.3: sigma <= 0.42 %, 2 % is 4.8 sigma).
    operate(&etcd, &["unsplit", SERVICE])?;
    eventually(
        Duration::from_secs(20),
        "the split gone from the view",
        || async {
            let v: serde_json::Value = reqwest::get(&view).await.ok()?.json().await.ok()?;
            (v.get("split").is_none()).then_some(())
        },
    )
    .await?;
    // Batches until the push has landed (2.0.0 back near its plain 40 %),
    // then the measured one.
    client
        .until(
            600,
            Duration::from_secs(60),
            "grpcio no longer splits",
            |b| shares(&fleet, b).0 > 0.25,
        )
        .await?;
    let b = client.calls(12_000).await?;
    eprintln!("grpcio over xDS, unsplit: {:?}", b.from);
    let plain: Vec<(&str, u32)> = fleet
        .iter()
        .zip(FLEET)
        .map(|(s, (_, w))| (s.addr.as_str(), w))
        .collect();
    ensure!(
        b.errors == 0 && b.shares_match(&plain, 0.02),
        "after unsplit, grpcio's shares off weight/sum by more than 2 %: {:?}",
        b.raw
    );
    Ok(())
}
