//! A forwarder in front of one etcd member's peer URL that can shut one
//! member out of the cluster.
//!
//! etcd's peers talk over HTTP: every request a member sends to another
//! carries its own id in `X-Server-From`, and raft messages flow both ways
//! over connections either side dialed (streams are dialed by the receiver,
//! pipelines by the sender). So cutting one member off needs two things:
//! its own proxy refuses everything, and every other proxy refuses
//! connections whose requests come from it. [`crate::Cluster::isolate`] does
//! both.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const HEADER: &[u8] = b"X-Server-From: ";

#[derive(Default)]
struct Rules {
    /// Refuse every connection.
    all: bool,
    /// Refuse connections from these member ids (hex, as etcd writes them).
    from: BTreeSet<String>,
}

impl Rules {
    fn refuses(&self, sender: Option<&str>) -> bool {
        self.all || sender.is_some_and(|s| self.from.contains(s))
    }
}

/// Forwards a loopback port to one member's real peer port.
pub(crate) struct PeerProxy {
    pub(crate) addr: SocketAddr,
    rules: Arc<Mutex<Rules>>,
    changed: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl PeerProxy {
    pub(crate) async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let rules = Arc::new(Mutex::new(Rules::default()));
        let (changed, changed_rx) = watch::channel(0u64);
        let r = rules.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if r.lock().map(|r| r.all).unwrap_or(true) {
                    continue;
                }
                tokio::spawn(relay(inbound, target, r.clone(), changed_rx.clone()));
            }
        });
        Ok(Self {
            addr,
            rules,
            changed,
            task,
        })
    }

    fn update(&self, f: impl FnOnce(&mut Rules)) {
        if let Ok(mut r) = self.rules.lock() {
            f(&mut r);
        }
        self.changed.send_modify(|g| *g += 1);
    }

    pub(crate) fn refuse_all(&self, on: bool) {
        self.update(|r| r.all = on);
    }

    pub(crate) fn refuse_from(&self, member_hex: &str, on: bool) {
        self.update(|r| {
            if on {
                r.from.insert(member_hex.to_owned());
            } else {
                r.from.remove(member_hex);
            }
        });
    }
}

impl Drop for PeerProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.refuse_all(true);
    }
}

/// Copies both ways, learning the sender from the requests it writes, and
/// drops the connection as soon as the rules refuse it.
async fn relay(
    inbound: TcpStream,
    target: SocketAddr,
    rules: Arc<Mutex<Rules>>,
    mut changed: watch::Receiver<u64>,
) {
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let (mut in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = outbound.into_split();
    let (sender_tx, mut sender_rx) = watch::channel(None::<String>);
    let refused = |sender: &Option<String>| {
        rules
            .lock()
            .map(|r| r.refuses(sender.as_deref()))
            .unwrap_or(true)
    };
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        // The tail of what was read so far, to find the header across reads.
        let mut seen: Vec<u8> = Vec::new();
        while let Ok(n @ 1..) = in_read.read(&mut buf).await {
            if sender_tx.borrow().is_none() {
                seen.extend_from_slice(&buf[..n]);
                if let Some(id) = find_sender(&seen) {
                    let _ = sender_tx.send(Some(id));
                } else if seen.len() > 16 * 1024 {
                    seen.drain(..seen.len() - 64);
                }
            }
            if out_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    };
    let down = async move {
        let _ = tokio::io::copy(&mut out_read, &mut in_write).await;
    };
    let guard = async {
        loop {
            if refused(&sender_rx.borrow_and_update().clone()) {
                return;
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                r = sender_rx.changed() => if r.is_err() { std::future::pending::<()>().await },
            }
        }
    };
    tokio::select! {
        () = guard => {}
        _ = async { tokio::join!(up, down) } => {}
    }
}

/// The member id in the first `X-Server-From` header of `buf`, once the
/// line is complete.
fn find_sender(buf: &[u8]) -> Option<String> {
    let at = buf.windows(HEADER.len()).position(|w| w == HEADER)?;
    let rest = &buf[at + HEADER.len()..];
    let end = rest.iter().position(|b| *b == b'\r')?;
    Some(String::from_utf8_lossy(&rest[..end]).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sender_is_read_from_a_complete_header_line() {
        let req = b"GET /raft/stream/message/8e9e05c52164694d HTTP/1.1\r\nHost: x\r\nX-Server-From: 91bc3c398fb3c146\r\nX-Raft-To: 8e9e";
        assert_eq!(find_sender(req).as_deref(), Some("91bc3c398fb3c146"));
        assert_eq!(find_sender(b"X-Server-From: 91bc"), None);
        assert_eq!(find_sender(b"GET / HTTP/1.1\r\n\r\n"), None);
    }
}
