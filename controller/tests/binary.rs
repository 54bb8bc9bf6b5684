//! The controller binary end to end: flags, signals, and leader election
//! between replicas (issue 4, point 5).

mod common;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::*;
use etcd_lb_testkit::{eventually, free_port, Etcd, Proc};
use nix::sys::signal::Signal;
use serde_json::Value;

const ELECTION_TTL: Duration = Duration::from_secs(3);

struct Replica {
    proc: Proc,
    base: String,
    http: reqwest::Client,
}

impl Replica {
    fn spawn(etcd: &Etcd, ttl: Duration, extra: &[&str]) -> Result<Self> {
        let (proc, base) = common::replica(etcd, ttl, extra)?;
        Ok(Self {
            proc,
            base,
            http: reqwest::Client::new(),
        })
    }

    async fn readyz(&self) -> Option<Value> {
        get_json(&self.http, &format!("{}/readyz", self.base))
            .await
            .ok()
            .map(|(_, v)| v)
    }

    async fn is_leader(&self) -> bool {
        self.readyz().await.is_some_and(|r| r["leader"] == true)
    }

    async fn wait_ready(&self) -> Result<()> {
        eventually(Duration::from_secs(20), "replica ready", || async {
            self.readyz()
                .await
                .filter(|r| r["ready"] == true)
                .map(|_| ())
        })
        .await
        .with_context(|| self.proc.log())
    }

    /// Total deletions this replica made.
    async fn deletions(&self) -> Result<f64> {
        let text = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with("controller_deletions_total{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum())
    }
}

/// Waits until exactly one of `replicas` leads; returns its index.
async fn one_leader(replicas: &[&Replica], limit: Duration) -> Result<usize> {
    eventually(limit, "exactly one leader", || async {
        let mut leaders = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            if r.is_leader().await {
                leaders.push(i);
            }
        }
        (leaders.len() == 1).then(|| leaders[0])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_deletes_and_the_other_takes_over_when_it_dies() -> Result<()> {
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    let a = Replica::spawn(&etcd, ELECTION_TTL, &[])?;
    let b = Replica::spawn(&etcd, ELECTION_TTL, &[])?;
    a.wait_ready().await?;
    b.wait_ready().await?;
    let leader = one_leader(&[&a, &b], Duration::from_secs(10)).await?;
    let (mut leader, mut follower) = if leader == 0 { (a, b) } else { (b, a) };
    // Both agree on who leads.
    let lid = leader.readyz().await.context("leader readyz")?["id"].clone();
    eventually(
        Duration::from_secs(5),
        "the follower to know the leader",
        || async {
            follower
                .readyz()
                .await
                .filter(|r| r["leader_id"] == lid && r["leader"] == false)
                .map(|_| ())
        },
    )
    .await?;

    // Every replica serves the view: a live member shows up in both. A few
    // more live members, so the three stale entries below are a minority
    // of the registry (otherwise the global safety valve rightly holds).
    let (live, _stop) = legacy_server().await?;
    put_plain(&client, &key("shared_view", &live), &live).await?;
    let mut others = Vec::new();
    for _ in 0..4 {
        let (addr, stop) = legacy_server().await?;
        put_plain(&client, &key("shared_view", &addr), &addr).await?;
        others.push(stop);
    }
    for r in [&leader, &follower] {
        eventually(
            Duration::from_secs(10),
            "the member in every replica's view",
            || async {
                let (s, v) = get_json(&r.http, &format!("{}/services/shared_view", r.base))
                    .await
                    .ok()?;
                let members = v["members"].as_array()?;
                let shown = members
                    .iter()
                    .any(|m| m["addr"] == live.as_str() && m["healthy"] == true);
                (s == 200 && shown).then_some(())
            },
        )
        .await?;
    }

    // Stale keys in three services: each deleted once, by the leader only.
    let stale: Vec<String> = (0..3)
        .map(|i| key(&format!("svc{i}"), &dead_addr()))
        .collect();
    for k in &stale {
        put_plain(&client, k, r#"{"weight":1}"#).await?;
    }
    for k in &stale {
        wait_gone(&client, k, Duration::from_secs(10)).await?;
    }
    // Give the follower several passes to (wrongly) act.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(leader.deletions().await?, 3.0, "{}", leader.proc.log());
    assert_eq!(follower.deletions().await?, 0.0, "{}", follower.proc.log());
    assert!(!follower.proc.log().contains("deleted stale registration"));
    assert_eq!(
        leader
            .proc
            .log()
            .matches("deleted stale registration")
            .count(),
        3
    );

    // The leader dies without resigning: the follower wins once the lease
    // expires, within the election TTL (plus the probe and polling slack).
    leader.proc.kill();
    let killed = Instant::now();
    let late = key("svc_late", &dead_addr());
    put_plain(&client, &late, r#"{"weight":1}"#).await?;
    eventually(
        ELECTION_TTL + Duration::from_secs(2),
        "the follower to take over",
        || async { follower.is_leader().await.then_some(()) },
    )
    .await
    .with_context(|| follower.proc.log())?;
    eprintln!(
        "took over {:?} after the kill (election TTL {ELECTION_TTL:?})",
        killed.elapsed()
    );
    wait_gone(&client, &late, Duration::from_secs(5)).await?;
    assert_eq!(follower.deletions().await?, 1.0);
    follower.proc.signal(Signal::SIGTERM)?;
    let code = follower.proc.wait_exit(Duration::from_secs(10)).await?;
    assert_eq!(code, Some(0), "{}", follower.proc.log());
    drop(leader);
    Ok(())
}

/// A leader stopped with SIGTERM resigns: the standby takes over at once,
/// long before the election TTL would have handed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_resigns_and_hands_over_at_once() -> Result<()> {
    let etcd = Etcd::start().await?;
    let ttl = Duration::from_secs(30);
    let a = Replica::spawn(&etcd, ttl, &[])?;
    let b = Replica::spawn(&etcd, ttl, &[])?;
    a.wait_ready().await?;
    b.wait_ready().await?;
    let leader = one_leader(&[&a, &b], Duration::from_secs(10)).await?;
    let (mut leader, follower) = if leader == 0 { (a, b) } else { (b, a) };
    leader.proc.signal(Signal::SIGTERM)?;
    let code = leader.proc.wait_exit(Duration::from_secs(10)).await?;
    assert_eq!(code, Some(0), "{}", leader.proc.log());
    assert!(
        leader.proc.log().contains("resigned leadership"),
        "{}",
        leader.proc.log()
    );
    eventually(ttl / 3, "the standby to lead", || async {
        follower.is_leader().await.then_some(())
    })
    .await
    .with_context(|| follower.proc.log())?;
    Ok(())
}

/// Leadership is dropped before the lease can expire when etcd is
/// unreachable, and won again when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_is_dropped_when_etcd_is_unreachable() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    let r = Replica::spawn(&etcd, ELECTION_TTL, &[])?;
    r.wait_ready().await?;
    eventually(Duration::from_secs(10), "leadership", || async {
        r.is_leader().await.then_some(())
    })
    .await?;
    etcd.stop();
    let stopped = Instant::now();
    eventually(ELECTION_TTL, "leadership dropped", || async {
        (!r.is_leader().await).then_some(())
    })
    .await
    .with_context(|| r.proc.log())?;
    eprintln!("stepped down {:?} after etcd stopped", stopped.elapsed());
    let text = reqwest::get(format!("{}/metrics", r.base))
        .await?
        .text()
        .await?;
    assert_eq!(sample(&text, "controller_leader", ""), Some(0.0), "{text}");
    assert!(r.proc.log().contains("leadership lost"), "{}", r.proc.log());

    etcd.restart(false).await?;
    eventually(Duration::from_secs(20), "leadership again", || async {
        r.is_leader().await.then_some(())
    })
    .await
    .with_context(|| r.proc.log())?;
    Ok(())
}

/// When etcd hangs (SIGSTOP: connections stay open, nothing answers) the
/// leader stops claiming leadership before its lease could have expired,
/// and leads again when etcd resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_is_dropped_before_the_lease_can_expire_when_etcd_hangs() -> Result<()> {
    let etcd = Etcd::start().await?;
    let r = Replica::spawn(&etcd, ELECTION_TTL, &[])?;
    r.wait_ready().await?;
    eventually(Duration::from_secs(10), "leadership", || async {
        r.is_leader().await.then_some(())
    })
    .await?;
    let pid = etcd_pid(&etcd)?;
    nix::sys::signal::kill(pid, Signal::SIGSTOP)?;
    let stopped = Instant::now();
    let dropped = eventually(ELECTION_TTL, "leadership dropped", || async {
        (!r.is_leader().await).then_some(())
    })
    .await
    .with_context(|| r.proc.log());
    nix::sys::signal::kill(pid, Signal::SIGCONT)?;
    dropped?;
    eprintln!("stepped down {:?} after etcd hung", stopped.elapsed());
    eventually(Duration::from_secs(20), "leadership again", || async {
        r.is_leader().await.then_some(())
    })
    .await
    .with_context(|| r.proc.log())?;
    Ok(())
}

/// The pid of the test's own etcd, found by its unique data directory in
/// `/proc/*/cmdline`.
fn etcd_pid(etcd: &Etcd) -> Result<nix::unistd::Pid> {
    let needle = etcd.data_dir().display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.iter().any(|a| a == &needle) {
            pids.push(pid);
        }
    }
    ensure!(
        pids.len() == 1,
        "expected one etcd with that data dir, found {pids:?}"
    );
    Ok(nix::unistd::Pid::from_raw(pids[0]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_exit_with_code_2_and_a_message() -> Result<()> {
    for args in [
        &["--probe-interval", "soon"][..],
        &["--max-unhealthy-ratio", "2"],
        &["--max-deletions-per-pass", "0"],
        &["--election-ttl", "1s"],
        &["--election-key", "/ns/leader"],
        &["--probe-interval", "1s", "--probe-timeout", "5s"],
        &["--no-such-flag"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_controller"))
            .args(args)
            .env_remove("ETCD_ENDPOINTS")
            .output()?;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("error"), "{args:?}: {err}");
    }
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_controller"))
        .arg("--help")
        .output()?;
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--etcd-endpoints",
        "--prefix",
        "--listen",
        "--probe-interval",
        "--probe-timeout",
        "--dead-after",
        "--max-deletions-per-pass",
        "--max-unhealthy-ratio",
        "--log-format",
        "--election-key",
        "CONTROLLER_DEAD_AFTER",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }
    Ok(())
}

/// Flags come from the environment too, and JSON logs are JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_fallbacks_and_json_logs() -> Result<()> {
    let etcd = Etcd::start().await?;
    let port = free_port();
    let mut p = Proc::spawn(
        "controller-env",
        env!("CARGO_BIN_EXE_controller"),
        &[],
        &[
            ("ETCD_ENDPOINTS", &etcd.endpoint()),
            ("CONTROLLER_LISTEN", &format!("127.0.0.1:{port}")),
            ("LOG_FORMAT", "json"),
            ("CONTROLLER_ELECTION_TTL", "2s"),
        ],
    )?;
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(15), "ready via env config", || async {
        let (s, _) = get_json(&http, &format!("http://127.0.0.1:{port}/readyz"))
            .await
            .ok()?;
        (s == 200).then_some(())
    })
    .await
    .with_context(|| p.log())?;
    p.signal(Signal::SIGTERM)?;
    assert_eq!(p.wait_exit(Duration::from_secs(10)).await?, Some(0));
    let log = p.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    ensure!(!lines.is_empty(), "no logs");
    for l in lines {
        let v: Value = serde_json::from_str(l).with_context(|| format!("not JSON: {l}"))?;
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
    Ok(())
}

/// The per-pass budget: with `--max-deletions-per-pass 1`, three stale
/// entries of one service go in three different passes, the rest deferred
/// and logged; live members of the service are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_spreads_deletions_over_passes() -> Result<()> {
    let etcd = Etcd::start().await?;
    let client = etcd.client().await?;
    let mut live = Vec::new();
    for _ in 0..7 {
        let (addr, stop) = legacy_server().await?;
        put_plain(&client, &key("budget_svc", &addr), &addr).await?;
        live.push((addr, stop));
    }
    let r = Replica::spawn(&etcd, ELECTION_TTL, &["--max-deletions-per-pass", "1"])?;
    r.wait_ready().await?;
    eventually(Duration::from_secs(10), "leadership", || async {
        r.is_leader().await.then_some(())
    })
    .await?;
    // Put the three at once (one transaction), so one pass sees them all.
    let stale: Vec<String> = (0..3).map(|_| key("budget_svc", &dead_addr())).collect();
    let mut c = client.clone();
    c.txn(
        etcd_client::Txn::new().and_then(
            stale
                .iter()
                .map(|k| etcd_client::TxnOp::put(k.as_str(), r#"{"weight":1}"#, None))
                .collect::<Vec<_>>(),
        ),
    )
    .await?;
    for k in &stale {
        wait_gone(&client, k, Duration::from_secs(10)).await?;
    }
    for (a, _) in &live {
        assert!(exists(&client, &key("budget_svc", a)).await?, "{a} deleted");
    }
    let log = r.proc.log();
    let passes: std::collections::HashSet<&str> = log
        .lines()
        .filter(|l| l.contains("deleted stale registration"))
        .filter_map(|l| l.split("pass{n=").nth(1)?.split('}').next())
        .collect();
    assert_eq!(passes.len(), 3, "one deletion per pass:\n{log}");
    assert!(log.contains("deferred=2"), "{log}");
    Ok(())
}
