//! Certificates made at test time: a mesh CA, SPIFFE workload certificates,
//! an untrusted CA, expired certificates. Written in Istio's file-mounted
//! layout (`cert-chain.pem`, `key.pem`, `root-cert.pem`).
#![allow(dead_code)]

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType, date_time_ymd};

pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca { issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap() }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A workload certificate for `spiffe_id` (URI SAN only, as Istio's).
    pub fn workload(&self, spiffe_id: &str) -> Workload {
        self.workload_with(spiffe_id, false)
    }

    /// A server certificate for DNS names (gateway certificates).
    pub fn server(&self, dns: &[&str]) -> Workload {
        let params = CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Workload { cert_pem: cert.pem(), key_pem: key.serialize_pem(), root_pem: self.pem(), der: cert.der().to_vec() }
    }

    pub fn expired_workload(&self, spiffe_id: &str) -> Workload {
        self.workload_with(spiffe_id, true)
    }

    fn workload_with(&self, spiffe_id: &str, expired: bool) -> Workload {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().unwrap())];
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2020, 1, 2);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Workload { cert_pem: cert.pem(), key_pem: key.serialize_pem(), root_pem: self.pem(), der: cert.der().to_vec() }
    }
}

pub struct Workload {
    pub cert_pem: String,
    pub key_pem: String,
    pub root_pem: String,
    pub der: Vec<u8>,
}

impl Workload {
    /// Writes Istio's file-mounted layout into `dir`.
    pub fn write(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("cert-chain.pem"), &self.cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), &self.key_pem).unwrap();
        std::fs::write(dir.join("root-cert.pem"), &self.root_pem).unwrap();
    }
}
