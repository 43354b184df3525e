//! `remora inject`: writes Kubernetes manifests back with the sidecar added,
//! as `istioctl kube-inject` does. Pod templates of Deployments,
//! StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs, and bare Pods,
//! get:
//!
//! - an init container that runs `remora iptables` (the only container with
//!   NET_ADMIN and NET_RAW);
//! - the proxy (`remora run --capture`) as a native sidecar (an init
//!   container with `restartPolicy: Always`: it starts before the app and
//!   stops after it), or with `--classic` as the first container with a
//!   `postStart` hook running `remora wait`, so the app starts only once the
//!   proxy is ready (Istio's `holdApplicationUntilProxyStarts`);
//! - the routing ConfigMap, the identity Secret and the pod's labels
//!   (downward API) mounted; namespace, pod name and service account from
//!   the downward API; health probes on 15021; UID/GID 1337, read-only root,
//!   no privilege escalation; Prometheus scrape annotations.
//!
//! Istio's annotations opt a pod out (`sidecar.istio.io/inject: "false"`),
//! pick the sidecar style (`sidecar.istio.io/nativeSidecar`), tune capture
//! (`traffic.sidecar.istio.io/{include,exclude}{InboundPorts,OutboundIPRanges,OutboundPorts}`)
//! and the proxy's resources (`sidecar.istio.io/proxy{CPU,Memory}[Limit]`).
//! An injected pod carries `sidecar.remora.io/status`; injecting it again
//! changes nothing. Documents of other kinds are written back untouched.

use std::io::Read;
use std::path::PathBuf;

use clap::Args;
use serde_json::{Map, Value, json};

/// Marks an injected pod template (JSON: what was added, and by which version).
pub const STATUS_ANNOTATION: &str = "sidecar.remora.io/status";
const INJECT: &str = "sidecar.istio.io/inject";
const NATIVE: &str = "sidecar.istio.io/nativeSidecar";
const INIT_NAME: &str = "remora-init";
const PROXY_NAME: &str = "remora-proxy";
const CONFIG_VOLUME: &str = "remora-config";
const IDENTITY_VOLUME: &str = "remora-identity";
const PODINFO_VOLUME: &str = "remora-podinfo";
const CACHE_VOLUME: &str = "remora-cache";
const CACHE_DIR: &str = "/var/lib/remora";
const CONFIG_DIR: &str = "/etc/remora/config";
const IDENTITY_DIR: &str = "/var/run/secrets/remora/identity";
const PODINFO_DIR: &str = "/etc/remora/pod";
/// Istio's proxy UID and GID; the capture rules exclude its traffic.
const PROXY_ID: u32 = 1337;
/// Ports the capture rules never redirect inbound: metrics, health, status.
const PROXY_INBOUND_PORTS: &str = "15090,15021,15020";
const HEALTH_PORT: u16 = 15021;
const METRICS_PORT: u16 = 15090;

#[derive(Debug, Clone, Args)]
pub struct InjectArgs {
    /// Manifests to read; `-` reads stdin.
    #[arg(long, short = 'f', default_value = "-")]
    pub filename: PathBuf,
    /// Proxy image.
    #[arg(long, env = "REMORA_INJECT_IMAGE", default_value = concat!("remora:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// Init-container image: remora with iptables (the Dockerfile's `init` target).
    #[arg(long, env = "REMORA_INJECT_INIT_IMAGE", default_value = concat!("remora-init:", env!("CARGO_PKG_VERSION")))]
    pub init_image: String,
    /// ConfigMap holding the routing config (Istio YAML), mounted at /etc/remora/config.
    #[arg(long, default_value = "remora-config")]
    pub config_map: String,
    /// Secret holding the workload identity (`cert-chain.pem`, `key.pem`,
    /// `root-cert.pem`); `{sa}` stands for the pod's service account. Empty:
    /// no identity, so no mTLS.
    #[arg(long, default_value = "remora-identity-{sa}")]
    pub identity_secret: String,
    /// Subscribe the proxies to this control plane (`http://...` or
    /// `https://...`) instead of mounting the ConfigMap; the last set is
    /// cached in the pod (an emptyDir) across proxy restarts.
    #[arg(long)]
    pub control_plane: Option<String>,
    /// Add the proxy as a classic sidecar (the first container, holding the
    /// app until it is ready) for clusters without native sidecars (before
    /// Kubernetes 1.29).
    #[arg(long)]
    pub classic: bool,
}

pub fn main(args: InjectArgs) -> i32 {
    let mut text = String::new();
    let read = if args.filename.as_os_str() == "-" {
        std::io::stdin().read_to_string(&mut text).map(|_| ())
    } else {
        std::fs::read_to_string(&args.filename).map(|t| text = t)
    };
    if let Err(e) = read {
        eprintln!("remora inject: {}: {e}", args.filename.display());
        return 1;
    }
    match inject_text(&text, &args) {
        Ok(out) => {
            super::emit(&out);
            0
        }
        Err(e) => {
            eprintln!("remora inject: {}: {e}", args.filename.display());
            1
        }
    }
}

/// Injects every pod template in a YAML stream. Documents that are not
/// injected (other kinds, opted out, already injected) keep their text.
pub fn inject_text(text: &str, args: &InjectArgs) -> Result<String, String> {
    let mut docs: Vec<String> = Vec::new();
    for (first_line, chunk) in split_documents(text) {
        if chunk.trim().is_empty() {
            continue;
        }
        let values = crate::config::load::parse_values(chunk)
            .map_err(|(line, msg)| format!("line {}: {msg}", first_line + line.saturating_sub(1)))?;
        let mut changed = false;
        let mut values = values;
        for v in &mut values {
            changed |= inject_document(v, args).map_err(|e| format!("line {first_line}: {e}"))?;
        }
        if !changed {
            let mut kept = chunk.to_string();
            if !kept.ends_with('\n') {
                kept.push('\n');
            }
            docs.push(kept);
            continue;
        }
        for v in values {
            docs.push(serde_saphyr::to_string(&v).map_err(|e| format!("line {first_line}: cannot write YAML: {e}"))?);
        }
    }
    Ok(docs.join("---\n"))
}

/// Splits a YAML stream at its `---` lines: each document's first line
/// number (1-based) and text.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t") {
            out.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = i + 2;
        }
        offset += line.len();
    }
    out.push((start_line, &text[start..]));
    out
}

/// Injects the pod template(s) of one document; true when it changed.
fn inject_document(doc: &mut Value, args: &InjectArgs) -> Result<bool, String> {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
    let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
    let (template, path) = match kind.as_str() {
        "List" => {
            let mut changed = false;
            if let Some(items) = doc.get_mut("items").and_then(Value::as_array_mut) {
                for item in items {
                    changed |= inject_document(item, args)?;
                }
            }
            return Ok(changed);
        }
        "Pod" => (Some(&mut *doc), ""),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            (doc.pointer_mut("/spec/template"), "spec.template")
        }
        "CronJob" => (doc.pointer_mut("/spec/jobTemplate/spec/template"), "spec.jobTemplate.spec.template"),
        _ => return Ok(false),
    };
    let Some(template) = template.filter(|t| t.is_object()) else {
        return Err(format!("{kind} {name}: `{path}` is missing"));
    };
    let workload = if name.is_empty() {
        template.pointer("/metadata/generateName").and_then(Value::as_str).unwrap_or("unknown").trim_end_matches('-')
    } else {
        &name
    }
    .to_string();
    inject_pod(template, &workload, args).map_err(|e| format!("{kind} {name}: {e}"))
}

fn object<'a>(parent: &'a mut Value, key: &str) -> &'a mut Map<String, Value> {
    let map = parent.as_object_mut().expect("checked to be an object");
    let entry = map.entry(key.to_string()).or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    entry.as_object_mut().expect("just made an object")
}

fn array<'a>(parent: &'a mut Map<String, Value>, key: &str) -> &'a mut Vec<Value> {
    let entry = parent.entry(key.to_string()).or_insert_with(|| Value::Array(Vec::new()));
    if !entry.is_array() {
        *entry = Value::Array(Vec::new());
    }
    entry.as_array_mut().expect("just made an array")
}

fn text_of<'a>(map: Option<&'a Map<String, Value>>, key: &str) -> Option<&'a str> {
    map?.get(key)?.as_str()
}

/// Adds the sidecar to one pod template (`metadata` + `spec`).
fn inject_pod(template: &mut Value, workload: &str, args: &InjectArgs) -> Result<bool, String> {
    let meta = template.get("metadata").and_then(Value::as_object);
    let annotations = meta.and_then(|m| m.get("annotations")).and_then(Value::as_object).cloned();
    let labels = meta.and_then(|m| m.get("labels")).and_then(Value::as_object).cloned();
    let ann = |k: &str| text_of(annotations.as_ref(), k);
    if ann(INJECT) == Some("false") || text_of(labels.as_ref(), INJECT) == Some("false") {
        return Ok(false);
    }
    if ann(STATUS_ANNOTATION).is_some() {
        return Ok(false);
    }
    let spec = template.get("spec").and_then(Value::as_object).ok_or("the pod template has no `spec`")?;
    let has = |list: &str, name: &str| {
        spec.get(list)
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(|c| c.get("name").and_then(Value::as_str) == Some(name)))
    };
    if has("containers", PROXY_NAME) || has("initContainers", PROXY_NAME) || has("initContainers", INIT_NAME) {
        return Ok(false);
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        eprintln!("remora inject: {workload}: hostNetwork pods share the node's network and are not injected");
        return Ok(false);
    }
    let app = spec
        .get("containers")
        .and_then(Value::as_array)
        .and_then(|cs| cs.first())
        .and_then(|c| c.get("name"))
        .and_then(Value::as_str)
        .ok_or("the pod has no containers")?
        .to_string();
    let sa = spec.get("serviceAccountName").and_then(Value::as_str).unwrap_or("default").to_string();
    let native = match ann(NATIVE) {
        Some("true") => true,
        Some("false") => false,
        _ => !args.classic,
    };
    let identity = (!args.identity_secret.is_empty()).then(|| args.identity_secret.replace("{sa}", &sa));

    let init = init_container(args, annotations.as_ref());
    let proxy = proxy_container(args, workload, native, identity.is_some(), annotations.as_ref());
    let mut volumes = vec![
        match &args.control_plane {
            Some(_) => json!({"name": CACHE_VOLUME, "emptyDir": {}}),
            None => json!({"name": CONFIG_VOLUME, "configMap": {"name": args.config_map}}),
        },
        json!({"name": PODINFO_VOLUME, "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}}),
    ];
    if let Some(secret) = &identity {
        volumes.push(json!({"name": IDENTITY_VOLUME, "secret": {"secretName": secret}}));
    }
    let status = json!({
        "initContainers": if native { vec![INIT_NAME, PROXY_NAME] } else { vec![INIT_NAME] },
        "containers": if native { Vec::<&str>::new() } else { vec![PROXY_NAME] },
        "volumes": volumes.iter().filter_map(|v| v.get("name").cloned()).collect::<Vec<_>>(),
        "version": env!("CARGO_PKG_VERSION"),
    });

    let spec = object(template, "spec");
    let inits = array(spec, "initContainers");
    if native {
        inits.splice(0..0, [init, proxy]);
    } else {
        inits.insert(0, init);
        array(spec, "containers").insert(0, proxy);
    }
    array(spec, "volumes").extend(volumes);

    let meta = object(template, "metadata");
    let annotations = object_in(meta, "annotations");
    let scraped = annotations.clone();
    let mut set_default = |k: &str, v: String| {
        annotations.entry(k.to_string()).or_insert(Value::String(v));
    };
    // An app that is scraped already keeps its own scrape settings (the
    // proxy's metrics are still on 15090, for a PodMonitor or a second job).
    if !["prometheus.io/scrape", "prometheus.io/port", "prometheus.io/path"].iter().any(|k| scraped.contains_key(*k)) {
        set_default("prometheus.io/scrape", "true".into());
        set_default("prometheus.io/port", METRICS_PORT.to_string());
        set_default("prometheus.io/path", "/stats/prometheus".into());
    }
    set_default("kubectl.kubernetes.io/default-container", app.clone());
    set_default("kubectl.kubernetes.io/default-logs-container", app);
    annotations.insert(STATUS_ANNOTATION.into(), Value::String(status.to_string()));
    let labels_map = object_in(meta, "labels");
    let label =
        |keys: &[&str]| keys.iter().find_map(|k| labels_map.get(*k).and_then(Value::as_str)).map(str::to_string);
    let canonical_name = label(&["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"])
        .unwrap_or_else(|| workload.to_string());
    let canonical_rev = label(&["service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"])
        .unwrap_or("latest".into());
    labels_map.insert("security.istio.io/tlsMode".into(), Value::String("istio".into()));
    labels_map.entry("service.istio.io/canonical-name").or_insert(Value::String(canonical_name));
    labels_map.entry("service.istio.io/canonical-revision").or_insert(Value::String(canonical_rev));
    Ok(true)
}

fn object_in<'a>(map: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let entry = map.entry(key.to_string()).or_insert_with(|| Value::Object(Map::new()));
    if !entry.is_object() {
        *entry = Value::Object(Map::new());
    }
    entry.as_object_mut().expect("just made an object")
}

/// `remora iptables` with the pod's capture annotations.
fn init_container(args: &InjectArgs, annotations: Option<&Map<String, Value>>) -> Value {
    let ann = |k: &str| text_of(annotations, &format!("traffic.sidecar.istio.io/{k}"));
    let mut cmd: Vec<String> =
        ["iptables", "--proxy-port", "15001", "--inbound-port", "15006"].iter().map(|s| s.to_string()).collect();
    cmd.extend(["--uid".into(), PROXY_ID.to_string(), "--gid".into(), PROXY_ID.to_string()]);
    let mut exclude_inbound = PROXY_INBOUND_PORTS.to_string();
    if let Some(extra) = ann("excludeInboundPorts").filter(|v| !v.trim().is_empty()) {
        exclude_inbound = format!("{exclude_inbound},{}", extra.trim());
    }
    cmd.extend(["--exclude-inbound-ports".into(), exclude_inbound]);
    for (annotation, flag) in [
        ("includeInboundPorts", "--include-inbound-ports"),
        ("includeOutboundIPRanges", "--include-outbound-cidrs"),
        ("excludeOutboundIPRanges", "--exclude-outbound-cidrs"),
        ("includeOutboundPorts", "--include-outbound-ports"),
        ("excludeOutboundPorts", "--exclude-outbound-ports"),
    ] {
        if let Some(v) = ann(annotation) {
            cmd.extend([flag.to_string(), v.trim().to_string()]);
        }
    }
    json!({
        "name": INIT_NAME,
        "image": args.init_image,
        "args": cmd,
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    })
}

/// The proxy container.
fn proxy_container(
    args: &InjectArgs,
    workload: &str,
    native: bool,
    identity: bool,
    annotations: Option<&Map<String, Value>>,
) -> Value {
    let ann = |k: &str| text_of(annotations, &format!("sidecar.istio.io/{k}"));
    let cache_file = format!("{CACHE_DIR}/control-plane.json");
    let (mut run, mut mounts): (Vec<&str>, _) = match &args.control_plane {
        Some(url) => (
            vec!["run", "--capture", "--control-plane", url, "--config-cache", &cache_file],
            vec![json!({"name": CACHE_VOLUME, "mountPath": CACHE_DIR})],
        ),
        None => (
            vec!["run", "--capture", "--config", CONFIG_DIR],
            vec![json!({"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": true})],
        ),
    };
    mounts.push(json!({"name": PODINFO_VOLUME, "mountPath": PODINFO_DIR, "readOnly": true}));
    if identity {
        run.extend(["--identity-dir", IDENTITY_DIR]);
        mounts.push(json!({"name": IDENTITY_VOLUME, "mountPath": IDENTITY_DIR, "readOnly": true}));
    }
    let field = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let probe = json!({"httpGet": {"path": "/healthz/ready", "port": HEALTH_PORT}});
    let mut readiness = probe.clone();
    readiness.as_object_mut().expect("object").extend(
        json!({"initialDelaySeconds": 0, "periodSeconds": 15, "timeoutSeconds": 3, "failureThreshold": 4})
            .as_object()
            .expect("object")
            .clone(),
    );
    let mut startup = probe;
    startup.as_object_mut().expect("object").extend(
        json!({"periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 600}).as_object().expect("object").clone(),
    );
    let mut c = json!({
        "name": PROXY_NAME,
        "image": args.image,
        "args": run,
        "env": [
            field("REMORA_NAMESPACE", "metadata.namespace"),
            {"name": "REMORA_WORKLOAD_NAME", "value": workload},
            {"name": "REMORA_WORKLOAD_LABELS_FILE", "value": format!("{PODINFO_DIR}/labels")},
            field("POD_NAME", "metadata.name"),
            field("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            {"name": "REMORA_LOG_FORMAT", "value": "json"},
        ],
        "ports": [
            {"name": "remora-prom", "containerPort": METRICS_PORT, "protocol": "TCP"},
            {"name": "remora-health", "containerPort": HEALTH_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": readiness,
        "startupProbe": startup,
        "resources": {
            "requests": {"cpu": ann("proxyCPU").unwrap_or("50m"), "memory": ann("proxyMemory").unwrap_or("32Mi")},
            "limits": {"cpu": ann("proxyCPULimit").unwrap_or("1"), "memory": ann("proxyMemoryLimit").unwrap_or("256Mi")},
        },
        "securityContext": {
            "runAsUser": PROXY_ID,
            "runAsGroup": PROXY_ID,
            "runAsNonRoot": true,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "privileged": false,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": mounts,
    });
    let obj = c.as_object_mut().expect("object");
    if native {
        obj.insert("restartPolicy".into(), json!("Always"));
    } else {
        // The app's containers start only once this hook returns.
        obj.insert("lifecycle".into(), json!({"postStart": {"exec": {"command": ["/usr/local/bin/remora", "wait"]}}}));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_split_at_separator_lines() {
        let t = "a: 1\n---\nb: 2\n--- # c\nc: 3\n";
        let parts = split_documents(t);
        assert_eq!(parts, vec![(1, "a: 1\n"), (3, "b: 2\n"), (5, "c: 3\n")]);
        assert_eq!(split_documents("---\nx: 1"), vec![(1, ""), (2, "x: 1")]);
    }
}
