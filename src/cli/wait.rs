//! `remora wait`: returns once the proxy answers ready, for a container's
//! `postStart` hook (so the app starts only after its sidecar can carry its
//! traffic) and for scripts. Mirrors `pilot-agent wait`.

use std::time::Duration;

use clap::Args;
use http::{Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct WaitArgs {
    /// Readiness URL to poll (plain HTTP).
    #[arg(long, default_value = "http://127.0.0.1:15021/healthz/ready")]
    pub url: Uri,
    /// Give up after this long and exit 1.
    #[arg(long, value_parser = crate::config::model::parse_duration, default_value = "60s")]
    pub timeout: Duration,
    /// Time between attempts.
    #[arg(long, value_parser = crate::config::model::parse_duration, default_value = "500ms")]
    pub period: Duration,
}

/// One attempt's answer: the status, or why there was none.
async fn probe(url: &Uri, limit: Duration) -> Result<StatusCode, String> {
    let host = url.host().ok_or("the URL has no host")?;
    let port = url.port_u16().unwrap_or(80);
    let authority = url.authority().map(|a| a.as_str().to_string()).unwrap_or_default();
    let path = url.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let attempt = async {
        let tcp = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(http::header::HOST, authority)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = tx.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        Ok(resp.status())
    };
    tokio::time::timeout(limit, attempt).await.map_err(|_| "no answer in time".to_string())?
}

pub fn main(args: WaitArgs) -> i32 {
    if args.url.scheme_str().is_some_and(|s| s != "http") || args.url.host().is_none() {
        eprintln!("remora wait: --url must be an http:// URL with a host, got {}", args.url);
        return super::EXIT_USAGE;
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("remora wait: cannot start the runtime: {e}");
            return 1;
        }
    };
    rt.block_on(async move {
        let deadline = Instant::now() + args.timeout;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let last = match probe(&args.url, left.min(Duration::from_secs(1)).max(Duration::from_millis(1))).await {
                Ok(s) if s.is_success() => {
                    println!("remora wait: {} is ready after {attempts} attempt(s)", args.url);
                    return 0;
                }
                Ok(s) => format!("answered {s}"),
                Err(e) => e,
            };
            if Instant::now() + args.period >= deadline {
                eprintln!(
                    "remora wait: {} not ready after {:?} ({attempts} attempts); last: {last}",
                    args.url, args.timeout
                );
                return 1;
            }
            tokio::time::sleep(args.period).await;
        }
    })
}
