//! A TCP forwarder that a test can cut, heal and slow down: the simplest
//! honest way to make a client lose its connection to etcd (or a server), or
//! see etcd answer late, while the other side keeps running.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Forwards `127.0.0.1:<port>` to a target; [`Proxy::cut`] drops every
/// connection and refuses new ones until [`Proxy::heal`];
/// [`Proxy::set_delay`] holds every byte sent towards the target for a
/// while (ordered, so requests arrive late but intact).
pub struct Proxy {
    /// The address clients should dial.
    pub addr: SocketAddr,
    enabled: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
    generation: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let enabled = Arc::new(AtomicBool::new(true));
        let (generation, gen_rx) = watch::channel(0u64);
        let on = enabled.clone();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !on.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let mut cut = gen_rx.clone();
                let start_gen = *cut.borrow_and_update();
                let delay = delay.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        () = forward(inbound, outbound, delay) => {}
                        _ = cut.wait_for(|g| *g != start_gen) => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            enabled,
            accepted,
            delay_ms,
            generation,
            task,
        })
    }

    /// Drops live connections and refuses new ones.
    pub fn cut(&self) {
        self.enabled.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Connections forwarded so far (refused ones not counted).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Accepts connections again.
    pub fn heal(&self) {
        self.enabled.store(true, Ordering::SeqCst);
    }

    /// Holds every chunk sent towards the target for `delay` from the
    /// moment it was read (zero: forward at once). Applies to live
    /// connections too.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

/// Copies both ways; the direction towards the target goes through a queue
/// whose chunks are released `delay` after they were read.
async fn forward(inbound: TcpStream, outbound: TcpStream, delay: Arc<AtomicU64>) {
    let (mut in_read, mut in_write) = inbound.into_split();
    let (mut out_read, mut out_write) = outbound.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = in_read.read(&mut buf).await {
            let at = Instant::now() + Duration::from_millis(delay.load(Ordering::SeqCst));
            if tx.send((at, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    };
    let writer = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if out_write.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = out_write.shutdown().await;
    };
    let back = async move {
        let _ = tokio::io::copy(&mut out_read, &mut in_write).await;
        let _ = in_write.shutdown().await;
    };
    tokio::join!(reader, writer, back);
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}
