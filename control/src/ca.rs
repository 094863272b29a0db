//! Bosun's certificate authority: workload certificates for SPIFFE IDs
//! over Istio's CSR API, and the control service's own serving
//! certificate.
//!
//! The signing certificate and key come from a directory with Istio's
//! plugged-in CA names (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`,
//! `cert-chain.pem`), or are made on first start (a self-signed ECDSA
//! P-256 root, ten years) and written there, so a restart keeps the root
//! every proxy trusts. `root-cert.pem` may hold several roots (old and new
//! during a root rotation): all are served as the trust bundle.
//!
//! The CA signs only the identity the caller proved ([`crate::identity`]),
//! never what a CSR claims: a CSR naming another identity is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bosun_xds_proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use bosun_xds_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use tonic::{Request, Response, Status};

use crate::identity::{Authenticator, WorkloadId};

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";

/// A workload certificate's lifetime when the request names none (Istio's 24 h).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// PEM: the intermediates between the signing cert and a root (empty
    /// for a self-signed CA).
    chain_pem: Vec<String>,
    /// PEM: every root (the trust bundle).
    roots_pem: String,
    /// Where it was loaded from, for messages.
    pub dir: PathBuf,
    /// The longest lifetime a caller may ask for.
    pub max_ttl: Duration,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ca({})", self.dir.display())
    }
}

fn pem_blocks(pem: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in pem.lines() {
        if line.starts_with("-----BEGIN") {
            cur.clear();
        }
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END") {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

fn write_private(path: &Path, data: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data.as_bytes())
}

fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

impl Ca {
    /// Loads the CA from `dir`, or makes one there if the directory has
    /// none of its files. Some but not all of them is an error (naming
    /// what is missing): half a CA is never completed silently.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Ca, String> {
        let names = [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN];
        let present: Vec<_> = names.iter().filter(|n| dir.join(n).exists()).collect();
        if present.is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let (cert_pem, key_pem) = generate_root(trust_domain)?;
            let w = |name: &str, data: &str| {
                std::fs::write(dir.join(name), data)
                    .map_err(|e| format!("{}: {e}", dir.join(name).display()))
            };
            write_private(&dir.join(CA_KEY), &key_pem)
                .map_err(|e| format!("{}: {e}", dir.join(CA_KEY).display()))?;
            w(CA_CERT, &cert_pem)?;
            w(ROOT_CERT, &cert_pem)?;
            w(CERT_CHAIN, &cert_pem)?;
            tracing::info!(dir = %dir.display(), "made a new root CA");
        } else if present.len() < names.len() {
            let missing: Vec<_> = names.iter().filter(|n| !dir.join(n).exists()).collect();
            return Err(format!(
                "{}: has {present:?} but not {missing:?}; give all four files (Istio's plugged-in CA layout) or none",
                dir.display()
            ));
        }
        Ca::load(dir)
    }

    pub fn load(dir: &Path) -> Result<Ca, String> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| format!("{}: {e}", dir.join(name).display()))
        };
        let files = CaFiles {
            cert: read(CA_CERT)?,
            key: read(CA_KEY)?,
            roots: read(ROOT_CERT)?,
            chain: read(CERT_CHAIN)?,
        };
        Ca::from_pems(files, &dir.display().to_string())
    }

    /// A CA from its four PEMs; `place` names where they came from in errors.
    pub fn from_pems(f: CaFiles, place: &str) -> Result<Ca, String> {
        let CaFiles {
            cert,
            key,
            roots,
            chain,
        } = f;
        let key = KeyPair::from_pem(&key).map_err(|e| format!("{place}: {CA_KEY}: {e}"))?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert, key).map_err(|e| format!("{place}: {CA_CERT}: {e}"))?;
        let roots_blocks = pem_blocks(&roots);
        if roots_blocks.is_empty() {
            return Err(format!("{place}: {ROOT_CERT}: no certificate"));
        }
        // cert-chain.pem is the signing cert up to a root; what a leaf
        // needs after itself is the part that is not a root.
        let chain_pem: Vec<String> = pem_blocks(&chain)
            .into_iter()
            .filter(|b| !roots_blocks.contains(b))
            .collect();
        Ok(Ca {
            issuer,
            chain_pem,
            roots_pem: roots,
            dir: PathBuf::from(place),
            max_ttl: Duration::from_secs(90 * 24 * 3600),
        })
    }

    /// The trust bundle (PEM).
    pub fn roots_pem(&self) -> &str {
        &self.roots_pem
    }

    /// Signs `csr_pem` for `id`, valid for `ttl` (capped at `max_ttl`).
    /// Returns the chain as Istio's API does: leaf, intermediates, root.
    pub fn sign(
        &self,
        csr_pem: &str,
        id: &WorkloadId,
        ttl: Duration,
    ) -> Result<Vec<String>, Status> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| Status::invalid_argument(format!("CSR: {e}")))?;
        let want = id.spiffe();
        for san in &csr.params.subject_alt_names {
            let ok = matches!(san, SanType::URI(u) if u.as_str() == want);
            if !ok {
                return Err(Status::permission_denied(format!(
                    "the CSR asks for {san:?}; the caller proved {want} only"
                )));
            }
        }
        let ttl = ttl.min(self.max_ttl).max(Duration::from_secs(10));
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(want.clone())
                .map_err(|e| Status::invalid_argument(format!("identity {want}: {e}")))?,
        )];
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // A little backdating absorbs clock skew between nodes.
        p.not_before = now() - time::Duration::minutes(1);
        p.not_after = now() + time::Duration::seconds(i64::try_from(ttl.as_secs()).unwrap_or(60));
        p.serial_number = Some(serial());
        p.use_authority_key_identifier_extension = true;
        let signed = CertificateSigningRequestParams {
            params: p,
            public_key: csr.public_key,
        }
        .signed_by(&self.issuer)
        .map_err(|e| Status::internal(format!("signing: {e}")))?;
        let mut chain = vec![signed.pem()];
        chain.extend(self.chain_pem.iter().cloned());
        chain.extend(pem_blocks(&self.roots_pem).into_iter().take(1));
        Ok(chain)
    }

    /// The control service's own serving certificate (DNS names), with a
    /// fresh key: (chain PEM, key PEM).
    pub fn serving(&self, dns: &[String], ttl: Duration) -> Result<(String, String), String> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| format!("serving key: {e}"))?;
        let mut p =
            CertificateParams::new(dns.to_vec()).map_err(|e| format!("serving names: {e}"))?;
        p.distinguished_name = DistinguishedName::new();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.not_before = now() - time::Duration::minutes(1);
        p.not_after = now() + time::Duration::seconds(i64::try_from(ttl.as_secs()).unwrap_or(60));
        p.serial_number = Some(serial());
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| format!("serving cert: {e}"))?;
        let mut chain = cert.pem();
        for c in &self.chain_pem {
            chain.push_str(c);
        }
        Ok((chain, key.serialize_pem()))
    }
}

/// The CA's four PEMs, Istio's plugged-in CA names.
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// ca-cert.pem
    pub cert: String,
    /// ca-key.pem
    pub key: String,
    /// root-cert.pem
    pub roots: String,
    /// cert-chain.pem
    pub chain: String,
}

/// A new self-signed ECDSA P-256 root for `trust_domain`, ten years:
/// (certificate PEM, key PEM).
pub fn generate_root(trust_domain: &str) -> Result<(String, String), String> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| format!("CA key: {e}"))?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "Bosun root CA");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = now() - time::Duration::minutes(5);
    p.not_after = now() + time::Duration::days(3650);
    p.serial_number = Some(serial());
    let cert = p.self_signed(&key).map_err(|e| format!("CA cert: {e}"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn serial() -> SerialNumber {
    use rand::RngExt;
    let mut b: [u8; 16] = rand::rng().random();
    b[0] &= 0x7f; // positive
    SerialNumber::from_slice(&b)
}

/// `istio.v1.auth.IstioCertificateService`.
pub struct CaService {
    pub ca: Arc<Ca>,
    pub auth: Arc<Authenticator>,
    pub issued: Arc<std::sync::atomic::AtomicU64>,
}

impl CaService {
    pub fn into_service(self) -> IstioCertificateServiceServer<CaService> {
        IstioCertificateServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let id = self
            .auth
            .authenticate(&request)
            .await?
            .ok_or_else(|| Status::unauthenticated("certificates are issued over TLS only"))?;
        let req = request.into_inner();
        let ttl = if req.validity_duration > 0 {
            Duration::from_secs(u64::try_from(req.validity_duration).unwrap_or(0))
        } else {
            DEFAULT_TTL
        };
        let chain = self.ca.sign(&req.csr, &id, ttl).inspect_err(|e| {
            tracing::warn!(identity = %id.spiffe(), error = %e.message(), "certificate refused");
        })?;
        self.issued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(identity = %id.spiffe(), ttl_s = ttl.as_secs(), "certificate issued");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bosun-ca-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn csr_for(uri: &str) -> String {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(uri.to_string()).expect("uri"),
        )];
        p.serialize_request(&key).expect("csr").pem().expect("pem")
    }

    fn id(sa: &str) -> WorkloadId {
        WorkloadId {
            trust_domain: "cluster.local".into(),
            namespace: "default".into(),
            service_account: sa.into(),
        }
    }

    #[test]
    fn the_ca_signs_the_proven_identity_only_and_keeps_its_root() {
        let dir = tmp("sign");
        let ca = Ca::load_or_create(&dir, "cluster.local").expect("made");
        let root = ca.roots_pem().to_string();
        let chain = ca
            .sign(
                &csr_for("spiffe://cluster.local/ns/default/sa/a"),
                &id("a"),
                Duration::from_secs(3600),
            )
            .expect("signed");
        assert_eq!(chain.len(), 2, "leaf and root");
        assert_eq!(chain[1], root);
        let (_, leaf) = x509_parser::pem::parse_x509_pem(chain[0].as_bytes()).expect("pem");
        let cert = leaf.parse_x509().expect("x509");
        let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        assert!((3600..=3700).contains(&life), "{life}");
        assert_eq!(
            crate::identity::spiffe_of(&leaf.contents).map(|w| w.spiffe()),
            Some("spiffe://cluster.local/ns/default/sa/a".into())
        );
        // A CSR for someone else is refused.
        let e = ca
            .sign(
                &csr_for("spiffe://cluster.local/ns/default/sa/b"),
                &id("a"),
                Duration::from_secs(60),
            )
            .expect_err("another identity");
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        // A restart keeps the root.
        let again = Ca::load_or_create(&dir, "cluster.local").expect("loaded");
        assert_eq!(again.roots_pem(), root);
        // Half a CA is refused, naming what is missing.
        std::fs::remove_file(dir.join(CA_KEY)).expect("rm");
        let e = Ca::load_or_create(&dir, "cluster.local").expect_err("half a CA");
        assert!(e.contains("ca-key.pem"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn spiffe_ids_parse_strictly() {
        assert_eq!(
            WorkloadId::parse("spiffe://td/ns/a/sa/b").map(|w| w.spiffe()),
            Some("spiffe://td/ns/a/sa/b".into())
        );
        for bad in [
            "spiffe://td/ns/a",
            "spiffe://td/sa/b/ns/a",
            "https://td/ns/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/a/sa/b/c",
        ] {
            assert!(WorkloadId::parse(bad).is_none(), "{bad}");
        }
    }
}
