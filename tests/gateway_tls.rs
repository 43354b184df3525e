//! HTTPS gateways: SIMPLE and MUTUAL from files, certificates chosen by SNI,
//! httpsRedirect, minProtocolVersion, HTTP/2 via ALPN, and certificate reload.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::certs::{Ca, Workload};
use support::*;

/// A TLS client: SNI `sni`, trusting `ca_pem`, optionally presenting a
/// client certificate, offering `alpn`. Returns the status, the body and the
/// server certificate it saw.
async fn https_get(
    port: u16,
    sni: &str,
    ca_pem: &str,
    client: Option<&Workload>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Result<(u16, String, Vec<u8>), String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut cfg = match client {
        Some(w) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(w.cert_pem.as_bytes()).map(Result::unwrap).collect();
            let key = PrivateKeyDer::from_pem_slice(w.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(sni.to_string()).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let server_cert =
        tls.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let req = http::Request::get(format!("https://{sni}/path"))
        .header("host", sni)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = if h2 {
        let (mut tx, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        tx.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = req;
        *req.uri_mut() = "/path".parse().unwrap();
        tx.send_request(req).await.map_err(|e| e.to_string())?
    };
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).to_string(), server_cert))
}

const BOTH: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

fn write_pair(dir: &Path, name: &str, w: &Workload) -> (String, String) {
    let (c, k) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&c, &w.cert_pem).unwrap();
    std::fs::write(&k, &w.key_pem).unwrap();
    (c.display().to_string(), k.display().to_string())
}

fn https_gateway(port: u16, servers: &str, upstream: std::net::SocketAddr) -> String {
    format!(
        "{}apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata:\n  name: gw\nspec:\n  servers:\n{servers}---\n{}",
        service_entry("svc", "svc.test", 80, "HTTP", &[(upstream, "v1")]),
        gateway_vs("vs", "gw", "  - route:\n    - destination:\n        host: svc.test\n")
    )
    .replace("PORT", &port.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_tls_chooses_the_certificate_by_sni_and_speaks_h2() {
    let ca = Ca::new("gateway ca");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (ca.server(&["a.example.com"]), ca.server(&["b.example.com"]));
    let (ac, ak) = write_pair(dir.path(), "a", &a);
    let (bc, bk) = write_pair(dir.path(), "b", &b);
    let upstream = echo("v1").await;
    let port = free_port();
    let servers = format!(
        "  - port: {{number: PORT, name: https-a, protocol: HTTPS}}\n    bind: 127.0.0.1\n    hosts: [a.example.com]\n    tls: {{mode: SIMPLE, serverCertificate: {ac}, privateKey: {ak}}}\n  - port: {{number: PORT, name: https-b, protocol: HTTPS}}\n    bind: 127.0.0.1\n    hosts: [b.example.com]\n    tls: {{mode: SIMPLE, serverCertificate: {bc}, privateKey: {bk}}}\n"
    );
    let _p = TestProxy::start(&https_gateway(port, &servers, upstream)).await;
    let (status, body, cert) = https_get(port, "a.example.com", &ca.pem(), None, &[b"http/1.1"], BOTH).await.unwrap();
    assert_eq!((status, version_of(&body).as_str()), (200, "v1"));
    assert_eq!(cert, a.der);
    let j = echo_json(&body);
    assert_eq!(j["headers"]["x-forwarded-proto"], "https");
    let (status, body, cert) =
        https_get(port, "b.example.com", &ca.pem(), None, &[b"h2", b"http/1.1"], BOTH).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(cert, b.der);
    assert_eq!(echo_json(&body)["headers"]["x-forwarded-proto"], "https");
    // Plaintext to the HTTPS port is not served.
    assert!(client().get(format!("http://127.0.0.1:{port}/")).send().await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_trusted_client_certificate() {
    let ca = Ca::new("gateway ca");
    let clients = Ca::new("client ca");
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = write_pair(dir.path(), "srv", &ca.server(&["secure.example.com"]));
    let client_ca = dir.path().join("clients.pem");
    std::fs::write(&client_ca, clients.pem()).unwrap();
    let upstream = echo("v1").await;
    let port = free_port();
    let servers = format!(
        "  - port: {{number: PORT, name: https, protocol: HTTPS}}\n    bind: 127.0.0.1\n    hosts: [\"*\"]\n    tls: {{mode: MUTUAL, serverCertificate: {c}, privateKey: {k}, caCertificates: {}}}\n",
        client_ca.display()
    );
    let _p = TestProxy::start(&https_gateway(port, &servers, upstream)).await;
    let good = clients.server(&["client.example.com"]);
    let (status, _, _) =
        https_get(port, "secure.example.com", &ca.pem(), Some(&good), &[b"http/1.1"], BOTH).await.unwrap();
    assert_eq!(status, 200);
    assert!(
        https_get(port, "secure.example.com", &ca.pem(), None, &[b"http/1.1"], BOTH).await.is_err(),
        "no client certificate"
    );
    let rogue = Ca::new("rogue").server(&["client.example.com"]);
    assert!(
        https_get(port, "secure.example.com", &ca.pem(), Some(&rogue), &[b"http/1.1"], BOTH).await.is_err(),
        "untrusted client"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_redirect_and_min_protocol_version() {
    let ca = Ca::new("gateway ca");
    let dir = tempfile::tempdir().unwrap();
    let (c, k) = write_pair(dir.path(), "srv", &ca.server(&["shop.example.com"]));
    let upstream = echo("v1").await;
    let (http_port, https_port) = (free_port(), free_port());
    let servers = format!(
        "  - port: {{number: {http_port}, name: http, protocol: HTTP}}\n    bind: 127.0.0.1\n    hosts: [shop.example.com]\n    tls: {{httpsRedirect: true}}\n  - port: {{number: PORT, name: https, protocol: HTTPS}}\n    bind: 127.0.0.1\n    hosts: [shop.example.com]\n    tls: {{mode: SIMPLE, serverCertificate: {c}, privateKey: {k}, minProtocolVersion: TLSV1_3}}\n"
    );
    let _p = TestProxy::start(&https_gateway(https_port, &servers, upstream)).await;
    let resp = no_redirect_client()
        .get(format!("http://127.0.0.1:{http_port}/cart?id=1"))
        .header("host", "shop.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 301);
    assert_eq!(resp.headers()["location"], "https://shop.example.com/cart?id=1");
    let tls12: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];
    assert!(
        https_get(https_port, "shop.example.com", &ca.pem(), None, &[b"http/1.1"], tls12).await.is_err(),
        "TLS 1.2 refused"
    );
    assert_eq!(https_get(https_port, "shop.example.com", &ca.pem(), None, &[b"http/1.1"], BOTH).await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_from_files() {
    let ca = Ca::new("gateway ca");
    let dir = tempfile::tempdir().unwrap();
    let first = ca.server(&["app.example.com"]);
    let (c, k) = write_pair(dir.path(), "srv", &first);
    let upstream = echo("v1").await;
    let port = free_port();
    let servers = format!(
        "  - port: {{number: PORT, name: https, protocol: HTTPS}}\n    bind: 127.0.0.1\n    hosts: [\"*\"]\n    tls: {{mode: SIMPLE, serverCertificate: {c}, privateKey: {k}}}\n"
    );
    let _p = TestProxy::start(&https_gateway(port, &servers, upstream)).await;
    assert_eq!(https_get(port, "app.example.com", &ca.pem(), None, &[b"http/1.1"], BOTH).await.unwrap().2, first.der);
    // A broken key is rejected; the old certificate keeps serving.
    std::fs::write(&k, "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(5_500)).await;
    assert_eq!(https_get(port, "app.example.com", &ca.pem(), None, &[b"http/1.1"], BOTH).await.unwrap().2, first.der);
    let second = ca.server(&["app.example.com"]);
    write_pair(dir.path(), "srv", &second);
    wait_until(Duration::from_secs(12), "new certificate served", || {
        let (ca_pem, der) = (ca.pem(), second.der.clone());
        async move {
            https_get(port, "app.example.com", &ca_pem, None, &[b"http/1.1"], BOTH).await.is_ok_and(|r| r.2 == der)
        }
    })
    .await;
}

#[test]
fn missing_or_broken_files_reject_the_config() {
    let yaml = https_gateway(
        8443,
        "  - port: {number: PORT, name: https, protocol: HTTPS}\n    hosts: [\"*\"]\n    tls: {mode: SIMPLE, serverCertificate: /nonexistent/cert.pem, privateKey: /nonexistent/key.pem}\n",
        "127.0.0.1:1".parse().unwrap(),
    );
    let set = remora::config::load::load_str(Path::new("t.yaml"), &yaml, "default");
    let errs =
        remora::config::compile::compile(&set, &Default::default(), &remora::upstream::Registry::new()).unwrap_err();
    assert!(errs.iter().any(|e| e.to_string().contains("/nonexistent/cert.pem")), "{errs:#?}");
}

/// A TLS upstream (HTTP/1.1 over rustls) that answers with whether the client
/// presented a certificate.
async fn tls_upstream(server: &Workload, client_ca: Option<&str>) -> std::net::SocketAddr {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(server.cert_pem.as_bytes()).map(Result::unwrap).collect();
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone()).with_protocol_versions(BOTH).unwrap();
    let cfg = match client_ca {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(c.unwrap()).unwrap();
            }
            let v =
                rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
            builder.with_client_cert_verifier(v).with_single_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth().with_single_cert(chain, key).unwrap(),
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(s).await else { return };
                let has_cert = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                let svc = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| async move {
                    let body = if has_cert { "tls with client cert" } else { "tls" };
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(body),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_mutual_tls_origination() {
    let ca = Ca::new("upstream ca");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let server = ca.server(&["backend.example.com"]);
    let plain = tls_upstream(&server, None).await;
    let clients = Ca::new("client ca");
    let mutual = tls_upstream(&server, Some(&clients.pem())).await;
    let (cc, ck) = write_pair(dir.path(), "client", &clients.server(&["proxy.example.com"]));
    let port = free_port();
    let route = |prefix: &str, host: &str| {
        format!(
            "  - match:\n    - uri:\n        prefix: {prefix}\n    route:\n    - destination:\n        host: {host}\n"
        )
    };
    let dr = |name: &str, host: &str, tls: String| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {name}\nspec:\n  host: {host}\n  trafficPolicy:\n    tls:\n{tls}---\n"
        )
    };
    let ca_path = ca_file.display();
    let yaml = format!(
        "{}{}{}{}{}{}{}{}{}",
        service_entry("simple", "simple.test", 443, "HTTP", &[(plain, "v1")]),
        dr(
            "simple",
            "simple.test",
            format!("      mode: SIMPLE\n      caCertificates: {ca_path}\n      sni: backend.example.com\n")
        ),
        service_entry("wrongname", "wrongname.test", 443, "HTTP", &[(plain, "v1")]),
        dr("wrongname", "wrongname.test", format!("      mode: SIMPLE\n      caCertificates: {ca_path}\n")),
        service_entry("insecure", "insecure.test", 443, "HTTP", &[(plain, "v1")]),
        dr("insecure", "insecure.test", "      mode: SIMPLE\n      insecureSkipVerify: true\n".into()),
        service_entry("mutual", "mutual.test", 443, "HTTP", &[(mutual, "v1")]),
        dr(
            "mutual",
            "mutual.test",
            format!(
                "      mode: MUTUAL\n      caCertificates: {ca_path}\n      sni: backend.example.com\n      clientCertificate: {cc}\n      privateKey: {ck}\n"
            )
        ),
        gateway("gw", port)
    ) + &gateway_vs(
        "vs",
        "gw",
        &[
            route("/simple", "simple.test"),
            route("/wrongname", "wrongname.test"),
            route("/insecure", "insecure.test"),
            route("/mutual", "mutual.test"),
        ]
        .concat(),
    );
    let _p = TestProxy::start(&yaml).await;
    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    assert_eq!(get(&c, &format!("{base}/simple"), &[]).await, (200, "tls".to_string()));
    // The name checked is the service host when no sni is set: it is not on
    // the certificate, so the handshake fails.
    assert_eq!(get(&c, &format!("{base}/wrongname"), &[]).await.0, 503);
    assert_eq!(get(&c, &format!("{base}/insecure"), &[]).await, (200, "tls".to_string()));
    assert_eq!(get(&c, &format!("{base}/mutual"), &[]).await, (200, "tls with client cert".to_string()));
}
