//! Background DNS resolution for `resolution: DNS` clusters. Lookups run on
//! tokio's blocking pool, never on the request path; a failed refresh keeps the
//! last good answer.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{Cluster, Discovery, DnsTarget, EndpointSpec};

/// Istio's `dnsRefreshRate` default.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(60);

/// How long a reload waits for a new DNS cluster's first answer before it is
/// applied anyway (requests then get `UH` until the answer arrives).
pub const INITIAL_RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Retry interval for a cluster that has never resolved.
const RETRY_UNRESOLVED: Duration = Duration::from_secs(5);

/// Resolves every target once; `None` if no name resolved at all.
pub async fn resolve(targets: &[DnsTarget]) -> Option<Vec<EndpointSpec>> {
    let mut out = Vec::new();
    let mut any_ok = false;
    for t in targets {
        match tokio::net::lookup_host((t.name.as_str(), t.port)).await {
            Ok(addrs) => {
                any_ok = true;
                let mut seen = Vec::new();
                for addr in addrs {
                    if seen.contains(&addr) {
                        continue;
                    }
                    seen.push(addr);
                    out.push(EndpointSpec { addr, weight: t.weight, labels: t.labels.clone() });
                }
            }
            Err(e) => tracing::warn!(host = %t.name, error = %e, "DNS resolution failed"),
        }
    }
    any_ok.then_some(out)
}

/// Resolves a DNS cluster now (bounded by [`INITIAL_RESOLVE_TIMEOUT`]) and then
/// keeps refreshing it for as long as some snapshot holds the cluster.
pub async fn start(cluster: &Arc<Cluster>) {
    let Discovery::Dns { targets, refresh } = &cluster.discovery else {
        return;
    };
    let (targets, refresh) = (targets.clone(), *refresh);
    let mut last: Option<Vec<EndpointSpec>> = None;
    if let Ok(Some(eps)) = tokio::time::timeout(INITIAL_RESOLVE_TIMEOUT, resolve(&targets)).await {
        cluster.set_endpoints(&eps);
        last = Some(eps);
    }
    let weak: Weak<Cluster> = Arc::downgrade(cluster);
    tokio::spawn(async move {
        loop {
            // Until a first answer arrives, retry sooner than the refresh rate.
            let wait = if last.is_some() { refresh } else { refresh.min(RETRY_UNRESOLVED) };
            tokio::time::sleep(wait).await;
            if weak.strong_count() == 0 {
                return;
            }
            let Some(eps) = resolve(&targets).await else { continue };
            let Some(cluster) = weak.upgrade() else { return };
            if last.as_ref() != Some(&eps) {
                tracing::debug!(cluster = %cluster.name, endpoints = eps.len(), "DNS answer changed");
                cluster.set_endpoints(&eps);
                last = Some(eps);
            }
        }
    });
}
