//! Config delivered by a control plane: the subscription protocol (v1),
//! the proxy's side (`remora run --control-plane URL`) and the server
//! (`remora control-plane`). The protocol is documented in
//! `docs/control-plane.md`.
//!
//! One long-lived HTTP/2 request per proxy: `POST /v1/subscribe`. Both
//! bodies are streams of JSON messages, one per line. The proxy opens with
//! `hello` (who it is and what it serves), the control plane answers with a
//! `config` (a version and the YAML resource set scoped to that proxy)
//! whenever that proxy's set changes, and the proxy answers each with `ack`
//! or `nack` and its errors.

pub mod client;
pub mod scope;
pub mod server;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub const SUBSCRIBE_PATH: &str = "/v1/subscribe";
pub const PROXIES_PATH: &str = "/v1/proxies";
pub const STATUS_PATH: &str = "/v1/status";
/// The protocol version a `hello` carries; a control plane refuses others.
pub const PROTOCOL_VERSION: u32 = 1;
pub const CONTENT_TYPE: &str = "application/x-ndjson";
/// Longest message accepted on the stream (a resource set, as config files).
pub const MAX_MESSAGE: usize = crate::config::load::MAX_FILE_BYTES as usize;

/// Who a subscribing proxy is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    /// The pod (or host) name; unique among the control plane's proxies.
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub workload: Option<String>,
    /// remora's version.
    pub proxy_version: String,
    /// The control-plane version the proxy serves now (from its cache), if any.
    #[serde(default)]
    pub serving: Option<String>,
}

/// Proxy → control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Upstream {
    Hello(Hello),
    /// The set of this version is applied.
    Ack {
        version: String,
    },
    /// The set of this version was refused; the proxy keeps its last good one.
    Nack {
        version: String,
        errors: Vec<String>,
    },
}

/// Control plane → proxy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Downstream {
    /// The proxy's whole resource set (Istio YAML), replacing the previous one.
    Config { version: String, resources: String },
    /// The subscription is refused (the stream ends after this).
    Error { message: String },
}

/// One message as a line of the stream.
pub fn encode<T: Serialize>(msg: &T) -> Bytes {
    let mut v = serde_json::to_vec(msg).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Splits a byte stream into lines, refusing lines over [`MAX_MESSAGE`].
#[derive(Default)]
pub struct Lines {
    buf: BytesMut,
}

impl Lines {
    /// Adds bytes; returns the complete lines they finish.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Bytes>, String> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let line = self.buf.split_to(i + 1).freeze().slice(..i);
            if !line.is_empty() {
                out.push(line);
            }
        }
        if self.buf.len() > MAX_MESSAGE {
            return Err(format!("a message over {MAX_MESSAGE} bytes"));
        }
        Ok(out)
    }
}

/// A body fed by a channel: each item is one frame; the body ends when
/// every sender is gone.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl ChannelBody {
    pub fn new(rx: mpsc::Receiver<Bytes>) -> Self {
        ChannelBody { rx }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_lines() {
        let hello = Upstream::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            name: "reviews-v1-abc".into(),
            namespace: "bookinfo".into(),
            labels: [("app".to_string(), "reviews".to_string())].into(),
            workload: Some("reviews-v1".into()),
            proxy_version: "0.1.0".into(),
            serving: None,
        });
        let mut lines = Lines::default();
        let wire = [encode(&hello), encode(&Upstream::Ack { version: "v1".into() })].concat();
        // Split anywhere: lines come out whole.
        let (a, b) = wire.split_at(17);
        let mut got = lines.push(a).unwrap();
        got.extend(lines.push(b).unwrap());
        assert_eq!(got.len(), 2);
        assert_eq!(serde_json::from_slice::<Upstream>(&got[0]).unwrap(), hello);
        let text =
            String::from_utf8(encode(&Downstream::Config { version: "7".into(), resources: "a: 1\n".into() }).to_vec());
        assert_eq!(text.unwrap(), "{\"type\":\"config\",\"version\":\"7\",\"resources\":\"a: 1\\n\"}\n");
    }
}
