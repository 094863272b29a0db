//! Outlier detection (Istio's `outlierDetection`, Envoy's consecutive-error
//! detectors): per endpoint, consecutive 5xx, gateway errors and locally
//! originated failures; an endpoint over a threshold is ejected for
//! `baseEjectionTime × n`, n growing with each ejection and shrinking by one
//! per `interval` it stays healthy. Everything is atomics on the endpoint,
//! so the request path takes no lock; the clock is tokio's, so tests run it
//! with paused time.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bosun_xds_proto::config as pb;

/// Envoy's `max_ejection_time` default: an ejection never lasts longer.
const MAX_EJECTION: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct OutlierConfig {
    /// 0: off, for each of the three.
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub consecutive_local: u32,
    /// Local-origin failures (connect, reset, timeout) counted on their own
    /// instead of as 503/504.
    pub split: bool,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

impl From<&pb::OutlierDetection> for OutlierConfig {
    fn from(o: &pb::OutlierDetection) -> Self {
        OutlierConfig {
            consecutive_5xx: o.consecutive_5xx,
            consecutive_gateway: o.consecutive_gateway_errors,
            consecutive_local: o.consecutive_local_origin_failures,
            split: o.split_external_local_origin_errors,
            interval: Duration::from_millis(o.interval_ms.max(1)),
            base_ejection: Duration::from_millis(o.base_ejection_time_ms.max(1)),
            max_ejection_percent: o.max_ejection_percent.min(100),
            min_health_percent: o.min_health_percent.min(100),
        }
    }
}

/// How one try at an endpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status.
    Status(u16),
    /// Connect failure, reset before the head, or timeout: no answer.
    LocalFailure,
}

/// One endpoint's detector state. Times are milliseconds on the cluster's
/// clock (see [`crate::cluster::ClusterState::now_ms`]); 0 is "never".
#[derive(Debug, Default)]
pub struct OutlierState {
    c5xx: AtomicU32,
    gateway: AtomicU32,
    local: AtomicU32,
    /// Ejected while now < this.
    ejected_until: AtomicU64,
    /// The ejection multiplier (Envoy's `num_ejections`).
    ejections: AtomicU32,
}

fn bump(c: &AtomicU32, hit: bool) -> u32 {
    if hit {
        c.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        c.store(0, Ordering::Relaxed);
        0
    }
}

impl OutlierState {
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms
    }

    pub fn ejected_until(&self) -> u64 {
        self.ejected_until.load(Ordering::Relaxed)
    }

    /// Counts an outcome; true when a detector crossed its threshold (the
    /// caller decides, against `maxEjectionPercent`, whether to eject).
    pub fn record(&self, cfg: &OutlierConfig, o: Outcome, now_ms: u64) -> bool {
        if self.is_ejected(now_ms) {
            return false;
        }
        let crossed = |n: u32, limit: u32| limit > 0 && n >= limit;
        match o {
            Outcome::LocalFailure if cfg.split => {
                let n = bump(&self.local, true);
                crossed(n, cfg.consecutive_local)
            }
            Outcome::Status(code) => {
                if cfg.split {
                    // A response proves the endpoint reachable.
                    bump(&self.local, false);
                }
                let a = bump(&self.c5xx, (500..600).contains(&code));
                let b = bump(&self.gateway, (502..=504).contains(&code));
                crossed(a, cfg.consecutive_5xx) || crossed(b, cfg.consecutive_gateway)
            }
            Outcome::LocalFailure => {
                // Not split: a local failure counts as a 503 from the endpoint.
                let a = bump(&self.c5xx, true);
                let b = bump(&self.gateway, true);
                crossed(a, cfg.consecutive_5xx) || crossed(b, cfg.consecutive_gateway)
            }
        }
    }

    /// Ejects the endpoint; returns when it comes back (ms).
    pub fn eject(&self, cfg: &OutlierConfig, now_ms: u64) -> u64 {
        let interval = cfg.interval.as_millis().max(1) as u64;
        let back = self.ejected_until.load(Ordering::Relaxed);
        // The multiplier shrank by one per interval the endpoint was back.
        let healthy_intervals = if back == 0 {
            u64::MAX
        } else {
            now_ms.saturating_sub(back) / interval
        };
        let prev = u64::from(self.ejections.load(Ordering::Relaxed));
        let n = prev.saturating_sub(healthy_intervals) + 1;
        self.ejections
            .store(u32::try_from(n).unwrap_or(u32::MAX), Ordering::Relaxed);
        let span = cfg
            .base_ejection
            .saturating_mul(u32::try_from(n).unwrap_or(u32::MAX))
            .min(MAX_EJECTION.max(cfg.base_ejection));
        let until = now_ms + span.as_millis() as u64;
        self.ejected_until.store(until, Ordering::Relaxed);
        self.c5xx.store(0, Ordering::Relaxed);
        self.gateway.store(0, Ordering::Relaxed);
        self.local.store(0, Ordering::Relaxed);
        until
    }

    pub fn multiplier(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }
}

/// May one more of `total` endpoints be ejected when `ejected` already are?
/// Envoy since 1.28 (and so Istio): only within `max_ejection_percent`,
/// so at Istio's default 10% a cluster of fewer than 10 endpoints ejects none.
pub fn may_eject(cfg: &OutlierConfig, ejected: usize, total: usize) -> bool {
    total > 0 && (ejected + 1) * 100 <= total * cfg.max_ejection_percent as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            consecutive_local: 2,
            split: false,
            interval: Duration::from_secs(1),
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: 50,
            min_health_percent: 0,
        }
    }

    #[test]
    fn consecutive_5xx_crosses_and_success_resets() {
        let c = cfg();
        let s = OutlierState::default();
        assert!(!s.record(&c, Outcome::Status(500), 0));
        assert!(!s.record(&c, Outcome::Status(503), 0));
        assert!(!s.record(&c, Outcome::Status(200), 0));
        assert!(!s.record(&c, Outcome::Status(500), 0));
        assert!(!s.record(&c, Outcome::LocalFailure, 0));
        assert!(s.record(&c, Outcome::Status(502), 0));
    }

    #[test]
    fn split_counts_local_failures_apart() {
        let c = OutlierConfig {
            split: true,
            ..cfg()
        };
        let s = OutlierState::default();
        assert!(!s.record(&c, Outcome::Status(500), 0));
        assert!(!s.record(&c, Outcome::LocalFailure, 0));
        // A response resets the local count, not the 5xx one.
        assert!(!s.record(&c, Outcome::Status(500), 0));
        assert!(!s.record(&c, Outcome::LocalFailure, 0));
        assert!(s.record(&c, Outcome::LocalFailure, 0));
    }

    #[test]
    fn ejection_grows_with_each_and_decays_while_healthy() {
        let c = cfg();
        let s = OutlierState::default();
        assert_eq!(s.eject(&c, 1_000), 11_000);
        assert!(s.is_ejected(10_999));
        assert!(!s.is_ejected(11_000));
        // Ejected again right after coming back: twice as long.
        assert_eq!(s.eject(&c, 11_500), 31_500);
        assert_eq!(s.multiplier(), 2);
        // Back at 31.5 s; healthy for 5 intervals, the multiplier is spent.
        assert_eq!(s.eject(&c, 36_600), 46_600);
        assert_eq!(s.multiplier(), 1);
    }

    #[test]
    fn at_most_the_percentage() {
        let c = OutlierConfig {
            max_ejection_percent: 10,
            ..cfg()
        };
        assert!(!may_eject(&c, 0, 3));
        assert!(may_eject(&c, 0, 10));
        assert!(may_eject(&c, 1, 20));
        assert!(!may_eject(&c, 2, 20));
        let half = cfg();
        assert!(may_eject(&half, 0, 3));
        assert!(!may_eject(&half, 1, 3));
    }
}
