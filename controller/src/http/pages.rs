//! `GET /services?limit=N[&continue=TOKEN]`: the view in pages of at most
//! `N` members, every page of one walk cut from the same snapshot, as
//! Kubernetes' list chunking does.
//!
//! - The first page (no `continue`) binds the walk to a snapshot: the view
//!   of the newest cached render, shared with every walk started while the
//!   store's generation has not moved. Each page says `continue` (the
//!   token of the next page, `null` on the last) and `remaining` (members
//!   after this page).
//! - A token names its snapshot, the offset of its page and the `healthy`
//!   filter it was issued for. A snapshot is kept while walks use it, at
//!   most [`SNAPSHOTS`] of them and none unused for [`SNAPSHOT_IDLE`]; a
//!   token whose snapshot is gone gets 410 Gone (list again from the
//!   start), a malformed token 400.
//! - Members are paged in the view's order (services by name, members by
//!   address); a service cut by a page boundary appears on both pages with
//!   the members of each, and its `counts` are always of all its members.
//!   Invalid keys come with the first page.
//!
//! A page costs a walk over the services (not their members) to find its
//! start, unless a `healthy` filter makes members count one by one, then
//! the serialization of its own members only.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::StatusCode;
use serde::Serialize;
use tokio::time::Instant;

use super::{service_cut_of, ApiError, AppState, ServiceCut};
use crate::policy::Valve;
use crate::view::{InvalidKeyView, MemberView, ServicesView};

/// Members per page when `continue` comes without `limit`.
pub(super) const DEFAULT_LIMIT: usize = 500;
/// The largest `limit` accepted.
pub(super) const MAX_LIMIT: usize = 10_000;
/// Snapshots kept for walks at most (each is one whole view in memory).
pub const SNAPSHOTS: usize = 8;
/// A snapshot no page was cut from for this long is dropped.
pub const SNAPSHOT_IDLE: Duration = Duration::from_secs(60);

/// The snapshots walks are bound to, newest last.
#[derive(Default)]
pub(super) struct Pages {
    snapshots: Mutex<VecDeque<Snapshot>>,
}

struct Snapshot {
    /// The store generation of the render (the token's snapshot id).
    generation: u64,
    view: Arc<ServicesView>,
    used: Instant,
}

/// A page request, as parsed from the query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PageQuery {
    pub(super) limit: usize,
    pub(super) token: Option<String>,
}

/// What a token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Token {
    generation: u64,
    offset: usize,
    healthy: Option<bool>,
}

impl Token {
    fn encode(&self) -> String {
        let h = match self.healthy {
            None => 'a',
            Some(true) => 't',
            Some(false) => 'f',
        };
        format!("v1.{:x}.{:x}.{h}", self.generation, self.offset)
    }

    fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split('.');
        let (v, g, o, h) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if v != "v1" || parts.next().is_some() {
            return None;
        }
        let healthy = match h {
            "a" => None,
            "t" => Some(true),
            "f" => Some(false),
            _ => return None,
        };
        Some(Self {
            generation: u64::from_str_radix(g, 16).ok()?,
            offset: usize::from_str_radix(o, 16).ok()?,
            healthy,
        })
    }
}

impl Pages {
    /// The snapshot a new walk starts from: the newest kept one when the
    /// render is of the same generation, else the render's view, kept.
    fn start(
        &self,
        generation: u64,
        view: &Arc<ServicesView>,
        now: Instant,
    ) -> (u64, Arc<ServicesView>) {
        let mut snaps = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        snaps.retain(|s| now.saturating_duration_since(s.used) < SNAPSHOT_IDLE);
        if let Some(s) = snaps.back_mut().filter(|s| s.generation >= generation) {
            s.used = now;
            return (s.generation, s.view.clone());
        }
        snaps.push_back(Snapshot {
            generation,
            view: view.clone(),
            used: now,
        });
        while snaps.len() > SNAPSHOTS {
            snaps.pop_front();
        }
        (generation, view.clone())
    }

    /// The kept snapshot of `generation`, if any.
    fn find(&self, generation: u64, now: Instant) -> Option<Arc<ServicesView>> {
        let mut snaps = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        snaps.retain(|s| now.saturating_duration_since(s.used) < SNAPSHOT_IDLE);
        let s = snaps.iter_mut().find(|s| s.generation == generation)?;
        s.used = now;
        Some(s.view.clone())
    }
}

/// One page, borrowing from the snapshot; serializes like `/services` with
/// `continue` and `remaining` added.
#[derive(Serialize)]
struct Page<'a> {
    revision: i64,
    safety_valve: Option<&'a Valve>,
    services: Vec<ServiceCut<'a>>,
    invalid_keys: &'a [InvalidKeyView],
    /// The next page's token; `null` on the last page.
    #[serde(rename = "continue")]
    next: Option<String>,
    /// Members after this page.
    remaining: usize,
}

/// The page of `view` from member `offset` (counting only members passing
/// `healthy`), at most `limit` members.
fn cut(
    view: &ServicesView,
    healthy: Option<bool>,
    offset: usize,
    limit: usize,
    generation: u64,
) -> Option<Bytes> {
    let passes = |m: &MemberView| healthy.is_none_or(|h| m.healthy == Some(h));
    let mut services = Vec::new();
    let (mut seen, mut taken, mut total) = (0usize, 0usize, 0usize);
    for s in &view.services {
        let n = match healthy {
            None => s.members.len(),
            Some(_) => s.members.iter().filter(|m| passes(m)).count(),
        };
        total += n;
        if taken == limit || seen + n <= offset {
            seen += n;
            continue;
        }
        let skip = offset.saturating_sub(seen);
        let want = (limit - taken).min(n - skip);
        let members: Vec<&MemberView> = s
            .members
            .iter()
            .filter(|m| passes(m))
            .skip(skip)
            .take(want)
            .collect();
        taken += members.len();
        seen += n;
        services.push(service_cut_of(s, members));
    }
    let end = offset.saturating_add(taken);
    let next = (end < total).then(|| {
        Token {
            generation,
            offset: end,
            healthy,
        }
        .encode()
    });
    let page = Page {
        revision: view.revision,
        safety_valve: view.safety_valve.as_ref(),
        services,
        invalid_keys: if offset == 0 { &view.invalid_keys } else { &[] },
        next,
        remaining: total.saturating_sub(end),
    };
    serde_json::to_vec(&page).ok().map(Bytes::from)
}

/// The body of one page request.
pub(super) async fn page(
    st: &Arc<AppState>,
    healthy: Option<bool>,
    q: PageQuery,
) -> Result<Bytes, ApiError> {
    let now = Instant::now();
    let (generation, offset, view) = match &q.token {
        Some(text) => {
            let t = Token::decode(text).ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("continue={text:?} is not a token this controller issued"),
                )
            })?;
            if t.healthy != healthy {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "the continue token was issued for another healthy= filter: keep the walk's query",
                ));
            }
            let view = st.pages.find(t.generation, now).ok_or_else(|| {
                ApiError::new(
                    StatusCode::GONE,
                    "the snapshot this continue token belongs to is gone: list again from the start (no continue)",
                )
            })?;
            (t.generation, t.offset, view)
        }
        None => {
            let cached = st.cached(false).await;
            let (g, v) = st.pages.start(cached.generation, &cached.view, now);
            (g, 0, v)
        }
    };
    let limit = q.limit;
    tokio::task::spawn_blocking(move || cut(&view, healthy, offset, limit, generation))
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rendering the page failed",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_junk_is_refused() {
        for healthy in [None, Some(true), Some(false)] {
            let t = Token {
                generation: 0xdead,
                offset: 1500,
                healthy,
            };
            assert_eq!(Token::decode(&t.encode()), Some(t));
        }
        for junk in [
            "",
            "v1",
            "v2.1.2.a",
            "v1.1.2.x",
            "v1.zz.2.a",
            "v1.1.2.a.extra",
            "v1.-1.2.a",
        ] {
            assert_eq!(Token::decode(junk), None, "{junk:?}");
        }
    }
}
