//! Your own service over etcd-lb, both sides in one program.
//!
//! Three `echo.Echo` servers register in etcd with weights 100, 200 and
//! 300 (the registrar keeps each key alive on a lease); a client discovers
//! them through etcd, balances `Say` calls by weight, holds a bidi `Chat`
//! stream open while it talks, then drains the heaviest server (weight 0)
//! and shows that new calls avoid it. It prints one JSON report on stdout
//! and exits non-zero when any of that did not hold.
//!
//! ```sh
//! etcd &                                 # any etcd, v3 API
//! cargo run -p echo-example -- 127.0.0.1:2379
//! ```
//!
//! The etcd endpoint comes from the first argument, else `ETCD_ENDPOINTS`,
//! else `127.0.0.1:2379`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use etcd_lb::{
    Addr, Balancer, BalancerConfig, CancellationToken, Discovery, DiscoveryConfig, EtcdConfig,
    Registrar, RegistrarConfig, RegistrationStatus, RetryPolicy, ServiceName,
};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status as GrpcStatus, Streaming};

mod pb {
    tonic::include_proto!("echo");
}
use pb::echo_client::EchoClient;
use pb::echo_server::{Echo, EchoServer};
use pb::{Message, Reply};

/// The service's name in etcd: keys are `/ns/echo/<host:port>`.
const SERVICE: &str = "echo";
const WEIGHTS: [u32; 3] = [100, 200, 300];
const CALLS: usize = 600;
const CHAT_MESSAGES: usize = 5;

/// One echo server; it says who it is in every reply.
struct EchoService {
    me: String,
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn say(&self, req: Request<Message>) -> Result<Response<Reply>, GrpcStatus> {
        Ok(Response::new(Reply {
            text: req.into_inner().text,
            server: self.me.clone(),
        }))
    }

    type ChatStream = ReceiverStream<Result<Reply, GrpcStatus>>;

    async fn chat(
        &self,
        req: Request<Streaming<Message>>,
    ) -> Result<Response<Self::ChatStream>, GrpcStatus> {
        let mut incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let me = self.me.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = incoming.next().await {
                let reply = Reply {
                    text: msg.text,
                    server: me.clone(),
                };
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves one echo server on a free loopback port and registers it.
async fn serve(
    etcd: &EtcdConfig,
    weight: u32,
    stop: CancellationToken,
) -> Result<(Addr, Registrar)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = Addr::from_socket(listener.local_addr()?);
    let service = EchoService {
        me: addr.to_string(),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(service))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop.cancelled_owned()),
    );
    let registrar = Registrar::spawn(
        etcd.clone(),
        RegistrarConfig {
            version: "1.0.0".into(),
            weight,
            ..RegistrarConfig::new(ServiceName::new(SERVICE)?, addr.clone())
        },
    )?;
    let mut status = registrar.status();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| matches!(s, RegistrationStatus::Registered { .. })),
    )
    .await
    .context("not registered within 10 s: is etcd up?")??;
    Ok((addr, registrar))
}

/// Calls `Say` `n` times; returns the answers per server.
async fn say(client: &mut EchoClient<Balancer>, n: usize) -> Result<BTreeMap<String, usize>> {
    let mut by_server = BTreeMap::new();
    for i in 0..n {
        let reply = client
            .say(Message {
                text: format!("hello {i}"),
            })
            .await?
            .into_inner();
        *by_server.entry(reply.server).or_default() += 1;
    }
    Ok(by_server)
}

/// Opens a `Chat` stream and sends one message at a time, each only after
/// the previous reply came: works only if the balancer passes the request
/// stream through while it is open.
async fn chat(client: &mut EchoClient<Balancer>) -> Result<usize> {
    let (tx, rx) = mpsc::channel(1);
    let mut replies = client.chat(ReceiverStream::new(rx)).await?.into_inner();
    let mut answered = 0;
    for i in 0..CHAT_MESSAGES {
        let text = format!("line {i}");
        tx.send(Message { text: text.clone() }).await?;
        let reply = tokio::time::timeout(Duration::from_secs(5), replies.next())
            .await
            .context("no reply while the request stream is open")?
            .context("the stream ended early")??;
        ensure!(reply.text == text, "echoed {:?}, sent {text:?}", reply.text);
        answered += 1;
    }
    Ok(answered)
}

#[tokio::main]
async fn main() -> Result<()> {
    let endpoint = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("ETCD_ENDPOINTS").ok())
        .unwrap_or_else(|| "127.0.0.1:2379".into());
    let etcd = EtcdConfig::plain(endpoint.split(','));
    let stop = CancellationToken::new();

    // Server side: three registered servers.
    let mut servers = Vec::new();
    for weight in WEIGHTS {
        let (addr, registrar) = serve(&etcd, weight, stop.clone()).await?;
        servers.push((addr, weight, registrar));
    }

    // Client side: discovery feeds the balancer, a generated client wraps it.
    let balancer = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent(["/echo.Echo/Say"]),
        ..BalancerConfig::new(SERVICE)
    });
    let cfg = DiscoveryConfig::new(ServiceName::new(SERVICE)?);
    let discovery = Discovery::spawn(etcd.clone(), cfg, balancer.clone(), stop.clone());
    discovery.wait_synced(Duration::from_secs(10)).await?;
    ensure!(
        balancer.len() == WEIGHTS.len(),
        "sees {} servers",
        balancer.len()
    );
    let mut client = EchoClient::new(balancer.clone());

    let shares = say(&mut client, CALLS).await?;
    let chat_replies = chat(&mut client).await?;

    // Drain the heaviest: weight 0 reaches the client through etcd.
    let (drained, _, heaviest) = servers.last().context("no servers")?;
    let drained = drained.clone();
    ensure!(
        heaviest.set_weight(0, Duration::from_secs(5)).await?,
        "weight 0 not written"
    );
    let mut changes = balancer.changes();
    tokio::time::timeout(Duration::from_secs(10), async {
        while balancer.weight_of(&drained) != Some(0) {
            let _ = changes.changed().await;
        }
    })
    .await
    .context("the drain did not reach the client within 10 s")?;
    let after_drain = say(&mut client, 100).await?;

    let weights: BTreeMap<String, u32> = servers
        .iter()
        .map(|(addr, weight, _)| (addr.to_string(), *weight))
        .collect();
    for (_, _, registrar) in servers {
        registrar.deregister(Duration::from_secs(5)).await;
    }
    stop.cancel();

    let total = WEIGHTS.iter().sum::<u32>() as f64;
    let worst_share_error = shares
        .iter()
        .map(|(server, n)| {
            let want = f64::from(weights.get(server).copied().unwrap_or(0)) / total;
            (*n as f64 / CALLS as f64 - want).abs()
        })
        .fold(0.0, f64::max);
    let to_drained = after_drain.get(drained.as_str()).copied().unwrap_or(0);
    println!(
        "{{\"calls\":{CALLS},\"by_server\":{shares:?},\"worst_share_error\":{worst_share_error:.4},\
         \"chat_replies\":{chat_replies},\"calls_to_drained_after_drain\":{to_drained}}}"
    );
    ensure!(shares.len() == WEIGHTS.len(), "not every server answered");
    ensure!(
        worst_share_error < 0.02,
        "shares off by {worst_share_error:.3}"
    );
    ensure!(
        to_drained == 0,
        "{to_drained} calls went to the drained server"
    );
    Ok(())
}
