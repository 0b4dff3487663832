//! The mesh over time, for `etlmesh top` and the `/ui` dashboard: once a second the
//! control plane sums what the gateways reported (requests, 5xx answers, latency
//! bucket counts, in flight, held) and what the workers reported (records per
//! second), and keeps a bounded series of points per pipeline.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etlmesh_proto::{GatewayLoad, WorkerState};
use etlmesh_telemetry::metrics::quantile;
use serde::Serialize;

use crate::Registry;
use crate::autoscale::Autoscaling;

/// The sampling period.
pub const PERIOD: Duration = Duration::from_secs(1);
/// Points kept (ten minutes).
pub const POINTS: usize = 600;
/// A gateway silent for this long no longer counts.
const GATEWAY_STALE: Duration = Duration::from_secs(5);

/// One pipeline in one point.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PipelineStats {
    /// Requests answered per second, at the gateways.
    pub requests_per_sec: f64,
    /// 5xx answers per second.
    pub errors_per_sec: f64,
    /// Median latency in ms over the period (none: no request).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency in ms over the period.
    pub p99_ms: Option<f64>,
    /// Requests in flight at the gateways.
    pub in_flight: u32,
    /// Requests held for a worker to start.
    pub held: u32,
    /// Records per second through its workers (requests and streams).
    pub records_per_sec: f64,
    /// Workers ready.
    pub ready: u32,
    /// Replicas the autoscaler wants (none: not scaled here).
    pub desired: Option<u32>,
}

/// The mesh at one time.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Unix time in milliseconds.
    pub t: i64,
    /// By pipeline.
    pub pipelines: BTreeMap<String, PipelineStats>,
}

#[derive(Debug, Default, Clone)]
struct Totals {
    requests: u64,
    errors: u64,
    latency: Vec<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    gateways: HashMap<String, (Instant, GatewayLoad)>,
    points: VecDeque<Point>,
    previous: Option<(Instant, BTreeMap<String, Totals>)>,
}

/// The series, shared by the API and the sampler.
#[derive(Debug, Default)]
pub struct Timeline {
    inner: Mutex<Inner>,
}

impl Timeline {
    /// Keeps a gateway's latest report.
    pub fn gateway_report(&self, id: &str, load: GatewayLoad) {
        let mut g = self.inner.lock();
        g.gateways.insert(id.to_string(), (Instant::now(), load));
    }

    /// Gateways heard from lately.
    pub fn gateways(&self) -> usize {
        let g = self.inner.lock();
        g.gateways
            .values()
            .filter(|(t, _)| t.elapsed() < GATEWAY_STALE)
            .count()
    }

    /// Points after `since` (unix ms), oldest first.
    pub fn points(&self, since: i64) -> Vec<Point> {
        let g = self.inner.lock();
        g.points.iter().filter(|p| p.t > since).cloned().collect()
    }

    /// The newest point.
    pub fn latest(&self) -> Option<Point> {
        let g = self.inner.lock();
        g.points.back().cloned()
    }

    /// Takes a sample now.
    pub fn sample(&self, registry: &Registry, autoscaling: Option<&Autoscaling>) {
        let now = Instant::now();
        let t = chrono::Utc::now().timestamp_millis();
        let mut g = self.inner.lock();
        g.gateways
            .retain(|_, (t, _)| t.elapsed() < GATEWAY_STALE * 12);
        let mut stats: BTreeMap<String, PipelineStats> = BTreeMap::new();
        let mut totals: BTreeMap<String, Totals> = BTreeMap::new();
        for (heard, load) in g.gateways.values() {
            let fresh = heard.elapsed() < GATEWAY_STALE;
            for (name, l) in &load.pipelines {
                let tot = totals.entry(name.clone()).or_default();
                tot.requests += l.requests_total;
                tot.errors += l.errors_total;
                if tot.latency.len() < l.latency_counts.len() {
                    tot.latency.resize(l.latency_counts.len(), 0);
                }
                for (a, b) in tot.latency.iter_mut().zip(&l.latency_counts) {
                    *a += b;
                }
                let s = stats.entry(name.clone()).or_default();
                if fresh {
                    s.in_flight += l.in_flight;
                    s.held += l.held;
                }
            }
        }
        if let Some((then, prev)) = &g.previous {
            let secs = now.duration_since(*then).as_secs_f64().max(0.001);
            for (name, tot) in &totals {
                let before = prev.get(name).cloned().unwrap_or_default();
                let s = stats.entry(name.clone()).or_default();
                s.requests_per_sec = tot.requests.saturating_sub(before.requests) as f64 / secs;
                s.errors_per_sec = tot.errors.saturating_sub(before.errors) as f64 / secs;
                let delta: Vec<u64> = tot
                    .latency
                    .iter()
                    .enumerate()
                    .map(|(i, c)| c.saturating_sub(before.latency.get(i).copied().unwrap_or(0)))
                    .collect();
                s.p50_ms = quantile(&delta, 0.5).map(|v| v * 1000.0);
                s.p99_ms = quantile(&delta, 0.99).map(|v| v * 1000.0);
            }
        }
        for w in registry.workers() {
            let share = w.load.records_per_sec / w.pipelines.len().max(1) as f64;
            for p in &w.pipelines {
                let s = stats.entry(p.clone()).or_default();
                s.records_per_sec += share;
                if w.state == WorkerState::Ready {
                    s.ready += 1;
                }
            }
        }
        if let Some(a) = autoscaling {
            for pool in a.view(registry) {
                stats.entry(pool.pipeline).or_default().desired = Some(pool.desired);
            }
        }
        g.previous = Some((now, totals));
        if g.points.len() == POINTS {
            g.points.pop_front();
        }
        g.points.push_back(Point {
            t,
            pipelines: stats,
        });
    }
}

/// Samples every [`PERIOD`] until aborted.
pub async fn sample_forever(
    timeline: Arc<Timeline>,
    registry: Arc<Registry>,
    autoscaling: Option<Arc<Autoscaling>>,
) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        timeline.sample(&registry, autoscaling.as_deref());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etlmesh_proto::PipelineLoad;

    fn load(requests: u64, errors: u64, fast: u64, slow: u64) -> GatewayLoad {
        let mut counts = vec![0; 17];
        counts[3] = fast; // (2.5 ms, 5 ms]
        counts[9] = slow; // (250 ms, 500 ms]
        GatewayLoad {
            pipelines: [(
                "p".to_string(),
                PipelineLoad {
                    in_flight: 2,
                    held: 0,
                    requests_total: requests,
                    errors_total: errors,
                    latency_counts: counts,
                },
            )]
            .into(),
        }
    }

    #[test]
    fn rates_and_quantiles_come_from_the_difference_between_samples() {
        let registry = Registry::new(Duration::from_secs(3));
        let tl = Timeline::default();
        tl.gateway_report("g1", load(100, 0, 100, 0));
        tl.sample(&registry, None);
        let first = tl.latest().expect("a point");
        assert_eq!(first.pipelines["p"].requests_per_sec, 0.0);
        assert_eq!(first.pipelines["p"].in_flight, 2);
        std::thread::sleep(Duration::from_millis(100));
        // 100 more requests: 98 fast, 2 slow, 3 errors.
        tl.gateway_report("g1", load(200, 3, 198, 2));
        tl.sample(&registry, None);
        let p = &tl.latest().expect("a point").pipelines["p"];
        assert!(p.requests_per_sec > 100.0, "{p:?}");
        assert!(p.errors_per_sec > 0.0);
        let p50 = p.p50_ms.expect("p50");
        assert!((2.5..=5.0).contains(&p50), "{p50}");
        let p99 = p.p99_ms.expect("p99");
        assert!((250.0..=500.0).contains(&p99), "{p99}");
        assert_eq!(tl.points(0).len(), 2);
        assert_eq!(tl.points(first.t).len(), 1);
        assert_eq!(tl.gateways(), 1);
    }
}
