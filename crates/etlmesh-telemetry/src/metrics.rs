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
pub type SharedRegistry = Arc<std::sync::Mutex<Registry>>;

/// A new registry with the `etlmesh` prefix.
pub fn registry() -> SharedRegistry {
    Arc::new(std::sync::Mutex::new(Registry::with_prefix("etlmesh")))
}

/// The registry in the Prometheus text format.
pub fn render(registry: &SharedRegistry) -> String {
    let mut out = String::new();
    let reg = registry.lock().unwrap_or_else(|p| p.into_inner());
    if encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
