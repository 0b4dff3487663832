//! Prometheus metrics: each process keeps one registry; components register their
//! families in it and `/metrics` renders it in the text format.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency buckets in seconds, from 0.5 ms to 30 s.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0,
];

/// A latency histogram with [`LATENCY_BUCKETS`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The process's registry, shared.
pub type SharedRegistry = Arc<parking_lot::Mutex<Registry>>;

/// A new registry with the `etlmesh` prefix, holding this process's CPU time and
/// memory (`etlmesh_process_cpu_seconds_total`, `etlmesh_process_resident_memory_bytes`).
pub fn registry() -> SharedRegistry {
    let mut r = Registry::with_prefix("etlmesh");
    r.register_collector(Box::new(ProcessCollector));
    Arc::new(parking_lot::Mutex::new(r))
}

/// Reads `/proc/self` at each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl prometheus_client::collector::Collector for ProcessCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let cpu = ConstCounter::new(crate::process::cpu_seconds(None).unwrap_or(0.0));
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "CPU time (user and system) of this process",
            None,
            cpu.metric_type(),
        )?)?;
        let rss = ConstGauge::new(crate::process::rss_bytes().unwrap_or(0) as i64);
        rss.encode(encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory of this process",
            None,
            rss.metric_type(),
        )?)?;
        Ok(())
    }
}

/// The registry in the Prometheus text format.
pub fn render(registry: &SharedRegistry) -> String {
    let mut out = String::new();
    let reg = registry.lock();
    if encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Counts by [`LATENCY_BUCKETS`] (and one for slower), lock-free: what a gateway
/// reports to the control plane so that it can chart p50 and p99 per pipeline.
#[derive(Debug, Default)]
pub struct BucketCounts {
    counts: [std::sync::atomic::AtomicU64; LATENCY_BUCKETS.len() + 1],
}

impl BucketCounts {
    /// Counts one observation, in seconds.
    pub fn observe(&self, secs: f64) {
        let i = LATENCY_BUCKETS.partition_point(|b| *b < secs);
        self.counts[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The counts so far, one per bucket (not cumulative).
    pub fn snapshot(&self) -> Vec<u64> {
        self.counts
            .iter()
            .map(|c| c.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    }
}

/// The `q` quantile (0..1), in seconds, of per-bucket counts as [`BucketCounts`]
/// gives them, interpolating inside a bucket as Prometheus's `histogram_quantile`
/// does; `None` when there are none. Past the last bucket it answers the last bound.
pub fn quantile(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        if c > 0 && (seen + c) as f64 >= rank {
            let Some(&upper) = LATENCY_BUCKETS.get(i) else {
                return LATENCY_BUCKETS.last().copied();
            };
            let lower = if i == 0 { 0.0 } else { LATENCY_BUCKETS[i - 1] };
            let within = ((rank - seen as f64) / c as f64).clamp(0.0, 1.0);
            return Some(lower + (upper - lower) * within);
        }
        seen += c;
    }
    LATENCY_BUCKETS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_from_bucket_counts() {
        let b = BucketCounts::default();
        for _ in 0..98 {
            b.observe(0.003); // (0.0025, 0.005]
        }
        b.observe(0.2); // (0.1, 0.25]
        b.observe(99.0); // slower than every bucket
        let c = b.snapshot();
        assert_eq!(c.iter().sum::<u64>(), 100);
        let p50 = quantile(&c, 0.5).expect("some");
        assert!((0.0025..=0.005).contains(&p50), "{p50}");
        let p99 = quantile(&c, 0.99).expect("some");
        assert!((0.1..=0.25).contains(&p99), "{p99}");
        assert_eq!(quantile(&c, 1.0), Some(30.0));
        assert_eq!(quantile(&[0; 17], 0.5), None);
    }
}
