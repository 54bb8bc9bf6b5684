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

use crate::{etcd_command, free_port};

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
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
        assert!(n >= 1, "a cluster needs a member");
        let dir = tempfile::Builder::new()
            .prefix("testkit-cluster")
            .tempdir()?;
        let token = dir
            .path()
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "testkit".into());
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
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
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
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
        let child = etcd_command(&m.name, &data_dir, &client, &peer, &initial_cluster, &log)?
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
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
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
