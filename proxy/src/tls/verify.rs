//! Certificate checks that read the current trust bundle at each handshake.
//!
//! A mesh peer's certificate names a workload by a SPIFFE URI SAN and no
//! DNS name, so the server check is Istio's: the chain must lead to one of
//! our roots, and the URI SAN must be one of those expected (the service's
//! service accounts, or a DestinationRule's `subjectAltNames`). The host
//! name the client dialled is not compared.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore,
    SignatureScheme,
};

use super::{Store, leaf_info};

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms
}

/// Requires a client certificate that chains to the store's roots.
#[derive(Debug)]
pub struct MeshClientVerifier {
    store: Arc<Store>,
    algs: WebPkiSupportedAlgorithms,
}

impl MeshClientVerifier {
    pub fn new(store: Arc<Store>) -> Self {
        MeshClientVerifier {
            store,
            algs: algorithms(),
        }
    }
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let id = self
            .store
            .get()
            .ok_or(Error::General("no workload certificate yet".into()))?;
        id.client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Checks a mesh server: chain to the store's roots, SPIFFE SAN expected.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Roots,
    sans: Arc<[String]>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub fn mesh(store: Arc<Store>, sans: Arc<[String]>) -> Self {
        SpiffeServerVerifier {
            roots: Roots::Store(store),
            sans,
            algs: algorithms(),
        }
    }

    /// Fixed roots (a DestinationRule's `caCertificates`) and names.
    pub fn fixed(roots: Arc<RootCertStore>, sans: Arc<[String]>) -> Self {
        SpiffeServerVerifier {
            roots: Roots::Fixed(roots),
            sans,
            algs: algorithms(),
        }
    }
}

#[derive(Debug)]
enum Roots {
    /// The mesh's trust bundle, as it is at the handshake.
    Store(Arc<Store>),
    Fixed(Arc<RootCertStore>),
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let roots = match &self.roots {
            Roots::Store(s) => s
                .get()
                .ok_or(Error::General("no workload certificate yet".into()))?
                .roots
                .clone(),
            Roots::Fixed(r) => r.clone(),
        };
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        if self.sans.is_empty() {
            return Ok(ServerCertVerified::assertion());
        }
        let info = leaf_info(end_entity)
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if info.uris.iter().any(|u| self.sans.iter().any(|s| s == u))
            || info.dns.iter().any(|d| self.sans.iter().any(|s| s == d))
        {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(Error::General(format!(
                "peer certificate names {:?}, expected one of {:?}",
                info.uris, &*self.sans
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
