//! Thread-per-core serving: each accepted connection lives its whole life
//! on one of N single-threaded runtimes, with the tasks of its streams.
//!
//! On tokio's work-stealing runtime a unary call hops between workers: the
//! connection task reads the request and spawns the stream's task, an idle
//! worker is woken (a `futex`) to steal it, and its answer wakes the
//! connection task back on the first. With two cores shared by the server,
//! its clients and h2load, those wake-ups and the stealing cost more than
//! the call itself. A shard is one thread with a `current_thread` runtime:
//! a connection's stream tasks run where it runs, and a wake-up is a queue
//! push, not a syscall. N shards (one per core by default) still use every
//! core once there are at least N connections.
//!
//! One acceptor (on the caller's runtime) hands each connection to the
//! shard with the fewest open connections, so a client that reconnects
//! never piles its connections on one thread. Shutdown: `stop` ends
//! accepting, drops the incoming stream (closing the listening socket, so
//! new clients are refused) and lets each shard finish its connections
//! gracefully (tonic sends GOAWAY and waits); `abandon` drops whatever is
//! still running.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Errors of the sharded server.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// A shard's thread or runtime could not be started.
    #[error("starting serving thread {shard}: {source}")]
    Start {
        /// Which shard.
        shard: usize,
        /// Why.
        source: io::Error,
    },
    /// A shard's server failed.
    #[error("serving thread {shard}: {source}")]
    Serve {
        /// Which shard.
        shard: usize,
        /// The server's error.
        source: tonic::transport::Error,
    },
    /// A shard's thread ended without a result (it panicked).
    #[error("serving thread {0} ended without a result")]
    Lost(usize),
}

/// The stream of connections one shard serves.
pub type ShardIncoming = Pin<Box<dyn Stream<Item = io::Result<Counted<TcpStream>>> + Send>>;

/// How many shards `threads` asks for: itself, or for 0 one per core this
/// process may use (`available_parallelism` honours cgroup CPU quotas).
pub fn resolve_threads(threads: usize) -> usize {
    match threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    }
}

/// Serves the connections of `incoming` on `threads` shards (0: one per
/// core). `serve` builds one shard's server from its connections and a
/// graceful-stop signal; it runs on the shard's own thread, so its future
/// need not be `Send`.
///
/// Returns when every shard has finished: after `stop` once their
/// connections have closed, after `abandon` at once, or with the first
/// shard's error.
///
/// # Errors
/// A shard that cannot start, or whose server fails.
pub async fn serve<I, S, F>(
    incoming: I,
    threads: usize,
    serve: S,
    stop: CancellationToken,
    abandon: CancellationToken,
) -> Result<(), ShardError>
where
    I: Stream<Item = io::Result<TcpStream>> + Send + 'static,
    S: Fn(ShardIncoming, CancellationToken) -> F + Clone + Send + 'static,
    F: std::future::Future<Output = Result<(), tonic::transport::Error>>,
{
    let threads = resolve_threads(threads);
    let mut shards = Vec::with_capacity(threads);
    let mut done = Vec::with_capacity(threads);
    for shard in 0..threads {
        let (tx, rx) = mpsc::unbounded_channel::<std::net::TcpStream>();
        let (result_tx, result_rx) = oneshot::channel();
        let open = Arc::new(AtomicUsize::new(0));
        let serve = serve.clone();
        let (stop, abandon, counter) = (stop.clone(), abandon.clone(), open.clone());
        std::thread::Builder::new()
            .name(format!("greet-io-{shard}"))
            .spawn(move || {
                let result = run_shard(shard, rx, counter, serve, stop, abandon);
                let _ = result_tx.send(result);
            })
            .map_err(|source| ShardError::Start { shard, source })?;
        shards.push((tx, open));
        done.push(result_rx);
    }

    let mut incoming = Box::pin(incoming);
    loop {
        let conn = tokio::select! {
            () = stop.cancelled() => break,
            conn = incoming.next() => conn,
        };
        match conn {
            None => break,
            Some(Ok(conn)) => {
                let (tx, open) = shards
                    .iter()
                    .min_by_key(|(_, open)| open.load(Ordering::Relaxed))
                    .expect("at least one shard");
                match conn.into_std() {
                    Ok(conn) => {
                        open.fetch_add(1, Ordering::Relaxed);
                        if tx.send(conn).is_err() {
                            // The shard ended (it failed); its result says why.
                            open.fetch_sub(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "could not hand an accepted connection to a serving thread")
                    }
                }
            }
            Some(Err(e)) => {
                // Out of descriptors and the like: say so, and do not spin.
                warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Accepting has stopped: close the listening socket now, not at exit,
    // so a late client (its view of the registry lags) is refused at once
    // instead of waiting on a connection nobody will ever answer.
    drop(incoming);
    // Closing the channels ends each shard's incoming stream.
    drop(shards);

    let mut first_err = None;
    for (shard, rx) in done.into_iter().enumerate() {
        let result = rx.await.unwrap_or(Err(ShardError::Lost(shard)));
        if let Err(e) = result {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// One shard's thread: a `current_thread` runtime serving what arrives on
/// `rx` until the server returns or `abandon` fires.
fn run_shard<S, F>(
    shard: usize,
    rx: mpsc::UnboundedReceiver<std::net::TcpStream>,
    open: Arc<AtomicUsize>,
    serve: S,
    stop: CancellationToken,
    abandon: CancellationToken,
) -> Result<(), ShardError>
where
    S: Fn(ShardIncoming, CancellationToken) -> F,
    F: std::future::Future<Output = Result<(), tonic::transport::Error>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ShardError::Start { shard, source })?;
    let incoming: ShardIncoming = Box::pin(UnboundedReceiverStream::new(rx).map(move |conn| {
        // Counted from the acceptor's hand-off: the guard counts down even
        // when the conversion fails.
        let open = Open(open.clone());
        Ok(Counted {
            io: TcpStream::from_std(conn)?,
            _open: open,
        })
    }));
    rt.block_on(async move {
        tokio::select! {
            res = serve(incoming, stop) => res.map_err(|source| ShardError::Serve { shard, source }),
            () = abandon.cancelled() => {
                debug!(shard, "abandoning the connections still open");
                Ok(())
            }
        }
    })
}

/// A connection that counts itself among its shard's open connections
/// until it is dropped.
#[derive(Debug)]
pub struct Counted<IO> {
    io: IO,
    _open: Open,
}

/// One open connection of a shard, counted down on drop.
#[derive(Debug)]
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Counted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tonic::transport::server::TcpIncoming;

    use super::*;

    /// Which shard thread took each connection, in order of arrival.
    type Seen = Arc<Mutex<Vec<String>>>;

    /// A shard server that records its thread's name per connection and
    /// holds each connection until the peer closes it.
    fn recorder(
        seen: Seen,
    ) -> impl Fn(
        ShardIncoming,
        CancellationToken,
    )
        -> Pin<Box<dyn std::future::Future<Output = Result<(), tonic::transport::Error>>>>
           + Clone
           + Send
           + 'static {
        move |mut incoming, stop| {
            let seen = seen.clone();
            Box::pin(async move {
                loop {
                    let conn = tokio::select! {
                        () = stop.cancelled() => return Ok(()),
                        conn = incoming.next() => conn,
                    };
                    let Some(Ok(mut conn)) = conn else {
                        return Ok(());
                    };
                    let name = std::thread::current().name().unwrap_or("?").to_owned();
                    seen.lock().unwrap().push(name);
                    tokio::spawn(async move {
                        let mut byte = [0u8; 1];
                        let _ = conn.read(&mut byte).await;
                    });
                }
            })
        }
    }

    async fn wait_for(seen: &Seen, n: usize) -> Vec<String> {
        for _ in 0..200 {
            let v = seen.lock().unwrap().clone();
            if v.len() >= n {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("only {:?} of {n} connections arrived", seen.lock().unwrap());
    }

    #[tokio::test]
    async fn connections_go_to_the_shard_with_the_fewest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let (stop, abandon) = (CancellationToken::new(), CancellationToken::new());
        let server = tokio::spawn(serve(
            TcpIncoming::from(listener),
            2,
            recorder(seen.clone()),
            stop.clone(),
            abandon.clone(),
        ));

        let mut conns = Vec::new();
        for n in 1..=4 {
            conns.push(TcpStream::connect(addr).await.unwrap());
            wait_for(&seen, n).await;
        }
        let v = wait_for(&seen, 4).await;
        let on = |t: &str| v.iter().filter(|x| *x == t).count();
        assert_eq!((on("greet-io-0"), on("greet-io-1")), (2, 2), "{v:?}");

        // Both of shard 1's connections close: the next two go there.
        let first_on_1 = v.iter().position(|x| x == "greet-io-1").unwrap();
        let second_on_1 = v.iter().rposition(|x| x == "greet-io-1").unwrap();
        conns.remove(second_on_1);
        conns.remove(first_on_1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        for n in 5..=6 {
            conns.push(TcpStream::connect(addr).await.unwrap());
            wait_for(&seen, n).await;
        }
        let v = wait_for(&seen, 6).await;
        assert_eq!(&v[4..], ["greet-io-1", "greet-io-1"], "{v:?}");

        stop.cancel();
        ends_within_5s(server, "stops once stopped").await;
    }

    async fn ends_within_5s(server: tokio::task::JoinHandle<Result<(), ShardError>>, why: &str) {
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect(why)
            .expect("serve did not panic")
            .expect("serve ended without an error");
    }

    #[tokio::test]
    async fn abandon_ends_shards_that_would_not_stop() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, abandon) = (CancellationToken::new(), CancellationToken::new());
        // A shard server that ignores the stop signal.
        let stubborn = |_incoming: ShardIncoming, _stop: CancellationToken| {
            std::future::pending::<Result<(), tonic::transport::Error>>()
        };
        let server = tokio::spawn(serve(
            TcpIncoming::from(listener),
            2,
            stubborn,
            stop.clone(),
            abandon.clone(),
        ));
        stop.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !server.is_finished(),
            "a stubborn shard keeps serve waiting"
        );
        let late = TcpStream::connect(addr).await;
        assert!(
            late.as_ref()
                .is_err_and(|e| e.kind() == io::ErrorKind::ConnectionRefused),
            "the listener closes when accepting stops, while shards still run: {late:?}"
        );
        abandon.cancel();
        ends_within_5s(server, "abandon ends it").await;
    }
}
