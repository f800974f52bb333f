//! `weftctl ca init --out DIR`: a self-signed root for a quick start.

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

fn write(path: &Path, text: &str, mode: u32) -> Result<(), Fail> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Fail(1, format!("{}: {e}", path.display())))?;
    f.write_all(text.as_bytes()).map_err(|e| Fail(1, format!("{}: {e}", path.display())))
}
