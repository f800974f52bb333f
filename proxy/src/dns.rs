//! DNS for mesh service names, where the platform has none (outside
//! Kubernetes): the app's resolver asks the sidecar (`--dns`, with the app's
//! port 53 captured by `weft-proxy init --dns-port`, or named in its
//! resolv.conf). A single-label name the control plane knows as a service
//! (`inference`) gets a virtual address from `--vip-cidr`, which the sidecar
//! maps back to the service when the app connects to it; every other name
//! is forwarded, as it is, to the system's resolver (`--dns-upstream`, or
//! the first nameserver of /etc/resolv.conf) and its answer relayed.
//!
//! Messages are parsed and written with hickory-proto.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType, rdata::A};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;

use crate::outbound::Outbound;

/// Answers for mesh names live this long in the app's caches: short, so a
/// restarted sidecar's table is soon the only one in use.
const TTL: u32 = 5;
/// Queries in flight at once (mesh lookups and forwards); more are dropped,
/// and the app's resolver asks again.
const MAX_IN_FLIGHT: usize = 256;
/// How long a forwarded query waits for the upstream resolver.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Mesh names given an address at most (the control plane's services are
/// far fewer; a bound all the same).
pub(crate) const MAX_VIPS: usize = 4096;
/// The default of `--vip-cidr`: a reserved range no real host uses. The app
/// must have a route to it (any default route does) for its connect to
/// reach the capture rules.
pub const DEFAULT_VIP_CIDR: &str = "240.240.0.0/16";

/// Virtual addresses of mesh services. A name's address is a hash of it
/// within the range (the next free one on a collision), so a restarted
/// sidecar gives the same names the same addresses.
pub(crate) struct Vips {
    base: u32,
    size: u32,
    table: RwLock<VipTable>,
}

#[derive(Default)]
struct VipTable {
    by_name: HashMap<String, Ipv4Addr>,
    by_ip: HashMap<Ipv4Addr, String>,
}

/// Parses `240.240.0.0/16`; the range must hold at least 256 addresses.
pub fn parse_vip_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = s.split_once('/').ok_or_else(|| format!("'{s}' is not an IPv4 CIDR (a.b.c.d/len)"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| format!("'{s}': '{addr}' is not an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .ok()
        .filter(|l| (8..=24).contains(l))
        .ok_or_else(|| format!("'{s}': the prefix length must be 8-24"))?;
    let mask = u32::MAX << (32 - len);
    if u32::from(addr) & !mask != 0 {
        return Err(format!(
            "'{s}': host bits are set (the network is {}/{len})",
            Ipv4Addr::from(u32::from(addr) & mask)
        ));
    }
    Ok((addr, len))
}

impl Vips {
    pub(crate) fn new((net, len): (Ipv4Addr, u8)) -> Vips {
        Vips { base: u32::from(net), size: 1 << (32 - len), table: RwLock::default() }
    }

    /// The address of `service`, given one if it has none yet; `None` when
    /// the table is full.
    pub(crate) fn assign(&self, service: &str) -> Option<Ipv4Addr> {
        if let Some(ip) = self.table.read().unwrap_or_else(|e| e.into_inner()).by_name.get(service) {
            return Some(*ip);
        }
        let mut t = self.table.write().unwrap_or_else(|e| e.into_inner());
        if let Some(ip) = t.by_name.get(service) {
            return Some(*ip);
        }
        if t.by_name.len() >= MAX_VIPS.min(self.size as usize - 2) {
            return None;
        }
        // Stable across builds and runs, so a name keeps its address.
        let hash = crate::hash::fnv1a(service.as_bytes());
        // The network and broadcast addresses are never handed out.
        let usable = self.size - 2;
        let mut offset = (hash % u64::from(usable)) as u32;
        loop {
            let ip = Ipv4Addr::from(self.base + 1 + offset);
            if let std::collections::hash_map::Entry::Vacant(free) = t.by_ip.entry(ip) {
                free.insert(service.to_string());
                t.by_name.insert(service.to_string(), ip);
                return Some(ip);
            }
            offset = (offset + 1) % usable;
        }
    }

    /// The service whose address `ip` is.
    pub(crate) fn service(&self, ip: IpAddr) -> Option<String> {
        let IpAddr::V4(ip) = ip else { return None };
        let offset = u32::from(ip).wrapping_sub(self.base);
        if offset >= self.size {
            return None;
        }
        self.table.read().unwrap_or_else(|e| e.into_inner()).by_ip.get(&ip).cloned()
    }
}

/// The system's resolver: the first nameserver of /etc/resolv.conf.
pub fn system_resolver() -> Result<SocketAddr, String> {
    let text = std::fs::read("/etc/resolv.conf").map_err(|e| format!("/etc/resolv.conf: {e}"))?;
    let conf = resolv_conf::Config::parse(&text).map_err(|e| format!("/etc/resolv.conf: {e}"))?;
    let ns = conf.nameservers.first().ok_or("/etc/resolv.conf names no nameserver")?;
    Ok(SocketAddr::new(ns.into(), 53))
}

/// The sidecar's DNS server.
pub(crate) struct Dns {
    pub(crate) outbound: Arc<Outbound>,
    pub(crate) vips: Arc<Vips>,
    pub(crate) upstream: SocketAddr,
}

/// What to do with a query.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// A single-label name of the IN class, asked for A or AAAA: perhaps a
    /// mesh service.
    Mesh {
        service: String,
        qtype: RecordType,
    },
    Forward,
}

fn plan(msg: &Message) -> Plan {
    let [q] = msg.queries.as_slice() else { return Plan::Forward };
    let name = q.name();
    let qtype = q.query_type();
    if msg.metadata.op_code != OpCode::Query
        || q.query_class() != DNSClass::IN
        || !matches!(qtype, RecordType::A | RecordType::AAAA)
        || name.num_labels() != 1
    {
        return Plan::Forward;
    }
    let service = name.to_lowercase().to_ascii();
    let service = service.trim_end_matches('.');
    if !weft_policy::names::is_service(service.as_bytes()) {
        return Plan::Forward;
    }
    Plan::Mesh { service: service.to_string(), qtype }
}

/// The answer for a mesh name: its address for A, no record for AAAA (the
/// name exists; the mesh addresses are IPv4).
fn answer(query: &Message, ip: Ipv4Addr, qtype: RecordType) -> Message {
    let mut resp = Message::response(query.metadata.id, OpCode::Query);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = query.metadata.recursion_desired;
    resp.metadata.recursion_available = true;
    resp.metadata.response_code = ResponseCode::NoError;
    resp.add_query(query.queries[0].clone());
    if qtype == RecordType::A {
        resp.add_answer(Record::from_rdata(query.queries[0].name().clone(), TTL, RData::A(A(ip))));
    }
    resp
}

impl Dns {
    /// Answers queries on `socket` until the task is dropped.
    pub(crate) async fn serve(self: Arc<Self>, socket: UdpSocket) {
        let socket = Arc::new(socket);
        let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, from) = match socket.recv_from(&mut buf).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "dns: receive failed");
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                metrics::counter!("weft_dns_queries_total", "answer" => "dropped").increment(1);
                continue;
            };
            let (this, socket, query) = (self.clone(), socket.clone(), buf[..n].to_vec());
            tokio::spawn(async move {
                if let Some(reply) = this.reply(&query).await {
                    let _ = socket.send_to(&reply, from).await;
                }
                drop(permit);
            });
        }
    }

    /// The reply to one query, if any.
    async fn reply(&self, query: &[u8]) -> Option<Vec<u8>> {
        let Ok(msg) = Message::from_vec(query) else {
            metrics::counter!("weft_dns_queries_total", "answer" => "malformed").increment(1);
            // A FORMERR when at least the id can be read.
            let id = u16::from_be_bytes([*query.first()?, *query.get(1)?]);
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec().ok();
        };
        if msg.metadata.message_type != MessageType::Query {
            return None;
        }
        if let Plan::Mesh { service, qtype } = plan(&msg)
            && self.outbound.known(&service).await.is_some()
            && let Some(ip) = self.vips.assign(&service)
        {
            metrics::counter!("weft_dns_queries_total", "answer" => "mesh").increment(1);
            return answer(&msg, ip, qtype).to_vec().ok();
        }
        metrics::counter!("weft_dns_queries_total", "answer" => "forwarded").increment(1);
        match self.forward(query, msg.metadata.id).await {
            Ok(reply) => Some(reply),
            Err(e) => {
                tracing::debug!(upstream = %self.upstream, error = %e, "dns: forward failed");
                Message::error_msg(msg.metadata.id, msg.metadata.op_code, ResponseCode::ServFail).to_vec().ok()
            }
        }
    }

    /// Relays `query` to the upstream resolver and returns its answer.
    async fn forward(&self, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
        let bind: SocketAddr = if self.upstream.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("valid");
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(self.upstream).await?;
        socket.send(query).await?;
        let mut buf = vec![0u8; 4096];
        let wait = async {
            loop {
                let n = socket.recv(&mut buf).await?;
                // Only the answer to this query.
                if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                    return Ok::<usize, std::io::Error>(n);
                }
            }
        };
        let n = tokio::time::timeout(FORWARD_TIMEOUT, wait)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 2s"))??;
        buf.truncate(n);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut m = Message::new(7, MessageType::Query, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m
    }

    #[test]
    fn single_label_service_names_may_be_the_mesh_the_rest_is_forwarded() {
        assert_eq!(
            plan(&query("inference.", RecordType::A)),
            Plan::Mesh { service: "inference".into(), qtype: RecordType::A }
        );
        assert_eq!(
            plan(&query("Inference", RecordType::AAAA)),
            Plan::Mesh { service: "inference".into(), qtype: RecordType::AAAA }
        );
        assert_eq!(plan(&query("example.com.", RecordType::A)), Plan::Forward);
        assert_eq!(plan(&query("inference.", RecordType::MX)), Plan::Forward);
        let mut odd = Message::new(7, MessageType::Query, OpCode::Query);
        odd.add_query(Query::query(Name::from_labels(vec![&b"-odd"[..]]).unwrap(), RecordType::A));
        assert_eq!(plan(&odd), Plan::Forward, "not a service name");
    }

    #[test]
    fn a_mesh_answer_has_the_address_for_a_and_no_record_for_aaaa() {
        let q = query("inference.", RecordType::A);
        let bytes = answer(&q, Ipv4Addr::new(240, 240, 0, 9), RecordType::A).to_vec().unwrap();
        let back = Message::from_vec(&bytes).unwrap();
        assert_eq!(back.metadata.id, 7);
        assert_eq!(back.metadata.message_type, MessageType::Response);
        assert_eq!(back.answers.len(), 1);
        assert_eq!(back.answers[0].data, RData::A(A(Ipv4Addr::new(240, 240, 0, 9))));
        let none = answer(&query("inference.", RecordType::AAAA), Ipv4Addr::new(240, 240, 0, 9), RecordType::AAAA);
        assert!(none.answers.is_empty());
        assert_eq!(none.metadata.response_code, ResponseCode::NoError);
    }

    #[test]
    fn addresses_are_stable_distinct_within_the_range_and_bounded() {
        let vips = Vips::new(parse_vip_cidr("240.240.0.0/24").unwrap());
        let a = vips.assign("inference").unwrap();
        assert_eq!(vips.assign("inference"), Some(a), "the same name, the same address");
        assert_eq!(
            Vips::new(parse_vip_cidr("240.240.0.0/24").unwrap()).assign("inference"),
            Some(a),
            "and after a restart"
        );
        let mut seen = std::collections::HashSet::new();
        for i in 0..254 {
            let ip = vips.assign(&format!("svc-{i}")).or_else(|| vips.assign("inference")).unwrap();
            assert!(ip.octets()[..3] == [240, 240, 0] && ip.octets()[3] != 0 && ip.octets()[3] != 255, "{ip}");
            seen.insert(ip);
        }
        assert_eq!(seen.len(), 254, "every usable address once");
        assert_eq!(vips.assign("one-too-many"), None, "a full range gives no more");
        assert_eq!(vips.service(IpAddr::V4(a)).as_deref(), Some("inference"));
        assert_eq!(vips.service("10.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn vip_ranges_are_checked() {
        assert!(parse_vip_cidr("240.240.0.0/16").is_ok());
        assert!(parse_vip_cidr("240.240.0.1/16").unwrap_err().contains("host bits"));
        assert!(parse_vip_cidr("240.240.0.0/30").unwrap_err().contains("8-24"));
        assert!(parse_vip_cidr("240.240.0.0").unwrap_err().contains("CIDR"));
    }
}
