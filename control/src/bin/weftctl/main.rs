//! `weftctl`: the operator's CLI. Exit codes: 0 ok, 1 rejected input,
//! 2 cannot reach the control plane.
//!
//! [`cli`] parses the command line, [`client`] talks to the control plane,
//! [`input`] reads policy files, [`output`] writes tables, JSON and YAML,
//! and each command lives in a module of [`cmd`].

mod cli;
mod client;
mod cmd;
mod input;
mod output;

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use weft_policy as policy;

use cli::{Cli, Command};
use client::{CA_BUNDLE, Fail, TOKEN};

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

/// A duration flag (`30s`, `5m`), or a failure naming the flag.
fn duration(flag: &str, value: &str) -> Result<Duration, Fail> {
    policy::duration::parse(value).map_err(|e| Fail(1, format!("{flag}: {e}")))
}

async fn run(cli: Cli) -> Result<(), Fail> {
    let _ = TOKEN.set(cli.token.clone());
    let _ = CA_BUNDLE.set(cli.ca_bundle.clone());
    let control = cli.control.as_str();
    let wait = |wait: bool, timeout: &str| -> Result<Option<Duration>, Fail> {
        let timeout = duration("--timeout", timeout)?;
        Ok(wait.then_some(timeout))
    };
    match cli.command {
        Command::Validate { file } => cmd::validate::run(&file),
        Command::Apply { file, wait: w, timeout } => cmd::apply::apply(control, &file, wait(w, &timeout)?).await,
        Command::Rollback { kind, name, to, wait: w, timeout } => {
            cmd::apply::rollback(control, kind, name, to, wait(w, &timeout)?).await
        }
        Command::Delete { kind, name } => cmd::apply::delete(control, kind, name).await,
        Command::Diff { file } => cmd::diff::run(control, &file).await,
        Command::History { kind, name, limit, output } => cmd::history::run(control, kind, name, limit, output).await,
        Command::Get { kind, name, tenant, output } => cmd::get::run(control, kind, name, tenant, output).await,
        Command::Endpoints { service, output } => cmd::endpoints::run(control, service, output).await,
        Command::Callers { service, output } => cmd::callers::run(control, service, output).await,
        Command::Traces { degraded: _, service, since, limit, output } => {
            let since = since.map(|s| duration("--since", &s)).transpose()?;
            cmd::traces::run(control, service, since, limit, output).await
        }
        Command::Status { output } => cmd::status::run(control, output).await,
        Command::Inject { file, image, control_url, proxy_uid } => {
            cmd::inject::run(&file, &cmd::inject::Sidecar { image, control_url, proxy_uid })
        }
        Command::Ca(cli::CaCommand::Init { out, name, valid }) => {
            let valid = humantime::parse_duration(&valid).map_err(|e| Fail(1, format!("--valid {valid}: {e}")))?;
            cmd::ca::init(&out, &name, valid)
        }
        Command::Ca(cli::CaCommand::Issue { ca_cert, ca_key, service, trust_domain, out, valid }) => {
            let valid = humantime::parse_duration(&valid).map_err(|e| Fail(1, format!("--valid {valid}: {e}")))?;
            cmd::ca::issue(&ca_cert, &ca_key, &trust_domain, &service, &out, valid)
        }
    }
}
