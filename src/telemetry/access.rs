//! The access log: one line per request to stdout, JSON or text. Lines go
//! through a bounded queue to a writer thread, so a slow stdout never blocks
//! the data path; when the queue is full, lines are dropped and counted.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::SystemTime;

use serde_json::json;

/// Lines buffered between the data path and the writer thread.
const QUEUE_LINES: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

struct Log {
    tx: SyncSender<String>,
    format: Format,
}

static LOG: OnceLock<Log> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Starts the writer; later calls are ignored. Without it nothing is logged.
pub fn init(format: Format) {
    LOG.get_or_init(|| {
        let (tx, rx) = sync_channel::<String>(QUEUE_LINES);
        let spawned = std::thread::Builder::new().name("access-log".into()).spawn(move || {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            while let Ok(line) = rx.recv() {
                let _ = out.write_all(line.as_bytes());
                // Flush whenever the queue is drained, batching under load.
                let mut more = rx.try_iter();
                for line in more.by_ref() {
                    let _ = out.write_all(line.as_bytes());
                }
                let _ = out.flush();
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the access log writer");
        }
        Log { tx, format }
    });
}

/// Whether requests should gather access-log fields.
pub fn enabled() -> bool {
    LOG.get().is_some()
}

/// Lines dropped because the writer fell behind.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// One request, as logged.
#[derive(Debug, Default)]
pub struct Entry {
    pub start: Option<SystemTime>,
    pub method: String,
    pub path: String,
    pub protocol: &'static str,
    pub status: u16,
    pub flags: &'static str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration_ms: u64,
    pub upstream_service_time_ms: Option<u64>,
    pub upstream_host: Option<String>,
    pub cluster: Option<String>,
    pub route: Option<String>,
    pub authority: String,
    pub request_id: String,
    pub user_agent: String,
    pub peer: String,
    pub peer_principal: Option<String>,
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Queues one line; never blocks.
pub fn log(e: Entry) {
    let Some(log) = LOG.get() else { return };
    let start = e.start.map(rfc3339).unwrap_or_default();
    let line = match log.format {
        Format::Json => {
            let v = json!({
                "start_time": start,
                "method": e.method,
                "path": e.path,
                "protocol": e.protocol,
                "response_code": e.status,
                "response_flags": e.flags,
                "bytes_received": e.bytes_received,
                "bytes_sent": e.bytes_sent,
                "duration": e.duration_ms,
                "upstream_service_time": e.upstream_service_time_ms,
                "upstream_host": e.upstream_host,
                "upstream_cluster": e.cluster,
                "route_name": e.route,
                "authority": e.authority,
                "request_id": e.request_id,
                "user_agent": e.user_agent,
                "downstream_remote_address": e.peer,
                "downstream_peer_principal": e.peer_principal,
            });
            format!("{v}\n")
        }
        // Envoy's default format, as Istio prints it.
        Format::Text => {
            let dash = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
            let mut l = String::with_capacity(256);
            let _ = writeln!(
                l,
                "[{start}] \"{} {} {}\" {} {} {} {} {} {} \"{}\" \"{}\" \"{}\" \"{}\" \"{}\" {} {} {} -",
                e.method,
                e.path,
                e.protocol,
                e.status,
                e.flags,
                e.bytes_received,
                e.bytes_sent,
                e.duration_ms,
                e.upstream_service_time_ms.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
                e.peer,
                if e.user_agent.is_empty() { "-" } else { &e.user_agent },
                e.request_id,
                e.authority,
                dash(&e.upstream_host),
                dash(&e.cluster),
                dash(&e.route),
                dash(&e.peer_principal),
            );
            l
        }
    };
    match log.tx.try_send(line) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_764_558_123_456);
        assert_eq!(rfc3339(t), "2025-12-01T03:02:03.456Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }
}
