//! The read-only HTTP view (axum): JSON for scripts, a live page for
//! people, Prometheus text for monitoring. Nothing here writes to etcd.
//!
//! `GET /services` is the hot path (dashboards and scripts poll it): its
//! JSON is rendered once per store generation and wall-clock second (TTLs
//! count down in seconds) and shared by every request in between, gzipped
//! once for clients that accept it (a 10,000-member view is megabytes).
//! Renders run on a blocking thread while requests are answered with the
//! previous bytes (stale-while-revalidate, at most one render old); one
//! render at a time, and a caller that waited for it uses its result.
//!
//! `?healthy=` and `/services/{name}` are cut from the same cached render,
//! on a blocking thread, once per render and filter (an unknown service
//! is a 404 from the render, never a render of its own): they never build
//! a view from the store on the async workers.
//!
//! `/services?limit=N&continue=TOKEN` ([`pages`]) pages the view, every
//! page of a walk cut from one snapshot.
//!
//! `/services/stream` ([`stream`]) shares one render and one diff per
//! change among all its subscribers, and caps their number.
//!
//! Every error is JSON `{"error": "...", "status": N}` with the matching
//! status code, including unknown paths and wrong methods.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use etcd_lb_registry::schema::ServiceName;
use etcd_lb_registry::watcher::WatchState;
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::leader::LeaderState;
use crate::metrics::Metrics;
use crate::policy::Valve;
use crate::store::Store;
use crate::view::{Counts, InvalidKeyView, MemberView, ServiceView, ServicesView, SplitView};

pub mod io;
mod pages;
mod stream;

pub use crate::config::DEFAULT_MAX_STREAMS;

/// The membership page: one static file, no build step.
const INDEX_HTML: &str = include_str!("../../static/index.html");
/// The view counts as current while etcd confirmed it this recently.
const MAX_WATCH_AGE: Duration = Duration::from_secs(10);

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
    cache: std::sync::Mutex<Option<Arc<Cached>>>,
    rendering: AtomicBool,
    render_one: tokio::sync::Mutex<()>,
    broadcast: stream::Broadcast,
    pages: pages::Pages,
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
            cache: std::sync::Mutex::new(None),
            rendering: AtomicBool::new(false),
            render_one: tokio::sync::Mutex::new(()),
            broadcast: stream::Broadcast::new(DEFAULT_MAX_STREAMS),
            pages: pages::Pages::default(),
        }
    }

    /// At most `max` open `/services/stream` subscribers (past it: 503).
    pub fn with_max_streams(mut self, max: usize) -> Self {
        self.broadcast = stream::Broadcast::new(max);
        self
    }

    /// The full `/services` body (JSON, or its gzip), cached per store
    /// generation and wall-clock second.
    ///
    /// Stale-while-revalidate: when the cache is out of date, one render
    /// starts on a blocking thread and every request meanwhile gets the
    /// previous bytes (at most one render old), so neither the async
    /// workers nor the waiting requests stall on rendering a large view.
    /// With `fresh`, waits for a render that reflects the current state
    /// (the stream, which is woken by changes, needs that).
    async fn services_body(self: &Arc<Self>, gzip: bool, fresh: bool) -> Bytes {
        let body = self.cached(fresh).await;
        if gzip {
            body.gzip.clone()
        } else {
            body.json.clone()
        }
    }

    /// The cached render (see [`Self::services_body`] for `fresh`).
    async fn cached(self: &Arc<Self>, fresh: bool) -> Arc<Cached> {
        match self.current() {
            Some(c) if c.is_current(self.version()) => c,
            Some(c) if !fresh => {
                self.refresh();
                c
            }
            _ => self.render().await,
        }
    }

    fn current(&self) -> Option<Arc<Cached>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The body of `/services?healthy=` (`name` None) or of
    /// `/services/{name}`, cut from the cached render; `None` for a
    /// service the render does not have.
    async fn filtered(
        self: &Arc<Self>,
        name: Option<ServiceName>,
        healthy: Option<bool>,
    ) -> Option<Bytes> {
        // Fresh, as these were before: a render of the current state (one
        // at a time, shared by every caller in that generation and second).
        let body = self.cached(true).await;
        if let Some(n) = &name {
            body.position(n)?;
        }
        let key = (name, healthy);
        if let Some(b) = body.derived().get(&key) {
            return Some(b.clone());
        }
        let (b, k) = (body.clone(), key.clone());
        let bytes = tokio::task::spawn_blocking(move || b.cut(k.0.as_ref(), k.1))
            .await
            .ok()
            .flatten()?;
        body.derived().insert(key, bytes.clone());
        Some(bytes)
    }

    fn version(&self) -> (u64, u64) {
        let second = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        (self.store.generation(), second)
    }

    /// Starts one background render unless one is running.
    fn refresh(self: &Arc<Self>) {
        if self
            .rendering
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let _ = me.render().await;
            me.rendering.store(false, Ordering::Release);
        });
    }

    /// Renders now (JSON and gzip) on a blocking thread and caches it. One
    /// render at a time: a caller that waited for another's render uses it
    /// when it is current.
    async fn render(self: &Arc<Self>) -> Arc<Cached> {
        let _one = self.render_one.lock().await;
        if let Some(c) = self.current().filter(|c| c.is_current(self.version())) {
            return c;
        }
        let me = self.clone();
        let rendered = tokio::task::spawn_blocking(move || {
            let (generation, second) = me.version();
            me.metrics.view_renders.inc();
            let view = Arc::new(me.store.view(None, None, Instant::now()));
            let json = Bytes::from(serde_json::to_vec(&*view).unwrap_or_default());
            let gzip = gzip_bytes(&json);
            Arc::new(Cached {
                generation,
                second,
                view,
                json,
                gzip,
                derived: std::sync::Mutex::new(HashMap::new()),
            })
        })
        .await;
        let rendered = match rendered {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "rendering the view failed");
                return Arc::new(Cached::empty());
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        // Never replace a newer render with an older one.
        if cache
            .as_ref()
            .is_none_or(|c| (c.generation, c.second) <= (rendered.generation, rendered.second))
        {
            *cache = Some(rendered.clone());
        }
        rendered
    }
}

/// Which cut of a render: one service or all, and the `healthy` filter.
type CutKey = (Option<ServiceName>, Option<bool>);

/// One rendered `/services` body, the view it came from, and the cuts of
/// it served so far (at most three per service plus three).
struct Cached {
    generation: u64,
    second: u64,
    /// Shared with the page walks bound to this render.
    view: Arc<ServicesView>,
    json: Bytes,
    gzip: Bytes,
    derived: std::sync::Mutex<HashMap<CutKey, Bytes>>,
}

impl Cached {
    fn empty() -> Self {
        Self {
            generation: 0,
            second: 0,
            view: Arc::new(ServicesView {
                revision: 0,
                safety_valve: None,
                services: Vec::new(),
                invalid_keys: Vec::new(),
            }),
            json: Bytes::new(),
            gzip: Bytes::new(),
            derived: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn is_current(&self, (generation, second): (u64, u64)) -> bool {
        self.generation >= generation && self.second == second
    }

    fn derived(&self) -> std::sync::MutexGuard<'_, HashMap<CutKey, Bytes>> {
        self.derived.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where service `name` is in the view (services are sorted by name).
    fn position(&self, name: &ServiceName) -> Option<usize> {
        self.view
            .services
            .binary_search_by(|s| s.name.cmp(name))
            .ok()
    }

    /// Serializes one cut of the view: one service (with the revision) or
    /// all, members filtered by `healthy`, counts as before the filter.
    fn cut(&self, name: Option<&ServiceName>, healthy: Option<bool>) -> Option<Bytes> {
        let out = match name {
            Some(n) => serde_json::to_vec(&OneService {
                revision: self.view.revision,
                service: service_cut(&self.view.services[self.position(n)?], healthy),
            }),
            None => serde_json::to_vec(&ViewCut {
                revision: self.view.revision,
                safety_valve: self.view.safety_valve.as_ref(),
                services: self
                    .view
                    .services
                    .iter()
                    .map(|s| service_cut(s, healthy))
                    .collect(),
                invalid_keys: &self.view.invalid_keys,
            }),
        };
        out.ok().map(Bytes::from)
    }
}

/// One service of the cached view, members filtered by `healthy`.
fn service_cut(s: &ServiceView, healthy: Option<bool>) -> ServiceCut<'_> {
    service_cut_of(
        s,
        s.members
            .iter()
            .filter(|m| healthy.is_none_or(|h| m.healthy == Some(h)))
            .collect(),
    )
}

/// One service of the cached view with only `members` of it.
fn service_cut_of<'a>(s: &'a ServiceView, members: Vec<&'a MemberView>) -> ServiceCut<'a> {
    ServiceCut {
        name: &s.name,
        members,
        counts: &s.counts,
        split: s.split.as_ref(),
        safety_valve: s.safety_valve.as_ref(),
    }
}

/// A filtered `/services`, borrowing from the cached view; its fields
/// serialize as [`ServicesView`]'s do.
#[derive(Serialize)]
struct ViewCut<'a> {
    revision: i64,
    safety_valve: Option<&'a Valve>,
    services: Vec<ServiceCut<'a>>,
    invalid_keys: &'a [InvalidKeyView],
}

/// One service of a cut; serializes as `ServiceView` does.
#[derive(Serialize)]
struct ServiceCut<'a> {
    name: &'a ServiceName,
    members: Vec<&'a MemberView>,
    counts: &'a Counts,
    #[serde(skip_serializing_if = "Option::is_none")]
    split: Option<&'a SplitView>,
    safety_valve: Option<&'a Valve>,
}

fn gzip_bytes(data: &[u8]) -> Bytes {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 8),
        flate2::Compression::fast(),
    );
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(data);
    Bytes::from(enc.finish().unwrap_or_default())
}

/// Whether the client takes gzip (`Accept-Encoding: gzip`, not `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let zero = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            coding.eq_ignore_ascii_case("gzip") && !zero
        })
}

/// The routes of the view.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/services", get(services))
        .route("/services/stream", get(stream::stream))
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
    healthy_of(pairs, "only healthy=true|false is supported")
}

/// Parses `/services`'s query: `healthy=true|false`, and `limit=N` and
/// `continue=TOKEN` for pages (see [`pages`]).
fn list_query(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<(Option<bool>, Option<pages::PageQuery>), ApiError> {
    let Query(pairs) =
        query.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("bad query: {e}")))?;
    let (mut limit, mut token, mut rest) = (None, None, Vec::new());
    for (k, v) in pairs {
        match k.as_str() {
            "limit" => {
                let n = v
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=pages::MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            format!(
                                "limit={v:?}: want a number of members from 1 to {}",
                                pages::MAX_LIMIT
                            ),
                        )
                    })?;
                limit = Some(n);
            }
            "continue" => token = Some(v),
            _ => rest.push((k, v)),
        }
    }
    let healthy = healthy_of(
        rest,
        "only healthy=true|false, limit=N and continue=TOKEN are supported",
    )?;
    let page = (limit.is_some() || token.is_some()).then(|| pages::PageQuery {
        limit: limit.unwrap_or(pages::DEFAULT_LIMIT),
        token,
    });
    Ok((healthy, page))
}

/// The `healthy` filter of `pairs`; any other parameter is an error that
/// says `supported`.
fn healthy_of(pairs: Vec<(String, String)>, supported: &str) -> Result<Option<bool>, ApiError> {
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
                    format!("unknown parameter {other:?}: {supported}"),
                ))
            }
        }
    }
    Ok(healthy)
}

async fn services(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let (healthy, page) = list_query(query)?;
    if let Some(q) = page {
        return Ok(json_bytes(pages::page(&st, healthy, q).await?));
    }
    match healthy {
        None if accepts_gzip(&headers) => {
            let mut resp = json_bytes(st.services_body(true, false).await);
            let h = resp.headers_mut();
            h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
            Ok(resp)
        }
        None => {
            let mut resp = json_bytes(st.services_body(false, false).await);
            resp.headers_mut()
                .insert(header::VARY, HeaderValue::from_static("accept-encoding"));
            Ok(resp)
        }
        Some(h) => match st.filtered(None, Some(h)).await {
            Some(body) => Ok(json_bytes(body)),
            None => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering the view failed",
            )),
        },
    }
}

/// `/services/{name}`: the revision, then the service's fields.
#[derive(Serialize)]
struct OneService<'a> {
    revision: i64,
    #[serde(flatten)]
    service: ServiceCut<'a>,
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
    match st.filtered(Some(name.clone()), healthy).await {
        Some(body) => Ok(json_bytes(body)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown service {:?}", name.as_str()),
        )),
    }
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

/// OpenMetrics for Prometheus (it asks in `Accept`), the Prometheus text
/// format for everyone else (curl, promtool), as the binaries' `/metrics`.
async fn metrics(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let w = st.watch.borrow().clone();
    let leader = st.leader.borrow().clone();
    let text = st.metrics.render(&st.store, &w, &leader);
    let (kind, body) = etcd_lb_registry::metrics_http::negotiate(&headers, text);
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(kind))],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn gzip_only_when_accepted() {
        assert!(accepts_gzip(&headers("gzip")));
        assert!(accepts_gzip(&headers("br, GZIP;q=0.5, deflate")));
        assert!(!accepts_gzip(&headers("gzip;q=0")));
        assert!(!accepts_gzip(&headers("identity")));
        assert!(!accepts_gzip(&headers("x-gzip-ish")));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn gzip_round_trips() {
        let data = br#"{"revision":1,"services":[]}"#.repeat(100);
        let z = gzip_bytes(&data);
        assert!(z.len() < data.len());
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&z[..]), &mut out).unwrap();
        assert_eq!(out, data);
    }
}
