//! Who is calling: SPIFFE workload identities, how a caller proves one,
//! and the TLS listener that carries the proof.
//!
//! A caller on the TLS port proves an identity with one of:
//! - a client certificate the mesh CA signed (its SPIFFE URI SAN, in our
//!   trust domain);
//! - a bearer token in the `authorization` metadata: a Kubernetes
//!   ServiceAccount token checked with a TokenReview (audience `istio-ca`)
//!   when the control watches Kubernetes, or a bootstrap token from the
//!   `--ca-tokens` file, which maps each token to a namespace and service
//!   account.
//!
//! Nothing a proxy says about itself (node id, metadata, the CSR's SANs)
//! is trusted: it is checked against what it proved.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::{Request, Status};

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WorkloadId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl WorkloadId {
    pub fn spiffe(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    pub fn parse(uri: &str) -> Option<WorkloadId> {
        let rest = uri.strip_prefix("spiffe://")?;
        let mut parts = rest.split('/');
        let td = parts.next()?;
        let (ns_k, ns, sa_k, sa) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if ns_k != "ns" || sa_k != "sa" || parts.next().is_some() || ns.is_empty() || sa.is_empty()
        {
            return None;
        }
        Some(WorkloadId {
            trust_domain: td.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        })
    }
}

/// What the listener knows of a gRPC connection (tonic's connect info).
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub addr: Option<SocketAddr>,
    /// The connection is TLS (the authenticated port).
    pub tls: bool,
    /// The SPIFFE identity of a client certificate the CA's roots verify.
    pub cert: Option<WorkloadId>,
}

/// One entry of the `--ca-tokens` file.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TokenEntry {
    token: String,
    namespace: String,
    service_account: String,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokenEntry>,
}

/// Reads a tokens file: `tokens: [{token, namespace, serviceAccount}]`.
pub fn load_tokens(path: &std::path::Path) -> Result<HashMap<String, (String, String)>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let f: TokensFile =
        serde_saphyr::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut m = HashMap::new();
    for (i, t) in f.tokens.into_iter().enumerate() {
        if t.token.len() < 16 {
            return Err(format!(
                "{}: tokens[{i}].token: shorter than 16 characters",
                path.display()
            ));
        }
        if m.insert(t.token, (t.namespace, t.service_account))
            .is_some()
        {
            return Err(format!("{}: tokens[{i}].token: used twice", path.display()));
        }
    }
    Ok(m)
}

pub struct Authenticator {
    pub trust_domain: String,
    /// The bootstrap tokens file, read at each check (a rotated file takes
    /// effect at once; a broken one keeps the last good tokens).
    tokens_file: Option<PathBuf>,
    tokens: std::sync::Mutex<HashMap<String, (String, String)>>,
    #[cfg(feature = "kubernetes")]
    kube: Option<kube::Client>,
}

impl Authenticator {
    pub fn new(
        trust_domain: String,
        tokens_file: Option<PathBuf>,
    ) -> Result<Authenticator, String> {
        let tokens = match &tokens_file {
            Some(p) => load_tokens(p)?,
            None => HashMap::new(),
        };
        Ok(Authenticator {
            trust_domain,
            tokens_file,
            tokens: std::sync::Mutex::new(tokens),
            #[cfg(feature = "kubernetes")]
            kube: None,
        })
    }

    /// Checks bearer tokens with Kubernetes TokenReviews too, with the
    /// ambient credentials (in-cluster service account or kubeconfig).
    #[cfg(feature = "kubernetes")]
    pub async fn with_ambient_kubernetes(mut self) -> Result<Authenticator, String> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("Kubernetes client for TokenReviews: {e}"))?;
        self.kube = Some(client);
        Ok(self)
    }

    async fn token(&self, token: &str) -> Result<WorkloadId, Status> {
        if let Some(p) = &self.tokens_file {
            match load_tokens(p) {
                Ok(t) => *self.tokens.lock().unwrap_or_else(|e| e.into_inner()) = t,
                Err(e) => tracing::error!("tokens file refused, the last good tokens stay: {e}"),
            }
        }
        let found = self
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned();
        if let Some((ns, sa)) = found {
            return Ok(WorkloadId {
                trust_domain: self.trust_domain.clone(),
                namespace: ns,
                service_account: sa,
            });
        }
        #[cfg(feature = "kubernetes")]
        if let Some(client) = &self.kube {
            return crate::kubernetes::token_review(client, token)
                .await
                .map(|(namespace, service_account)| WorkloadId {
                    trust_domain: self.trust_domain.clone(),
                    namespace,
                    service_account,
                })
                .map_err(Status::unauthenticated);
        }
        Err(Status::unauthenticated("token not recognised"))
    }

    /// The identity a request proved. `Ok(None)`: it came over the
    /// plaintext (loopback) listener, where nothing is proved.
    pub async fn authenticate<T>(&self, req: &Request<T>) -> Result<Option<WorkloadId>, Status> {
        let peer = req
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or_default();
        if !peer.tls {
            return Ok(None);
        }
        if let Some(v) = req.metadata().get("authorization") {
            let token = v
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .ok_or_else(|| Status::unauthenticated("authorization: want `Bearer <token>`"))?;
            return self.token(token.trim()).await.map(Some);
        }
        match peer.cert {
            Some(id) if id.trust_domain == self.trust_domain => Ok(Some(id)),
            Some(id) => Err(Status::unauthenticated(format!(
                "client certificate for trust domain {}, not {}",
                id.trust_domain, self.trust_domain
            ))),
            None => Err(Status::unauthenticated(
                "no credentials: present a client certificate from the mesh CA or a bearer token",
            )),
        }
    }
}

/// A TLS connection for tonic, with what its handshake proved.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The TLS listener's server config: the serving certificate, client
/// certificates optional but verified against `roots_pem` when sent.
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    roots_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("serving chain: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("serving key: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        let c = c.map_err(|e| format!("roots: {e}"))?;
        roots.add(c).map_err(|e| format!("roots: {e}"))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| format!("client verifier: {e}"))?;
    let mut c = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| format!("serving certificate: {e}"))?;
    c.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(c))
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TLS connections on `listener` for tonic: each handshake in its
/// own task (a silent client holds nothing but its task, for at most
/// [`HANDSHAKE_TIMEOUT`]).
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        tracing::debug!(%addr, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%addr, "TLS handshake timed out");
                        return;
                    }
                };
                let cert = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| spiffe_of(leaf));
                let info = PeerInfo {
                    addr: Some(addr),
                    tls: true,
                    cert,
                };
                let _ = tx.send(Ok(TlsConn { inner: tls, info })).await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The SPIFFE identity in a certificate's URI SANs.
pub fn spiffe_of(der: &[u8]) -> Option<WorkloadId> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => WorkloadId::parse(u),
        _ => None,
    })
}
