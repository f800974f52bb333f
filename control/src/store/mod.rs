//! The etcd adapter: every read and write of weft's state goes through here.
//!
//! Layout under the prefix (default `/weft`):
//! `routes/<service>[/<tenant>]`, `resilience/<service>`,
//! `tenants/<tenant>/<service|*>`, `endpoints/<service>/<proxy-id>` (leased),
//! `proxies/<proxy-id>` (leased: what each sidecar last ACKed or NACKed, so
//! any replica can answer `weftctl status`), `departed/<service>/<proxy-id>`
//! (leased, short-lived: the sidecar left on purpose, see [`Removal`]).
//! Values are JSON with a `schema` field.

pub mod lease;
pub mod watcher;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use weft_policy::doc::{self, SCHEMA_VERSION};
use weft_policy::{Kind, Resource, ResourceId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("etcd at {endpoints}: {source} (hint: is etcd running and reachable?)")]
    Etcd {
        endpoints: String,
        #[source]
        source: etcd_client::Error,
    },
    #[error("{resource} was changed by someone else during this apply; apply again")]
    Conflict { resource: String },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// An endpoint record: one registered instance of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub schema: u32,
    pub proxy_id: String,
    pub service: String,
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub ready: bool,
    /// Its inbound listener speaks mTLS ([`xds_proto::v1::Hello::mtls`]).
    #[serde(default)]
    pub mtls: bool,
}

impl EndpointRecord {
    /// The endpoint as sidecars get it.
    pub fn to_wire(&self) -> xds_proto::v1::Endpoint {
        xds_proto::v1::Endpoint {
            proxy_id: self.proxy_id.clone(),
            address: self.address.clone(),
            labels: self.labels.clone().into_iter().collect(),
            ready: self.ready,
            mtls: self.mtls,
        }
    }
}

/// A sidecar whose records are to be removed: it left on purpose.
///
/// The removal writes a departure marker, `departed/<service>/<proxy-id>`,
/// in the same transaction, so every replica's watch sees the endpoint go
/// and the marker come at one revision and can tell its sidecars the
/// endpoint left on purpose. An endpoint that vanishes without a marker (its
/// lease expired with a replica or during an etcd outage) may be alive and
/// about to register again, and sidecars hold on to it for a while.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub service: String,
    pub proxy_id: String,
    /// Removed only if the endpoint record was last written at this revision.
    pub endpoint_rev: u64,
    /// The lease the marker is written under (the replica's).
    pub lease: i64,
}

/// The value of a departure marker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Departed {
    pub schema: u32,
    pub unix_ms: u64,
}

/// What one sidecar last said to the control plane.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ProxyRecord {
    pub schema: u32,
    pub proxy_id: String,
    pub service: String,
    pub address: String,
    #[serde(default)]
    pub acked_version: u64,
    #[serde(default)]
    pub nacked_version: u64,
    #[serde(default)]
    pub last_nack: String,
    #[serde(default)]
    pub subscriptions: Vec<String>,
    #[serde(default)]
    pub control_replica: String,
    /// The sidecar's workload identity and its certificate's expiry (Unix
    /// ms), once it has one.
    #[serde(default)]
    pub identity: String,
    #[serde(default)]
    pub cert_not_after_unix_ms: u64,
}

/// A policy resource as stored: `{"schema":1,"resource":{...}}`.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    schema: u32,
    resource: serde_json::Value,
    /// When it was applied, Unix ms (for `weftctl history`).
    #[serde(default, skip_serializing_if = "is_zero")]
    applied_at: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// When a stored value was applied (0 when it does not say).
pub fn applied_at(value: &[u8]) -> u64 {
    serde_json::from_slice::<Stored>(value).map(|s| s.applied_at).unwrap_or(0)
}

/// Decodes a stored policy value: structure only. Whether it keeps the rules
/// is [`weft_policy::check`]'s to say (the index refuses what does not).
pub fn decode_resource(value: &[u8]) -> std::result::Result<Resource, String> {
    let stored: Stored = serde_json::from_slice(value).map_err(|e| format!("not weft JSON: {e}"))?;
    if stored.schema > SCHEMA_VERSION {
        return Err(format!(
            "schema {} is newer than this control plane understands ({SCHEMA_VERSION})",
            stored.schema
        ));
    }
    doc::from_value(stored.resource).map_err(|p| p.to_string())
}

pub fn encode_resource(resource: &Resource) -> String {
    serde_json::to_string(&Stored { schema: SCHEMA_VERSION, resource: doc::to_value(resource), applied_at: unix_ms() })
        .expect("serializable")
}

/// What `apply` did to one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Created,
    Configured,
    Unchanged,
}

impl Action {
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Configured => "configured",
            Action::Unchanged => "unchanged",
        }
    }
}

/// The etcd adapter. With several etcd endpoints it keeps one client per
/// member and uses one at a time: a call that cannot reach its member (down,
/// or cut off from the cluster's leader) is tried on the next, and the next
/// becomes the one in use. etcd-client's own balancing spreads calls over all
/// endpoints and keeps sending some to a dead one.
#[derive(Clone)]
pub struct Store {
    members: Arc<Members>,
    prefix: String,
    endpoints: String,
}

struct Members {
    clients: Vec<Client>,
    current: AtomicUsize,
}

impl Store {
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Store> {
        let joined = endpoints.join(",");
        // A member cut off from the leader refuses watches instead of serving
        // a stale view (require_leader).
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(std::time::Duration::from_secs(2))
            .with_timeout(std::time::Duration::from_secs(5))
            .with_keep_alive(std::time::Duration::from_secs(5), std::time::Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let mut clients = Vec::new();
        for e in endpoints {
            let c = Client::connect([e], Some(opts.clone()))
                .await
                .map_err(|source| StoreError::Etcd { endpoints: joined.clone(), source })?;
            clients.push(c);
        }
        if clients.is_empty() {
            return Err(StoreError::Etcd {
                endpoints: joined,
                source: etcd_client::Error::InvalidArgs("no etcd endpoints".into()),
            });
        }
        Ok(Store {
            members: Arc::new(Members { clients, current: AtomicUsize::new(0) }),
            prefix: prefix.trim_end_matches('/').to_string(),
            endpoints: joined,
        })
    }

    fn err(&self, source: etcd_client::Error) -> StoreError {
        StoreError::Etcd { endpoints: self.endpoints.clone(), source }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The client of the member in use.
    pub fn client(&self) -> Client {
        let m = &self.members;
        m.clients[m.current.load(Ordering::Relaxed) % m.clients.len()].clone()
    }

    /// Moves to the next member (after the one in use failed a stream, e.g.
    /// the watch) and returns its client.
    pub fn next_client(&self) -> Client {
        let m = &self.members;
        let next = m.current.fetch_add(1, Ordering::Relaxed) + 1;
        m.clients[next % m.clients.len()].clone()
    }

    /// Runs `op` on the member in use; when it cannot reach that member, on
    /// the next, until every member was tried once.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let m = &self.members;
        let n = m.clients.len();
        let start = m.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let at = (start + i) % n;
            match op(m.clients[at].clone()).await {
                Ok(v) => {
                    if i > 0 {
                        m.current.store(at, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(e) if n > 1 && unreachable(&e) => last = Some(e),
                Err(e) => return Err(self.err(e)),
            }
        }
        Err(self.err(last.expect("at least one member was tried")))
    }

    pub fn key(&self, suffix: &str) -> String {
        format!("{}/{}", self.prefix, suffix)
    }

    /// Checks that etcd answers.
    pub async fn ping(&self) -> Result<u64> {
        let r = self.call(|mut c| async move { c.status().await }).await?;
        Ok(r.header().map(|h| h.revision() as u64).unwrap_or(0))
    }

    /// Writes all resources in one transaction, or none. Resources that are
    /// already stored as given are left alone (and reported unchanged).
    pub async fn apply(&self, resources: &[Resource]) -> Result<(u64, Vec<(ResourceId, Action)>)> {
        let mut compares = Vec::new();
        let mut ops = Vec::new();
        let mut results = Vec::new();
        for r in resources {
            let id = r.id();
            let key = self.key(&id.key_suffix());
            let current = self
                .call(|mut c| {
                    let key = &key;
                    async move { c.get(key.clone(), None).await }
                })
                .await?;
            let existing = current.kvs().first();
            let action = match existing {
                None => Action::Created,
                Some(kv) => match decode_resource(kv.value()) {
                    Ok(old) if old == *r => Action::Unchanged,
                    _ => Action::Configured,
                },
            };
            let mod_rev = existing.map(|kv| kv.mod_revision()).unwrap_or(0);
            compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, mod_rev));
            if action != Action::Unchanged {
                ops.push(TxnOp::put(key, encode_resource(r), None));
            }
            results.push((id, action));
        }
        let txn = Txn::new().when(compares).and_then(ops);
        let resp = self
            .call(|mut c| {
                let txn = &txn;
                async move { c.txn(txn.clone()).await }
            })
            .await?;
        if !resp.succeeded() {
            return Err(StoreError::Conflict {
                resource: results.iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>().join(", "),
            });
        }
        let rev = resp.header().map(|h| h.revision() as u64).unwrap_or(0);
        Ok((rev, results))
    }

    /// Lists stored resources of a kind (all when `id` is None).
    pub async fn get(&self, kind: Kind, id: Option<&ResourceId>) -> Result<(u64, Vec<(String, Vec<u8>, u64)>)> {
        let (key, opts) = match id {
            Some(id) => (self.key(&id.key_suffix()), None),
            None => (format!("{}/", self.key(kind.key_dir())), Some(GetOptions::new().with_prefix())),
        };
        let resp = self
            .call(|mut c| {
                let key = &key;
                let opts = &opts;
                async move { c.get(key.clone(), opts.clone()).await }
            })
            .await?;
        let rev = resp.header().map(|h| h.revision() as u64).unwrap_or(0);
        let items = resp
            .kvs()
            .iter()
            .map(|kv| (kv.key_str().unwrap_or("").to_string(), kv.value().to_vec(), kv.mod_revision() as u64))
            .collect();
        Ok((rev, items))
    }

    /// The stored versions of one resource, newest first: (mod revision,
    /// value). Follows the key back through etcd's history until its
    /// creation, a compaction, or `limit`. The flag is true when compaction
    /// cut the history short.
    pub async fn history(&self, id: &ResourceId, limit: usize) -> Result<(Vec<(u64, Vec<u8>)>, bool)> {
        let key = self.key(&id.key_suffix());
        let mut out = Vec::new();
        let mut at: Option<i64> = None;
        loop {
            let opts = at.map(|rev| GetOptions::new().with_revision(rev));
            let resp = match self
                .call(|mut c| {
                    let key = &key;
                    let opts = &opts;
                    async move { c.get(key.clone(), opts.clone()).await }
                })
                .await
            {
                Ok(r) => r,
                Err(StoreError::Etcd { source: etcd_client::Error::GRpcStatus(s), .. })
                    if s.message().contains("compacted") =>
                {
                    return Ok((out, true));
                }
                Err(e) => return Err(e),
            };
            let Some(kv) = resp.kvs().first() else { return Ok((out, false)) };
            out.push((kv.mod_revision() as u64, kv.value().to_vec()));
            if out.len() >= limit || kv.version() <= 1 {
                return Ok((out, false));
            }
            at = Some(kv.mod_revision() - 1);
        }
    }

    /// The value of a resource as of `revision`.
    pub async fn get_at(&self, id: &ResourceId, revision: u64) -> Result<Option<(u64, Vec<u8>)>> {
        let key = self.key(&id.key_suffix());
        let opts = GetOptions::new().with_revision(revision as i64);
        let resp = self
            .call(|mut c| {
                let key = &key;
                let opts = &opts;
                async move { c.get(key.clone(), Some(opts.clone())).await }
            })
            .await?;
        Ok(resp.kvs().first().map(|kv| (kv.mod_revision() as u64, kv.value().to_vec())))
    }

    pub async fn delete(&self, id: &ResourceId) -> Result<(u64, bool)> {
        let key = self.key(&id.key_suffix());
        let resp = self
            .call(|mut c| {
                let key = &key;
                async move { c.delete(key.clone(), None::<DeleteOptions>).await }
            })
            .await?;
        let rev = resp.header().map(|h| h.revision() as u64).unwrap_or(0);
        Ok((rev, resp.deleted() > 0))
    }

    /// Everything under the prefix at one revision, for a full (re)sync.
    pub async fn load_all(&self) -> Result<(u64, Vec<KeyValue>)> {
        let key = format!("{}/", self.prefix);
        let resp = self
            .call(|mut c| {
                let key = &key;
                async move { c.get(key.clone(), Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let rev = resp.header().map(|h| h.revision() as u64).unwrap_or(0);
        Ok((rev, resp.kvs().to_vec()))
    }

    pub async fn endpoints(&self, service: &str) -> Result<Vec<EndpointRecord>> {
        self.list_json(&format!("endpoints/{service}/")).await
    }

    pub async fn proxies(&self) -> Result<Vec<ProxyRecord>> {
        self.list_json("proxies/").await
    }

    async fn list_json<T: serde::de::DeserializeOwned>(&self, dir: &str) -> Result<Vec<T>> {
        let key = self.key(dir);
        let resp = self
            .call(|mut c| {
                let key = &key;
                async move { c.get(key.clone(), Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        Ok(resp.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect())
    }

    pub async fn grant_lease(&self, ttl_secs: i64) -> Result<i64> {
        let r = self.call(|mut c| async move { c.lease_grant(ttl_secs, None).await }).await?;
        Ok(r.id())
    }

    /// Writes a proxy's endpoint record under its lease.
    /// Returns the revision of the write.
    pub async fn put_endpoint(&self, rec: &EndpointRecord, lease: i64) -> Result<u64> {
        self.put_leased(self.endpoint_key(&rec.service, &rec.proxy_id), json(rec), lease).await
    }

    /// The record of sidecar `proxy_id`, if one is registered.
    pub async fn proxy(&self, proxy_id: &str) -> Result<Option<ProxyRecord>> {
        let key = self.proxy_key(proxy_id);
        let resp = self
            .call(|mut c| {
                let key = &key;
                async move { c.get(key.clone(), None).await }
            })
            .await?;
        Ok(resp.kvs().first().and_then(|kv| serde_json::from_slice(kv.value()).ok()))
    }

    /// Runs `ops` in one transaction; false when it failed (the callers
    /// then go one by one).
    async fn all_at_once(&self, ops: Vec<TxnOp>) -> bool {
        let txn = Txn::new().and_then(ops);
        self.call(|mut c| {
            let txn = &txn;
            async move { c.txn(txn.clone()).await }
        })
        .await
        .is_ok()
    }

    pub async fn put_proxy(&self, rec: &ProxyRecord, lease: i64) -> Result<u64> {
        self.put_leased(self.proxy_key(&rec.proxy_id), json(rec), lease).await
    }

    /// Writes many proxy records in one transaction. When it fails (a lease
    /// revoked meanwhile makes the whole transaction fail), falls back to one
    /// put each, skipping those that fail.
    pub async fn put_proxies(&self, recs: &[(ProxyRecord, i64)]) -> Result<()> {
        if recs.is_empty() {
            return Ok(());
        }
        let ops: Vec<TxnOp> =
            recs.iter().map(|(rec, lease)| leased_put(self.proxy_key(&rec.proxy_id), json(rec), *lease)).collect();
        if self.all_at_once(ops).await {
            return Ok(());
        }
        for (rec, lease) in recs {
            if let Err(e) = self.put_proxy(rec, *lease).await {
                tracing::debug!(proxy = %rec.proxy_id, error = %e, "proxy record not written");
            }
        }
        Ok(())
    }

    /// Registers sidecars: each one's endpoint and proxy records (and the
    /// removal of a departure marker it left earlier), in one transaction for
    /// up to [`REGISTRATIONS_PER_TXN`] of them. Returns, per sidecar, the revision
    /// its endpoint was written at. When the transaction fails (a lease gone
    /// meanwhile, or one sidecar twice), each is written on its own.
    pub async fn register_many(&self, regs: &[(EndpointRecord, ProxyRecord, i64)]) -> Vec<Result<u64>> {
        let ops: Vec<TxnOp> = regs
            .iter()
            .flat_map(|(ep, proxy, lease)| {
                [
                    leased_put(self.endpoint_key(&ep.service, &ep.proxy_id), json(ep), *lease),
                    leased_put(self.proxy_key(&proxy.proxy_id), json(proxy), *lease),
                    TxnOp::delete(self.departed_key(&ep.service, &ep.proxy_id), None),
                ]
            })
            .collect();
        let txn = Txn::new().and_then(ops);
        if let Ok(r) = self
            .call(|mut c| {
                let txn = &txn;
                async move { c.txn(txn.clone()).await }
            })
            .await
        {
            let rev = r.header().map(|h| h.revision() as u64).unwrap_or(0);
            return regs.iter().map(|_| Ok(rev)).collect();
        }
        let mut out = Vec::with_capacity(regs.len());
        for (ep, proxy, lease) in regs {
            let one = async {
                let rev = self.put_endpoint(ep, *lease).await?;
                self.put_proxy(proxy, *lease).await?;
                self.forget_departed(&[(ep.service.clone(), ep.proxy_id.clone())]).await?;
                Ok(rev)
            };
            out.push(one.await);
        }
        out
    }

    /// Deletes a sidecar's endpoint and proxy records, unless the endpoint
    /// was written since `endpoint_rev` (the sidecar has registered again,
    /// through this replica or another), and marks it departed (see
    /// [`Removal`]). Returns whether they were deleted.
    pub async fn remove_instance(&self, removal: &Removal) -> Result<bool> {
        let txn = self.removal(removal);
        let r = self
            .call(|mut c| {
                let txn = &txn;
                async move { c.txn(txn.clone()).await }
            })
            .await?;
        Ok(r.succeeded())
    }

    /// [`Store::remove_instance`] for many sidecars, up to 32 per
    /// transaction (each removal a nested transaction with its own guard).
    pub async fn remove_many(&self, removals: &[Removal]) -> Result<()> {
        let ops: Vec<TxnOp> = removals.iter().map(|r| TxnOp::txn(self.removal(r))).collect();
        if self.all_at_once(ops).await {
            return Ok(());
        }
        for r in removals {
            self.remove_instance(r).await?;
        }
        Ok(())
    }

    fn removal(&self, r: &Removal) -> Txn {
        let endpoint = self.endpoint_key(&r.service, &r.proxy_id);
        let marker = json(&Departed { schema: 1, unix_ms: unix_ms() });
        Txn::new().when([Compare::mod_revision(endpoint.clone(), CompareOp::Equal, r.endpoint_rev as i64)]).and_then([
            TxnOp::delete(endpoint, None),
            TxnOp::delete(self.proxy_key(&r.proxy_id), None),
            leased_put(self.departed_key(&r.service, &r.proxy_id), marker, r.lease),
        ])
    }

    /// Deletes departure markers (they only need to live until every
    /// replica's watch has seen them).
    pub async fn forget_departed(&self, markers: &[(String, String)]) -> Result<()> {
        for chunk in markers.chunks(64) {
            let ops: Vec<TxnOp> = chunk.iter().map(|(s, p)| TxnOp::delete(self.departed_key(s, p), None)).collect();
            let txn = Txn::new().and_then(ops);
            self.call(|mut c| {
                let txn = &txn;
                async move { c.txn(txn.clone()).await }
            })
            .await?;
        }
        Ok(())
    }

    fn departed_key(&self, service: &str, proxy_id: &str) -> String {
        self.key(&format!("departed/{service}/{proxy_id}"))
    }

    fn endpoint_key(&self, service: &str, proxy_id: &str) -> String {
        self.key(&format!("endpoints/{service}/{proxy_id}"))
    }

    fn proxy_key(&self, proxy_id: &str) -> String {
        self.key(&format!("proxies/{proxy_id}"))
    }

    async fn put_leased(&self, key: String, value: String, lease: i64) -> Result<u64> {
        let opts = PutOptions::new().with_lease(lease);
        let r = self
            .call(|mut c| {
                let key = &key;
                let opts = &opts;
                let value = &value;
                async move { c.put(key.clone(), value.clone(), Some(opts.clone())).await }
            })
            .await?;
        Ok(r.header().map(|h| h.revision() as u64).unwrap_or(0))
    }
}

/// True for errors that mean "this member cannot serve now" (down, cut off
/// from the leader, timed out), where another member may.
fn unreachable(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled | tonic::Code::Unknown
        ),
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

/// A record as stored: JSON.
fn json<T: Serialize>(rec: &T) -> String {
    serde_json::to_string(rec).expect("serializable")
}

/// Sidecars registered per transaction: three operations each, and etcd
/// allows 128 operations in a transaction by default (`--max-txn-ops`).
pub const REGISTRATIONS_PER_TXN: usize = 42;

/// A put under a lease, as a transaction operation.
fn leased_put(key: String, value: String, lease: i64) -> TxnOp {
    TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease)))
}
