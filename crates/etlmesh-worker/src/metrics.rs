//! The worker's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use etlmesh_telemetry::metrics::{SharedRegistry, latency_histogram};

/// Labels of a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub pipeline: String,
    pub code: u16,
}

/// Labels of record counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordLabels {
    pub pipeline: String,
    pub outcome: &'static str,
}

/// Labels of byte counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub pipeline: String,
    pub direction: &'static str,
}

/// Labels of a pipeline.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    pub pipeline: String,
}

/// One pipeline's per-request metrics, looked up once: a request then builds no
/// label and searches no family.
#[derive(Clone)]
pub struct PipelineHandles {
    /// Requests answered 200.
    pub ok: Counter,
    pub latency: Histogram,
    /// In, out, filtered, dead_lettered.
    pub records: [Counter; 4],
    /// In, out.
    pub bytes: [Counter; 2],
}

/// The worker's metrics.
#[derive(Clone)]
pub struct WorkerMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<PipelineLabels, Histogram, fn() -> Histogram>,
    pub records: Family<RecordLabels, Counter>,
    pub in_flight: Gauge,
    pub bytes: Family<BytesLabels, Counter>,
    pub ewma_latency: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Off: per-request counts are skipped (to measure what they cost).
    pub enabled: bool,
    /// Dead-letter logs by pipeline: written, rotations, files dropped past the bound.
    pub dead_letters: Family<DeadLetterLabels, Gauge>,
}

/// Labels of a dead-letter log's counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    pub pipeline: String,
    /// written, rotated, dropped_files, dropped_bytes.
    pub what: &'static str,
}

impl WorkerMetrics {
    pub fn register(registry: &SharedRegistry) -> Self {
        let m = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            records: Family::default(),
            in_flight: Gauge::default(),
            bytes: Family::default(),
            ewma_latency: Gauge::default(),
            enabled: true,
            dead_letters: Family::default(),
        };
        let mut r = registry.lock();
        r.register(
            "worker_requests",
            "Transform requests served, by pipeline and status",
            m.requests.clone(),
        );
        r.register(
            "worker_request_duration_seconds",
            "Time to serve a transform request",
            m.latency.clone(),
        );
        r.register(
            "worker_records",
            "Records by pipeline and outcome (in, out, filtered, dead_lettered)",
            m.records.clone(),
        );
        r.register(
            "worker_in_flight",
            "Requests being served",
            m.in_flight.clone(),
        );
        r.register(
            "worker_bytes",
            "Body bytes by pipeline and direction (in: requests, out: answers)",
            m.bytes.clone(),
        );
        r.register(
            "dead_letter_log",
            "The worker's dead-letter files by pipeline: dead letters written, files rotated, rotated files dropped (and their bytes) to keep within dead_letter.max_size × max_files",
            m.dead_letters.clone(),
        );
        r.register(
            "worker_latency_ewma_seconds",
            "Exponentially weighted moving average of request latency (what the gateway balances on)",
            m.ewma_latency.clone(),
        );
        m
    }

    /// Copies a dead-letter log's counts into the gauges.
    pub fn dead_letter_stats(
        &self,
        pipeline: &str,
        st: etlmesh_sink::dead_letter::DeadLetterStats,
    ) {
        for (what, v) in [
            ("written", st.written),
            ("rotated", st.rotations),
            ("dropped_files", st.dropped_files),
            ("dropped_bytes", st.dropped_bytes),
        ] {
            self.dead_letters
                .get_or_create(&DeadLetterLabels {
                    pipeline: pipeline.to_string(),
                    what,
                })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
    }

    /// The handles of `pipeline`'s per-request metrics.
    pub fn handles(&self, pipeline: &str) -> PipelineHandles {
        let record = |outcome: &'static str| {
            self.records
                .get_or_create(&RecordLabels {
                    pipeline: pipeline.to_string(),
                    outcome,
                })
                .clone()
        };
        let bytes = |direction: &'static str| {
            self.bytes
                .get_or_create(&BytesLabels {
                    pipeline: pipeline.to_string(),
                    direction,
                })
                .clone()
        };
        PipelineHandles {
            ok: self
                .requests
                .get_or_create(&RequestLabels {
                    pipeline: pipeline.to_string(),
                    code: 200,
                })
                .clone(),
            latency: self
                .latency
                .get_or_create(&PipelineLabels {
                    pipeline: pipeline.to_string(),
                })
                .clone(),
            records: etlmesh_proto::RECORD_OUTCOMES.map(record),
            bytes: ["in", "out"].map(bytes),
        }
    }
}
