//! `GET /services?limit=N[&continue=TOKEN]`: the view in pages of at most
//! `N` members, every page of one walk cut from the same snapshot, as
//! Kubernetes' list chunking does.
//!
//! - The first page (no `continue`) binds the walk to a snapshot: the view
//!   of the newest cached render, shared with every walk started while the
//!   store's generation has not moved. Each page says `continue` (the
//!   token of the next page, `null` on the last) and `remaining` (members
//!   after this page).
//! - A token names the process that issued it (a random instance id, so a
//!   token that lands on another replica behind a Service, or on a
//!   restarted controller, is refused with a 410 that says so instead of
//!   being answered from a different view), its snapshot, the offset of
//!   its page and the `healthy` filter it was issued for.
//! - A new walk starts from the store's current view, unless every kept
//!   snapshot is in use by a walk (a page cut from it within
//!   [`IN_USE`]): then it shares the newest snapshot rather than evict a
//!   walk in progress, and may be as old as that snapshot. Under churn
//!   walks therefore complete instead of ending in 410.
//! - At most [`SNAPSHOTS`] snapshots are kept, the least recently used
//!   evicted first (a walk in progress touches its snapshot with every
//!   page, so it keeps it), and none unused for [`SNAPSHOT_IDLE`]; a token
//!   whose snapshot is gone gets 410 Gone (list again from the start), a
//!   malformed token 400.
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
/// A snapshot a page was cut from this recently belongs to a walk in
/// progress: a new walk does not evict it (it shares the newest instead).
/// Readers page every few hundred milliseconds; 10 s leaves room for a
/// slow one.
pub const IN_USE: Duration = Duration::from_secs(10);

/// The snapshots walks are bound to, newest last.
pub(super) struct Pages {
    snapshots: Mutex<VecDeque<Snapshot>>,
    /// This process's tokens carry it; another's are refused.
    instance: u64,
}

impl Default for Pages {
    fn default() -> Self {
        Self {
            snapshots: Mutex::default(),
            instance: rand::random::<u64>() >> 16,
        }
    }
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
    instance: u64,
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
        format!(
            "v2.{:x}.{:x}.{:x}.{h}",
            self.instance, self.generation, self.offset
        )
    }

    fn decode(text: &str) -> Option<Self> {
        let mut parts = text.split('.');
        let (v, i, g, o, h) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        if v != "v2" || parts.next().is_some() {
            return None;
        }
        let healthy = match h {
            "a" => None,
            "t" => Some(true),
            "f" => Some(false),
            _ => return None,
        };
        Some(Self {
            instance: u64::from_str_radix(i, 16).ok()?,
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
        let all_in_use = snaps.len() >= SNAPSHOTS
            && snaps
                .iter()
                .all(|s| now.saturating_duration_since(s.used) < IN_USE);
        if let Some(s) = snaps
            .back_mut()
            .filter(|s| s.generation >= generation || all_in_use)
        {
            s.used = now;
            return (s.generation, s.view.clone());
        }
        snaps.push_back(Snapshot {
            generation,
            view: view.clone(),
            used: now,
        });
        while snaps.len() > SNAPSHOTS {
            // Least recently used first; the one just added is the most.
            let lru = snaps
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.used)
                .map_or(0, |(i, _)| i);
            snaps.remove(lru);
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
    instance: u64,
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
            instance,
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
            if t.instance != st.pages.instance {
                return Err(ApiError::new(
                    StatusCode::GONE,
                    "this continue token was issued by another controller replica, or by an earlier run of this one: list again from the start (no continue)",
                ));
            }
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
    let instance = st.pages.instance;
    tokio::task::spawn_blocking(move || cut(&view, healthy, offset, limit, generation, instance))
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
                instance: 0xbeef,
                generation: 0xdead,
                offset: 1500,
                healthy,
            };
            assert_eq!(Token::decode(&t.encode()), Some(t));
        }
        for junk in [
            "",
            "v2",
            "v1.1.2.a",
            "v3.1.1.2.a",
            "v2.1.1.2.x",
            "v2.1.zz.2.a",
            "v2.1.1.2.a.extra",
            "v2.1.-1.2.a",
        ] {
            assert_eq!(Token::decode(junk), None, "{junk:?}");
        }
    }
}
