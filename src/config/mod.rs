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
///
/// Every node of every resource has an entry, so the paths share one text
/// buffer rather than each taking an allocation of its own.
#[derive(Debug, Clone, Default)]
pub struct LineIndex {
    /// The paths, back to back.
    text: String,
    /// `(start, end, line)` of each path in `text`, sorted by path.
    entries: Vec<(u32, u32, u32)>,
}

impl LineIndex {
    pub fn new(entries: Vec<(String, usize)>) -> Self {
        let mut b = LineIndexBuilder::default();
        for (path, line) in &entries {
            b.push(path, *line);
        }
        b.finish()
    }

    fn path(&self, e: &(u32, u32, u32)) -> &str {
        &self.text[e.0 as usize..e.1 as usize]
    }

    /// The line of `path`, or of its nearest ancestor that has one.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Ok(i) = self.entries.binary_search_by(|e| self.path(e).cmp(p)) {
                return Some(self.entries[i].2 as usize);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

/// Collects a [`LineIndex`]; a path given twice keeps its first line.
#[derive(Default)]
pub struct LineIndexBuilder {
    index: LineIndex,
}

impl LineIndexBuilder {
    pub fn push(&mut self, path: &str, line: usize) {
        let ix = &mut self.index;
        let start = ix.text.len();
        ix.text.push_str(path);
        let (Ok(start), Ok(end), Ok(line)) = (u32::try_from(start), u32::try_from(ix.text.len()), u32::try_from(line))
        else {
            ix.text.truncate(start);
            return; // beyond any config file remora reads
        };
        ix.entries.push((start, end, line));
    }

    pub fn finish(self) -> LineIndex {
        let mut ix = self.index;
        let text = std::mem::take(&mut ix.text);
        let key = |e: &(u32, u32, u32)| &text[e.0 as usize..e.1 as usize];
        ix.entries.sort_by(|a, b| key(a).cmp(key(b)).then(a.2.cmp(&b.2)));
        ix.entries.dedup_by(|a, b| key(a) == key(b));
        ix.text = text;
        ix
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

#[cfg(test)]
mod line_index_tests {
    use super::*;

    #[test]
    fn paths_resolve_to_themselves_or_their_nearest_ancestor() {
        let ix = LineIndex::new(vec![
            ("spec.http".into(), 5),
            ("spec".into(), 4),
            ("spec.http[0].route".into(), 7),
            ("spec.http".into(), 9), // a repeated path keeps its first line
            ("spec.hosts[1]".into(), 3),
        ]);
        assert_eq!(ix.line_of("spec.http"), Some(5));
        assert_eq!(ix.line_of("spec.http[0].route[2].weight"), Some(7));
        assert_eq!(ix.line_of("spec.http[3]"), Some(5));
        assert_eq!(ix.line_of("spec.hosts[1]"), Some(3));
        assert_eq!(ix.line_of("spec.gateways"), Some(4));
        assert_eq!(ix.line_of("metadata.name"), None);
        assert_eq!(LineIndex::default().line_of("spec"), None);
    }
}
