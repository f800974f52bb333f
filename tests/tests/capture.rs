//! Transparent capture, in a network namespace of the test's own: an app
//! that was not changed (curl, bash's /dev/tcp, as another user) calls
//! `http://inference:8080/` and other destinations while `weft-proxy init`
//! redirects its TCP to its sidecar. HTTP for a mesh service is routed and
//! retried like a call through the explicit listener; HTTP for anything
//! else, opaque TCP and a server-speaks-first protocol reach where they
//! were going; `init --uninstall` leaves the rules as they were.
//!
//! Each test moves its own thread into a new network namespace (root is
//! needed, as in CI) before it starts its runtime, so etcd, the control
//! plane, the sidecars and the apps all run inside it, on addresses that
//! exist only there.

use std::process::Command;
use std::time::Duration;

use harness::{Backend, Control, Etcd, Info, Sidecar, apply, eventually, metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A service address the app dials (nothing listens there: capture sends
/// it to the sidecar), and a host outside the mesh.
const INFERENCE_IP: &str = "10.77.0.2";
const OUTSIDE_IP: &str = "10.77.0.3";
/// An instance's own address (a pod's, say).
const POD_IP: &str = "10.77.0.5";
/// The app's user: not the sidecar's (root), so its traffic is captured.
const APP_UID: &str = "65534";

/// Runs `test` in a new network namespace with loopback up and the two
/// addresses above on it. Fails, naming why, where one cannot be made.
fn in_netns<F: std::future::Future<Output = ()>>(test: impl FnOnce() -> F) {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("cannot create a network namespace (run as root, as CI does): {e}"));
    for args in [
        vec!["link", "set", "lo", "up"],
        vec!["addr", "add", &format!("{INFERENCE_IP}/32"), "dev", "lo"],
        vec!["addr", "add", &format!("{OUTSIDE_IP}/32"), "dev", "lo"],
    ] {
        let out = Command::new("ip").args(&args).output().expect("ip (Debian package iproute2)");
        assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(test());
}

fn iptables_save() -> String {
    let out =
        Command::new("iptables-save").arg("-t").arg("nat").output().expect("iptables-save (Debian package iptables)");
    assert!(out.status.success(), "iptables-save: {}", String::from_utf8_lossy(&out.stderr));
    // Without the timestamps of its comment lines.
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n")
}

fn init(args: &[&str]) -> String {
    let out = Command::new(harness::bin("weft-proxy")).arg("init").args(args).output().unwrap();
    assert!(out.status.success(), "weft-proxy init {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `script` with bash as the app's user; its stdout.
async fn as_app(script: &str) -> String {
    let out = tokio::process::Command::new("setpriv")
        .args(["--reuid", APP_UID, "--regid", APP_UID, "--clear-groups", "bash", "-c", script])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP server on `addr` that says `greeting` first (if any), then echoes.
async fn tcp_server(addr: &str, greeting: &'static [u8]) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let _ = s.write_all(greeting).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}

#[test]
fn an_unchanged_app_is_captured_http_gets_the_mesh_and_other_tcp_passes_through() {
    in_netns(|| async {
        let etcd = Etcd::start().await;
        let control = Control::start(&etcd, 5).await;
        let urls = [control.url()];
        let (good, bad) = (Backend::http("inference", "v1").await, Backend::failing("inference", "v2", 503).await);
        let broken = Backend::failing("flaky", "v1", 503).await;
        let (_inf1, _inf2, _flaky) = tokio::join!(
            Sidecar::start(&urls, "inference", "version=v1,region=b", good.addr, "inf-1"),
            // In the caller's region, so tried first until it is ejected.
            Sidecar::start(&urls, "inference", "version=v2,region=a", bad.addr, "inf-2"),
            // A service that always fails, whose route falls back to inference.
            Sidecar::start(&urls, "flaky", "", broken.addr, "flaky-1"),
        );
        apply(
            &control.url(),
            "kind: Route\nservice: flaky\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n    fallback: { service: inference }\n---\nkind: Route\nservice: inference\nrules:\n  - backends: [ { subset: {}, weight: 1 } ]\n    retry: { attempts: 2, on: [5xx] }\n---\nkind: Resilience\nservice: inference\ncircuit_breaker: { consecutive_failures: 1, base_ejection: 30s, max_ejection_percent: 50 }\n",
        )
        .await;
        let app = Backend::http("agent", "v1").await;
        let agent =
            Sidecar::start_with(&urls, "agent", "region=a", app.addr, "agent-1", &["--outbound", "127.0.0.1:4140"])
                .await;
        // Outside the mesh: a web server, an echo server, a server that
        // speaks first.
        let outside = tokio::net::TcpListener::bind(format!("{OUTSIDE_IP}:7002")).await.unwrap();
        let info = Info { service: "outside".into(), version: "v1".into(), outbound: None, mode: Default::default() };
        let _web = Backend::serve_http(outside, info);
        tcp_server(&format!("{OUTSIDE_IP}:7000"), b"").await;
        tcp_server(&format!("{OUTSIDE_IP}:7001"), b"220 weft-test ready\r\n").await;

        let before = iptables_save();
        let agent_port = agent.inbound.port().to_string();
        init(&["--proxy-uid", "0", "--outbound-port", "4140", "--inbound-port", &agent_port, "--inbound-ports", "1"]);
        let twice = iptables_save();
        init(&["--proxy-uid", "0", "--outbound-port", "4140", "--inbound-port", &agent_port, "--inbound-ports", "1"]);
        assert_eq!(iptables_save(), twice, "installing twice changes nothing");

        // HTTP for a mesh service: routed, load-balanced, retried (the
        // instance in the caller's region answers 503 to everything: the
        // first call is retried on the other, and the breaker ejects it).
        let curl = format!(
            "for i in $(seq 1 20); do curl -s -o /dev/null -w '%{{http_code}} ' --resolve inference:8080:{INFERENCE_IP} http://inference:8080/v1/run; done"
        );
        let statuses = as_app(&curl).await;
        assert_eq!(statuses.trim(), vec!["200"; 20].join(" "), "through the captured path");
        let m = agent.metrics().await;
        assert_eq!(
            metric(&m, "weft_requests_total", &["direction=\"outbound\"", "service=\"inference\""]),
            20.0,
            "{m}"
        );
        assert!(metric(&m, "weft_retries_total", &["service=\"inference\""]) >= 1.0, "a retry happened: {m}");
        assert!(good.mode.hits.load(std::sync::atomic::Ordering::SeqCst) >= 20);
        // Fallen back, as through the explicit listener.
        let fallback =
            as_app(&format!("curl -s -D - -o /dev/null --resolve flaky:8080:{INFERENCE_IP} http://flaky:8080/v1/run"))
                .await
                .to_ascii_lowercase();
        assert!(fallback.starts_with("http/1.1 200"), "{fallback}");
        assert!(fallback.contains("x-served-by: inference/v1"), "{fallback}");
        assert!(fallback.contains("fallback"), "marked degraded: {fallback}");
        // The sidecar's own upstream connections went through the chain and
        // were let go by its user's rule (nothing looped: every call above
        // was answered).
        let counters =
            Command::new("iptables").args(["-t", "nat", "-L", "WEFT_OUTPUT", "-v", "-n", "-x"]).output().unwrap();
        let counters = String::from_utf8_lossy(&counters.stdout).into_owned();
        let own = counters.lines().find(|l| l.contains("owner UID match 0")).unwrap_or_else(|| panic!("{counters}"));
        let packets: u64 = own.split_whitespace().next().unwrap().parse().unwrap();
        assert!(packets >= 3, "the sidecar's connections matched its user's rule: {counters}");

        // HTTP for no mesh service goes where the app sent it.
        let web = as_app(&format!("curl -s -D - -o /dev/null http://{OUTSIDE_IP}:7002/")).await;
        assert!(web.to_ascii_lowercase().contains("x-served-by: outside/v1"), "{web}");
        // Opaque TCP, and a protocol where the server speaks first.
        let echo = as_app(&format!("exec 3<>/dev/tcp/{OUTSIDE_IP}/7000; printf hello >&3; head -c 5 <&3")).await;
        assert_eq!(echo, "hello");
        let greeting = as_app(&format!("exec 3<>/dev/tcp/{OUTSIDE_IP}/7001; head -c 21 <&3")).await;
        assert_eq!(greeting, "220 weft-test ready\r\n");
        let a = &agent;
        eventually("the sidecar counted each kind", Duration::from_secs(5), || async move {
            let m = a.metrics().await;
            metric(&m, "weft_egress_requests_total", &[]) == 1.0
                && metric(&m, "weft_tcp_connections_total", &["detected=\"opaque\""]) == 1.0
                && metric(&m, "weft_tcp_connections_total", &["detected=\"server-first\""]) == 1.0
        })
        .await;

        // The explicit listener still works as before.
        let explicit = harness::get(agent.outbound, "inference", "/").await.unwrap();
        assert_eq!(explicit.0, 200);

        init(&["--uninstall"]);
        assert_eq!(iptables_save(), before, "uninstall leaves the rules as they were");
        // Uncaptured now: the echo server is reached directly.
        let echo = as_app(&format!("exec 3<>/dev/tcp/{OUTSIDE_IP}/7000; printf again >&3; head -c 5 <&3")).await;
        assert_eq!(echo, "again");
        let m = agent.metrics().await;
        assert_eq!(metric(&m, "weft_tcp_connections_total", &["detected=\"opaque\""]), 1.0, "not through the sidecar");
    });
}

/// A second network namespace, joined to the test's by a veth pair:
/// `PEER_IP` there, `LOCAL_IP` here. Deleted when dropped.
struct Peer(String);

const LOCAL_IP: &str = "10.79.0.1";
const PEER_IP: &str = "10.79.0.2";

impl Peer {
    fn new() -> Peer {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("weft-peer-{}-{n}", std::process::id());
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip (Debian package iproute2)");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        ip(&["netns", "add", &name]);
        let peer = Peer(name.clone());
        ip(&["link", "add", "weft-a", "type", "veth", "peer", "name", "weft-b", "netns", &name]);
        ip(&["addr", "add", &format!("{LOCAL_IP}/24"), "dev", "weft-a"]);
        ip(&["link", "set", "weft-a", "up"]);
        ip(&["netns", "exec", &name, "ip", "addr", "add", &format!("{PEER_IP}/24"), "dev", "weft-b"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "weft-b", "up"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        peer
    }

    /// Runs `script` with bash in the peer namespace; its stdout.
    async fn run(&self, script: &str) -> String {
        let out = tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.0, "bash", "-c", script])
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn the_apps_port_is_reached_only_through_its_sidecar() {
    in_netns(|| async {
        let peer = Peer::new();
        let etcd = Etcd::start().await;
        let control = Control::start(&etcd, 5).await;
        // The app listens on every address, as an unchanged service does.
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let app_port = listener.local_addr().unwrap().port();
        let info = Info { service: "inference".into(), version: "v1".into(), outbound: None, mode: Default::default() };
        let app = Backend::serve_http(listener, info);
        let local_app = format!("127.0.0.1:{app_port}");
        let sidecar = Sidecar::start_with(
            &[control.url()],
            "inference",
            "",
            local_app.parse().unwrap(),
            "inf-1",
            &["--inbound", "0.0.0.0:4143"],
        )
        .await;
        let direct = format!("curl -s -m 5 -o /dev/null -w '%{{http_code}}' http://{LOCAL_IP}:{app_port}/");
        assert_eq!(peer.run(&direct).await, "200", "reachable before capture");
        let hits = || app.mode.hits.load(std::sync::atomic::Ordering::SeqCst);
        let inbound = |m: &str| metric(m, "weft_requests_total", &["direction=\"inbound\""]);
        let before = inbound(&sidecar.metrics().await);
        assert_eq!(before, 0.0, "nothing came through the sidecar yet");

        // A second port of the app that speaks no HTTP: an echo.
        let echo = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        drop(echo);
        tcp_server(&format!("0.0.0.0:{echo_port}"), b"").await;
        let ports = format!("{app_port},{echo_port}");
        init(&["--proxy-uid", "0", "--inbound-port", "4143", "--inbound-ports", &ports]);
        let seen = hits();
        for _ in 0..5 {
            assert_eq!(peer.run(&direct).await, "200");
        }
        assert_eq!(hits(), seen + 5, "the app served them");
        assert_eq!(inbound(&sidecar.metrics().await), 5.0, "every one through the sidecar");
        // Not HTTP: through the sidecar to the app's port it was for.
        let echoed = peer.run(&format!("exec 3<>/dev/tcp/{LOCAL_IP}/{echo_port}; printf hi >&3; head -c 2 <&3")).await;
        assert_eq!(echoed, "hi");
        let m = sidecar.metrics().await;
        assert_eq!(
            metric(&m, "weft_tcp_connections_total", &["direction=\"inbound\"", "detected=\"opaque\""]),
            1.0,
            "{m}"
        );
        init(&["--uninstall"]);
        assert_eq!(peer.run(&direct).await, "200");
        assert_eq!(inbound(&sidecar.metrics().await), 5.0, "direct again after uninstall");
    });
}

#[test]
fn a_websocket_from_an_unchanged_app_is_carried_through_capture() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    in_netns(|| async {
        let etcd = Etcd::start().await;
        let control = Control::start(&etcd, 5).await;
        let urls = [control.url()];
        let echo_app = harness::ws_echo().await;
        let _echo = Sidecar::start(&urls, "echo", "", echo_app, "echo-1").await;
        // Here the sidecar runs as another user and the test is the app.
        let app = Backend::http("agent", "v1").await;
        let agent =
            Sidecar::start_as(Some(65534), &urls, "agent", "", app.addr, "agent-1", &["--outbound", "127.0.0.1:4140"])
                .await;
        init(&["--proxy-uid", "65534", "--outbound-port", "4140", "--inbound-ports", "1"]);
        // The app dials echo:8080 (resolved to an address nothing listens on).
        let stream = tokio::net::TcpStream::connect(format!("{INFERENCE_IP}:8080")).await.unwrap();
        let (mut ws, resp) = tokio_tungstenite::client_async("ws://echo:8080/chat", stream).await.expect("the upgrade");
        assert_eq!(resp.status(), 101);
        ws.send(Message::text("through capture")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("through capture"));
        let m = agent.metrics().await;
        assert_eq!(metric(&m, "weft_upgrades_total", &["direction=\"outbound\""]), 1.0, "{m}");
        init(&["--uninstall"]);
    });
}

/// A DNS server standing in for the system's resolver: `outside.test` is
/// `OUTSIDE_IP`; every other name does not exist.
async fn upstream_dns(addr: &str) {
    use hickory_proto::op::{Message, ResponseCode};
    use hickory_proto::rr::{RData, Record, rdata::A};
    let socket = tokio::net::UdpSocket::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let (n, from) = socket.recv_from(&mut buf).await.unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut r = Message::response(q.metadata.id, q.metadata.op_code);
            r.metadata.recursion_desired = q.metadata.recursion_desired;
            r.metadata.recursion_available = true;
            r.add_queries(q.queries.clone());
            let name = q.queries[0].name().to_ascii();
            if name == "outside.test." {
                if q.queries[0].query_type() == hickory_proto::rr::RecordType::A {
                    let ip = OUTSIDE_IP.parse().unwrap();
                    r.add_answer(Record::from_rdata(q.queries[0].name().clone(), 60, RData::A(A(ip))));
                }
            } else {
                r.metadata.response_code = ResponseCode::NXDomain;
            }
            socket.send_to(&r.to_vec().unwrap(), from).await.unwrap();
        }
    });
}

#[test]
fn mesh_names_resolve_through_the_sidecar_and_tcp_to_them_is_balanced_and_guarded_by_the_breaker() {
    in_netns(|| async {
        // Any destination is routable (as a default route makes it in a
        // pod): the system's resolver and the virtual addresses.
        // From an address of the namespace's own (not loopback, as a pod's).
        let out =
            Command::new("ip").args(["route", "add", "default", "dev", "lo", "src", INFERENCE_IP]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        upstream_dns(&format!("{OUTSIDE_IP}:53")).await;
        let etcd = Etcd::start().await;
        let control = Control::start(&etcd, 5).await;
        let urls = [control.url()];
        apply(
            &control.url(),
            "kind: Resilience\nservice: inference\ncircuit_breaker: { consecutive_failures: 1, base_ejection: 30s, max_ejection_percent: 50 }\n",
        )
        .await;
        // Two instances whose app serves TCP port 9000 too; on the second,
        // the one in the caller's region (so it is tried first), nothing
        // listens there, so its streams fail.
        tcp_server("127.0.0.1:9000", b"").await;
        let good = Backend::http("inference", "v1").await;
        let broken_app = tokio::net::TcpListener::bind(format!("{INFERENCE_IP}:0")).await.unwrap();
        let info = Info { service: "inference".into(), version: "v2".into(), outbound: None, mode: Default::default() };
        let broken = Backend::serve_http(broken_app, info);
        let (inf1, _inf2) = tokio::join!(
            Sidecar::start_with(&urls, "inference", "region=b", good.addr, "inf-1", &["--app-ports", "9000"]),
            Sidecar::start_with(&urls, "inference", "region=a", broken.addr, "inf-2", &["--app-ports", "9000"]),
        );
        let app = Backend::http("agent", "v1").await;
        let dns = ["--dns", "127.0.0.1:4153", "--dns-upstream", &format!("{OUTSIDE_IP}:53")];
        let mut flags = vec!["--outbound", "127.0.0.1:4140"];
        flags.extend(dns);
        let agent = Sidecar::start_with(&urls, "agent", "region=a", app.addr, "agent-1", &flags).await;
        let before = iptables_save();
        let capture = ["--proxy-uid", "0", "--outbound-port", "4140", "--inbound-ports", "1", "--dns-port", "4153"];
        init(&capture);

        // The app's resolver (glibc, from /etc/resolv.conf, whatever it
        // names) is answered by the sidecar.
        let vip = as_app("getent ahostsv4 inference | head -1 | cut -d' ' -f1").await;
        assert!(vip.starts_with("240.240."), "a virtual address: {vip:?}");
        assert_eq!(as_app("getent ahostsv4 inference | head -1 | cut -d' ' -f1").await, vip, "the same one");
        let outside = as_app("getent ahostsv4 outside.test | head -1 | cut -d' ' -f1").await;
        assert_eq!(outside.trim(), OUTSIDE_IP, "other names are the system resolver's");
        assert_eq!(as_app("getent hosts nosuch.test || echo none").await.trim(), "none");

        // HTTP by name, with nothing but the URL: routed by the mesh.
        let curl =
            "for i in $(seq 1 10); do curl -s -o /dev/null -w '%{http_code} ' http://inference:8080/v1/run; done";
        assert_eq!(as_app(curl).await.trim(), ["200"; 10].join(" "));
        // Opaque TCP by name: every connection reaches an instance that
        // serves it; the broken one is ejected at its first failure.
        for i in 0..20 {
            let echoed =
                as_app(&format!("exec 3<>/dev/tcp/inference/9000; printf ping{i:02} >&3; head -c 6 <&3")).await;
            assert_eq!(echoed, format!("ping{i:02}"));
        }
        let m = agent.metrics().await;
        assert_eq!(metric(&m, "weft_tcp_connections_total", &["detected=\"mesh\""]), 20.0, "{m}");
        assert_eq!(metric(&m, "weft_tcp_connect_failures_total", &[]), 0.0, "{m}");
        assert_eq!(metric(&m, "weft_breaker_ejections_total", &["service=\"inference\""]), 1.0, "{m}");
        assert!(metric(&m, "weft_dns_queries_total", &["answer=\"mesh\""]) >= 3.0, "{m}");
        assert!(metric(&m, "weft_dns_queries_total", &["answer=\"forwarded\""]) >= 2.0, "{m}");
        let served = metric(&inf1.metrics().await, "weft_tcp_connections_total", &["detected=\"mesh\""]);
        assert_eq!(served, 20.0, "every stream was served by the healthy instance");

        // A third instance on an address of its own: TCP the app opens to
        // that address (not a virtual one) goes to that instance, through
        // its sidecar; a port there its sidecar does not serve is reached
        // as it was.
        let out = Command::new("ip").args(["addr", "add", &format!("{POD_IP}/32"), "dev", "lo"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let pod_inbound = format!("{POD_IP}:0");
        let flags = ["--app-ports", "9000", "--inbound", pod_inbound.as_str()];
        let inf3 = Sidecar::start_with(&urls, "inference", "region=c", good.addr, "inf-3", &flags).await;
        let a = &agent;
        eventually("the caller knows the third instance", Duration::from_secs(10), || async move {
            a.endpoint_addrs("inference").await.iter().any(|e| e.starts_with(POD_IP))
        })
        .await;
        let echoed = as_app(&format!("exec 3<>/dev/tcp/{POD_IP}/9000; printf pinned >&3; head -c 6 <&3")).await;
        assert_eq!(echoed, "pinned", "nothing listens on {POD_IP}:9000 itself");
        let m = inf3.metrics().await;
        assert_eq!(metric(&m, "weft_tcp_connections_total", &["detected=\"mesh\""]), 1.0, "{m}");
        tcp_server(&format!("{POD_IP}:7003"), b"").await;
        let other = as_app(&format!("exec 3<>/dev/tcp/{POD_IP}/7003; printf other >&3; head -c 5 <&3")).await;
        assert_eq!(other, "other");
        let m = agent.metrics().await;
        assert_eq!(metric(&m, "weft_tcp_connections_total", &["detected=\"opaque\""]), 1.0, "{m}");

        init(&["--uninstall"]);
        assert_eq!(iptables_save(), before, "uninstall leaves the rules as they were");
    });
}

#[test]
fn with_mtls_callers_outside_the_mesh_reach_captured_ports_only_in_permissive_mode() {
    use harness::pki::{INFERENCE, Pki};
    in_netns(|| async {
        let peer = Peer::new();
        let pki = Pki::init().await;
        let etcd = Etcd::start().await;
        let control = pki.control(&etcd, "1h").await;
        let bundle = pki.path("ca.crt");
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let app_port = listener.local_addr().unwrap().port();
        let info = Info { service: "inference".into(), version: "v1".into(), outbound: None, mode: Default::default() };
        let app = Backend::serve_http(listener, info);
        let echo = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let echo_port = echo.local_addr().unwrap().port();
        drop(echo);
        tcp_server(&format!("0.0.0.0:{echo_port}"), b"").await;
        let local_app: std::net::SocketAddr = format!("127.0.0.1:{app_port}").parse().unwrap();
        let start = |mode: &'static str| {
            let (urls, bundle) = ([control.url()], bundle.clone());
            async move {
                let flags =
                    ["--token", INFERENCE, "--ca-bundle", &bundle, "--inbound", "0.0.0.0:4143", "--inbound-mtls", mode];
                Sidecar::start_with(&urls, "inference", "", local_app, "inf-1", &flags).await
            }
        };
        let ports = format!("{app_port},{echo_port}");
        init(&["--proxy-uid", "0", "--inbound-port", "4143", "--inbound-ports", &ports]);
        let curl = format!("curl -s -m 5 -o /dev/null -w '%{{http_code}}' http://{LOCAL_IP}:{app_port}/");
        let tcp = format!("exec 3<>/dev/tcp/{LOCAL_IP}/{echo_port} && printf hi >&3 && timeout 5 head -c 2 <&3");

        // Permissive: HTTP through the sidecar, other TCP to the app's port.
        let mut sidecar = start("permissive").await;
        let hits = || app.mode.hits.load(std::sync::atomic::Ordering::SeqCst);
        let seen = hits();
        assert_eq!(peer.run(&curl).await, "200");
        assert_eq!(hits(), seen + 1);
        assert_eq!(peer.run(&tcp).await, "hi");
        let m = sidecar.metrics().await;
        assert_eq!(metric(&m, "weft_requests_total", &["direction=\"inbound\""]), 1.0, "{m}");
        assert_eq!(metric(&m, "weft_inbound_plaintext_total", &["mode=\"permissive\""]), 2.0, "{m}");
        sidecar.kill().await;

        // Strict: neither gets in; the app sees nothing.
        let sidecar = start("strict").await;
        let seen = hits();
        assert_eq!(peer.run(&curl).await, "000", "refused");
        let echoed = peer.run(&format!("({tcp}) 2>/dev/null; echo end")).await;
        assert_eq!(echoed.trim(), "end", "nothing came back");
        assert_eq!(hits(), seen);
        let m = sidecar.metrics().await;
        assert_eq!(metric(&m, "weft_inbound_plaintext_total", &["mode=\"strict\""]), 2.0, "{m}");
        init(&["--uninstall"]);
    });
}
