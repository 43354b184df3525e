//! Clusters: where a routed request goes. A cluster is a service host, an
//! optional subset and a port; it holds the endpoint list (hot-swapped when DNS
//! answers change), the load-balancing policy, and the per-endpoint connection
//! pools. Runtime state (pools, in-flight counts, round-robin position) lives in
//! a [`ClusterState`] that the [`Registry`] hands to the next snapshot when a
//! reload keeps the cluster, so a reload never drops healthy connections.

pub mod dns;
pub mod lb;
pub mod outlier;
pub mod pool;

use crate::telemetry::metrics;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;

pub use lb::{HashSource, LbPolicy};
pub use outlier::OutlierConfig;
pub use pool::{ClusterShared, EndpointState, PoolSettings, Protocol, SendError, UpstreamError};

/// Identity of a cluster, after Istio's naming (`outbound|9080|v1|reviews.default.svc.cluster.local`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterKey {
    pub direction: Direction,
    pub port: u16,
    pub subset: Option<String>,
    pub host: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl ClusterKey {
    pub fn name(&self) -> String {
        let dir = match self.direction {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        };
        format!("{dir}|{}|{}|{}", self.port, self.subset.as_deref().unwrap_or(""), self.host)
    }
}

/// One endpoint as configured (or resolved), before runtime state is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub addr: SocketAddr,
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
}

/// How a cluster learns its endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// Fixed addresses from the config.
    Static,
    /// Names resolved in the background and refreshed every `refresh`.
    Dns { targets: Vec<DnsTarget>, refresh: Duration },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    pub name: String,
    pub port: u16,
    pub weight: u32,
    pub labels: BTreeMap<String, String>,
}

/// A live endpoint in a cluster's current set.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub state: Arc<EndpointState>,
    pub weight: u32,
    pub labels: Arc<BTreeMap<String, String>>,
    /// Istio metrics for requests to this endpoint.
    pub metrics: Arc<metrics::Target>,
}

/// A cluster in one snapshot.
pub struct Cluster {
    pub key: ClusterKey,
    pub name: Arc<str>,
    pub lb: LbPolicy,
    pub settings: PoolSettings,
    pub outlier: Option<OutlierConfig>,
    pub discovery: Discovery,
    /// Subset label selector, applied to resolved endpoints.
    pub selector: BTreeMap<String, String>,
    /// Policy as configured, for `/config_dump`.
    pub policy_json: serde_json::Value,
    endpoints: ArcSwap<lb::EndpointSet>,
    state: Arc<ClusterState>,
    metrics: Arc<metrics::Metrics>,
    /// Istio metrics for requests that reached no endpoint (UH, UO, ...).
    pub cluster_metrics: Arc<metrics::Target>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("name", &self.name).finish()
    }
}

impl Cluster {
    pub fn endpoints(&self) -> arc_swap::Guard<Arc<lb::EndpointSet>> {
        self.endpoints.load()
    }

    /// Replaces the endpoint list (DNS refresh), keeping the runtime state of
    /// endpoints that stay.
    pub fn set_endpoints(&self, specs: &[EndpointSpec]) {
        let set = self.build_set(specs);
        self.endpoints.store(Arc::new(set));
    }

    fn build_set(&self, specs: &[EndpointSpec]) -> lb::EndpointSet {
        let eps = specs
            .iter()
            .filter(|s| self.selector.iter().all(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| Endpoint {
                state: self.state.endpoint(s.addr),
                weight: s.weight.max(1),
                labels: Arc::new(s.labels.clone()),
                metrics: self.metrics.target(self.reporter(), self.destination(&s.labels)),
            })
            .collect();
        lb::EndpointSet::new(eps, &self.lb)
    }

    /// Picks an endpoint for a request; `hash` is the request's consistent-hash
    /// key when the policy uses one. Ejected endpoints are skipped (unless the
    /// cluster is in panic mode), and so are `avoid` (hosts a retry already
    /// tried) while others remain. `None` when no endpoint is available.
    pub fn pick(&self, hash: Option<u64>, avoid: &[SocketAddr]) -> Option<Endpoint> {
        let set = self.endpoints.load();
        let panic = self.state.shared.detector.as_ref().is_some_and(|d| d.panic(set.len()));
        let healthy = |e: &EndpointState| panic || !e.is_ejected();
        // Envoy's host-selection retry: re-pick a few times before filtering.
        for _ in 0..HOST_SELECTION_ATTEMPTS {
            let ep = set.pick(&self.lb, hash, &self.state.rr)?;
            if healthy(&ep.state) && !avoid.contains(&ep.state.addr) {
                return Some(ep.clone());
            }
        }
        set.pick_filtered(&self.lb, hash, |e| healthy(e) && !avoid.contains(&e.addr))
            .or_else(|| set.pick_filtered(&self.lb, hash, healthy))
            .cloned()
    }

    fn reporter(&self) -> metrics::Reporter {
        match self.key.direction {
            Direction::Outbound => metrics::Reporter::Source,
            Direction::Inbound => metrics::Reporter::Destination,
        }
    }

    /// The metrics' view of this cluster with an endpoint's labels.
    fn destination(&self, labels: &BTreeMap<String, String>) -> metrics::Destination {
        let (service, namespace) = match self.key.direction {
            Direction::Outbound => {
                let ns = self
                    .key
                    .host
                    .strip_suffix(".svc.cluster.local")
                    .and_then(|p| p.split_once('.'))
                    .map(|(_, ns)| ns.to_string());
                (self.key.host.clone(), ns)
            }
            // The inbound side serves this workload; Istio names the
            // service after it.
            Direction::Inbound => (String::new(), None),
        };
        metrics::Destination { service, service_name: None, namespace, labels: labels.clone() }
    }

    /// The stats, limits and detector shared by this cluster's endpoints.
    pub fn shared(&self) -> &Arc<ClusterShared> {
        &self.state.shared
    }

    pub fn state(&self) -> &Arc<ClusterState> {
        &self.state
    }
}

/// Re-picks before falling back to filtering the endpoint list (Envoy's
/// `host_selection_retry_max_attempts`, which Istio sets to 5).
const HOST_SELECTION_ATTEMPTS: usize = 5;

/// Runtime state shared by every snapshot's copy of one cluster.
pub struct ClusterState {
    pub shared: Arc<ClusterShared>,
    endpoints: Mutex<HashMap<SocketAddr, Weak<EndpointState>>>,
    rr: AtomicUsize,
}

impl AsRef<outlier::Detector> for ClusterState {
    fn as_ref(&self) -> &outlier::Detector {
        // Only clusters with a detector run a sweeper.
        self.shared.detector.as_ref().unwrap_or(&NO_DETECTOR)
    }
}

static NO_DETECTOR: std::sync::LazyLock<outlier::Detector> =
    std::sync::LazyLock::new(|| outlier::Detector::new(OutlierConfig::default()));

impl ClusterState {
    fn endpoint(&self, addr: SocketAddr) -> Arc<EndpointState> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ep) = map.get(&addr).and_then(Weak::upgrade) {
            return ep;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let ep = EndpointState::new(addr, self.shared.clone());
        map.insert(addr, Arc::downgrade(&ep));
        ep
    }

    /// Endpoints alive in some snapshot.
    pub fn live_endpoints(&self) -> Vec<Arc<EndpointState>> {
        let map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = map.values().filter_map(Weak::upgrade).collect();
        v.sort_by_key(|e| e.addr);
        v
    }

    /// Position of the round-robin cursor (diagnostics).
    pub fn rr_position(&self) -> usize {
        self.rr.load(Ordering::Relaxed)
    }
}

/// Hands out [`ClusterState`] by cluster identity so that state outlives any one
/// snapshot. Entries die with the last snapshot that uses them.
/// Runtime state is shared only between clusters with the same identity and
/// the same pool and outlier settings.
type StateKey = (ClusterKey, PoolSettings, Option<OutlierConfig>, crate::tls::UpstreamTls);

pub struct Registry {
    states: Mutex<crate::weak::WeakMap<StateKey, ClusterState>>,
    metrics: Arc<metrics::Metrics>,
    identity: Option<Arc<crate::tls::IdentityStore>>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::with_metrics(metrics::Metrics::new(metrics::Workload::default()))
    }
}

/// What the compiler knows about a cluster before runtime state is attached.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub key: ClusterKey,
    pub lb: LbPolicy,
    pub settings: PoolSettings,
    pub outlier: Option<OutlierConfig>,
    pub tls: crate::tls::UpstreamTls,
    pub discovery: Discovery,
    pub selector: BTreeMap<String, String>,
    pub endpoints: Vec<EndpointSpec>,
    pub policy_json: serde_json::Value,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    /// A registry whose clusters report into `metrics`.
    pub fn with_metrics(metrics: Arc<metrics::Metrics>) -> Self {
        Registry { states: Mutex::new(crate::weak::WeakMap::default()), metrics, identity: None }
    }

    /// Clusters with mTLS present this workload identity.
    pub fn with_identity(mut self, identity: Arc<crate::tls::IdentityStore>) -> Self {
        self.identity = Some(identity);
        self
    }

    pub fn identity(&self) -> Option<&Arc<crate::tls::IdentityStore>> {
        self.identity.as_ref()
    }

    /// Plain TCP, or mTLS with the workload identity.
    fn connector(&self, spec: &ClusterSpec) -> Arc<dyn pool::Connect> {
        let h2 = spec.settings.protocol == Protocol::Http2;
        if let crate::tls::UpstreamTls::Originate(t) = &spec.tls {
            return Arc::new(crate::tls::OriginateConnect::new(t));
        }
        match (&spec.tls, &self.identity) {
            (crate::tls::UpstreamTls::Plain, _) => Arc::new(pool::TcpConnect),
            (mesh, Some(id)) => match crate::tls::MeshConnect::new(id, mesh, h2) {
                Some(c) => Arc::new(c),
                None => Arc::new(pool::Refuse("mTLS connector could not be built")),
            },
            // The compiler refuses mTLS config without an identity; never
            // fall back to plaintext if one got here anyway.
            (_, None) => Arc::new(pool::Refuse("mTLS needs the workload identity")),
        }
    }

    pub fn metrics(&self) -> &Arc<metrics::Metrics> {
        &self.metrics
    }

    /// Builds a cluster for a snapshot, reusing the runtime state of the same
    /// cluster in earlier snapshots when its pool and outlier settings are
    /// unchanged (changed settings start with fresh pools and counters).
    pub fn build(&self, spec: ClusterSpec) -> Arc<Cluster> {
        let state = {
            let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
            let id = (spec.key.clone(), spec.settings, spec.outlier, spec.tls.clone());
            match states.get(&id) {
                Some(s) => s,
                None => {
                    let detector = spec.outlier.map(outlier::Detector::new);
                    let s = Arc::new(ClusterState {
                        shared: ClusterShared::new(spec.settings, detector, self.connector(&spec)),
                        endpoints: Mutex::new(HashMap::new()),
                        rr: AtomicUsize::new(0),
                    });
                    if let (Some(cfg), Ok(_)) = (spec.outlier, tokio::runtime::Handle::try_current()) {
                        outlier::spawn_sweeper(Arc::downgrade(&s), cfg.interval, |st: &ClusterState| {
                            st.live_endpoints().into_iter().map(|e| e as Arc<dyn outlier::Monitored>).collect()
                        });
                    }
                    states.insert(id, &s);
                    s
                }
            }
        };
        let cluster = Cluster {
            name: spec.key.name().into(),
            key: spec.key,
            lb: spec.lb,
            settings: spec.settings,
            outlier: spec.outlier,
            discovery: spec.discovery,
            selector: spec.selector,
            policy_json: spec.policy_json,
            endpoints: ArcSwap::from_pointee(lb::EndpointSet::default()),
            state,
            metrics: self.metrics.clone(),
            cluster_metrics: self.metrics.special(metrics::Special::Unknown),
        };
        let cluster = Cluster {
            cluster_metrics: cluster.metrics.target(cluster.reporter(), cluster.destination(&BTreeMap::new())),
            ..cluster
        };
        cluster.set_endpoints(&spec.endpoints);
        Arc::new(cluster)
    }
}
