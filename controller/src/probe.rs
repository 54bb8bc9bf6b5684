//! The gRPC health probe: does the process behind an address answer?
//!
//! The question is "is the process up", not "is it healthy": any answer at
//! the gRPC level proves it. So `UNIMPLEMENTED` (the original Go servers
//! have no health service) is alive, `NOT_SERVING` is alive and draining,
//! and only a failure to get any gRPC answer within the timeout (refused,
//! reset, hung, not HTTP/2) counts against the endpoint.
//!
//! Channels are cached per address and reconnect by themselves, so a pass
//! over a thousand endpoints does not open a thousand connections every
//! interval; [`Prober::retain`] drops the channels of endpoints that left.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use registry::schema::Addr;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// What one probe found.
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
    /// No gRPC answer: refused, timed out, broken connection.
    Failed(String),
}

impl Outcome {
    /// Whether the process answered at all (the only thing staleness cares
    /// about).
    pub fn is_alive(&self) -> bool {
        !matches!(self, Self::Failed(_))
    }

    /// Whether the endpoint should get calls: alive and not draining.
    pub fn is_healthy(&self) -> bool {
        self.is_alive() && !matches!(self, Self::NotServing)
    }

    /// A short label for the view and metrics.
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

/// Classifies a gRPC status returned by a health check.
///
/// tonic reports transport failures as statuses too (`UNAVAILABLE` for a
/// refused or broken connection, `UNKNOWN`/`INTERNAL` for protocol errors,
/// `DEADLINE_EXCEEDED`/`CANCELLED` for our own timeout), so those codes
/// count as "no answer"; every other code can only come from a gRPC server.
pub fn classify_status(status: &tonic::Status) -> Outcome {
    match status.code() {
        Code::Unimplemented => Outcome::Unimplemented,
        Code::Unavailable
        | Code::Unknown
        | Code::Internal
        | Code::DeadlineExceeded
        | Code::Cancelled => Outcome::Failed(format!(
            "{:?}: {}",
            status.code(),
            status.message().chars().take(200).collect::<String>()
        )),
        code => Outcome::Answered(format!("{code:?}")),
    }
}

/// Probes endpoints, reusing one lazily connected channel per address.
#[derive(Debug)]
pub struct Prober {
    timeout: Duration,
    tls: Option<tonic::transport::ClientTlsConfig>,
    channels: Mutex<HashMap<Addr, Channel>>,
}

impl Prober {
    /// A prober whose checks each take at most `timeout`; over TLS when
    /// `tls` is set (servers started with `--tls-cert`).
    pub fn new(timeout: Duration, tls: Option<tonic::transport::ClientTlsConfig>) -> Self {
        Self {
            timeout,
            tls,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn channel(&self, addr: &Addr) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = channels.get(addr) {
            return Ok(ch.clone());
        }
        let endpoint = registry::grpc_tls::endpoint(addr, self.tls.as_ref())
            .map_err(|e| format!("bad endpoint URI: {e}"))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .tcp_nodelay(true);
        let ch = endpoint.connect_lazy();
        channels.insert(addr.clone(), ch.clone());
        Ok(ch)
    }

    /// Checks `addr` once with `grpc.health.v1.Health/Check` for the
    /// server as a whole (service `""`). Never errors and never takes
    /// longer than the timeout; cancel-safe.
    pub async fn probe(&self, addr: &Addr) -> Outcome {
        let ch = match self.channel(addr) {
            Ok(ch) => ch,
            Err(e) => return Outcome::Failed(e),
        };
        let mut client = HealthClient::new(ch);
        let call = client.check(HealthCheckRequest {
            service: String::new(),
        });
        let outcome = match tokio::time::timeout(self.timeout, call).await {
            Err(_) => Outcome::Failed(format!("no answer within {:?}", self.timeout)),
            Ok(Err(status)) => classify_status(&status),
            Ok(Ok(resp)) => match ServingStatus::try_from(resp.into_inner().status) {
                Ok(ServingStatus::Serving) => Outcome::Serving,
                Ok(ServingStatus::NotServing) => Outcome::NotServing,
                Ok(other) => Outcome::Answered(other.as_str_name().to_owned()),
                Err(_) => Outcome::Answered("unknown serving status".to_owned()),
            },
        };
        if !outcome.is_alive() {
            // A fresh connection next time: a cached channel to a process
            // that was replaced on the same port should not linger.
            self.forget(addr);
        }
        outcome
    }

    fn forget(&self, addr: &Addr) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.remove(addr);
    }

    /// Drops the channels of addresses no longer registered.
    pub fn retain(&self, keep: impl Fn(&Addr) -> bool) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        channels.retain(|a, _| keep(a));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            Status::deadline_exceeded("timeout"),
            Status::cancelled("gone"),
        ] {
            assert!(!classify_status(&dead).is_alive(), "{dead:?}");
        }
        assert!(Outcome::NotServing.is_alive());
        assert!(!Outcome::NotServing.is_healthy());
        assert!(Outcome::Unimplemented.is_healthy());
    }

    #[tokio::test]
    async fn nothing_listening_fails_fast() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let prober = Prober::new(Duration::from_secs(1), None);
        let out = prober
            .probe(&Addr::new(&format!("127.0.0.1:{port}")).unwrap())
            .await;
        assert!(!out.is_alive(), "{out:?}");
    }

    #[tokio::test]
    async fn a_silent_listener_times_out() {
        // Accepts TCP (the kernel does) but never speaks HTTP/2, like a
        // SIGSTOPped process.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = Addr::from_socket(l.local_addr().unwrap());
        let prober = Prober::new(Duration::from_millis(300), None);
        let out = prober.probe(&addr).await;
        assert!(!out.is_alive(), "{out:?}");
        drop(l);
    }
}
