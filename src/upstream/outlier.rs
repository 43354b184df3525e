//! Outlier detection with Envoy's algorithm (`outlier_detection_impl.cc`):
//! consecutive 5xx / gateway-error / local-origin failure counters per
//! endpoint; ejection under the strict max-ejection-percent rule; ejection time
//! of `base × backoff` (backoff grows per re-ejection, decays per healthy
//! interval, capped at `max(300 s, base)`); release only on interval ticks;
//! panic mode below `minHealthPercent`.
//!
//! Counters are atomics touched on every response; the ejection decision and
//! the sweep take a short per-cluster lock, never across an await.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

/// Envoy's defaults, which Istio keeps.
pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
pub const DEFAULT_CONSECUTIVE_LOCAL_ORIGIN: u32 = 5;
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
/// Envoy's `max_ejection_time` default (Istio doesn't set it).
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

/// Effective outlier-detection settings of one cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OutlierConfig {
    /// 0 disables.
    pub consecutive_5xx: u32,
    /// 0 disables.
    pub consecutive_gateway: u32,
    pub split_local_origin: bool,
    /// Used only with `split_local_origin`.
    pub consecutive_local_origin: u32,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_time: Duration,
    pub max_ejection_percent: u32,
    /// Panic threshold: below this share of healthy endpoints, ejections are
    /// ignored by the load balancer. Istio's default 0 disables panic mode.
    pub min_health_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_5xx: DEFAULT_CONSECUTIVE_5XX,
            consecutive_gateway: 0,
            split_local_origin: false,
            consecutive_local_origin: DEFAULT_CONSECUTIVE_LOCAL_ORIGIN,
            interval: DEFAULT_INTERVAL,
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME,
            max_ejection_percent: DEFAULT_MAX_EJECTION_PERCENT,
            min_health_percent: 0,
        }
    }
}

impl OutlierConfig {
    /// Envoy: the cap is `max_ejection_time`, or the base time if larger.
    fn cap(&self) -> Duration {
        self.max_ejection_time.max(self.base_ejection)
    }

    /// Whether the strict max-percent rule allows ejecting even one of `hosts`.
    pub fn can_eject_any(&self, hosts: usize) -> bool {
        hosts > 0 && 100.0 / hosts as f64 <= f64::from(self.max_ejection_percent)
    }
}

/// What happened to one request at one endpoint, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP response with this status came back from the endpoint.
    Response(u16),
    /// Connecting failed or timed out (locally originated).
    ConnectFailure,
    /// The connection was reset or closed before a response (locally seen).
    Reset,
    /// No response within the (per-try) timeout.
    Timeout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EjectionReason {
    Consecutive5xx,
    ConsecutiveGatewayFailure,
    ConsecutiveLocalOriginFailure,
}

impl EjectionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EjectionReason::Consecutive5xx => "consecutive_5xx",
            EjectionReason::ConsecutiveGatewayFailure => "consecutive_gateway_failure",
            EjectionReason::ConsecutiveLocalOriginFailure => "consecutive_local_origin_failure",
        }
    }
}

/// Per-endpoint counters and ejection state.
#[derive(Debug, Default)]
pub struct HostMonitor {
    c5xx: AtomicU32,
    cgw: AtomicU32,
    clocal: AtomicU32,
    ejected: AtomicBool,
    times: Mutex<HostTimes>,
}

#[derive(Debug, Default)]
struct HostTimes {
    backoff: u32,
    last_ejection: Option<Instant>,
    last_unejection: Option<Instant>,
}

impl HostMonitor {
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Relaxed)
    }

    /// The current ejection multiplier (0 when never ejected or fully decayed).
    pub fn backoff(&self) -> u32 {
        self.times.lock().unwrap_or_else(|p| p.into_inner()).backoff
    }

    fn reset_counters(&self) {
        self.c5xx.store(0, Ordering::Relaxed);
        self.cgw.store(0, Ordering::Relaxed);
        self.clocal.store(0, Ordering::Relaxed);
    }
}

/// Outlier-detection statistics of one cluster (Envoy's names).
#[derive(Debug, Default)]
pub struct OutlierStats {
    pub ejections_active: AtomicUsize,
    pub ejections_enforced_total: AtomicU64,
    pub ejections_overflow: AtomicU64,
    pub ejections_enforced_consecutive_5xx: AtomicU64,
    pub ejections_enforced_consecutive_gateway_failure: AtomicU64,
    pub ejections_enforced_consecutive_local_origin_failure: AtomicU64,
}

/// A host as the detector sees it: its address (for logs) and its monitor.
pub trait Monitored: Send + Sync {
    fn monitor(&self) -> &HostMonitor;
    fn label(&self) -> String;
}

/// The per-cluster detector.
#[derive(Debug)]
pub struct Detector {
    pub config: OutlierConfig,
    pub stats: OutlierStats,
    /// Serialises ejection decisions so the percent rule counts correctly.
    decide: Mutex<()>,
}

impl Detector {
    pub fn new(config: OutlierConfig) -> Self {
        Detector { config, stats: OutlierStats::default(), decide: Mutex::new(()) }
    }

    /// Records one outcome at `host`; `hosts` is the number of endpoints in
    /// the cluster. Returns the reason when this outcome ejected the host.
    pub fn record(&self, host: &dyn Monitored, outcome: Outcome, hosts: usize, now: Instant) -> Option<EjectionReason> {
        let m = host.monitor();
        let cfg = &self.config;
        let code = match outcome {
            Outcome::Response(code) => code,
            Outcome::ConnectFailure | Outcome::Reset | Outcome::Timeout if cfg.split_local_origin => {
                let n = m.clocal.fetch_add(1, Ordering::Relaxed) + 1;
                if cfg.consecutive_local_origin > 0 && n == cfg.consecutive_local_origin {
                    return self.detected(host, EjectionReason::ConsecutiveLocalOriginFailure, hosts, now);
                }
                return None;
            }
            // Without the split, local failures count as the gateway errors
            // Envoy maps them to.
            Outcome::ConnectFailure | Outcome::Reset => 503,
            Outcome::Timeout => 504,
        };
        if cfg.split_local_origin {
            // A response means the connection worked.
            m.clocal.store(0, Ordering::Relaxed);
        }
        if !(500..600).contains(&code) {
            m.c5xx.store(0, Ordering::Relaxed);
            m.cgw.store(0, Ordering::Relaxed);
            return None;
        }
        if matches!(code, 502..=504) {
            let n = m.cgw.fetch_add(1, Ordering::Relaxed) + 1;
            if cfg.consecutive_gateway > 0
                && n == cfg.consecutive_gateway
                && let Some(r) = self.detected(host, EjectionReason::ConsecutiveGatewayFailure, hosts, now)
            {
                return Some(r);
            }
        } else {
            m.cgw.store(0, Ordering::Relaxed);
        }
        let n = m.c5xx.fetch_add(1, Ordering::Relaxed) + 1;
        if cfg.consecutive_5xx > 0 && n == cfg.consecutive_5xx {
            return self.detected(host, EjectionReason::Consecutive5xx, hosts, now);
        }
        None
    }

    fn detected(
        &self,
        host: &dyn Monitored,
        reason: EjectionReason,
        hosts: usize,
        now: Instant,
    ) -> Option<EjectionReason> {
        let _one = self.decide.lock().unwrap_or_else(|p| p.into_inner());
        let m = host.monitor();
        // The triggering counter starts over whatever the decision.
        match reason {
            EjectionReason::Consecutive5xx => m.c5xx.store(0, Ordering::Relaxed),
            EjectionReason::ConsecutiveGatewayFailure => m.cgw.store(0, Ordering::Relaxed),
            EjectionReason::ConsecutiveLocalOriginFailure => m.clocal.store(0, Ordering::Relaxed),
        }
        if m.is_ejected() || hosts == 0 {
            return None;
        }
        let active = self.stats.ejections_active.load(Ordering::Relaxed);
        // Envoy's strict rule (envoy#27909): the ejection must keep the
        // ejected share at or under the maximum, counting this host.
        let percent = 100.0 * (active + 1) as f64 / hosts as f64;
        if percent > f64::from(self.config.max_ejection_percent) {
            self.stats.ejections_overflow.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                endpoint = %host.label(),
                reason = reason.as_str(),
                ejected = active,
                hosts,
                max_ejection_percent = self.config.max_ejection_percent,
                "outlier detected but not ejected: maxEjectionPercent reached"
            );
            return None;
        }
        let mut t = m.times.lock().unwrap_or_else(|p| p.into_inner());
        let cap = self.config.cap();
        if self.config.base_ejection * t.backoff < cap + self.config.base_ejection {
            t.backoff += 1;
        }
        t.last_ejection = Some(now);
        let duration = (self.config.base_ejection * t.backoff).min(cap);
        drop(t);
        m.ejected.store(true, Ordering::Relaxed);
        self.stats.ejections_active.fetch_add(1, Ordering::Relaxed);
        self.stats.ejections_enforced_total.fetch_add(1, Ordering::Relaxed);
        let per_reason = match reason {
            EjectionReason::Consecutive5xx => &self.stats.ejections_enforced_consecutive_5xx,
            EjectionReason::ConsecutiveGatewayFailure => &self.stats.ejections_enforced_consecutive_gateway_failure,
            EjectionReason::ConsecutiveLocalOriginFailure => {
                &self.stats.ejections_enforced_consecutive_local_origin_failure
            }
        };
        per_reason.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(endpoint = %host.label(), reason = reason.as_str(), ejection_ms = duration.as_millis() as u64, "endpoint ejected");
        Some(reason)
    }

    /// The interval tick: releases hosts whose ejection time has passed and
    /// decays the backoff of hosts that stayed healthy for an interval.
    pub fn sweep(&self, hosts: &[Arc<dyn Monitored>], now: Instant) {
        let _one = self.decide.lock().unwrap_or_else(|p| p.into_inner());
        let cap = self.config.cap();
        for h in hosts {
            let m = h.monitor();
            let mut t = m.times.lock().unwrap_or_else(|p| p.into_inner());
            if m.is_ejected() {
                let due = (self.config.base_ejection * t.backoff).min(cap);
                if t.last_ejection.is_none_or(|at| now.duration_since(at) >= due) {
                    m.ejected.store(false, Ordering::Relaxed);
                    t.last_unejection = Some(now);
                    drop(t);
                    m.reset_counters();
                    self.stats.ejections_active.fetch_sub(1, Ordering::Relaxed);
                    tracing::info!(endpoint = %h.label(), "endpoint returned from ejection");
                }
            } else if t.backoff > 0 {
                let healthy_since = t.last_unejection.or(t.last_ejection);
                if healthy_since.is_none_or(|at| now.duration_since(at) >= self.config.interval) {
                    t.backoff -= 1;
                }
            }
        }
    }

    /// Whether the load balancer should ignore ejections (panic mode): fewer
    /// than `min_health_percent` of `hosts` are healthy.
    pub fn panic(&self, hosts: usize) -> bool {
        if hosts == 0 || self.config.min_health_percent == 0 {
            return false;
        }
        let ejected = self.stats.ejections_active.load(Ordering::Relaxed).min(hosts);
        let healthy = (hosts - ejected) as f64 * 100.0 / hosts as f64;
        healthy < f64::from(self.config.min_health_percent)
    }

    /// Forgets a host that left the cluster while ejected.
    pub fn forget(&self, host: &dyn Monitored) {
        let _one = self.decide.lock().unwrap_or_else(|p| p.into_inner());
        if host.monitor().ejected.swap(false, Ordering::Relaxed) {
            self.stats.ejections_active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Runs the sweep every `interval` for as long as the owner lives; `hosts`
/// returns the cluster's current endpoints.
pub fn spawn_sweeper<O, F>(owner: Weak<O>, interval: Duration, hosts: F)
where
    O: Send + Sync + 'static + AsRef<Detector>,
    F: Fn(&O) -> Vec<Arc<dyn Monitored>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(o) = owner.upgrade() else { return };
            let list = hosts(&o);
            AsRef::<Detector>::as_ref(&*o).sweep(&list, Instant::now());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Host(HostMonitor, &'static str);
    impl Monitored for Host {
        fn monitor(&self) -> &HostMonitor {
            &self.0
        }
        fn label(&self) -> String {
            self.1.to_string()
        }
    }

    fn hosts(n: usize) -> Vec<Arc<dyn Monitored>> {
        (0..n).map(|_| Arc::new(Host(HostMonitor::default(), "h")) as Arc<dyn Monitored>).collect()
    }

    fn cfg(consecutive_5xx: u32, max_percent: u32) -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx,
            interval: Duration::from_secs(1),
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: max_percent,
            ..OutlierConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_5xx_ejects_and_a_success_resets() {
        let d = Detector::new(cfg(3, 100));
        let h = hosts(2);
        let now = Instant::now();
        d.record(h[0].as_ref(), Outcome::Response(500), 2, now);
        d.record(h[0].as_ref(), Outcome::Response(503), 2, now);
        d.record(h[0].as_ref(), Outcome::Response(200), 2, now);
        d.record(h[0].as_ref(), Outcome::Response(500), 2, now);
        d.record(h[0].as_ref(), Outcome::Response(500), 2, now);
        assert!(!h[0].monitor().is_ejected(), "a success in between resets the count");
        assert_eq!(d.record(h[0].as_ref(), Outcome::ConnectFailure, 2, now), Some(EjectionReason::Consecutive5xx));
        assert!(h[0].monitor().is_ejected());
        assert_eq!(d.stats.ejections_active.load(Ordering::Relaxed), 1);
        // 4xx are not failures.
        for _ in 0..10 {
            d.record(h[1].as_ref(), Outcome::Response(404), 2, now);
        }
        assert!(!h[1].monitor().is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_grows_with_reejection_and_decays() {
        let d = Detector::new(cfg(1, 100));
        let h = hosts(2);
        let t0 = Instant::now();
        d.record(h[0].as_ref(), Outcome::Response(500), 2, t0);
        assert_eq!(h[0].monitor().backoff(), 1);
        // Released only on an interval tick at or after base (10 s).
        d.sweep(&h, t0 + Duration::from_secs(9));
        assert!(h[0].monitor().is_ejected());
        d.sweep(&h, t0 + Duration::from_secs(10));
        assert!(!h[0].monitor().is_ejected());
        // Re-ejected right away: 2 × base.
        let t1 = t0 + Duration::from_secs(10);
        d.record(h[0].as_ref(), Outcome::Response(500), 2, t1);
        assert_eq!(h[0].monitor().backoff(), 2);
        d.sweep(&h, t1 + Duration::from_secs(19));
        assert!(h[0].monitor().is_ejected());
        d.sweep(&h, t1 + Duration::from_secs(20));
        assert!(!h[0].monitor().is_ejected());
        // Healthy intervals decay the multiplier one step each.
        let t2 = t1 + Duration::from_secs(20);
        d.sweep(&h, t2 + Duration::from_secs(1));
        assert_eq!(h[0].monitor().backoff(), 1);
        d.sweep(&h, t2 + Duration::from_secs(2));
        assert_eq!(h[0].monitor().backoff(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_time_is_capped() {
        let mut c = cfg(1, 100);
        c.max_ejection_time = Duration::from_secs(25);
        let d = Detector::new(c);
        let h = hosts(1);
        let mut now = Instant::now();
        for _ in 0..6 {
            d.record(h[0].as_ref(), Outcome::Response(500), 1, now);
            now += Duration::from_secs(25);
            d.sweep(&h, now);
            assert!(!h[0].monitor().is_ejected(), "never longer than the cap");
        }
        // Backoff stops growing once base × backoff reaches cap + base.
        assert!(h[0].monitor().backoff() <= 4, "{}", h[0].monitor().backoff());
    }

    #[tokio::test(start_paused = true)]
    async fn strict_max_ejection_percent() {
        // Default 10 %: with fewer than 10 hosts nothing is ever ejected.
        let d = Detector::new(cfg(1, 10));
        let h = hosts(9);
        assert!(!d.config.can_eject_any(9));
        assert!(d.config.can_eject_any(10));
        d.record(h[0].as_ref(), Outcome::Response(500), 9, Instant::now());
        assert!(!h[0].monitor().is_ejected());
        assert_eq!(d.stats.ejections_overflow.load(Ordering::Relaxed), 1);
        // 50 % of 3 hosts allows one ejection, not two (the "+1").
        let d = Detector::new(cfg(1, 50));
        let h = hosts(3);
        let now = Instant::now();
        d.record(h[0].as_ref(), Outcome::Response(500), 3, now);
        d.record(h[1].as_ref(), Outcome::Response(500), 3, now);
        assert!(h[0].monitor().is_ejected());
        assert!(!h[1].monitor().is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn gateway_errors_and_split_local_origin() {
        let mut c = cfg(0, 100);
        c.consecutive_gateway = 2;
        let d = Detector::new(c);
        let h = hosts(2);
        let now = Instant::now();
        d.record(h[0].as_ref(), Outcome::Response(500), 2, now);
        d.record(h[0].as_ref(), Outcome::Response(500), 2, now);
        assert!(!h[0].monitor().is_ejected(), "500 is not a gateway error");
        d.record(h[0].as_ref(), Outcome::Response(502), 2, now);
        d.record(h[0].as_ref(), Outcome::Timeout, 2, now);
        assert!(h[0].monitor().is_ejected(), "a local timeout counts as 504");

        let mut c = cfg(0, 100);
        c.split_local_origin = true;
        c.consecutive_local_origin = 2;
        let d = Detector::new(c);
        d.record(h[1].as_ref(), Outcome::ConnectFailure, 2, now);
        d.record(h[1].as_ref(), Outcome::Response(200), 2, now);
        d.record(h[1].as_ref(), Outcome::ConnectFailure, 2, now);
        assert!(!h[1].monitor().is_ejected(), "a response resets the local-origin count");
        assert_eq!(
            d.record(h[1].as_ref(), Outcome::ConnectFailure, 2, now),
            Some(EjectionReason::ConsecutiveLocalOriginFailure)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn panic_threshold() {
        let mut c = cfg(1, 100);
        c.min_health_percent = 50;
        let d = Detector::new(c);
        let h = hosts(2);
        let now = Instant::now();
        d.record(h[0].as_ref(), Outcome::Response(500), 2, now);
        assert!(!d.panic(2), "50 % healthy is not below 50 %");
        d.record(h[1].as_ref(), Outcome::Response(500), 2, now);
        assert!(d.panic(2));
        // Istio's default 0 never panics.
        let d = Detector::new(cfg(1, 100));
        assert!(!d.panic(2));
    }

    struct Owner(Detector, Vec<Arc<dyn Monitored>>);
    impl AsRef<Detector> for Owner {
        fn as_ref(&self) -> &Detector {
            &self.0
        }
    }

    #[tokio::test(start_paused = true)]
    async fn sweeper_releases_on_ticks() {
        let owner = Arc::new(Owner(Detector::new(cfg(1, 100)), hosts(2)));
        spawn_sweeper(Arc::downgrade(&owner), Duration::from_secs(1), |o: &Owner| o.1.clone());
        owner.0.record(owner.1[0].as_ref(), Outcome::Response(500), 2, Instant::now());
        tokio::time::sleep(Duration::from_millis(9_500)).await;
        assert!(owner.1[0].monitor().is_ejected());
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert!(!owner.1[0].monitor().is_ejected(), "released on the first tick after 10 s");
    }
}
