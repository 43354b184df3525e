//! TLS for Gateway servers (`protocol: HTTPS`): SIMPLE and MUTUAL with
//! certificates from files, one certificate per server chosen by SNI,
//! `minProtocolVersion`/`maxProtocolVersion`, ALPN h2 and http/1.1. Files are
//! polled for changes and reloaded; a broken pair keeps the previous one.

use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;

use super::inbound::{AcceptError, DETECT_TIMEOUT, Peer};
use super::{fingerprint, spiffe_ids};
use crate::config::model::ServerTlsSettings;
use crate::upstream::pool::BoxIo;

/// How often certificate files are checked for changes.
pub const CERT_POLL: Duration = Duration::from_secs(5);

/// The TLS setup of one server block.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerTls {
    /// Server hosts (`*`, `*.example.com`, `example.com`) for SNI selection.
    pub hosts: Vec<String>,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Set for MUTUAL: clients must present a certificate from these roots.
    pub client_ca: Option<PathBuf>,
    /// MUTUAL: accepted client SANs (DNS or URI); empty accepts any.
    pub client_sans: Vec<String>,
    pub tls13_only: bool,
    pub tls12_only: bool,
}

impl ServerTls {
    pub fn from_settings(hosts: &[String], t: &ServerTlsSettings) -> ServerTls {
        ServerTls {
            hosts: hosts.iter().map(|h| h.rsplit('/').next().unwrap_or(h).to_ascii_lowercase()).collect(),
            cert: PathBuf::from(t.server_certificate.clone().unwrap_or_default()),
            key: PathBuf::from(t.private_key.clone().unwrap_or_default()),
            client_ca: (t.mode.as_deref() == Some("MUTUAL"))
                .then(|| PathBuf::from(t.ca_certificates.clone().unwrap_or_default())),
            client_sans: t.subject_alt_names.clone(),
            tls13_only: t.min_protocol_version.as_deref() == Some("TLSV1_3"),
            tls12_only: t.max_protocol_version.as_deref() == Some("TLSV1_2"),
        }
    }

    fn matches(&self, sni: &str) -> bool {
        self.hosts.iter().any(|h| {
            h == "*"
                || h == sni
                || h.strip_prefix('*').is_some_and(|suffix| sni.ends_with(suffix) && sni.len() > suffix.len())
        })
    }

    fn build(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let provider = super::crypto();
        let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let certs: Result<Vec<CertificateDer<'static>>, _> =
            CertificateDer::pem_slice_iter(&read(&self.cert)?).collect();
        let certs = certs.map_err(|e| format!("{}: not PEM certificates: {e}", self.cert.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate", self.cert.display()));
        }
        let key = PrivateKeyDer::from_pem_slice(&read(&self.key)?)
            .map_err(|e| format!("{}: not a PEM private key: {e}", self.key.display()))?;
        let certified =
            CertifiedKey::from_der(certs, key, &provider).map_err(|e| format!("{}: {e}", self.key.display()))?;
        let versions: &[&'static rustls::SupportedProtocolVersion] = if self.tls13_only {
            &[&rustls::version::TLS13]
        } else if self.tls12_only {
            &[&rustls::version::TLS12]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(&read(ca)?) {
                    let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
                    roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| format!("{}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut cfg = builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(Arc::new(certified))));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }

    fn modified(&self) -> Vec<Option<SystemTime>> {
        let mut files = vec![&self.cert, &self.key];
        if let Some(ca) = &self.client_ca {
            files.push(ca);
        }
        files.iter().map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok()).collect()
    }
}

struct Entry {
    spec: ServerTls,
    config: ArcSwap<rustls::ServerConfig>,
    stamp: std::sync::Mutex<Vec<Option<SystemTime>>>,
}

/// The TLS of one gateway listener: an entry per server block.
pub struct GatewayTls {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for GatewayTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.entries.iter().map(|e| &e.spec)).finish()
    }
}

impl GatewayTls {
    /// Loads every server's files now (errors reject the config).
    pub fn load(servers: Vec<ServerTls>) -> Result<Arc<GatewayTls>, String> {
        let mut entries = Vec::with_capacity(servers.len());
        for spec in servers {
            let config = spec.build()?;
            let stamp = std::sync::Mutex::new(spec.modified());
            entries.push(Entry { spec, config: ArcSwap::new(config), stamp });
        }
        let tls = Arc::new(GatewayTls { entries });
        if tokio::runtime::Handle::try_current().is_ok() {
            spawn_poll(Arc::downgrade(&tls));
        }
        Ok(tls)
    }

    fn config_for(&self, sni: Option<&str>) -> Option<Arc<rustls::ServerConfig>> {
        let entry = match sni {
            Some(name) => self.entries.iter().find(|e| e.spec.matches(&name.to_ascii_lowercase())),
            None => None,
        };
        entry.or(self.entries.first()).map(|e| e.config.load_full())
    }

    fn client_sans_for(&self, sni: Option<&str>) -> Vec<String> {
        let entry = sni.and_then(|n| self.entries.iter().find(|e| e.spec.matches(&n.to_ascii_lowercase())));
        entry.or(self.entries.first()).map(|e| e.spec.client_sans.clone()).unwrap_or_default()
    }

    /// Terminates TLS for a gateway connection, choosing the server block by
    /// SNI. A MUTUAL client's identity (SPIFFE URI SAN, if any) is returned.
    pub async fn accept(&self, stream: TcpStream) -> Result<(BoxIo, Option<Arc<Peer>>), AcceptError> {
        let acceptor = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), stream);
        let start = tokio::time::timeout(DETECT_TIMEOUT, acceptor)
            .await
            .map_err(|_| AcceptError::Timeout(DETECT_TIMEOUT))?
            .map_err(AcceptError::Handshake)?;
        let sni = start.client_hello().server_name().map(str::to_string);
        let config = self.config_for(sni.as_deref()).ok_or(AcceptError::NoIdentity)?;
        let tls = tokio::time::timeout(DETECT_TIMEOUT, start.into_stream(config))
            .await
            .map_err(|_| AcceptError::Timeout(DETECT_TIMEOUT))?
            .map_err(AcceptError::Handshake)?;
        let (_, conn) = tls.get_ref();
        let peer = match conn.peer_certificates().and_then(|c| c.first()) {
            Some(leaf) => {
                let sans = self.client_sans_for(sni.as_deref());
                if !sans.is_empty() && !client_san_matches(leaf, &sans) {
                    return Err(AcceptError::NoPeerIdentity);
                }
                let id = spiffe_ids(leaf).into_iter().next().unwrap_or_default();
                Some(Arc::new(Peer { spiffe_id: id, cert_hash: fingerprint(leaf) }))
            }
            None => None,
        };
        Ok((Box::new(tls), peer))
    }
}

fn client_san_matches(leaf: &CertificateDer<'_>, wanted: &[String]) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(leaf) else { return false };
    let uris: Vec<&str> = ee.valid_uri_names().collect();
    let dns: Vec<&str> = ee.valid_dns_names().collect();
    wanted.iter().any(|w| uris.contains(&w.as_str()) || dns.contains(&w.as_str()))
}

/// Reloads a server's certificate when its files change, for as long as the
/// listener's TLS is in use.
fn spawn_poll(weak: Weak<GatewayTls>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(CERT_POLL).await;
            let Some(tls) = weak.upgrade() else { return };
            for e in &tls.entries {
                let now = e.spec.modified();
                let changed = {
                    let mut stamp = e.stamp.lock().unwrap_or_else(|p| p.into_inner());
                    let changed = *stamp != now;
                    *stamp = now;
                    changed
                };
                if !changed {
                    continue;
                }
                match e.spec.build() {
                    Ok(cfg) => {
                        tracing::info!(cert = %e.spec.cert.display(), "gateway certificate reloaded");
                        e.config.store(cfg);
                    }
                    Err(err) => tracing::error!(error = %err, "gateway certificate rejected; keeping the previous one"),
                }
            }
        }
    });
}
