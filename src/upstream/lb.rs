//! Load balancers: small pickers over a cluster's current endpoint set.
//!
//! Everything that depends only on the endpoint list (cumulative weights, the
//! smooth weighted round-robin schedule, the hash ring) is computed once when
//! the set is built, so a pick is a few arithmetic operations and atomics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderName;

use super::{Endpoint, EndpointState};

/// Envoy's default `minimumRingSize` for ring-hash balancing.
pub const DEFAULT_MIN_RING_SIZE: u64 = 1024;

/// Upper bound on ring entries, as Envoy's `maximum_ring_size` default.
pub const MAX_RING_SIZE: u64 = 8 * 1024 * 1024;

/// Longest round-robin schedule precomputed; longer weight patterns are scaled
/// down proportionally.
const MAX_RR_SCHEDULE: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LbPolicy {
    /// Power of two choices on active requests (Istio's default).
    LeastRequest,
    RoundRobin,
    Random,
    ConsistentHash {
        source: HashSource,
        min_ring_size: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashSource {
    Header(HeaderName),
    Cookie { name: String, path: Option<String>, ttl: Option<Duration> },
    SourceIp,
    QueryParameter(String),
}

#[derive(Debug, Default)]
pub struct EndpointSet {
    pub endpoints: Vec<Endpoint>,
    /// cumulative[i] = sum of weights of endpoints[..=i].
    cumulative: Vec<u64>,
    total_weight: u64,
    rr_schedule: Vec<u32>,
    ring: Vec<(u64, u32)>,
}

impl EndpointSet {
    pub fn new(endpoints: Vec<Endpoint>, policy: &LbPolicy) -> Self {
        let mut cumulative = Vec::with_capacity(endpoints.len());
        let mut total = 0u64;
        for ep in &endpoints {
            total += u64::from(ep.weight.max(1));
            cumulative.push(total);
        }
        let weights: Vec<u64> = endpoints.iter().map(|e| u64::from(e.weight.max(1))).collect();
        let rr_schedule = match policy {
            LbPolicy::RoundRobin => smooth_wrr_schedule(&weights),
            _ => Vec::new(),
        };
        let ring = match policy {
            LbPolicy::ConsistentHash { min_ring_size, .. } => build_ring(&endpoints, &weights, *min_ring_size),
            _ => Vec::new(),
        };
        EndpointSet { endpoints, cumulative, total_weight: total, rr_schedule, ring }
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    fn weighted_random(&self) -> usize {
        let r = fastrand::u64(0..self.total_weight);
        self.cumulative.partition_point(|&c| c <= r)
    }

    pub fn pick(&self, policy: &LbPolicy, hash: Option<u64>, rr: &AtomicUsize) -> Option<&Endpoint> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            return self.endpoints.first();
        }
        let idx = match policy {
            LbPolicy::Random => self.weighted_random(),
            LbPolicy::RoundRobin => {
                let i = rr.fetch_add(1, Ordering::Relaxed);
                self.rr_schedule[i % self.rr_schedule.len()] as usize
            }
            LbPolicy::LeastRequest => {
                // Two weighted-random candidates; the one with fewer active
                // requests per unit of weight wins, ties go to the first so that
                // an idle cluster still follows the weights exactly.
                let a = self.weighted_random();
                let b = self.weighted_random();
                let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                let la = ea.state.active() as u64 * u64::from(eb.weight.max(1));
                let lb = eb.state.active() as u64 * u64::from(ea.weight.max(1));
                if lb < la { b } else { a }
            }
            LbPolicy::ConsistentHash { .. } => match hash {
                Some(h) => ring_lookup(&self.ring, h),
                None => self.weighted_random(),
            },
        };
        self.endpoints.get(idx)
    }
}

impl EndpointSet {
    /// A pick among endpoints that satisfy `ok` (slow path: ejected hosts or
    /// hosts a retry avoids). Consistent hashing walks the ring from the
    /// request's point to the next acceptable endpoint; other policies pick by
    /// weight among the acceptable ones.
    pub fn pick_filtered(
        &self,
        policy: &LbPolicy,
        hash: Option<u64>,
        ok: impl Fn(&EndpointState) -> bool,
    ) -> Option<&Endpoint> {
        if let (LbPolicy::ConsistentHash { .. }, Some(h), false) = (policy, hash, self.ring.is_empty()) {
            let start = self.ring.partition_point(|(k, _)| *k < h);
            for i in 0..self.ring.len() {
                let idx = self.ring[(start + i) % self.ring.len()].1 as usize;
                if ok(&self.endpoints[idx].state) {
                    return Some(&self.endpoints[idx]);
                }
            }
            return None;
        }
        let candidates: Vec<&Endpoint> = self.endpoints.iter().filter(|e| ok(&e.state)).collect();
        let total: u64 = candidates.iter().map(|e| u64::from(e.weight.max(1))).sum();
        if total == 0 {
            return None;
        }
        let mut r = fastrand::u64(0..total);
        for e in &candidates {
            let w = u64::from(e.weight.max(1));
            if r < w {
                return Some(e);
            }
            r -= w;
        }
        None
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// nginx's smooth weighted round robin, unrolled into a fixed schedule.
fn smooth_wrr_schedule(weights: &[u64]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u64> = weights.iter().map(|x| x / g).collect();
    let mut total: u64 = w.iter().sum();
    if total > MAX_RR_SCHEDULE {
        let scale = total as f64 / MAX_RR_SCHEDULE as f64;
        w = w.iter().map(|x| ((*x as f64 / scale).round() as u64).max(1)).collect();
        total = w.iter().sum();
    }
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        out.push(best as u32);
    }
    out
}

fn build_ring(endpoints: &[Endpoint], weights: &[u64], min_ring_size: u64) -> Vec<(u64, u32)> {
    let total: u64 = weights.iter().sum();
    if total == 0 {
        return Vec::new();
    }
    let target = min_ring_size.max(endpoints.len() as u64).min(MAX_RING_SIZE);
    let mut ring = Vec::with_capacity(target as usize + endpoints.len());
    for (i, (ep, w)) in endpoints.iter().zip(weights).enumerate() {
        let replicas = ((target as f64 * *w as f64 / total as f64).ceil() as u64).max(1);
        let base = ep.state.addr.to_string();
        for r in 0..replicas {
            let key = format!("{base}_{r}");
            ring.push((hash_bytes(key.as_bytes()), i as u32));
        }
    }
    ring.sort_unstable();
    ring
}

fn ring_lookup(ring: &[(u64, u32)], h: u64) -> usize {
    let i = ring.partition_point(|(k, _)| *k < h);
    let i = if i == ring.len() { 0 } else { i };
    ring[i].1 as usize
}

/// 64-bit hash for consistent hashing: FNV-1a with a splitmix finaliser for
/// avalanche. Stable across processes and versions, so every proxy maps a key
/// to the same endpoint.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut z = crate::config::fnv1a64(bytes);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swrr_interleaves_by_weight() {
        let s = smooth_wrr_schedule(&[5, 1, 1]);
        assert_eq!(s.len(), 7);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 5);
        // nginx's classic example: a a b a c a a
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0]);
        let s = smooth_wrr_schedule(&[2, 2]);
        assert_eq!(s, vec![0, 1]);
    }

    #[test]
    fn large_weights_are_scaled() {
        let s = smooth_wrr_schedule(&[100_000, 1]);
        assert!(s.len() as u64 <= MAX_RR_SCHEDULE + 2);
        assert!(s.contains(&1));
    }

    #[test]
    fn ring_lookup_wraps() {
        let ring = vec![(10, 0), (20, 1)];
        assert_eq!(ring_lookup(&ring, 5), 0);
        assert_eq!(ring_lookup(&ring, 15), 1);
        assert_eq!(ring_lookup(&ring, 25), 0);
    }
}
