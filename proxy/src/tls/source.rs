//! `--cert-dir`: the workload certificate from files, with Istio's
//! file-mounted names, reloaded when they change. This is how cert-manager
//! or an organisation's own PKI plugs in, and how a proxy configured from
//! files alone gets mTLS.
//!
//! The files are looked at every [`POLL`] (size and modification time,
//! following symlinks, so a Kubernetes Secret volume's atomic symlink swap
//! is seen). A set that does not load (a file missing, truncated mid-write,
//! a key that does not match, an expired certificate) is logged with the
//! file named and the identity in use stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Identity, Store, TlsError};

pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const KEY: &str = "key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";

/// How often the files are looked at.
pub const POLL: Duration = Duration::from_secs(1);

fn read(dir: &Path, name: &str) -> Result<Vec<u8>, String> {
    let p = dir.join(name);
    std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))
}

/// Loads the three files of `dir` into an identity.
pub fn load(dir: &Path) -> Result<Identity, String> {
    let chain = read(dir, CERT_CHAIN)?;
    let key = read(dir, KEY)?;
    let roots = read(dir, ROOT_CERT)?;
    let named = |file: &str, e: TlsError| format!("{}: {e}", dir.join(file).display());
    let chain =
        super::parse_certs("certificate chain", &chain).map_err(|e| named(CERT_CHAIN, e))?;
    let key = super::parse_key("private key", &key).map_err(|e| named(KEY, e))?;
    let roots = super::parse_certs("root certificates", &roots).map_err(|e| named(ROOT_CERT, e))?;
    Identity::new(chain, key, roots).map_err(|e| format!("{}: {e}", dir.display()))
}

type Stamp = Vec<Option<(u64, SystemTime)>>;

fn stamp(dir: &Path) -> Stamp {
    [CERT_CHAIN, KEY, ROOT_CERT]
        .iter()
        .map(|f| {
            let m = std::fs::metadata(dir.join(f)).ok()?;
            Some((m.len(), m.modified().ok()?))
        })
        .collect()
}

/// Loads `dir` once (an error if it does not load), then keeps `store` in
/// step with it in the background.
pub fn watch(dir: PathBuf, store: Arc<Store>) -> Result<(), String> {
    let mut seen = stamp(&dir);
    store.set(load(&dir)?);
    tokio::spawn(async move {
        let mut failed = false;
        loop {
            tokio::time::sleep(POLL).await;
            let now = stamp(&dir);
            if now == seen && !failed {
                continue;
            }
            seen = now;
            match load(&dir) {
                Ok(id) => {
                    failed = false;
                    store.set(id);
                }
                Err(e) => {
                    if !failed {
                        tracing::error!(
                            "certificate files refused, the identity in use stays: {e}"
                        );
                    }
                    failed = true;
                }
            }
        }
    });
    Ok(())
}

/// Roots from a PEM file (the control's CA, for `--ca-root-cert`).
pub fn roots_file(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    super::parse_certs("root certificates", &pem).map_err(|e| format!("{}: {e}", path.display()))
}
