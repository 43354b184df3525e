//! Accepting inbound connections under a PeerAuthentication mode: STRICT
//! terminates mTLS and requires a client certificate from the trust bundle;
//! PERMISSIVE looks at the first byte (a TLS record starts with 0x16) and
//! terminates mTLS or serves plaintext on the same port; DISABLE is plaintext.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::{IdentityStore, fingerprint, spiffe_ids};
use crate::snapshot::InboundTls;
use crate::upstream::pool::BoxIo;

/// How long a connection may stay silent before its first byte tells TLS
/// from plaintext.
pub const DETECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// A verified mesh peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Full `spiffe://…` ID from the client certificate.
    pub spiffe_id: String,
    /// Hex SHA-256 of the client certificate (XFCC `Hash=`).
    pub cert_hash: String,
}

impl Peer {
    /// The principal as AuthorizationPolicy writes it (no `spiffe://`).
    pub fn principal(&self) -> &str {
        self.spiffe_id.strip_prefix("spiffe://").unwrap_or(&self.spiffe_id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("plaintext connection refused: the port requires mTLS (STRICT)")]
    PlaintextRefused,
    #[error("no workload identity to terminate mTLS with")]
    NoIdentity,
    #[error("TLS handshake failed: {0}")]
    Handshake(std::io::Error),
    #[error("client certificate has no SPIFFE identity")]
    NoPeerIdentity,
    #[error("no data within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(std::io::Error),
}

/// Applies `mode` to a new connection: the stream to serve HTTP on, and the
/// peer's identity when the connection is mTLS.
pub async fn accept(
    stream: TcpStream,
    mode: InboundTls,
    store: Option<&Arc<IdentityStore>>,
) -> Result<(BoxIo, Option<Arc<Peer>>), AcceptError> {
    let tls = match mode {
        InboundTls::Disable => false,
        InboundTls::Strict => true,
        InboundTls::Permissive => {
            let mut first = [0u8; 1];
            match tokio::time::timeout(DETECT_TIMEOUT, stream.peek(&mut first)).await {
                Ok(Ok(0)) => false, // closed; let the server see EOF
                Ok(Ok(_)) => first[0] == TLS_HANDSHAKE,
                Ok(Err(e)) => return Err(AcceptError::Io(e)),
                Err(_) => return Err(AcceptError::Timeout(DETECT_TIMEOUT)),
            }
        }
    };
    if !tls {
        if mode == InboundTls::Strict {
            return Err(AcceptError::PlaintextRefused);
        }
        return Ok((Box::new(stream), None));
    }
    let (io, peer, _) = terminate(stream, store).await?;
    Ok((io, Some(peer)))
}

/// What a mesh peer asked to speak inside mTLS (from ALPN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inner {
    /// `istio-http/1.1`, `istio-h2`, `h2`, `http/1.1` and the like.
    Http,
    /// `istio` (Istio's TCP), or no protocol named.
    Opaque,
}

/// Terminates mTLS on `stream`: the decrypted stream, the verified peer, and
/// what the peer will speak inside.
pub async fn terminate(
    stream: TcpStream,
    store: Option<&Arc<IdentityStore>>,
) -> Result<(BoxIo, Arc<Peer>, Inner), AcceptError> {
    let config = store.and_then(|s| s.server_config()).ok_or(AcceptError::NoIdentity)?;
    let tls = tokio::time::timeout(DETECT_TIMEOUT, tokio_rustls::TlsAcceptor::from(config).accept(stream))
        .await
        .map_err(|_| AcceptError::Timeout(DETECT_TIMEOUT))?
        .map_err(AcceptError::Handshake)?;
    let (_, conn) = tls.get_ref();
    let leaf = conn.peer_certificates().and_then(|c| c.first()).ok_or(AcceptError::NoPeerIdentity)?;
    let spiffe_id = spiffe_ids(leaf).into_iter().next().ok_or(AcceptError::NoPeerIdentity)?;
    let peer = Peer { spiffe_id, cert_hash: fingerprint(leaf) };
    let inner = match conn.alpn_protocol() {
        Some(b"istio") | None => Inner::Opaque,
        Some(_) => Inner::Http,
    };
    Ok((Box::new(tls), Arc::new(peer), inner))
}
