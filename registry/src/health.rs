//! Does the process behind an address answer gRPC? One answer for every
//! caller: the client's balancer (is a down endpoint back?) and the
//! controller's prober (is a registered endpoint alive?). Two copies of this
//! rule drifted apart once: the client counted an `INTERNAL` made up by its
//! own transport (a plaintext client against a TLS server) as an answer.
//!
//! The question is "is the process up", not "is it healthy": any answer at
//! the gRPC level proves it. So `UNIMPLEMENTED` (the original Go servers
//! have no health service) is alive, `NOT_SERVING` is alive and draining,
//! and only a failure to get any gRPC answer within the timeout (refused,
//! reset, hung, not HTTP/2, not gRPC) counts against the endpoint.

use std::error::Error as _;
use std::time::Duration;

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// What one health check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Health service answered SERVING.
    Serving,
    /// Health service answered NOT_SERVING: up but draining.
    NotServing,
    /// No health service (UNIMPLEMENTED), as the original Go servers: up.
    Unimplemented,
    /// Some other gRPC-level answer (a status or a serving state we do not
    /// expect): the process is up.
    Answered(String),
    /// No gRPC answer: refused, timed out, broken connection, not gRPC.
    Failed(String),
}

impl Outcome {
    /// Whether the process answered at all (the only thing staleness and
    /// recovery care about).
    pub fn is_alive(&self) -> bool {
        !matches!(self, Self::Failed(_))
    }

    /// Whether the endpoint should get calls: alive and not draining.
    pub fn is_healthy(&self) -> bool {
        self.is_alive() && !matches!(self, Self::NotServing)
    }

    /// A short label for views and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::NotServing => "not_serving",
            Self::Unimplemented => "unimplemented",
            Self::Answered(_) => "answered",
            Self::Failed(_) => "failed",
        }
    }

    /// Detail for people (the failure reason, or the odd answer).
    pub fn detail(&self) -> Option<&str> {
        match self {
            Self::Answered(s) | Self::Failed(s) => Some(s),
            _ => None,
        }
    }
}

/// Classifies the error status of a health check.
///
/// tonic reports transport failures as statuses too, so a status only
/// counts as an answer when a server sent it: tonic attaches the underlying
/// error as the `source` of every status it makes up from a transport or
/// HTTP/2 failure (`INTERNAL` for a protocol error, such as a plaintext
/// client meeting a TLS server), and the codes of refused or broken
/// connections and of our own timeout (`UNAVAILABLE`, `UNKNOWN`,
/// `INTERNAL`, `DEADLINE_EXCEEDED`, `CANCELLED`) never count, whoever made
/// them.
pub fn classify_status(status: &tonic::Status) -> Outcome {
    let failed = || {
        Outcome::Failed(format!(
            "{:?}: {}",
            status.code(),
            status.message().chars().take(200).collect::<String>()
        ))
    };
    if status.source().is_some() {
        return failed();
    }
    match status.code() {
        Code::Unimplemented => Outcome::Unimplemented,
        Code::Unavailable
        | Code::Unknown
        | Code::Internal
        | Code::DeadlineExceeded
        | Code::Cancelled => failed(),
        code => Outcome::Answered(format!("{code:?}")),
    }
}

/// Checks the server behind `channel` once with `grpc.health.v1.Health/Check`
/// for the server as a whole (service `""`). Never errors and never takes
/// longer than `limit`; cancel-safe.
///
/// `channel` is any gRPC transport: a tonic `Channel`, or a balancer's own
/// connection, so a probe can ride the very connection a call is on.
pub async fn check<T>(channel: T, limit: Duration) -> Outcome
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut client = HealthClient::new(channel);
    let mut req = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    req.set_timeout(limit);
    match tokio::time::timeout(limit, client.check(req)).await {
        Err(_) => Outcome::Failed(format!("no answer within {limit:?}")),
        Ok(Err(status)) => classify_status(&status),
        Ok(Ok(resp)) => match ServingStatus::try_from(resp.into_inner().status) {
            Ok(ServingStatus::Serving) => Outcome::Serving,
            Ok(ServingStatus::NotServing) => Outcome::NotServing,
            Ok(other) => Outcome::Answered(other.as_str_name().to_owned()),
            Err(_) => Outcome::Answered("unknown serving status".to_owned()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tonic::transport::Endpoint;
    use tonic::Status;

    #[test]
    fn any_grpc_answer_is_alive_transport_failures_are_not() {
        assert_eq!(
            classify_status(&Status::unimplemented("no health")),
            Outcome::Unimplemented
        );
        assert!(classify_status(&Status::permission_denied("x")).is_alive());
        assert!(classify_status(&Status::not_found("x")).is_alive());
        for dead in [
            Status::unavailable("connection refused"),
            Status::unknown("h2 protocol error"),
            Status::internal("h2 protocol error"),
            Status::deadline_exceeded("timeout"),
            Status::cancelled("gone"),
        ] {
            assert!(!classify_status(&dead).is_alive(), "{dead:?}");
        }
        // A code that a server could send, made up by our own transport.
        let local = Status::from_error(Box::new(Status::permission_denied("x")));
        assert!(classify_status(&local).is_alive(), "no source: {local:?}");
        let io = std::io::Error::other("tls handshake eof");
        let made_up = Status::from_error(Box::new(io));
        assert!(!classify_status(&made_up).is_alive(), "{made_up:?}");
        assert!(Outcome::NotServing.is_alive());
        assert!(!Outcome::NotServing.is_healthy());
        assert!(Outcome::Unimplemented.is_healthy());
    }

    async fn check_addr(addr: std::net::SocketAddr, limit: Duration) -> Outcome {
        let ch = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        check(ch, limit).await
    }

    #[tokio::test]
    async fn nothing_listening_fails() {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let out = check_addr(addr, Duration::from_secs(1)).await;
        assert!(!out.is_alive(), "{out:?}");
    }

    #[tokio::test]
    async fn a_silent_listener_times_out() {
        // Accepts TCP (the kernel does) but never speaks HTTP/2, like a
        // SIGSTOPped process.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let out = check_addr(l.local_addr().unwrap(), Duration::from_millis(300)).await;
        assert!(!out.is_alive(), "{out:?}");
    }

    /// Peers that answer, but not in gRPC: a TLS server refusing plaintext
    /// (its alert record), an HTTP/1 server, garbage. None is alive.
    #[tokio::test]
    async fn a_peer_that_is_not_grpc_is_not_alive() {
        let replies: [&[u8]; 3] = [
            // TLS alert: fatal, protocol_version.
            &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46],
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
            b"\x00\x00\x00garbage that is no HTTP/2 frame at all\r\n",
        ];
        for reply in replies {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let server = tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    // Read what the client says first, as a real peer
                    // would, then answer and hang up.
                    let mut buf = [0u8; 1024];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(reply).await;
                    let _ = s.shutdown().await;
                }
            });
            let out = check_addr(addr, Duration::from_secs(1)).await;
            assert!(
                !out.is_alive(),
                "{:?}: {out:?}",
                String::from_utf8_lossy(reply)
            );
            server.abort();
        }
    }
}
