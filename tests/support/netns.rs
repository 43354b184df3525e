//! Network namespaces a test creates for itself (deleted on drop), threads
//! that open sockets inside them, and the skip-or-fail rule for tests that
//! need root and iproute2/iptables (`REMORA_REQUIRE_NETNS=1`, as `.ci/run`
//! sets after installing them, turns a skip into a failure).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::time::Duration;

/// True when the test runs as root (effective UID 0, from /proc).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// Skips `test` saying why or, when namespaces are required, fails. A
/// missing permission (not root) is never a failure: CI runs as root.
pub fn skip(test: &str, why: &str) {
    if std::env::var("REMORA_REQUIRE_NETNS").is_ok_and(|v| v == "1") && !why.contains("permission") {
        panic!("{test}: required (REMORA_REQUIRE_NETNS=1): {why}");
    }
    let line = format!("\nSKIPPED {test}: {why}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
}

/// Why a namespace test cannot run here, if it cannot.
pub fn unavailable(tools: &[&str]) -> Option<String> {
    if !is_root() {
        return Some("needs root to create network namespaces (permission)".into());
    }
    for tool in tools {
        if super::which(tool).is_none() {
            return Some(format!("`{tool}` is not installed; .ci/run installs iproute2 and iptables"));
        }
    }
    None
}

/// A network namespace of the test's own, deleted on drop.
pub struct Netns(pub String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

impl Netns {
    /// Creates the namespace, with its loopback up.
    pub fn create(name: &str) -> Result<Netns, String> {
        let add = Command::new("ip").args(["netns", "add", name]).output().map_err(|e| e.to_string())?;
        if !add.status.success() {
            return Err(format!(
                "cannot create a network namespace (permission?): {}",
                String::from_utf8_lossy(&add.stderr).trim()
            ));
        }
        let ns = Netns(name.to_string());
        ns.ok("ip", &["link", "set", "lo", "up"]);
        Ok(ns)
    }

    /// Runs a command inside the namespace.
    pub fn run(&self, cmd: &str, args: &[&str]) -> Output {
        Command::new("ip").args(["netns", "exec", &self.0, cmd]).args(args).output().unwrap()
    }

    /// Runs a command inside the namespace and asserts it succeeded.
    pub fn ok(&self, cmd: &str, args: &[&str]) -> String {
        let out = self.run(cmd, args);
        assert!(
            out.status.success(),
            "{cmd} {args:?} in {}: {}{}",
            self.0,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a thread inside the namespace: sockets it opens belong to
    /// the namespace, wherever they are used afterwards.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }

    /// A tokio listener bound inside the namespace (call within a runtime).
    pub fn listen(&self, addr: SocketAddr) -> tokio::net::TcpListener {
        let std = self.enter(move || std::net::TcpListener::bind(addr)).unwrap();
        std.set_nonblocking(true).unwrap();
        tokio::net::TcpListener::from_std(std).unwrap()
    }

    /// A blocking TCP connection made from inside the namespace.
    pub fn connect(&self, addr: SocketAddr) -> std::io::Result<std::net::TcpStream> {
        self.enter(move || {
            let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.set_write_timeout(Some(Duration::from_secs(10)))?;
            Ok(s)
        })
    }

    /// One HTTP/1.1 request from inside the namespace, as an app with no
    /// proxy settings makes it: status and body.
    pub fn http_get(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> std::io::Result<(u16, String)> {
        let mut s = self.connect(addr)?;
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)?;
        parse_response(&raw)
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {:?}", String::from_utf8_lossy(&raw))))
    }
}

/// Status and body of a whole HTTP/1.1 response (content-length, chunked, or
/// up to the close).
fn parse_response(raw: &[u8]) -> Option<(u16, String)> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Some((status, body.to_string()));
    }
    let mut out = String::new();
    let mut rest = body;
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let n = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if n == 0 {
            return Some((status, out));
        }
        out.push_str(after.get(..n)?);
        rest = after.get(n + 2..)?;
    }
}

/// A child process killed (and reaped) on drop.
pub struct Child(pub std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
