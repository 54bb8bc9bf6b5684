//! Keeps one endpoint registered in etcd for as long as its process lives.
//!
//! The registrar owns one lease per process and one key,
//! `<root><service>/<addr>`. It
//! - grants the lease and keeps it alive through the lease keeper
//!   ([`crate::lease`]), a task of its own, so keep-alives go on while a
//!   claim is slow; a lease etcd forgot is replaced by a new one, and
//!   keep-alives unanswered for two thirds of the TTL make it reconnect
//!   while the lease can still be saved;
//! - watches its own key (with etcd's require-leader option, so a member
//!   cut off from its peers ends the watch instead of sitting silent) and
//!   confirms the key with a read every TTL/3, and registers again when the
//!   key vanishes (deleted by a person or a controller, expired during a
//!   partition, lost with a wiped etcd);
//! - is *fenced*: the key is written in a transaction that succeeds only when
//!   the key is absent, lease-less, or already on this process's lease. When
//!   another live lease owns the address (a reused pod IP, a stray second
//!   process) it logs the conflict once, writes nothing, and takes over when
//!   that key goes away with its lease;
//! - retries everything with jittered exponential backoff and never gives up;
//! - on [`Registrar::deregister`] revokes the lease, which deletes the key.
//!
//! A lease-less key on our address is taken over: no heartbeating process
//! can own it, and it names this very endpoint.

use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, PutOptions, Txn, TxnOp};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::backoff::Backoff;
use crate::etcd::{EtcdConfig, EtcdError};
use crate::failpoints;
use crate::lease::{is_lease_not_found, LeaseKeeper, LeaseState};
use crate::schema::{self, Addr, Endpoint, SchemaError, ServiceName};
use crate::session::Session;

/// The smallest TTL etcd grants.
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// How long one try of the revoke at deregistration waits for its answer
/// (a healthy member answers in milliseconds, one after an election
/// within about a second).
pub const REVOKE_TRY: Duration = Duration::from_millis(1500);

/// How long the revoke is tried, each try after a failure on the next
/// member (a quick "no leader" during an election is tried again 200 ms
/// later): within greet-server's 5 s deregistration bound.
pub const REVOKE_FOR: Duration = Duration::from_millis(4500);

/// What to register.
#[derive(Debug, Clone)]
pub struct RegistrarConfig {
    /// Key root, normally [`schema::DEFAULT_ROOT`].
    pub root: String,
    /// Service name (the key's middle segment).
    pub service: ServiceName,
    /// The advertised address: the key suffix and the value's `addr`.
    pub addr: Addr,
    /// The value's `version`.
    pub version: String,
    /// The value's initial `weight`.
    pub weight: u32,
    /// Lease TTL; at least [`MIN_TTL`], whole seconds.
    pub ttl: Duration,
}

impl RegistrarConfig {
    /// Registers `addr` for `service` under [`schema::DEFAULT_ROOT`] with
    /// weight [`schema::DEFAULT_WEIGHT`], a 10 s TTL and an empty version;
    /// set `version` (semver) when clients select by it.
    pub fn new(service: ServiceName, addr: Addr) -> Self {
        Self {
            root: schema::DEFAULT_ROOT.to_owned(),
            service,
            addr,
            version: String::new(),
            weight: schema::DEFAULT_WEIGHT,
            ttl: Duration::from_secs(10),
        }
    }
}

/// Errors that stop a registrar from starting, or a change from being made.
#[derive(Debug, thiserror::Error)]
pub enum RegistrarError {
    /// The configuration cannot produce a valid registration.
    #[error("registrar configuration: {0}")]
    Config(String),
    /// The advertised address is one no client can dial.
    #[error("cannot advertise {addr}: {reason}")]
    Undialable {
        /// The address given.
        addr: Addr,
        /// Why no client can dial it.
        reason: &'static str,
    },
    /// A weight readers would reject (above [`schema::MAX_WEIGHT`]).
    #[error("weight {0} is above the maximum of {max}", max = schema::MAX_WEIGHT)]
    Weight(u32),
    /// The value would be rejected by readers.
    #[error(transparent)]
    Schema(#[from] SchemaError),
}

/// Where the registration stands; observable by the process and its tests.
/// (Named apart from `tonic::Status`, which a server imports too.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationStatus {
    /// Not (yet) confirmed in etcd: starting, or etcd unreachable.
    Connecting,
    /// The key is ours, on this lease.
    Registered {
        /// Our lease id.
        lease: i64,
    },
    /// Another live lease owns the address; waiting for it to go.
    Conflict {
        /// The owner's lease id.
        owner_lease: i64,
    },
    /// The lease was revoked on request; the loop has ended.
    Deregistered,
}

/// Handle to the background registration loop.
///
/// The registration lives exactly as long as this handle. Dropping it is
/// the same as [`Registrar::deregister`] without the wait: the loop is
/// cancelled and revokes the lease in the background (the key goes at
/// once), then ends. A handle dropped by mistake therefore shows at once as
/// a missing key, instead of a loop that silently stops renewing and a key
/// that expires a TTL later; and no task is left behind. Keep the handle
/// for the life of the server; call [`Registrar::deregister`] to wait for
/// the revoke.
///
/// A server registering itself (as `etcd_lb::Registrar` too):
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use etcd_lb_registry::etcd::EtcdConfig;
/// use etcd_lb_registry::registrar::{Registrar, RegistrarConfig};
/// use etcd_lb_registry::schema::{Addr, ServiceName};
///
/// let etcd = EtcdConfig::plain(["127.0.0.1:2379"]);
/// let addr: Addr = "10.0.0.7:50051".parse()?;
/// let registration = Registrar::spawn(etcd, RegistrarConfig {
///     version: "1.4.0".into(),
///     ..RegistrarConfig::new(ServiceName::new("echo")?, addr)
/// })?;
/// // ... serve; on SIGTERM: drain, stop serving, then deregister.
/// registration.set_weight(0, Duration::from_secs(5)).await;
/// registration.deregister(Duration::from_secs(5)).await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "dropping the Registrar deregisters the endpoint at once"]
pub struct Registrar {
    desired: watch::Sender<(u64, Endpoint)>,
    applied: watch::Receiver<u64>,
    status: watch::Receiver<RegistrationStatus>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Drop for Registrar {
    fn drop(&mut self) {
        // The task sees the cancel, revokes (bounded) and ends by itself.
        self.cancel.cancel();
    }
}

impl Registrar {
    /// Starts registering in the background; returns at once, even while
    /// etcd is unreachable (the loop keeps trying).
    ///
    /// # Errors
    /// A TTL below [`MIN_TTL`], a weight readers would reject
    /// ([`RegistrarError::Weight`]), or an address no client can dial
    /// ([`RegistrarError::Undialable`]: a wildcard such as `0.0.0.0:3000`,
    /// as a listener bound to all interfaces reports, or port 0).
    ///
    /// # Panics
    /// Outside a Tokio runtime (it spawns its loop there).
    pub fn spawn(etcd: EtcdConfig, cfg: RegistrarConfig) -> Result<Self, RegistrarError> {
        if let Err(reason) = cfg.addr.dialable() {
            return Err(RegistrarError::Undialable {
                addr: cfg.addr.clone(),
                reason,
            });
        }
        if cfg.weight > schema::MAX_WEIGHT {
            return Err(RegistrarError::Weight(cfg.weight));
        }
        if cfg.ttl < MIN_TTL {
            return Err(RegistrarError::Config(format!(
                "ttl {:?} is below etcd's minimum of {MIN_TTL:?}",
                cfg.ttl
            )));
        }
        let endpoint = Endpoint::new(&cfg.addr, cfg.version.clone(), cfg.weight);
        endpoint.to_json()?;
        let (desired, desired_rx) = watch::channel((0, endpoint));
        let (applied_tx, applied) = watch::channel(0);
        let (status_tx, status) = watch::channel(RegistrationStatus::Connecting);
        let cancel = CancellationToken::new();
        let span = info_span!("registrar", service = %cfg.service, addr = %cfg.addr);
        let worker = Worker {
            key: schema::key(&cfg.root, &cfg.service, &cfg.addr),
            ttl: Duration::from_secs(cfg.ttl.as_secs().max(MIN_TTL.as_secs())),
            session: Session::new(etcd.require_leader()),
            keeper: None,
            desired: desired_rx,
            applied: applied_tx,
            status: status_tx,
            cancel: cancel.clone(),
            granted_at: None,
        };
        let task = tokio::spawn(worker.run().instrument(span));
        Ok(Self {
            desired,
            applied,
            status,
            cancel,
            task: Some(task),
        })
    }

    /// Watches the registration status.
    pub fn status(&self) -> watch::Receiver<RegistrationStatus> {
        self.status.clone()
    }

    /// Changes the advertised weight (0 = draining) and waits until etcd has
    /// it, or until `wait` passes. Returns whether it was written (or whether
    /// there was nothing to update because we are not registered).
    ///
    /// # Errors
    /// [`RegistrarError::Weight`] for a weight above [`schema::MAX_WEIGHT`]
    /// (readers would reject the value; it is not clamped), and nothing
    /// changes.
    pub async fn set_weight(&self, weight: u32, wait: Duration) -> Result<bool, RegistrarError> {
        if weight > schema::MAX_WEIGHT {
            return Err(RegistrarError::Weight(weight));
        }
        let mut generation = 0;
        self.desired.send_modify(|(g, ep)| {
            *g += 1;
            generation = *g;
            ep.weight = weight;
        });
        let mut applied = self.applied.clone();
        Ok(timeout(wait, applied.wait_for(|g| *g >= generation))
            .await
            .is_ok_and(|r| r.is_ok()))
    }

    /// Stops the loop and revokes the lease (deleting the key), waiting at
    /// most `wait`. If etcd cannot be reached the key expires with its TTL.
    pub async fn deregister(mut self, wait: Duration) {
        self.cancel.cancel();
        let Some(mut task) = self.task.take() else {
            return;
        };
        if timeout(wait, &mut task).await.is_err() {
            warn!("deregistration timed out; the key expires with its lease");
            task.abort();
        }
    }
}

/// Why a session with etcd ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("etcd no longer knows lease {0:x}")]
    LeaseLost(i64),
    #[error("no keep-alive answer for lease {0:x} within two thirds of its TTL")]
    KeepAliveSilent(i64),
    #[error("the watch on our key was cancelled: {0}")]
    WatchCancelled(String),
}

/// What a batch of events on our own key leaves it as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnKey {
    /// On our lease.
    Ours,
    /// Gone, or written without a lease: claim it.
    Claim,
    /// On another live lease.
    Foreign(i64),
}

/// Decides by the batch's last event, the key's state once the batch is
/// applied. Going event by event and passing over our own Puts would let an
/// older foreign Put in the same batch have the last word, and the
/// registrar believe it lost a key it holds.
fn own_key_after(events: impl IntoIterator<Item = (EventType, i64)>, id: i64) -> Option<OwnKey> {
    events.into_iter().last().map(|(kind, lease)| match kind {
        EventType::Delete => OwnKey::Claim,
        EventType::Put if lease == id => OwnKey::Ours,
        EventType::Put if lease == 0 => OwnKey::Claim,
        EventType::Put => OwnKey::Foreign(lease),
    })
}

/// Runs a registration write unless the lease turns unsure or lost first:
/// a call stuck on a silent member must not hold up acting on the lease
/// keeper's news while the lease can still be saved. (Abandoning a fenced
/// write is safe: the next claim reads the key again.)
async fn guarded<T>(
    lease: &mut watch::Receiver<LeaseState>,
    id: i64,
    op: impl std::future::Future<Output = Result<T, SessionError>>,
) -> Result<T, SessionError> {
    tokio::select! {
        r = op => r,
        e = lease_trouble(lease, id) => Err(e),
    }
}

/// Resolves when the lease is no longer proven alive.
async fn lease_trouble(lease: &mut watch::Receiver<LeaseState>, id: i64) -> SessionError {
    loop {
        match *lease.borrow_and_update() {
            LeaseState::Lost => return SessionError::LeaseLost(id),
            LeaseState::Unsure => return SessionError::KeepAliveSilent(id),
            LeaseState::Valid { .. } => {}
        }
        if lease.changed().await.is_err() {
            return SessionError::LeaseLost(id);
        }
    }
}

struct Worker {
    key: String,
    ttl: Duration,
    /// With require-leader: a member cut off from its peers fails our calls
    /// and ends our watch instead of answering from stale data.
    session: Session,
    /// Keeps the current lease alive; survives our reconnects.
    keeper: Option<LeaseKeeper>,
    desired: watch::Receiver<(u64, Endpoint)>,
    applied: watch::Sender<u64>,
    status: watch::Sender<RegistrationStatus>,
    cancel: CancellationToken,
    /// When the current lease was granted (None before the first grant).
    granted_at: Option<Instant>,
}

impl Worker {
    async fn run(mut self) {
        // Retry at least about four times per TTL: after an outage (etcd
        // restarted, a cluster regaining its quorum) the lease survives only
        // if a keep-alive lands within one TTL of etcd's return, so the wait
        // between attempts must stay well below the TTL.
        let max_delay = (self.ttl / 4).clamp(Duration::from_millis(200), Duration::from_secs(5));
        let mut backoff = Backoff::new(Duration::from_millis(200), max_delay);
        // Separate from `backoff`, which every successful claim resets: a
        // lease lost right after each grant (a revoking script, an etcd
        // that forgets leases) still claims successfully in between.
        let mut lease_backoff = Backoff::new(Duration::from_millis(200), max_delay);
        while !self.cancel.is_cancelled() {
            let result = match self.attach(&mut backoff).await {
                Err(SessionError::Etcd(e)) if is_lease_not_found(&e) => Err(
                    SessionError::LeaseLost(self.keeper.as_ref().map_or(0, LeaseKeeper::id)),
                ),
                other => other,
            };
            match result {
                Ok(()) => break,
                Err(SessionError::LeaseLost(id)) => {
                    self.keeper = None;
                    self.set_status(RegistrationStatus::Connecting);
                    let lived = self.granted_at.map(|t| t.elapsed());
                    if lived.is_none_or(|l| l >= self.ttl) {
                        // A lease that served its TTL: not a failure of
                        // etcd, register again at once.
                        lease_backoff.reset();
                        info!(lease = id, "lease lost; registering with a new lease");
                        continue;
                    }
                    let delay = lease_backoff.next_delay();
                    warn!(
                        lease = id,
                        ?lived,
                        ?delay,
                        attempt = lease_backoff.attempts(),
                        "lease lost soon after its grant; waiting before granting another"
                    );
                    self.ack_desired();
                    tokio::select! {
                        () = tokio::time::sleep(delay) => continue,
                        () = self.cancel.cancelled() => break,
                    }
                }
                Err(e) => {
                    self.set_status(RegistrationStatus::Connecting);
                    // The backoff is reset by every successful registration,
                    // so attempt 0 is the first failure of a streak.
                    if backoff.attempts() == 0 {
                        warn!(error = %e, "etcd unreachable or failing; retrying with backoff");
                    } else {
                        debug!(error = %e, attempt = backoff.attempts(), "still failing");
                    }
                    // A silent member, or one whose watch etcd cancelled
                    // (no leader): dial the next one. (The session itself
                    // moves on after a timeout or an Unavailable answer, and
                    // logs in again after a refused token.)
                    if matches!(
                        e,
                        SessionError::KeepAliveSilent(_) | SessionError::WatchCancelled(_)
                    ) {
                        self.session.reset();
                    }
                }
            }
            // Nothing to write while etcd is away: acknowledge value changes
            // so a draining server is not held up; the next registration
            // writes the current value.
            self.ack_desired();
            let delay = backoff.next_delay();
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.cancel.cancelled() => break,
            }
        }
        if let Some(keeper) = self.keeper.take() {
            let id = keeper.id();
            keeper.stop().await;
            self.revoke(id).await;
        }
        self.set_status(RegistrationStatus::Deregistered);
    }

    /// Revokes lease `id` (deleting our key), trying the members in turn: a
    /// member cut off from its peers, or left without a leader, does not
    /// answer, where the majority may through another. A key left behind
    /// holds the address until its lease expires, and a leader election
    /// on the way renews every lease: the process restarted on the same
    /// address waits behind it (it never takes a key on another live
    /// lease), for 12 s in one run of the robustness harness. Each try is
    /// bounded by [`REVOKE_TRY`], all by [`REVOKE_FOR`]; the handle's
    /// deregistration wait bounds the whole as well.
    async fn revoke(&mut self, id: i64) {
        let until = Instant::now() + REVOKE_FOR;
        let mut tries = 0u32;
        loop {
            tries += 1;
            let left = until.saturating_duration_since(Instant::now());
            let answer = timeout(
                REVOKE_TRY.min(left),
                self.session
                    .call(|mut c| async move { c.lease_revoke(id).await }),
            )
            .await;
            let error = match answer {
                Ok(Ok(_)) => {
                    info!(
                        lease = id,
                        tries, "deregistered: lease revoked, key deleted"
                    );
                    return;
                }
                // An earlier try's answer was lost on its way back.
                Ok(Err(e)) if is_lease_not_found(&e) => {
                    info!(
                        lease = id,
                        tries, "deregistered: the lease was already revoked"
                    );
                    return;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => {
                    self.session.reset();
                    format!("no answer within {:?}", REVOKE_TRY.min(left))
                }
            };
            let pause = Duration::from_millis(200);
            if Instant::now() + pause >= until {
                warn!(lease = id, tries, %error, "revoke failed; the key expires with its lease");
                return;
            }
            debug!(lease = id, tries, %error, "revoke failed; trying the next member");
            tokio::time::sleep(pause).await;
        }
    }

    fn set_status(&self, status: RegistrationStatus) {
        self.status.send_if_modified(|s| {
            if *s == status {
                return false;
            }
            match &status {
                RegistrationStatus::Registered { lease } => {
                    info!(lease, key = %self.key, "registered")
                }
                RegistrationStatus::Conflict { owner_lease } => warn!(
                    owner_lease,
                    key = %self.key,
                    "address owned by another live lease; not overwriting, waiting for it to expire"
                ),
                RegistrationStatus::Connecting | RegistrationStatus::Deregistered => {}
            }
            *s = status;
            true
        });
    }

    /// Acknowledges every change so far without writing it: only where
    /// there is nothing to write (etcd away, the key not ours); the next
    /// registration writes the current value.
    fn ack_desired(&mut self) {
        let generation = self.desired.borrow_and_update().0;
        self.mark_written(generation);
    }

    /// Acknowledges the changes up to `generation`, which etcd now holds.
    /// Never more: a change that arrives while a write is in flight stays
    /// pending (the desired channel still reports it), so it is written
    /// next instead of being marked done.
    fn mark_written(&self, generation: u64) {
        self.applied.send_if_modified(|g| {
            if generation > *g {
                *g = generation;
                true
            } else {
                false
            }
        });
    }

    /// The value to write now and its generation.
    fn value(&self) -> (u64, String) {
        let desired = self.desired.borrow();
        let json = desired
            .1
            .to_json()
            .expect("weight validated at spawn and clamped in set_weight");
        (desired.0, json)
    }

    /// The lease to register on: the one we keep, or a new grant.
    async fn lease(&mut self) -> Result<(i64, watch::Receiver<LeaseState>), SessionError> {
        if let Some(k) = &self.keeper {
            return Ok((k.id(), k.state()));
        }
        let keeper = LeaseKeeper::grant(&mut self.session, self.ttl).await?;
        self.granted_at = Some(Instant::now());
        let out = (keeper.id(), keeper.state());
        self.keeper = Some(keeper);
        Ok(out)
    }

    /// One connected stretch: watch our key, claim it, keep it, until an
    /// error or cancel. The lease keeper runs on its own meanwhile.
    async fn attach(&mut self, backoff: &mut Backoff) -> Result<(), SessionError> {
        let (id, mut lease) = self.lease().await?;
        // Only register on a lease proven alive (after a silence the keeper
        // is dialing again; it says when it has an answer).
        loop {
            match *lease.borrow_and_update() {
                LeaseState::Lost => return Err(SessionError::LeaseLost(id)),
                s if s.is_valid(Instant::now()) => break,
                _ => {}
            }
            tokio::select! {
                () = self.cancel.cancelled() => return Ok(()),
                r = lease.changed() => if r.is_err() { return Err(SessionError::LeaseLost(id)) },
                () = tokio::time::sleep(self.ttl) => return Err(SessionError::KeepAliveSilent(id)),
            }
        }

        let key = self.key.clone();
        let mut watch = self
            .session
            .call(|mut c| async move { c.watch(key, None).await })
            .await?;
        match self.session.bounded(watch.message()).await? {
            Some(r) if r.created() => {}
            Some(r) => return Err(SessionError::WatchCancelled(r.cancel_reason().to_owned())),
            None => return Err(EtcdError::StreamEnded("watch").into()),
        }

        let mut registered = guarded(&mut lease, id, self.claim(id)).await?;
        backoff.reset();
        let period = (self.ttl / 3).max(Duration::from_millis(500));
        let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            tokio::select! {
                () = self.cancel.cancelled() => return Ok(()),
                _ = ticker.tick() => {
                    // The watch may sit on a member that lost its peers
                    // and stay silent until etcd notices: confirm the key
                    // with a read (the claim reads it and writes only when
                    // it must).
                    registered = guarded(&mut lease, id, self.claim(id)).await?;
                }
                changed = lease.changed() => {
                    if changed.is_err() {
                        return Err(SessionError::LeaseLost(id));
                    }
                    match *lease.borrow_and_update() {
                        LeaseState::Lost => return Err(SessionError::LeaseLost(id)),
                        LeaseState::Unsure => return Err(SessionError::KeepAliveSilent(id)),
                        LeaseState::Valid { .. } => {}
                    }
                }
                msg = watch.message() => {
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return Err(EtcdError::StreamEnded("watch").into()),
                        Err(e) => return Err(self.session.check(e).into()),
                    };
                    if resp.canceled() {
                        return Err(SessionError::WatchCancelled(resp.cancel_reason().to_owned()));
                    }
                    let events = resp
                        .events()
                        .iter()
                        .filter_map(|e| e.kv().map(|kv| (e.event_type(), kv.lease())));
                    match own_key_after(events, id) {
                        None => {}
                        // Ours again (our own write, seen late): confirm,
                        // and write a newer value if any.
                        Some(OwnKey::Ours) if !registered => {
                            registered = guarded(&mut lease, id, self.claim(id)).await?;
                        }
                        Some(OwnKey::Ours) => {}
                        Some(OwnKey::Claim) => {
                            if registered {
                                info!(lease = id, "our key vanished or lost its lease; registering again");
                            }
                            registered = guarded(&mut lease, id, self.claim(id)).await?;
                        }
                        Some(OwnKey::Foreign(owner_lease)) => {
                            registered = false;
                            self.set_status(RegistrationStatus::Conflict { owner_lease });
                        }
                    }
                }
                changed = self.desired.changed() => {
                    if changed.is_err() {
                        // The handle is gone: it cancelled us on drop.
                        return Ok(());
                    }
                    if registered {
                        // Marks the change seen before writing: one that
                        // arrives during the write wakes this branch again.
                        self.desired.borrow_and_update();
                        registered = guarded(&mut lease, id, self.update(id)).await?;
                    }
                    if !registered {
                        // Not ours to write: nothing holds the drain up.
                        self.ack_desired();
                    }
                }
            }
        }
    }

    /// Fenced registration: put our value only where the key is absent,
    /// lease-less or already ours. Returns whether we own the key now.
    async fn claim(&mut self, id: i64) -> Result<bool, SessionError> {
        for _ in 0..5 {
            let key = self.key.as_str();
            let current = self
                .session
                .call(|mut c| async move { c.get(key, None).await })
                .await?;
            let (generation, value) = self.value();
            let compare = match current.kvs().first() {
                // The defect of a broken build: a registered server finds
                // its key gone and writes nothing.
                None if matches!(*self.status.borrow(), RegistrationStatus::Registered { .. })
                    && failpoints::fire(failpoints::REGISTRAR_NO_REREGISTER).is_some() =>
                {
                    return Ok(false);
                }
                None => Compare::create_revision(key, CompareOp::Equal, 0),
                Some(kv) if kv.lease() == id => {
                    if kv.value() == value.as_bytes() {
                        self.mark_written(generation);
                        self.set_status(RegistrationStatus::Registered { lease: id });
                        return Ok(true);
                    }
                    Compare::lease(key, CompareOp::Equal, id)
                }
                Some(kv) if kv.lease() == 0 => {
                    info!(
                        mod_revision = kv.mod_revision(),
                        "taking over a lease-less key on our address"
                    );
                    Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision())
                }
                Some(kv) => {
                    self.set_status(RegistrationStatus::Conflict {
                        owner_lease: kv.lease(),
                    });
                    return Ok(false);
                }
            };
            let txn = Txn::new().when([compare]).and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(id)),
            )]);
            if self
                .session
                .call(|mut c| async move { c.txn(txn).await })
                .await?
                .succeeded()
            {
                self.mark_written(generation);
                self.set_status(RegistrationStatus::Registered { lease: id });
                return Ok(true);
            }
        }
        // Lost the race five times in a row: someone else keeps writing.
        // Report the conflict and wait for the next event on the key.
        let key = self.key.as_str();
        let owner = self
            .session
            .call(|mut c| async move { c.get(key, None).await })
            .await?
            .kvs()
            .first()
            .map_or(0, |kv| kv.lease());
        self.set_status(RegistrationStatus::Conflict { owner_lease: owner });
        Ok(false)
    }

    /// Rewrites our value (e.g. weight 0 for draining) only while the key is
    /// still on our lease.
    async fn update(&mut self, id: i64) -> Result<bool, SessionError> {
        let (generation, value) = self.value();
        let key = self.key.as_str();
        let txn = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, id)])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(id)),
            )]);
        if self
            .session
            .call(|mut c| async move { c.txn(txn).await })
            .await?
            .succeeded()
        {
            debug!(lease = id, generation, "value updated");
            self.mark_written(generation);
            Ok(true)
        } else {
            self.claim(id).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_event_on_our_key_decides() {
        let (us, them) = (7, 9);
        // Defect 8 of issue 10: an older foreign Put in the same batch as
        // our own Put.
        assert_eq!(
            own_key_after([(EventType::Put, them), (EventType::Put, us)], us),
            Some(OwnKey::Ours)
        );
        assert_eq!(
            own_key_after([(EventType::Put, us), (EventType::Put, them)], us),
            Some(OwnKey::Foreign(them))
        );
        assert_eq!(
            own_key_after([(EventType::Put, us), (EventType::Delete, 0)], us),
            Some(OwnKey::Claim)
        );
        assert_eq!(
            own_key_after([(EventType::Put, them), (EventType::Put, 0)], us),
            Some(OwnKey::Claim)
        );
        assert_eq!(own_key_after([], us), None);
    }
}
