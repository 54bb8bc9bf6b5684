//! The read-only HTTP view (axum): JSON for scripts, a live page for
//! people, Prometheus text for monitoring. Nothing here writes to etcd.
//!
//! `GET /services` is the hot path (dashboards and scripts poll it): its
//! JSON is rendered once per store generation and wall-clock second (TTLs
//! count down in seconds) and shared by every request in between.
//!
//! Every error is JSON `{"error": "...", "status": N}` with the matching
//! status code, including unknown paths and wrong methods.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use registry::schema::ServiceName;
use registry::watcher::WatchState;
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::leader::LeaderState;
use crate::metrics::Metrics;
use crate::store::{ServiceView, Store};

/// The membership page: one static file, no build step.
const INDEX_HTML: &str = include_str!("../static/index.html");
/// The view counts as current while etcd confirmed it this recently.
const MAX_WATCH_AGE: Duration = Duration::from_secs(10);
/// `/services/stream` sends at most one update per this interval.
const STREAM_THROTTLE: Duration = Duration::from_millis(250);

/// What the handlers share.
pub struct AppState {
    /// The controller's picture of the registry.
    pub store: Arc<Store>,
    /// Metrics to render.
    pub metrics: Arc<Metrics>,
    /// Watcher freshness.
    pub watch: watch::Receiver<WatchState>,
    /// Election state.
    pub leader: watch::Receiver<LeaderState>,
    /// This replica's id (its campaign value).
    pub id: String,
    /// Ends open streams at shutdown.
    pub shutdown: CancellationToken,
    cache: tokio::sync::Mutex<Option<(u64, u64, Bytes)>>,
}

impl AppState {
    /// Shared state for [`router`].
    pub fn new(
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        watch: watch::Receiver<WatchState>,
        leader: watch::Receiver<LeaderState>,
        id: String,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            metrics,
            watch,
            leader,
            id,
            shutdown,
            cache: tokio::sync::Mutex::new(None),
        }
    }

    /// The full `/services` JSON, cached per generation and second.
    ///
    /// Single-flight: the lock is held while rendering, so when the cache
    /// goes stale under load one request renders and the others wait for
    /// its bytes instead of all rendering the same view at once.
    async fn services_json(&self) -> Bytes {
        let generation = self.store.generation();
        let second = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut cache = self.cache.lock().await;
        if let Some((g, s, bytes)) = cache.as_ref() {
            if *g >= generation && *s == second {
                return bytes.clone();
            }
        }
        // Read the generation again: the render reflects at least this one.
        let generation = self.store.generation();
        let view = self.store.view(None, None, Instant::now());
        let bytes = Bytes::from(serde_json::to_vec(&view).unwrap_or_default());
        *cache = Some((generation, second, bytes.clone()));
        bytes
    }
}

/// The routes of the view.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/services", get(services))
        .route("/services/stream", get(stream))
        .route("/services/{name}", get(service))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// A JSON error with its status code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": self.message, "status": self.status.as_u16()});
        (self.status, axum::Json(body)).into_response()
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such path: {}", uri.path()),
    )
}

async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} not allowed: this view is read-only (GET)"),
    )
}

async fn index() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"))],
        Html(INDEX_HTML),
    )
}

fn json_bytes(bytes: Bytes) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response()
}

/// Parses the query: only `healthy=true|false` is known.
fn healthy_filter(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Option<bool>, ApiError> {
    let Query(pairs) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad query: {e}")))?;
    let mut healthy = None;
    for (k, v) in pairs {
        match (k.as_str(), v.as_str()) {
            ("healthy", "true") => healthy = Some(true),
            ("healthy", "false") => healthy = Some(false),
            ("healthy", other) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("healthy={other:?}: want true or false"),
                ))
            }
            (other, _) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("unknown parameter {other:?}: only healthy=true|false is supported"),
                ))
            }
        }
    }
    Ok(healthy)
}

async fn services(
    State(st): State<Arc<AppState>>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    match healthy_filter(query)? {
        None => Ok(json_bytes(st.services_json().await)),
        Some(h) => Ok(axum::Json(st.store.view(None, Some(h), Instant::now())).into_response()),
    }
}

#[derive(Serialize)]
struct OneService {
    revision: i64,
    #[serde(flatten)]
    service: ServiceView,
}

async fn service(
    State(st): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(name) =
        path.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad path: {e}")))?;
    let healthy = healthy_filter(query)?;
    let name = ServiceName::new(&name)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))?;
    let mut view = st.store.view(Some(&name), healthy, Instant::now());
    let Some(service) = view.services.pop() else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown service {:?}", name.as_str()),
        ));
    };
    Ok(axum::Json(OneService {
        revision: view.revision,
        service,
    })
    .into_response())
}

async fn stream(
    State(st): State<Arc<AppState>>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let rx = st.store.subscribe();
    let stream = futures::stream::unfold((rx, true, st), |(mut rx, first, st)| async move {
        if !first {
            tokio::select! {
                () = st.shutdown.cancelled() => return None,
                changed = rx.changed() => if changed.is_err() { return None },
            }
            tokio::select! {
                () = st.shutdown.cancelled() => return None,
                () = tokio::time::sleep(STREAM_THROTTLE) => {}
            }
        }
        rx.borrow_and_update();
        let json = st.services_json().await;
        let event = Event::default()
            .event("services")
            .data(String::from_utf8_lossy(&json));
        Some((Ok(event), (rx, false, st)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn healthz() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

async fn readyz(State(st): State<Arc<AppState>>) -> Response {
    let w = st.watch.borrow().clone();
    let leader = st.leader.borrow().clone();
    let synced = st.store.synced();
    let age = w.age();
    let reachable = w.connected && age.is_some_and(|a| a <= MAX_WATCH_AGE);
    let ready = synced && reachable;
    let body = json!({
        "ready": ready,
        "synced": synced,
        "etcd_reachable": reachable,
        "watch_age_seconds": age.map(|a| a.as_secs_f64()),
        "revision": st.store.revision(),
        "leader": leader.valid(Instant::now()).is_some(),
        "leader_id": leader.leader_id,
        "id": st.id,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let w = st.watch.borrow().clone();
    let leader = st.leader.borrow().clone();
    let text = st.metrics.render(&st.store, &w, &leader);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}
