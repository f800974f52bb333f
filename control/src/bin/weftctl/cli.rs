//! The command line: global flags and one subcommand per operation.

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "weftctl", version, about = "Manage weft policy")]
pub(crate) struct Cli {
    /// Control plane gRPC URL.
    #[arg(long, global = true, env = "WEFT_CONTROL", default_value = "http://127.0.0.1:7070")]
    pub(crate) control: String,
    /// Bearer token for a control plane started with --tokens.
    #[arg(long, global = true, env = "WEFT_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// PEM roots to verify the control plane by (one, or two during a CA
    /// rotation); with it the control URL is https://.
    #[arg(long, global = true, env = "WEFT_CA_BUNDLE")]
    pub(crate) ca_bundle: Option<String>,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
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
    /// Who may call SERVICE: its AuthorizationPolicy as a table.
    Callers {
        service: String,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Show resources: KIND is route, resilience, tenantpolicy or
    /// authorizationpolicy.
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
    /// The certificate authority.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Adds weft to Kubernetes workloads (Deployment, StatefulSet,
    /// DaemonSet, Pod): the capture init step and the sidecar. Prints the
    /// result; other documents pass through. Running it again changes
    /// nothing.
    Inject {
        #[arg(short = 'f', long = "file")]
        file: String,
        /// The image with weft-proxy in it (deploy/Dockerfile builds it).
        #[arg(long, default_value = concat!("weft:", env!("CARGO_PKG_VERSION")))]
        image: String,
        /// The control plane, as sidecars in the cluster reach it.
        #[arg(long = "control-url", default_value = "https://weft-control.weft-system.svc:7070")]
        control_url: String,
        /// The user the sidecar runs as (its traffic is not captured).
        #[arg(long, default_value_t = 2102)]
        proxy_uid: i64,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum CaCommand {
    /// Writes a new self-signed root (ca.crt, ca.key) for a quick start;
    /// give both to every weft-control (--ca-cert, --ca-key), and ca.crt to
    /// sidecars and weftctl (--ca-bundle).
    Init {
        #[arg(long)]
        out: String,
        /// The root's common name.
        #[arg(long, default_value = "weft root CA")]
        name: String,
        /// How long the root is valid.
        #[arg(long, default_value = "3650d")]
        valid: String,
    },
    /// Signs a workload certificate with the CA's key, offline, for a peer
    /// that is not behind a weft sidecar (a gateway, a load generator):
    /// writes SERVICE.crt and SERVICE.key (readable by its owner only).
    Issue {
        #[arg(long)]
        ca_cert: String,
        #[arg(long)]
        ca_key: String,
        /// The identity: spiffe://<trust-domain>/svc/<service>.
        #[arg(long)]
        service: String,
        #[arg(long, default_value = "weft.local")]
        trust_domain: String,
        #[arg(long)]
        out: String,
        #[arg(long, default_value = "24h")]
        valid: String,
    },
}

#[derive(Copy, Clone, Debug, ValueEnum)]
pub(crate) enum Output {
    Table,
    Yaml,
    Json,
}
