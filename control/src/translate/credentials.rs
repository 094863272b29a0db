//! TLS credentials named by `credentialName`: a Secret from the same source
//! as the rest of the config (a file of the watched directory, an etcd
//! key, the Kubernetes API), in any of the layouts Istio reads:
//! `kubernetes.io/tls` (`tls.crt`, `tls.key`, optional `ca.crt`), a generic
//! Secret (`cert`, `key`, `cacert`), and the CA in `<name>-cacert`.
//!
//! A credential is checked here, so a bad one refuses the config (with the
//! Secret named) and the proxies keep the last good one: the certificate
//! and key must parse and match, and the certificate must not have expired.

use std::sync::Arc;

use crate::model::{Config, Secret, Sourced};

pub struct Credential {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
}

/// Why a credential could not be used: the Secret at fault (if it exists)
/// and the message.
pub struct CredError<'a> {
    pub secret: Option<&'a Sourced<Secret>>,
    pub message: String,
}

fn find<'a>(cfg: &'a Config, ns: &str, name: &str) -> Option<&'a Sourced<Secret>> {
    cfg.secrets
        .iter()
        .rev()
        .find(|s| s.value.namespace() == ns && s.value.metadata.name == name)
}

fn first(s: &Secret, keys: &[&str]) -> Result<Option<Vec<u8>>, String> {
    for k in keys {
        if let Some(v) = s.value(k)? {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// The credential `name` in `ns`. `need_key`: a certificate and key are
/// required (a server, or a client with MUTUAL); else only a CA may be.
pub fn credential<'a>(
    cfg: &'a Config,
    ns: &str,
    name: &str,
    need_key: bool,
) -> Result<Credential, CredError<'a>> {
    let secret = find(cfg, ns, name);
    let err = |secret, message: String| CredError { secret, message };
    let Some(sec) = secret else {
        return Err(err(
            None,
            format!(
                "no Secret {ns}/{name} (credentialName is looked up in the namespace of the resource naming it)"
            ),
        ));
    };
    let s = &sec.value;
    let cert = first(s, &["tls.crt", "cert"]).map_err(|m| err(secret, m))?;
    let key = first(s, &["tls.key", "key"]).map_err(|m| err(secret, m))?;
    let mut ca = first(s, &["ca.crt", "cacert"]).map_err(|m| err(secret, m))?;
    if ca.is_none()
        && let Some(c) = find(cfg, ns, &format!("{name}-cacert"))
    {
        ca = first(&c.value, &["ca.crt", "cacert"]).map_err(|m| err(Some(c), m))?;
    }
    let (cert, key) = match (cert, key) {
        (Some(c), Some(k)) => (c, k),
        (None, None) if !need_key => (Vec::new(), Vec::new()),
        _ => {
            return Err(err(
                secret,
                "needs tls.crt and tls.key (or cert and key)".into(),
            ));
        }
    };
    if !cert.is_empty() {
        check_pair(&cert, &key).map_err(|m| err(secret, m))?;
    }
    let ca = ca.unwrap_or_default();
    if !ca.is_empty() {
        certs(&ca).map_err(|m| err(secret, format!("ca.crt: {m}")))?;
    }
    Ok(Credential { cert, key, ca })
}

fn certs(pem: &[u8]) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let v = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if v.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(v)
}

/// The certificate parses, has not expired, and the key matches it.
pub fn check_pair(cert: &[u8], key: &[u8]) -> Result<(), String> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let chain = certs(cert).map_err(|m| format!("tls.crt: {m}"))?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| format!("tls.key: {e}"))?;
    let leaf = &chain[0];
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("tls.crt: bad certificate: {e}"))?;
    let now = x509_parser::time::ASN1Time::now();
    if parsed.validity().not_after < now {
        return Err(format!(
            "tls.crt: expired on {}",
            parsed.validity().not_after
        ));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::sign::CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| format!("tls.key does not match tls.crt ({e})"))?;
    Ok(())
}
