//! Workload identity and mTLS: the SPIFFE certificate from `--identity-dir`
//! (Istio's file-mounted layout, watched and hot-swapped), the server config
//! for inbound mTLS, and client configs for outbound `ISTIO_MUTUAL` with a
//! verifier that checks SPIFFE URI SANs (the stock verifier rejects URI-only
//! certificates).
//!
//! Rotation swaps the identity behind the resolvers and the configs built on
//! the trust bundle: new handshakes use the new certificate, established
//! connections keep theirs.

pub mod gateway;
pub mod inbound;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use rustls::RootCertStore;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Istio's file-mounted certificate names.
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const KEY: &str = "key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";

/// Istio's default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// ALPN ids offered and accepted on mesh connections: Istio's own (which
/// Istio sidecars use to pick mTLS HTTP filter chains) and the plain ones.
pub const MESH_ALPN_H2: [&[u8]; 3] = [b"istio-h2", b"istio", b"h2"];
pub const MESH_ALPN_H1: [&[u8]; 3] = [b"istio-http/1.1", b"istio", b"http/1.1"];
pub const SERVER_ALPN: [&[u8]; 7] =
    [b"istio-h2", b"h2", b"istio-http/1.1", b"istio-http/1.0", b"http/1.1", b"istio", b"http/1.0"];

/// A certificate expiring sooner than this is logged as a warning.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("the certificate's key does not match: {0}")]
    Mismatch(rustls::Error),
    #[error("{0}")]
    Invalid(String),
}

fn crypto() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// One loaded identity: certificate chain, key, trust bundle, SPIFFE ID.
pub struct Identity {
    pub spiffe_id: String,
    pub certified: Arc<CertifiedKey>,
    pub roots: Arc<RootCertStore>,
    pub not_after: Option<SystemTime>,
    /// Hex serial number of the leaf, for logs and `/config_dump`.
    pub serial: String,
}

impl std::fmt::Debug for Identity {
    // Never prints key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("spiffe_id", &self.spiffe_id).field("serial", &self.serial).finish()
    }
}

impl Identity {
    /// Loads `dir/{cert-chain,key,root-cert}.pem` and checks them: the key
    /// matches the leaf, the leaf has a SPIFFE URI SAN in `trust_domain`.
    pub fn load(dir: &Path, trust_domain: &str) -> Result<Identity, TlsError> {
        let file = |name: &str| dir.join(name);
        let read_certs = |path: PathBuf| -> Result<Vec<CertificateDer<'static>>, TlsError> {
            let bytes =
                std::fs::read(&path).map_err(|e| TlsError::File { path: path.clone(), message: e.to_string() })?;
            let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&bytes).collect();
            let certs = certs
                .map_err(|e| TlsError::File { path: path.clone(), message: format!("not PEM certificates: {e}") })?;
            if certs.is_empty() {
                return Err(TlsError::File { path, message: "no certificate in the file".into() });
            }
            Ok(certs)
        };
        let chain = read_certs(file(CERT_CHAIN))?;
        let roots_pem = read_certs(file(ROOT_CERT))?;
        let key_path = file(KEY);
        let key_bytes =
            std::fs::read(&key_path).map_err(|e| TlsError::File { path: key_path.clone(), message: e.to_string() })?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes)
            .map_err(|e| TlsError::File { path: key_path.clone(), message: format!("not a PEM private key: {e}") })?;
        let certified = CertifiedKey::from_der(chain.clone(), key, &crypto()).map_err(TlsError::Mismatch)?;
        let mut roots = RootCertStore::empty();
        for r in roots_pem {
            roots
                .add(r)
                .map_err(|e| TlsError::File { path: file(ROOT_CERT), message: format!("bad root certificate: {e}") })?;
        }
        let spiffe_id = spiffe_ids(&chain[0])
            .into_iter()
            .find(|id| trust_domain_of(id) == Some(trust_domain))
            .ok_or_else(|| {
                TlsError::Invalid(format!(
                    "{}: no spiffe://{trust_domain}/... URI SAN in the leaf certificate (found: {:?})",
                    file(CERT_CHAIN).display(),
                    spiffe_ids(&chain[0])
                ))
            })?;
        let info = der::leaf_info(&chain[0]);
        Ok(Identity {
            spiffe_id,
            certified: Arc::new(certified),
            roots: Arc::new(roots),
            not_after: info.as_ref().and_then(|i| i.not_after),
            serial: info.map(|i| i.serial).unwrap_or_default(),
        })
    }

    /// Seconds until the leaf expires (negative when expired).
    pub fn seconds_to_expiry(&self) -> Option<i64> {
        let na = self.not_after?;
        Some(match na.duration_since(SystemTime::now()) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        })
    }
}

/// `spiffe://…` URI SANs of a certificate.
pub fn spiffe_ids(cert: &CertificateDer<'_>) -> Vec<String> {
    match webpki::EndEntityCert::try_from(cert) {
        Ok(ee) => ee.valid_uri_names().filter(|u| u.starts_with("spiffe://")).map(str::to_string).collect(),
        Err(_) => Vec::new(),
    }
}

/// `spiffe://td/ns/x/sa/y` → `td`.
pub fn trust_domain_of(id: &str) -> Option<&str> {
    id.strip_prefix("spiffe://")?.split('/').next()
}

/// Hex SHA-256 of a certificate (XFCC `Hash=`).
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert.as_ref());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The current identity, swapped on rotation. Empty until loaded.
#[derive(Default)]
pub struct IdentityStore {
    current: ArcSwapOption<Identity>,
    /// Server configs for inbound mTLS, rebuilt when the trust bundle changes.
    server: ArcSwapOption<rustls::ServerConfig>,
}

impl std::fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityStore").field("current", &self.current.load_full()).finish()
    }
}

impl IdentityStore {
    pub fn new() -> Arc<Self> {
        Arc::new(IdentityStore::default())
    }

    pub fn current(&self) -> Option<Arc<Identity>> {
        self.current.load_full()
    }

    /// Installs a (new) identity; rebuilds the server config.
    pub fn install(self: &Arc<Self>, id: Identity) -> Result<(), TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(id.roots.clone(), crypto())
            .build()
            .map_err(|e| TlsError::Invalid(format!("trust bundle: {e}")))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(crypto())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Invalid(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = SERVER_ALPN.iter().map(|a| a.to_vec()).collect();
        if let Some(secs) = id.seconds_to_expiry()
            && secs < EXPIRY_WARNING.as_secs() as i64
        {
            tracing::warn!(spiffe_id = %id.spiffe_id, seconds_to_expiry = secs, "workload certificate expires soon");
        }
        tracing::info!(spiffe_id = %id.spiffe_id, serial = %id.serial, "workload identity loaded");
        self.current.store(Some(Arc::new(id)));
        self.server.store(Some(Arc::new(cfg)));
        Ok(())
    }

    /// The inbound mTLS server config (client certificates required).
    pub fn server_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.server.load_full()
    }

    /// A client config presenting this workload's certificate and accepting
    /// servers whose SPIFFE ID is in `expected` (or, when empty, any ID in the
    /// trust domain).
    pub fn client_config(
        self: &Arc<Self>,
        expected: Vec<String>,
        trust_domain: String,
        alpn_h2: bool,
    ) -> Arc<rustls::ClientConfig> {
        let verifier = Arc::new(verify::SpiffeServerVerifier::new(self.clone(), expected, trust_domain, crypto()));
        let builder = rustls::ClientConfig::builder_with_provider(crypto())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12]);
        let mut cfg = match builder {
            Ok(b) => b
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_client_cert_resolver(Arc::new(Resolver(self.clone()))),
            // The provider supports both versions; keep a working default.
            Err(_) => rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verify::SpiffeServerVerifier::new(
                    self.clone(),
                    vec![],
                    String::new(),
                    crypto(),
                )))
                .with_client_cert_resolver(Arc::new(Resolver(self.clone()))),
        };
        let alpn: &[&[u8]] = if alpn_h2 { &MESH_ALPN_H2 } else { &MESH_ALPN_H1 };
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(cfg)
    }

    /// Loads `dir` now and reloads it whenever its files change (Kubernetes
    /// Secret volumes swap a `..data` symlink, so the directory is watched).
    /// A broken or mismatched pair is rejected and the old identity kept.
    pub fn watch(self: &Arc<Self>, dir: PathBuf, trust_domain: String) -> Result<notify::RecommendedWatcher, TlsError> {
        use notify::{RecursiveMode, Watcher};
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                let _ = tx.send(());
            }
        })
        .map_err(|e| TlsError::Invalid(format!("cannot watch {}: {e}", dir.display())))?;
        watcher
            .watch(&dir, RecursiveMode::NonRecursive)
            .map_err(|e| TlsError::Invalid(format!("cannot watch {}: {e}", dir.display())))?;
        let store = self.clone();
        tokio::spawn(async move {
            let mut resync = tokio::time::interval(Duration::from_secs(60));
            resync.tick().await;
            loop {
                tokio::select! {
                    ev = rx.recv() => {
                        if ev.is_none() { return; }
                        // Writers replace three files; let them finish.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        while rx.try_recv().is_ok() {}
                    }
                    _ = resync.tick() => {}
                }
                let (d, td) = (dir.clone(), trust_domain.clone());
                let loaded = tokio::task::spawn_blocking(move || Identity::load(&d, &td)).await;
                match loaded {
                    Ok(Ok(id)) => {
                        let same =
                            store.current().is_some_and(|cur| cur.serial == id.serial && cur.spiffe_id == id.spiffe_id);
                        if !same && let Err(e) = store.install(id) {
                            tracing::error!(error = %e, "rotated identity rejected; keeping the previous one");
                        }
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "rotated identity rejected; keeping the previous one"),
                    Err(e) => tracing::error!(error = %e, "identity reload failed"),
                }
            }
        });
        Ok(watcher)
    }
}

/// Serves the current certificate to every handshake (server and client side).
#[derive(Debug)]
struct Resolver(Arc<IdentityStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|id| id.certified.clone())
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.current().map(|id| id.certified.clone())
    }

    fn has_certs(&self) -> bool {
        self.0.current().is_some()
    }
}

/// Just enough DER to read a certificate's serial number and expiry.
mod der {
    use std::time::{Duration, SystemTime};

    pub struct LeafInfo {
        pub serial: String,
        pub not_after: Option<SystemTime>,
    }

    /// (tag, content, rest) of the element at the start of `b`.
    fn element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let tag = *b.first()?;
        let first = *b.get(1)?;
        let (len, hdr) = if first < 0x80 {
            (usize::from(first), 2)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 {
                return None;
            }
            let mut len = 0usize;
            for i in 0..n {
                len = (len << 8) | usize::from(*b.get(2 + i)?);
            }
            (len, 2 + n)
        };
        let end = hdr.checked_add(len)?;
        Some((tag, b.get(hdr..end)?, b.get(end..)?))
    }

    pub fn leaf_info(cert: &[u8]) -> Option<LeafInfo> {
        let (_, cert, _) = element(cert)?; // Certificate SEQUENCE
        let (_, tbs, _) = element(cert)?; // TBSCertificate SEQUENCE
        let (tag, _, after_first) = element(tbs)?;
        // An explicit [0] version comes first when present; then the serial.
        let (_, serial_bytes, rest) = if tag == 0xa0 { element(after_first)? } else { element(tbs)? };
        let serial = serial_bytes.iter().map(|b| format!("{b:02x}")).collect();
        let (_, _sig_alg, rest) = element(rest)?;
        let (_, _issuer, rest) = element(rest)?;
        let (_, validity, _) = element(rest)?;
        let (_, _not_before, rest) = element(validity)?;
        let (tag, not_after, _) = element(rest)?;
        Some(LeafInfo { serial, not_after: time(tag, not_after) })
    }

    /// UTCTime (0x17, YYMMDDHHMMSSZ) or GeneralizedTime (0x18, YYYYMMDDHHMMSSZ).
    fn time(tag: u8, v: &[u8]) -> Option<SystemTime> {
        let s = std::str::from_utf8(v).ok()?;
        let s = s.strip_suffix('Z')?;
        let (year, rest) = match tag {
            0x17 => {
                let yy: i64 = s.get(0..2)?.parse().ok()?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, s.get(2..)?)
            }
            0x18 => (s.get(0..4)?.parse().ok()?, s.get(4..)?),
            _ => return None,
        };
        let num = |r: std::ops::Range<usize>| -> Option<i64> { rest.get(r)?.parse().ok() };
        let (mo, d, h, mi, se) = (num(0..2)?, num(2..4)?, num(4..6)?, num(6..8)?, num(8..10)?);
        // Days from civil (Howard Hinnant).
        let y = if mo <= 2 { year - 1 } else { year };
        let era = y.div_euclid(400);
        let yoe = y - era * 400;
        let mp = if mo > 2 { mo - 3 } else { mo + 9 };
        let doy = (153 * mp + 2) / 5 + d - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        let days = era * 146_097 + doe - 719_468;
        let secs = days * 86_400 + h * 3600 + mi * 60 + se;
        u64::try_from(secs).ok().map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
    }
}

/// How a cluster's connections are secured.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum UpstreamTls {
    #[default]
    Plain,
    /// mTLS with the workload identity (`ISTIO_MUTUAL`, or auto-mTLS).
    IstioMutual {
        /// Istio's SNI: `outbound_.<port>_.<subset>_.<host>`.
        sni: String,
        /// Accepted server SPIFFE IDs; empty accepts the trust domain.
        expected: Vec<String>,
        trust_domain: String,
        /// Auto-mTLS: only these endpoints (labelled
        /// `security.istio.io/tlsMode: istio`) get TLS. `None`: all of them.
        only: Option<Vec<std::net::SocketAddr>>,
    },
    /// TLS to a non-mesh upstream (`SIMPLE`, `MUTUAL`).
    Originate(OriginateTls),
}

/// Opens TCP, then TLS when the cluster's policy says so for the endpoint.
pub struct MeshConnect {
    config: Arc<rustls::ClientConfig>,
    /// Istio's SNI; `None` when it is not a valid DNS name (a long subset or
    /// host, a wildcard host), in which case no SNI is sent — the server's
    /// identity is checked by SPIFFE ID either way, never skipped.
    sni: Option<rustls_pki_types::ServerName<'static>>,
    only: Option<Vec<std::net::SocketAddr>>,
}

impl MeshConnect {
    pub fn new(store: &Arc<IdentityStore>, tls: &UpstreamTls, h2: bool) -> Option<Self> {
        let UpstreamTls::IstioMutual { sni, expected, trust_domain, only } = tls else { return None };
        let name = rustls_pki_types::ServerName::try_from(sni.clone()).ok();
        if name.is_none() {
            tracing::debug!(%sni, "not a valid SNI name; mTLS handshakes will send none");
        }
        Some(MeshConnect {
            config: store.client_config(expected.clone(), trust_domain.clone(), h2),
            sni: name,
            only: only.clone(),
        })
    }
}

impl crate::upstream::pool::Connect for MeshConnect {
    fn connect(
        &self,
        addr: std::net::SocketAddr,
        settings: &crate::upstream::PoolSettings,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<crate::upstream::pool::BoxIo>> + Send>>
    {
        let tcp = crate::upstream::pool::Connect::connect(&crate::upstream::pool::TcpConnect, addr, settings);
        let tls = self.only.as_ref().is_none_or(|only| only.contains(&addr));
        // An IP address as the name makes rustls send no SNI.
        let sni = self.sni.clone().unwrap_or(rustls_pki_types::ServerName::IpAddress(addr.ip().into()));
        let config = self.config.clone();
        Box::pin(async move {
            let io = tcp.await?;
            if !tls {
                return Ok(io);
            }
            let stream = tokio_rustls::TlsConnector::from(config).connect(sni, io).await?;
            Ok(Box::new(stream) as crate::upstream::pool::BoxIo)
        })
    }
}

/// `DestinationRule` `tls.mode: SIMPLE` or `MUTUAL` towards a non-mesh
/// upstream: CA and client certificate from files.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OriginateTls {
    /// SNI and the name verified (`sni`, else the service host).
    pub server_name: String,
    pub ca: Option<PathBuf>,
    /// Accepted server SANs (DNS or URI); when set they replace the
    /// hostname check.
    pub sans: Vec<String>,
    pub insecure: bool,
    /// MUTUAL: the client certificate and key.
    pub client: Option<(PathBuf, PathBuf)>,
    pub h2: bool,
}

/// Debian's bundle of public CAs, used when `caCertificates` is not given.
const SYSTEM_CA_FILES: [&str; 2] = ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"];

impl OriginateTls {
    /// Builds the client config, reading the files (errors name them).
    pub fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let provider = crypto();
        let mut roots = RootCertStore::empty();
        let ca_files: Vec<PathBuf> = match &self.ca {
            Some(p) => vec![p.clone()],
            None => SYSTEM_CA_FILES.iter().map(PathBuf::from).filter(|p| p.exists()).take(1).collect(),
        };
        for f in &ca_files {
            let bytes = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
            for c in CertificateDer::pem_slice_iter(&bytes) {
                let c = c.map_err(|e| format!("{}: {e}", f.display()))?;
                let _ = roots.add(c);
            }
        }
        if roots.is_empty() && !self.insecure {
            return Err("no CA certificates to verify the upstream (set caCertificates)".into());
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?;
        let verifier: Arc<dyn rustls::client::danger::ServerCertVerifier> = if self.insecure {
            Arc::new(verify::AnyServer(provider.clone()))
        } else if !self.sans.is_empty() {
            Arc::new(verify::SanServerVerifier::new(Arc::new(roots), self.sans.clone(), provider.clone()))
        } else {
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| e.to_string())?
        };
        let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
        let mut cfg = match &self.client {
            Some((cert, key)) => {
                let cb = std::fs::read(cert).map_err(|e| format!("{}: {e}", cert.display()))?;
                let chain: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(&cb).collect();
                let chain = chain.map_err(|e| format!("{}: {e}", cert.display()))?;
                let kb = std::fs::read(key).map_err(|e| format!("{}: {e}", key.display()))?;
                let k = PrivateKeyDer::from_pem_slice(&kb).map_err(|e| format!("{}: {e}", key.display()))?;
                builder.with_client_auth_cert(chain, k).map_err(|e| format!("{}: {e}", key.display()))?
            }
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = if self.h2 { vec![b"h2".to_vec()] } else { vec![b"http/1.1".to_vec()] };
        Ok(Arc::new(cfg))
    }
}

/// TLS origination for `SIMPLE`/`MUTUAL` clusters.
pub struct OriginateConnect {
    config: Result<Arc<rustls::ClientConfig>, String>,
    name: Option<rustls_pki_types::ServerName<'static>>,
}

impl OriginateConnect {
    pub fn new(t: &OriginateTls) -> Self {
        OriginateConnect {
            config: t.client_config(),
            name: rustls_pki_types::ServerName::try_from(t.server_name.clone()).ok(),
        }
    }
}

impl crate::upstream::pool::Connect for OriginateConnect {
    fn connect(
        &self,
        addr: std::net::SocketAddr,
        settings: &crate::upstream::PoolSettings,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<crate::upstream::pool::BoxIo>> + Send>>
    {
        let tcp = crate::upstream::pool::Connect::connect(&crate::upstream::pool::TcpConnect, addr, settings);
        let (config, name) = (self.config.clone(), self.name.clone());
        Box::pin(async move {
            let config = config.map_err(std::io::Error::other)?;
            let name = name.ok_or_else(|| std::io::Error::other("invalid TLS server name"))?;
            let io = tcp.await?;
            let stream = tokio_rustls::TlsConnector::from(config).connect(name, io).await?;
            Ok(Box::new(stream) as crate::upstream::pool::BoxIo)
        })
    }
}
