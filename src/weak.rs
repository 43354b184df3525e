//! A map of weak references for state that outlives one snapshot (cluster
//! runtime state, metric series): entries whose value is gone are forgotten
//! in sweeps that run when the map has doubled since the last one, so a
//! config with thousands of clusters builds in linear time.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Weak};

/// Entries a map holds before its first sweep.
const FIRST_SWEEP: usize = 64;

pub struct WeakMap<K, V> {
    map: HashMap<K, Weak<V>>,
    sweep_at: usize,
}

impl<K: Eq + Hash, V> Default for WeakMap<K, V> {
    fn default() -> Self {
        WeakMap { map: HashMap::new(), sweep_at: FIRST_SWEEP }
    }
}

impl<K: Eq + Hash, V> WeakMap<K, V> {
    /// The live value for `key`.
    pub fn get(&self, key: &K) -> Option<Arc<V>> {
        self.map.get(key).and_then(Weak::upgrade)
    }

    /// Remembers `value` under `key` (weakly).
    pub fn insert(&mut self, key: K, value: &Arc<V>) {
        if self.map.len() >= self.sweep_at {
            self.map.retain(|_, w| w.strong_count() > 0);
            self.sweep_at = (self.map.len() * 2).max(FIRST_SWEEP);
        }
        self.map.insert(key, Arc::downgrade(value));
    }

    /// Every live value.
    pub fn values(&self) -> impl Iterator<Item = Arc<V>> + '_ {
        self.map.values().filter_map(Weak::upgrade)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_entries_are_swept_and_live_ones_kept() {
        let mut m = WeakMap::default();
        let keep: Vec<Arc<usize>> = (0..10).map(Arc::new).collect();
        for (i, v) in keep.iter().enumerate() {
            m.insert(i, v);
        }
        for i in 10..10_000 {
            m.insert(i, &Arc::new(i)); // dropped at once
        }
        assert!(m.map.len() < 200, "swept: {}", m.map.len());
        assert_eq!(m.values().count(), 10);
        assert_eq!(m.get(&3).as_deref(), Some(&3));
        assert!(m.get(&9_999).is_none());
    }
}
