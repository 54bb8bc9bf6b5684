//! The list+watch reflector: a local copy of one etcd prefix, as events.
//!
//! Written once for client and controller (kube-rs's watcher is the model):
//! Get the prefix in pages at one revision, Watch from revision+1, and turn
//! both into [`Event`]s keyed by the full etcd key. On a broken stream it
//! reconnects and resumes from the last revision it saw; when etcd answers
//! that the revision was compacted, or when etcd came back with less history
//! than we saw (wiped or restored), it relists and emits only the
//! difference. Every (re)list ends with [`Event::Synced`], the moment the
//! consumer's view is complete.
//!
//! Static stability: while etcd is unreachable nothing is emitted, so
//! consumers keep their last state; the watcher never reports "empty"
//! because etcd went away. [`WatchState`] says how fresh the view is (the age
//! of the last event or progress notice), so a silent stream is visible.
//!
//! Schema rules are applied here: keys are parsed into service and address,
//! values into a [`Member`]; invalid entries are still emitted (the
//! controller reports them) with the reason, and warned about once per key
//! and revision.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, KeyValue, WatchOptions, WatchStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::etcd::{EtcdConfig, EtcdError};
use crate::failpoints;
use crate::schema::{self, Addr, Member, SchemaError, ServiceName};
use crate::session::Session;

/// Keys of a list's first page.
const PAGE: i64 = 500;
/// Most keys per page: pages grow from [`PAGE`] while they stay under
/// [`PAGE_BYTES`]. etcd counts the whole rest of the range for every page
/// it returns, so at 100,000 small keys, 500-key pages cost 200 such counts
/// and most of the initial sync.
const PAGE_MAX: i64 = 10_000;
/// The bytes (keys and values) a page grows towards.
const PAGE_BYTES: usize = 4 * 1024 * 1024;
/// The byte budget of one response (list page or watch message). A page of
/// [`PAGE`] keys can be far larger (values may be up to etcd's request
/// limit, 1.5 MiB by default, so 500 of them make 750 MiB): a page that
/// does not fit is asked again with half the keys, down to one. A watch
/// asks etcd to fragment responses above its request limit, so every watch
/// message fits too.
const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Bound of one call: a page of big values takes longer than a keep-alive.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One key under the watched prefix, as the schema reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The full etcd key.
    pub key: String,
    /// Service and address from the key; `None` for keys outside the schema.
    pub id: Option<(ServiceName, Addr)>,
    /// The parsed value, or why the key or value is invalid.
    pub member: Result<Member, SchemaError>,
    /// Lease id, 0 when the key has none.
    pub lease: i64,
    /// Revision that created the key (changes on re-registration).
    pub create_revision: i64,
    /// Revision of the last write (the compare target for safe deletes).
    pub mod_revision: i64,
}

impl Entry {
    /// Reads one etcd key-value under `root`.
    pub fn from_kv(root: &str, kv: &KeyValue) -> Self {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let (id, member) = match schema::parse_key(root, kv.key()) {
            Ok((service, addr)) => {
                let member = schema::parse_value(&addr, kv.value());
                (Some((service, addr)), member)
            }
            Err(e) => (None, Err(e)),
        };
        Self {
            key,
            id,
            member,
            lease: kv.lease(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        }
    }
}

/// A change to the local copy.
///
/// The entry is shared with the reflector's own copy: a list of 100,000
/// keys queues 100,000 pointers, not 100,000 copies of each key's strings
/// (which, freed again right after, were most of a client's resident
/// memory at that size).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A key was created or changed (valid or not).
    Applied(Arc<Entry>),
    /// A key is gone; the last known entry.
    Removed(Arc<Entry>),
    /// The view is complete as of this revision (after every list/relist).
    Synced {
        /// etcd revision of the list.
        revision: i64,
    },
}

/// How current the view is, for logs, metrics and readiness.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchState {
    /// At least one full list has been applied.
    pub synced: bool,
    /// The watch stream is up now.
    pub connected: bool,
    /// Last revision known to be reflected.
    pub revision: i64,
    /// Last event or progress notice from etcd.
    pub last_contact: Option<Instant>,
    /// Keys in the view.
    pub entries: usize,
    /// Relists so far (initial list included).
    pub relists: u64,
}

impl WatchState {
    /// Time since etcd last confirmed the view (None before the first sync).
    pub fn age(&self) -> Option<Duration> {
        self.last_contact.map(|t| t.elapsed())
    }
}

/// What to watch.
#[derive(Debug, Clone)]
pub struct WatcherConfig {
    /// Schema root, e.g. `/ns/`.
    pub root: String,
    /// Prefix to list and watch: the root, or `<root><service>/`.
    pub prefix: String,
    /// How often to ask etcd for a progress notice (etcd's own are rare), so
    /// a quiet prefix still proves the stream alive.
    pub progress_interval: Duration,
    /// After etcd comes back wiped or restored, how long a key missing from
    /// the new list is kept before it is reported removed: its server is
    /// re-registering right now, and a client must not empty its endpoint
    /// set in the meantime (static stability).
    pub wipe_grace: Duration,
}

impl WatcherConfig {
    /// Watches one service's prefix.
    pub fn service(root: &str, service: &ServiceName) -> Self {
        Self {
            root: root.to_owned(),
            prefix: schema::service_prefix(root, service),
            progress_interval: Duration::from_secs(2),
            wipe_grace: Duration::from_secs(10),
        }
    }

    /// Watches every service under the root.
    pub fn all(root: &str) -> Self {
        Self {
            root: root.to_owned(),
            prefix: root.to_owned(),
            progress_interval: Duration::from_secs(2),
            wipe_grace: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum WatchError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("watch cancelled by etcd: {0}")]
    Cancelled(String),
    /// A failpoint broke the stream ([`failpoints::WATCH_CUT_MID_REVISION`]).
    #[error("failpoint {0}")]
    Injected(String),
}

/// The reflector. Drive it with [`Watcher::next`], or [`Watcher::spawn`] it.
pub struct Watcher {
    /// Connects lazily, bounds calls, logs in again after a refused token.
    session: Session,
    cfg: WatcherConfig,
    stream: Option<WatchStream>,
    map: BTreeMap<String, Arc<Entry>>,
    revision: i64,
    cluster_id: u64,
    pending: VecDeque<Event>,
    state: watch::Sender<WatchState>,
    backoff: Backoff,
    failing: bool,
    next_progress: Instant,
    warns: WarnLimiter,
    /// Keys missing after a relist of a wiped etcd, with the moment they
    /// will be reported removed unless they come back first.
    deferred: BTreeMap<String, (Arc<Entry>, Instant)>,
    /// The last revision may have been delivered in part (see
    /// [`Watcher::resume_from`]).
    maybe_partial: bool,
}

impl Watcher {
    /// A watcher that has not connected yet; the first [`Watcher::next`]
    /// connects and lists.
    pub fn new(etcd: EtcdConfig, cfg: WatcherConfig) -> Self {
        let (state, _) = watch::channel(WatchState {
            synced: false,
            connected: false,
            revision: 0,
            last_contact: None,
            entries: 0,
            relists: 0,
        });
        Self {
            session: Session::new(etcd.require_leader()).with_timeout(REQUEST_TIMEOUT),
            cfg,
            stream: None,
            map: BTreeMap::new(),
            revision: 0,
            cluster_id: 0,
            pending: VecDeque::new(),
            state,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(3)),
            failing: false,
            next_progress: Instant::now(),
            warns: WarnLimiter::new(),
            deferred: BTreeMap::new(),
            maybe_partial: false,
        }
    }

    /// Observes freshness and sync state.
    pub fn state(&self) -> watch::Receiver<WatchState> {
        self.state.subscribe()
    }

    /// Runs the watcher in a task, forwarding events until `cancel`.
    /// Unbounded so etcd's stream is never held up by a slow consumer;
    /// events are small and a consumer that stops reading is a bug.
    pub fn spawn(
        self,
        cancel: CancellationToken,
    ) -> (
        mpsc::UnboundedReceiver<Event>,
        watch::Receiver<WatchState>,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = self.state();
        let mut me = self;
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    ev = me.next() => if tx.send(ev).is_err() { break },
                }
            }
        });
        (rx, state, task)
    }

    /// The next change. Retries etcd forever with backoff; never returns an
    /// error. Not cancel-safe in the middle of a relist: drop the watcher
    /// rather than abandoning a call (or use [`Watcher::spawn`]).
    pub async fn next(&mut self) -> Event {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return ev;
            }
            // A relist of 100,000 keys queued as many events: give the
            // queue's buffer back (it is mmapped, so RSS falls at once).
            if self.pending.capacity() > 4096 {
                self.pending.shrink_to_fit();
            }
            if let Err(e) = self.step().await {
                // (A refused auth token already dropped the session's
                // client, and a timeout or an Unavailable answer moved it to
                // the next member.) A watch etcd cancelled, for want of a
                // leader say, is a reason to try another member too.
                self.stream = None;
                if matches!(e, WatchError::Cancelled(_)) {
                    self.session.reset();
                }
                self.state.send_modify(|s| s.connected = false);
                if failpoints::fire(failpoints::WATCH_EMPTY_ON_OUTAGE).is_some() {
                    // The defect: an unreachable etcd empties the view.
                    for (_, entry) in std::mem::take(&mut self.map) {
                        self.pending.push_back(Event::Removed(entry));
                    }
                }
                if !self.failing {
                    warn!(prefix = %self.cfg.prefix, error = %e, "watch lost; keeping the last known view and retrying");
                    self.failing = true;
                } else {
                    debug!(prefix = %self.cfg.prefix, error = %e, "watch still failing");
                }
                tokio::time::sleep(self.backoff.next_delay()).await;
            }
        }
    }

    async fn step(&mut self) -> Result<(), WatchError> {
        let Some(stream) = self.stream.as_mut() else {
            return self.connect().await;
        };
        let progress_at = self.next_progress;
        let grace_ends = self.deferred.values().map(|(_, at)| *at).min();
        tokio::select! {
            msg = stream.message() => {
                let resp = msg
                    .map_err(|e| self.session.check(e))?
                    .ok_or(EtcdError::StreamEnded("watch"))?;
                if resp.compact_revision() > 0 {
                    info!(prefix = %self.cfg.prefix, compact_revision = resp.compact_revision(),
                          "watch fell behind compaction; relisting");
                    self.stream = None;
                    self.relist(false).await?;
                    return self.start_watch().await;
                }
                if resp.canceled() {
                    return Err(WatchError::Cancelled(resp.cancel_reason().to_owned()));
                }
                let mut last_event = None;
                // In-code fault (a): only the first part of the response
                // arrives before the stream breaks.
                let cut = cut_point(resp.events());
                let events = cut.map_or(resp.events(), |n| &resp.events()[..n]);
                for event in events {
                    let Some(kv) = event.kv() else { continue };
                    last_event = Some(kv.mod_revision());
                    match event.event_type() {
                        EventType::Put => {
                            // Resuming from a revision we may have seen in
                            // part (see `resume_from`) delivers its events
                            // again: pass each on once.
                            if self.map.get(String::from_utf8_lossy(kv.key()).as_ref())
                                .is_some_and(|e| e.mod_revision == kv.mod_revision())
                            {
                                continue;
                            }
                            let entry = Arc::new(Entry::from_kv(&self.cfg.root, kv));
                            self.warns.entry(&entry);
                            self.deferred.remove(&entry.key);
                            self.map.insert(entry.key.clone(), Arc::clone(&entry));
                            self.pending.push_back(Event::Applied(entry));
                        }
                        EventType::Delete => {
                            if failpoints::fire(failpoints::WATCH_DROP_DELETE).is_some() {
                                continue;
                            }
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            if let Some(prev) = self.map.remove(&key) {
                                self.pending.push_back(Event::Removed(prev));
                            }
                        }
                    }
                }
                // While a watch catches up, etcd sends at most 1,000
                // revisions per response but stamps each with the store's
                // current revision: only the events say how far this view
                // reaches. A response without events (a progress notice) is
                // sent only to a watch that has caught up, so its header
                // revision is safe to resume from.
                match last_event {
                    Some(rev) => {
                        self.revision = self.revision.max(rev);
                        self.maybe_partial = true;
                    }
                    None => {
                        if let Some(h) = resp.header() {
                            self.revision = self.revision.max(h.revision());
                        }
                        self.maybe_partial = false;
                    }
                }
                let (revision, entries) = (self.revision, self.map.len());
                self.state.send_modify(|s| {
                    s.revision = revision;
                    s.entries = entries;
                    s.last_contact = Some(Instant::now());
                });
                if let Some(applied) = cut {
                    return Err(WatchError::Injected(format!(
                        "{}: stream cut after {applied} of {} events",
                        failpoints::WATCH_CUT_MID_REVISION,
                        resp.events().len()
                    )));
                }
                Ok(())
            }
            () = tokio::time::sleep_until(grace_ends.unwrap_or(progress_at)), if grace_ends.is_some() => {
                let now = Instant::now();
                let expired: Vec<String> = self
                    .deferred
                    .iter()
                    .filter(|(_, (_, at))| *at <= now)
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in expired {
                    if let Some((entry, _)) = self.deferred.remove(&key) {
                        self.pending.push_back(Event::Removed(entry));
                    }
                }
                Ok(())
            }
            () = tokio::time::sleep_until(progress_at) => {
                self.next_progress = Instant::now() + self.cfg.progress_interval;
                stream
                    .request_progress()
                    .await
                    .map_err(|e| self.session.check(e))?;
                Ok(())
            }
        }
    }

    /// (Re)connects: resumes from the last revision when etcd still has it,
    /// relists otherwise.
    async fn connect(&mut self) -> Result<(), WatchError> {
        let mut client = self.session.client().await?;
        let head = self
            .session
            .bounded(client.get(
                self.cfg.prefix.as_str(),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ))
            .await?;
        let (rev, cluster) = head
            .header()
            .map(|h| (h.revision(), h.cluster_id()))
            .unwrap_or_default();
        let synced = self.state.borrow().synced;
        let same_history = synced
            && cluster == self.cluster_id
            && rev >= self.revision
            && self.same_history().await?;
        if !same_history {
            if synced {
                info!(prefix = %self.cfg.prefix, seen = self.revision, now = rev,
                      grace = ?self.cfg.wipe_grace,
                      "etcd has a different history (wiped or restored); relisting, keeping missing keys for the grace period");
            }
            self.relist(synced).await?;
        }
        self.start_watch().await
    }

    /// Where a new watch starts. After events, at the last event's own
    /// revision: the watch asks etcd to fragment big responses, a fragment
    /// may end in the middle of a revision, and etcd-client 0.21 does not
    /// show the `fragment` flag (only with its `pub-response-field`
    /// feature), so the last revision may have arrived in part; its events
    /// come again and the Put handler skips those already applied. After a
    /// progress notice or a list, every revision up to ours is complete.
    fn resume_from(&self) -> i64 {
        let from = if self.maybe_partial {
            self.revision
        } else {
            self.revision + 1
        };
        match failpoints::fire(failpoints::WATCH_RESUME_SKIP) {
            // The defect: resumed past revisions not delivered yet.
            Some(skip) => {
                from.saturating_add(skip.and_then(|s| s.trim().parse().ok()).unwrap_or(1))
            }
            None => from,
        }
    }

    /// Whether etcd still has the history this view was built from.
    ///
    /// A wiped member restarted with the same name and peer URLs keeps its
    /// cluster id, and once its new history passes the revision we saw,
    /// neither the id nor "revision went backwards" tells. What does: the
    /// prefix as of our revision must hold as many keys as our view, and
    /// the key we saw written last must be exactly as we saw it (same
    /// revisions, lease and value; lease ids differ across histories). A
    /// compacted revision says nothing here; the watch then reports the
    /// compaction and we relist anyway.
    async fn same_history(&mut self) -> Result<bool, WatchError> {
        let mut client = self.session.client().await?;
        let at = self.revision;
        let count = self
            .session
            .bounded(
                client.get(
                    self.cfg.prefix.as_str(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_count_only()
                            .with_revision(at),
                    ),
                ),
            )
            .await;
        let count = match count {
            Ok(resp) => resp.count(),
            Err(EtcdError::Client(e)) if is_compacted(&e) => return Ok(true),
            Err(e) => return Err(e.into()),
        };
        if usize::try_from(count).ok() != Some(self.map.len()) {
            debug!(prefix = %self.cfg.prefix, revision = at, count, entries = self.map.len(),
                   "etcd's count at our revision differs from our view");
            return Ok(false);
        }
        let Some(newest) = self.map.values().max_by_key(|e| e.mod_revision) else {
            return Ok(true);
        };
        let resp = self
            .session
            .bounded(client.get(
                newest.key.as_bytes(),
                Some(GetOptions::new().with_revision(at)),
            ))
            .await;
        let resp = match resp {
            Ok(resp) => resp,
            Err(EtcdError::Client(e)) if is_compacted(&e) => return Ok(true),
            Err(e) => return Err(e.into()),
        };
        let same = resp
            .kvs()
            .first()
            .is_some_and(|kv| Entry::from_kv(&self.cfg.root, kv) == **newest);
        if !same {
            debug!(prefix = %self.cfg.prefix, key = %newest.key, revision = at,
                   "the last key we saw is not as we saw it");
        }
        Ok(same)
    }

    async fn start_watch(&mut self) -> Result<(), WatchError> {
        let start = self.resume_from();
        let client = self.session.client().await?;
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start)
            .with_progress_notify()
            .with_fragment();
        let mut watch_client = client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        let mut stream = self
            .session
            .bounded(watch_client.watch(self.cfg.prefix.as_str(), Some(opts)))
            .await?;
        let created = self
            .session
            .bounded(stream.message())
            .await?
            .ok_or(EtcdError::StreamEnded("watch"))?;
        if created.compact_revision() > 0 {
            info!(prefix = %self.cfg.prefix, "resume revision compacted; relisting");
            self.relist(false).await?;
            return Box::pin(self.start_watch()).await;
        }
        if created.canceled() {
            return Err(WatchError::Cancelled(created.cancel_reason().to_owned()));
        }
        self.stream = Some(stream);
        if self.failing {
            info!(prefix = %self.cfg.prefix, revision = self.revision, "watch restored");
        }
        self.failing = false;
        self.backoff.reset();
        self.next_progress = Instant::now() + self.cfg.progress_interval;
        self.state.send_modify(|s| {
            s.connected = true;
            s.last_contact = Some(Instant::now());
        });
        Ok(())
    }

    /// Lists the prefix in pages at one revision, swaps the new map in and
    /// queues the difference, then [`Event::Synced`].
    ///
    /// With `grace` (etcd came back with another history), keys missing
    /// from the new list are reported removed only after
    /// [`WatcherConfig::wipe_grace`], unless they come back first.
    async fn relist(&mut self, grace: bool) -> Result<(), WatchError> {
        let client = self.session.client().await?;
        let mut kv = client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let end = prefix_end(self.cfg.prefix.as_bytes());
        let mut from = self.cfg.prefix.as_bytes().to_vec();
        let mut at_revision = 0;
        let mut cluster = 0;
        // Pages come in key order: collected into a map at the end, which
        // builds it bottom-up with full nodes (inserting one by one leaves
        // them about half full).
        let mut fresh = Vec::new();
        let mut limit = PAGE;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(limit);
            if at_revision > 0 {
                opts = opts.with_revision(at_revision);
            }
            let resp = match self.session.bounded(kv.get(from.clone(), Some(opts))).await {
                Err(EtcdError::Client(e)) if is_too_large(&e) && limit > 1 => {
                    limit = (limit / 2).max(1);
                    debug!(prefix = %self.cfg.prefix, limit, "page larger than the byte budget; asking for fewer keys");
                    continue;
                }
                other => other?,
            };
            // Grow while pages are small (back towards full pages once big
            // values are behind, and past PAGE for many small values).
            let bytes: usize = resp
                .kvs()
                .iter()
                .map(|kv| kv.key().len() + kv.value().len())
                .sum();
            if bytes < PAGE_BYTES / 2 {
                limit = (limit * 2).min(PAGE_MAX);
            }
            if at_revision == 0 {
                if let Some(h) = resp.header() {
                    at_revision = h.revision();
                    cluster = h.cluster_id();
                }
            }
            if fresh.is_empty() {
                fresh.reserve_exact(usize::try_from(resp.count()).unwrap_or(0));
            }
            for kv in resp.kvs() {
                let entry = Entry::from_kv(&self.cfg.root, kv);
                fresh.push((entry.key.clone(), Arc::new(entry)));
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        let fresh: BTreeMap<String, Arc<Entry>> = fresh.into_iter().collect();
        let old = std::mem::take(&mut self.map);
        for (key, entry) in &fresh {
            // The whole entry, lease and value included: after a wipe,
            // servers re-registering in the same order produce the same
            // revisions on new leases.
            if old.get(key) != Some(entry) {
                self.warns.entry(entry);
                self.pending.push_back(Event::Applied(Arc::clone(entry)));
            }
        }
        self.warns.flush();
        for key in fresh.keys() {
            self.deferred.remove(key);
        }
        let grace_until = Instant::now() + self.cfg.wipe_grace;
        for (key, entry) in old {
            if !fresh.contains_key(&key) {
                if grace {
                    self.deferred.insert(key, (entry, grace_until));
                } else {
                    self.pending.push_back(Event::Removed(entry));
                }
            }
        }
        self.map = fresh;
        self.revision = at_revision;
        self.maybe_partial = false;
        self.cluster_id = cluster;
        self.pending.push_back(Event::Synced {
            revision: at_revision,
        });
        let entries = self.map.len();
        self.state.send_modify(|s| {
            s.synced = true;
            s.revision = at_revision;
            s.entries = entries;
            s.relists += 1;
            s.last_contact = Some(Instant::now());
        });
        debug!(prefix = %self.cfg.prefix, revision = at_revision, entries, "listed");
        Ok(())
    }
}

/// Invalid entries named one by one per [`WARN_WINDOW`]; the rest are
/// counted and summed up in one line.
const WARN_BURST: u32 = 20;
/// The window of [`WARN_BURST`].
const WARN_WINDOW: Duration = Duration::from_secs(60);

/// Rate limit for the per-entry warning: a registry holding thousands of
/// garbage keys must not flood the log on every relist. The first
/// [`WARN_BURST`] invalid entries of a window are named; the others are
/// counted and reported as one line at the end of a relist, or with the
/// first warning of the next window.
#[derive(Debug)]
struct WarnLimiter {
    window: Instant,
    shown: u32,
    suppressed: u64,
}

impl WarnLimiter {
    fn new() -> Self {
        Self {
            window: Instant::now(),
            shown: 0,
            suppressed: 0,
        }
    }

    fn entry(&mut self, entry: &Entry) {
        let Err(e) = &entry.member else { return };
        if self.window.elapsed() >= WARN_WINDOW {
            self.flush();
            self.window = Instant::now();
            self.shown = 0;
        }
        if self.shown < WARN_BURST {
            self.shown += 1;
            warn!(key = %entry.key.chars().take(200).collect::<String>(), revision = entry.mod_revision, reason = %e, "ignoring invalid registry entry");
        } else {
            self.suppressed += 1;
        }
    }

    /// Reports the entries held back so far, if any.
    fn flush(&mut self) {
        if self.suppressed > 0 {
            warn!(
                count = self.suppressed,
                "ignoring more invalid registry entries (only the first {WARN_BURST} per minute are named)"
            );
            self.suppressed = 0;
        }
    }
}

/// Where [`failpoints::WATCH_CUT_MID_REVISION`] cuts a watch response of
/// two events or more, when it fires: after the first event that the next
/// one shares its revision with (a fragment of a big revision ends so), or
/// after the first event when no two share one. `None`: the whole response.
fn cut_point(events: &[etcd_client::Event]) -> Option<usize> {
    if events.len() < 2 {
        return None;
    }
    failpoints::fire(failpoints::WATCH_CUT_MID_REVISION)?;
    let revision = |i: usize| events[i].kv().map(KeyValue::mod_revision);
    Some(
        (1..events.len())
            .find(|&i| revision(i - 1) == revision(i))
            .unwrap_or(1),
    )
}

/// Whether a response was refused for exceeding [`MAX_MESSAGE`] (tonic's
/// decoder says "message length too large", with code OutOfRange).
fn is_too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::OutOfRange || s.message().contains("too large"))
}

/// Whether etcd refused a read because the revision was compacted.
fn is_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.message().contains("compacted"))
}

/// The smallest key greater than every key with this prefix.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(key: &str) -> Entry {
        Entry {
            key: key.to_owned(),
            id: None,
            member: Err(SchemaError::Value("bad".into())),
            lease: 0,
            create_revision: 1,
            mod_revision: 1,
        }
    }

    #[test]
    fn warnings_are_limited_per_window_and_counted() {
        let mut w = WarnLimiter::new();
        for i in 0..10_000 {
            w.entry(&invalid(&format!("/ns/s/{i}")));
        }
        assert_eq!(w.shown, WARN_BURST);
        assert_eq!(w.suppressed, 10_000 - u64::from(WARN_BURST));
        w.flush();
        assert_eq!(w.suppressed, 0);
        // A new window names entries again.
        if let Some(earlier) = w.window.checked_sub(WARN_WINDOW) {
            w.window = earlier;
            w.entry(&invalid("/ns/s/x"));
            assert_eq!(w.shown, 1);
        }
    }

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/ns/"), b"/ns0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }
}
