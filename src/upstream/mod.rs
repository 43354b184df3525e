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

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;

pub use lb::{HashSource, LbPolicy};
pub use pool::{EndpointState, PoolSettings, Protocol, SendError, UpstreamError};

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
}

/// A cluster in one snapshot.
pub struct Cluster {
    pub key: ClusterKey,
    pub name: Arc<str>,
    pub lb: LbPolicy,
    pub settings: PoolSettings,
    pub discovery: Discovery,
    /// Subset label selector, applied to resolved endpoints.
    pub selector: BTreeMap<String, String>,
    /// Policy as configured, for `/config_dump`.
    pub policy_json: serde_json::Value,
    endpoints: ArcSwap<lb::EndpointSet>,
    state: Arc<ClusterState>,
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
                state: self.state.endpoint(s.addr, self.settings),
                weight: s.weight.max(1),
                labels: Arc::new(s.labels.clone()),
            })
            .collect();
        lb::EndpointSet::new(eps, &self.lb)
    }

    /// Picks an endpoint for a request; `hash` is the request's consistent-hash
    /// key when the policy uses one. `None` when the cluster has no endpoint.
    pub fn pick(&self, hash: Option<u64>) -> Option<Arc<EndpointState>> {
        self.endpoints.load().pick(&self.lb, hash, &self.state.rr)
    }

    pub fn state(&self) -> &Arc<ClusterState> {
        &self.state
    }
}

/// Runtime state shared by every snapshot's copy of one cluster.
#[derive(Default)]
pub struct ClusterState {
    endpoints: Mutex<HashMap<SocketAddr, Weak<EndpointState>>>,
    rr: AtomicUsize,
}

impl ClusterState {
    fn endpoint(&self, addr: SocketAddr, settings: PoolSettings) -> Arc<EndpointState> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ep) = map.get(&addr).and_then(Weak::upgrade) {
            return ep;
        }
        map.retain(|_, w| w.strong_count() > 0);
        let ep = EndpointState::new(addr, settings);
        map.insert(addr, Arc::downgrade(&ep));
        ep
    }

    /// Position of the round-robin cursor (diagnostics).
    pub fn rr_position(&self) -> usize {
        self.rr.load(Ordering::Relaxed)
    }
}

/// Hands out [`ClusterState`] by cluster identity so that state outlives any one
/// snapshot. Entries die with the last snapshot that uses them.
#[derive(Default)]
pub struct Registry {
    states: Mutex<HashMap<(ClusterKey, PoolSettings), Weak<ClusterState>>>,
}

/// What the compiler knows about a cluster before runtime state is attached.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub key: ClusterKey,
    pub lb: LbPolicy,
    pub settings: PoolSettings,
    pub discovery: Discovery,
    pub selector: BTreeMap<String, String>,
    pub endpoints: Vec<EndpointSpec>,
    pub policy_json: serde_json::Value,
}

impl Registry {
    pub fn new() -> Self {
        Registry::default()
    }

    /// Builds a cluster for a snapshot, reusing the runtime state of the same
    /// cluster in earlier snapshots when its protocol and pool settings are
    /// unchanged (changed settings start with fresh pools).
    pub fn build(&self, spec: ClusterSpec) -> Arc<Cluster> {
        let state = {
            let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
            let id = (spec.key.clone(), spec.settings);
            match states.get(&id).and_then(Weak::upgrade) {
                Some(s) => s,
                None => {
                    states.retain(|_, w| w.strong_count() > 0);
                    let s = Arc::new(ClusterState::default());
                    states.insert(id, Arc::downgrade(&s));
                    s
                }
            }
        };
        let cluster = Cluster {
            name: spec.key.name().into(),
            key: spec.key,
            lb: spec.lb,
            settings: spec.settings,
            discovery: spec.discovery,
            selector: spec.selector,
            policy_json: spec.policy_json,
            endpoints: ArcSwap::from_pointee(lb::EndpointSet::default()),
            state,
        };
        cluster.set_endpoints(&spec.endpoints);
        Arc::new(cluster)
    }
}
