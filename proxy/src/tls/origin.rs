//! TLS to upstreams: Istio mutual TLS to mesh peers (auto mTLS, or a
//! DestinationRule's `ISTIO_MUTUAL`), and a DestinationRule's `SIMPLE` and
//! `MUTUAL` origination to TLS servers outside the mesh.
//!
//! An [`Origin`] is part of the pool key ([`crate::connect::Transport`]):
//! its [`OriginKey`] holds everything that decides what a connection is
//! (mode, SNI, the names the server must carry, the roots, the client
//! certificate), so a pooled connection is never reused for another server
//! identity or with another client identity.

use std::sync::{Arc, OnceLock};

use bosun_xds_proto::config as pb;
use rustls::RootCertStore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, Error, SignatureScheme};

use super::{Alpn, Store, cert_hash, mesh_client_config, provider};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OriginKey {
    pub mode: i32,
    pub sni: String,
    pub sans: Vec<String>,
    /// SHA-256 of the CA bundle and client certificate given, if any.
    pub material: String,
    pub skip_verify: bool,
}

pub struct Origin {
    pub key: OriginKey,
    pub server_name: ServerName<'static>,
    /// By [`Alpn`]: HTTP/1.1, HTTP/2, TCP.
    configs: [Arc<rustls::ClientConfig>; 3],
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Origin({:?})", self.key)
    }
}

impl PartialEq for Origin {
    fn eq(&self, o: &Self) -> bool {
        self.key == o.key
    }
}
impl Eq for Origin {}
impl std::hash::Hash for Origin {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.key.hash(h)
    }
}

impl Origin {
    pub fn config(&self, alpn: Alpn) -> Arc<rustls::ClientConfig> {
        self.configs[match alpn {
            Alpn::Http1 => 0,
            Alpn::H2 => 1,
            Alpn::Tcp => 2,
        }]
        .clone()
    }

    pub fn is_mesh(&self) -> bool {
        self.key.mode == pb::UpstreamTlsMode::IstioMutual as i32
    }
}

/// The system's roots, loaded once.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut store = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            Arc::new(store)
        })
        .clone()
}

/// Istio's SNI for mesh traffic: `outbound_.<port>_.<subset>_.<host>`.
pub fn istio_sni(cluster: &str) -> String {
    let mut parts = cluster.split('|');
    let (_, port, subset, host) = (parts.next(), parts.next(), parts.next(), parts.next());
    format!(
        "outbound_.{}_.{}_.{}",
        port.unwrap_or(""),
        subset.unwrap_or(""),
        host.unwrap_or("")
    )
}

/// Istio mutual TLS to a mesh peer of `cluster`, expecting one of `sans`.
pub fn mesh(
    store: &Arc<Store>,
    cluster: &str,
    sni: &str,
    sans: &[String],
) -> Result<Origin, String> {
    let sni = if sni.is_empty() {
        istio_sni(cluster)
    } else {
        sni.to_string()
    };
    let server_name = ServerName::try_from(sni.clone()).map_err(|e| format!("SNI {sni:?}: {e}"))?;
    let shared: Arc<[String]> = sans.to_vec().into();
    Ok(Origin {
        key: OriginKey {
            mode: pb::UpstreamTlsMode::IstioMutual as i32,
            sni,
            sans: sans.to_vec(),
            material: String::new(),
            skip_verify: false,
        },
        server_name,
        configs: [Alpn::Http1, Alpn::H2, Alpn::Tcp]
            .map(|a| mesh_client_config(store, shared.clone(), a)),
    })
}

/// A DestinationRule's `tls` for `cluster` (host `host`, the service's
/// `identities` for ISTIO_MUTUAL). `None`: plaintext (DISABLE).
pub fn from_config(
    tls: &pb::UpstreamTls,
    store: &Arc<Store>,
    cluster: &str,
    host: &str,
    identities: &[String],
) -> Result<Option<Origin>, String> {
    let mode =
        pb::UpstreamTlsMode::try_from(tls.mode).map_err(|_| "unknown tls mode".to_string())?;
    match mode {
        pb::UpstreamTlsMode::Disable => Ok(None),
        pb::UpstreamTlsMode::IstioMutual => {
            let sans = if tls.subject_alt_names.is_empty() {
                identities
            } else {
                &tls.subject_alt_names
            };
            mesh(store, cluster, &tls.sni, sans).map(Some)
        }
        pb::UpstreamTlsMode::Simple | pb::UpstreamTlsMode::Mutual => {
            // Files named by the DestinationRule are read now: a file that
            // cannot be read refuses the config.
            let mut tls = tls.clone();
            let read = |path: &str, field: &str| {
                std::fs::read(path).map_err(|e| format!("tls.{field} {path}: {e}"))
            };
            if !tls.ca_certificates_file.is_empty() {
                tls.ca_certificates = read(&tls.ca_certificates_file, "caCertificates")?;
            }
            if !tls.client_certificate_file.is_empty() {
                tls.client_certificate = read(&tls.client_certificate_file, "clientCertificate")?;
            }
            if !tls.private_key_file.is_empty() {
                tls.private_key = read(&tls.private_key_file, "privateKey")?;
            }
            let tls = &tls;
            let roots = if tls.ca_certificates.is_empty() {
                system_roots()
            } else {
                let certs = super::parse_certs("tls.caCertificates", &tls.ca_certificates)
                    .map_err(|e| e.to_string())?;
                let mut s = RootCertStore::empty();
                s.add_parsable_certificates(certs);
                Arc::new(s)
            };
            let sni = if tls.sni.is_empty() {
                host.to_string()
            } else {
                tls.sni.clone()
            };
            let server_name =
                ServerName::try_from(sni.clone()).map_err(|e| format!("sni {sni:?}: {e}"))?;
            let verifier: Arc<dyn ServerCertVerifier> = if tls.insecure_skip_verify {
                Arc::new(NoVerify(provider()))
            } else if tls.subject_alt_names.is_empty() {
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots.clone(),
                    provider(),
                )
                .build()
                .map_err(|e| format!("tls.caCertificates: {e}"))?
            } else {
                Arc::new(super::verify::SpiffeServerVerifier::fixed(
                    roots.clone(),
                    tls.subject_alt_names.clone().into(),
                ))
            };
            let b = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(verifier);
            let mut material = String::new();
            if !tls.ca_certificates.is_empty() {
                material.push_str(&cert_hash(&tls.ca_certificates));
            }
            let config = if mode == pb::UpstreamTlsMode::Mutual {
                let chain = super::parse_certs("tls.clientCertificate", &tls.client_certificate)
                    .map_err(|e| e.to_string())?;
                let key = super::parse_key("tls.privateKey", &tls.private_key)
                    .map_err(|e| e.to_string())?;
                material.push('/');
                material.push_str(&cert_hash(&tls.client_certificate));
                b.with_client_auth_cert(chain, key)
                    .map_err(|e| format!("tls.privateKey: {e} (does it match the certificate?)"))?
            } else {
                b.with_no_client_auth()
            };
            let with_alpn = |alpn: &[&[u8]]| {
                let mut c = config.clone();
                c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
                Arc::new(c)
            };
            Ok(Some(Origin {
                key: OriginKey {
                    mode: tls.mode,
                    sni,
                    sans: tls.subject_alt_names.clone(),
                    material,
                    skip_verify: tls.insecure_skip_verify,
                },
                server_name,
                configs: [
                    with_alpn(&[b"http/1.1"]),
                    with_alpn(&[b"h2"]),
                    with_alpn(&[]),
                ],
            }))
        }
    }
}

/// `insecureSkipVerify`: any certificate (the handshake's signatures are
/// still checked).
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
