//! Verifying a mesh server: the chain must lead to the trust bundle and the
//! leaf's SPIFFE URI SAN must be one of the expected identities (or, with none
//! given, any identity of the trust domain). rustls' stock verifier checks DNS
//! names and rejects URI-only certificates, so this one does the name check
//! itself after delegating the chain check to rustls.

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::ParsedCertificate;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{IdentityStore, spiffe_ids, trust_domain_of};

/// The handshake-signature half of `ServerCertVerifier`, the same for every
/// verifier here: rustls' checks with the provider found at `self.$field`.
macro_rules! signature_checks {
    ($field:tt) => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &self.$field.signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.$field.signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.$field.signature_verification_algorithms.supported_schemes()
        }
    };
}

#[derive(Debug)]
pub struct SpiffeServerVerifier {
    store: Arc<IdentityStore>,
    expected: Vec<String>,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    pub fn new(
        store: Arc<IdentityStore>,
        expected: Vec<String>,
        trust_domain: String,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        SpiffeServerVerifier { store, expected, trust_domain, provider }
    }

    /// Whether a peer's SPIFFE IDs satisfy the expectation.
    pub fn accepts(&self, ids: &[String]) -> bool {
        if self.expected.is_empty() {
            ids.iter().any(|id| trust_domain_of(id) == Some(self.trust_domain.as_str()))
        } else {
            ids.iter().any(|id| self.expected.iter().any(|e| e == id))
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(identity) = self.store.current() else {
            return Err(rustls::Error::General("no workload identity loaded".into()));
        };
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &identity.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let ids = spiffe_ids(end_entity);
        if self.accepts(&ids) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(Arc::new(
                UnexpectedIdentity {
                    found: ids,
                    expected: self.expected.clone(),
                    trust_domain: self.trust_domain.clone(),
                },
            )))))
        }
    }

    signature_checks!(provider);
}

#[derive(Debug)]
struct UnexpectedIdentity {
    found: Vec<String>,
    expected: Vec<String>,
    trust_domain: String,
}

impl std::fmt::Display for UnexpectedIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.expected.is_empty() {
            write!(f, "server identity {:?} is not in trust domain {}", self.found, self.trust_domain)
        } else {
            write!(f, "server identity {:?} is not one of {:?}", self.found, self.expected)
        }
    }
}

impl std::error::Error for UnexpectedIdentity {}

/// `insecureSkipVerify`: any server certificate is accepted (signatures on
/// the handshake are still checked).
#[derive(Debug)]
pub struct AnyServer(pub Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    signature_checks!(0);
}

/// `subjectAltNames`: the chain must lead to the CA and one of the leaf's
/// DNS or URI SANs must be listed (instead of the hostname check).
#[derive(Debug)]
pub struct SanServerVerifier {
    roots: Arc<rustls::RootCertStore>,
    sans: Vec<String>,
    provider: Arc<CryptoProvider>,
}

impl SanServerVerifier {
    pub fn new(roots: Arc<rustls::RootCertStore>, sans: Vec<String>, provider: Arc<CryptoProvider>) -> Self {
        SanServerVerifier { roots, sans, provider }
    }
}

impl ServerCertVerifier for SanServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        let mut names = ee.valid_dns_names().chain(ee.valid_uri_names());
        if names.any(|n| self.sans.iter().any(|s| s == n)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
        }
    }

    signature_checks!(provider);
}
