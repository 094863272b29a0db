//! Workload identity and TLS: the proxy's certificate and trust bundle (one
//! [`Store`], swapped whole on rotation), the rustls configs built once on
//! top of it (resolvers and verifiers read the store at each handshake, so
//! a rotated certificate or root is used by the next handshake with no
//! config rebuilt), the SPIFFE checks, and the peer identity a handshake
//! proves.
//!
//! Where certificates come from: [`source`] (files in `--cert-dir`,
//! reloaded when they change) or [`ca`] (a CSR to Bosun's CA, renewed at
//! about half the lifetime).

pub mod ca;
pub mod origin;
pub mod server;
pub mod source;
mod verify;

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;

pub use verify::{MeshClientVerifier, SpiffeServerVerifier};

/// ALPN a Bosun sidecar offers to a mesh peer, by what it will speak: as
/// Istio's sidecars do (its `istio.alpn` filter's overrides), so an Istio
/// sidecar's inbound filter chains take them.
pub const ALPN_MESH_HTTP1: &[&[u8]] = &[b"istio-http/1.1", b"istio", b"http/1.1"];
pub const ALPN_MESH_H2: &[&[u8]] = &[b"istio-h2", b"istio", b"h2"];
pub const ALPN_MESH_TCP: &[&[u8]] = &[b"istio"];
/// What an inbound mesh listener accepts, in preference order. Istio's
/// `istio-peer-exchange` is left out on purpose: choosing it would make an
/// Istio client start its metadata exchange, which Bosun does not speak.
/// The protocol inside is detected from the first bytes (h2 preface or
/// not) whatever was chosen, as Envoy does when nothing matches.
pub const ALPN_MESH_SERVER: &[&[u8]] = &[
    b"istio-h2",
    b"istio-http/1.1",
    b"istio-http/1.0",
    b"istio",
    b"h2",
    b"http/1.1",
];

/// The one crypto provider (aws-lc-rs), as every TLS config here uses it.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{0}: no certificate in it")]
    NoCertificate(String),
    #[error("{0}: no private key in it")]
    NoKey(String),
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
}

fn invalid(what: &str, message: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        what: what.into(),
        message: message.to_string(),
    }
}

/// PEM certificates (a chain or a bundle of roots).
pub fn parse_certs(what: &str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(what, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what.into()));
    }
    Ok(certs)
}

/// A PEM private key (PKCS#8, SEC1 or PKCS#1).
pub fn parse_key(what: &str, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey(what.into()),
        e => invalid(what, e),
    })
}

/// What a leaf certificate says: its SPIFFE ID (the first `spiffe://` URI
/// SAN), serial and expiry.
#[derive(Debug, Clone)]
pub struct LeafInfo {
    pub spiffe: Option<String>,
    pub uris: Vec<String>,
    pub dns: Vec<String>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

pub fn leaf_info(der: &[u8]) -> Result<LeafInfo, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("bad certificate: {e}"))?;
    let mut uris = Vec::new();
    let mut dns = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) => uris.push((*u).to_string()),
                GeneralName::DNSName(d) => dns.push((*d).to_string()),
                _ => {}
            }
        }
    }
    let ts = |t: i64| {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(t).unwrap_or(0))
    };
    Ok(LeafInfo {
        spiffe: uris.iter().find(|u| u.starts_with("spiffe://")).cloned(),
        uris,
        dns,
        serial: cert.raw_serial_as_string().replace(':', ""),
        not_before: ts(cert.validity().not_before.timestamp()),
        not_after: ts(cert.validity().not_after.timestamp()),
    })
}

/// SHA-256 of a certificate, lowercase hex (Envoy's XFCC `Hash`).
pub fn cert_hash(der: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    let mut s = String::with_capacity(64);
    for b in d.as_ref() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The proxy's workload certificate, its key and the roots it trusts.
pub struct Identity {
    /// Own SPIFFE ID (`spiffe://<trust domain>/ns/<ns>/sa/<sa>`); empty if
    /// the certificate has none.
    pub spiffe: String,
    pub certified: Arc<CertifiedKey>,
    pub roots: Arc<RootCertStore>,
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("spiffe", &self.spiffe)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Checks and assembles an identity: the key must match the leaf, and
    /// the leaf must not have expired.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Identity, TlsError> {
        let provider = provider();
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::NoCertificate("certificate chain".into()))?;
        let info = leaf_info(leaf).map_err(|e| invalid("certificate", e))?;
        if info.not_after <= SystemTime::now() {
            return Err(invalid(
                "certificate",
                format!("expired (serial {})", info.serial),
            ));
        }
        let certified = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
            invalid(
                "private key",
                format!("{e} (does it match the certificate?)"),
            )
        })?;
        let mut store = RootCertStore::empty();
        let (added, _) = store.add_parsable_certificates(roots);
        if added == 0 {
            return Err(TlsError::NoCertificate("root certificates".into()));
        }
        let roots = Arc::new(store);
        let client_verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
                .build()
                .map_err(|e| invalid("root certificates", e))?;
        Ok(Identity {
            spiffe: info.spiffe.unwrap_or_default(),
            certified: Arc::new(certified),
            roots,
            serial: info.serial,
            not_before: info.not_before,
            not_after: info.not_after,
            client_verifier,
        })
    }

    /// From PEM: chain, key, roots.
    pub fn from_pem(chain: &[u8], key: &[u8], roots: &[u8]) -> Result<Identity, TlsError> {
        Identity::new(
            parse_certs("certificate chain", chain)?,
            parse_key("private key", key)?,
            parse_certs("root certificates", roots)?,
        )
    }
}

/// The current identity, shared by every listener and connector; swapped
/// whole. Empty until the first certificate arrives.
#[derive(Default, Debug)]
pub struct Store {
    current: ArcSwapOption<Identity>,
}

impl Store {
    pub fn new() -> Arc<Store> {
        Arc::new(Store::default())
    }

    pub fn get(&self) -> Option<Arc<Identity>> {
        self.current.load_full()
    }

    pub fn set(&self, id: Identity) {
        tracing::info!(
            spiffe = %id.spiffe,
            serial = %id.serial,
            "workload certificate in use"
        );
        self.current.store(Some(Arc::new(id)));
    }

    /// Own SPIFFE ID, if any.
    pub fn spiffe(&self) -> Option<String> {
        self.current
            .load()
            .as_ref()
            .map(|i| i.spiffe.clone())
            .filter(|s| !s.is_empty())
    }
}

/// The server certificate at each handshake: the store's current one.
#[derive(Debug)]
struct StoreCert(Arc<Store>);

impl rustls::server::ResolvesServerCert for StoreCert {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.get().map(|i| i.certified.clone())
    }
}

impl rustls::client::ResolvesClientCert for StoreCert {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.get().map(|i| i.certified.clone())
    }
    fn has_certs(&self) -> bool {
        self.0.get().is_some()
    }
}

/// The inbound mesh listener's config: Istio mutual TLS (a client
/// certificate from the trusted roots is required).
pub fn mesh_server_config(store: &Arc<Store>) -> Arc<rustls::ServerConfig> {
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default protocol versions")
        .with_client_cert_verifier(Arc::new(MeshClientVerifier::new(store.clone())))
        .with_cert_resolver(Arc::new(StoreCert(store.clone())));
    c.alpn_protocols = ALPN_MESH_SERVER.iter().map(|p| p.to_vec()).collect();
    enable_tickets(&mut c);
    Arc::new(c)
}

/// Session resumption by stateless tickets (a client may resume more than
/// once, and no cache is shared between connections), besides rustls'
/// stateful cache. Ticket keys rotate every 6 hours.
pub fn enable_tickets(c: &mut rustls::ServerConfig) {
    match rustls::crypto::aws_lc_rs::Ticketer::new() {
        Ok(t) => c.ticketer = t,
        Err(e) => tracing::warn!(error = %e, "no session tickets"),
    }
}

/// What an upstream connection speaks inside the tunnel: picks the ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alpn {
    Http1,
    H2,
    Tcp,
}

/// A client config for Istio mutual TLS to a mesh peer whose certificate
/// must carry one of `sans` (any, from the trusted roots, if empty).
pub fn mesh_client_config(
    store: &Arc<Store>,
    sans: Arc<[String]>,
    alpn: Alpn,
) -> Arc<rustls::ClientConfig> {
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::mesh(store.clone(), sans)))
        .with_client_cert_resolver(Arc::new(StoreCert(store.clone())));
    c.alpn_protocols = match alpn {
        Alpn::Http1 => ALPN_MESH_HTTP1,
        Alpn::H2 => ALPN_MESH_H2,
        Alpn::Tcp => ALPN_MESH_TCP,
    }
    .iter()
    .map(|p| p.to_vec())
    .collect();
    Arc::new(c)
}

/// A client config for the control service (xDS, CA): its certificate is
/// checked against `roots` for `server_name` as any TLS server's would be,
/// and the workload certificate is presented when there is one.
pub fn control_client_config(
    roots: Vec<CertificateDer<'static>>,
    store: Option<&Arc<Store>>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut rs = RootCertStore::empty();
    let (added, _) = rs.add_parsable_certificates(roots);
    if added == 0 {
        return Err(TlsError::NoCertificate("control root certificates".into()));
    }
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default protocol versions")
        .with_root_certificates(rs);
    let mut c = match store {
        Some(s) => b.with_client_cert_resolver(Arc::new(StoreCert(s.clone()))),
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(c))
}

/// Who the peer of an mTLS connection proved to be.
#[derive(Debug, Clone)]
pub struct PeerIdentity {
    /// The SPIFFE ID in its certificate, if any.
    pub spiffe: Option<String>,
    /// SHA-256 of its leaf certificate (hex).
    pub hash: String,
}

impl PeerIdentity {
    pub fn from_certs(certs: Option<&[CertificateDer<'_>]>) -> Option<PeerIdentity> {
        let leaf = certs?.first()?;
        let spiffe = leaf_info(leaf).ok().and_then(|i| i.spiffe);
        Some(PeerIdentity {
            spiffe,
            hash: cert_hash(leaf),
        })
    }
}
