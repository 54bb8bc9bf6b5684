//! Rolling restarts under load: while the client's load mode runs, every
//! server is replaced one by one by a new process on the same address.
//! With SIGTERM (drain, revoke) and with SIGKILL (no goodbye: the dead key
//! stays until its lease expires, and the fencing rule makes the new process
//! wait for that, then take over) no call fails.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::{bench, calls_of, key_of, key_set, report, server, wait_keys};
use etcd_client::Client;
use etcd_lb_testkit::{eventually, free_port, Etcd, Proc};
use nix::sys::signal::Signal;
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(3);
/// etcd checks for expired leases every 500 ms; allow for that and a
/// loaded machine on top of the TTL itself.
const EXPIRY_SLACK: Duration = Duration::from_secs(2);

/// The two tests share the machine's two cores: run them one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn lease_of(c: &Client, key: &str) -> Option<i64> {
    let mut c = c.clone();
    let r = c.get(key, None).await.ok()?;
    r.kvs().first().map(|kv| kv.lease())
}

fn start(eps: &str, port: u16) -> Result<Proc> {
    server(eps, port, &["--ttl", "3s", "--latency", "2ms"], &[])
}

async fn rolling_restart(sig: Signal) -> Result<()> {
    let _serial = SERIAL.lock().await;
    let etcd = Etcd::start().await?;
    let eps = etcd.endpoint();
    let c = etcd.client().await?;
    let ports = [free_port(), free_port(), free_port()];
    let mut servers: Vec<Proc> = ports
        .iter()
        .map(|p| start(&eps, *p))
        .collect::<Result<_>>()?;
    let want = key_set(&ports);
    wait_keys(&c, &want, Duration::from_secs(20)).await?;
    let mut load = bench(&eps, 8, Duration::from_secs(30), &[], &[])?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    for (i, port) in ports.iter().enumerate() {
        let key = key_of(*port);
        let old = lease_of(&c, &key).await.context("registered before")?;
        let stopped = Instant::now();
        if sig == Signal::SIGKILL {
            servers[i].kill();
        } else {
            servers[i].signal(sig)?;
            let code = servers[i].wait_exit(Duration::from_secs(15)).await?;
            assert_eq!(code, Some(0), "clean exit:\n{}", servers[i].log());
        }
        servers[i] = start(&eps, *port)?;
        // The key is taken over by the new process (a new lease); after a
        // SIGKILL that can only happen once the old lease has expired, which
        // must be within one TTL.
        let limit = if sig == Signal::SIGKILL {
            TTL + EXPIRY_SLACK
        } else {
            Duration::from_secs(10)
        };
        eventually(limit, &format!("{key} on a new lease"), || async {
            lease_of(&c, &key)
                .await
                .filter(|l| *l != old && *l != 0)
                .map(|_| ())
        })
        .await
        .with_context(|| servers[i].log())?;
        let mut lc = c.clone();
        assert_eq!(
            lc.lease_time_to_live(old, None).await?.ttl(),
            -1,
            "the old lease is gone"
        );
        if sig == Signal::SIGKILL {
            let log = servers[i].log();
            assert!(
                log.contains("address owned by another live lease"),
                "the new process waited for the dead one's lease (fencing):\n{log}"
            );
        }
        eprintln!("{key}: replaced after {:?}", stopped.elapsed());
        // Give clients time to connect to the new process before the next.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    wait_keys(&c, &want, Duration::from_secs(5)).await?;

    let r = report(&mut load, Duration::from_secs(60)).await?;
    assert_eq!(r["errors"], 0, "no call failed:\n{r:#}\n{}", load.log());
    for p in ports {
        assert!(calls_of(&r, &format!("127.0.0.1:{p}")) > 0, "{r:#}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_with_sigterm_fails_no_call() -> Result<()> {
    rolling_restart(Signal::SIGTERM).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_with_sigkill_fails_no_call_and_the_dead_key_expires() -> Result<()> {
    rolling_restart(Signal::SIGKILL).await
}
