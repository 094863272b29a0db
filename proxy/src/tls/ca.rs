//! The workload certificate from Bosun's CA (or istiod: the same API,
//! `istio.v1.auth.IstioCertificateService/CreateCertificate`).
//!
//! The proxy makes its own ECDSA P-256 key (it never leaves the process),
//! sends a CSR for its SPIFFE ID with its token as a bearer credential, and
//! gets a short-lived certificate. It asks again at about half the
//! lifetime (40–60%, jittered so a fleet started together does not renew
//! together); a failed renewal is retried with backoff until the old
//! certificate expires. Each new certificate is swapped into the
//! [`Store`]: handshakes from then on use it; open connections keep theirs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bosun_xds_proto::ca::IstioCertificateRequest;
use bosun_xds_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use rand::RngExt;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::{Identity, Store};

/// How to reach the CA and who to ask to be.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// `https://host:port` (the control's gRPC port).
    pub address: String,
    /// The name the control's serving certificate carries.
    pub server_name: String,
    /// PEM roots the control's certificate must chain to (and the mesh's
    /// trust bundle: a file with the old and new roots during a rotation).
    pub root_cert: PathBuf,
    /// The bearer token (a projected ServiceAccount token with audience
    /// `istio-ca`, or a Bosun bootstrap token); read at each request, so a
    /// rotated token is used.
    pub token_file: PathBuf,
    /// The SPIFFE ID asked for.
    pub spiffe: String,
    /// Requested lifetime.
    pub ttl: Duration,
}

/// A TLS gRPC channel to the control service, checked against `roots`.
pub async fn channel(
    address: &str,
    server_name: &str,
    roots: Vec<CertificateDer<'static>>,
    store: Option<&Arc<Store>>,
) -> Result<tonic::transport::Channel, String> {
    let rest = address
        .strip_prefix("https://")
        .ok_or_else(|| format!("{address}: want https://host:port"))?;
    let config = super::control_client_config(roots, store).map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| format!("server name {server_name:?}: {e}"))?;
    let target = rest.trim_end_matches('/').to_string();
    let connector = tower::service_fn(move |_: http::Uri| {
        let (config, name, target) = (config.clone(), name.clone(), target.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&target).await?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    // The scheme tonic sees is http: TLS is the connector's.
    tonic::transport::Endpoint::from_shared(format!("http://{rest}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("connect {address}: {e}"))
}

/// Reads a bearer token file (trimmed).
pub fn read_token(path: &std::path::Path) -> Result<String, String> {
    let t = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(format!("{}: empty token", path.display()));
    }
    Ok(t)
}

/// One certificate request: a new key, a CSR, the signed chain.
pub async fn request(opts: &CaOptions) -> Result<Identity, String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("key: {e}"))?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(opts.spiffe.clone())
            .map_err(|e| format!("SPIFFE ID {:?}: {e}", opts.spiffe))?,
    )];
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| format!("CSR: {e}"))?;
    let roots = super::source::roots_file(&opts.root_cert)?;
    let token = read_token(&opts.token_file)?;
    let ch = channel(&opts.address, &opts.server_name, roots.clone(), None).await?;
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: i64::try_from(opts.ttl.as_secs()).unwrap_or(i64::MAX),
        metadata: None,
    });
    let bearer = format!("Bearer {token}")
        .parse()
        .map_err(|_| format!("{}: not a valid header value", opts.token_file.display()))?;
    req.metadata_mut().insert("authorization", bearer);
    let resp = IstioCertificateServiceClient::new(ch)
        .create_certificate(req)
        .await
        .map_err(|s| format!("CA refused: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut pems = resp.cert_chain;
    if pems.len() < 2 {
        return Err("CA answered without a chain and root".into());
    }
    let root_pem = pems.pop().unwrap_or_default();
    let mut chain = Vec::new();
    for p in &pems {
        chain.extend(
            super::parse_certs("certificate chain", p.as_bytes()).map_err(|e| e.to_string())?,
        );
    }
    let mut all_roots = roots;
    for r in
        super::parse_certs("root certificate", root_pem.as_bytes()).map_err(|e| e.to_string())?
    {
        if !all_roots.contains(&r) {
            all_roots.push(r);
        }
    }
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let id = Identity::new(chain, key, all_roots).map_err(|e| e.to_string())?;
    if id.spiffe != opts.spiffe {
        return Err(format!(
            "CA signed {:?}, not the {:?} asked for",
            id.spiffe, opts.spiffe
        ));
    }
    Ok(id)
}

/// When to renew a certificate: 40–60% into what is left of its life when
/// it arrived (a CA backdates `notBefore` for clock skew; that part of the
/// window is not life to spend).
pub fn renew_at(id: &Identity) -> SystemTime {
    let now = SystemTime::now();
    let start = id.not_before.max(now);
    let life = id
        .not_after
        .duration_since(start)
        .unwrap_or(Duration::from_secs(1));
    let share = rand::rng().random_range(0.4..0.6);
    start + life.mul_f64(share)
}

/// Keeps the store holding a certificate from the CA: the first request
/// at once, then renewals at about half the lifetime; failures are logged
/// and retried with backoff (1 s doubling to 30 s). Until the first
/// certificate arrives mesh TLS fails closed: inbound handshakes and
/// outbound mTLS connections are refused.
pub fn start(opts: CaOptions, store: Arc<Store>) {
    tokio::spawn(async move {
        let mut backoff = Duration::from_secs(1);
        let mut next = SystemTime::now();
        let mut expiry: Option<SystemTime> = None;
        loop {
            let wait = next.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait).await;
            match request(&opts).await {
                Ok(id) => {
                    next = renew_at(&id);
                    expiry = Some(id.not_after);
                    store.set(id);
                    backoff = Duration::from_secs(1);
                }
                Err(e) => {
                    let left = expiry
                        .and_then(|x| x.duration_since(SystemTime::now()).ok())
                        .map_or(0, |d| d.as_secs());
                    tracing::warn!(
                        error = %e,
                        certificate_left_s = left,
                        retry_in_s = backoff.as_secs(),
                        "no certificate from the CA"
                    );
                    next = SystemTime::now() + backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    });
}
