//! What the greet-server binary's tests share: starting the binary, and a
//! Morning call to it.

#![allow(dead_code)]

use anyhow::{ensure, Result};
use etcd_lb_testkit::Proc;
use greet_proto::{GreetClient, GreetRequest};

/// The lease TTL the tests' servers register with, in seconds.
pub const TTL: u64 = 4;

/// The greet-server binary on `127.0.0.1:<port>` against the etcd at
/// `etcd` (endpoints, comma-separated), lease TTL [`TTL`], with `extra`
/// flags and `env`.
pub fn server(etcd: &str, port: u16, extra: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
    let mut args = vec![
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--etcd-endpoints".to_owned(),
        etcd.to_owned(),
        "--ttl".to_owned(),
        format!("{TTL}s"),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Proc::spawn(
        &format!("greet-server:{port}"),
        env!("CARGO_BIN_EXE_greet-server"),
        &args,
        env,
    )
}

/// One Morning call to the server on `port`; the address it signed with.
pub async fn morning(port: u16) -> Result<String> {
    let mut c = GreetClient::connect(format!("http://127.0.0.1:{port}")).await?;
    let r = c
        .morning(GreetRequest {
            name: "JetWu".into(),
        })
        .await?
        .into_inner();
    ensure!(r.message == "Good morning, JetWu", "reply {r:?}");
    Ok(r.from)
}
