//! A small world on loopback for one harness run: a 3-member etcd cluster,
//! greet-server processes and two controller replicas (the real binaries),
//! in-process clients of the library under load, a recorder of every etcd
//! event under the prefix, and the nemesis running a seed's schedule.
//! Everything is recorded into one [`History`] on one [`Clock`].
//!
//! The controllers' deletions come from their own log lines (JSON,
//! `deleted stale registration`): the line is written by the leader right
//! after its fenced delete transaction succeeded and names the address, the
//! mod revision the decision was fenced on and the reason, with the
//! controller's timestamp. Neither its metrics (counts by service and
//! reason, no address) nor its HTTP view (members now, not what was
//! removed) say which key went when, and an etcd delete event alone does
//! not say who deleted (a lease expiry and a drain's revoke look the same).
//! The log of a replica is read when the replica is replaced and at the
//! end of the run, before its process (and log file) is dropped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use etcd_lb::{BalancerConfig, DiscoveryConfig, EtcdConfig, RetryPolicy, ServiceName};
use etcd_lb_registry::schema::{parse_value, Addr};
use etcd_lb_testkit::{bin_path, free_port, Cluster, Proc};
use greet_proto::paths::{MORNING, NIGHT};
use greet_proto::{GreetClient, GreetRequest};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio_util::sync::CancellationToken;

use crate::checker::Bounds;
use crate::failpoints::Failpoints;
use crate::history::{
    Call, Clock, ControllerDeletion, EndpointSet, EtcdEvent, EventKind, ExplicitDelete, FaultKind,
    FaultMark, History, ServerEvent, ServerMark, ViewChange,
};
use crate::nemesis::{schedule, Step};

/// The service every server registers.
pub const SERVICE: &str = "greet_service";
/// Its prefix.
pub const PREFIX: &str = "/ns/greet_service/";
/// The controllers' election key (outside the registry prefix).
pub const ELECTION_KEY: &str = "/harness/controller/leader";

/// What a run looks like.
#[derive(Debug, Clone)]
pub struct WorldConfig {
    /// The schedule's seed.
    pub seed: u64,
    /// How long faults are injected.
    pub duration: Duration,
    /// Quiet time after the last fault heals, before recording stops.
    pub quiet: Duration,
    /// greet-servers.
    pub servers: usize,
    /// In-process clients.
    pub clients: u32,
    /// Concurrent call loops per client.
    pub loops: u32,
    /// Each call's deadline.
    pub call_timeout: Duration,
    /// The servers' lease TTL.
    pub ttl: &'static str,
    /// The servers' `--drain`.
    pub drain: &'static str,
    /// A deliberately broken client 0, to show the harness catches it.
    pub mutant: Option<Mutant>,
    /// A fixed schedule instead of the seed's.
    pub plan: Option<Vec<Step>>,
    /// Controller replicas (the real binary; one leads and deletes).
    pub controllers: usize,
    /// The controllers' `--dead-after`: short, so a killed or paused
    /// server is often deleted before it heals, which exercises both the
    /// deletions (invariant f) and the re-registrations (invariant g).
    pub dead_after: &'static str,
    /// Keep each controller replica's log here (`<seed>-controller-<i>.log`,
    /// appended across restarts): the evidence behind an (f) violation,
    /// whose probe failures only the controller saw.
    pub log_dir: Option<std::path::PathBuf>,
    /// Failpoints set inside the real code for the run (in this process
    /// for the clients, `FAILPOINTS` for the servers and controllers):
    /// in-code faults, or a deliberately broken build. Needs the
    /// `failpoints` feature; see [`crate::failpoints`].
    pub failpoints: Failpoints,
    /// Fixed tracks run side by side instead of the seed's schedule (takes
    /// precedence over `plan`, which is one track).
    pub tracks: Option<Vec<Vec<Step>>>,
    /// Run a grpcio client (gRPC's C core, python3) over xDS from the last
    /// controller replica beside the library's clients, as client
    /// `clients` (the next index): its calls are recorded and judged by
    /// (d) and (e); it has no view to record.
    pub xds_client: bool,
}

/// Deliberately broken clients: a run with one must be flagged by the
/// checker, or the harness cannot see that kind of defect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutant {
    /// Client 0 is not the library but a naive discovery over the same
    /// [`etcd_lb::Balancer`]: it lists and watches etcd member 0 only and
    /// empties its view whenever its stream fails (no static stability).
    EmptyOnOutage,
    /// Client 0 is the same naive discovery, which keeps its view on
    /// failures but ignores drains: weight-0 puts and deletes are dropped,
    /// so it keeps sending calls to a draining server.
    IgnoreDrains,
    /// Client 0 is the same naive discovery, which keeps its view on
    /// failures but drops the first delete event it is sent while its
    /// revision moves past it (a lost watch event, or a watch resumed past
    /// an undelivered one).
    DropFirstDelete,
    /// The clients are sound; the controllers are blind: their probes
    /// time out after 1 µs and their safety valve is off
    /// (`--max-unhealthy-ratio 1`), so they delete servers that answer.
    BlindControllers,
}

impl Mutant {
    /// Whether it replaces client 0 (the others break something else).
    pub fn is_client(self) -> bool {
        !matches!(self, Mutant::BlindControllers)
    }
}

impl WorldConfig {
    /// Defaults for `seed` and `duration`: 3 servers, 2 controllers, 2
    /// clients of 2 loops, 8 s of quiet, 2 s deadlines, 4 s leases.
    pub fn new(seed: u64, duration: Duration) -> Self {
        Self {
            seed,
            duration,
            quiet: Duration::from_secs(8),
            servers: 3,
            clients: 2,
            loops: 2,
            call_timeout: Duration::from_secs(2),
            ttl: "4s",
            drain: "1s",
            mutant: None,
            plan: None,
            controllers: 2,
            dead_after: "1s",
            log_dir: None,
            failpoints: Failpoints::default(),
            tracks: None,
            xds_client: false,
        }
    }
}

type Shared = Arc<Mutex<History>>;

fn record(h: &Shared, f: impl FnOnce(&mut History)) {
    f(&mut h.lock().expect("history lock"));
}

fn spawn_server(eps: &str, port: u16, cfg: &WorldConfig) -> Result<Proc> {
    let args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--etcd-endpoints",
        eps,
        "--drain",
        cfg.drain,
        "--ttl",
        cfg.ttl,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // The registry's info lines (each registration, each lease lost)
    // explain a (g) finding when the log is kept.
    let mut env = vec![("RUST_LOG", "warn,etcd_lb_registry=info")];
    env.extend(Failpoints::env(&cfg.failpoints.servers));
    Proc::spawn(
        &format!("server:{port}"),
        bin_path("greet-server"),
        &args,
        &env,
    )
}

/// One controller replica and the index it is known by.
struct Controller {
    proc: Proc,
    index: usize,
    /// Its `--xds-listen` port, the same across restarts.
    xds_port: Option<u16>,
}

fn spawn_controller(
    eps: &str,
    index: usize,
    cfg: &WorldConfig,
    xds_port: Option<u16>,
) -> Result<Controller> {
    let blind = cfg.mutant == Some(Mutant::BlindControllers);
    let mut args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
        "--etcd-endpoints",
        eps,
        "--probe-interval",
        "300ms",
        "--probe-timeout",
        if blind { "1us" } else { "250ms" },
        "--max-unhealthy-ratio",
        if blind { "1" } else { "0.5" },
        "--dead-after",
        cfg.dead_after,
        "--election-key",
        ELECTION_KEY,
        "--election-ttl",
        "3s",
        "--replica-name",
        &format!("ctl{index}"),
        "--log-format",
        "json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Probe failures are logged at debug by the reconciler.
    let mut env = vec![(
        "RUST_LOG",
        "warn,controller=info,controller::reconcile=debug",
    )];
    env.extend(Failpoints::env(&cfg.failpoints.controllers));
    if let Some(port) = xds_port {
        args.extend(["--xds-listen".to_owned(), format!("127.0.0.1:{port}")]);
    }
    let proc = Proc::spawn(
        &format!("controller-{index}"),
        bin_path("controller"),
        &args,
        &env,
    )?;
    Ok(Controller {
        proc,
        index,
        xds_port,
    })
}

/// The deletions a controller's log reports (JSON lines); lines that are
/// not JSON or not a deletion are skipped, never fatal.
pub fn deletions_in_log(log: &str, controller: &str, clock: &Clock) -> Vec<ControllerDeletion> {
    log.lines()
        .filter(|l| l.contains("deleted stale registration"))
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let f = &v["fields"];
            if f["message"] != "deleted stale registration" {
                return None;
            }
            let wall = humantime::parse_rfc3339_weak(v["timestamp"].as_str()?).ok()?;
            Some(ControllerDeletion {
                at: clock.at_wall(wall),
                controller: controller.to_owned(),
                addr: f["addr"].as_str()?.to_owned(),
                mod_revision: f["mod_revision"].as_i64()?,
                reason: f["reason"].as_str().unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

/// Records the deletions in `c`'s log so far (called before its process,
/// and its log file, goes), and keeps the log in `cfg.log_dir` if set.
fn harvest(c: &Controller, clock: Clock, h: &Shared, cfg: &WorldConfig) {
    let log = c.proc.log();
    let found = deletions_in_log(&log, &format!("controller-{}", c.index), &clock);
    let seed = {
        let mut h = h.lock().expect("history lock");
        h.deletions.extend(found);
        crate::failpoints::count(&log, &mut h);
        h.seed
    };
    keep_log(cfg, seed, &format!("controller-{}", c.index), &log);
}

/// Appends `log` to `<seed>-<name>.log` in `cfg.log_dir`, if set (a
/// process's log goes with its process).
fn keep_log(cfg: &WorldConfig, seed: u64, name: &str, log: &str) {
    let Some(dir) = &cfg.log_dir else { return };
    use std::io::Write;
    let path = dir.join(format!("{seed}-{name}.log"));
    let kept = std::fs::create_dir_all(dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?
            .write_all(log.as_bytes())
    });
    if let Err(e) = kept {
        eprintln!("cannot keep {}: {e}", path.display());
    }
}

/// The index of the replica etcd's election names now, if any answers in
/// time.
async fn leading_controller(members: &[String]) -> Option<usize> {
    let ask = async {
        let c = Client::connect(members, None).await.ok()?;
        let r = c.election_client().leader(ELECTION_KEY).await.ok()?;
        let id = String::from_utf8_lossy(r.kv()?.value()).into_owned();
        id.strip_prefix("ctl")?
            .split('-')
            .next()?
            .parse::<usize>()
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(3), ask)
        .await
        .ok()
        .flatten()
}

/// Runs one world for `cfg` and returns what it recorded.
pub async fn run(cfg: &WorldConfig) -> Result<History> {
    // First: it may wait for another run's failpoints to be turned off.
    let armed = crate::failpoints::arm(&cfg.failpoints).await?;
    let clock = Clock::start();
    let history: Shared = Arc::new(Mutex::new(History {
        seed: cfg.seed,
        ..Default::default()
    }));
    let cancel = CancellationToken::new();
    let cluster = Cluster::start_isolatable(3)
        .await
        .context("starting etcd")?;
    let eps = cluster.endpoints_arg();
    let members = cluster.endpoints();

    // Odd while the nemesis is losing etcd's data, bumped again once the
    // cluster is back: the recorder lists the new data as a new epoch.
    let generation = Arc::new(AtomicU64::new(0));
    let recorder = tokio::spawn(recorder(
        members.clone(),
        clock,
        history.clone(),
        cancel.clone(),
        generation.clone(),
    ));

    let ports: Vec<u16> = (0..cfg.servers).map(|_| free_port()).collect();
    let addr = |i: usize| format!("127.0.0.1:{}", ports[i]);
    let mut servers = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        servers.push(spawn_server(&eps, *port, cfg)?);
        mark(&history, clock, addr(i), ServerEvent::Started);
    }
    wait_for(Duration::from_secs(30), "every server in etcd", || {
        history.lock().expect("lock").etcd_final().len() == cfg.servers
    })
    .await?;
    let mut controllers = Vec::new();
    for i in 0..cfg.controllers {
        let xds_port = cfg.xds_client.then(free_port);
        controllers.push(spawn_controller(&eps, i, cfg, xds_port)?);
    }
    if cfg.controllers > 0 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while leading_controller(&members).await.is_none() {
            if Instant::now() > deadline {
                let logs: Vec<String> = controllers.iter().map(|c| c.proc.log()).collect();
                bail!("no controller leads after 30 s:\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let mut tasks = Vec::new();
    for client in 0..cfg.clients {
        let (balancer, revision): (_, Box<dyn Fn() -> i64 + Send>) =
            if let (0, Some(mutant)) = (client, cfg.mutant.filter(|m| m.is_client())) {
                let balancer = etcd_lb::Balancer::new(BalancerConfig {
                    retry: RetryPolicy::idempotent([MORNING, NIGHT]),
                    ..BalancerConfig::new(SERVICE)
                });
                let rev = Arc::new(AtomicI64::new(0));
                tokio::spawn(naive_discovery(
                    mutant,
                    members[0].clone(),
                    balancer.clone(),
                    rev.clone(),
                    cancel.clone(),
                ));
                let b = balancer.clone();
                wait_for(Duration::from_secs(10), "the naive client's list", || {
                    b.len() == cfg.servers
                })
                .await?;
                (balancer, Box::new(move || rev.load(Ordering::Relaxed)))
            } else {
                let (balancer, discovery) = etcd_lb::connect(
                    EtcdConfig::plain(members.clone()),
                    DiscoveryConfig::new(ServiceName::new(SERVICE)?),
                    BalancerConfig {
                        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
                        ..Default::default()
                    },
                    cancel.clone(),
                );
                discovery.wait_synced(Duration::from_secs(10)).await?;
                (balancer, Box::new(move || discovery.state().revision))
            };
        tasks.push(tokio::spawn(views(
            client,
            balancer.clone(),
            revision,
            clock,
            history.clone(),
            cancel.clone(),
        )));
        for _ in 0..cfg.loops {
            tasks.push(tokio::spawn(load(
                client,
                GreetClient::new(balancer.clone()),
                cfg.call_timeout,
                clock,
                history.clone(),
                cancel.clone(),
            )));
        }
    }
    // The snapshot a restore goes back to (taken below, and again after
    // each loss of data has healed), and the xDS client's bootstrap.
    let snapshots = tempfile::Builder::new()
        .prefix("harness-snapshot")
        .tempdir()?;
    let xds = match controllers
        .last()
        .and_then(|c| c.xds_port.map(|p| (c.index, p)))
    {
        Some((serving, port)) if cfg.xds_client => {
            let client = cfg.clients;
            let child = xds_client(port, snapshots.path(), cfg, clock, &history, &cancel).await?;
            record(&history, |h| {
                h.xds_clients
                    .insert(client, format!("controller-{serving}"));
            });
            Some(child)
        }
        _ => None,
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    let tracks = cfg.tracks.clone().unwrap_or_else(|| match &cfg.plan {
        Some(plan) => vec![plan.clone()],
        None => schedule(
            cfg.seed,
            cfg.duration,
            cluster.len(),
            cfg.servers,
            cfg.controllers,
        ),
    });
    let snapshot = snapshots.path().join("etcd.db");
    cluster
        .snapshot(&snapshot)
        .await
        .context("saving the first etcd snapshot")?;
    let kit = Arc::new(Kit {
        controllers: tokio::sync::Mutex::new(controllers),
        servers: tokio::sync::Mutex::new(servers),
        cluster: tokio::sync::Mutex::new(cluster),
        members: members.clone(),
        eps: eps.clone(),
        ports: ports.clone(),
        snapshot,
        generation,
    });
    let mut runs = Vec::new();
    for steps in tracks {
        let (kit, cfg, history) = (kit.clone(), cfg.clone(), history.clone());
        runs.push(tokio::spawn(async move {
            for step in &steps {
                inject(step, &kit, &cfg, clock, &history)
                    .await
                    .with_context(|| format!("injecting {step:?}"))?;
                if step.kind.loses_data() {
                    save_snapshot(&kit).await;
                }
                tokio::time::sleep(step.gap).await;
            }
            anyhow::Ok(())
        }));
    }
    let mut failure = None;
    for r in runs {
        match r.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(e) => failure = failure.or(Some(anyhow::anyhow!("a track panicked: {e}"))),
        }
    }
    tokio::time::sleep(cfg.quiet).await;
    // A SIGKILLed server's old lease expires up to a TTL after its restart
    // (and the new process registers then): wait until etcd has been quiet
    // for the checker's quiescence bound plus a second, for at most 20 s
    // more, so convergence can be judged.
    // After a loss of etcd's data, the clients keep keys the new data
    // lacks for their wipe grace: the checker judges convergence only Q
    // after W after its heal, so wait for that too.
    let settle = Bounds::default().quiescence + Duration::from_secs(1);
    let limit = clock.now() + Duration::from_secs(20);
    let loss_settled = {
        let h = history.lock().expect("lock");
        h.faults
            .iter()
            .filter(|f| f.kind.loses_data())
            .filter_map(|f| f.end)
            .max()
            .map(|e| e + Bounds::default().data_loss + settle)
    };
    if let Some(t) = loss_settled {
        let now = clock.now();
        if t > now {
            tokio::time::sleep(t - now).await;
        }
    }
    loop {
        let last = history
            .lock()
            .expect("lock")
            .etcd
            .iter()
            .map(|e| e.at)
            .max()
            .unwrap_or_default();
        let now = clock.now();
        if now >= last + settle || now >= limit {
            break;
        }
        tokio::time::sleep((last + settle - now).min(limit - now)).await;
    }
    record(&history, |h| h.end = clock.now());
    cancel.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let _ = recorder.await;
    for c in kit.controllers.lock().await.iter() {
        harvest(c, clock, &history, cfg);
    }
    let ignored = {
        let servers = kit.servers.lock().await;
        let controllers = kit.controllers.lock().await;
        let ignored = servers
            .iter()
            .map(Proc::log)
            .chain(controllers.iter().map(|c| c.proc.log()))
            .any(|log| crate::failpoints::ignored(&log));
        for (s, port) in servers.iter().zip(&ports) {
            keep_log(cfg, cfg.seed, &format!("server-{port}"), &s.log());
        }
        record(&history, |h| {
            for s in servers.iter() {
                crate::failpoints::count(&s.log(), h);
            }
            for (name, n) in armed.hits() {
                *h.failpoint_hits.entry(name).or_default() += n;
            }
        });
        ignored
    };
    drop(armed);
    drop(xds);
    drop(kit);
    drop(snapshots);
    if let Some(e) = failure {
        return Err(e);
    }
    if ignored {
        bail!(
            "a greet-server or controller ignored FAILPOINTS (built without failpoints): \
             rebuild them with the `failpoints` feature (docs/robustness.md)"
        );
    }
    let mut h = history.lock().expect("lock").clone();
    h.calls.sort_by_key(|c| c.end);
    Ok(h)
}

fn mark(h: &Shared, clock: Clock, server: String, event: ServerEvent) {
    record(h, |h| {
        h.servers.push(ServerMark {
            at: clock.now(),
            server,
            event,
        })
    });
}

async fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !f() {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// What the nemesis acts on, shared by the tracks. Each part has its own
/// lock, held for a whole fault: the seed's tracks touch disjoint parts
/// (etcd; servers and controllers), so they never wait for each other; a
/// fixed plan that puts two faults on one part in two tracks runs them one
/// after the other. Fields drop in order: controllers, servers, etcd.
struct Kit {
    controllers: tokio::sync::Mutex<Vec<Controller>>,
    servers: tokio::sync::Mutex<Vec<Proc>>,
    cluster: tokio::sync::Mutex<Cluster>,
    members: Vec<String>,
    eps: String,
    ports: Vec<u16>,
    /// The snapshot [`FaultKind::EtcdRestore`] goes back to.
    snapshot: std::path::PathBuf,
    /// The recorder's cue: odd while etcd's data is being lost.
    generation: Arc<AtomicU64>,
}

/// Saves a fresh snapshot for the next restore (a few attempts right after
/// a restart; on failure the older snapshot stays, which a restore can go
/// back to as well).
async fn save_snapshot(kit: &Kit) {
    let cluster = kit.cluster.lock().await;
    let fresh = kit.snapshot.with_extension("new");
    for _ in 0..5 {
        match cluster.snapshot(&fresh).await {
            Ok(()) => {
                if let Err(e) = std::fs::rename(&fresh, &kit.snapshot) {
                    eprintln!("harness: keeping the older etcd snapshot: {e}");
                }
                return;
            }
            Err(e) => {
                eprintln!("harness: etcd snapshot failed, retrying: {e:#}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Injects one fault, holds it, heals it; marks its window.
async fn inject(step: &Step, kit: &Kit, cfg: &WorldConfig, clock: Clock, h: &Shared) -> Result<()> {
    let (eps, ports) = (kit.eps.as_str(), kit.ports.as_slice());
    let mut i = step.target;
    if step.kind.is_controller() {
        let replicas = kit.controllers.lock().await.len();
        if replicas == 0 {
            bail!("a controller fault in a world without controllers");
        }
        // The leader, when etcd names one; else the drawn replica.
        i = match leading_controller(&kit.members).await {
            Some(l) if l < replicas => l,
            _ => i % replicas,
        };
    }
    let target = if step.kind.loses_data() {
        "etcd".to_owned()
    } else if step.kind.is_etcd() {
        format!("etcd-{i}")
    } else if step.kind == FaultKind::MultiKeyWrite {
        "registry".to_owned()
    } else if step.kind.is_controller() {
        format!("controller-{i}")
    } else {
        format!("127.0.0.1:{}", ports[i])
    };
    // The part's lock is taken before the window opens: a fault waiting
    // for another track's fault on the same part is not under way yet.
    if step.kind.is_etcd() {
        let mut cluster = kit.cluster.lock().await;
        let index = open_window(h, clock, step.kind, &target);
        etcd_fault(step, i, &mut cluster, kit).await?;
        close_window(h, clock, index);
    } else if matches!(step.kind, FaultKind::KeyDelete | FaultKind::MultiKeyWrite) {
        // Writes through etcd, as a person or a script would (fixed plans
        // only): under the etcd lock, so no loss of data runs meanwhile.
        let cluster = kit.cluster.lock().await;
        let index = open_window(h, clock, step.kind, &target);
        if step.kind == FaultKind::KeyDelete {
            crate::failpoints::delete_key(&cluster, &target).await?;
        } else {
            crate::failpoints::halve_weights(&cluster).await?;
        }
        tokio::time::sleep(step.hold).await;
        close_window(h, clock, index);
    } else if step.kind.is_controller() {
        let mut controllers = kit.controllers.lock().await;
        let index = open_window(h, clock, step.kind, &target);
        match step.kind {
            FaultKind::ControllerKill => {
                controllers[i].proc.kill();
                harvest(&controllers[i], clock, h, cfg);
                tokio::time::sleep(step.hold).await;
                controllers[i] = spawn_controller(eps, i, cfg, controllers[i].xds_port)?;
            }
            FaultKind::ControllerPause => {
                controllers[i].proc.signal(Signal::SIGSTOP)?;
                tokio::time::sleep(step.hold).await;
                controllers[i].proc.signal(Signal::SIGCONT)?;
            }
            k => bail!("{k:?} is not a controller fault"),
        }
        close_window(h, clock, index);
    } else {
        let mut servers = kit.servers.lock().await;
        let index = open_window(h, clock, step.kind, &target);
        match step.kind {
            FaultKind::ServerKill => {
                servers[i].kill();
                keep_log(
                    cfg,
                    cfg.seed,
                    &format!("server-{}", ports[i]),
                    &servers[i].log(),
                );
                tokio::time::sleep(step.hold).await;
                servers[i] = spawn_server(eps, ports[i], cfg)?;
                mark(h, clock, target.clone(), ServerEvent::Started);
            }
            FaultKind::ServerDrain => {
                servers[i].signal(Signal::SIGTERM)?;
                mark(h, clock, target.clone(), ServerEvent::Drain);
                let code = servers[i].wait_exit(Duration::from_secs(20)).await?;
                if code != Some(0) {
                    bail!(
                        "{target} exited {code:?} after SIGTERM:\n{}",
                        servers[i].log()
                    );
                }
                mark(h, clock, target.clone(), ServerEvent::Deregistered);
                keep_log(
                    cfg,
                    cfg.seed,
                    &format!("server-{}", ports[i]),
                    &servers[i].log(),
                );
                tokio::time::sleep(step.hold).await;
                servers[i] = spawn_server(eps, ports[i], cfg)?;
                mark(h, clock, target.clone(), ServerEvent::Started);
            }
            FaultKind::ServerPause => {
                servers[i].signal(Signal::SIGSTOP)?;
                tokio::time::sleep(step.hold).await;
                servers[i].signal(Signal::SIGCONT)?;
            }
            k => bail!("{k:?} is not a server fault"),
        }
        close_window(h, clock, index);
    }
    Ok(())
}

/// Marks a fault's window open (injected now); its index in the history.
fn open_window(h: &Shared, clock: Clock, kind: FaultKind, target: &str) -> usize {
    let start = clock.now();
    let mut h = h.lock().expect("lock");
    h.faults.push(FaultMark {
        kind,
        target: target.to_owned(),
        start,
        end: None,
    });
    h.faults.len() - 1
}

/// Marks the window `index` healed now.
fn close_window(h: &Shared, clock: Clock, index: usize) {
    let end = clock.now();
    record(h, |h| h.faults[index].end = Some(end));
}

/// Injects, holds and heals one etcd fault on member `i` (the whole
/// cluster for a loss of data).
async fn etcd_fault(step: &Step, i: usize, cluster: &mut Cluster, kit: &Kit) -> Result<()> {
    let signal_member = |cluster: &Cluster, sig| -> Result<()> {
        let pid = cluster.pid(i).context("member not running")?;
        kill(Pid::from_raw(pid as i32), sig).context("signalling etcd")
    };
    match step.kind {
        FaultKind::EtcdKill => {
            cluster.kill(i);
            tokio::time::sleep(step.hold).await;
            cluster.restart(i).await?;
        }
        FaultKind::EtcdPause => {
            signal_member(cluster, Signal::SIGSTOP)?;
            tokio::time::sleep(step.hold).await;
            signal_member(cluster, Signal::SIGCONT)?;
        }
        FaultKind::EtcdIsolate => {
            cluster.isolate(i).await?;
            tokio::time::sleep(step.hold).await;
            cluster.rejoin(i).await?;
        }
        FaultKind::EtcdCompact => {
            compact(cluster, i).await?;
            tokio::time::sleep(step.hold).await;
        }
        FaultKind::EtcdRestore | FaultKind::EtcdWipe => {
            // Odd: the recorder stops trusting what it receives, before any
            // member goes.
            kit.generation.fetch_add(1, Ordering::SeqCst);
            for m in 0..cluster.len() {
                cluster.kill(m);
            }
            tokio::time::sleep(step.hold).await;
            let from = (step.kind == FaultKind::EtcdRestore).then_some(kit.snapshot.as_path());
            let restored = cluster.restore(from).await;
            // Even again: the data now is the new history's.
            kit.generation.fetch_add(1, Ordering::SeqCst);
            restored?;
        }
        k => bail!("{k:?} is not an etcd fault"),
    }
    Ok(())
}

/// Compacts at the current revision (physical), then defragments member
/// `i`.
async fn compact(cluster: &Cluster, i: usize) -> Result<()> {
    let attempt = || async {
        let mut c = cluster.client().await?;
        let r = c
            .get(
                PREFIX,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        let rev = r.header().map_or(0, |h| h.revision());
        let compacted = c
            .compact(
                rev,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await;
        // Nothing written since the last compaction: already compacted.
        match compacted {
            Err(e) if e.to_string().contains("has been compacted") => {}
            r => {
                r?;
            }
        }
        let mut m = Client::connect([cluster.endpoint(i)], None).await?;
        m.defragment().await?;
        anyhow::Ok(())
    };
    let mut work = Box::pin(attempt());
    // Right after another etcd fault the request may meet a leader change:
    // a few attempts.
    let mut last = None;
    for _ in 0..5 {
        match tokio::time::timeout(Duration::from_secs(10), &mut work).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(anyhow::anyhow!("compaction timed out")),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        work = Box::pin(attempt());
    }
    Err(last.expect("attempted"))
}

/// Records every change of one client's view: on every change of its
/// balancer, and every 250 ms when only the discovery's revision moved (an
/// event that changed nothing in the balancer, a progress notice, or one
/// dropped by a broken client: invariant (h) needs those revisions too).
async fn views(
    client: u32,
    balancer: etcd_lb::Balancer,
    revision: Box<dyn Fn() -> i64 + Send>,
    clock: Clock,
    h: Shared,
    cancel: CancellationToken,
) {
    let mut changes = balancer.changes();
    let mut last: Option<(i64, EndpointSet)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let endpoints: EndpointSet = balancer
            .endpoints()
            .into_iter()
            .map(|e| (e.addr.to_string(), e.weight))
            .collect();
        let revision = revision();
        if last.as_ref() != Some(&(revision, endpoints.clone())) {
            let at = clock.now();
            record(&h, |h| {
                h.views.push(ViewChange {
                    at,
                    client,
                    revision,
                    endpoints: endpoints.clone(),
                })
            });
            last = Some((revision, endpoints));
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = changes.changed() => if r.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

/// Starts the grpcio client over xDS from the controller replica serving
/// on `port` (`reliability/grpcio/xds_load.py`, bootstrapped by `controller
/// xds-bootstrap`), records each of its calls as client `cfg.clients` on
/// the run's clock (it prints wall-clock times), and waits for its first
/// answer. The process goes when the returned child is dropped.
async fn xds_client(
    port: u16,
    dir: &std::path::Path,
    cfg: &WorldConfig,
    clock: Clock,
    h: &Shared,
    cancel: &CancellationToken,
) -> Result<tokio::process::Child> {
    use tokio::io::AsyncBufReadExt;
    let out = std::process::Command::new(bin_path("controller"))
        .args(["xds-bootstrap", "--server"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--node-id", "harness-xds"])
        .output()
        .context("controller xds-bootstrap")?;
    if !out.status.success() {
        bail!(
            "xds-bootstrap: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let bootstrap = dir.join("xds-bootstrap.json");
    std::fs::write(&bootstrap, &out.stdout)?;
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("grpcio/xds_load.py");
    let mut child = tokio::process::Command::new("python3")
        .arg(script)
        .arg(format!("xds:///{SERVICE}"))
        .arg(cfg.call_timeout.as_secs_f64().to_string())
        .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("python3 with grpcio (scripts/setup.sh installs it)")?;
    let stdout = child.stdout.take().context("its stdout")?;
    let (client, h2, cancel) = (cfg.clients, h.clone(), cancel.clone());
    let wall = move |secs: f64| {
        clock.at_wall(std::time::UNIX_EPOCH + Duration::from_secs_f64(secs.max(0.0)))
    };
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        // Calls before the first answer (the channel resolving over xDS)
        // are the start-up's, not the run's.
        let mut answered = false;
        loop {
            let line = tokio::select! {
                _ = cancel.cancelled() => return,
                l = lines.next_line() => l,
            };
            let Ok(Some(line)) = line else { return };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let (Some(start), Some(end)) = (v["start"].as_f64(), v["end"].as_f64()) else {
                continue;
            };
            let ok = v["ok"].as_bool().unwrap_or(false);
            answered |= ok;
            if !answered {
                continue;
            }
            let call = Call {
                client,
                endpoint: v["from"].as_str().map(str::to_owned),
                start: wall(start),
                end: wall(end),
                ok,
                message: v["error"].as_str().unwrap_or_default().to_owned(),
            };
            record(&h2, |h| h.calls.push(call));
        }
    });
    wait_for(
        Duration::from_secs(30),
        "the xDS client's first answer",
        || {
            h.lock()
                .expect("lock")
                .calls
                .iter()
                .any(|c| c.client == client && c.ok)
        },
    )
    .await?;
    Ok(child)
}

/// One loop of calls, each recorded.
async fn load(
    client: u32,
    mut greet: GreetClient<etcd_lb::Balancer>,
    timeout: Duration,
    clock: Clock,
    h: Shared,
    cancel: CancellationToken,
) {
    let mut n = 0u64;
    while !cancel.is_cancelled() {
        let mut req = tonic::Request::new(GreetRequest {
            name: format!("c{client}-{n}"),
        });
        req.set_timeout(timeout);
        let start = clock.now();
        let r = if n.is_multiple_of(2) {
            greet.morning(req).await
        } else {
            greet.night(req).await
        };
        let end = clock.now();
        if cancel.is_cancelled() {
            return;
        }
        let call = match r {
            Ok(reply) => Call {
                client,
                endpoint: Some(reply.into_inner().from),
                start,
                end,
                ok: true,
                message: String::new(),
            },
            Err(e) => Call {
                client,
                endpoint: None,
                start,
                end,
                ok: false,
                message: e.to_string(),
            },
        };
        record(&h, |h| h.calls.push(call));
        n += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The recorder: lists the prefix, then watches it from the next revision,
/// one member at a time (round robin), resuming after the last revision
/// seen whenever the stream fails or is silent for 3 s (a paused member).
/// Independent of the library's watcher, so it does not share its bugs.
///
/// It is told of losses of etcd's data by the nemesis, through
/// `generation` (odd while the data is being lost, even once the cluster
/// is back): a harness instrument may know what the harness did, and a
/// revision alone cannot tell a new history from the old one once the new
/// one has passed it. Nothing received while the generation differs from
/// the one it listed is recorded; on a new even generation it lists the
/// new data as a new epoch ([`History::epochs`]).
async fn recorder(
    members: Vec<String>,
    clock: Clock,
    h: Shared,
    cancel: CancellationToken,
    generation: Arc<AtomicU64>,
) {
    let mut next: Option<i64> = None;
    let mut listed = 0u64;
    let mut turn = 0usize;
    while !cancel.is_cancelled() {
        let member = members[turn % members.len()].clone();
        turn += 1;
        let round = record_from(
            &member,
            &mut next,
            &mut listed,
            &generation,
            clock,
            &h,
            &cancel,
        );
        if round.await.is_err() {
            // Another member next; the error itself (a dead or paused
            // member) is the nemesis's doing.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn event_of(
    at: Duration,
    kv_key: &[u8],
    value: &[u8],
    revision: i64,
    put: bool,
) -> Option<EtcdEvent> {
    let key = std::str::from_utf8(kv_key).ok()?;
    let addr = key.strip_prefix(PREFIX)?.to_owned();
    let weight = if put {
        Addr::new(&addr)
            .ok()
            .and_then(|a| parse_value(&a, value).ok())
            .map(|m| m.weight)
    } else {
        None
    };
    Some(EtcdEvent {
        at,
        revision,
        addr,
        kind: if put {
            EventKind::Put
        } else {
            EventKind::Delete
        },
        weight,
    })
}

/// The events a list at revision `rev` (each key's event and create
/// revision) adds to what `h` recorded: a delete at `rev` for every address
/// gone; a put for every address new or with another weight; and, for an
/// address deleted and created again since its last recorded event (its
/// create revision is newer than anything recorded for it), a delete just
/// before that creation and the put, although the weight is the same
/// (found by seed 300: a lease expiry and the restarted server's
/// registration inside a compaction gap were lost, and the clients, who
/// had seen both, were blamed).
fn relist_events(
    h: &History,
    mut list: Vec<(EtcdEvent, i64)>,
    rev: i64,
    at: Duration,
) -> Vec<EtcdEvent> {
    list.sort_by_key(|(e, _)| e.revision);
    let before = h.etcd_final();
    let listed: EndpointSet = list
        .iter()
        .filter_map(|(e, _)| Some((e.addr.clone(), e.weight?)))
        .collect();
    let mut out = Vec::new();
    for gone in before.keys().filter(|a| !listed.contains_key(*a)) {
        out.push(EtcdEvent {
            at,
            revision: rev,
            addr: gone.clone(),
            kind: EventKind::Delete,
            weight: None,
        });
    }
    // Revisions of earlier epochs say nothing about this one.
    let epoch_start = h.epochs.last().map_or(0, |e| e.first_event);
    for (e, created) in list {
        let last = h.etcd[epoch_start..]
            .iter()
            .filter(|k| k.addr == e.addr)
            .map(|k| k.revision)
            .max();
        let recreated = before.contains_key(&e.addr) && last.is_some_and(|l| created > l);
        if recreated {
            out.push(EtcdEvent {
                at,
                revision: created - 1,
                addr: e.addr.clone(),
                kind: EventKind::Delete,
                weight: None,
            });
        }
        let known = e.weight.is_some_and(|w| before.get(&e.addr) == Some(&w));
        if recreated || !known {
            out.push(e);
        }
    }
    out
}

/// Lists the prefix and records what differs from the recorded state as
/// events at the list's revision (all of it on the first list). With
/// `new_epoch` (etcd's data was lost), every key listed is recorded as a
/// put and every key gone as a delete, as the first events of a new epoch.
/// Records nothing when the data changed generation while it listed.
async fn relist(
    c: &mut Client,
    next: &mut Option<i64>,
    new_epoch: bool,
    gen: (&AtomicU64, u64),
    clock: Clock,
    h: &Shared,
) -> Result<()> {
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        c.get(PREFIX, Some(GetOptions::new().with_prefix())),
    )
    .await
    .context("list timed out")??;
    if gen.0.load(Ordering::SeqCst) != gen.1 {
        bail!("etcd's data changed generation during the list");
    }
    let at = clock.now();
    let rev = r.header().map_or(0, |h| h.revision());
    let list: Vec<(EtcdEvent, i64)> = r
        .kvs()
        .iter()
        .filter_map(|kv| {
            let e = event_of(at, kv.key(), kv.value(), kv.mod_revision(), true)?;
            Some((e, kv.create_revision()))
        })
        .collect();
    if new_epoch {
        record(h, |h| {
            let listed: BTreeMap<&str, ()> =
                list.iter().map(|(e, _)| (e.addr.as_str(), ())).collect();
            let gone: Vec<EtcdEvent> = h
                .etcd_final()
                .keys()
                .filter(|a| !listed.contains_key(a.as_str()))
                .map(|a| EtcdEvent {
                    at,
                    revision: rev,
                    addr: a.clone(),
                    kind: EventKind::Delete,
                    weight: None,
                })
                .collect();
            let first_event = h.etcd.len();
            h.epochs.push(crate::history::Epoch {
                at,
                first_event,
                revision: rev,
            });
            h.etcd.extend(gone);
            let mut puts: Vec<EtcdEvent> = list.iter().map(|(e, _)| e.clone()).collect();
            puts.sort_by_key(|e| e.revision);
            h.etcd.extend(puts);
        });
        *next = Some(rev + 1);
        return Ok(());
    }
    // What happened between the last revision watched and the list's is
    // unknown one event at a time: a gap for the checker.
    let unknown_from = next.unwrap_or(0);
    record(h, |h| {
        if unknown_from < rev {
            h.gaps.push((unknown_from, rev - 1));
        }
        let events = relist_events(h, list, rev, at);
        h.etcd.extend(events);
    });
    *next = Some(rev + 1);
    Ok(())
}

async fn record_from(
    member: &str,
    next: &mut Option<i64>,
    listed: &mut u64,
    generation: &Arc<AtomicU64>,
    clock: Clock,
    h: &Shared,
    cancel: &CancellationToken,
) -> Result<()> {
    let gen = generation.load(Ordering::SeqCst);
    if gen % 2 == 1 {
        bail!("etcd's data is being lost");
    }
    // Require a leader: an isolated member then ends the watch instead of
    // holding it silent.
    let opts = etcd_client::ConnectOptions::new().with_require_leader(true);
    let connect = Client::connect([member], Some(opts));
    let mut c = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .context("connect timed out")??;
    if next.is_none() || gen != *listed {
        // The first list, or the first since etcd's data was lost.
        let new_epoch = next.is_some();
        relist(&mut c, next, new_epoch, (generation, gen), clock, h).await?;
        *listed = gen;
    }
    let from = next.expect("listed");
    // With each delete's previous value: its lease tells an explicit
    // delete from a lease's end (see `classify_delete`).
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(from)
        .with_prev_key();
    let mut stream = tokio::time::timeout(Duration::from_secs(2), c.watch(PREFIX, Some(opts)))
        .await
        .context("watch timed out")??;
    loop {
        let msg = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            m = tokio::time::timeout(Duration::from_secs(3), stream.message()) => m,
        };
        let Ok(msg) = msg else {
            bail!("silent for 3 s");
        };
        let Some(resp) = msg? else {
            bail!("stream ended");
        };
        if generation.load(Ordering::SeqCst) != gen {
            bail!("etcd's data is being lost; nothing more from this stream");
        }
        if resp.compact_revision() > 0 {
            // Fell behind a compaction: list again and record the
            // difference, then watch on from the list's revision.
            relist(&mut c, next, false, (generation, gen), clock, h).await?;
            bail!("compacted at {}, relisted", resp.compact_revision());
        }
        let at = clock.now();
        let mut batch = Vec::new();
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let put = ev.event_type() == EventType::Put;
            if let Some(e) = event_of(at, kv.key(), kv.value(), kv.mod_revision(), put) {
                if let (false, Some(prev)) = (put, ev.prev_kv()) {
                    tokio::spawn(classify_delete(
                        c.clone(),
                        e.clone(),
                        prev.lease(),
                        (generation.clone(), gen),
                        h.clone(),
                    ));
                }
                batch.push(e);
            }
            *next = Some(kv.mod_revision() + 1);
        }
        if !batch.is_empty() {
            record(h, |h| h.etcd.extend(batch));
        }
    }
}

/// Records `delete` as explicit ([`History::explicit_deletes`]) when the
/// deleted key had no lease or its lease still lives after the delete: a
/// lease that expired or was revoked (a drain) takes its keys with it at
/// the delete's revision and is gone from then on, so a delete whose lease
/// outlives it was a delete request (in this world, only the controllers'
/// fenced transactions delete under the prefix). A lease that ends between
/// the delete and this question makes an explicit delete look like an
/// expiry (it is then not judged: lenient); the opposite cannot happen,
/// except through a restore that brings the lease back, so an answer given
/// while etcd's data changed generation is dropped.
async fn classify_delete(
    mut c: Client,
    delete: EtcdEvent,
    lease: i64,
    gen: (Arc<AtomicU64>, u64),
    h: Shared,
) {
    let mut alive = (lease == 0).then_some(true);
    // The delete came from the member the recorder watches; the member
    // that answers the question may apply a revoke (a drain) a moment
    // later, and would still show the lease: ask only after every member
    // has surely applied it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A few attempts: the member may be slow right after another fault.
    for _ in 0..3 {
        if alive.is_some() {
            break;
        }
        let ask = c.lease_time_to_live(lease, None);
        match tokio::time::timeout(Duration::from_secs(1), ask).await {
            // etcd answers TTL -1 for a lease it does not know and 0 for
            // one with under a second left, or expired with its revoke
            // not applied yet where the question is answered (the delete
            // may come from a member that applied it first): only a
            // second or more left proves the delete was not the lease's
            // end (batch 7: two expiries read as requests with `>= 0`).
            Ok(Ok(r)) => alive = Some(r.ttl() > 0),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    if gen.0.load(Ordering::SeqCst) != gen.1 || alive != Some(true) {
        return;
    }
    record(&h, |h| {
        let epoch = h.epochs.len();
        h.explicit_deletes.push(ExplicitDelete {
            at: delete.at,
            epoch,
            revision: delete.revision,
            addr: delete.addr,
            lease,
        })
    });
}

/// The mutants' discovery: list and watch one member; on any failure list
/// again, after forgetting every endpoint ([`Mutant::EmptyOnOutage`]); drop
/// weight-0 puts and deletes ([`Mutant::IgnoreDrains`]).
async fn naive_discovery(
    mutant: Mutant,
    member: String,
    balancer: etcd_lb::Balancer,
    rev: Arc<AtomicI64>,
    cancel: CancellationToken,
) {
    let ignore_drains = mutant == Mutant::IgnoreDrains;
    let drop_delete = std::sync::atomic::AtomicBool::new(mutant == Mutant::DropFirstDelete);
    let apply = |e: &EtcdEvent| match (e.kind, e.weight, Addr::new(&e.addr)) {
        (_, Some(0), _) | (EventKind::Delete, _, _) if ignore_drains => {}
        (EventKind::Delete, _, _) if drop_delete.swap(false, Ordering::Relaxed) => {}
        (EventKind::Put, Some(w), Ok(a)) => balancer.upsert(&a, w, ""),
        (_, _, Ok(a)) => balancer.remove(&a),
        _ => {}
    };
    while !cancel.is_cancelled() {
        let round = async {
            let mut c = tokio::time::timeout(
                Duration::from_secs(2),
                Client::connect([member.as_str()], None),
            )
            .await??;
            let r = tokio::time::timeout(
                Duration::from_secs(2),
                c.get(PREFIX, Some(GetOptions::new().with_prefix())),
            )
            .await??;
            for kv in r.kvs() {
                if let Some(e) = event_of(Duration::ZERO, kv.key(), kv.value(), 0, true) {
                    apply(&e);
                }
            }
            let at = r.header().map_or(0, |h| h.revision());
            rev.store(at, Ordering::Relaxed);
            let opts = WatchOptions::new()
                .with_prefix()
                .with_start_revision(at + 1);
            let mut stream =
                tokio::time::timeout(Duration::from_secs(2), c.watch(PREFIX, Some(opts))).await??;
            loop {
                let msg = tokio::select! {
                    _ = cancel.cancelled() => return anyhow::Ok(()),
                    m = stream.message() => m?,
                };
                let Some(resp) = msg else {
                    bail!("stream ended")
                };
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let put = ev.event_type() == EventType::Put;
                    if let Some(e) = event_of(Duration::ZERO, kv.key(), kv.value(), 0, put) {
                        apply(&e);
                    }
                    rev.store(kv.mod_revision(), Ordering::Relaxed);
                }
            }
        };
        if round.await.is_err() {
            if mutant == Mutant::EmptyOnOutage {
                // The mutation: an unreachable etcd empties the view.
                for e in balancer.endpoints() {
                    balancer.remove(&e.addr);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Calls made and failed, by client (for the summary).
pub fn calls_by_client(h: &History) -> BTreeMap<u32, (usize, usize)> {
    let mut m = BTreeMap::new();
    for c in &h.calls {
        let e: &mut (usize, usize) = m.entry(c.client).or_default();
        e.0 += 1;
        if !c.ok {
            e.1 += 1;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at: u64, revision: i64, addr: &str, weight: Option<u32>) -> EtcdEvent {
        EtcdEvent {
            at: Duration::from_millis(at),
            revision,
            addr: addr.into(),
            kind: if weight.is_some() {
                EventKind::Put
            } else {
                EventKind::Delete
            },
            weight,
        }
    }

    /// Seed 300 (at 631613e): the recorder knew 24536 from revision 6;
    /// during a compaction gap its old lease expired (delete, revision 9)
    /// and the restarted server registered again (revision 10, same
    /// weight). The list at revision 10 must record both, not "known".
    #[test]
    fn a_key_created_again_inside_a_gap_is_a_delete_and_a_put() {
        let (a, b) = ("127.0.0.1:24536", "127.0.0.1:24537");
        let h = History {
            etcd: vec![ev(1_000, 4, b, Some(100)), ev(1_000, 6, a, Some(100))],
            ..Default::default()
        };
        let list = vec![
            (ev(13_700, 4, b, Some(100)), 4),
            (ev(13_700, 10, a, Some(100)), 10),
        ];
        let out = relist_events(&h, list, 10, Duration::from_millis(13_700));
        assert_eq!(
            out,
            vec![ev(13_700, 9, a, None), ev(13_700, 10, a, Some(100))],
            "b unchanged, a deleted and created again"
        );
        // Unchanged keys add nothing; a key gone is a delete at the list's
        // revision; a new weight is a put.
        let list = vec![(ev(14_000, 11, b, Some(50)), 4)];
        let out = relist_events(&h, list, 12, Duration::from_millis(14_000));
        assert_eq!(
            out,
            vec![ev(14_000, 12, a, None), ev(14_000, 11, b, Some(50))]
        );
    }
}
