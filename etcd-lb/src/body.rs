//! Request and response bodies the balancer holds on to: a request kept
//! for replay on another endpoint, and a retryable call's response read to
//! its end before it is handed on.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use etcd_lb_registry::grpc_status::code_of;
use http::HeaderMap;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, StreamBody};
use tonic::body::Body;
use tonic::Code;

use crate::balance::BoxError;

/// Requests up to this size are kept for a retry (linkerd's `ReplayBody`
/// caps at 64 KiB too); larger ones are sent once.
const REPLAY_CAP: usize = 64 * 1024;

/// A retryable call's response is read whole up to this size (tonic's
/// default limit on one decoded message); past it, it streams through and
/// is no longer retried.
pub(crate) const RESPONSE_CAP: usize = 4 * 1024 * 1024;

/// How long a response whose first message is whole may take to end
/// before it is taken for a stream and handed on.
const STREAM_GRACE: std::time::Duration = std::time::Duration::from_millis(20);

/// Takes a request body whole when it is already complete and within
/// [`REPLAY_CAP`] (a unary or server-streaming call: tonic encodes its one
/// message at once), so it can be replayed; otherwise hands back a body
/// that yields what was read and then the rest as it comes, without waiting
/// for a request stream the caller keeps open.
///
/// The frames read are kept in a `Vec` only from the second one on: a
/// unary call's body is one frame, and that `Vec`'s allocation showed on
/// every call (`bench/instructions.sh`).
pub(crate) fn replayable(mut body: Body) -> Result<Result<bytes::Bytes, Body>, BoxError> {
    use futures::{FutureExt, StreamExt};
    let mut first: Option<Frame<Bytes>> = None;
    let mut more: Vec<Frame<bytes::Bytes>> = Vec::new();
    let mut len = 0;
    loop {
        match body.frame().now_or_never() {
            Some(Some(frame)) => {
                let frame = frame.map_err(BoxError::from)?;
                let is_data = frame.is_data();
                if let Some(d) = frame.data_ref() {
                    len += d.len();
                }
                if first.is_none() {
                    first = Some(frame);
                } else {
                    more.push(frame);
                }
                if !is_data || len > REPLAY_CAP {
                    break;
                }
            }
            Some(None) => {
                let mut data = first
                    .into_iter()
                    .chain(more)
                    .filter_map(|f| f.into_data().ok());
                return Ok(Ok(match (data.next(), data.next()) {
                    (None, _) => bytes::Bytes::new(),
                    (Some(one), None) => one,
                    (Some(a), Some(b)) => {
                        let mut all = bytes::BytesMut::with_capacity(len);
                        all.extend_from_slice(&a);
                        all.extend_from_slice(&b);
                        data.for_each(|d| all.extend_from_slice(&d));
                        all.freeze()
                    }
                }));
            }
            // Not ready: the caller is still writing its request stream.
            None => break,
        }
    }
    let frames = first.into_iter().chain(more);
    let read = futures::stream::iter(frames.map(Ok::<_, tonic::Status>));
    let rest = http_body_util::BodyStream::new(body);
    Ok(Err(Body::new(StreamBody::new(read.chain(rest)))))
}

/// A request body kept for replay: its bytes in one frame.
///
/// Its size is not announced as exact, so hyper adds no `content-length`
/// header: a tonic request carries none (its body is a stream), grpc-go
/// sends none, and the extra header cost an allocation and an HPACK entry
/// on every call, on both sides.
#[derive(Debug)]
pub(crate) struct Replay(pub(crate) Option<Bytes>);

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.0.take().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = SizeHint::new();
        hint.set_lower(self.0.as_ref().map_or(0, |d| d.len() as u64));
        hint
    }
}

/// Reads a retryable call's response to its end before handing it on. gRPC
/// commits a call when its response headers arrive; this balancer commits
/// at the trailers, so a server killed between the two (its response cut
/// off mid-body) costs a retry, not a failed call. Also returns the
/// `grpc-status` from the trailers.
///
/// Only a response of one message within `cap` bytes is read whole: at a
/// second gRPC message (a server-streaming method listed as retryable),
/// past `cap`, or when the answer has not ended 20 ms after its first
/// message is whole, it is handed on at once, what was read and the rest
/// as it comes, and committed (no retry, [`Read::Streaming`]). So a stream
/// reaches its caller as it flows, and an endless one costs bounded
/// memory. List as retryable (idempotent) the unary methods that are safe
/// to run twice; a server-streaming one gains nothing from it.
///
/// Frame by frame rather than `BodyExt::collect`: a unary answer is one
/// data frame and the trailers, kept as they came (no copy, no trailer
/// clone), which cut about 1,500 instructions (2 %) from every retryable call
/// (`bench/instructions.sh`).
pub(crate) async fn read_whole(resp: http::Response<Body>, cap: usize) -> Result<Read, BoxError> {
    let (parts, mut body) = resp.into_parts();
    let mut data = Data::None;
    let mut trailers = None;
    let mut len = 0;
    loop {
        // Once the first message is whole, the trailers of a unary answer
        // follow at once; a stream's next message may not come for long.
        let complete = data.first_message_end().is_some_and(|end| len >= end);
        let frame = if complete {
            match tokio::time::timeout(STREAM_GRACE, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => break,
            }
        } else {
            body.frame().await
        };
        let Some(frame) = frame else {
            drop(body);
            let code = trailers.as_ref().and_then(code_of);
            let whole = Whole {
                data: data.into_bytes(),
                trailers,
            };
            return Ok(Read::Whole(
                http::Response::from_parts(parts, Body::new(whole)),
                code,
            ));
        };
        match frame?.into_data() {
            Ok(chunk) => {
                len += chunk.len();
                data.push(chunk);
                if len > cap || data.first_message_end().is_some_and(|end| len > end) {
                    break;
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    // A stream (or past the cap): what was read, then the rest as it comes.
    let read = futures::stream::iter(
        data.into_bytes()
            .map(|b| Ok::<_, tonic::Status>(Frame::data(b))),
    );
    let rest = http_body_util::BodyStream::new(body);
    let body = Body::new(StreamBody::new(futures::StreamExt::chain(read, rest)));
    Ok(Read::Streaming(http::Response::from_parts(parts, body)))
}

/// What [`read_whole`] made of a response.
pub(crate) enum Read {
    /// Read to its end: the response and the code in its trailers.
    Whole(http::Response<Body>, Option<Code>),
    /// More than one message, or past the cap: streaming through.
    Streaming(http::Response<Body>),
}

/// A response body's data, read so far.
enum Data {
    None,
    One(Bytes),
    Many(BytesMut),
}

impl Data {
    fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        *self = match std::mem::replace(self, Data::None) {
            Data::None => Data::One(chunk),
            Data::One(first) => {
                let mut all = BytesMut::with_capacity(first.len() + chunk.len());
                all.extend_from_slice(&first);
                all.extend_from_slice(&chunk);
                Data::Many(all)
            }
            Data::Many(mut all) => {
                all.extend_from_slice(&chunk);
                Data::Many(all)
            }
        };
    }

    /// Where the first gRPC message ends (5-byte prefix: compressed flag,
    /// big-endian length), once its prefix is here.
    fn first_message_end(&self) -> Option<usize> {
        let head = match self {
            Data::None => return None,
            Data::One(b) => &b[..],
            Data::Many(b) => &b[..],
        };
        let len = head.get(1..5)?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        Some(5 + len as usize)
    }

    fn into_bytes(self) -> Option<Bytes> {
        match self {
            Data::None => None,
            Data::One(b) => Some(b),
            Data::Many(b) => Some(b.freeze()),
        }
    }
}

/// A response read whole: its data in one frame, then its trailers.
#[derive(Debug)]
struct Whole {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl http_body::Body for Whole {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(match (self.data.take(), self.trailers.take()) {
            (Some(data), trailers) => {
                self.trailers = trailers;
                Some(Ok(Frame::data(data)))
            }
            (None, Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            (None, None) => None,
        })
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;

    fn response(frames: Vec<Frame<Bytes>>) -> http::Response<Body> {
        let frames = frames.into_iter().map(Ok::<_, std::convert::Infallible>);
        http::Response::new(Body::new(StreamBody::new(futures::stream::iter(frames))))
    }

    fn trailers(code: &str) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", code.parse().unwrap());
        t
    }

    #[tokio::test]
    async fn a_whole_response_keeps_its_data_and_trailers_in_order() {
        let resp = response(vec![
            Frame::data(Bytes::from_static(b"ab")),
            Frame::data(Bytes::new()),
            Frame::data(Bytes::from_static(b"cd")),
            Frame::trailers(trailers("14")),
        ]);
        let Read::Whole(resp, code) = read_whole(resp, RESPONSE_CAP).await.unwrap() else {
            panic!("read whole");
        };
        assert_eq!(code, Some(Code::Unavailable));
        let mut body = resp.into_body();
        assert_eq!(body.size_hint().exact(), Some(4));
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), Bytes::from_static(b"abcd"));
        let second = body.frame().await.unwrap().unwrap();
        let t = second.into_trailers().unwrap();
        assert_eq!(t.get("grpc-status").unwrap(), "14");
        assert!(body.frame().await.is_none());
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn one_chunk_is_handed_on_without_a_copy() {
        let chunk = Bytes::from(vec![7u8; 100]);
        let ptr = chunk.as_ptr();
        let resp = response(vec![Frame::data(chunk), Frame::trailers(trailers("0"))]);
        let Read::Whole(resp, code) = read_whole(resp, RESPONSE_CAP).await.unwrap() else {
            panic!("read whole");
        };
        assert_eq!(code, Some(Code::Ok));
        let data = resp.into_body().frame().await.unwrap().unwrap();
        assert_eq!(data.into_data().unwrap().as_ptr(), ptr);
    }

    #[tokio::test]
    async fn a_replay_body_is_its_bytes_once_with_no_exact_size() {
        let mut body = Replay(Some(Bytes::from_static(b"hello")));
        assert!(!body.is_end_stream());
        assert_eq!(body.size_hint().exact(), None, "no content-length");
        assert_eq!(body.size_hint().lower(), 5);
        let data = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data, Bytes::from_static(b"hello"));
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_body_of_many_frames_is_replayed_whole_and_an_open_one_as_it_comes() {
        let frames = vec![
            Ok::<_, tonic::Status>(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"cd"))),
        ];
        let whole = Body::new(StreamBody::new(futures::stream::iter(frames)));
        assert_eq!(
            replayable(whole).unwrap().unwrap(),
            Bytes::from_static(b"abcd")
        );

        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, tonic::Status>>(4);
        tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
            .await
            .unwrap();
        let open = Body::new(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ));
        let Err(mut open) = replayable(open).unwrap() else {
            panic!("a stream still open is not replayable");
        };
        let data = open.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data, Bytes::from_static(b"x"), "what was read comes first");
        tx.send(Ok(Frame::data(Bytes::from_static(b"y"))))
            .await
            .unwrap();
        drop(tx);
        let data = open.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(data, Bytes::from_static(b"y"), "then the rest");
        assert!(open.frame().await.is_none());
    }

    /// A gRPC message: prefix and payload.
    fn message(payload: &[u8]) -> Bytes {
        let mut m = vec![0u8];
        m.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        m.extend_from_slice(payload);
        Bytes::from(m)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_waits_after_its_first_message_streams_through() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, tonic::Status>>(4);
        tx.send(Ok(Frame::data(message(b"serving")))).await.unwrap();
        let resp = http::Response::new(Body::new(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )));
        let Read::Streaming(resp) = read_whole(resp, RESPONSE_CAP).await.unwrap() else {
            panic!("a watch is not read whole");
        };
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, message(b"serving"));
        drop(tx);
    }

    #[tokio::test]
    async fn a_second_message_streams_through_at_once() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, tonic::Status>>(4);
        tx.send(Ok(Frame::data(message(b"one")))).await.unwrap();
        tx.send(Ok(Frame::data(message(b"two")))).await.unwrap();
        // The stream stays open: the caller must get both messages now.
        let resp = http::Response::new(Body::new(StreamBody::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )));
        let Read::Streaming(resp) = read_whole(resp, RESPONSE_CAP).await.unwrap() else {
            panic!("a stream is not read whole");
        };
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(
            &first[..],
            &[&message(b"one")[..], &message(b"two")[..]].concat()[..]
        );
        tx.send(Ok(Frame::data(message(b"three")))).await.unwrap();
        let next = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(next, message(b"three"));
        drop(tx);
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn one_message_in_pieces_is_read_whole_and_past_the_cap_streams() {
        let m = message(&[7u8; 100]);
        let resp = response(vec![
            Frame::data(m.slice(..3)),
            Frame::data(m.slice(3..50)),
            Frame::data(m.slice(50..)),
            Frame::trailers(trailers("0")),
        ]);
        let Read::Whole(resp, code) = read_whole(resp, RESPONSE_CAP).await.unwrap() else {
            panic!("one message is read whole");
        };
        assert_eq!(code, Some(Code::Ok));
        let data = resp.into_body().frame().await.unwrap().unwrap();
        assert_eq!(data.into_data().unwrap(), m);

        let resp = response(vec![Frame::data(m.clone()), Frame::trailers(trailers("0"))]);
        let Read::Streaming(resp) = read_whole(resp, 64).await.unwrap() else {
            panic!("past the cap it streams");
        };
        let mut body = resp.into_body();
        assert_eq!(body.frame().await.unwrap().unwrap().into_data().unwrap(), m);
        assert!(body.frame().await.unwrap().unwrap().is_trailers());
    }

    #[tokio::test]
    async fn no_trailers_no_data_is_an_empty_body() {
        let Read::Whole(resp, code) = read_whole(response(vec![]), RESPONSE_CAP).await.unwrap()
        else {
            panic!("read whole");
        };
        assert_eq!(code, None);
        let mut body = resp.into_body();
        assert!(body.is_end_stream());
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_broken_body_is_an_error() {
        let frames: Vec<Result<Frame<Bytes>, tonic::Status>> = vec![
            Ok(Frame::data(Bytes::from_static(b"x"))),
            Err(tonic::Status::unavailable("reset")),
        ];
        let resp = http::Response::new(Body::new(StreamBody::new(futures::stream::iter(frames))));
        assert!(read_whole(resp, RESPONSE_CAP).await.is_err());
    }
}
