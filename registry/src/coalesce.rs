//! Coalesces a connection's writes: one `write` for what many streams
//! sent instead of one per stream. Used on both ends of the gRPC
//! connections: greet-server's accepted connections (responses) and the
//! balancer's own connections in etcd-lb (requests).
//!
//! Why, on the server: under h2load (`-c 4 -m 16`, 50,000 unary calls,
//! `strace -c`) hyper's HTTP/2 server made 0.65 `writev`s per call against
//! about 10 calls per read. Each stream's handler is its own task; when one
//! finishes it wakes the connection task, which runs next, and h2 writes
//! and flushes that single response; the kernel's loopback send path was
//! 30 % of the server's CPU.
//!
//! Why, on the client: with the calls on one runtime worker, a call's task
//! wakes the connection task, which runs next (the worker's LIFO slot) and
//! writes that one request. An original Go server then woke its reader
//! 0.54-0.58 times per call for greet-client (0.38-0.40 with this layer;
//! 0.24 for grpc-go's client), and over 3 Go servers at concurrency 16
//! they spent 54.7-55.3 µs of CPU per call for it (44.8-47.1 with this
//! layer; 37.5-39.8 for grpc-go's client). Measured by alternating the two
//! builds (`git show bfe6b6d:docs/interop-earlier.md`).
//!
//! [`Coalesce`] keeps what h2 writes in a buffer, and on the first flush of
//! a batch wakes its own task and returns pending: the task goes to the
//! back of its worker's run queue, the tasks already queued run first, and
//! the next flush writes everything they sent in one go. A lone call pays
//! one extra trip through the scheduler, not a timer or a syscall.
//!
//! It used to yield with [`tokio::task::yield_now`], which defers the wake
//! until the worker has polled for I/O; but the connection task was not
//! queued meanwhile, so the next call's send woke it into the LIFO slot and
//! it flushed after one more request. Woken by itself, the task is already
//! queued and later wakes do not move it. In an A/B of the two builds
//! (2026-12-04, 18:57-19:16 UTC): an original Go server read 0.23-0.25
//! times per call from greet-client at concurrency 16 (0.36-0.39 before;
//! grpc-go's client 0.24) and 0.064-0.066 at 64 (0.12-0.145; grpc-go
//! 0.07); greet-client over 3 greet-servers made 32.9-33.7k calls/s at 16
//! against 28.3-29.5k, and greet-server 111.7-114.9k req/s under h2load
//! against 104.7-105.0k.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Past this much buffered, writes go out without waiting for a flush.
const MAX_BUFFERED: usize = 64 * 1024;

/// A connection whose writes are buffered until a flush that has yielded
/// once (see the module docs).
pub struct Coalesce<IO> {
    io: IO,
    buf: BytesMut,
    /// The current batch has yielded; the next flush writes it.
    yielded: bool,
}

impl<IO> std::fmt::Debug for Coalesce<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalesce")
            .field("buffered", &self.buf.len())
            .finish()
    }
}

impl<IO> Coalesce<IO> {
    /// Wraps `io`.
    pub fn new(io: IO) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            yielded: false,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncWrite + Unpin> Coalesce<IO> {
    /// Writes out the whole buffer.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.buf.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.buf.advance(n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Coalesce<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalesce<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() >= MAX_BUFFERED {
            ready!(this.poll_drain(cx))?;
        }
        if this.buf.is_empty() && data.len() >= MAX_BUFFERED {
            return Pin::new(&mut this.io).poll_write(cx, data);
        }
        this.buf.extend_from_slice(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.buf.len() >= MAX_BUFFERED {
            ready!(this.poll_drain(cx))?;
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.buf.is_empty() && total >= MAX_BUFFERED {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.buf.extend_from_slice(b);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.buf.is_empty() && !this.yielded {
            // A task that wakes itself goes to the back of its worker's
            // run queue. Polled again, h2 has written what the tasks
            // ahead of it sent before calling this flush again.
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        this.yielded = false;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesce<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    use super::*;

    /// A connection that only counts the writes it is given.
    struct CountWrites(Arc<AtomicUsize>);

    impl AsyncWrite for CountWrites {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The case the layer exists for, shaped like h2: a connection task
    /// that, each time it is polled, writes every frame the streams have
    /// queued and then flushes; and many call tasks on the same worker,
    /// each of which queues one frame and wakes it. Without the layer
    /// every call is its own write; with tokio's `yield_now` (deferred
    /// wake) about every second call was, because the next call's wake
    /// put the connection task in the worker's LIFO slot. Woken by itself,
    /// the connection task runs after the calls already queued. (Checked
    /// against both: 32 writes without the layer, 16 with `yield_now`.)
    #[test]
    fn many_calls_on_one_worker_share_a_write() {
        const CALLS: usize = 32;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let writes = Arc::new(AtomicUsize::new(0));
        let frames = rt.block_on({
            let writes = writes.clone();
            async move {
                // Spawned from a worker task, so the wakes below are the
                // worker's own (the LIFO slot is in play), as in a client.
                tokio::spawn(async move {
                    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
                    let conn = tokio::spawn(async move {
                        let mut w = Coalesce::new(CountWrites(writes));
                        let mut frames = 0;
                        std::future::poll_fn(|cx| loop {
                            let mut closed = false;
                            loop {
                                match rx.poll_recv(cx) {
                                    Poll::Ready(Some(frame)) => {
                                        frames += 1;
                                        let r = Pin::new(&mut w).poll_write(cx, &frame);
                                        assert!(matches!(r, Poll::Ready(Ok(_))));
                                    }
                                    Poll::Ready(None) => {
                                        closed = true;
                                        break;
                                    }
                                    Poll::Pending => break,
                                }
                            }
                            ready!(Pin::new(&mut w).poll_flush(cx)).unwrap();
                            if closed {
                                return Poll::Ready(frames);
                            }
                            if rx.is_empty() {
                                return Poll::Pending;
                            }
                        })
                        .await
                    });
                    // Every call waits for its turn, as calls wait for a
                    // response; one task then releases them all, as one
                    // read delivers many responses.
                    let parked = Arc::new(AtomicUsize::new(0));
                    let go: Vec<_> = (0..CALLS)
                        .map(|i| {
                            let (go, turn) = tokio::sync::oneshot::channel::<()>();
                            let (tx, parked) = (tx.clone(), parked.clone());
                            // Not joined: a waiting join would be woken
                            // into the LIFO slot ahead of the connection.
                            tokio::spawn(async move {
                                parked.fetch_add(1, Ordering::Relaxed);
                                turn.await.unwrap();
                                tx.send(vec![i as u8; 100]).unwrap();
                            });
                            go
                        })
                        .collect();
                    // Until every call and the idle connection have run.
                    while parked.load(Ordering::Relaxed) < CALLS {
                        tokio::task::yield_now().await;
                    }
                    tokio::task::yield_now().await;
                    for go in go {
                        go.send(()).unwrap();
                    }
                    drop(tx);
                    conn.await.unwrap()
                })
                .await
                .unwrap()
            }
        });
        assert_eq!(frames, CALLS);
        let writes = writes.load(Ordering::Relaxed);
        assert!(
            writes <= 3,
            "{CALLS} calls queued on one worker took {writes} writes"
        );
    }

    #[tokio::test]
    async fn writes_arrive_whole_and_in_order_after_a_flush() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut w = Coalesce::new(a);
        w.write_all(b"one ").await.unwrap();
        w.write_all(&vec![b'x'; MAX_BUFFERED + 10]).await.unwrap();
        w.write_all(b" two").await.unwrap();
        w.flush().await.unwrap();
        let mut got = vec![0u8; 4 + MAX_BUFFERED + 10 + 4];
        b.read_exact(&mut got).await.unwrap();
        assert!(got.starts_with(b"one x") && got.ends_with(b"x two"));
        w.write_all(b"end").await.unwrap();
        w.shutdown().await.unwrap();
        let mut rest = Vec::new();
        b.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"end");
    }
}
