//! The gRPC health probe of every registered endpoint: does the process
//! behind an address answer? What counts as an answer is
//! [`etcd_lb_registry::health`]'s rule, shared with the client's balancer.
//!
//! Channels are cached per address and reconnect by themselves, so a pass
//! over a thousand endpoints does not open a thousand connections every
//! interval; [`Prober::retain`] drops the channels of endpoints that left.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use etcd_lb_registry::schema::Addr;
use tonic::transport::Channel;

pub use etcd_lb_registry::health::Outcome;

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
        let endpoint = etcd_lb_registry::grpc_tls::endpoint(addr, self.tls.as_ref())
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
        let outcome = etcd_lb_registry::health::check(ch, self.timeout).await;
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
}
