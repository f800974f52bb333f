//! Test harness: a real `etcd` on a free loopback port with a temp data dir,
//! the real `weft-control` and `weft-proxy` binaries, in-process example
//! backends on `127.0.0.1:0`, and helpers that wait on conditions with a
//! deadline instead of sleeping.
//!
//! Binaries are taken from the target directory this test was built into;
//! `make test` builds them first.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub use weft_examples::{Info, pb as example_pb};

pub mod cluster;
pub mod fake_control;
pub mod load;
pub mod pki;
pub mod req;
pub mod topology;

pub use cluster::EtcdCluster;
pub use fake_control::FakeControl;
pub use load::Load;
pub use req::{Req, Response, degraded, header, metric, pooled_client, served_by};
pub use topology::{App, Bed, Instance, Topology};

/// The directory holding the workspace binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test-binary>
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace --bins` first (make test does)", p.display());
    p
}

/// A port that was free a moment ago (for etcd, which needs it up front).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// How often a condition is checked while waiting for it.
const POLL_EVERY: Duration = Duration::from_millis(50);

/// Checks `check` on a fixed cadence until it gives an answer, or returns
/// `None` once `deadline` has passed.
pub async fn poll<T, F, Fut>(deadline: Instant, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let mut every = tokio::time::interval(POLL_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if let Some(answer) = check().await {
            return Some(answer);
        }
        if Instant::now() >= deadline {
            return None;
        }
    }
}

/// Waits until `check` returns true, or panics with `what` at the deadline.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let met = poll(Instant::now() + timeout, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await;
    assert!(met.is_some(), "timed out after {timeout:?} waiting for: {what}");
}

/// Where a child's stderr goes; printed when a test fails.
struct LogFile {
    path: PathBuf,
    name: String,
}

impl Drop for LogFile {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            let lines = std::env::var("WEFT_TEST_LOG_LINES").ok().and_then(|v| v.parse().ok()).unwrap_or(40);
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            eprintln!("---- last lines of {} ----", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

fn log_file(dir: &Path, name: &str) -> (std::fs::File, LogFile) {
    let path = dir.join(format!("{name}.log"));
    let f = std::fs::OpenOptions::new().create(true).append(true).open(&path).expect("log file");
    (f, LogFile { path, name: name.to_string() })
}

/// Makes the child die with the test: `kill_on_drop` covers a test that
/// ends or panics, this a test binary that is itself killed (a timeout, ^C),
/// which would otherwise leave etcd and sidecars running.
fn dies_with_test(cmd: &mut Command) -> &mut Command {
    let parent = std::process::id();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The test may have gone before the line above.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        })
    }
}

/// Spawns a binary and waits for its "listening" line on stdout.
async fn spawn_listening(mut cmd: Command, what: &str, log: std::fs::File) -> (Child, String) {
    dies_with_test(&mut cmd).stdout(Stdio::piped()).stderr(Stdio::from(log)).stdin(Stdio::null()).kill_on_drop(true);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {what}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .unwrap_or_else(|_| panic!("{what} did not report its addresses within 20s"))
        .expect("read stdout")
        .unwrap_or_else(|| panic!("{what} exited before listening"));
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, line)
}

fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in '{line}'"))
        .to_string()
}

/// A real etcd with its own data dir.
pub struct Etcd {
    child: Option<Child>,
    pub port: u16,
    peer_port: u16,
    _log: LogFile,
    pub dir: tempfile::TempDir,
}

impl Etcd {
    pub async fn start() -> Etcd {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, log) = log_file(dir.path(), "etcd");
        let mut etcd = Etcd { child: None, port: free_port(), peer_port: free_port(), dir, _log: log };
        etcd.spawn().await;
        etcd
    }

    /// Starts etcd and waits until it answers. A port picked up front can be
    /// taken by someone else before etcd binds it: then, on a first start,
    /// new ports are tried (a restart must keep its port).
    async fn spawn(&mut self) {
        let first_start = self.child.is_none() && !self.dir.path().join("data").exists();
        for attempt in 0..4 {
            if attempt > 0 && first_start {
                self.port = free_port();
                self.peer_port = free_port();
            }
            if self.try_spawn().await {
                return;
            }
            if let Some(mut c) = self.child.take() {
                let _ = c.kill().await;
            }
        }
        panic!("etcd did not start on 127.0.0.1:{} after 4 tries (see its log)", self.port);
    }

    async fn try_spawn(&mut self) -> bool {
        let (file, _) = log_file(self.dir.path(), "etcd");
        let client = format!("http://127.0.0.1:{}", self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = dies_with_test(&mut Command::new("etcd"))
            .arg("--name")
            .arg("weft-test")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("weft-test={peer}"))
            .arg("--log-level")
            .arg("warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("spawning etcd (is the etcd-server package installed? make test installs it)");
        let url = self.url();
        let child = self.child.insert(child);
        // Until etcd answers, or exits (its port was taken meanwhile).
        let outcome = poll(Instant::now() + Duration::from_secs(15), || {
            let exited = child.try_wait().ok().flatten();
            let url = url.clone();
            async move {
                if let Some(status) = exited {
                    return Some(Err(status));
                }
                let answered = tokio::time::timeout(Duration::from_secs(2), async {
                    match etcd_client::Client::connect([url], None).await {
                        Ok(mut c) => c.status().await.is_ok(),
                        Err(_) => false,
                    }
                })
                .await
                .unwrap_or(false);
                answered.then_some(Ok(()))
            }
        })
        .await;
        match outcome {
            Some(Ok(())) => true,
            Some(Err(status)) => {
                eprintln!("etcd on port {} exited with {status}; retrying", self.port);
                false
            }
            None => {
                eprintln!("etcd on port {} did not answer within 15s; retrying", self.port);
                false
            }
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).expect("etcd is running")
    }

    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url()], None).await.expect("etcd client")
    }

    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Starts etcd again on the same port and data.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn().await;
    }
}

/// A `weft-control` replica.
pub struct Control {
    child: Option<Child>,
    pub grpc: SocketAddr,
    /// `https` when the control plane has a CA.
    scheme: String,
    pub admin: SocketAddr,
    etcd_url: String,
    lease_ttl: u32,
    name: String,
    _log: LogFile,
    dir: tempfile::TempDir,
}

impl Control {
    pub async fn start(etcd: &Etcd, lease_ttl: u32) -> Control {
        Self::start_at(&etcd.url(), "127.0.0.1:0", "127.0.0.1:0", lease_ttl, "control").await
    }

    /// A replica with extra command-line arguments (e.g. `--tokens FILE`).
    pub async fn start_with(etcd: &Etcd, lease_ttl: u32, extra: &[&str]) -> Control {
        Self::spawn_at(&etcd.url(), "127.0.0.1:0", "127.0.0.1:0", lease_ttl, "control", extra).await
    }

    async fn start_at(etcd_url: &str, grpc: &str, admin: &str, lease_ttl: u32, name: &str) -> Control {
        Self::spawn_at(etcd_url, grpc, admin, lease_ttl, name, &[]).await
    }

    /// A replica that may not be ready yet (e.g. etcd is down).
    pub async fn start_unready(etcd: &Etcd, lease_ttl: u32) -> Control {
        Self::launch(&etcd.url(), "127.0.0.1:0", "127.0.0.1:0", lease_ttl, "control", &[]).await
    }

    async fn spawn_at(etcd_url: &str, grpc: &str, admin: &str, lease_ttl: u32, name: &str, extra: &[&str]) -> Control {
        let c = Self::launch(etcd_url, grpc, admin, lease_ttl, name, extra).await;
        c.wait_ready().await;
        c
    }

    async fn launch(etcd_url: &str, grpc: &str, admin: &str, lease_ttl: u32, name: &str, extra: &[&str]) -> Control {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, log) = log_file(dir.path(), name);
        let mut cmd = Command::new(bin("weft-control"));
        cmd.args([
            "--etcd",
            etcd_url,
            "--listen",
            grpc,
            "--admin",
            admin,
            "--lease-ttl",
            &lease_ttl.to_string(),
            "--replica",
            name,
        ]);
        cmd.args(extra);
        cmd.env("WEFT_LOG", "info,weft_control=debug");
        let (child, line) = spawn_listening(cmd, "weft-control", file).await;
        Control {
            child: Some(child),
            grpc: field(&line, "grpc").parse().unwrap(),
            scheme: field(&line, "scheme"),
            admin: field(&line, "admin").parse().unwrap(),
            etcd_url: etcd_url.to_string(),
            lease_ttl,
            dir,
            name: name.to_string(),
            _log: log,
        }
    }

    /// A replica of a control plane on the given etcd endpoints (comma
    /// list, e.g. [`EtcdCluster::urls`]).
    pub async fn start_on(etcd_urls: &str, lease_ttl: u32, name: &str) -> Control {
        Self::start_at(etcd_urls, "127.0.0.1:0", "127.0.0.1:0", lease_ttl, name).await
    }

    pub async fn start_named(etcd: &Etcd, lease_ttl: u32, name: &str) -> Control {
        Self::start_at(&etcd.url(), "127.0.0.1:0", "127.0.0.1:0", lease_ttl, name).await
    }

    pub async fn wait_ready(&self) {
        let admin = self.admin;
        eventually("weft-control /ready", Duration::from_secs(20), || async move {
            matches!(get(admin, "localhost", "/ready").await, Ok((200, _, _)))
        })
        .await;
    }

    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.grpc)
    }

    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).expect("running")
    }

    /// Starts a new process on the same addresses (killing the old one if
    /// it still runs).
    pub async fn restart(&mut self) {
        self.kill().await;
        let next =
            Self::start_at(&self.etcd_url, &self.grpc.to_string(), &self.admin.to_string(), self.lease_ttl, &self.name)
                .await;
        let old = std::mem::replace(self, next);
        // Keep the old temp dir alive no longer than needed.
        drop(old.dir);
    }

    pub async fn metrics(&self) -> String {
        get(self.admin, "localhost", "/metrics").await.map(|r| r.2).unwrap_or_default()
    }
}

/// A `weft-proxy` sidecar.
pub struct Sidecar {
    child: Option<Child>,
    pub id: String,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    _log: LogFile,
    _dir: tempfile::TempDir,
}

impl Sidecar {
    /// Starts a sidecar for `service` in front of `app`, and waits until it
    /// has its config.
    pub async fn start(controls: &[String], service: &str, labels: &str, app: SocketAddr, id: &str) -> Sidecar {
        Self::start_with(controls, service, labels, app, id, &[]).await
    }

    /// Like [`Sidecar::start`], with extra command-line arguments.
    pub async fn start_with(
        controls: &[String],
        service: &str,
        labels: &str,
        app: SocketAddr,
        id: &str,
        extra: &[&str],
    ) -> Sidecar {
        Self::start_as(None, controls, service, labels, app, id, extra).await
    }

    /// Like [`Sidecar::start_with`], as user `uid` (the capture rules tell
    /// the sidecar's traffic by its user).
    pub async fn start_as(
        uid: Option<u32>,
        controls: &[String],
        service: &str,
        labels: &str,
        app: SocketAddr,
        id: &str,
        extra: &[&str],
    ) -> Sidecar {
        let dir = tempfile::tempdir().expect("tempdir");
        let (file, log) = log_file(dir.path(), &format!("sidecar-{id}"));
        let program = match uid {
            None => bin("weft-proxy"),
            // The checkout may sit in a folder only its owner can enter (a
            // fresh clone in a 0700 temp dir): another user runs a copy.
            Some(_) => {
                use std::os::unix::fs::PermissionsExt;
                let copy = dir.path().join("weft-proxy");
                std::fs::copy(bin("weft-proxy"), &copy).expect("copy weft-proxy");
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
                std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
                copy
            }
        };
        let mut cmd = Command::new(program);
        let controls = controls.join(",");
        let app = app.to_string();
        let defaults = [
            ("--control", controls.as_str()),
            ("--service", service),
            ("--labels", labels),
            ("--app", &app),
            ("--inbound", "127.0.0.1:0"),
            ("--outbound", "127.0.0.1:0"),
            ("--admin", "127.0.0.1:0"),
            ("--id", id),
        ];
        // A flag given in `extra` replaces its default.
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                cmd.args([flag, value]);
            }
        }
        cmd.args(extra);
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        cmd.env("WEFT_LOG", "info,weft_proxy=debug");
        let (child, line) = spawn_listening(cmd, "weft-proxy", file).await;
        let s = Sidecar {
            child: Some(child),
            id: id.to_string(),
            inbound: field(&line, "inbound").parse().unwrap(),
            outbound: field(&line, "outbound").parse().unwrap(),
            admin: field(&line, "admin").parse().unwrap(),
            _dir: dir,
            _log: log,
        };
        let admin = s.admin;
        eventually(&format!("sidecar {id} /ready"), Duration::from_secs(20), || async move {
            matches!(get(admin, "localhost", "/ready").await, Ok((200, _, _)))
        })
        .await;
        s
    }

    pub async fn config(&self) -> serde_json::Value {
        let body = get(self.admin, "localhost", "/config").await.expect("GET /config").2;
        serde_json::from_str(&body).expect("config JSON")
    }

    pub async fn metrics(&self) -> String {
        get(self.admin, "localhost", "/metrics").await.map(|r| r.2).unwrap_or_default()
    }

    /// Addresses of `service`'s endpoints in this sidecar's table.
    pub async fn endpoint_addrs(&self, service: &str) -> Vec<String> {
        let cfg = self.config().await;
        cfg["services"][service]["endpoints"]
            .as_array()
            .map(|a| a.iter().filter_map(|e| e["address"].as_str().map(String::from)).collect())
            .unwrap_or_default()
    }

    /// The revision of `service`'s route for `tenant` ("" = default) in force.
    pub async fn route_revision(&self, service: &str, tenant: &str) -> Option<u64> {
        let cfg = self.config().await;
        cfg["services"][service]["routes"]
            .as_array()?
            .iter()
            .find(|r| r["tenant"].as_str() == Some(tenant))
            .and_then(|r| r["revision"].as_u64())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).expect("running")
    }

    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// Waits for the process to exit by itself (after a drain).
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        match self.child.as_mut() {
            Some(c) => tokio::time::timeout(timeout, c.wait()).await.is_ok(),
            None => true,
        }
    }
}

/// An in-process example HTTP backend on a free port, failing on command
/// through `mode`.
pub struct Backend {
    pub addr: SocketAddr,
    pub mode: std::sync::Arc<weft_examples::Mode>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn http(service: &str, version: &str) -> Backend {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve_http(
            l,
            Info { service: service.into(), version: version.into(), outbound: None, mode: Default::default() },
        )
    }

    /// An instance that answers every request with `status`.
    pub async fn failing(service: &str, version: &str, status: u16) -> Backend {
        let b = Self::http(service, version).await;
        b.mode.fail(100, status);
        b
    }

    pub async fn grpc(service: &str, version: &str) -> Backend {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve_grpc(
            l,
            Info { service: service.into(), version: version.into(), outbound: None, mode: Default::default() },
        )
    }

    /// The example HTTP app on a bound listener.
    pub fn serve_http(l: tokio::net::TcpListener, info: Info) -> Backend {
        let addr = l.local_addr().unwrap();
        let mode = info.mode.clone();
        Backend { addr, mode, task: tokio::spawn(weft_examples::serve_http(l, info)) }
    }

    /// The example gRPC app on a bound listener.
    pub fn serve_grpc(l: tokio::net::TcpListener, info: Info) -> Backend {
        let addr = l.local_addr().unwrap();
        let mode = info.mode.clone();
        let task = tokio::spawn(async move {
            let _ = weft_examples::serve_grpc(l, info).await;
        });
        Backend { addr, mode, task }
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gRPC client of the example inference API, through the sidecar listening
/// on `outbound`, with `origin` (`http://service[:port]`) naming the service.
pub async fn inference_client(
    outbound: SocketAddr,
    origin: &str,
) -> example_pb::inference_client::InferenceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
        .unwrap()
        .origin(origin.parse().unwrap())
        .connect()
        .await
        .unwrap();
    example_pb::inference_client::InferenceClient::new(channel)
}

/// The result of running weftctl.
#[derive(Debug)]
pub struct CtlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `weftctl --control URL ARGS...`, feeding `stdin` if given.
pub async fn weftctl(control: &str, args: &[&str], stdin: Option<&str>) -> CtlOutput {
    let mut cmd = Command::new(bin("weftctl"));
    cmd.arg("--control").arg(control).args(args);
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn weftctl");
    if let Some(text) = stdin {
        use tokio::io::AsyncWriteExt;
        let mut si = child.stdin.take().unwrap();
        si.write_all(text.as_bytes()).await.unwrap();
        drop(si);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("weftctl finished")
        .unwrap();
    CtlOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// `weftctl apply -f - --wait`, asserting success.
pub async fn apply(control: &str, yaml: &str) -> CtlOutput {
    let out = weftctl(control, &["apply", "-f", "-", "--wait", "--timeout", "20s"], Some(yaml)).await;
    assert_eq!(out.code, 0, "apply failed: {out:?}");
    out
}

/// One HTTP/1.1 GET to `addr` with the given Host.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Response, String> {
    Req::get(addr, host, path).send().await
}

/// One HTTP/1.1 GET with extra headers.
pub async fn request(addr: SocketAddr, host: &str, path: &str, headers: &[(&str, &str)]) -> Result<Response, String> {
    Req::get(addr, host, path).headers(headers).send().await
}

/// One GET with extra headers on `client`.
pub async fn send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Response, String> {
    Req::get(addr, host, path).headers(headers).send_on(client).await
}

/// Sends a signal to a process (SIGSTOP/SIGCONT freeze and thaw it).
pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {pid} failed");
}

/// A mesh for most tests: etcd, one control plane, and `inference` v1 and v2
/// behind sidecars, plus a `caller` sidecar whose outbound the test uses.
pub struct Mesh {
    pub etcd: Etcd,
    pub control: Control,
    pub v1: Backend,
    pub v2: Backend,
    pub inf_v1: Sidecar,
    pub inf_v2: Sidecar,
    pub caller_app: Backend,
    pub caller: Sidecar,
}

impl Mesh {
    pub async fn start(lease_ttl: u32) -> Mesh {
        let bed = Topology::new()
            .lease_ttl(lease_ttl)
            .instance("inference", "version=v1,region=east")
            .instance("inference", "version=v2,region=east")
            .caller("caller", "region=east", &[])
            .start()
            .await;
        let Bed { etcd, control, instances, caller, .. } = bed;
        let mut instances = instances.into_iter();
        let (i1, i2) = (instances.next().expect("v1"), instances.next().expect("v2"));
        Mesh {
            etcd,
            control,
            v1: i1.app,
            v2: i2.app,
            inf_v1: i1.sidecar,
            inf_v2: i2.sidecar,
            caller_app: caller.app,
            caller: caller.sidecar,
        }
    }

    /// Waits until the caller's sidecar sees `n` endpoints of `service`
    /// (subscribing it first with one request).
    pub async fn wait_endpoints(&self, service: &str, n: usize) {
        let _ = get(self.caller.outbound, service, "/").await;
        let caller = &self.caller;
        eventually(&format!("caller sees {n} endpoints of {service}"), Duration::from_secs(20), || async move {
            caller.endpoint_addrs(service).await.len() == n
        })
        .await;
    }

    pub fn control_url(&self) -> String {
        self.control.url()
    }
}

/// One h2c (prior knowledge) request to `addr` with `:authority` = `authority`,
/// the way gRPC and HTTP/2 clients name a service.
pub async fn h2_send(
    addr: SocketAddr,
    authority: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Response, String> {
    let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut b = http::Request::builder().uri(format!("http://{authority}{path}")).version(http::Version::HTTP_2);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = sender.send_request(b.body(Full::new(Bytes::new())).unwrap()).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((parts.status.as_u16(), parts.headers, String::from_utf8_lossy(&body).into()))
}

/// A WebSocket echo app on a free loopback port. A text message `slow`
/// is echoed after 1.2 s, as a slow model would answer (the app's own
/// latency, simulated: nothing waits on the system here).
pub async fn ws_echo() -> SocketAddr {
    use futures_util::{SinkExt, StreamExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else { return };
                while let Some(Ok(m)) = ws.next().await {
                    if m.to_text().is_ok_and(|t| t == "slow") {
                        tokio::time::sleep(Duration::from_millis(1200)).await;
                    }
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}
