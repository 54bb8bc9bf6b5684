//! Test support: real etcd processes and real binaries on loopback.
//!
//! Every test gets its own etcd on free ports with a temporary data dir, so
//! tests run in parallel and never share state. Processes are killed when
//! their handle drops, even when a test panics.

#![forbid(unsafe_code)]

mod cluster;
pub mod metrics;
mod peer_proxy;
mod proxy;
mod tls;
pub use cluster::Cluster;
pub use proxy::Proxy;
pub use tls::{CertPair, Pki, SecureEtcd};

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Where [`free_port`] looks: below Linux's ephemeral range (32768-60999),
/// so no outgoing connection of a parallel test can take a port between our
/// check and the process that binds it. Public so that a test writing keys
/// for addresses where nothing may listen can keep them out of this range.
pub const PORTS: std::ops::Range<u16> = 10_000..32_000;

/// A free loopback TCP port for a process a test is about to start.
///
/// Not `bind(0)`: that hands out an ephemeral port, which the kernel may give
/// to any test's outgoing connection before etcd or a server binds it (seen
/// in CI as etcd's `bind: address already in use`). Each call takes the next
/// port of a per-process walk from a random start, so two tests of one
/// process never get the same port and two processes rarely collide; it
/// still checks that the port binds now.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(PORTS.end - PORTS.start);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            ^ std::process::id().wrapping_mul(2_654_435_761);
        let _ = NEXT.compare_exchange(u32::MAX, seed % span, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        // Fits: offset < span, and PORTS.start + span == PORTS.end.
        let port = PORTS.start + offset as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral loopback port")
}

/// One etcd member on loopback; killed on drop, data dir removed.
pub struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// `127.0.0.1:<port>` for clients.
    pub client_port: u16,
    peer_port: u16,
    name: String,
}

impl Etcd {
    /// Starts a single-member etcd and waits until it answers.
    ///
    /// A port taken between the check and etcd's bind (another process on
    /// the machine) is met by starting again on new ports, twice at most.
    pub async fn start() -> Result<Self> {
        let mut tries = 0;
        loop {
            let mut etcd = Self {
                child: None,
                dir: tempfile::Builder::new().prefix("testkit-etcd").tempdir()?,
                client_port: free_port(),
                peer_port: free_port(),
                name: "default".into(),
            };
            etcd.spawn()?;
            match etcd.wait_ready().await {
                Ok(()) => return Ok(etcd),
                Err(e) if tries < 2 && e.to_string().contains("address already in use") => {
                    tries += 1;
                    eprintln!("testkit: etcd's port was taken, starting on new ports: {e:#}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The client endpoint, `127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The data directory (inside the temp dir).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Where etcd's own log goes.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn(&mut self) -> Result<()> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let child = etcd_command(
            &self.name,
            &self.data_dir(),
            &client,
            &peer,
            &format!("{}={peer}", self.name),
            &log,
        )?
        .spawn()
        .context("starting etcd (is Debian's etcd-server installed? .ci/setup installs it)")?;
        self.child = Some(child);
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "etcd exited with {status}; log: {}",
                        std::fs::read_to_string(self.log_path()).unwrap_or_default()
                    );
                }
            }
            if let Ok(Ok(mut c)) = tokio::time::timeout(
                Duration::from_secs(2),
                etcd_client::Client::connect([self.endpoint()], None),
            )
            .await
            {
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), c.status()).await {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("etcd on {} not ready within 20 s", self.endpoint());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client connected to this member.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect([self.endpoint()], None).await?)
    }

    /// Kills the process (SIGKILL) and waits for it; data stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same ports, keeping (or wiping) the data.
    pub async fn restart(&mut self, wipe: bool) -> Result<()> {
        self.stop();
        if wipe {
            let _ = std::fs::remove_dir_all(self.data_dir());
        }
        self.spawn()?;
        self.wait_ready().await
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The etcd command line every helper here shares: one member named
/// `name`, client and peer URLs, the initial cluster, zap logs to `log`.
/// Callers add their own flags (TLS, cluster tuning) and spawn it.
pub(crate) fn etcd_command(
    name: &str,
    data_dir: &Path,
    client_url: &str,
    peer_url: &str,
    initial_cluster: &str,
    log: &std::fs::File,
) -> Result<Command> {
    etcd_command_behind(
        name,
        data_dir,
        client_url,
        peer_url,
        peer_url,
        initial_cluster,
        log,
    )
}

/// [`etcd_command`] for a member that listens for peers on `peer_url` but
/// tells them to dial `advertise_peer_url` (a proxy in front of it).
pub(crate) fn etcd_command_behind(
    name: &str,
    data_dir: &Path,
    client_url: &str,
    peer_url: &str,
    advertise_peer_url: &str,
    initial_cluster: &str,
    log: &std::fs::File,
) -> Result<Command> {
    let mut cmd = Command::new(etcd_binary());
    cmd.arg("--name")
        .arg(name)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen-client-urls")
        .arg(client_url)
        .arg("--advertise-client-urls")
        .arg(client_url)
        .arg("--listen-peer-urls")
        .arg(peer_url)
        .arg("--initial-advertise-peer-urls")
        .arg(advertise_peer_url)
        .arg("--initial-cluster")
        .arg(initial_cluster)
        .arg("--logger")
        .arg("zap")
        .arg("--log-outputs")
        .arg("stderr")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log.try_clone()?);
    Ok(cmd)
}

fn etcd_binary() -> PathBuf {
    std::env::var_os("ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcd"))
}

/// A benchmark's numeric knob: `name` from the environment, or `default`
/// when unset. A value that is not a whole number is an error naming the
/// variable, not a silent fall-back to the default.
pub fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(default),
        Err(e) => anyhow::bail!("{name}: {e}"),
        Ok(v) => v
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("{name}={v:?}: want a whole number ({e})")),
    }
}

/// etcd's default cap on the operations of one transaction
/// (`--max-txn-ops`).
pub const TXN_OPS: usize = 128;

/// Puts `kvs` in transactions of [`TXN_OPS`] puts, on `lease` when given:
/// set-ups of many keys. One put per request slowed etcd 3.4 to a crawl as
/// the store grew (68,000 keys after 7.5 minutes); in transactions 100,000
/// keys take about a second.
pub async fn put_in_txns<K, V>(
    client: &etcd_client::Client,
    kvs: impl IntoIterator<Item = (K, V)>,
    lease: Option<i64>,
) -> Result<()>
where
    K: Into<Vec<u8>>,
    V: Into<Vec<u8>>,
{
    let mut c = client.clone();
    let mut ops = Vec::with_capacity(TXN_OPS);
    let mut kvs = kvs.into_iter().peekable();
    while let Some((k, v)) = kvs.next() {
        let opts = lease.map(|l| etcd_client::PutOptions::new().with_lease(l));
        ops.push(etcd_client::TxnOp::put(k, v, opts));
        if ops.len() == TXN_OPS || kvs.peek().is_none() {
            c.txn(etcd_client::Txn::new().and_then(std::mem::take(&mut ops)))
                .await
                .context("a transaction of puts")?;
        }
    }
    Ok(())
}

/// The path of a workspace binary built next to the running test
/// (`target/<profile>/<name>`). `cargo test --workspace` builds them all;
/// when a single package's tests run, a missing binary is built here first.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests live in target/<profile>/deps/, binaries in target/<profile>/.
    let dir = exe.parent().expect("executable has a directory");
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().expect("deps has a parent")
    } else {
        dir
    };
    let path = profile_dir.join(name);
    if !path.exists() {
        let target_dir = profile_dir.parent().expect("target dir");
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(["build", "-p", name, "--bin", name, "--target-dir"])
            .arg(target_dir);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building {name} failed");
    }
    path
}

/// A child process killed (SIGKILL) on drop; its output goes to a log file
/// that is printed by [`Proc::log`] for failing tests. Standard output is
/// also kept on its own ([`Proc::stdout`]), so a report printed there can be
/// parsed without log lines written to stderr at the same moment landing in
/// the middle of it.
pub struct Proc {
    child: Option<Child>,
    log: PathBuf,
    stdout: PathBuf,
    copier: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
    /// Name for messages.
    pub name: String,
}

impl Proc {
    /// Spawns `program args...` with extra environment; output to a log file.
    pub fn spawn(
        name: &str,
        program: impl AsRef<Path>,
        args: &[String],
        envs: &[(&str, &str)],
    ) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("testkit-proc").tempdir()?;
        let log = dir.path().join("out.log");
        let stdout = dir.path().join("stdout.log");
        let file = std::fs::File::create(&log)?;
        let mut cmd = Command::new(program.as_ref());
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(file.try_clone()?)
            .env_remove("ETCD_ENDPOINTS");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", program.as_ref().display()))?;
        let copier = child
            .stdout
            .take()
            .map(|out| copy_stdout(out, file, std::fs::File::create(&stdout)?))
            .transpose()?;
        Ok(Self {
            child: Some(child),
            log,
            stdout,
            copier,
            _dir: dir,
            name: name.to_owned(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().map_or(0, |c| c.id() as i32))
    }

    /// Sends a signal.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        kill(self.pid(), sig).with_context(|| format!("signalling {}", self.name))
    }

    /// Everything the process wrote so far, stdout and stderr interleaved.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the process wrote to stdout alone (complete once
    /// [`Proc::wait_exit`] has returned).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// The pretty-printed JSON object the process wrote to stdout (a load
    /// run's `--json` report), read from its first `{` line to its last `}`
    /// line. Call after [`Proc::wait_exit`].
    pub fn json_report(&self) -> Result<serde_json::Value> {
        let out = self.stdout();
        let start = out
            .find("{\n")
            .with_context(|| format!("{}: no JSON report:\n{}", self.name, self.log()))?;
        let end = out.rfind("\n}").context("no JSON report end")?;
        serde_json::from_str(&out[start..end + 2]).with_context(|| out.clone())
    }

    /// Waits up to `limit` for exit; returns the exit code (None if killed
    /// by a signal), or an error on timeout.
    pub async fn wait_exit(&mut self, limit: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    self.child = None;
                    self.finish_copy().await;
                    return Ok(status.code());
                }
            } else {
                bail!("{} already reaped", self.name);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not exit within {limit:?}; log:\n{}",
                    self.name,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (briefly: a grandchild may hold the pipe open) until the
    /// output copier has reached the end of the child's stdout.
    async fn finish_copy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.copier.as_ref().is_some_and(|c| !c.is_finished()) {
            if Instant::now() > deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(c) = self.copier.take() {
            let _ = c.join();
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Copies a child's stdout into both the combined log and its own file, on
/// a thread that ends when the pipe closes.
fn copy_stdout(
    mut from: std::process::ChildStdout,
    mut log: std::fs::File,
    mut own: std::fs::File,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    use std::io::{Read, Write};
    std::thread::Builder::new()
        .name("proc-stdout".to_owned())
        .spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                let _ = log.write_all(&buf[..n]);
                let _ = own.write_all(&buf[..n]);
            }
        })
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after
/// `limit` with `what` in the message. For waiting on eventual states in
/// tests (never for asserting on speed).
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn env_u64_reads_defaults_and_refuses_garbage() {
        let name = "TESTKIT_ENV_U64_UNIT_TEST";
        assert_eq!(super::env_u64(name, 7).unwrap(), 7);
        std::env::set_var(name, " 42 ");
        assert_eq!(super::env_u64(name, 7).unwrap(), 42);
        std::env::set_var(name, "many");
        let e = super::env_u64(name, 7).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains("many"), "{e}");
        std::env::remove_var(name);
    }
}
