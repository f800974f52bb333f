//! The admin gRPC API that `weftctl` speaks. Every write is validated here
//! again (the CLI is not trusted) before anything reaches etcd.

pub mod auth;
pub mod traces;

use tonic::{Request, Response, Status};
use xds_proto::v1 as pb;
use xds_proto::v1::admin_server::Admin;

use std::sync::Arc;

use crate::admin::traces::TraceLog;
use crate::store::{Action, Store, StoreError, decode_resource};
use weft_policy::documents::{MAX_APPLY_BYTES, MAX_APPLY_RESOURCES, MAX_RESOURCE_BYTES};
use weft_policy::{Resource, ResourceId, doc, normalize_kind};

#[derive(Clone)]
pub struct AdminService {
    store: Store,
    traces: Arc<TraceLog>,
    replica: String,
    snapshots: tokio::sync::watch::Receiver<Arc<crate::push::index::Snapshot>>,
}

impl AdminService {
    pub fn new(
        store: Store,
        traces: Arc<TraceLog>,
        replica: String,
        snapshots: tokio::sync::watch::Receiver<Arc<crate::push::index::Snapshot>>,
    ) -> Self {
        AdminService { store, traces, replica, snapshots }
    }
}

/// The answer to a write: one result per resource, and the services whose
/// sidecars must hear of it (for `--wait`).
fn apply_response(revision: u64, results: Vec<(ResourceId, Action)>) -> pb::ApplyResponse {
    let mut services: Vec<String> = results
        .iter()
        .filter(|(_, a)| *a != Action::Unchanged)
        .map(|(id, _)| id.service().unwrap_or("*").to_string())
        .collect();
    services.sort();
    services.dedup();
    pb::ApplyResponse {
        revision,
        results: results
            .into_iter()
            .map(|(id, a)| pb::ApplyResult { resource: id.to_string(), action: a.as_str().into() })
            .collect(),
        services,
    }
}

fn store_status(e: StoreError) -> Status {
    match &e {
        StoreError::Conflict { .. } => Status::aborted(e.to_string()),
        // etcd refused the request itself (too large, too many operations):
        // the input's fault, not an outage.
        StoreError::Etcd { source: etcd_client::Error::GRpcStatus(s), .. }
            if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::OutOfRange) =>
        {
            Status::invalid_argument(format!("etcd refused the write: {}", s.message()))
        }
        StoreError::Etcd { .. } => Status::unavailable(e.to_string()),
    }
}

/// The apply's size limits, checked before anything is parsed.
fn check_apply_size(req: &pb::ApplyRequest) -> Result<(), Status> {
    if req.resources.len() > MAX_APPLY_RESOURCES {
        return Err(Status::invalid_argument(format!(
            "{} resources, more than the limit of {} in one apply",
            req.resources.len(),
            MAX_APPLY_RESOURCES
        )));
    }
    let mut total = 0;
    for doc in &req.resources {
        if doc.json.len() > MAX_RESOURCE_BYTES {
            return Err(Status::invalid_argument(format!(
                "{}: {} KiB, more than the limit of {} KiB per resource",
                doc.origin,
                doc.json.len() / 1024,
                MAX_RESOURCE_BYTES / 1024
            )));
        }
        total += doc.json.len();
    }
    if total > MAX_APPLY_BYTES {
        return Err(Status::invalid_argument(format!(
            "{} KiB of resources, more than the limit of {} KiB in one apply",
            total / 1024,
            MAX_APPLY_BYTES / 1024
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn apply(&self, request: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let role = auth::role(&request);
        let req = request.into_inner();
        check_apply_size(&req)?;
        let mut resources = Vec::new();
        let mut problems = Vec::new();
        for doc in &req.resources {
            let value: serde_json::Value = match serde_json::from_str(&doc.json) {
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("{}: document: {e}", doc.origin));
                    continue;
                }
            };
            match doc::from_value(value) {
                Err(p) => problems.push(format!("{}: {}: {}", doc.origin, p.field, p.message)),
                Ok(r) => {
                    let found = weft_policy::validate(&r);
                    if found.is_empty() {
                        resources.push(r);
                    } else {
                        for p in found {
                            problems.push(format!("{}: {}: {}: {}", doc.origin, r.id(), p.field, p.message));
                        }
                    }
                }
            }
        }
        if !problems.is_empty() {
            return Err(Status::invalid_argument(problems.join("\n")));
        }
        for r in &resources {
            auth::may_modify(&role, &r.id())?;
        }
        let mut ids: Vec<ResourceId> = resources.iter().map(|r| r.id()).collect();
        ids.sort();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(Status::invalid_argument("the same resource is given twice"));
        }
        let (revision, results) = self.store.apply(&resources).await.map_err(store_status)?;
        Ok(Response::new(apply_response(revision, results)))
    }

    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let role = auth::role(&request);
        let req = request.into_inner();
        let kind = normalize_kind(&req.kind).map_err(Status::invalid_argument)?;
        let id = if req.name.is_empty() {
            None
        } else {
            Some(ResourceId::parse(&req.kind, &req.name).map_err(Status::invalid_argument)?)
        };
        let (revision, items) = self.store.get(kind, id.as_ref()).await.map_err(store_status)?;
        let mut resources = Vec::new();
        for (key, value, rev) in items {
            let resource = match decode_resource(&value) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(key, error = %e, "undecodable resource in etcd");
                    continue;
                }
            };
            if !auth::may_read(&role, &resource.id()) {
                continue;
            }
            if !req.tenant.is_empty() {
                let tenant = match &resource {
                    Resource::Route(r) => r.tenant.clone(),
                    Resource::TenantPolicy(t) => Some(t.tenant.clone()),
                    Resource::Resilience(_) | Resource::AuthorizationPolicy(_) => None,
                };
                if tenant.as_deref() != Some(req.tenant.as_str()) {
                    continue;
                }
            }
            resources.push(pb::StoredResource {
                resource: resource.id().to_string(),
                json: doc::to_value(&resource).to_string(),
                revision: rev,
            });
        }
        if let Some(id) = id
            && resources.is_empty()
        {
            return Err(Status::not_found(format!("{id} not found")));
        }
        Ok(Response::new(pb::GetResponse { resources, revision }))
    }

    async fn delete(&self, request: Request<pb::DeleteRequest>) -> Result<Response<pb::DeleteResponse>, Status> {
        let role = auth::role(&request);
        let req = request.into_inner();
        let id = ResourceId::parse(&req.kind, &req.name).map_err(Status::invalid_argument)?;
        auth::may_modify(&role, &id)?;
        let (revision, deleted) = self.store.delete(&id).await.map_err(store_status)?;
        if !deleted {
            return Err(Status::not_found(format!("{id} not found")));
        }
        Ok(Response::new(pb::DeleteResponse { revision, deleted }))
    }

    async fn endpoints(
        &self,
        request: Request<pb::EndpointsRequest>,
    ) -> Result<Response<pb::EndpointsResponse>, Status> {
        // Where every instance lives is the mesh operator's view; sidecars
        // learn their callees' endpoints over their own streams.
        auth::require_admin(&auth::role(&request), "list endpoints")?;
        let service = request.into_inner().service;
        weft_policy::names::check_service("service", &service).map_err(Status::invalid_argument)?;
        let recs = self.store.endpoints(&service).await.map_err(store_status)?;
        Ok(Response::new(pb::EndpointsResponse {
            endpoints: recs.iter().map(crate::store::EndpointRecord::to_wire).collect(),
        }))
    }

    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::StatusResponse>, Status> {
        let role = auth::role(&request);
        let services = request.into_inner().services;
        for s in &services {
            if s != "*" {
                weft_policy::names::check_service("services", s).map_err(Status::invalid_argument)?;
            }
        }
        // A tenant sees the sidecars its changes reach, to wait for them
        // (`apply --wait`); only an admin sees the whole mesh.
        let tenant = match &role {
            auth::Role::Tenant(t) if !services.is_empty() => Some(t.as_str()),
            _ => {
                auth::require_admin(&role, "see the status of every sidecar")?;
                None
            }
        };
        let revision = self.store.ping().await.map_err(store_status)?;
        let recs = self.store.proxies().await.map_err(store_status)?;
        let in_scope = |subs: &[String]| services.is_empty() || services.iter().any(|s| s == "*" || subs.contains(s));
        let rejected = self
            .snapshots
            .borrow()
            .rejected
            .iter()
            .filter(|(resource, _)| tenant.is_none_or(|t| auth::owned_by(resource, t)))
            .map(|(resource, (revision, reason))| pb::RejectedResource {
                resource: resource.clone(),
                revision: *revision,
                reason: reason.clone(),
            })
            .collect();
        Ok(Response::new(pb::StatusResponse {
            revision,
            rejected,
            proxies: recs
                .into_iter()
                .filter(|r| in_scope(&r.subscriptions))
                .map(|r| pb::ProxyStatus {
                    last_nack: match tenant {
                        Some(t) => auth::redact_nack(&r.last_nack, t),
                        None => r.last_nack,
                    },
                    address: if tenant.is_some() { String::new() } else { r.address },
                    proxy_id: r.proxy_id,
                    service: r.service,
                    acked_version: r.acked_version,
                    nacked_version: r.nacked_version,
                    subscriptions: r.subscriptions,
                    control_replica: r.control_replica,
                    identity: r.identity,
                    cert_not_after_unix_ms: r.cert_not_after_unix_ms,
                })
                .collect(),
        }))
    }

    async fn traces(&self, request: Request<pb::TracesRequest>) -> Result<Response<pb::TracesResponse>, Status> {
        let role = auth::role(&request);
        let req = request.into_inner();
        let since_ms = if req.since_secs == 0 {
            0
        } else {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            now.saturating_sub(req.since_secs * 1000)
        };
        let limit = if req.limit == 0 { 100 } else { req.limit as usize };
        let mut calls = self.traces.query(&req.service, since_ms, limit);
        match &role {
            auth::Role::Admin => {}
            auth::Role::Tenant(t) => calls.retain(|c| &c.tenant == t),
            auth::Role::Proxy(_) => return Err(Status::permission_denied("403: a proxy token cannot read traces")),
        }
        Ok(Response::new(pb::TracesResponse { calls, replica: self.replica.clone() }))
    }

    async fn history(&self, request: Request<pb::HistoryRequest>) -> Result<Response<pb::HistoryResponse>, Status> {
        let role = auth::role(&request);
        let req = request.into_inner();
        let id = ResourceId::parse(&req.kind, &req.name).map_err(Status::invalid_argument)?;
        if !auth::may_read(&role, &id) {
            return Err(Status::permission_denied(format!("403: this token cannot read {id}")));
        }
        let limit = if req.limit == 0 { 20 } else { req.limit.min(1000) as usize };
        let (versions, truncated) = self.store.history(&id, limit).await.map_err(store_status)?;
        if versions.is_empty() {
            return Err(Status::not_found(format!("{id} not found")));
        }
        let entries = versions
            .into_iter()
            .map(|(revision, value)| pb::HistoryEntry {
                revision,
                applied_unix_ms: crate::store::applied_at(&value),
                json: decode_resource(&value).map(|r| doc::to_value(&r).to_string()).unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::HistoryResponse { resource: id.to_string(), entries, truncated }))
    }

    async fn rollback(&self, request: Request<pb::RollbackRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let role = auth::role(&request);
        let req = request.into_inner();
        let id = ResourceId::parse(&req.kind, &req.name).map_err(Status::invalid_argument)?;
        auth::may_modify(&role, &id)?;
        let (found_rev, value) = self
            .store
            .get_at(&id, req.to_revision)
            .await
            .map_err(|e| match e {
                StoreError::Etcd { ref source, .. } if source.to_string().contains("compacted") => {
                    Status::failed_precondition(format!("revision {} of {id} was compacted away", req.to_revision))
                }
                other => store_status(other),
            })?
            .ok_or_else(|| Status::not_found(format!("{id} did not exist at revision {}", req.to_revision)))?;
        let resource = decode_resource(&value)
            .map_err(|e| Status::failed_precondition(format!("{id} at revision {found_rev} cannot be read: {e}")))?;
        let problems = weft_policy::validate(&resource);
        if !problems.is_empty() {
            let text: Vec<String> = problems.iter().map(|p| format!("{id}: {}: {}", p.field, p.message)).collect();
            return Err(Status::invalid_argument(format!(
                "{id} at revision {found_rev} no longer passes validation:\n{}",
                text.join("\n")
            )));
        }
        let (revision, results) = self.store.apply(std::slice::from_ref(&resource)).await.map_err(store_status)?;
        Ok(Response::new(apply_response(revision, results)))
    }
}
