//! Configuration: the Istio API model, loading from files, validation,
//! compilation into an immutable [`Snapshot`](crate::snapshot::Snapshot), and
//! watching for changes.

pub mod compile;
pub mod load;
pub mod model;
pub mod validate;
pub mod watch;

use std::fmt;
use std::path::PathBuf;

pub use model::{Kind, Spec};

/// Where a resource came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub file: PathBuf,
    /// 1-based line where the resource's YAML document starts.
    pub line: usize,
}

/// One parsed Istio resource with its namespace resolved.
#[derive(Debug, Clone)]
pub struct Resource {
    pub source: Source,
    pub api_version: String,
    pub kind: Kind,
    /// `metadata.namespace`, or the proxy's `--namespace` when absent.
    pub namespace: String,
    pub name: String,
    pub meta: model::ObjectMeta,
    pub spec: Spec,
    /// Maps field paths such as `spec.http[0].route[1].weight` to YAML lines,
    /// as far as the loader could tell.
    pub lines: LineIndex,
}

impl Resource {
    /// `KIND NAMESPACE/NAME`, as diagnostics print it.
    pub fn display_name(&self) -> String {
        format!("{} {}/{}", self.kind, self.namespace, self.name)
    }

    /// A diagnostic about this resource at `path` (e.g. `spec.http[0].route`).
    pub fn diag(&self, severity: Severity, path: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        let path = path.into();
        let line = self.lines.line_of(&path).unwrap_or(self.source.line);
        Diagnostic {
            severity,
            file: Some(self.source.file.clone()),
            line: Some(line),
            resource: Some(self.display_name()),
            path,
            message: message.into(),
        }
    }

    pub fn error(&self, path: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        self.diag(Severity::Error, path, message)
    }

    pub fn warning(&self, path: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        self.diag(Severity::Warning, path, message)
    }
}

/// Field path → line numbers for one resource document.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LineIndex {
    /// Sorted by path for binary search.
    entries: Vec<(String, usize)>,
}

impl LineIndex {
    pub fn new(mut entries: Vec<(String, usize)>) -> Self {
        entries.sort();
        entries.dedup_by(|a, b| a.0 == b.0);
        LineIndex { entries }
    }

    /// The line of `path`, or of its nearest ancestor that has one.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Ok(i) = self.entries.binary_search_by(|(k, _)| k.as_str().cmp(p)) {
                return Some(self.entries[i].1);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Warning,
    Error,
}

/// A validation finding, printed as
/// `FILE:LINE: KIND NAMESPACE/NAME: spec.path[i].field: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: Option<PathBuf>,
    pub line: Option<usize>,
    pub resource: Option<String>,
    pub path: String,
    pub message: String,
}

impl Diagnostic {
    /// A finding about a file as a whole (unreadable, not YAML).
    pub fn file_error(file: impl Into<PathBuf>, line: Option<usize>, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            file: Some(file.into()),
            line,
            resource: None,
            path: String::new(),
            message: message.into(),
        }
    }

    /// A finding about the set as a whole, not tied to a file.
    pub fn global(severity: Severity, message: impl Into<String>) -> Self {
        Diagnostic { severity, file: None, line: None, resource: None, path: String::new(), message: message.into() }
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        if let Some(file) = &self.file {
            write!(f, "{}", file.display())?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
            }
            f.write_str(": ")?;
        }
        if let Some(r) = &self.resource {
            write!(f, "{r}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// One file that contributed to a config set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub path: PathBuf,
    /// FNV-1a 64 of the bytes, hex; identifies the content in `/config_dump`.
    pub hash: String,
    pub len: usize,
}

/// The result of loading a set of paths: resources, the files read, and every
/// diagnostic found while parsing (validation adds more later).
#[derive(Debug, Clone, Default)]
pub struct LoadedSet {
    pub resources: Vec<Resource>,
    pub files: Vec<SourceFile>,
    pub diagnostics: Vec<Diagnostic>,
}

impl LoadedSet {
    /// The set's version: a hash of its files' names and contents.
    pub fn version(&self) -> String {
        let mut input = Vec::new();
        for f in &self.files {
            input.extend_from_slice(f.path.to_string_lossy().as_bytes());
            input.push(0);
            input.extend_from_slice(f.hash.as_bytes());
        }
        format!("{:016x}", fnv1a64(&input))
    }
}

/// FNV-1a 64-bit, used for content hashes and config versions (not security).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
