//! TLS at the gateway: a listener's Gateway servers with TLS, chosen by
//! the SNI of the ClientHello (read by peeking, so a PASSTHROUGH server
//! forwards the untouched bytes), then terminated with that server's
//! certificate and client-certificate policy, or passed through to the
//! clusters of a VirtualService `tls` route.
//!
//! Certificates come with the config (a Secret named by `credentialName`,
//! or files read when the config is applied): a new config means new
//! handshakes use the new certificate, and open connections keep theirs.

use std::sync::Arc;
use std::time::Duration;

use bosun_xds_proto::config as pb;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};
use tokio::net::TcpStream;

use super::{Store, cert_hash, parse_certs, parse_key, provider};
use crate::route::WeightedClusters;

/// What a server does with a connection it takes.
pub enum ServerKind {
    Terminate(Arc<rustls::ServerConfig>),
    Passthrough(WeightedClusters),
}

pub struct ServerEntry {
    /// Exact names, `*.suffix`, or `*`; empty: any.
    pub names: Vec<String>,
    pub kind: ServerKind,
}

/// A listener's TLS servers.
pub struct TlsListener {
    pub servers: Vec<ServerEntry>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.servers.iter().map(|s| &s.names).collect();
        write!(f, "TlsListener({names:?})")
    }
}

impl TlsListener {
    /// The server for `sni`: an exact name, else the longest matching
    /// `*.suffix`, else one for any name (`*` or none). Without SNI: only
    /// the last.
    pub fn choose(&self, sni: Option<&str>) -> Option<&ServerEntry> {
        let sni = sni.map(|s| s.trim_end_matches('.').to_ascii_lowercase());
        if let Some(sni) = &sni {
            if let Some(s) = self
                .servers
                .iter()
                .find(|s| s.names.iter().any(|n| n.eq_ignore_ascii_case(sni)))
            {
                return Some(s);
            }
            let mut best: Option<(usize, &ServerEntry)> = None;
            for s in &self.servers {
                for n in &s.names {
                    if let Some(suffix) = n.strip_prefix('*')
                        && suffix.len() > 1
                        && sni.ends_with(&suffix.to_ascii_lowercase())
                        && best.is_none_or(|(l, _)| suffix.len() > l)
                    {
                        best = Some((suffix.len(), s));
                    }
                }
            }
            if let Some((_, s)) = best {
                return Some(s);
            }
        }
        self.servers
            .iter()
            .find(|s| s.names.is_empty() || s.names.iter().any(|n| n == "*"))
    }
}

/// OpenSSL's names of the TLS 1.2 suites rustls has, as Istio users write them.
fn suite_matches(want: &str, suite: &rustls::SupportedCipherSuite) -> bool {
    let rustls_name = format!("{:?}", suite.suite());
    let openssl = match rustls_name.as_str() {
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => "ECDHE-ECDSA-AES128-GCM-SHA256",
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => "ECDHE-ECDSA-AES256-GCM-SHA384",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => "ECDHE-RSA-AES128-GCM-SHA256",
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => "ECDHE-RSA-AES256-GCM-SHA384",
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => "ECDHE-RSA-CHACHA20-POLY1305",
        other => other,
    };
    want == rustls_name || want == openssl
}

fn read_or(bytes: &[u8], file: &str, what: &str) -> Result<Vec<u8>, String> {
    if !file.is_empty() {
        return std::fs::read(file).map_err(|e| format!("{what} {file}: {e}"));
    }
    Ok(bytes.to_vec())
}

/// Builds one server's TLS config. `http`: ALPN h2 and http/1.1.
pub fn server_config(
    s: &pb::TlsServer,
    store: &Arc<Store>,
    http: bool,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mode = pb::TlsServerMode::try_from(s.mode).map_err(|_| "unknown tls mode".to_string())?;
    let base = provider();
    let mut p = (*base).clone();
    if !s.cipher_suites.is_empty() {
        p.cipher_suites.retain(|c| {
            // TLS 1.3 suites are not configurable in Envoy either.
            c.version() == &rustls::version::TLS13
                || s.cipher_suites.iter().any(|w| suite_matches(w, c))
        });
        if !p
            .cipher_suites
            .iter()
            .any(|c| c.version() == &rustls::version::TLS12)
            && s.min_version <= 12
            && s.max_version != 13
        {
            return Err(format!(
                "cipherSuites {:?}: none is a TLS 1.2 suite rustls has",
                s.cipher_suites
            ));
        }
    }
    let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
    let (min, max) = (
        if s.min_version == 0 {
            12
        } else {
            s.min_version
        },
        if s.max_version == 0 {
            13
        } else {
            s.max_version
        },
    );
    if min <= 12 && max >= 12 {
        versions.push(&rustls::version::TLS12);
    }
    if min <= 13 && max >= 13 {
        versions.push(&rustls::version::TLS13);
    }
    if versions.is_empty() {
        return Err(format!(
            "protocol versions {min}..{max}: rustls has TLS 1.2 and 1.3 only"
        ));
    }
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(p))
        .with_protocol_versions(&versions)
        .map_err(|e| e.to_string())?;
    let mut config = if mode == pb::TlsServerMode::IstioMutual {
        let c = super::mesh_server_config(store);
        (*c).clone()
    } else {
        let chain = read_or(
            &s.certificate_chain,
            &s.certificate_file,
            "serverCertificate",
        )?;
        let key = read_or(&s.private_key, &s.private_key_file, "privateKey")?;
        let chain = parse_certs("serverCertificate", &chain).map_err(|e| e.to_string())?;
        let key = parse_key("privateKey", &key).map_err(|e| e.to_string())?;
        let builder = match mode {
            pb::TlsServerMode::Mutual | pb::TlsServerMode::OptionalMutual => {
                let ca = read_or(
                    &s.ca_certificates,
                    &s.ca_certificates_file,
                    "caCertificates",
                )?;
                if ca.is_empty() {
                    return Err("MUTUAL needs caCertificates (or ca.crt in the Secret)".into());
                }
                let mut roots = rustls::RootCertStore::empty();
                for c in parse_certs("caCertificates", &ca).map_err(|e| e.to_string())? {
                    roots.add(c).map_err(|e| format!("caCertificates: {e}"))?;
                }
                let b = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    base.clone(),
                );
                let b = if mode == pb::TlsServerMode::OptionalMutual {
                    b.allow_unauthenticated()
                } else {
                    b
                };
                let inner = b.build().map_err(|e| format!("caCertificates: {e}"))?;
                let v = Checked {
                    inner,
                    sans: s.subject_alt_names.clone(),
                    spki: s.verify_spki_sha256.clone(),
                    hashes: s
                        .verify_cert_sha256
                        .iter()
                        .map(|h| h.replace(':', "").to_ascii_lowercase())
                        .collect(),
                };
                builder.with_client_cert_verifier(Arc::new(v))
            }
            _ => builder.with_no_client_auth(),
        };
        builder
            .with_single_cert(chain, key)
            .map_err(|e| format!("privateKey: {e} (does it match serverCertificate?)"))?
    };
    super::enable_tickets(&mut config);
    config.alpn_protocols = if http {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        Vec::new()
    };
    Ok(Arc::new(config))
}

/// A client-certificate verifier with the server's extra checks:
/// `subjectAltNames`, `verifyCertificateSpki`, `verifyCertificateHash`.
#[derive(Debug)]
struct Checked {
    inner: Arc<dyn ClientCertVerifier>,
    sans: Vec<String>,
    spki: Vec<String>,
    hashes: Vec<String>,
}

impl ClientCertVerifier for Checked {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if !self.sans.is_empty() {
            let info = super::leaf_info(end_entity).map_err(Error::General)?;
            let found = info
                .uris
                .iter()
                .chain(&info.dns)
                .any(|n| self.sans.iter().any(|s| s == n));
            if !found {
                return Err(Error::General(format!(
                    "client certificate names none of {:?}",
                    self.sans
                )));
            }
        }
        if !self.hashes.is_empty() && !self.hashes.contains(&cert_hash(end_entity)) {
            return Err(Error::General("client certificate hash not allowed".into()));
        }
        if !self.spki.is_empty() {
            let spki = spki_sha256(end_entity).ok_or(Error::General("bad certificate".into()))?;
            if !self.spki.contains(&spki) {
                return Err(Error::General("client certificate key not allowed".into()));
            }
        }
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// base64 SHA-256 of a certificate's SubjectPublicKeyInfo (Envoy's
/// `verify_certificate_spki`).
pub fn spki_sha256(der: &[u8]) -> Option<String> {
    use base64::Engine;
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.public_key().raw);
    Some(base64::engine::general_purpose::STANDARD.encode(d.as_ref()))
}

/// What the ClientHello says, read without consuming it.
pub struct Hello {
    pub sni: Option<String>,
}

/// Peeks at the connection until a whole ClientHello is there (or the
/// deadline): `None` if it is not TLS or never completes.
pub async fn peek_hello(stream: &TcpStream, deadline: tokio::time::Instant) -> Option<Hello> {
    let mut buf = vec![0u8; 16 * 1024 + 5];
    let mut last = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 || buf[0] != 0x16 {
            return None;
        }
        if n > last {
            last = n;
            let mut acc = rustls::server::Acceptor::default();
            let mut rd: &[u8] = &buf[..n];
            while !rd.is_empty() {
                match acc.read_tls(&mut rd) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            match acc.accept() {
                Ok(Some(accepted)) => {
                    let sni = accepted.client_hello().server_name().map(str::to_string);
                    return Some(Hello { sni });
                }
                Ok(None) if n < buf.len() => {}
                _ => return None,
            }
        }
        // The rest of the ClientHello has not arrived: look again shortly.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(names: &[&str]) -> ServerEntry {
        ServerEntry {
            names: names.iter().map(|n| n.to_string()).collect(),
            kind: ServerKind::Passthrough(WeightedClusters {
                clusters: vec![],
                total: 0,
            }),
        }
    }

    #[test]
    fn sni_picks_exact_then_longest_wildcard_then_catch_all() {
        let l = TlsListener {
            servers: vec![
                entry(&["*.example.com"]),
                entry(&["*.api.example.com"]),
                entry(&["www.example.com"]),
                entry(&["*"]),
            ],
        };
        let pick = |sni: Option<&str>| {
            l.choose(sni)
                .map(|s| s.names[0].clone())
                .unwrap_or_default()
        };
        assert_eq!(pick(Some("www.example.com")), "www.example.com");
        assert_eq!(pick(Some("WWW.Example.com.")), "www.example.com");
        assert_eq!(pick(Some("v1.api.example.com")), "*.api.example.com");
        assert_eq!(pick(Some("shop.example.com")), "*.example.com");
        assert_eq!(pick(Some("example.org")), "*");
        assert_eq!(pick(None), "*");
        let strict = TlsListener {
            servers: vec![entry(&["a.example.com"])],
        };
        assert!(strict.choose(None).is_none());
        assert!(strict.choose(Some("b.example.com")).is_none());
    }
}
