//! `GET /services/stream`: server-sent events of the view, bounded.
//!
//! - **One render per change, whatever the number of subscribers.** A
//!   single broadcaster task waits for store changes (at most one per
//!   [`STREAM_THROTTLE`]), takes the shared cached render (the same one
//!   `/services` serves), computes the change against the frame it
//!   published before, once, and publishes the result as a [`Frame`] in a
//!   `watch` channel. Subscribers only read frames: none renders, none
//!   diffs.
//! - **The whole view once, then changes.** A subscriber gets one
//!   `services` event with the whole view on connect, then one `changes`
//!   event per change that matters to it: the services whose state changed
//!   (whole), the names of services that left, the revision and the global
//!   valve, and the invalid keys when they changed. Lease countdowns and
//!   probe times alone are not a change (poll `/services` for those). A
//!   subscriber too slow to have seen the frame a change is based on gets
//!   the whole view again instead (the channel keeps only the newest frame,
//!   so a slow reader costs no memory).
//! - **A cap on subscribers** (`--max-streams`): past it, 503 with the
//!   usual JSON error.
//! - The broadcaster renders nothing while nobody subscribes.
//! - **A stalled reader costs a reference, not a copy.** Events are
//!   written as byte chunks around the frame's shared JSON (`Bytes`), so
//!   a subscriber that stops reading holds a reference to a render the
//!   others share; the connection's write timeout (`--http-write-timeout`,
//!   see [`super::io`]) then closes it. A stream lasts at most
//!   [`STREAM_MAX_AGE`] (browsers' `EventSource` reconnects by itself), so
//!   a reader that reads nothing at all cannot keep a place for ever; a
//!   comment every [`KEEP_ALIVE`] keeps proxies from closing quiet ones.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

use super::{ApiError, AppState, Cached};
use crate::policy::Valve;
use crate::view::{InvalidKeyView, ServiceView, ServicesView};

/// At most one change event per this interval.
pub(super) const STREAM_THROTTLE: Duration = Duration::from_millis(250);
/// A stream ends after this long; `EventSource` reconnects by itself (and
/// gets the whole view again), so a reader that reads nothing holds a
/// place for at most this long.
pub const STREAM_MAX_AGE: Duration = Duration::from_secs(600);
/// A comment line is sent after this long without an event.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// What every stream of one controller shares.
pub(super) struct Broadcast {
    frames: watch::Sender<Option<Arc<Frame>>>,
    started: AtomicBool,
    /// Subscribers now (the cap's count).
    subscribers: Arc<AtomicUsize>,
    /// Woken when the first subscriber arrives.
    arrived: Notify,
    max: usize,
}

/// One published state of the view.
pub(super) struct Frame {
    /// Increases by one per frame.
    seq: u64,
    /// The frame `changes` is relative to (none for the first).
    base: Option<u64>,
    /// The render this frame shows.
    cached: Arc<Cached>,
    /// The `changes` event against `base`; `None` when nothing a
    /// subscriber is told about changed (the frame only moves them on).
    changes: Option<Bytes>,
}

impl Broadcast {
    pub(super) fn new(max: usize) -> Self {
        Self {
            frames: watch::channel(None).0,
            started: AtomicBool::new(false),
            subscribers: Arc::new(AtomicUsize::new(0)),
            arrived: Notify::new(),
            max: max.max(1),
        }
    }

    /// A place for one more subscriber, unless the cap is reached.
    fn admit(&self) -> Option<Place> {
        self.subscribers
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        Some(Place(self.subscribers.clone()))
    }
}

/// A subscriber's place under the cap; freed when its stream is dropped.
struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The `changes` event.
#[derive(Serialize)]
struct Changes<'a> {
    revision: i64,
    safety_valve: &'a Option<Valve>,
    /// Services new or changed, whole.
    changed: Vec<&'a ServiceView>,
    /// Names of services that left.
    removed: Vec<&'a str>,
    /// Present only when the invalid keys changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    invalid_keys: Option<&'a [InvalidKeyView]>,
}

/// The `changes` event from `prev` to `next`, or `None` when nothing a
/// subscriber is told about changed. Both views are sorted by name.
fn changes(prev: &ServicesView, next: &ServicesView) -> Option<Bytes> {
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    let (mut a, mut b) = (
        prev.services.iter().peekable(),
        next.services.iter().peekable(),
    );
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => break,
            (Some(p), None) => {
                removed.push(p.name.as_str());
                a.next();
            }
            (None, Some(n)) => {
                changed.push(*n);
                b.next();
            }
            (Some(p), Some(n)) => match p.name.as_str().cmp(n.name.as_str()) {
                std::cmp::Ordering::Less => {
                    removed.push(p.name.as_str());
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    changed.push(*n);
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if !p.same_state(n) {
                        changed.push(*n);
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
    let invalid_changed = prev.invalid_keys != next.invalid_keys;
    if changed.is_empty()
        && removed.is_empty()
        && !invalid_changed
        && prev.safety_valve == next.safety_valve
    {
        return None;
    }
    let event = Changes {
        revision: next.revision,
        safety_valve: &next.safety_valve,
        changed,
        removed,
        invalid_keys: invalid_changed.then_some(next.invalid_keys.as_slice()),
    };
    serde_json::to_vec(&event).ok().map(Bytes::from)
}

/// The one task that renders and diffs for every subscriber.
async fn broadcast(st: Arc<AppState>) {
    let b = &st.broadcast;
    let mut store = st.store.subscribe();
    let mut prev: Option<Arc<Frame>> = None;
    loop {
        while b.subscribers.load(Ordering::Acquire) == 0 {
            tokio::select! {
                () = st.shutdown.cancelled() => return,
                () = b.arrived.notified() => {}
            }
        }
        store.borrow_and_update();
        let cached = st.cached(true).await;
        let frame = match &prev {
            None => Frame {
                seq: 1,
                base: None,
                cached,
                changes: None,
            },
            Some(p) => {
                let (old, new) = (p.cached.clone(), cached.clone());
                let changes = tokio::task::spawn_blocking(move || changes(&old.view, &new.view))
                    .await
                    .unwrap_or_else(|e| {
                        warn!(error = %e, "computing the stream's changes failed; sending the whole view");
                        None
                    });
                Frame {
                    seq: p.seq + 1,
                    // A failed diff resyncs everyone (no base matches).
                    base: Some(p.seq),
                    cached,
                    changes,
                }
            }
        };
        let frame = Arc::new(frame);
        b.frames.send_replace(Some(frame.clone()));
        prev = Some(frame);
        tokio::select! {
            () = st.shutdown.cancelled() => return,
            changed = store.changed() => if changed.is_err() { return },
        }
        tokio::select! {
            () = st.shutdown.cancelled() => return,
            () = tokio::time::sleep(STREAM_THROTTLE) => {}
        }
    }
}

/// One server-sent event as byte chunks around `body` (compact JSON, one
/// line): the body is a reference to the shared render, not a copy.
fn event(name: &'static str, body: &Bytes) -> Vec<Bytes> {
    vec![
        Bytes::from(format!("event: {name}\ndata: ")),
        body.clone(),
        Bytes::from_static(b"\n\n"),
    ]
}

/// What one subscriber's stream holds between events.
struct Subscriber {
    st: Arc<AppState>,
    frames: watch::Receiver<Option<Arc<Frame>>>,
    /// The frame this subscriber's picture matches, once it has one.
    mine: Option<u64>,
    /// When the stream ends (see [`STREAM_MAX_AGE`]).
    ends: tokio::time::Instant,
    _place: Place,
}

impl Subscriber {
    /// The next chunks to send (an event or a keep-alive comment), or
    /// `None` at shutdown or at the stream's end of life.
    async fn next(&mut self) -> Option<Vec<Bytes>> {
        let ends = self.ends;
        tokio::select! {
            () = tokio::time::sleep_until(ends) => None,
            () = tokio::time::sleep(KEEP_ALIVE) => Some(vec![Bytes::from_static(b": keep-alive\n\n")]),
            ev = self.next_event() => ev,
        }
    }

    /// The next event, or `None` at shutdown.
    async fn next_event(&mut self) -> Option<Vec<Bytes>> {
        loop {
            let frame = match self.mine {
                None => {
                    // The first frame at least as new as the store now.
                    let generation = self.st.store.generation();
                    let wait = self.frames.wait_for(|f| {
                        f.as_ref()
                            .is_some_and(|f| f.cached.generation >= generation)
                    });
                    tokio::select! {
                        () = self.st.shutdown.cancelled() => return None,
                        f = wait => f.ok()?.clone()?,
                    }
                }
                Some(_) => {
                    tokio::select! {
                        () = self.st.shutdown.cancelled() => return None,
                        changed = self.frames.changed() => changed.ok()?,
                    }
                    self.frames.borrow_and_update().clone()?
                }
            };
            let follows = self.mine.is_some() && frame.base == self.mine;
            self.mine = Some(frame.seq);
            match (&frame.changes, follows) {
                (Some(changes), true) => return Some(event("changes", changes)),
                // Nothing to tell: moved on silently.
                (None, true) => continue,
                // First event, or a missed frame: the whole view.
                (_, false) => return Some(event("services", &frame.cached.json)),
            }
        }
    }
}

/// `GET /services/stream`.
pub(super) async fn stream(State(st): State<Arc<AppState>>) -> Response {
    let Some(place) = st.broadcast.admit() else {
        debug!(
            max = st.broadcast.max,
            "stream refused: too many subscribers"
        );
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many streams open ({} at most); poll /services instead or retry later",
                st.broadcast.max
            ),
        )
        .into_response();
    };
    if !st.broadcast.started.swap(true, Ordering::AcqRel) {
        tokio::spawn(broadcast(st.clone()));
    }
    st.broadcast.arrived.notify_one();
    let sub = Subscriber {
        frames: st.broadcast.frames.subscribe(),
        st,
        mine: None,
        ends: tokio::time::Instant::now() + STREAM_MAX_AGE,
        _place: place,
    };
    let chunks = futures::stream::unfold(sub, |mut sub| async move {
        let chunks = sub.next().await?;
        Some((futures::stream::iter(chunks), sub))
    })
    .flatten()
    .map(Ok::<_, Infallible>);
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(chunks),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{Counts, MemberView};
    use etcd_lb_registry::schema::ServiceName;

    fn member(addr: &str, weight: u32, ttl: i64) -> MemberView {
        MemberView {
            addr: addr.to_owned(),
            key: format!("/ns/s/{addr}"),
            version: Some("v1".to_owned()),
            weight: Some(weight),
            registered_weight: Some(weight),
            r#override: None,
            lane: None,
            kind: "json",
            lease: Some("1".to_owned()),
            ttl: Some(ttl),
            healthy: Some(true),
            status: "serving",
            status_detail: None,
            last_probe: Some(format!("t{ttl}")),
            consecutive_failures: 0,
            mod_revision: 5,
            problems: Vec::new(),
        }
    }

    fn service(name: &str, members: Vec<MemberView>) -> ServiceView {
        ServiceView {
            name: ServiceName::new(name).unwrap(),
            members,
            counts: Counts::default(),
            safety_valve: None,
            split: None,
        }
    }

    fn view(services: Vec<ServiceView>) -> ServicesView {
        ServicesView {
            revision: 9,
            safety_valve: None,
            services,
            invalid_keys: Vec::new(),
        }
    }

    #[test]
    fn countdowns_alone_are_no_change_and_a_weight_is() {
        let a = view(vec![service("a", vec![member("h:1", 10, 30)])]);
        let later = view(vec![service("a", vec![member("h:1", 10, 29)])]);
        assert!(changes(&a, &later).is_none());
        let reweighted = view(vec![service("a", vec![member("h:1", 0, 29)])]);
        let ev: serde_json::Value =
            serde_json::from_slice(&changes(&a, &reweighted).unwrap()).unwrap();
        assert_eq!(ev["changed"][0]["members"][0]["weight"], 0);
        assert_eq!(ev["removed"], serde_json::json!([]));
        assert!(ev.get("invalid_keys").is_none());
    }

    #[test]
    fn services_that_come_and_go_are_named() {
        let a = view(vec![
            service("a", vec![member("h:1", 10, 30)]),
            service("c", vec![member("h:3", 10, 30)]),
        ]);
        let b = view(vec![
            service("b", vec![member("h:2", 10, 30)]),
            service("c", vec![member("h:3", 10, 30)]),
        ]);
        let ev: serde_json::Value = serde_json::from_slice(&changes(&a, &b).unwrap()).unwrap();
        assert_eq!(ev["removed"], serde_json::json!(["a"]));
        let changed: Vec<_> = ev["changed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(changed, ["b"]);
    }
}
