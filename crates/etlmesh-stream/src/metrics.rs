//! A stream's Prometheus metrics, labelled by pipeline.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use etlmesh_telemetry::metrics::{SharedRegistry, latency_histogram};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Pipeline {
    pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    pipeline: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabel {
    pipeline: String,
    topic: String,
    partition: i32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SinkLabel {
    pipeline: String,
    sink: String,
}

/// Counters and gauges of the streams of one process.
#[derive(Clone)]
pub struct StreamMetrics {
    messages: Family<Outcome, Counter>,
    records: Family<Outcome, Counter>,
    held: Family<Pipeline, Gauge>,
    lag_ms: Family<Pipeline, Gauge>,
    open_windows: Family<Pipeline, Gauge>,
    source_pending: Family<Pipeline, Gauge>,
    source_ack_pending: Family<Pipeline, Gauge>,
    partition_lag: Family<PartitionLabel, Gauge>,
    sink_retries: Family<SinkLabel, Counter>,
    sink_up: Family<SinkLabel, Gauge>,
    batch_seconds: Family<Pipeline, Histogram, fn() -> Histogram>,
    /// Records in, all pipelines: the worker adds them to the load it reports.
    records_in: std::sync::Arc<std::sync::atomic::AtomicU64>,
    source_pending_out: std::sync::Arc<std::sync::atomic::AtomicI64>,
    partitions_out: PartitionLags,
}

/// The lag of each partition a worker owns, by (topic, partition): the worker's load
/// report reads it.
pub type PartitionLags =
    std::sync::Arc<parking_lot::Mutex<std::collections::BTreeMap<(String, i32), i64>>>;

impl StreamMetrics {
    /// Registers the families.
    pub fn register(registry: &SharedRegistry) -> Self {
        let m = Self {
            messages: Family::default(),
            records: Family::default(),
            held: Family::default(),
            lag_ms: Family::default(),
            open_windows: Family::default(),
            source_pending: Family::default(),
            source_ack_pending: Family::default(),
            partition_lag: Family::default(),
            sink_retries: Family::default(),
            sink_up: Family::default(),
            batch_seconds: Family::new_with_constructor(latency_histogram),
            records_in: Default::default(),
            source_pending_out: std::sync::Arc::new(std::sync::atomic::AtomicI64::new(-1)),
            partitions_out: PartitionLags::default(),
        };
        let mut r = registry.lock();
        r.register(
            "stream_messages",
            "Stream messages by outcome (received, redelivered, repeated, acknowledged, terminated)",
            m.messages.clone(),
        );
        r.register(
            "stream_records",
            "Stream records by outcome (in, out, filtered, dead_lettered, late, future, replayed, revoked, duplicate)",
            m.records.clone(),
        );
        r.register(
            "stream_held_messages",
            "Messages received and not yet acknowledged: processed and waiting for a sink or a window, or waiting to be processed (at most the receive maximum)",
            m.held.clone(),
        );
        r.register(
            "stream_lag_milliseconds",
            "Now minus the event time of the newest record loaded",
            m.lag_ms.clone(),
        );
        r.register(
            "stream_open_windows",
            "Event-time windows open",
            m.open_windows.clone(),
        );
        r.register(
            "stream_source_pending",
            "Messages in the source not yet delivered to any worker of the pipeline (JetStream: the consumer's num_pending): the consumer lag",
            m.source_pending.clone(),
        );
        r.register(
            "stream_source_ack_pending",
            "Messages delivered to the pipeline's workers and not yet acknowledged (JetStream: num_ack_pending, at most max_ack_pending)",
            m.source_ack_pending.clone(),
        );
        r.register(
            "stream_partition_lag",
            "Records of a Kafka partition this worker owns behind its end: the high watermark minus the committed offset",
            m.partition_lag.clone(),
        );
        r.register(
            "stream_sink_retries",
            "Writes retried because a sink was unavailable",
            m.sink_retries.clone(),
        );
        r.register(
            "stream_sink_up",
            "1 while a stream sink takes writes, 0 while it is down and the stream holds its batch",
            m.sink_up.clone(),
        );
        r.register(
            "stream_batch_duration_seconds",
            "Time to decode, transform and load one micro-batch",
            m.batch_seconds.clone(),
        );
        m
    }

    fn p(pipeline: &str) -> Pipeline {
        Pipeline {
            pipeline: pipeline.to_string(),
        }
    }

    pub(crate) fn messages(&self, pipeline: &str, outcome: &'static str, n: u64) {
        if n > 0 {
            self.messages
                .get_or_create(&Outcome {
                    pipeline: pipeline.to_string(),
                    outcome,
                })
                .inc_by(n);
        }
    }

    /// Counts records in into `counter` too.
    pub fn count_records_in(
        mut self,
        counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> Self {
        self.records_in = counter;
        self
    }

    /// Keeps the source's pending messages in `cell` too (the worker's load report).
    pub fn report_source_pending(
        mut self,
        cell: std::sync::Arc<std::sync::atomic::AtomicI64>,
    ) -> Self {
        self.source_pending_out = cell;
        self
    }

    /// Keeps the lag of each partition owned in `lags` too (the worker's load report).
    pub fn report_partitions(mut self, lags: PartitionLags) -> Self {
        self.partitions_out = lags;
        self
    }

    pub(crate) fn records(&self, pipeline: &str, outcome: &'static str, n: u64) {
        if outcome == "in" {
            self.records_in
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        if n > 0 {
            self.records
                .get_or_create(&Outcome {
                    pipeline: pipeline.to_string(),
                    outcome,
                })
                .inc_by(n);
        }
    }

    pub(crate) fn held(&self, pipeline: &str, n: usize) {
        self.held.get_or_create(&Self::p(pipeline)).set(n as i64);
    }

    pub(crate) fn lag(&self, pipeline: &str, ms: i64) {
        self.lag_ms.get_or_create(&Self::p(pipeline)).set(ms);
    }

    pub(crate) fn open_windows(&self, pipeline: &str, n: usize) {
        self.open_windows
            .get_or_create(&Self::p(pipeline))
            .set(n as i64);
    }

    /// The source's own view of the pipeline's backlog.
    pub(crate) fn source_backlog(&self, pipeline: &str, pending: u64, ack_pending: usize) {
        let pending = i64::try_from(pending).unwrap_or(i64::MAX);
        self.source_pending
            .get_or_create(&Self::p(pipeline))
            .set(pending);
        self.source_pending_out
            .store(pending, std::sync::atomic::Ordering::Relaxed);
        self.source_ack_pending
            .get_or_create(&Self::p(pipeline))
            .set(ack_pending as i64);
    }

    /// The lag of a partition this worker owns; `None` forgets a partition it gave up.
    pub(crate) fn partition_lag(
        &self,
        pipeline: &str,
        topic: &str,
        partition: i32,
        lag: Option<i64>,
    ) {
        let label = PartitionLabel {
            pipeline: pipeline.to_string(),
            topic: topic.to_string(),
            partition,
        };
        let mut out = self.partitions_out.lock();
        match lag {
            Some(l) => {
                self.partition_lag.get_or_create(&label).set(l);
                out.insert((label.topic, partition), l);
            }
            None => {
                self.partition_lag.remove(&label);
                out.remove(&(label.topic, partition));
            }
        }
    }

    pub(crate) fn sink_retry(&self, pipeline: &str, sink: &str) {
        self.sink_retries
            .get_or_create(&SinkLabel {
                pipeline: pipeline.to_string(),
                sink: sink.to_string(),
            })
            .inc();
    }

    pub(crate) fn sink_up(&self, pipeline: &str, sink: &str, up: bool) {
        self.sink_up
            .get_or_create(&SinkLabel {
                pipeline: pipeline.to_string(),
                sink: sink.to_string(),
            })
            .set(i64::from(up));
    }

    pub(crate) fn batch(&self, pipeline: &str, seconds: f64) {
        self.batch_seconds
            .get_or_create(&Self::p(pipeline))
            .observe(seconds);
    }
}
