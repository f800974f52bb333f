//! `weftctl`: the operator's CLI. Exit codes: 0 ok, 1 rejected input,
//! 2 cannot reach the control plane.

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use tonic::Code;
use xds_proto::v1 as pb;
use xds_proto::v1::admin_client::AdminClient;

use weft_policy as policy;

#[derive(Parser, Debug)]
#[command(name = "weftctl", version, about = "Manage weft policy")]
struct Cli {
    /// Control plane gRPC URL.
    #[arg(long, global = true, env = "WEFT_CONTROL", default_value = "http://127.0.0.1:7070")]
    control: String,
    /// Bearer token for a control plane started with --tokens.
    #[arg(long, global = true, env = "WEFT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate and apply a multi-document YAML file, all or nothing.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: String,
        /// Block until every affected sidecar has ACKed.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
    /// What `apply -f FILE` would change, field by field.
    Diff {
        #[arg(short = 'f', long = "file")]
        file: String,
    },
    /// A resource's revisions (newest first), when each was applied, and
    /// what each changed.
    History {
        kind: String,
        name: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Apply a resource as it was at an earlier revision (a new revision).
    Rollback {
        kind: String,
        name: String,
        #[arg(long = "to")]
        to: u64,
        /// Block until every affected sidecar has ACKed.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
    /// Check a file offline, with the same checks as apply.
    Validate {
        #[arg(short = 'f', long = "file")]
        file: String,
    },
    /// Show resources: KIND is route, resilience or tenantpolicy.
    Get {
        kind: String,
        name: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Delete one resource.
    Delete { kind: String, name: String },
    /// The instances of a service: address, labels, readiness, owning proxy.
    Endpoints {
        service: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Recent degraded calls (retry, fallback, breaker, timeout, shed) that
    /// this control plane replica's sidecars reported.
    Traces {
        /// Only degraded calls (the only kind kept today).
        #[arg(long, default_value_t = true)]
        degraded: bool,
        #[arg(long)]
        service: Option<String>,
        /// Only calls newer than this (e.g. 30s, 5m).
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Connected sidecars: service, ACKed version, last NACK.
    Status {
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum Output {
    Table,
    Yaml,
    Json,
}

/// A failure with its exit code.
struct Fail(u8, String);

impl From<tonic::Status> for Fail {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown => {
                Fail(2, format!("control plane: {}", s.message()))
            }
            _ => Fail(1, s.message().to_string()),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, msg)) => {
            let _ = writeln!(std::io::stderr(), "{}", msg.trim_end());
            ExitCode::from(code)
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) ends quietly.
macro_rules! out {
    ($($arg:tt)*) => {{
        let mut o = std::io::stdout().lock();
        if writeln!(o, $($arg)*).is_err() {
            std::process::exit(0);
        }
    }};
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Client = AdminClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>>;

static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

async fn connect(url: &str) -> Result<Client, Fail> {
    let bearer = match TOKEN.get().cloned().flatten() {
        Some(t) => Some(
            format!("Bearer {t}")
                .parse()
                .map_err(|_| Fail(1, "--token holds characters a header cannot carry".into()))?,
        ),
        None => None,
    };
    let ep = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| Fail(1, format!("--control {url}: {e}")))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(15));
    let ch = ep
        .connect()
        .await
        .map_err(|e| Fail(2, format!("cannot reach the control plane at {url}: {e} (hint: is weft-control running? set --control or WEFT_CONTROL)")))?;
    Ok(AdminClient::with_interceptor(ch, Bearer(bearer)))
}

/// Reads a policy file (or stdin), at most one byte past
/// [`policy::documents::MAX_FILE_BYTES`]: the parser refuses it then, without this
/// reading gigabytes first.
fn read_input(file: &str) -> Result<(String, String), Fail> {
    let limit = policy::documents::MAX_FILE_BYTES as u64 + 1;
    let mut bytes = Vec::new();
    let name = if file == "-" {
        std::io::stdin().take(limit).read_to_end(&mut bytes).map_err(|e| Fail(1, format!("reading stdin: {e}")))?;
        "<stdin>".to_string()
    } else {
        let f = std::fs::File::open(file).map_err(|e| Fail(1, format!("{file}: {e}")))?;
        f.take(limit).read_to_end(&mut bytes).map_err(|e| Fail(1, format!("{file}: {e}")))?;
        file.to_string()
    };
    let text = if bytes.len() > policy::documents::MAX_FILE_BYTES {
        String::from_utf8_lossy(&bytes).into_owned()
    } else {
        String::from_utf8(bytes).map_err(|e| Fail(1, format!("{name}: not UTF-8 text ({e})")))?
    };
    Ok((name, text))
}

fn parse(file: &str) -> Result<Vec<policy::documents::Located>, Fail> {
    let (name, text) = read_input(file)?;
    match policy::documents::parse(&name, &text) {
        Ok(r) if r.is_empty() => Err(Fail(1, format!("{name}: no resources found"))),
        Ok(r) => Ok(r),
        Err(problems) => Err(Fail(1, problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))),
    }
}

async fn run(cli: Cli) -> Result<(), Fail> {
    let _ = TOKEN.set(cli.token.clone());
    match cli.command {
        Command::Validate { file } => {
            let r = parse(&file)?;
            for l in &r {
                out!("{} valid", l.resource.id());
            }
            Ok(())
        }
        Command::Apply { file, wait, timeout } => {
            let timeout = policy::duration::parse(&timeout).map_err(|e| Fail(1, format!("--timeout: {e}")))?;
            let resources = parse(&file)?;
            let mut client = connect(&cli.control).await?;
            let req = pb::ApplyRequest {
                resources: resources
                    .iter()
                    .map(|l| pb::ResourceDoc {
                        json: policy::doc::to_value(&l.resource).to_string(),
                        origin: l.origin.clone(),
                    })
                    .collect(),
                dry_run: false,
            };
            let resp = client.apply(req).await?.into_inner();
            for r in &resp.results {
                out!("{} {} (rev {})", r.resource, r.action, resp.revision);
            }
            if wait && !resp.services.is_empty() {
                wait_acked(&mut client, &resp.services, resp.revision, timeout).await?;
            }
            Ok(())
        }
        Command::Diff { file } => {
            let resources = parse(&file)?;
            let mut client = connect(&cli.control).await?;
            for l in &resources {
                let id = l.resource.id();
                let (kind, name) = id.kind_and_name();
                let new = policy::doc::to_value(&l.resource);
                match client.get(pb::GetRequest { kind, name, tenant: String::new() }).await {
                    Ok(resp) => {
                        let current = resp.into_inner().resources.into_iter().next();
                        let old: serde_json::Value =
                            current.as_ref().and_then(|c| serde_json::from_str(&c.json).ok()).unwrap_or_default();
                        let changes = policy::diff::diff_values(&old, &new);
                        if changes.is_empty() {
                            out!("{id} unchanged");
                        } else {
                            out!("{id} would be configured:");
                            for c in changes {
                                out!("  {c}");
                            }
                        }
                    }
                    Err(s) if s.code() == Code::NotFound => out!("{id} would be created"),
                    Err(s) => return Err(s.into()),
                }
            }
            Ok(())
        }
        Command::History { kind, name, limit, output } => {
            let mut client = connect(&cli.control).await?;
            let resp = client.history(pb::HistoryRequest { kind, name, limit }).await?.into_inner();
            let values: Vec<serde_json::Value> =
                resp.entries.iter().map(|e| serde_json::from_str(&e.json).unwrap_or_default()).collect();
            match output {
                Output::Table => {
                    out!("{:>9}  {:<20}  CHANGE", "REVISION", "APPLIED (UTC)");
                    for (i, e) in resp.entries.iter().enumerate() {
                        let change = match values.get(i + 1) {
                            Some(older) => {
                                let d = policy::diff::diff_values(older, &values[i]);
                                if d.is_empty() { "no change".to_string() } else { d.join("; ") }
                            }
                            None if resp.truncated => "(older revisions compacted)".to_string(),
                            None => "created".to_string(),
                        };
                        let change = if change.chars().count() > 120 {
                            format!("{}…", change.chars().take(119).collect::<String>())
                        } else {
                            change
                        };
                        out!("{:>9}  {:<20}  {}", e.revision, format_time(e.applied_unix_ms), change);
                    }
                }
                Output::Json | Output::Yaml => {
                    let rows: Vec<serde_json::Value> = resp
                        .entries
                        .iter()
                        .zip(&values)
                        .map(|(e, v)| serde_json::json!({"revision": e.revision, "applied_unix_ms": e.applied_unix_ms, "resource": v}))
                        .collect();
                    match output {
                        Output::Json => out!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default()),
                        _ => out!("{}", serde_saphyr::to_string(&rows).unwrap_or_default().trim_end()),
                    }
                }
            }
            Ok(())
        }
        Command::Rollback { kind, name, to, wait, timeout } => {
            let timeout = policy::duration::parse(&timeout).map_err(|e| Fail(1, format!("--timeout: {e}")))?;
            let mut client = connect(&cli.control).await?;
            let resp = client.rollback(pb::RollbackRequest { kind, name, to_revision: to }).await?.into_inner();
            for r in &resp.results {
                let action = if r.action == "unchanged" { "unchanged" } else { "rolled back" };
                out!("{} {action} to rev {to} (rev {})", r.resource, resp.revision);
            }
            if wait && !resp.services.is_empty() {
                wait_acked(&mut client, &resp.services, resp.revision, timeout).await?;
            }
            Ok(())
        }
        Command::Get { kind, name, tenant, output } => {
            policy::normalize_kind(&kind).map_err(|e| Fail(1, e))?;
            let mut client = connect(&cli.control).await?;
            let resp = client
                .get(pb::GetRequest { kind, name: name.unwrap_or_default(), tenant: tenant.unwrap_or_default() })
                .await?
                .into_inner();
            let values: Vec<serde_json::Value> = resp
                .resources
                .iter()
                .map(|r| serde_json::from_str(&r.json).unwrap_or(serde_json::Value::Null))
                .collect();
            match output {
                Output::Table => {
                    out!("{:<40} {:>10}", "RESOURCE", "REVISION");
                    for r in &resp.resources {
                        out!("{:<40} {:>10}", r.resource, r.revision);
                    }
                }
                Output::Json => out!("{}", serde_json::to_string_pretty(&values).unwrap_or_default()),
                Output::Yaml => {
                    let docs: Vec<String> =
                        values.iter().map(|v| serde_saphyr::to_string(v).unwrap_or_default()).collect();
                    out!("{}", docs.join("---\n").trim_end());
                }
            }
            Ok(())
        }
        Command::Delete { kind, name } => {
            let id = policy::ResourceId::parse(&kind, &name).map_err(|e| Fail(1, e))?;
            let mut client = connect(&cli.control).await?;
            let resp = client.delete(pb::DeleteRequest { kind, name }).await?.into_inner();
            out!("{id} deleted (rev {})", resp.revision);
            Ok(())
        }
        Command::Endpoints { service, output } => {
            let mut client = connect(&cli.control).await?;
            let resp = client.endpoints(pb::EndpointsRequest { service }).await?.into_inner();
            let rows: Vec<serde_json::Value> = resp
                .endpoints
                .iter()
                .map(|e| {
                    let labels: std::collections::BTreeMap<_, _> = e.labels.iter().collect();
                    serde_json::json!({"address": e.address, "labels": labels, "ready": e.ready, "proxy": e.proxy_id})
                })
                .collect();
            match output {
                Output::Table => {
                    out!("{:<22} {:<6} {:<30} LABELS", "ADDRESS", "READY", "PROXY");
                    for e in &resp.endpoints {
                        let mut labels: Vec<String> = e.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                        labels.sort();
                        out!("{:<22} {:<6} {:<30} {}", e.address, e.ready, e.proxy_id, labels.join(","));
                    }
                }
                Output::Json => out!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default()),
                Output::Yaml => out!("{}", serde_saphyr::to_string(&rows).unwrap_or_default().trim_end()),
            }
            Ok(())
        }
        Command::Traces { degraded: _, service, since, limit, output } => {
            let since_secs = match since {
                Some(s) => policy::duration::parse(&s).map_err(|e| Fail(1, format!("--since: {e}")))?.as_secs().max(1),
                None => 0,
            };
            let mut client = connect(&cli.control).await?;
            let resp = client
                .traces(pb::TracesRequest { service: service.unwrap_or_default(), since_secs, limit })
                .await?
                .into_inner();
            let rows: Vec<serde_json::Value> = resp
                .calls
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "trace_id": c.trace_id, "service": c.service, "tenant": c.tenant,
                        "status": c.status, "reasons": c.reasons, "unix_ms": c.unix_ms,
                    })
                })
                .collect();
            match output {
                Output::Table => {
                    out!("{:<34} {:<16} {:<10} {:>6} {:>8} REASONS", "TRACE", "SERVICE", "TENANT", "STATUS", "AGE");
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    for c in &resp.calls {
                        let age = format!("{:.1}s", now.saturating_sub(c.unix_ms) as f64 / 1000.0);
                        out!(
                            "{:<34} {:<16} {:<10} {:>6} {:>8} {}",
                            c.trace_id,
                            c.service,
                            c.tenant,
                            c.status,
                            age,
                            c.reasons
                        );
                    }
                }
                Output::Json => out!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default()),
                Output::Yaml => out!("{}", serde_saphyr::to_string(&rows).unwrap_or_default().trim_end()),
            }
            Ok(())
        }
        Command::Status { output } => {
            let mut client = connect(&cli.control).await?;
            let resp = client.status(pb::StatusRequest { services: Vec::new() }).await?.into_inner();
            let rows: Vec<serde_json::Value> = resp
                .proxies
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "proxy": p.proxy_id, "service": p.service, "address": p.address,
                        "acked_version": p.acked_version, "nacked_version": p.nacked_version,
                        "last_nack": p.last_nack, "subscriptions": p.subscriptions, "control": p.control_replica,
                    })
                })
                .collect();
            match output {
                Output::Table => {
                    out!("{:<30} {:<16} {:>8} {:<22} LAST NACK", "PROXY", "SERVICE", "ACKED", "CONTROL");
                    for p in &resp.proxies {
                        let nack = if p.last_nack.is_empty() {
                            "-".to_string()
                        } else {
                            format!("v{}: {}", p.nacked_version, p.last_nack)
                        };
                        out!(
                            "{:<30} {:<16} {:>8} {:<22} {}",
                            p.proxy_id,
                            p.service,
                            p.acked_version,
                            p.control_replica,
                            nack
                        );
                    }
                    for r in &resp.rejected {
                        out!("REJECTED {} (rev {}): {}", r.resource, r.revision, r.reason);
                    }
                }
                Output::Json => out!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default()),
                Output::Yaml => out!("{}", serde_saphyr::to_string(&rows).unwrap_or_default().trim_end()),
            }
            Ok(())
        }
    }
}

/// `2026-11-25 21:14:05` from Unix milliseconds (UTC).
fn format_time(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".into();
    }
    let secs = unix_ms / 1000;
    let (days, rem) = ((secs / 86400) as i64, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Polls status until every sidecar subscribed to one of `services` has
/// ACKed `revision` or later; reports the ones that did not, and NACKs.
async fn wait_acked(client: &mut Client, services: &[String], revision: u64, timeout: Duration) -> Result<(), Fail> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = client.status(pb::StatusRequest { services: services.to_vec() }).await?.into_inner();
        let affected: Vec<&pb::ProxyStatus> = status
            .proxies
            .iter()
            .filter(|p| services.iter().any(|s| s == "*" || p.subscriptions.contains(s)))
            .collect();
        let nacked: Vec<&&pb::ProxyStatus> =
            affected.iter().filter(|p| p.nacked_version >= revision && p.acked_version < revision).collect();
        let pending: Vec<&&pb::ProxyStatus> =
            affected.iter().filter(|p| p.acked_version < revision && p.nacked_version < revision).collect();
        if pending.is_empty() && nacked.is_empty() {
            out!("{} sidecar(s) ACKed rev {revision}", affected.len());
            return Ok(());
        }
        if pending.is_empty() || Instant::now() >= deadline {
            let mut msg = Vec::new();
            for p in nacked {
                msg.push(format!("{} ({}) NACKed rev {}: {}", p.proxy_id, p.service, p.nacked_version, p.last_nack));
            }
            for p in pending {
                msg.push(format!(
                    "{} ({}) has not ACKed rev {revision} (at {})",
                    p.proxy_id, p.service, p.acked_version
                ));
            }
            return Err(Fail(1, msg.join("\n")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
