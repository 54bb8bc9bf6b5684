//! The README's library snippets cannot drift: each ```rust block of the
//! README is the text between one pair of `README:begin`/`README:end`
//! markers in `src/bin/readme_*.rs`, and those programs run here against a
//! real etcd: two servers register, the client's call is answered, a
//! SIGTERM drains (weight 0), stops and deregisters a server; a wildcard
//! advertise address and an unreachable etcd fail with errors that say so.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use etcd_lb_testkit::{eventually, free_port, Etcd, Proc};
use nix::sys::signal::Signal;

/// The README's ```rust blocks, dedented.
fn readme_blocks() -> Result<Vec<String>> {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(&readme).with_context(|| readme.display().to_string())?;
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in text.lines() {
        match (&mut current, line.trim_start()) {
            (None, "```rust") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.push(dedent(&current.take().unwrap_or_default())),
            (Some(lines), _) => lines.push(line),
            (None, _) => {}
        }
    }
    Ok(blocks)
}

/// The marked regions of the snippet programs, by name, dedented.
fn marked_regions() -> Result<Vec<(String, String)>> {
    let mut regions = Vec::new();
    for file in ["readme_server.rs", "readme_client.rs"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/bin")
            .join(file);
        let text = std::fs::read_to_string(&path)?;
        let mut name = None;
        let mut lines = Vec::new();
        for line in text.lines() {
            let t = line.trim();
            if let Some(n) = t.strip_prefix("// README:begin ") {
                name = Some(n.to_owned());
                lines.clear();
            } else if t.starts_with("// README:end") {
                regions.push((name.take().context("end before begin")?, dedent(&lines)));
            } else if name.is_some() {
                lines.push(line);
            }
        }
    }
    Ok(regions)
}

fn dedent(lines: &[&str]) -> String {
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    lines
        .iter()
        .map(|l| l.get(indent..).unwrap_or("").trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn every_readme_rust_block_is_a_tested_program() -> Result<()> {
    let blocks = readme_blocks()?;
    let regions = marked_regions()?;
    ensure!(
        regions.len() == 2,
        "expected the server and client regions, found {}",
        regions.len()
    );
    ensure!(
        blocks.len() == regions.len(),
        "the README has {} rust blocks, the programs {} marked regions",
        blocks.len(),
        regions.len()
    );
    for (name, region) in &regions {
        ensure!(
            blocks.iter().any(|b| b == region),
            "the README has no block equal to the `{name}` region of src/bin/readme_{name}.rs:\n{region}"
        );
    }
    Ok(())
}

fn server(etcd: &Etcd, port: u16, advertise: &str) -> Result<Proc> {
    Proc::spawn(
        "readme_server",
        env!("CARGO_BIN_EXE_readme_server"),
        &[],
        &[
            ("ETCD_ENDPOINTS", etcd.endpoint().as_str()),
            ("LISTEN", format!("127.0.0.1:{port}").as_str()),
            ("ADVERTISE", advertise),
        ],
    )
}

async fn client(endpoints: &str) -> Result<std::process::Output> {
    let endpoints = endpoints.to_owned();
    Ok(tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_readme_client"))
            .env("ETCD_ENDPOINTS", endpoints)
            .output()
    })
    .await??)
}

async fn weights(etcd: &Etcd) -> Result<Vec<(String, u64)>> {
    let mut c = etcd.client().await?;
    let resp = c
        .get(
            "/ns/echo/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    let mut out = Vec::new();
    for kv in resp.kvs() {
        let v: serde_json::Value = serde_json::from_slice(kv.value())?;
        out.push((
            kv.key_str()?.to_owned(),
            v["weight"].as_u64().unwrap_or(u64::MAX),
        ));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_snippets_register_balance_drain_and_deregister() -> Result<()> {
    let etcd = Etcd::start().await?;
    let ports = [free_port(), free_port()];
    let mut servers = Vec::new();
    for p in ports {
        servers.push(server(&etcd, p, &format!("127.0.0.1:{p}"))?);
    }
    eventually(
        Duration::from_secs(15),
        "both servers registered",
        || async { weights(&etcd).await.ok().filter(|w| w.len() == 2) },
    )
    .await
    .with_context(|| servers[0].log())?;

    let out = client(&etcd.endpoint()).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "the README client failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        ports
            .iter()
            .any(|p| stdout.contains(&format!("127.0.0.1:{p} answered"))),
        "unexpected answer: {stdout}"
    );

    // SIGTERM: weight 0 first (drain), then the key goes, then exit 0.
    let mut first = servers.remove(0);
    first.signal(Signal::SIGTERM)?;
    let key = format!("/ns/echo/127.0.0.1:{}", ports[0]);
    eventually(
        Duration::from_secs(5),
        "weight 0 while draining",
        || async {
            weights(&etcd)
                .await
                .ok()
                .filter(|w| w.iter().any(|(k, weight)| *k == key && *weight == 0))
        },
    )
    .await
    .with_context(|| first.log())?;
    let code = first.wait_exit(Duration::from_secs(20)).await?;
    ensure!(code == Some(0), "server exit {code:?}:\n{}", first.log());
    let left = weights(&etcd).await?;
    ensure!(
        left.len() == 1 && left[0].0 != key,
        "after the drain etcd holds {left:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wildcard_advertise_address_and_an_unreachable_etcd_say_what_is_wrong() -> Result<()> {
    let etcd = Etcd::start().await?;
    let port = free_port();
    let mut wildcard = server(&etcd, port, &format!("0.0.0.0:{port}"))?;
    let code = wildcard.wait_exit(Duration::from_secs(10)).await?;
    ensure!(
        code.is_some_and(|c| c != 0),
        "a wildcard address was accepted: {code:?}"
    );
    ensure!(
        wildcard.log().contains("wildcard address"),
        "the error does not name the wildcard:\n{}",
        wildcard.log()
    );

    // Nothing listens on port 1 of loopback.
    let out = client("127.0.0.1:1").await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "the client succeeded without etcd");
    ensure!(
        stderr.contains("etcd not reached"),
        "the error does not say etcd was not reached:\n{stderr}"
    );
    Ok(())
}
