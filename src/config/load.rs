//! Loading Istio resources from files, directories and text.
//!
//! YAML is read with `granit-parser` (the event parser underneath serde-saphyr)
//! into a small node tree that keeps the line of every key and item. That tree
//! gives each resource its [`LineIndex`] and is deserialized into the model by
//! a serde `Deserializer` that reports the field path and line of an error.
//! Parsing goes on after a bad document, so one broken resource does not hide
//! the errors of the others; a YAML syntax error skips to the next `---`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt::{self, Write as _};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Expected, IntoDeserializer, MapAccess, SeqAccess, Unexpected, Visitor,
};
use serde_saphyr::granit_parser::{self, Event, Parser, ScalarStyle, Span, Tag};

use super::model::{self, Kind, ObjectMeta, Spec};
use super::{Diagnostic, LineIndexBuilder, LoadedSet, Resource, Severity, Source, SourceFile, fnv1a64};

/// Largest config file remora reads: far above any real routing config, small
/// enough that a stray dump or image in a config directory cannot exhaust memory.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Nodes one document may expand to through aliases and merge keys. The tree
/// shares aliased nodes, but deserializing walks every expansion, so this bounds
/// the work of "billion laughs" input (Istio resources have a few hundred nodes).
const MAX_EXPANDED_NODES: usize = 1_000_000;

/// Scalar text one document may expand to through aliases: one large string
/// aliased many times would otherwise be copied into memory each time.
const MAX_EXPANDED_BYTES: usize = 64 * 1024 * 1024;

/// Nesting depth of a document; Istio resources nest about a dozen levels.
const MAX_DEPTH: usize = 64;

/// Syntax errors reported for one file before the rest of it is skipped.
const MAX_SYNTAX_ERRORS_PER_FILE: usize = 20;

/// File name extensions read from a directory (JSON is a subset of YAML).
const CONFIG_EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// API groups of Kubernetes' own resources. Documents of these groups often sit
/// next to Istio config (an app's manifests); they are skipped with a warning.
const KUBERNETES_GROUPS: [&str; 16] = [
    "",
    "apps",
    "batch",
    "autoscaling",
    "policy",
    "networking.k8s.io",
    "rbac.authorization.k8s.io",
    "apiextensions.k8s.io",
    "admissionregistration.k8s.io",
    "storage.k8s.io",
    "scheduling.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "certificates.k8s.io",
    "node.k8s.io",
    "apiregistration.k8s.io",
];

/// Kubernetes kinds recognised even without an `apiVersion`.
const KUBERNETES_KINDS: [&str; 22] = [
    "Service",
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Pod",
    "Job",
    "CronJob",
    "ConfigMap",
    "Secret",
    "Namespace",
    "ServiceAccount",
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "Ingress",
    "NetworkPolicy",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "PersistentVolumeClaim",
    "Endpoints",
];

/// Loads every `.yaml`/`.yml`/`.json` file directly inside each directory of
/// `paths` (sorted by name, hidden entries skipped) and every named file.
pub fn load_paths(paths: &[PathBuf], default_namespace: &str) -> LoadedSet {
    let mut loader = Loader::new(default_namespace);
    for path in paths {
        loader.load_path(path);
    }
    loader.finish()
}

/// Loads one YAML text as if read from `name`.
pub fn load_str(name: &Path, text: &str, default_namespace: &str) -> LoadedSet {
    let mut loader = Loader::new(default_namespace);
    if text.len() as u64 > MAX_FILE_BYTES {
        loader.file_error(name, None, too_large(text.len() as u64));
    } else {
        loader.set.files.push(source_file(name, text.as_bytes()));
        loader.load_text(name, text);
    }
    loader.finish()
}

/// Every document of a YAML stream as a plain value, with the same limits
/// as config files (for tools that rewrite manifests, like `remora inject`).
/// Empty documents are left out; any problem is returned with its line.
pub fn parse_values(text: &str) -> Result<Vec<serde_json::Value>, (usize, String)> {
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err((1, too_large(text.len() as u64)));
    }
    let mut out = Vec::new();
    for parsed in parse_stream(text) {
        match parsed {
            Parsed::Problem { line, message } => return Err((line, message)),
            Parsed::Document(root) => {
                let line = root.line;
                let v: serde_json::Value = from_node(&root).map_err(|e| (line, e.to_string()))?;
                if !v.is_null() {
                    out.push(v);
                }
            }
        }
    }
    Ok(out)
}

/// Appends `key` to a field path: `.key` for plain names, `["key"]` for keys
/// such as header names or labels that contain other characters.
pub fn push_field(path: &mut String, key: &str) {
    let simple = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if simple {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
    } else {
        path.push_str("[\"");
        for c in key.chars() {
            if c == '"' || c == '\\' {
                path.push('\\');
            }
            path.push(c);
        }
        path.push_str("\"]");
    }
}

/// `parent` joined with map key `key`, formatted as [`push_field`] does.
pub fn field_path(parent: &str, key: &str) -> String {
    let mut p = String::with_capacity(parent.len() + key.len() + 4);
    p.push_str(parent);
    push_field(&mut p, key);
    p
}

fn source_file(path: &Path, bytes: &[u8]) -> SourceFile {
    SourceFile { path: path.to_path_buf(), hash: format!("{:016x}", fnv1a64(bytes)), len: bytes.len() }
}

fn too_large(len: u64) -> String {
    format!("file is {len} bytes; remora reads config files of at most {MAX_FILE_BYTES} bytes (16 MiB)")
}

fn has_config_extension(name: &str) -> bool {
    Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| CONFIG_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

struct Loader<'a> {
    default_namespace: &'a str,
    set: LoadedSet,
}

impl<'a> Loader<'a> {
    fn new(default_namespace: &'a str) -> Self {
        Loader { default_namespace, set: LoadedSet::default() }
    }

    fn file_error(&mut self, file: &Path, line: Option<usize>, message: impl Into<String>) {
        self.set.diagnostics.push(Diagnostic::file_error(file, line, message));
    }

    fn load_path(&mut self, path: &Path) {
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) => return self.file_error(path, None, format!("cannot read: {e}")),
        };
        if !meta.is_dir() {
            return self.load_file(path, &meta);
        }
        let entries = match fs::read_dir(path) {
            Ok(entries) => entries,
            Err(e) => return self.file_error(path, None, format!("cannot read directory: {e}")),
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    self.file_error(path, None, format!("cannot read directory: {e}"));
                    continue;
                }
            };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            // Hidden entries include the `..data` and `..<timestamp>` directories of a
            // Kubernetes ConfigMap volume; the visible names are symlinks through them.
            if name.starts_with('.') || !has_config_extension(&name) {
                continue;
            }
            let file = entry.path();
            match fs::metadata(&file) {
                Ok(m) if m.is_file() => files.push((file, m)),
                Ok(_) => {}
                Err(e) => self.file_error(&file, None, format!("cannot read: {e}")),
            }
        }
        files.sort_by(|a, b| a.0.file_name().cmp(&b.0.file_name()));
        for (file, meta) in files {
            self.load_file(&file, &meta);
        }
    }

    fn load_file(&mut self, path: &Path, meta: &fs::Metadata) {
        if !meta.is_file() {
            return self.file_error(path, None, "not a regular file or directory");
        }
        if meta.len() > MAX_FILE_BYTES {
            return self.file_error(path, None, too_large(meta.len()));
        }
        let mut bytes = Vec::new();
        let read = fs::File::open(path).and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes));
        if let Err(e) = read {
            return self.file_error(path, None, format!("cannot read: {e}"));
        }
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return self.file_error(path, None, too_large(bytes.len() as u64));
        }
        self.set.files.push(source_file(path, &bytes));
        match std::str::from_utf8(&bytes) {
            Ok(text) => self.load_text(path, text),
            Err(e) => {
                let line = bytes.iter().take(e.valid_up_to()).filter(|b| **b == b'\n').count() + 1;
                self.file_error(path, Some(line), "file is not valid UTF-8");
            }
        }
    }

    fn load_text(&mut self, file: &Path, text: &str) {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        // One pass: hostile input is bounded as the tree is built (nesting
        // depth, and nodes counting every alias expansion, per document); the
        // parser's own limits bound its lookahead and flow nesting; the file
        // size bounds the rest.
        for item in parse_stream(text) {
            match item {
                Parsed::Problem { line, message } => self.file_error(file, Some(line), message),
                Parsed::Document(root) => self.document(file, &root, false),
            }
        }
    }

    /// One document, or one item of a `kind: List`.
    fn document(&mut self, file: &Path, root: &Node, in_list: bool) {
        let node = root.target();
        let entries = match &node.value {
            Value::Scalar(Scalar { kind: ScalarKind::Null, .. }) => return,
            Value::Map(entries) => entries,
            other => {
                let what = if in_list { "a List item" } else { "a document" };
                return self.file_error(
                    file,
                    Some(root.line),
                    format!(
                        "{what} must be a mapping with apiVersion, kind, metadata and spec; found {}",
                        describe(other)
                    ),
                );
            }
        };
        let mut header = Header::default();
        for (k, v) in entries {
            let key = k.text();
            match key {
                "apiVersion" => header.api_version = Some(v),
                "kind" => header.kind = Some(v),
                "metadata" => header.metadata = Some(v),
                "spec" => header.spec = Some(v),
                "status" => {}
                "items" => header.items = Some(v),
                _ => header.unknown.push((key, k.line)),
            }
        }
        let Some(kind_node) = header.kind else {
            return self.file_error(file, Some(root.line), "document has no `kind`");
        };
        let Some(kind_name) = kind_node.as_str().filter(|s| !s.is_empty()) else {
            return self.file_error(file, Some(kind_node.line), "`kind` must be a non-empty string");
        };
        let api_version = header.api_version.and_then(Node::as_str);

        let list_of = kind_name.strip_suffix("List");
        if kind_name == "List" || list_of.and_then(Kind::from_name).is_some() {
            return self.list(file, root, &header, in_list);
        }
        let Some(kind) = Kind::from_name(kind_name) else {
            return self.foreign_document(file, root, kind_name, api_version, &header);
        };

        let mut ok = true;
        let accepted =
            || kind.versions().iter().map(|v| format!("{}/{v}", kind.group())).collect::<Vec<_>>().join(", ");
        match (header.api_version, api_version) {
            (None, _) => {
                ok = false;
                self.file_error(file, Some(root.line), format!("{kind} has no `apiVersion`; accepted: {}", accepted()));
            }
            (Some(n), v) => {
                let valid = v
                    .and_then(|v| v.split_once('/'))
                    .is_some_and(|(group, version)| group == kind.group() && kind.versions().contains(&version));
                if !valid {
                    ok = false;
                    let shown = v.unwrap_or("(not a string)");
                    let mut msg = format!("apiVersion {shown} is not accepted for {kind}; accepted: {}", accepted());
                    if shown.starts_with("gateway.networking.k8s.io/") {
                        msg.push_str(" (Kubernetes Gateway API resources are not supported)");
                    }
                    self.file_error(file, Some(n.line), msg);
                }
            }
        }

        // The name is taken from the raw tree first, so that a metadata error
        // still names the resource.
        let raw_name = header.metadata.and_then(|m| m.get("name")).and_then(Node::as_str).unwrap_or("");
        let raw_ns = header.metadata.and_then(|m| m.get("namespace")).and_then(Node::as_str).unwrap_or("");
        let namespace = if raw_ns.is_empty() { self.default_namespace } else { raw_ns };
        let display = format!("{kind} {namespace}/{}", if raw_name.is_empty() { "<unnamed>" } else { raw_name });

        let mut unknown = header.unknown.clone();
        if let Some(items) = header.items {
            unknown.push(("items", items.line));
        }
        for (key, line) in &unknown {
            ok = false;
            self.push(Diagnostic {
                severity: Severity::Error,
                file: Some(file.to_path_buf()),
                line: Some(*line),
                resource: Some(display.clone()),
                path: field_path("", key),
                message: format!(
                    "unknown top-level field `{key}`; expected apiVersion, kind, metadata, spec or status"
                ),
            });
        }

        let meta = match header.metadata {
            None => ObjectMeta::default(),
            Some(node) => match from_node::<ObjectMeta>(node) {
                Ok(meta) => meta,
                Err(e) => {
                    ok = false;
                    self.de_error(file, &display, "metadata", e, node.line);
                    ObjectMeta::default()
                }
            },
        };
        if raw_name.is_empty() {
            ok = false;
            let line = header.metadata.map_or(root.line, |m| m.line);
            self.push(Diagnostic {
                severity: Severity::Error,
                file: Some(file.to_path_buf()),
                line: Some(line),
                resource: Some(display.clone()),
                path: "metadata.name".into(),
                message: "metadata.name is required".into(),
            });
        }

        let spec = match header.spec {
            None => Ok(default_spec(kind)),
            Some(node) => spec_from_node(kind, node).map_err(|e| (e, node.line)),
        };
        let spec = match spec {
            Ok(spec) => spec,
            Err((e, line)) => {
                self.de_error(file, &display, "spec", e, line);
                return;
            }
        };
        if !ok {
            return;
        }
        let mut lines = LineIndexBuilder::default();
        index_lines(node, &mut String::new(), &mut lines);
        self.set.resources.push(Resource {
            source: Source { file: file.to_path_buf(), line: root.line },
            api_version: api_version.unwrap_or_default().to_string(),
            kind,
            namespace: namespace.to_string(),
            name: raw_name.to_string(),
            meta,
            spec,
            lines: lines.finish(),
        });
    }

    /// `kind: List` (as `kubectl get -o yaml` prints) or `kind: VirtualServiceList`.
    fn list(&mut self, file: &Path, root: &Node, header: &Header<'_>, in_list: bool) {
        if in_list {
            return self.file_error(file, Some(root.line), "a List inside a List is not supported");
        }
        for (key, line) in &header.unknown {
            self.file_error(
                file,
                Some(*line),
                format!("unknown field `{key}` in a List; expected apiVersion, kind, metadata or items"),
            );
        }
        if let Some(spec) = header.spec {
            self.file_error(
                file,
                Some(spec.line),
                "unknown field `spec` in a List; expected apiVersion, kind, metadata or items",
            );
        }
        let Some(items) = header.items else { return };
        match &items.target().value {
            Value::Seq(items) => {
                for item in items {
                    self.document(file, item, true);
                }
            }
            Value::Scalar(Scalar { kind: ScalarKind::Null, .. }) => {}
            other => self.file_error(
                file,
                Some(items.line),
                format!("List `items` must be a sequence; found {}", describe(other)),
            ),
        }
    }

    /// A document whose kind remora does not model.
    fn foreign_document(
        &mut self,
        file: &Path,
        root: &Node,
        kind: &str,
        api_version: Option<&str>,
        header: &Header<'_>,
    ) {
        let group = api_version.map(|v| v.rsplit_once('/').map_or("", |(g, _)| g));
        let kubernetes = match group {
            Some(g) => KUBERNETES_GROUPS.contains(&g),
            None => KUBERNETES_KINDS.contains(&kind),
        };
        if kubernetes {
            let meta = header.metadata;
            let name = meta.and_then(|m| m.get("name")).and_then(Node::as_str).unwrap_or("<unnamed>");
            let ns = meta.and_then(|m| m.get("namespace")).and_then(Node::as_str).filter(|s| !s.is_empty());
            self.push(Diagnostic {
                severity: Severity::Warning,
                file: Some(file.to_path_buf()),
                line: Some(root.line),
                resource: Some(format!("{kind} {}/{name}", ns.unwrap_or(self.default_namespace))),
                path: String::new(),
                message: "not an Istio resource; skipped".into(),
            });
            return;
        }
        let supported = Kind::ALL.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(", ");
        let mut msg = format!("kind {kind} is not supported by remora; supported kinds: {supported}");
        if group == Some("gateway.networking.k8s.io") {
            msg.push_str(" (Kubernetes Gateway API resources are not supported)");
        }
        let line = header.kind.map_or(root.line, |k| k.line);
        self.file_error(file, Some(line), msg);
    }

    fn push(&mut self, d: Diagnostic) {
        self.set.diagnostics.push(d);
    }

    fn de_error(&mut self, file: &Path, display: &str, prefix: &str, e: DeError, fallback_line: usize) {
        let path = e.path_under(prefix);
        self.push(Diagnostic {
            severity: Severity::Error,
            file: Some(file.to_path_buf()),
            line: Some(e.line.unwrap_or(fallback_line)),
            resource: Some(display.to_string()),
            path,
            message: e.message,
        });
    }

    /// Drops repeated definitions of one resource, keeping the first.
    fn finish(mut self) -> LoadedSet {
        let resources = std::mem::take(&mut self.set.resources);
        let mut kept: Vec<Resource> = Vec::with_capacity(resources.len());
        let mut seen: HashMap<(Kind, String, String), usize> = HashMap::new();
        for r in resources {
            match seen.entry((r.kind, r.namespace.clone(), r.name.clone())) {
                Entry::Vacant(v) => {
                    v.insert(kept.len());
                    kept.push(r);
                }
                Entry::Occupied(o) => {
                    let Some(first) = kept.get(*o.get()) else { continue };
                    let places = format!(
                        "{}:{} and {}:{}",
                        first.source.file.display(),
                        first.source.line,
                        r.source.file.display(),
                        r.source.line
                    );
                    let (severity, message) = if first.spec == r.spec {
                        (
                            Severity::Warning,
                            format!(
                                "{} is defined twice, identically: {places}; the second is ignored",
                                r.display_name()
                            ),
                        )
                    } else {
                        (Severity::Error, format!("{} is defined twice: {places}", r.display_name()))
                    };
                    self.set.diagnostics.push(Diagnostic {
                        severity,
                        file: Some(r.source.file.clone()),
                        line: Some(r.source.line),
                        resource: None,
                        path: String::new(),
                        message,
                    });
                }
            }
        }
        self.set.resources = kept;
        self.set
    }
}

#[derive(Default)]
struct Header<'n> {
    api_version: Option<&'n Node>,
    kind: Option<&'n Node>,
    metadata: Option<&'n Node>,
    spec: Option<&'n Node>,
    items: Option<&'n Node>,
    unknown: Vec<(&'n str, usize)>,
}

fn default_spec(kind: Kind) -> Spec {
    match kind {
        Kind::ServiceEntry => Spec::ServiceEntry(Default::default()),
        Kind::DestinationRule => Spec::DestinationRule(Default::default()),
        Kind::VirtualService => Spec::VirtualService(Default::default()),
        Kind::Gateway => Spec::Gateway(Default::default()),
        Kind::Sidecar => Spec::Sidecar(Default::default()),
        Kind::PeerAuthentication => Spec::PeerAuthentication(Default::default()),
        Kind::AuthorizationPolicy => Spec::AuthorizationPolicy(Default::default()),
    }
}

fn spec_from_node(kind: Kind, node: &Node) -> Result<Spec, DeError> {
    Ok(match kind {
        Kind::ServiceEntry => Spec::ServiceEntry(from_node::<model::ServiceEntry>(node)?),
        Kind::DestinationRule => Spec::DestinationRule(from_node::<model::DestinationRule>(node)?),
        Kind::VirtualService => Spec::VirtualService(from_node::<model::VirtualService>(node)?),
        Kind::Gateway => Spec::Gateway(from_node::<model::Gateway>(node)?),
        Kind::Sidecar => Spec::Sidecar(from_node::<model::Sidecar>(node)?),
        Kind::PeerAuthentication => Spec::PeerAuthentication(from_node::<model::PeerAuthentication>(node)?),
        Kind::AuthorizationPolicy => Spec::AuthorizationPolicy(from_node::<model::AuthorizationPolicy>(node)?),
    })
}

fn from_node<T: DeserializeOwned>(node: &Node) -> Result<T, DeError> {
    T::deserialize(NodeDe(node)).map_err(|e| e.at(node.line))
}

/// Records the line of every map key and sequence item under `node`. Content
/// reached through an alias is not indexed: its paths resolve to the alias.
fn index_lines(node: &Node, path: &mut String, out: &mut LineIndexBuilder) {
    match &node.value {
        Value::Map(entries) => {
            for (k, v) in entries {
                let len = path.len();
                push_field(path, k.text());
                out.push(path, k.line);
                index_lines(v, path, out);
                path.truncate(len);
            }
        }
        Value::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                let _ = write!(path, "[{i}]");
                out.push(path, item.line);
                index_lines(item, path, out);
                path.truncate(len);
            }
        }
        Value::Scalar(_) | Value::Shared(_) => {}
    }
}

// === YAML tree ===

#[derive(Debug, Clone)]
struct Node {
    /// 1-based line where the node starts.
    line: usize,
    value: Value,
}

#[derive(Debug, Clone)]
enum Value {
    Scalar(Scalar),
    Seq(Vec<Node>),
    /// Keys are scalars; duplicates have been removed and merge keys applied.
    Map(Vec<(Node, Node)>),
    /// An anchored node, shared by its definition and every alias to it.
    Shared(Rc<Node>),
}

#[derive(Debug, Clone)]
struct Scalar {
    text: String,
    kind: ScalarKind,
}

/// A scalar resolved by the YAML 1.2 core schema (quoted scalars are strings).
#[derive(Debug, Clone, Copy, PartialEq)]
enum ScalarKind {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str,
}

/// How many alias hops [`Node::target`] follows; anchors never point at aliases.
const MAX_ALIAS_HOPS: usize = 4;

impl Node {
    /// The node itself, or the anchored node an alias refers to.
    fn target(&self) -> &Node {
        let mut n = self;
        for _ in 0..MAX_ALIAS_HOPS {
            match &n.value {
                Value::Shared(rc) => n = &**rc,
                _ => break,
            }
        }
        n
    }

    /// Text of a scalar (keys are always scalars); empty for collections.
    fn text(&self) -> &str {
        match &self.target().value {
            Value::Scalar(s) => &s.text,
            _ => "",
        }
    }

    /// A non-null scalar's text.
    fn as_str(&self) -> Option<&str> {
        match &self.target().value {
            Value::Scalar(s) if s.kind != ScalarKind::Null => Some(&s.text),
            _ => None,
        }
    }

    /// The value of `key` in a mapping.
    fn get(&self, key: &str) -> Option<&Node> {
        match &self.target().value {
            Value::Map(entries) => entries.iter().find(|(k, _)| k.text() == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Scalar(s) => match s.kind {
            ScalarKind::Null => "null",
            ScalarKind::Bool(_) => "a boolean",
            ScalarKind::Int(_) | ScalarKind::Float(_) => "a number",
            ScalarKind::Str => "a string",
        },
        Value::Seq(_) => "a list",
        Value::Map(_) => "a mapping",
        Value::Shared(_) => "an alias",
    }
}

/// What [`parse_stream`] yields, in file order.
enum Parsed {
    Document(Node),
    Problem { line: usize, message: String },
}

/// Parses every document of `text`. A syntax error or an exceeded limit drops
/// that document and parsing resumes at the next document marker.
fn parse_stream(text: &str) -> Vec<Parsed> {
    let mut out = Vec::new();
    let mut options = granit_parser::Options::default();
    options.set_emit_comments(false);
    let mut parser = Parser::new_from_str_with_options(text, options);
    let mut builder: Option<TreeBuilder> = None;
    let mut syntax_errors = 0;
    loop {
        let skip = match parser.next_event() {
            None => break,
            Some(Ok((event, span))) => match event {
                Event::StreamStart | Event::StreamEnd => false,
                Event::DocumentStart(..) => {
                    builder = Some(TreeBuilder::default());
                    false
                }
                Event::DocumentEnd => {
                    if let Some(b) = builder.take() {
                        b.finish(&mut out);
                    }
                    false
                }
                event => {
                    let b = builder.get_or_insert_with(TreeBuilder::default);
                    match b.event(event, span) {
                        Ok(()) => false,
                        Err((line, message)) => {
                            out.append(&mut b.problems);
                            out.push(Parsed::Problem { line, message });
                            builder = None;
                            true
                        }
                    }
                }
            },
            Some(Err(e)) => {
                builder = None;
                let m = e.marker();
                out.push(Parsed::Problem {
                    line: m.line(),
                    message: format!("YAML syntax error at column {}: {}", m.col() + 1, e.info()),
                });
                syntax_errors += 1;
                if syntax_errors >= MAX_SYNTAX_ERRORS_PER_FILE {
                    out.push(Parsed::Problem {
                        line: m.line(),
                        message: "too many YAML syntax errors; the rest of the file is not read".into(),
                    });
                    break;
                }
                true
            }
        };
        if skip && !matches!(parser.proceed_next_document(), Ok(true)) {
            break;
        }
    }
    out
}

#[derive(Default)]
struct TreeBuilder {
    stack: Vec<Frame>,
    anchors: HashMap<usize, (Rc<Node>, Weight)>,
    /// Scalar bytes in the document counting every alias expansion.
    expanded_bytes: usize,
    /// Nodes in the document counting every alias expansion.
    expanded: usize,
    root: Option<Node>,
    problems: Vec<Parsed>,
}

struct Frame {
    line: usize,
    anchor: usize,
    /// Expanded size of the collection so far.
    size: Weight,
    kind: FrameKind,
}

enum FrameKind {
    Seq(Vec<Node>),
    Map { entries: Vec<(Node, Node)>, key: Option<Node> },
}

type Fatal = (usize, String);

/// What a node expands to: nodes, scalar bytes, and nesting levels below
/// and including it. An alias brings all of its anchor's.
#[derive(Clone, Copy)]
struct Weight {
    nodes: usize,
    bytes: usize,
    depth: usize,
}

impl Weight {
    fn scalar(bytes: usize) -> Self {
        Weight { nodes: 1, bytes, depth: 0 }
    }

    fn collection() -> Self {
        Weight { nodes: 1, bytes: 0, depth: 1 }
    }

    fn add_child(&mut self, child: Weight) {
        self.nodes = self.nodes.saturating_add(child.nodes);
        self.bytes = self.bytes.saturating_add(child.bytes);
        self.depth = self.depth.max(child.depth.saturating_add(1));
    }
}

impl TreeBuilder {
    fn problem(&mut self, line: usize, message: impl Into<String>) {
        self.problems.push(Parsed::Problem { line, message: message.into() });
    }

    fn count(&mut self, w: Weight, line: usize) -> Result<(), Fatal> {
        self.expanded = self.expanded.saturating_add(w.nodes);
        self.expanded_bytes = self.expanded_bytes.saturating_add(w.bytes);
        if self.expanded > MAX_EXPANDED_NODES {
            return Err((
                line,
                format!(
                    "document expands to more than {MAX_EXPANDED_NODES} YAML nodes (through aliases?); it is not loaded"
                ),
            ));
        }
        if self.expanded_bytes > MAX_EXPANDED_BYTES {
            return Err((
                line,
                format!(
                    "document expands to more than {} MiB of text (through aliases?); it is not loaded",
                    MAX_EXPANDED_BYTES / (1024 * 1024)
                ),
            ));
        }
        Ok(())
    }

    fn event(&mut self, event: Event<'_>, span: Span) -> Result<(), Fatal> {
        let line = span.start.line();
        let is_seq = matches!(event, Event::SequenceStart(..));
        match event {
            Event::Scalar(text, style, anchor, tag) => {
                self.count(Weight::scalar(text.len()), line)?;
                let kind = match resolve_scalar(&text, style, tag.as_deref()) {
                    Ok(kind) => kind,
                    Err(msg) => {
                        self.problem(line, msg);
                        ScalarKind::Str
                    }
                };
                let weight = Weight::scalar(text.len());
                let node = Node { line, value: Value::Scalar(Scalar { text: text.into_owned(), kind }) };
                self.complete(node, weight, anchor, line)?;
            }
            Event::SequenceStart(_, anchor, tag) | Event::MappingStart(_, anchor, tag) => {
                self.count(Weight::collection(), line)?;
                if self.stack.len() >= MAX_DEPTH {
                    return Err((line, format!("document nests deeper than {MAX_DEPTH} levels; it is not loaded")));
                }
                if let Some(tag) = tag.as_deref() {
                    let want = if is_seq { "seq" } else { "map" };
                    if tag.core_suffix() != Some(want) {
                        self.problem(line, format!("YAML tag `{}` is not supported here", tag.original()));
                    }
                }
                let kind =
                    if is_seq { FrameKind::Seq(Vec::new()) } else { FrameKind::Map { entries: Vec::new(), key: None } };
                self.stack.push(Frame { line, anchor, size: Weight::collection(), kind });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(frame) = self.stack.pop() else {
                    return Err((line, "unbalanced YAML collection end".into()));
                };
                let value = match frame.kind {
                    FrameKind::Seq(items) => Value::Seq(items),
                    FrameKind::Map { entries, key } => {
                        if let Some(k) = key {
                            self.problem(k.line, "mapping key without a value");
                        }
                        Value::Map(self.finish_map(entries))
                    }
                };
                self.complete(Node { line: frame.line, value }, frame.size, frame.anchor, line)?;
            }
            Event::Alias(id) => {
                let node = match self.anchors.get(&id) {
                    Some((rc, weight)) => {
                        let (rc, weight) = (Rc::clone(rc), *weight);
                        self.count(weight, line)?;
                        (Node { line, value: Value::Shared(rc) }, weight)
                    }
                    None => {
                        self.problem(line, "alias refers to an unknown anchor");
                        let null = Scalar { text: String::new(), kind: ScalarKind::Null };
                        (Node { line, value: Value::Scalar(null) }, Weight::scalar(0))
                    }
                };
                self.complete(node.0, node.1, 0, line)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn complete(&mut self, node: Node, size: Weight, anchor: usize, line: usize) -> Result<(), Fatal> {
        // Nesting through aliases: the levels of the aliased tree count where
        // it is used, since deserializing walks them there.
        if self.stack.len().saturating_add(size.depth) > MAX_DEPTH {
            return Err((line, format!("document nests deeper than {MAX_DEPTH} levels; it is not loaded")));
        }
        let node = if anchor == 0 {
            node
        } else {
            let line = node.line;
            let rc = Rc::new(node);
            self.anchors.insert(anchor, (Rc::clone(&rc), size));
            Node { line, value: Value::Shared(rc) }
        };
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(frame) => {
                frame.size.add_child(size);
                match &mut frame.kind {
                    FrameKind::Seq(items) => items.push(node),
                    FrameKind::Map { entries, key } => match key.take() {
                        None => *key = Some(node),
                        Some(k) => entries.push((k, node)),
                    },
                }
            }
        }
        Ok(())
    }

    /// Rejects non-scalar and duplicate keys and applies `<<` merge keys
    /// (explicit keys win, then earlier merge sources).
    fn finish_map(&mut self, entries: Vec<(Node, Node)>) -> Vec<(Node, Node)> {
        let mut out: Vec<(Node, Node)> = Vec::with_capacity(entries.len());
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut merges = Vec::new();
        for (k, v) in entries {
            if !matches!(k.target().value, Value::Scalar(_)) {
                self.problem(k.line, "mapping keys must be scalars");
                continue;
            }
            if k.text() == "<<" {
                merges.push(v);
                continue;
            }
            match seen.entry(k.text().to_string()) {
                Entry::Occupied(first) => {
                    let msg = format!("duplicate key `{}` (first at line {})", first.key(), first.get());
                    self.problem(k.line, msg);
                }
                Entry::Vacant(slot) => {
                    slot.insert(k.line);
                    out.push((k, v));
                }
            }
        }
        for m in merges {
            let sources: Vec<&Node> = match &m.target().value {
                Value::Map(_) => vec![&m],
                Value::Seq(items) => items.iter().collect(),
                _ => Vec::new(),
            };
            for source in sources {
                let Value::Map(merged) = &source.target().value else {
                    self.problem(m.line, "merge key `<<` needs a mapping or a list of mappings");
                    continue;
                };
                for (k, v) in merged {
                    if let Entry::Vacant(slot) = seen.entry(k.text().to_string()) {
                        slot.insert(k.line);
                        out.push((k.clone(), v.clone()));
                    }
                }
            }
            if matches!(m.target().value, Value::Scalar(_)) {
                self.problem(m.line, "merge key `<<` needs a mapping or a list of mappings");
            }
        }
        out
    }

    fn finish(mut self, out: &mut Vec<Parsed>) {
        out.append(&mut self.problems);
        if let Some(root) = self.root {
            out.push(Parsed::Document(root));
        }
    }
}

fn resolve_scalar(text: &str, style: ScalarStyle, tag: Option<&Tag>) -> Result<ScalarKind, String> {
    if let Some(tag) = tag {
        let bad = |what: &str| format!("`{text}` is not a valid YAML {what}");
        return match tag.core_suffix() {
            Some("str") => Ok(ScalarKind::Str),
            Some("null") => Ok(ScalarKind::Null),
            Some("bool") => parse_bool(text).map(ScalarKind::Bool).ok_or_else(|| bad("boolean")),
            Some("int") => parse_int(text).map(ScalarKind::Int).ok_or_else(|| bad("integer")),
            Some("float") => parse_float(text)
                .or_else(|| parse_int(text).map(|i| i as f64))
                .map(ScalarKind::Float)
                .ok_or_else(|| bad("float")),
            _ => Err(format!("YAML tag `{}` is not supported on a scalar", tag.original())),
        };
    }
    if style != ScalarStyle::Plain {
        return Ok(ScalarKind::Str);
    }
    Ok(match text {
        "" | "~" | "null" | "Null" | "NULL" => ScalarKind::Null,
        _ => {
            if let Some(b) = parse_bool(text) {
                ScalarKind::Bool(b)
            } else if let Some(i) = parse_int(text) {
                ScalarKind::Int(i)
            } else if let Some(f) = parse_float(text) {
                ScalarKind::Float(f)
            } else {
                ScalarKind::Str
            }
        }
    })
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// YAML 1.2 core schema integers: `[-+]?[0-9]+`, `0o[0-7]+`, `0x[0-9a-fA-F]+`.
fn parse_int(s: &str) -> Option<i128> {
    if let Some(hex) = s.strip_prefix("0x") {
        return if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            i128::from_str_radix(hex, 16).ok()
        } else {
            None
        };
    }
    if let Some(oct) = s.strip_prefix("0o") {
        return if !oct.is_empty() && oct.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            i128::from_str_radix(oct, 8).ok()
        } else {
            None
        };
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// YAML 1.2 core schema floats: `[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`,
/// `[-+]?.inf` and `.nan` in their three spellings.
fn parse_float(s: &str) -> Option<f64> {
    let (neg, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    match body {
        ".inf" | ".Inf" | ".INF" => return Some(if neg { f64::NEG_INFINITY } else { f64::INFINITY }),
        ".nan" | ".NaN" | ".NAN" if s == body => return Some(f64::NAN),
        _ => {}
    }
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let all_digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match frac_part {
        None => !int_part.is_empty() && all_digits(int_part),
        Some(f) if int_part.is_empty() => !f.is_empty() && all_digits(f),
        Some(f) => all_digits(int_part) && all_digits(f),
    };
    let exponent_ok = exponent.is_none_or(|e| {
        let d = e.strip_prefix(['-', '+']).unwrap_or(e);
        !d.is_empty() && all_digits(d)
    });
    if !(mantissa_ok && exponent_ok) {
        return None;
    }
    s.parse().ok()
}

// === Deserializer over the tree ===

/// A deserialization error with the path below the deserialized node
/// (innermost segment first) and the line where it happened.
#[derive(Debug)]
struct DeError {
    message: String,
    line: Option<usize>,
    path: Vec<Segment>,
}

#[derive(Debug)]
enum Segment {
    Key(String),
    Index(usize),
}

impl DeError {
    fn at(mut self, line: usize) -> Self {
        if self.line.is_none() {
            self.line = Some(line);
        }
        self
    }

    fn within(mut self, segment: Segment) -> Self {
        self.path.push(segment);
        self
    }

    fn path_under(&self, prefix: &str) -> String {
        let mut p = prefix.to_string();
        for seg in self.path.iter().rev() {
            match seg {
                Segment::Key(k) => push_field(&mut p, k),
                Segment::Index(i) => {
                    let _ = write!(p, "[{i}]");
                }
            }
        }
        p
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError { message: msg.to_string(), line: None, path: Vec::new() }
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::custom(format_args!("expected {}, found {}", expected_text(exp), unexpected_text(&unexp)))
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Self {
        Self::custom(format_args!("{} is out of range: expected {}", unexpected_text(&unexp), expected_text(exp)))
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        let wanted = squash(field);
        let mut msg = format!("unknown field `{field}`");
        if let Some(similar) = expected.iter().find(|e| squash(e) == wanted) {
            let _ = write!(msg, "; did you mean `{similar}`?");
        } else if expected.is_empty() {
            msg.push_str("; no fields are expected here");
        } else {
            let _ = write!(msg, "; expected one of: {}", expected.join(", "));
        }
        Self::custom(msg)
    }
}

/// A field name compared loosely: `http_status`, `HttpStatus` and `httpStatus` agree.
fn squash(s: &str) -> String {
    s.chars().filter(|c| *c != '_' && *c != '-').flat_map(char::to_lowercase).collect()
}

fn expected_text(exp: &dyn Expected) -> String {
    let s = exp.to_string();
    match s.as_str() {
        "u8" | "u16" | "u32" | "u64" | "u128" => format!("a non-negative integer ({s})"),
        "i8" | "i16" | "i32" | "i64" | "i128" => format!("an integer ({s})"),
        "f32" | "f64" => "a number".into(),
        "a sequence" => "a list".into(),
        "a map" => "a mapping".into(),
        _ if s.starts_with("struct ") => "a mapping".into(),
        _ => s,
    }
}

fn unexpected_text(u: &Unexpected<'_>) -> String {
    match u {
        Unexpected::Seq => "a list".into(),
        Unexpected::Map => "a mapping".into(),
        Unexpected::Unit => "null".into(),
        Unexpected::Str(s) => format!("the string {s:?}"),
        Unexpected::Signed(i) => format!("the integer {i}"),
        Unexpected::Unsigned(i) => format!("the integer {i}"),
        Unexpected::Float(f) => format!("the number {f}"),
        Unexpected::Bool(b) => format!("the boolean {b}"),
        other => other.to_string(),
    }
}

fn unexpected(node: &Node) -> Unexpected<'_> {
    match &node.value {
        Value::Scalar(s) => match s.kind {
            ScalarKind::Null => Unexpected::Unit,
            ScalarKind::Bool(b) => Unexpected::Bool(b),
            ScalarKind::Int(i) => match i64::try_from(i) {
                Ok(i) => Unexpected::Signed(i),
                Err(_) => Unexpected::Other("a large integer"),
            },
            ScalarKind::Float(f) => Unexpected::Float(f),
            ScalarKind::Str => Unexpected::Str(&s.text),
        },
        Value::Seq(_) => Unexpected::Seq,
        Value::Map(_) => Unexpected::Map,
        Value::Shared(_) => Unexpected::Other("an alias"),
    }
}

fn visit_int<'de, V: Visitor<'de>>(i: i128, visitor: V) -> Result<V::Value, DeError> {
    if let Ok(v) = i64::try_from(i) {
        visitor.visit_i64(v)
    } else if let Ok(v) = u64::try_from(i) {
        visitor.visit_u64(v)
    } else {
        Err(de::Error::custom(format_args!("the integer {i} is out of range")))
    }
}

#[derive(Clone, Copy)]
struct NodeDe<'de>(&'de Node);

impl<'de> NodeDe<'de> {
    fn deserialize_number<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let node = self.0.target();
        match &node.value {
            Value::Scalar(Scalar { kind: ScalarKind::Int(i), .. }) => visit_int(*i, visitor),
            Value::Scalar(Scalar { kind: ScalarKind::Float(f), .. }) => visitor.visit_f64(*f),
            _ => Err(de::Error::invalid_type(unexpected(node), &visitor)),
        }
    }
}

macro_rules! numbers {
    ($($method:ident),*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
            self.deserialize_number(visitor)
        })*
    };
}

impl<'de> de::Deserializer<'de> for NodeDe<'de> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let node = self.0.target();
        match &node.value {
            Value::Scalar(s) => match s.kind {
                ScalarKind::Null => visitor.visit_unit(),
                ScalarKind::Bool(b) => visitor.visit_bool(b),
                ScalarKind::Int(i) => visit_int(i, visitor),
                ScalarKind::Float(f) => visitor.visit_f64(f),
                ScalarKind::Str => visitor.visit_str(&s.text),
            },
            Value::Seq(items) => visitor.visit_seq(SeqAcc::new(items)),
            Value::Map(entries) => visitor.visit_map(MapAcc::new(entries)),
            Value::Shared(_) => Err(de::Error::custom("alias nesting is too deep")),
        }
        .map_err(|e| e.at(self.0.line))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let node = self.0.target();
        match &node.value {
            Value::Scalar(Scalar { kind: ScalarKind::Bool(b), .. }) => visitor.visit_bool(*b),
            _ => Err(de::Error::invalid_type(unexpected(node), &visitor)),
        }
    }

    numbers!(
        deserialize_i8,
        deserialize_i16,
        deserialize_i32,
        deserialize_i64,
        deserialize_i128,
        deserialize_u8,
        deserialize_u16,
        deserialize_u32,
        deserialize_u64,
        deserialize_u128,
        deserialize_f32,
        deserialize_f64
    );

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    /// Any scalar reads as its text (so `version: 1` is the label value "1");
    /// null reads as the empty string, as Kubernetes treats null as absent.
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let node = self.0.target();
        match &node.value {
            Value::Scalar(s) if s.kind == ScalarKind::Null => visitor.visit_str(""),
            Value::Scalar(s) => visitor.visit_str(&s.text),
            _ => Err(de::Error::invalid_type(unexpected(node), &visitor)),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let node = self.0.target();
        match &node.value {
            Value::Scalar(s) => visitor.visit_bytes(s.text.as_bytes()),
            _ => Err(de::Error::invalid_type(unexpected(node), &visitor)),
        }
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        match &self.0.target().value {
            Value::Scalar(Scalar { kind: ScalarKind::Null, .. }) => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let node = self.0.target();
        match &node.value {
            Value::Scalar(Scalar { kind: ScalarKind::Null, .. }) => visitor.visit_unit(),
            _ => Err(de::Error::invalid_type(unexpected(node), &visitor)),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_newtype_struct(self)
    }

    /// A sequence; null reads as an empty one (Kubernetes: null is absent).
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let node = self.0.target();
        match &node.value {
            Value::Seq(items) => visitor.visit_seq(SeqAcc::new(items)),
            Value::Scalar(Scalar { kind: ScalarKind::Null, .. }) => visitor.visit_seq(SeqAcc::new(&[])),
            _ => Err(de::Error::invalid_type(unexpected(node), &visitor)),
        }
        .map_err(|e| e.at(self.0.line))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(visitor)
    }

    /// A mapping; null reads as an empty one.
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let node = self.0.target();
        match &node.value {
            Value::Map(entries) => visitor.visit_map(MapAcc::new(entries)),
            Value::Scalar(Scalar { kind: ScalarKind::Null, .. }) => visitor.visit_map(MapAcc::new(&[])),
            _ => Err(de::Error::invalid_type(unexpected(node), &visitor)),
        }
        .map_err(|e| e.at(self.0.line))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let node = self.0.target();
        match &node.value {
            Value::Scalar(s) if s.kind != ScalarKind::Null => visitor.visit_enum(s.text.as_str().into_deserializer()),
            _ => Err(de::Error::invalid_type(unexpected(node), &visitor)),
        }
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }
}

struct SeqAcc<'de> {
    items: std::slice::Iter<'de, Node>,
    index: usize,
}

impl<'de> SeqAcc<'de> {
    fn new(items: &'de [Node]) -> Self {
        SeqAcc { items: items.iter(), index: 0 }
    }
}

impl<'de> SeqAccess<'de> for SeqAcc<'de> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, DeError> {
        let Some(node) = self.items.next() else { return Ok(None) };
        let index = self.index;
        self.index += 1;
        seed.deserialize(NodeDe(node)).map(Some).map_err(|e| e.at(node.line).within(Segment::Index(index)))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len())
    }
}

struct MapAcc<'de> {
    entries: std::slice::Iter<'de, (Node, Node)>,
    current: Option<&'de (Node, Node)>,
}

impl<'de> MapAcc<'de> {
    fn new(entries: &'de [(Node, Node)]) -> Self {
        MapAcc { entries: entries.iter(), current: None }
    }
}

impl<'de> MapAccess<'de> for MapAcc<'de> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, DeError> {
        let Some(entry) = self.entries.next() else { return Ok(None) };
        self.current = Some(entry);
        let key = &entry.0;
        seed.deserialize(NodeDe(key)).map(Some).map_err(|e| e.at(key.line).within(Segment::Key(key.text().to_string())))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let Some((key, value)) = self.current.take() else {
            return Err(de::Error::custom("map value requested before its key"));
        };
        seed.deserialize(NodeDe(value)).map_err(|e| e.at(value.line).within(Segment::Key(key.text().to_string())))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.entries.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> LoadedSet {
        load_str(Path::new("test.yaml"), text, "default")
    }

    fn errors(set: &LoadedSet) -> Vec<String> {
        set.diagnostics.iter().filter(|d| d.is_error()).map(ToString::to_string).collect()
    }

    const VS: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
      weight: 75
    - destination:
        host: reviews
        subset: v3
      weight: 25
";

    #[test]
    fn one_document_with_lines() {
        let set = load(VS);
        assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
        assert_eq!(set.resources.len(), 1);
        let r = &set.resources[0];
        assert_eq!((r.kind, r.namespace.as_str(), r.name.as_str()), (Kind::VirtualService, "default", "reviews"));
        assert_eq!(r.api_version, "networking.istio.io/v1");
        assert_eq!(r.source.line, 1);
        let line = |p: &str| r.lines.line_of(p);
        assert_eq!(line("metadata.name"), Some(4));
        assert_eq!(line("spec"), Some(5));
        assert_eq!(line("spec.hosts[0]"), Some(7));
        assert_eq!(line("spec.http"), Some(8));
        assert_eq!(line("spec.http[0]"), Some(9));
        assert_eq!(line("spec.http[0].match[0].headers.end-user"), Some(11));
        assert_eq!(line("spec.http[0].route[0].destination.subset"), Some(16));
        assert_eq!(line("spec.http[1]"), Some(17));
        assert_eq!(line("spec.http[1].route[1]"), Some(22));
        assert_eq!(line("spec.http[1].route[1].weight"), Some(25));
        // Unknown paths fall back to the nearest indexed ancestor.
        assert_eq!(line("spec.http[1].route[1].weight.nothing"), Some(25));
        let Spec::VirtualService(vs) = &r.spec else { panic!("not a VirtualService") };
        assert_eq!(vs.http[1].route[1].weight, Some(25));
        assert_eq!(vs.http[0].matches[0].headers["end-user"].exact.as_deref(), Some("jason"));
    }

    #[test]
    fn multi_document_with_empty_documents_and_namespaces() {
        let text = format!(
            "---\n# only a comment\n---\n{VS}---\napiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\n\
             metadata:\n  name: reviews\n  namespace: prod\nspec:\n  host: reviews\n  subsets:\n  - name: v1\n    labels:\n      version: v1\n---\n"
        );
        let set = load(&text);
        assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
        assert_eq!(set.resources.len(), 2);
        let dr = &set.resources[1];
        assert_eq!((dr.kind, dr.namespace.as_str()), (Kind::DestinationRule, "prod"));
        assert_eq!(dr.source.line, 30);
        assert_eq!(dr.lines.line_of("spec.subsets[0].name"), Some(38));
        assert_eq!(dr.lines.line_of("spec.subsets[0].labels.version"), Some(40));
        assert_eq!(set.resources[0].source.line, 4);
        assert_eq!(set.files.len(), 1);
        assert_eq!(set.files[0].len, text.len());
        assert_eq!(set.files[0].hash, format!("{:016x}", fnv1a64(text.as_bytes())));
    }

    #[test]
    fn kubectl_list_with_status() {
        let text = "\
apiVersion: v1
items:
- apiVersion: networking.istio.io/v1
  kind: DestinationRule
  metadata:
    creationTimestamp: \"2024-01-01T00:00:00Z\"
    generation: 1
    name: details
    namespace: default
    resourceVersion: \"1234\"
    uid: 0b5c6a1e-0000-0000-0000-000000000000
  spec:
    host: details
    subsets:
    - labels:
        version: v1
      name: v1
  status: {}
- apiVersion: networking.istio.io/v1
  kind: VirtualService
  metadata: {name: details}
  spec: {hosts: [details], http: [{route: [{destination: {host: details, subset: v1}}]}]}
kind: List
metadata:
  resourceVersion: \"\"
";
        let set = load(text);
        assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
        assert_eq!(set.resources.len(), 2);
        assert_eq!(set.resources[0].source.line, 3);
        assert_eq!(set.resources[0].lines.line_of("spec.subsets[0].name"), Some(17));
        assert_eq!(set.resources[1].source.line, 19);
        assert_eq!(set.resources[1].lines.line_of("spec.http[0].route[0].destination.subset"), Some(22));
    }

    #[test]
    fn unknown_field_has_path_and_line_and_other_documents_still_load() {
        let text = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: a
spec:
  hosts: [a]
  http:
  - route:
    - destination:
        host: a
      wieght: 5
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: b
spec:
  hosts: [b]
  http:
  - timeout: soon
    route:
    - destination: {host: b}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: c}
spec: {host: c}
";
        let set = load(text);
        let errs: Vec<&Diagnostic> = set.diagnostics.iter().filter(|d| d.is_error()).collect();
        assert_eq!(errs.len(), 2, "{:?}", set.diagnostics);
        assert_eq!(errs[0].line, Some(11));
        assert_eq!(errs[0].path, "spec.http[0].route[0].wieght");
        assert_eq!(errs[0].resource.as_deref(), Some("VirtualService default/a"));
        assert!(errs[0].message.contains("unknown field `wieght`"), "{}", errs[0].message);
        assert_eq!(errs[1].line, Some(20));
        assert_eq!(errs[1].path, "spec.http[0].timeout");
        assert!(errs[1].message.contains("duration"), "{}", errs[1].message);
        assert_eq!(
            errs[0].to_string(),
            format!("test.yaml:11: VirtualService default/a: spec.http[0].route[0].wieght: {}", errs[0].message)
        );
        assert_eq!(set.resources.len(), 1);
        assert_eq!(set.resources[0].name, "c");
    }

    #[test]
    fn type_errors_read_well() {
        let text = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: se}
spec:
  hosts: example.com
  ports:
  - number: \"80\"
";
        let errs = errors(&load(text));
        assert_eq!(
            errs,
            vec!["test.yaml:5: ServiceEntry default/se: spec.hosts: expected a list, found the string \"example.com\""]
        );
        let text = text.replace("  hosts: example.com\n", "  hosts: [example.com]\n");
        let errs = errors(&load(&text));
        assert_eq!(
            errs,
            vec![
                "test.yaml:7: ServiceEntry default/se: spec.ports[0].number: expected a non-negative integer (u32), found the string \"80\""
            ]
        );
        let text = text.replace("\"80\"", "-80");
        let errs = errors(&load(&text));
        assert_eq!(errs.len(), 1);
        assert!(errs[0].contains("spec.ports[0].number: the integer -80 is out of range"), "{errs:?}");
        let text = text.replace("-80", "80\n    Name: http");
        let errs = errors(&load(&text));
        assert!(errs[0].contains("spec.ports[0].Name: unknown field `Name`; did you mean `name`?"), "{errs:?}");
    }

    #[test]
    fn header_problems() {
        let cases = [
            ("kind: VirtualService\nmetadata: {name: a}\n", "has no `apiVersion`"),
            (
                "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: a}\n",
                "apiVersion networking.istio.io/v2 is not accepted for VirtualService; accepted: networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3",
            ),
            (
                "apiVersion: security.istio.io/v1alpha3\nkind: PeerAuthentication\nmetadata: {name: a}\n",
                "accepted: security.istio.io/v1, security.istio.io/v1beta1",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: EnvoyFilter\nmetadata: {name: a}\n",
                "kind EnvoyFilter is not supported by remora; supported kinds: ServiceEntry, DestinationRule",
            ),
            ("apiVersion: networking.istio.io/v1\nmetadata: {name: a}\n", "document has no `kind`"),
            (
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {namespace: x}\n",
                "metadata.name is required",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspek: {}\n",
                "unknown top-level field `spek`",
            ),
            (
                "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a, labelz: {}}\n",
                "unknown field `labelz`",
            ),
            ("- a\n- b\n", "must be a mapping"),
            ("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: a}\n", "Gateway API"),
            ("a: 1\na: 2\n", "duplicate key `a` (first at line 1)"),
            ("a: [1, 2\n", "YAML syntax error"),
        ];
        for (text, want) in cases {
            let set = load(text);
            assert!(set.resources.is_empty(), "{text}");
            let errs = errors(&set);
            assert!(errs.iter().any(|e| e.contains(want)), "{text}: {errs:?}");
        }
    }

    #[test]
    fn kubernetes_kinds_are_skipped_with_a_warning() {
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: reviews}}\nspec: {{ports: [{{port: 9080}}]}}\n---\n\
             apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: reviews-v1, namespace: shop}}\n---\n{VS}"
        );
        let set = load(&text);
        assert!(errors(&set).is_empty(), "{:?}", set.diagnostics);
        assert_eq!(set.resources.len(), 1);
        let warnings: Vec<String> = set.diagnostics.iter().map(ToString::to_string).collect();
        assert_eq!(
            warnings,
            vec![
                "warning: test.yaml:1: Service default/reviews: not an Istio resource; skipped",
                "warning: test.yaml:6: Deployment shop/reviews-v1: not an Istio resource; skipped",
            ]
        );
    }

    #[test]
    fn syntax_error_skips_only_its_document() {
        let text = format!("{VS}---\nspec: [unclosed\n---\n{}", VS.replace("name: reviews", "name: other"));
        let set = load(&text);
        let errs = errors(&set);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with("test.yaml:"), "{errs:?}");
        assert_eq!(set.resources.len(), 2);
    }

    #[test]
    fn duplicates() {
        let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: details}\nspec: {host: details}\n";
        let other = dr.replace("host: details", "host: details.other");
        let set = load(&format!("{dr}---\n{dr}"));
        assert_eq!(set.resources.len(), 1);
        assert_eq!(
            set.diagnostics.iter().map(ToString::to_string).collect::<Vec<_>>(),
            vec![
                "warning: test.yaml:6: DestinationRule default/details is defined twice, identically: test.yaml:1 and test.yaml:6; the second is ignored"
            ]
        );
        let set = load(&format!("{dr}---\n{other}"));
        assert_eq!(set.resources.len(), 1);
        assert_eq!(
            errors(&set),
            vec!["test.yaml:6: DestinationRule default/details is defined twice: test.yaml:1 and test.yaml:6"]
        );
        // Different namespaces are different resources.
        let set = load(&format!("{dr}---\n{}", other.replace("{name: details}", "{name: details, namespace: x}")));
        assert_eq!(set.resources.len(), 2);
        assert!(set.diagnostics.is_empty());
    }

    #[test]
    fn aliases_merge_keys_and_scalars() {
        let text = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: r
  labels: {a: yes, b: 1, c: 010, d: \"x\"}
spec:
  host: r
  subsets:
  - name: v1
    labels: &v1
      version: v1
  - name: v2
    labels:
      <<: *v1
      track: canary
  trafficPolicy:
    outlierDetection:
      maxEjectionPercent: 0x10
";
        let set = load(text);
        assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
        let r = &set.resources[0];
        assert_eq!(r.meta.labels["a"], "yes");
        assert_eq!(r.meta.labels["b"], "1");
        assert_eq!(r.meta.labels["c"], "010");
        let Spec::DestinationRule(dr) = &r.spec else { panic!("not a DestinationRule") };
        assert_eq!(dr.subsets[1].labels.len(), 2);
        assert_eq!(dr.subsets[1].labels["version"], "v1");
        let od = dr.traffic_policy.as_ref().and_then(|t| t.outlier_detection.as_ref());
        assert_eq!(od.and_then(|o| o.max_ejection_percent), Some(16));
    }

    #[test]
    fn alias_bomb_is_refused() {
        let mut text = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let prev = i - 1;
            let _ = writeln!(
                text,
                "a{i}: &a{i} [*a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}, *a{prev}]"
            );
        }
        let set = load(&text);
        assert!(set.resources.is_empty());
        let errs = errors(&set);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("expands to more than"), "{errs:?}");
    }

    #[test]
    fn nesting_and_text_through_aliases_are_bounded() {
        // Each anchor nests its predecessor 10 levels deeper: 7 of them are
        // 70 levels, though no one collection is written deeper than 11.
        let mut deep = String::from("kind: VirtualService\nspec:\n  a0: &a0 x\n");
        for i in 1..8 {
            let _ = writeln!(deep, "  a{i}: &a{i} {}*a{}{}", "[".repeat(10), i - 1, "]".repeat(10));
        }
        // One 1 MiB string aliased 100 times: 100 MiB of text.
        let mut wide = format!("kind: VirtualService\nspec:\n  s: &s {}\n  l: [", "x".repeat(1024 * 1024));
        wide.push_str(&vec!["*s"; 100].join(", "));
        wide.push_str("]\n");
        for (text, want) in [(deep, "nests deeper than 64"), (wide, "MiB of text")] {
            let set = load(&text);
            assert!(set.resources.is_empty());
            let errs = errors(&set);
            assert!(errs.iter().any(|e| e.contains(want)), "{errs:?}");
        }
        // Within the bounds, aliases still work (a few levels, a few copies).
        let ok = "kind: List\nitems: []\nx: &x [[1]]\ny: [*x, *x]\n";
        assert!(errors(&load(ok)).iter().all(|e| !e.contains("nests") && !e.contains("expands")));
    }

    #[test]
    fn deep_nesting_is_refused() {
        let flow = format!("kind: VirtualService\nspec: {}x{}\n", "[".repeat(200), "]".repeat(200));
        let mut block = String::from("kind: VirtualService\nspec:\n");
        for depth in 1..100 {
            let _ = writeln!(block, "{}k{depth}:", "  ".repeat(depth));
        }
        for text in [flow, block] {
            let set = load(&text);
            assert!(set.resources.is_empty());
            let errs = errors(&set);
            assert!(errs.iter().any(|e| e.contains("nests deeper than 64")), "{errs:?}");
        }
    }

    #[test]
    fn oversized_text_is_refused() {
        let big = " ".repeat(MAX_FILE_BYTES as usize + 1);
        let set = load(&big);
        assert!(errors(&set)[0].contains("at most 16777216 bytes"));
    }

    #[test]
    fn odd_input_never_panics() {
        let inputs = [
            "",
            "---",
            "...",
            "~",
            "[]",
            "{}",
            "? [a]\n: b\n",
            "!foo x",
            "*unknown",
            "kind: [List]",
            "kind: List\nitems: 3\n",
            "kind: List\nitems: [3, ~, {kind: List}]\n",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: 5\n",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\nspec: {hosts: !!int x}\n",
            "a: &x\n  b: *x\n",
            "\t- x",
            "a: |\n  multi\n  line\nb: >\n  folded\n",
            "\u{feff}apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n",
            "<<: 3\n",
            "%YAML 1.2\n---\na: b\n",
        ];
        for text in inputs {
            let _ = load(text);
        }
        let deep = "[".repeat(500) + &"]".repeat(500);
        assert!(!errors(&load(&deep)).is_empty());
    }

    #[test]
    fn scalar_resolution() {
        assert_eq!(resolve_scalar("80", ScalarStyle::Plain, None), Ok(ScalarKind::Int(80)));
        assert_eq!(resolve_scalar("80", ScalarStyle::DoubleQuoted, None), Ok(ScalarKind::Str));
        assert_eq!(resolve_scalar("-0o17", ScalarStyle::Plain, None), Ok(ScalarKind::Str));
        assert_eq!(resolve_scalar("0o17", ScalarStyle::Plain, None), Ok(ScalarKind::Int(15)));
        assert_eq!(resolve_scalar("1.5e3", ScalarStyle::Plain, None), Ok(ScalarKind::Float(1500.0)));
        assert_eq!(resolve_scalar(".5", ScalarStyle::Plain, None), Ok(ScalarKind::Float(0.5)));
        assert_eq!(resolve_scalar("1.", ScalarStyle::Plain, None), Ok(ScalarKind::Float(1.0)));
        assert_eq!(resolve_scalar("inf", ScalarStyle::Plain, None), Ok(ScalarKind::Str));
        assert_eq!(resolve_scalar("1e", ScalarStyle::Plain, None), Ok(ScalarKind::Str));
        assert_eq!(resolve_scalar("NO", ScalarStyle::Plain, None), Ok(ScalarKind::Str));
        assert_eq!(resolve_scalar("~", ScalarStyle::Plain, None), Ok(ScalarKind::Null));
        assert_eq!(resolve_scalar("True", ScalarStyle::Plain, None), Ok(ScalarKind::Bool(true)));
        assert_eq!(resolve_scalar("1_000", ScalarStyle::Plain, None), Ok(ScalarKind::Str));
    }

    #[test]
    fn field_paths() {
        assert_eq!(field_path("", "spec"), "spec");
        assert_eq!(field_path("spec", "hosts"), "spec.hosts");
        assert_eq!(field_path("m.headers", "end-user"), "m.headers.end-user");
        assert_eq!(field_path("m.headers", ":authority"), "m.headers[\":authority\"]");
        assert_eq!(field_path("labels", "app.kubernetes.io/name"), "labels[\"app.kubernetes.io/name\"]");
    }

    fn fixture_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/istio-samples/bookinfo")
    }

    #[test]
    fn bookinfo_samples_load() {
        let dir = fixture_dir();
        let mut names: Vec<String> = fs::read_dir(&dir)
            .map(|entries| {
                entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
            })
            .unwrap_or_default();
        names.retain(|n| n.ends_with(".yaml"));
        names.sort();
        assert_eq!(names.len(), 12, "{names:?}");
        for name in &names {
            let set = load_paths(&[dir.join(name)], "default");
            assert!(set.diagnostics.is_empty(), "{name}: {:?}", set.diagnostics);
            assert!(!set.resources.is_empty(), "{name}");
            assert!(set.resources.iter().all(|r| r.namespace == "default"), "{name}");
        }
        // Together where they don't define the same resource differently.
        let together = ["bookinfo-gateway.yaml", "destination-rule-all.yaml", "virtual-service-all-v1.yaml"];
        let paths: Vec<PathBuf> = together.iter().map(|n| dir.join(n)).collect();
        let set = load_paths(&paths, "default");
        assert!(set.diagnostics.is_empty(), "{:?}", set.diagnostics);
        assert_eq!(set.resources.len(), 2 + 4 + 4);
        assert_eq!(set.files.len(), 3);
        // destination-rule-all.yaml and fault-injection-details-v1.yaml both define
        // DestinationRule details, with different subsets: that is a conflict.
        let a = dir.join("destination-rule-all.yaml");
        let b = dir.join("fault-injection-details-v1.yaml");
        let set = load_paths(&[a.clone(), b.clone()], "default");
        assert_eq!(
            errors(&set),
            vec![format!(
                "{}:23: DestinationRule default/details is defined twice: {}:49 and {}:23",
                b.display(),
                a.display(),
                b.display()
            )]
        );
        assert_eq!(set.resources.len(), 4 + 1);
    }

    #[cfg(unix)]
    #[test]
    fn configmap_volume_layout() {
        use std::os::unix::fs::symlink;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let data = dir.join("..2024_06_01_12_00_00.123456789");
        fs::create_dir(&data).unwrap();
        fs::write(data.join("reviews.yaml"), VS).unwrap();
        fs::write(data.join("notes.txt"), "not config").unwrap();
        fs::write(data.join("a-dr.yml"), "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec: {host: reviews}\n")
            .unwrap();
        symlink(data.file_name().unwrap_or_default(), dir.join("..data")).unwrap();
        for name in ["reviews.yaml", "notes.txt", "a-dr.yml"] {
            symlink(Path::new("..data").join(name), dir.join(name)).unwrap();
        }
        fs::create_dir(dir.join("nested.yaml")).unwrap();
        let set = load_paths(&[dir.to_path_buf(), dir.join("missing.yaml")], "shop");
        let files: Vec<PathBuf> = set.files.iter().map(|f| f.path.clone()).collect();
        assert_eq!(files, vec![dir.join("a-dr.yml"), dir.join("reviews.yaml")]);
        assert_eq!(set.resources.len(), 2);
        assert_eq!(set.resources[0].source.file, dir.join("a-dr.yml"));
        assert!(set.resources.iter().all(|r| r.namespace == "shop"));
        let errs = errors(&set);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].starts_with(&format!("{}: cannot read", dir.join("missing.yaml").display())), "{errs:?}");
    }
}
