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
//! Anything that is not plaintext HTTP/2 from its first byte (TLS, say)
//! passes through untouched, as does a header block it cannot decode (h2
//! then reports the error itself).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// h2's default SETTINGS_MAX_FRAME_SIZE, which the re-encoded frames obey.
const MAX_FRAME: usize = 16_384;
/// A header block larger than this is not assembled here (h2's own header
/// list limit is far below it): the connection passes through as it is.
const MAX_BLOCK: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the first request's headers: deciding.
    Sniff,
    /// This client sends invalid authorities: re-encode every header block.
    Rewrite,
    /// Step aside.
    Pass,
}

/// The header block being assembled (HEADERS plus CONTINUATIONs).
#[derive(Debug, Default)]
struct Block {
    stream_id: u32,
    end_stream: bool,
    fragment: Vec<u8>,
    /// The frames as received, forwarded unchanged if the block is not
    /// rewritten.
    raw: Vec<u8>,
}

/// A connection whose requests' `:authority` is made acceptable to h2; see
/// the module docs.
pub struct ListAuthority<IO> {
    io: IO,
    mode: Mode,
    preface_left: usize,
    /// Payload bytes of the current non-header frame still to forward.
    passthrough: usize,
    inbuf: BytesMut,
    out: BytesMut,
    block: Option<Block>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    scratch: Vec<u8>,
}

impl<IO> std::fmt::Debug for ListAuthority<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListAuthority")
            .field("mode", &self.mode)
            .finish()
    }
}

impl<IO> ListAuthority<IO> {
    /// Wraps a freshly accepted connection.
    pub fn new(io: IO) -> Self {
        Self {
            io,
            mode: Mode::Sniff,
            preface_left: PREFACE.len(),
            passthrough: 0,
            inbuf: BytesMut::new(),
            out: BytesMut::new(),
            block: None,
            decoder: Decoder::new(),
            encoder: Encoder::new(),
            scratch: Vec::new(),
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Moves what can be decided from `inbuf` to `out`.
    fn process(&mut self) {
        loop {
            if self.mode == Mode::Pass {
                let rest = self.inbuf.split();
                self.out.extend_from_slice(&rest);
                return;
            }
            if self.preface_left > 0 {
                let done = PREFACE.len() - self.preface_left;
                let n = self.preface_left.min(self.inbuf.len());
                if n == 0 {
                    return;
                }
                if self.inbuf[..n] != PREFACE[done..done + n] {
                    // Not plaintext HTTP/2 (TLS, HTTP/1): not ours to touch.
                    self.mode = Mode::Pass;
                    continue;
                }
                let taken = self.inbuf.split_to(n);
                self.out.extend_from_slice(&taken);
                self.preface_left -= n;
                continue;
            }
            if self.passthrough > 0 {
                let n = self.passthrough.min(self.inbuf.len());
                if n == 0 {
                    return;
                }
                let taken = self.inbuf.split_to(n);
                self.out.extend_from_slice(&taken);
                self.passthrough -= n;
                continue;
            }
            if self.inbuf.len() < FRAME_HEADER {
                return;
            }
            let len = (usize::from(self.inbuf[0]) << 16)
                | (usize::from(self.inbuf[1]) << 8)
                | usize::from(self.inbuf[2]);
            let kind = self.inbuf[3];
            if kind != HEADERS && kind != CONTINUATION {
                let header = self.inbuf.split_to(FRAME_HEADER);
                self.out.extend_from_slice(&header);
                self.passthrough = len;
                continue;
            }
            let assembled = self.block.as_ref().map_or(0, |b| b.raw.len());
            if assembled + FRAME_HEADER + len > MAX_BLOCK {
                self.give_up();
                continue;
            }
            if self.inbuf.len() < FRAME_HEADER + len {
                return;
            }
            let frame = self.inbuf.split_to(FRAME_HEADER + len);
            self.header_frame(&frame);
        }
    }

    /// Forwards what was held back and steps aside for good.
    fn give_up(&mut self) {
        if let Some(block) = self.block.take() {
            self.out.extend_from_slice(&block.raw);
        }
        self.mode = Mode::Pass;
    }

    fn header_frame(&mut self, frame: &[u8]) {
        let (kind, flags) = (frame[3], frame[4]);
        let stream_id = u32::from_be_bytes([frame[5], frame[6], frame[7], frame[8]]) & 0x7fff_ffff;
        let mut payload = &frame[FRAME_HEADER..];
        if kind == HEADERS {
            if flags & PADDED != 0 {
                let Some((&pad, rest)) = payload.split_first() else {
                    return self.malformed(frame);
                };
                let Some(body) = rest.len().checked_sub(usize::from(pad)) else {
                    return self.malformed(frame);
                };
                payload = &rest[..body];
            }
            if flags & PRIORITY != 0 {
                // Stream priority is deprecated (RFC 9113) and h2 ignores
                // it: the re-encoded frame goes without.
                let Some(rest) = payload.get(5..) else {
                    return self.malformed(frame);
                };
                payload = rest;
            }
            if self.block.is_some() {
                return self.malformed(frame);
            }
            self.block = Some(Block {
                stream_id,
                end_stream: flags & END_STREAM != 0,
                ..Block::default()
            });
        }
        let Some(block) = self.block.as_mut() else {
            return self.malformed(frame);
        };
        block.fragment.extend_from_slice(payload);
        block.raw.extend_from_slice(frame);
        if flags & END_HEADERS != 0 {
            if let Some(block) = self.block.take() {
                self.finish(block);
            }
        }
    }

    /// A frame h2 will reject anyway: forward it as it came and step aside.
    fn malformed(&mut self, frame: &[u8]) {
        self.give_up();
        self.out.extend_from_slice(frame);
    }

    fn finish(&mut self, block: Block) {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = match self.decoder.decode(&block.fragment) {
            Ok(h) => h,
            Err(_) => {
                self.out.extend_from_slice(&block.raw);
                self.mode = Mode::Pass;
                return;
            }
        };
        let bad = headers.iter().position(|(n, v)| {
            n == b":authority" && http::uri::Authority::try_from(&v[..]).is_err()
        });
        match (self.mode, bad) {
            (Mode::Sniff, None) => {
                self.out.extend_from_slice(&block.raw);
                self.mode = Mode::Pass;
                return;
            }
            (Mode::Sniff, Some(_)) => {
                tracing::debug!(
                    "client sends an address list as :authority; rewriting its requests"
                );
                self.mode = Mode::Rewrite;
            }
            _ => {}
        }
        if let Some(i) = bad {
            match first_valid(&headers[i].1) {
                Some(first) => headers[i].1 = first,
                None => {
                    headers.remove(i);
                }
            }
        }
        self.scratch.clear();
        let encoded = &mut self.scratch;
        if self
            .encoder
            .encode_into(headers.iter().map(|(n, v)| (&n[..], &v[..])), encoded)
            .is_err()
        {
            self.out.extend_from_slice(&block.raw);
            self.mode = Mode::Pass;
            return;
        }
        let chunks: Vec<&[u8]> = if encoded.is_empty() {
            vec![&[][..]]
        } else {
            encoded.chunks(MAX_FRAME).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            let (kind, mut flags) = if i == 0 {
                (HEADERS, if block.end_stream { END_STREAM } else { 0 })
            } else {
                (CONTINUATION, 0)
            };
            if i == last {
                flags |= END_HEADERS;
            }
            let len = chunk.len();
            self.out.extend_from_slice(&[
                (len >> 16) as u8,
                (len >> 8) as u8,
                len as u8,
                kind,
                flags,
            ]);
            self.out.extend_from_slice(&block.stream_id.to_be_bytes());
            self.out.extend_from_slice(chunk);
        }
    }
}

/// The first comma-separated element of an address list, when it is a
/// valid authority.
fn first_valid(list: &[u8]) -> Option<Vec<u8>> {
    let first = list.split(|b| *b == b',').next()?;
    http::uri::Authority::try_from(first)
        .ok()
        .map(|a| a.as_str().as_bytes().to_vec())
}

impl<IO: AsyncRead + Unpin> AsyncRead for ListAuthority<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.out.is_empty() {
                let n = buf.remaining().min(this.out.len());
                buf.put_slice(&this.out[..n]);
                this.out.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.mode == Mode::Pass && this.inbuf.is_empty() {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            this.process();
            if !this.out.is_empty() {
                continue;
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                // End of input: whatever is held back goes as it is.
                this.give_up();
                let rest = this.inbuf.split();
                this.out.extend_from_slice(&rest);
                if this.out.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            this.inbuf.extend_from_slice(rb.filled());
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
    use tokio::io::AsyncReadExt;

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
}
