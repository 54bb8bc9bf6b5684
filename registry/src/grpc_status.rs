//! Where a call's gRPC status is, for code that measures calls without
//! owning them (the server's and the balancer's metrics).
//!
//! gRPC puts the status in the response headers of a trailers-only answer
//! (how a server refuses a call) and otherwise in the trailers at the end of
//! the body. [`OnStatus`] wraps a response body and reports the status once,
//! when it passes: a body that errors is `Internal`, one that ends without a
//! status `Unknown` (what a gRPC client reads from either), and one dropped
//! before its end (the peer went away, or the caller stopped reading)
//! `Cancelled`, as grpc-go reports such calls.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};
use tonic::Code;

/// `grpc-status`, as a name: looking up by a string parses it first, on
/// every call of every client.
static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The `grpc-status` in `headers`, if there is one.
pub fn code_of(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get(&GRPC_STATUS)
        .map(|v| Code::from_bytes(v.as_bytes()))
}

/// The name grpc-go gives a code (`codes.Code.String()`): what `grpc_code`
/// holds in grpc-ecosystem's metrics, so dashboards written for those work.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// What receives a call's status: a metrics record, usually.
pub trait Report {
    /// Called once, with the call's status.
    fn report(self, code: Code);
}

/// A response body that reports the call's status exactly once (see the
/// module docs for which status when).
pub struct OnStatus<B, F: Report> {
    inner: B,
    report: Option<F>,
}

impl<B, F: Report> std::fmt::Debug for OnStatus<B, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnStatus")
            .field("reported", &self.report.is_none())
            .finish()
    }
}

impl<B, F: Report> OnStatus<B, F> {
    /// Wraps `inner`; `report` runs when the status passes.
    pub fn new(inner: B, report: F) -> Self {
        Self {
            inner,
            report: Some(report),
        }
    }

    /// Wraps the body of `resp`, reporting at once when its headers already
    /// carry the status (trailers-only).
    pub fn wrap(resp: http::Response<B>, report: F) -> http::Response<Self> {
        let code = code_of(resp.headers());
        resp.map(|inner| {
            let mut body = Self::new(inner, report);
            if let Some(code) = code {
                body.finish(code);
            }
            body
        })
    }

    fn finish(&mut self, code: Code) {
        if let Some(report) = self.report.take() {
            report.report(code);
        }
    }
}

impl<B, F: Report> Drop for OnStatus<B, F> {
    fn drop(&mut self) {
        self.finish(Code::Cancelled);
    }
}

impl<B: Body + Unpin, F: Report + Unpin> Body for OnStatus<B, F> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(code_of) {
                    this.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(Code::Internal),
            Poll::Ready(None) => this.finish(Code::Unknown),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http_body_util::BodyExt;

    use super::*;

    type Seen = Arc<Mutex<Vec<Code>>>;

    struct Recorder(Seen);

    impl Report for Recorder {
        fn report(self, code: Code) {
            self.0.lock().unwrap().push(code);
        }
    }

    fn recorder() -> (Seen, Recorder) {
        let seen = Seen::default();
        (seen.clone(), Recorder(seen))
    }

    fn trailers(code: &str) -> http::HeaderMap {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", code.parse().unwrap());
        t
    }

    #[tokio::test]
    async fn the_status_in_the_trailers_is_reported_once() {
        let (seen, report) = recorder();
        let frames = vec![
            Ok::<_, std::convert::Infallible>(Frame::data(bytes::Bytes::from_static(b"x"))),
            Ok(Frame::trailers(trailers("14"))),
        ];
        let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
        let wrapped = OnStatus::new(body, report);
        let _ = wrapped.collect().await.unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![Code::Unavailable]);
    }

    #[test]
    fn trailers_only_reports_at_once_and_a_dropped_body_is_cancelled() {
        let (seen, report) = recorder();
        let mut resp = http::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
        resp.headers_mut()
            .insert("grpc-status", "12".parse().unwrap());
        drop(OnStatus::wrap(resp, report));
        assert_eq!(*seen.lock().unwrap(), vec![Code::Unimplemented]);

        let (seen, report) = recorder();
        let resp = http::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
        drop(OnStatus::wrap(resp, report));
        assert_eq!(*seen.lock().unwrap(), vec![Code::Cancelled]);
    }

    #[test]
    fn names_are_grpc_gos() {
        assert_eq!(code_name(Code::Cancelled), "Canceled");
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::DeadlineExceeded), "DeadlineExceeded");
    }
}
