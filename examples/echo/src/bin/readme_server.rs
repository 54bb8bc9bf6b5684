//! The README's server snippet as a program (the lines between the README
//! markers are the README's text, checked by `tests/readme.rs`, which also
//! runs this against a real etcd). Configured by environment, as a
//! container would be: `ETCD_ENDPOINTS`, `LISTEN` (e.g. `0.0.0.0:50051`)
//! and `ADVERTISE` (the address clients dial, e.g. the pod IP and port).

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

mod pb {
    tonic::include_proto!("echo");
}
use pb::echo_server::{Echo, EchoServer};
use pb::{Message, Reply};

/// Answers `Say` with the text and the address it was advertised at.
struct MyEcho {
    me: String,
}

#[tonic::async_trait]
impl Echo for MyEcho {
    async fn say(&self, req: Request<Message>) -> Result<Response<Reply>, Status> {
        Ok(Response::new(Reply {
            text: req.into_inner().text,
            server: self.me.clone(),
        }))
    }

    type ChatStream = ReceiverStream<Result<Reply, Status>>;

    async fn chat(
        &self,
        _: Request<Streaming<Message>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        Err(Status::unimplemented("the README server answers Say only"))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber_init();
    let me = std::env::var("ADVERTISE")?;
    let my_echo = MyEcho { me };
    // README:begin server
    use etcd_lb::{Addr, EtcdConfig, RegistrarConfig, ServeOptions, ServiceName};
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::transport::Server;

    let etcd = EtcdConfig::plain(std::env::var("ETCD_ENDPOINTS")?.split(','));
    let listener = TcpListener::bind(std::env::var("LISTEN")?).await?; // e.g. 0.0.0.0:50051
    let advertise: Addr = std::env::var("ADVERTISE")?.parse()?; // what clients dial: 10.0.0.7:50051, not 0.0.0.0
    let registration = RegistrarConfig {
        version: "1.4.0".into(),
        weight: 100,
        ..RegistrarConfig::new(ServiceName::new("echo")?, advertise)
    };
    // Registered while it serves; on SIGTERM: weight 0, 2 s drain, stop, deregister.
    let shutdown = etcd_lb::shutdown_signal()?;
    etcd_lb::serve_registered(
        etcd,
        registration,
        ServeOptions::default(),
        shutdown,
        |stop| {
            Server::builder()
                .add_service(EchoServer::new(my_echo))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop)
        },
    )
    .await?;
    // README:end server
    Ok(())
}

/// Logs to stderr at `RUST_LOG` (default info), so the drain steps show.
fn tracing_subscriber_init() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
