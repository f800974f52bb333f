//! A three-member etcd cluster of local processes, for tests that take
//! members away: the leader, then quorum.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::{LogFile, dies_with_test, free_port, log_file, poll};

/// One member: its ports stay the same across restarts, as does its data.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    _log: LogFile,
}

pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts three members and waits until they have a leader.
    pub async fn start() -> EtcdCluster {
        for attempt in 0..3 {
            if let Some(c) = Self::try_start().await {
                return c;
            }
            eprintln!("etcd cluster did not form (attempt {attempt}); retrying on new ports");
        }
        panic!("a three-member etcd cluster did not form after 3 tries");
    }

    async fn try_start() -> Option<EtcdCluster> {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut members = Vec::new();
        for i in 0..3 {
            let (_, log) = log_file(dir.path(), &format!("etcd-m{i}"));
            members.push(Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
                _log: log,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = EtcdCluster { members, initial_cluster, dir };
        for i in 0..3 {
            c.spawn(i);
        }
        let formed = c.wait_leader(Duration::from_secs(20)).await.is_some();
        formed.then_some(c)
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("data-m{i}"))
    }

    fn spawn(&mut self, i: usize) {
        let (file, _) = log_file(self.dir.path(), &format!("etcd-m{i}"));
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let child = dies_with_test(&mut Command::new("etcd"))
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &self.initial_cluster, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "weft-test-cluster", "--log-level", "warn"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("spawning etcd (is the etcd-server package installed? make test installs it)");
        self.members[i].child = Some(child);
    }

    /// The client URLs of all members, comma-separated (for `--etcd`).
    pub fn urls(&self) -> String {
        self.members.iter().map(|m| format!("http://127.0.0.1:{}", m.client_port)).collect::<Vec<_>>().join(",")
    }

    fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// The index of the current leader, asked of each running member.
    pub async fn leader(&self) -> Option<usize> {
        for (i, m) in self.members.iter().enumerate() {
            if m.child.is_none() {
                continue;
            }
            let url = self.url(i);
            let status = tokio::time::timeout(Duration::from_secs(2), async move {
                let mut c = etcd_client::Client::connect([url], None).await.ok()?;
                c.status().await.ok()
            })
            .await
            .ok()
            .flatten();
            let Some(status) = status else { continue };
            if status.leader() == 0 {
                continue;
            }
            // The leader is the member whose id the status names.
            for (j, _) in self.members.iter().enumerate() {
                let url = self.url(j);
                let own = tokio::time::timeout(Duration::from_secs(2), async move {
                    let mut c = etcd_client::Client::connect([url], None).await.ok()?;
                    c.status().await.ok().and_then(|s| s.header().map(|h| h.member_id()))
                })
                .await
                .ok()
                .flatten();
                if own == Some(status.leader()) {
                    return Some(j);
                }
            }
        }
        None
    }

    /// Waits until the running members have a leader.
    pub async fn wait_leader(&self, timeout: Duration) -> Option<usize> {
        poll(Instant::now() + timeout, || self.leader()).await
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    pub async fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill().await;
        }
    }

    /// Starts a killed member again, with its data.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
    }
}
