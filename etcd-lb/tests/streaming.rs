//! Every RPC kind through the balancer, each with its request stream left
//! open while the test waits for the first answer: a balancer that buffers
//! the request stream before sending anything would hang here. The server
//! is a real tonic server with gRPC reflection (bidi), health `Watch`
//! (server-streaming) and a small echo (client-streaming) written below.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use etcd_lb::{Balancer, BalancerConfig, RetryPolicy};
use etcd_lb_registry::schema::Addr;
use greet_proto::paths::{MORNING, NIGHT};
use tokio_stream::wrappers::ReceiverStream;
use tonic::body::Body;
use tonic::transport::server::TcpIncoming;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_prost::ProstCodec;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// `/test.Echo/First`: client-streaming; answers with the first message as
/// soon as it arrives, whatever follows.
#[derive(Clone)]
struct Echo;

impl tonic::server::NamedService for Echo {
    const NAME: &'static str = "test.Echo";
}

struct First;

impl tonic::server::ClientStreamingService<String> for First {
    type Response = String;
    type Future = BoxFuture<Result<tonic::Response<String>, tonic::Status>>;

    fn call(&mut self, req: tonic::Request<tonic::Streaming<String>>) -> Self::Future {
        Box::pin(async move {
            let first = req.into_inner().message().await?.unwrap_or_default();
            Ok(tonic::Response::new(first))
        })
    }
}

impl tower::Service<http::Request<Body>> for Echo {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<String, String>::default());
            Ok(grpc.client_streaming(First, req).await)
        })
    }
}

async fn serve() -> Result<Addr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = Addr::from_socket(listener.local_addr()?);
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    std::mem::forget(reporter);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(reflection)
            .add_service(Echo)
            .add_service(greet_proto::GreetServer::new(
                greet_server::GreetService::new("greet"),
            ))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    Ok(addr)
}

async fn balancer() -> Result<Balancer> {
    let bal = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        ..BalancerConfig::new("stream_service")
    });
    bal.upsert(&serve().await?, 100, "");
    bal.upsert(&serve().await?, 100, "");
    Ok(bal)
}

const LIMIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn a_bidi_call_is_answered_while_its_request_stream_is_open() -> Result<()> {
    let bal = balancer().await?;
    for _ in 0..4 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
        .await?;
        let mut client = ServerReflectionClient::new(bal.clone());
        let answer = tokio::time::timeout(LIMIT, async {
            let mut replies = client
                .server_reflection_info(ReceiverStream::new(rx))
                .await?
                .into_inner();
            replies.message().await
        })
        .await
        .context("no reflection answer while the request stream is open")??;
        let listed = match answer.and_then(|a| a.message_response) {
            Some(MessageResponse::ListServicesResponse(l)) => l.service,
            other => anyhow::bail!("unexpected answer {other:?}"),
        };
        assert!(
            listed.iter().any(|s| s.name == "grpc.health.v1.Health"),
            "{listed:?}"
        );
        drop(tx);
    }
    Ok(())
}

#[tokio::test]
async fn a_client_streaming_call_is_answered_while_its_request_stream_is_open() -> Result<()> {
    let bal = balancer().await?;
    for i in 0..4 {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(format!("hello {i}")).await?;
        let mut grpc = tonic::client::Grpc::new(bal.clone());
        let answer = tokio::time::timeout(LIMIT, async {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            grpc.client_streaming(
                tonic::Request::new(ReceiverStream::new(rx)),
                http::uri::PathAndQuery::from_static("/test.Echo/First"),
                ProstCodec::<String, String>::default(),
            )
            .await
        })
        .await
        .context("no echo while the request stream is open")??;
        assert_eq!(answer.into_inner(), format!("hello {i}"));
        drop(tx);
    }
    Ok(())
}

#[tokio::test]
async fn a_server_streaming_call_streams_through() -> Result<()> {
    let bal = balancer().await?;
    for _ in 0..4 {
        let mut client = HealthClient::new(bal.clone());
        let first = tokio::time::timeout(LIMIT, async {
            let mut updates = client
                .watch(HealthCheckRequest {
                    service: String::new(),
                })
                .await?
                .into_inner();
            updates.message().await
        })
        .await
        .context("no first health update")??
        .context("the watch ended at once")?;
        assert_eq!(first.status, tonic_health::ServingStatus::Serving as i32);
    }
    Ok(())
}

/// A unary request past the 64 KiB replay buffer is sent once, as it
/// comes, and still answered.
#[tokio::test]
async fn a_large_unary_request_still_works() -> Result<()> {
    let bal = balancer().await?;
    let mut client = greet_proto::GreetClient::new(bal);
    let reply = client
        .morning(greet_proto::GreetRequest {
            name: "x".repeat(200 * 1024),
        })
        .await?;
    assert_eq!(reply.into_inner().from, "greet");
    Ok(())
}

/// Issue 34, point 4: a server-streaming method listed as retryable
/// (health `Watch`, whose first message comes at once and the next only
/// on a change) still streams: its first message reaches the caller while
/// the stream stays open. Before, retryable responses were read whole, so
/// this waited for the stream's end, forever.
#[tokio::test]
async fn a_server_stream_listed_as_retryable_still_streams() -> Result<()> {
    let addr = serve().await?;
    let bal = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent(["/grpc.health.v1.Health/Watch"]),
        ..BalancerConfig::new("s")
    });
    bal.upsert(&addr, 100, "");
    let mut c = HealthClient::new(bal);
    let first = tokio::time::timeout(Duration::from_secs(3), async {
        let mut s = c
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner();
        s.message().await
    })
    .await
    .context("the first message never came: the stream was held whole")??;
    assert!(first.is_some());
    Ok(())
}
