//! `weftctl ca init --out DIR`: a self-signed root for a quick start;
//! `weftctl ca issue`: a workload certificate signed offline with the CA's
//! key, for a peer that is not behind a weft sidecar.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use crate::client::Fail;
use crate::out;

pub(crate) fn init(dir: &str, name: &str, valid: Duration) -> Result<(), Fail> {
    let dir = Path::new(dir);
    std::fs::create_dir_all(dir).map_err(|e| Fail(1, format!("--out {}: {e}", dir.display())))?;
    let (cert, key) = weft_identity::Ca::generate_root(name, valid).map_err(|e| Fail(1, e.to_string()))?;
    let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(Fail(1, format!("{} exists; not overwriting a CA", p.display())));
        }
    }
    write(&key_path, &key, 0o600)?;
    write(&cert_path, &cert, 0o644)?;
    out!("wrote {} and {} (key readable by its owner only)", cert_path.display(), key_path.display());
    out!("  weft-control --ca-cert {} --ca-key {}", cert_path.display(), key_path.display());
    out!("  weft-proxy / weftctl --ca-bundle {}", cert_path.display());
    Ok(())
}

/// Writes `DIR/<service>.crt` (the certificate, then the CA's chain) and
/// `DIR/<service>.key` (0600) for `spiffe://<trust-domain>/svc/<service>`.
pub(crate) fn issue(
    ca_cert: &str,
    ca_key: &str,
    trust_domain: &str,
    service: &str,
    dir: &str,
    valid: Duration,
) -> Result<(), Fail> {
    let fail = |e: weft_identity::Error| Fail(1, e.to_string());
    weft_policy::names::check_service("--service", service).map_err(|e| Fail(1, e))?;
    let read = |p: &str, flag: &str| std::fs::read_to_string(p).map_err(|e| Fail(1, format!("{flag} {p}: {e}")));
    let ca = weft_identity::Ca::load(&read(ca_cert, "--ca-cert")?, &read(ca_key, "--ca-key")?, trust_domain)
        .map_err(fail)?;
    let key = weft_identity::workload::Key::generate().map_err(fail)?;
    let csr = key.signing_request(&weft_identity::SpiffeId::new(trust_domain, service)).map_err(fail)?;
    let issued = ca.issue_workload(&csr, service, valid).map_err(fail)?;
    let dir = Path::new(dir);
    std::fs::create_dir_all(dir).map_err(|e| Fail(1, format!("--out {}: {e}", dir.display())))?;
    let (cert_path, key_path) = (dir.join(format!("{service}.crt")), dir.join(format!("{service}.key")));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(Fail(1, format!("{} exists; not overwriting it", p.display())));
        }
    }
    write(&key_path, &key.private_key_pem(), 0o600)?;
    write(&cert_path, &issued.chain_pem, 0o644)?;
    out!(
        "wrote {} ({}, until {}) and {}",
        cert_path.display(),
        weft_identity::SpiffeId::new(trust_domain, service),
        crate::output::format_time(issued.not_after_unix_ms),
        key_path.display()
    );
    Ok(())
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), Fail> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Fail(1, format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes()).map_err(|e| Fail(1, format!("{}: {e}", path.display())))
}
