//! Lets gRPC clients that send an address list as `:authority` reach the
//! server.
//!
//! grpcio (gRPC's C core, under Python, Ruby, PHP and C++) dialing the
//! standard multi-address target `ipv4:10.0.0.1:3000,10.0.0.2:3000` sends
//! that whole list as each request's `:authority`. RFC 3986 allows no second
//! `:` outside brackets, so the `http` crate rejects it, and h2 resets every
//! such request (`RST_STREAM` with `PROTOCOL_ERROR`) before tonic sees it;
//! grpc-go's server accepts it. h2's maintainers declined to relax that
//! check (hyperium/h2#525), so the fix lives here, below h2.
//!
//! [`ListAuthority`] wraps a connection's read side. It reads the
//! connection's first request headers:
//! - their `:authority` is valid (every client but those): it steps aside,
//!   and the rest of the connection passes through untouched, with no
//!   per-request cost;
//! - it is not: every request's header block on that connection is decoded
//!   and re-encoded (HPACK, with an encoder of its own, so h2's decoder
//!   stays consistent), with an invalid `:authority` replaced by its first
//!   comma-separated element when that is a valid authority, else dropped
//!   (an HTTP/2 request may omit it).
//!
//! The client is untrusted and this layer runs before h2's own checks, so
//! it holds and produces no more than h2 would accept (frame size, header
//! list size, HPACK table size), steps aside on anything odd before it has
//! rewritten anything, and closes the connection on anything odd after: see
//! [`rewriter`] for the rules and their limits. Anything that is not
//! plaintext HTTP/2 from its first byte (TLS, say) passes through untouched.
//! `reliability/fuzz` checks it against h2's own decoder.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Buf;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub mod rewriter;

use rewriter::Rewriter;

/// A connection whose requests' `:authority` is made acceptable to h2; see
/// the module docs.
pub struct ListAuthority<IO> {
    io: IO,
    rewriter: Rewriter,
}

impl<IO> std::fmt::Debug for ListAuthority<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListAuthority")
            .field("rewriter", &self.rewriter)
            .finish()
    }
}

impl<IO> ListAuthority<IO> {
    /// Wraps a freshly accepted connection.
    pub fn new(io: IO) -> Self {
        Self {
            io,
            rewriter: Rewriter::new(),
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ListAuthority<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let out = this.rewriter.output();
            if !out.is_empty() {
                let n = buf.remaining().min(out.len());
                buf.put_slice(&out[..n]);
                out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if !this.rewriter.wants_input() {
                // Closed: h2 has read the block it refuses; end of input.
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.is_transparent() {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.rewriter.end();
                if this.rewriter.output().is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.rewriter.feed(rb.filled());
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ListAuthority<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
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
}

impl<IO: tonic::transport::server::Connected> tonic::transport::server::Connected
    for ListAuthority<IO>
{
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use loona_hpack::{Decoder, Encoder};
    use tokio::io::AsyncReadExt;

    use super::rewriter::{
        Mode, CONTINUATION, END_HEADERS, END_STREAM, HEADERS, MAX_FRAME, PADDED, PREFACE, PRIORITY,
    };
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn request(enc: &mut Encoder<'_>, authority: &[u8]) -> Vec<u8> {
        enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/Greet/Morning"),
            (b":authority", authority),
            (b"content-type", b"application/grpc"),
        ])
    }

    /// Feeds `input` through the wrapper in small pieces; returns the output.
    async fn through(input: Vec<u8>) -> Vec<u8> {
        let (mut tx, rx) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in input.chunks(7) {
                tx.write_all(piece).await.unwrap();
            }
        });
        let mut out = Vec::new();
        ListAuthority::new(rx).read_to_end(&mut out).await.unwrap();
        writer.await.unwrap();
        out
    }

    /// Splits a byte stream after the preface into frames.
    fn frames(mut bytes: &[u8]) -> Vec<(u8, u8, Vec<u8>)> {
        bytes = &bytes[PREFACE.len()..];
        let mut v = Vec::new();
        while !bytes.is_empty() {
            let len = (usize::from(bytes[0]) << 16)
                | (usize::from(bytes[1]) << 8)
                | usize::from(bytes[2]);
            v.push((bytes[3], bytes[4], bytes[9..9 + len].to_vec()));
            bytes = &bytes[9 + len..];
        }
        v
    }

    fn authorities(frames: &[(u8, u8, Vec<u8>)]) -> Vec<Option<String>> {
        let mut dec = Decoder::new();
        frames
            .iter()
            .filter(|f| f.0 == HEADERS)
            .map(|f| {
                dec.decode(&f.2)
                    .unwrap()
                    .into_iter()
                    .find(|(n, _)| n == b":authority")
                    .map(|(_, v)| String::from_utf8(v).unwrap())
            })
            .collect()
    }

    #[tokio::test]
    async fn a_valid_first_authority_passes_the_connection_through_unchanged() {
        let mut enc = Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[])); // SETTINGS
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &request(&mut enc, b"127.0.0.1:3000"),
        ));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\x05hello"));
        input.extend(frame(HEADERS, END_HEADERS, 3, &request(&mut enc, b"a,b:1")));
        assert_eq!(through(input.clone()).await, input);
    }

    #[tokio::test]
    async fn an_address_list_is_replaced_by_its_first_element_on_every_request() {
        let mut enc = Encoder::new();
        let list = b"127.0.0.1:3000,127.0.0.1:3001,127.0.0.1:3002";
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        // Padded and with a priority on the first request, split over a
        // CONTINUATION on the second: both are reassembled.
        let first = request(&mut enc, list);
        let mut padded = vec![3u8, 0, 0, 0, 0, 16];
        padded.extend_from_slice(&first);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, END_HEADERS | PADDED | PRIORITY, 1, &padded));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
        let second = request(&mut enc, list);
        let (a, b) = second.split_at(4);
        input.extend(frame(HEADERS, END_STREAM, 3, a));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, b));
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            5,
            &request(&mut enc, b"[::1,bad"),
        ));

        let out = frames(&through(input).await);
        let kinds: Vec<u8> = out.iter().map(|f| f.0).collect();
        assert_eq!(kinds, [0x4, HEADERS, 0x0, HEADERS, HEADERS]);
        assert_eq!(out[1].1, END_HEADERS, "padding and priority dropped");
        assert_eq!(out[3].1, END_HEADERS | END_STREAM, "END_STREAM kept");
        assert_eq!(
            authorities(&out),
            [
                Some("127.0.0.1:3000".into()),
                Some("127.0.0.1:3000".into()),
                None
            ]
        );
    }

    #[tokio::test]
    async fn not_http2_passes_through() {
        let input = b"\x16\x03\x01\x02\x00 a TLS hello, say".to_vec();
        assert_eq!(through(input.clone()).await, input);
    }

    /// A block of `refs` one-byte references to a fresh 4000-byte entry.
    fn reference_bomb(enc: &mut Encoder<'_>, authority: &[u8], refs: usize) -> Vec<u8> {
        let mut block = request(enc, authority);
        block.push(0x40);
        block.push(6);
        block.extend_from_slice(b"x-bomb");
        block.extend_from_slice(&[0x7f, 0xa1, 0x1e]); // length 4000
        block.extend(std::iter::repeat_n(b'a', 4000));
        block.extend(std::iter::repeat_n(0x80 | 62, refs));
        block
    }

    /// Runs bytes through a rewriter in one go; returns it and its output.
    fn rewrite(input: &[u8]) -> (Rewriter, Vec<u8>) {
        let mut rw = Rewriter::new();
        rw.feed(input);
        let out = rw.output().split().to_vec();
        (rw, out)
    }

    /// The closing block: HEADERS with a table-size update h2 refuses.
    fn is_close(f: &(u8, u8, Vec<u8>)) -> bool {
        f.0 == HEADERS && f.2 == [0x3f, 0xe2, 0x1f]
    }

    #[test]
    fn a_first_block_over_the_limits_is_left_to_h2_untouched() {
        // One frame of references (decodes to ~48 MB): over the header list
        // limit, so h2 answers it; the bytes go as they came.
        let mut enc = Encoder::new();
        let mut input = PREFACE.to_vec();
        let block = reference_bomb(&mut enc, b"a:1,b:2", 12_000);
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let (rw, out) = rewrite(&input);
        assert_eq!(rw.mode(), Mode::Pass);
        assert_eq!(out, input);

        // A frame over the frame size and a block over the list size are
        // not waited for: stepped aside at their first frame header.
        for len in [MAX_FRAME + 1, 1 << 20] {
            let mut input = PREFACE.to_vec();
            input.extend(&frame(HEADERS, 0, 1, &vec![0x80 | 62; len])[..100]);
            let (rw, out) = rewrite(&input);
            assert_eq!(rw.mode(), Mode::Pass, "{len}");
            assert_eq!(out, input);
        }
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &vec![0x80 | 2; 16_000]));
        input.extend(&frame(CONTINUATION, 0, 1, &vec![0x80 | 2; 1000])[..20]);
        let (rw, out) = rewrite(&input);
        assert_eq!(rw.mode(), Mode::Pass);
        assert_eq!(out, input);
        assert_eq!(rw.buffered(), 0);

        // A flood of empty CONTINUATIONs is not held either.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &request(&mut enc, b"a:1,b:2")));
        for _ in 0..10_000 {
            input.extend(frame(CONTINUATION, 0, 1, &[]));
        }
        let (rw, out) = rewrite(&input);
        assert_eq!((rw.mode(), out), (Mode::Pass, input));
    }

    #[test]
    fn a_table_size_update_above_4096_is_left_to_h2_then_closes_once_rewriting() {
        let mut input = PREFACE.to_vec();
        // Size update to 1,000,000 on the first block: h2's to refuse.
        let mut block = vec![0x3f, 0xa1, 0x84, 0x3d];
        block.extend(request(&mut Encoder::new(), b"a:1,b:2"));
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let (rw, out) = rewrite(&input);
        assert_eq!((rw.mode(), out), (Mode::Pass, input));

        // After an address list: the connection closes.
        let mut enc = Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &request(&mut enc, b"a:1,b:2"),
        ));
        let mut block = vec![0x3f, 0xa1, 0x84, 0x3d];
        block.extend(request(&mut enc, b"a:1,b:2"));
        input.extend(frame(HEADERS, END_HEADERS, 3, &block));
        input.extend(frame(0x0, END_STREAM, 3, b"after"));
        let (rw, out) = rewrite(&input);
        assert_eq!(rw.mode(), Mode::Closed);
        let out = frames(&out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(is_close(&out[1]), "{out:?}");
    }

    #[test]
    fn a_bomb_after_an_address_list_closes_the_connection() {
        let mut enc = Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &request(&mut enc, b"a:1,b:2"),
        ));
        let block = reference_bomb(&mut enc, b"a:1,b:2", 12_000);
        input.extend(frame(HEADERS, END_HEADERS, 3, &block));
        let (rw, out) = rewrite(&input);
        assert_eq!(rw.mode(), Mode::Closed);
        let out = frames(&out);
        assert_eq!(authorities(&out[..1]), [Some("a:1".into())]);
        assert!(is_close(&out[1]), "{out:?}");
    }

    #[test]
    fn a_frame_inside_a_header_block_is_never_reordered() {
        let mut enc = Encoder::new();
        let block = request(&mut enc, b"a:1,b:2");
        let (a, b) = block.split_at(4);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, a));
        input.extend(frame(0x0, 0, 1, b"data"));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        // Deciding: the client's bytes, in the client's order.
        let (rw, out) = rewrite(&input);
        assert_eq!((rw.mode(), out), (Mode::Pass, input.clone()));
        // Rewriting: closed.
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &request(&mut enc, b"a:1,b:2"),
        ));
        let block = request(&mut enc, b"a:1,b:2");
        let (a, b) = block.split_at(4);
        input.extend(frame(HEADERS, 0, 3, a));
        input.extend(frame(0x0, 0, 3, b"data"));
        input.extend(frame(CONTINUATION, END_HEADERS, 3, b));
        let (rw, out) = rewrite(&input);
        assert_eq!(rw.mode(), Mode::Closed);
        assert!(is_close(&frames(&out)[1]));
    }

    #[test]
    fn a_push_promise_is_left_to_h2_or_closes() {
        // h2 decodes its header block (then refuses it from a client).
        let mut enc = Encoder::new();
        let promise = frame(0x5, END_HEADERS, 1, &[0, 0, 0, 2, 0x40, 1, b'x', 1, b'y']);
        let mut input = PREFACE.to_vec();
        input.extend(&promise);
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &request(&mut enc, b"a:1,b:2"),
        ));
        let (rw, out) = rewrite(&input);
        assert_eq!((rw.mode(), out), (Mode::Pass, input));

        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &request(&mut enc, b"a:1,b:2"),
        ));
        input.extend(&promise);
        let (rw, out) = rewrite(&input);
        assert_eq!(rw.mode(), Mode::Closed);
        assert!(is_close(&frames(&out)[1]));
    }

    #[tokio::test]
    async fn a_closed_connection_reads_as_ended() {
        let mut enc = Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &request(&mut enc, b"a:1,b:2"),
        ));
        input.extend(frame(HEADERS, END_HEADERS, 3, &[0x80 | 70]));
        input.extend(frame(0x0, 0, 3, b"never seen"));
        let out = frames(&through(input).await);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(is_close(&out[1]));
    }
}
