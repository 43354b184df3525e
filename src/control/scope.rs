//! What each proxy receives from the control plane: the resources visible
//! to its namespace and selected by its labels, as Istio scopes them.
//!
//! - ServiceEntry, VirtualService, DestinationRule: by `exportTo` (absent or
//!   `*`: every namespace; `.`: their own; `~`: none; or namespace names);
//! - Sidecar: in the proxy's namespace, selecting it by `workloadSelector`
//!   (or namespace-wide);
//! - PeerAuthentication, AuthorizationPolicy: in the proxy's namespace or
//!   the root namespace (`istio-system`), selecting it (or without selector);
//! - Gateway: selecting the proxy by `selector` (a proxy without labels is a
//!   standalone gateway and gets every Gateway, as remora compiles them).

use std::collections::BTreeMap;

use serde_json::Value;

/// Istio's root namespace: policies there apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// One Istio resource the control plane serves.
#[derive(Debug, Clone)]
pub struct Doc {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    export_to: Vec<String>,
    /// `workloadSelector.labels`, `selector.matchLabels` or a Gateway's `selector`.
    selector: Option<BTreeMap<String, String>>,
    /// The resource as YAML, with its namespace written out.
    pub text: String,
}

fn labels_at(v: &Value, pointer: &str) -> Option<BTreeMap<String, String>> {
    let map = v.pointer(pointer)?.as_object()?;
    Some(map.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string()))).collect())
}

/// The Istio resources of parsed documents (`kind: List` expanded; other
/// documents, such as Kubernetes' own, are left out), each with its
/// namespace (`default_ns` when it names none).
pub fn docs_from(values: Vec<Value>, default_ns: &str) -> Result<Vec<Doc>, String> {
    let mut out = Vec::new();
    let mut queue: Vec<Value> = values;
    queue.reverse();
    while let Some(mut v) = queue.pop() {
        if v.get("kind").and_then(Value::as_str) == Some("List") {
            if let Some(items) = v.get_mut("items").and_then(Value::as_array_mut) {
                queue.extend(items.drain(..).rev());
            }
            continue;
        }
        let api = v.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
        if !(api.starts_with("networking.istio.io/") || api.starts_with("security.istio.io/")) {
            continue;
        }
        let kind = v.get("kind").and_then(Value::as_str).unwrap_or_default().to_string();
        let name = v.pointer("/metadata/name").and_then(Value::as_str).unwrap_or_default().to_string();
        let namespace = v
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .unwrap_or(default_ns)
            .to_string();
        if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("namespace".into(), Value::String(namespace.clone()));
        }
        let export_to = v
            .pointer("/spec/exportTo")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        let selector = match kind.as_str() {
            "Sidecar" => labels_at(&v, "/spec/workloadSelector/labels"),
            "PeerAuthentication" | "AuthorizationPolicy" => labels_at(&v, "/spec/selector/matchLabels"),
            "Gateway" => labels_at(&v, "/spec/selector"),
            _ => None,
        }
        .filter(|s| !s.is_empty());
        let text = serde_saphyr::to_string(&v).map_err(|e| format!("{kind} {namespace}/{name}: {e}"))?;
        out.push(Doc { kind, namespace, name, export_to, selector, text });
    }
    Ok(out)
}

fn selects(selector: &Option<BTreeMap<String, String>>, labels: &BTreeMap<String, String>) -> bool {
    selector.as_ref().is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

fn exported(doc: &Doc, to: &str) -> bool {
    if doc.export_to.is_empty() {
        return true;
    }
    doc.export_to.iter().any(|e| match e.as_str() {
        "*" => true,
        "." => doc.namespace == to,
        "~" => false,
        ns => ns == to,
    })
}

/// True when a proxy in `namespace` with `labels` receives `doc`.
pub fn visible(doc: &Doc, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
    match doc.kind.as_str() {
        "ServiceEntry" | "VirtualService" | "DestinationRule" => exported(doc, namespace),
        "Sidecar" => doc.namespace == namespace && selects(&doc.selector, labels),
        "PeerAuthentication" | "AuthorizationPolicy" => {
            (doc.namespace == namespace || doc.namespace == ROOT_NAMESPACE) && selects(&doc.selector, labels)
        }
        "Gateway" => labels.is_empty() || (doc.selector.is_some() && selects(&doc.selector, labels)),
        _ => true,
    }
}

/// The YAML a proxy receives: its visible resources, in load order.
pub fn render(docs: &[Doc], namespace: &str, labels: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for d in docs.iter().filter(|d| visible(d, namespace, labels)) {
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&d.text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(yaml: &str) -> Vec<Doc> {
        docs_from(crate::config::load::parse_values(yaml).unwrap(), "default").unwrap()
    }

    fn names(docs: &[Doc], ns: &str, labels: &[(&str, &str)]) -> Vec<String> {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        docs.iter().filter(|d| visible(d, ns, &labels)).map(|d| format!("{}/{}", d.kind, d.name)).collect()
    }

    #[test]
    fn scoping_follows_export_to_and_selectors() {
        let d = docs(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: everyone}\nspec: {hosts: [a]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: mine, namespace: shop}\nspec: {hosts: [a], exportTo: [\".\"]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: listed, namespace: shop}\nspec: {host: a, exportTo: [payments]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: hidden}\nspec: {hosts: [b], exportTo: [\"~\"]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: ns-wide, namespace: shop}\nspec: {egress: [{hosts: [\"./*\"]}]}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: for-web, namespace: shop}\nspec: {workloadSelector: {labels: {app: web}}, egress: [{hosts: [\"./*\"]}]}\n---\n\
             apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: mesh, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n---\n\
             apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: api-only, namespace: shop}\nspec: {selector: {matchLabels: {app: api}}}\n---\n\
             apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: edge}\nspec: {selector: {istio: ingress}, servers: []}\n---\n\
             apiVersion: v1\nkind: ConfigMap\nmetadata: {name: not-istio}\n",
        );
        assert_eq!(d.len(), 9, "the ConfigMap is left out");
        assert!(d[0].text.contains("namespace: default"), "namespaces are written out: {}", d[0].text);
        assert_eq!(
            names(&d, "shop", &[("app", "web")]),
            [
                "ServiceEntry/everyone",
                "VirtualService/mine",
                "Sidecar/ns-wide",
                "Sidecar/for-web",
                "PeerAuthentication/mesh"
            ]
        );
        assert_eq!(
            names(&d, "payments", &[("app", "api")]),
            ["ServiceEntry/everyone", "DestinationRule/listed", "PeerAuthentication/mesh"]
        );
        assert_eq!(
            names(&d, "shop", &[("app", "api")]),
            [
                "ServiceEntry/everyone",
                "VirtualService/mine",
                "Sidecar/ns-wide",
                "PeerAuthentication/mesh",
                "AuthorizationPolicy/api-only"
            ]
        );
        assert!(names(&d, "edge", &[("istio", "ingress")]).contains(&"Gateway/edge".to_string()));
        assert!(names(&d, "edge", &[]).contains(&"Gateway/edge".to_string()), "standalone proxies get every Gateway");
        // Without labels: the three above and the Gateway.
        let text = render(&d, "payments", &BTreeMap::new());
        assert_eq!(text.matches("---\n").count(), 3, "{text}");
        assert!(text.contains("name: edge"), "{text}");
    }
}
