//! A third-party gRPC client: Python's grpcio (gRPC's C core, pinned and
//! installed by scripts/setup.sh), given the standard multi-address target
//! `ipv4:a,b,c` with round_robin. grpcio sends that whole list as each
//! request's `:authority`, which h2 alone rejects; greet-server answers it
//! (greet-server/src/authority.rs).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use etcd_lb_testkit::{bin_path, eventually, free_port, Etcd, Proc};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("grpcio/greet_calls.py")
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcio_round_robin_over_an_address_list_gets_every_answer() -> Result<()> {
    let etcd = Etcd::start().await?;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let _servers = ports
        .iter()
        .map(|p| {
            Proc::spawn(
                &format!("greet-server:{p}"),
                bin_path("greet-server"),
                &[
                    "--listen".to_owned(),
                    format!("127.0.0.1:{p}"),
                    "--etcd-endpoints".to_owned(),
                    etcd.endpoint(),
                ],
                &[],
            )
        })
        .collect::<Result<Vec<_>>>()?;
    for p in &ports {
        eventually(
            Duration::from_secs(15),
            "servers listening",
            || async move { std::net::TcpStream::connect(("127.0.0.1", *p)).ok() },
        )
        .await?;
    }
    let target = format!(
        "ipv4:{}",
        ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script())
            .args([&target, "3000", "round_robin"])
            .output()
    })
    .await?
    .context("python3 (grpcio is installed by scripts/setup.sh)")?;
    ensure!(
        out.status.success(),
        "grpcio client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| String::from_utf8_lossy(&out.stdout).into_owned())?;
    ensure!(report["ok"] == 3000, "errors from greet-server: {report}");
    for p in &ports {
        let n = report["from"][format!("127.0.0.1:{p}")]
            .as_u64()
            .unwrap_or(0);
        ensure!(
            (900..=1100).contains(&n),
            "round_robin should spread 3000 calls evenly: {report}"
        );
    }
    Ok(())
}
