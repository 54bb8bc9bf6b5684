//! A multi-member etcd cluster on loopback, for tests of member failures.
//!
//! Each member has its own client and peer port and data dir; killing a
//! member (SIGKILL) keeps its data, so a restart rejoins the cluster as the
//! same member. The leader is found by asking every running member for its
//! status, as an operator would with `etcdctl endpoint status`.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use etcd_client::Client;

use crate::peer_proxy::PeerProxy;
use crate::{etcd_command_behind, free_port};

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// The proxy peers dial instead of `peer_port`, when the cluster was
    /// started with [`Cluster::start_isolatable`].
    proxy: Option<PeerProxy>,
    child: Option<Child>,
}

impl Member {
    /// The peer URL the others dial.
    fn advertised_peer_url(&self) -> String {
        match &self.proxy {
            Some(p) => format!("http://{}", p.addr),
            None => format!("http://127.0.0.1:{}", self.peer_port),
        }
    }
}

/// A cluster of `n` etcd members on free loopback ports; every member is
/// killed on drop and the data dirs removed.
pub struct Cluster {
    members: Vec<Member>,
    dir: tempfile::TempDir,
    token: String,
}

impl Cluster {
    /// Starts `n` members at once and waits until the cluster has a leader
    /// and takes writes.
    pub async fn start(n: usize) -> Result<Self> {
        Self::start_with(n, false).await
    }

    /// Like [`Cluster::start`], with a proxy in front of every member's peer
    /// URL, so that [`Cluster::isolate`] can cut one member off from the
    /// others while its clients still reach it.
    pub async fn start_isolatable(n: usize) -> Result<Self> {
        Self::start_with(n, true).await
    }

    async fn start_with(n: usize, proxies: bool) -> Result<Self> {
        assert!(n >= 1, "a cluster needs a member");
        let dir = tempfile::Builder::new()
            .prefix("testkit-cluster")
            .tempdir()?;
        let token = dir
            .path()
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "testkit".into());
        let mut members = Vec::with_capacity(n);
        for i in 0..n {
            let peer_port = free_port();
            let proxy = if proxies {
                Some(PeerProxy::start(([127, 0, 0, 1], peer_port).into()).await?)
            } else {
                None
            };
            members.push(Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port,
                proxy,
                child: None,
            });
        }
        let mut cluster = Self {
            members,
            dir,
            token,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        for i in 0..n {
            cluster.wait_member(i).await?;
        }
        cluster.wait_writable().await?;
        Ok(cluster)
    }

    /// Number of members (running or not).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no member (never, once started).
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Client endpoint of member `i`, `127.0.0.1:<port>`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.members[i].client_port)
    }

    /// Every member's client endpoint.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// Every member's client endpoint, comma-separated (for `--etcd-endpoints`).
    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    /// Where member `i` writes its log.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}={}", m.name, m.advertised_peer_url()))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))?;
        let initial_cluster = self.initial_cluster();
        let data_dir = self.data_dir(i);
        let m = &mut self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let advertised = m.advertised_peer_url();
        let child = etcd_command_behind(
            &m.name,
            &data_dir,
            &client,
            &peer,
            &advertised,
            &initial_cluster,
            &log,
        )?
        .arg("--initial-cluster-state")
        .arg("new")
        .arg("--initial-cluster-token")
        .arg(&self.token)
        // Loopback: short heartbeats make elections quick.
        .arg("--heartbeat-interval")
        .arg("100")
        .arg("--election-timeout")
        .arg("1000")
        .spawn()
        .context("starting etcd (is Debian's etcd-server installed?)")?;
        m.child = Some(child);
        Ok(())
    }

    /// Waits until member `i` answers `status` and knows a leader.
    async fn wait_member(&mut self, i: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.members[i].child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "etcd member {i} exited with {status}; log: {}",
                        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
                    );
                }
            }
            if let Some(status) = member_status(&self.endpoint(i)).await {
                if status.leader() != 0 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd member {i} ({}) not ready within 30 s",
                    self.endpoint(i)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_writable(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = async {
                let mut c = self.client().await.ok()?;
                c.put("/testkit/cluster-ready", "1", None).await.ok()?;
                c.delete("/testkit/cluster-ready", None).await.ok()
            };
            if tokio::time::timeout(Duration::from_secs(3), attempt)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("cluster {} not writable within 30 s", self.endpoints_arg());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A client given every member's endpoint.
    pub async fn client(&self) -> Result<Client> {
        Ok(Client::connect(self.endpoints(), None).await?)
    }

    /// Whether member `i` runs.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.members[i]
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The index of the member that leads now, asking every running member
    /// until one says it is the leader (retried for up to 20 s, as an
    /// election may be under way).
    pub async fn leader(&mut self) -> Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for i in 0..self.members.len() {
                if !self.is_running(i) {
                    continue;
                }
                if let Some(s) = member_status(&self.endpoint(i)).await {
                    let me = s.header().map(|h| h.member_id()).unwrap_or_default();
                    if me != 0 && s.leader() == me {
                        return Ok(i);
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("no member of {} is leader", self.endpoints_arg());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Cuts member `i` off from its peers (both directions), leaving its
    /// client port reachable: it keeps answering what it can answer alone,
    /// as a member behind a network partition does. Needs
    /// [`Cluster::start_isolatable`].
    ///
    /// # Errors
    /// The cluster has no peer proxies, or the member ids cannot be read.
    pub async fn isolate(&mut self, i: usize) -> Result<()> {
        self.set_isolated(i, true).await
    }

    /// Undoes [`Cluster::isolate`].
    ///
    /// # Errors
    /// As [`Cluster::isolate`].
    pub async fn rejoin(&mut self, i: usize) -> Result<()> {
        self.set_isolated(i, false).await
    }

    async fn set_isolated(&mut self, i: usize, on: bool) -> Result<()> {
        let id = self.member_id(i).await?;
        for (j, m) in self.members.iter().enumerate() {
            let proxy = m
                .proxy
                .as_ref()
                .context("isolate needs Cluster::start_isolatable")?;
            if j == i {
                proxy.refuse_all(on);
            } else {
                proxy.refuse_from(&format!("{id:x}"), on);
            }
        }
        Ok(())
    }

    /// Member `i`'s id, as etcd's member list has it.
    async fn member_id(&self, i: usize) -> Result<u64> {
        let name = &self.members[i].name;
        for j in 0..self.members.len() {
            let attempt = async {
                let mut c = Client::connect([self.endpoint(j)], None).await.ok()?;
                c.member_list().await.ok()
            };
            if let Ok(Some(list)) = tokio::time::timeout(Duration::from_secs(2), attempt).await {
                if let Some(m) = list.members().iter().find(|m| m.name() == name) {
                    return Ok(m.id());
                }
            }
        }
        bail!("no member knows the id of {name}")
    }

    /// The number of gRPC streams of `method` (e.g. `Watch`,
    /// `LeaseKeepAlive`) open on member `i` now, from its `/metrics`
    /// (started minus handled). Lets a test find which member a client's
    /// stream landed on.
    ///
    /// # Errors
    /// The member does not answer on its client port.
    pub async fn open_streams(&self, i: usize, method: &str) -> Result<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.members[i].client_port))
            .await
            .context("connecting for /metrics")?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut body = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body))
            .await
            .context("reading /metrics")??;
        let method = format!("grpc_method=\"{method}\"");
        let sum = |name: &str| -> f64 {
            body.lines()
                .filter(|l| l.starts_with(name) && l.contains(&method))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        Ok(sum("grpc_server_started_total{") - sum("grpc_server_handled_total{"))
    }

    /// Member `i`'s process id while it runs (to pause it with SIGSTOP).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i].child.as_ref().map(Child::id)
    }

    /// Kills member `i` (SIGKILL) and reaps it; its data stays.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again with its data and waits until it has rejoined
    /// (answers `status` and knows a leader).
    pub async fn restart(&mut self, i: usize) -> Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_member(i).await
    }

    /// Saves a snapshot of the cluster's data to `path` with `etcdctl
    /// snapshot save`, from the first member that gives one (an operator's
    /// backup, for [`Cluster::restore`]).
    ///
    /// # Errors
    /// No member gave a snapshot (none running, or `etcdctl` missing).
    pub async fn snapshot(&self, path: &std::path::Path) -> Result<()> {
        let mut last = String::new();
        for i in 0..self.members.len() {
            let out = tokio::process::Command::new(etcdctl_binary())
                .arg("--endpoints")
                .arg(self.endpoint(i))
                .arg("--command-timeout")
                .arg("5s")
                .arg("snapshot")
                .arg("save")
                .arg(path)
                .env("ETCDCTL_API", "3")
                .output()
                .await
                .context("running etcdctl (is Debian's etcd-client installed?)")?;
            if out.status.success() {
                return Ok(());
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
        }
        bail!("no member gave a snapshot: {last}")
    }

    /// Loses every member's data and brings the cluster back, as an operator
    /// restoring a backup does: stops every member, removes its data dir,
    /// and, with `snapshot`, restores it there with `etcdctl snapshot
    /// restore` under the same member name, peer URL and cluster token (so
    /// the cluster and member ids are the same as before, and only the data
    /// went back); without, the members start empty (a wipe). Waits until
    /// the cluster takes writes.
    ///
    /// # Errors
    /// The restore failed, or the cluster did not come back within 30 s.
    pub async fn restore(&mut self, snapshot: Option<&std::path::Path>) -> Result<()> {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let initial_cluster = self.initial_cluster();
        for i in 0..self.members.len() {
            let dir = self.data_dir(i);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
            let Some(snapshot) = snapshot else { continue };
            let m = &self.members[i];
            let out = tokio::process::Command::new(etcdctl_binary())
                .arg("snapshot")
                .arg("restore")
                .arg(snapshot)
                .arg("--name")
                .arg(&m.name)
                .arg("--data-dir")
                .arg(&dir)
                .arg("--initial-cluster")
                .arg(&initial_cluster)
                .arg("--initial-cluster-token")
                .arg(&self.token)
                .arg("--initial-advertise-peer-urls")
                .arg(m.advertised_peer_url())
                .env("ETCDCTL_API", "3")
                .output()
                .await
                .context("running etcdctl snapshot restore")?;
            if !out.status.success() {
                bail!(
                    "etcdctl snapshot restore for {}: {}",
                    m.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        for i in 0..self.members.len() {
            self.spawn(i)?;
        }
        for i in 0..self.members.len() {
            self.wait_member(i).await?;
        }
        self.wait_writable().await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// `etcdctl`, from `ETCDCTL_BIN` or the `PATH` (Debian's etcd-client).
fn etcdctl_binary() -> PathBuf {
    std::env::var_os("ETCDCTL_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("etcdctl"))
}

async fn member_status(endpoint: &str) -> Option<etcd_client::StatusResponse> {
    let attempt = async {
        let mut c = Client::connect([endpoint], None).await.ok()?;
        c.status().await.ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}
