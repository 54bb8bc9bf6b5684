//! gRPC over TLS between clients and servers (and the controller's
//! probes): servers take `--tls-cert/--tls-key`, dialers `--tls-ca`.
//! Certificates are made at test time by a throw-away CA.

mod common;

use std::time::Duration;

use anyhow::{Context, Result};
use common::{args, bench, calls_of, http_get, key_set, report, server, wait_keys};
use etcd_lb_testkit::{bin_path, eventually, free_port, Etcd, Pki, Proc};

#[tokio::test]
async fn servers_clients_and_probes_speak_tls() -> Result<()> {
    let etcd = Etcd::start().await?;
    let ep = etcd.endpoint();
    let pki = Pki::new("grpc-ca")?;
    let leaf = pki.issue("greet-server")?;
    let (cert, key) = (
        leaf.cert.display().to_string(),
        leaf.key.display().to_string(),
    );
    let ports = [free_port(), free_port()];
    let _servers: Vec<Proc> = ports
        .iter()
        .map(|p| server(&ep, *p, &["--tls-cert", &cert, "--tls-key", &key], &[]))
        .collect::<Result<_>>()?;
    let c = etcd.client().await?;
    wait_keys(&c, &key_set(&ports), Duration::from_secs(20)).await?;
    let ca = pki.ca.display().to_string();

    // A client with the CA: every call succeeds, on both servers.
    let mut ok = bench(&ep, 8, Duration::from_secs(3), &["--tls-ca", &ca], &[])?;
    let r = report(&mut ok, Duration::from_secs(60)).await?;
    assert_eq!(r["errors"], 0, "{r:#}");
    for p in ports {
        assert!(calls_of(&r, &format!("127.0.0.1:{p}")) > 0, "{r:#}");
    }

    // Without TLS, or trusting another CA, nothing gets through.
    let other = Pki::new("other-ca")?;
    let other_ca = other.ca.display().to_string();
    for extra in [&[][..], &["--tls-ca", other_ca.as_str()][..]] {
        let mut p = bench(&ep, 2, Duration::from_secs(2), extra, &[])?;
        let r = report(&mut p, Duration::from_secs(60)).await?;
        assert_eq!(
            r["errors"], r["calls"],
            "{extra:?}: every call refused: {r:#}"
        );
        assert!(r["calls"].as_u64().unwrap_or(0) > 0);
        // Its health checks fail too: a server that cannot be spoken to
        // never comes back into rotation (an error made up by the client's
        // own transport once counted as an answer).
        assert!(
            !p.log().contains("endpoint reachable again"),
            "{extra:?}: {}",
            p.log()
        );
    }

    // The controller probes over TLS and sees both healthy; nothing deleted.
    let ctl_port = free_port();
    let ctl = Proc::spawn(
        "controller",
        bin_path("controller"),
        &args(&[
            "--listen",
            &format!("127.0.0.1:{ctl_port}"),
            "--etcd-endpoints",
            &ep,
            "--probe-interval",
            "300ms",
            "--probe-timeout",
            "250ms",
            "--dead-after",
            "2s",
            "--tls-ca",
            &ca,
        ]),
        &[("RUST_LOG", "info")],
    )?;
    eventually(
        Duration::from_secs(20),
        "both servers healthy over TLS",
        || async {
            let (status, body) = http_get(ctl_port, "/services/greet_service?healthy=true")
                .await
                .ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (status == 200 && v["members"].as_array()?.len() == 2).then_some(())
        },
    )
    .await
    .with_context(|| ctl.log())?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_keys(&c, &key_set(&ports), Duration::from_secs(1)).await?;
    assert!(
        !ctl.log().contains("deleted stale registration"),
        "{}",
        ctl.log()
    );
    Ok(())
}
