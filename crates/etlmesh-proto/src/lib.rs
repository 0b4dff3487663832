//! Wire types of the mesh. Everything is JSON over HTTP:
//!
//! - worker → control plane: [`Registration`] (`POST /v1/workers`), then a
//!   [`Heartbeat`] every second (`PUT /v1/workers/{id}/heartbeat`), and
//!   `DELETE /v1/workers/{id}` when it leaves;
//! - control plane → gateway: `GET /v1/endpoints/watch`, a long-lived response of
//!   NDJSON [`EndpointEvent`]s (a snapshot, then changes; no polling);
//! - gateway → worker: `POST /v1/pipelines/{pipeline}` (the gateway's own path) with the request's bytes, and
//!   the [`headers`] below;
//! - anyone → worker or control plane: a tap's query ([`tap::TapQuery`]);
//! - every error: an [`ErrorBody`].

use serde::{Deserialize, Serialize};

pub mod energy;
pub mod jobs;
pub mod tap;

/// What happens to a record, in the order of the `etlmesh-records-*` headers and of
/// the per-pipeline record counters of gateway and workers.
pub const RECORD_OUTCOMES: [&str; 4] = ["in", "out", "filtered", "dead_lettered"];

/// Header names used between the processes and towards clients.
pub mod headers {
    /// Milliseconds left before the request's deadline (gateway → worker).
    pub const DEADLINE_MS: &str = "etlmesh-deadline-ms";
    /// A client's deadline for its request, in milliseconds (client → gateway).
    pub const TIMEOUT_MS: &str = "etlmesh-timeout-ms";
    /// Records in the request.
    pub const RECORDS_IN: &str = "etlmesh-records-in";
    /// Records in the response.
    pub const RECORDS_OUT: &str = "etlmesh-records-out";
    /// Records the SQL filtered out.
    pub const RECORDS_FILTERED: &str = "etlmesh-records-filtered";
    /// Records sent to the dead-letter sink.
    pub const RECORDS_DEAD_LETTERED: &str = "etlmesh-records-dead-lettered";
    /// The first bad record's position and reason, when there was one.
    pub const FIRST_ERROR: &str = "etlmesh-first-error";
    /// The trace id of the request.
    pub const TRACE_ID: &str = "etlmesh-trace-id";
    /// The worker that answered.
    pub const WORKER: &str = "etlmesh-worker";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
}

/// A worker's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Registered, not yet serving.
    Starting,
    /// Serving.
    Ready,
    /// Finishing what it holds; takes no new work.
    Draining,
}

/// A pipeline a worker serves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineInfo {
    /// Its name.
    pub name: String,
    /// Its description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The declared input schema (`name: type, …`), when declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_schema: Option<String>,
    /// The output schema, when the input schema is declared.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<String>,
    /// The output schema as base64 of an Arrow IPC stream (for Arrow Flight clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema_ipc: Option<String>,
    /// Where its records come from (`http`, `mqtt:<topic>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Where its results go (`parquet:out/clean`, `postgres:readings`, `dead_letter:…`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sinks: Vec<String>,
}

/// What a worker says when it starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    /// Its id (unique in the mesh).
    pub id: String,
    /// Where gateways reach it: `http://host:port`.
    pub address: String,
    /// The pipelines it serves.
    pub pipelines: Vec<PipelineInfo>,
    /// Its process id (on its host).
    pub pid: u32,
    /// Its version.
    pub version: String,
}

/// A worker's load, reported every second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Requests being served.
    pub in_flight: u32,
    /// Exponentially weighted mean latency of recent requests, in milliseconds.
    pub ewma_latency_ms: f64,
    /// Records transformed per second, over the last interval.
    pub records_per_sec: f64,
    /// CPU used by the process over the last interval, in percent of one core.
    pub cpu_percent: f64,
    /// Resident memory, in bytes.
    pub rss_bytes: u64,
    /// Requests served since start.
    pub requests_total: u64,
    /// CPU seconds the process used since start.
    #[serde(default)]
    pub cpu_seconds_total: f64,
    /// Work done for each pipeline since start.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub pipelines: std::collections::BTreeMap<String, PipelineUsage>,
}

/// Work a worker did for one pipeline since it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineUsage {
    /// Records handled (requests and streams).
    pub records_total: u64,
    /// CPU seconds spent polling its requests and streams.
    pub cpu_seconds_total: f64,
    /// Messages its stream's source holds that no worker of the pipeline has taken yet
    /// (JetStream: the consumer's num_pending) — the consumer lag, for the autoscaler;
    /// absent when the source does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pending: Option<u64>,
    /// The Kafka partitions the worker owns, each with its lag; the pipeline's lag is
    /// their sum over its workers (each owns its own partitions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionLag>,
}

/// A partition a worker owns and how far behind its end the group committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionLag {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// Records between the committed offset and the end.
    pub lag: u64,
}

/// A worker's heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Its state.
    pub state: WorkerState,
    /// Its load.
    pub load: Load,
}

/// A worker as gateways see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The worker's id.
    pub id: String,
    /// `http://host:port`.
    pub address: String,
    /// Pipelines served.
    pub pipelines: Vec<PipelineInfo>,
    /// Its state; gateways send work to `ready` endpoints only.
    pub state: WorkerState,
}

/// A change of the endpoint set, streamed to gateways.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EndpointEvent {
    /// The whole set (sent first, and after a gateway fell behind).
    Snapshot {
        /// Every endpoint.
        endpoints: Vec<Endpoint>,
    },
    /// An endpoint appeared or changed state.
    Upsert {
        /// The endpoint.
        endpoint: Endpoint,
    },
    /// An endpoint left.
    Remove {
        /// Its id.
        id: String,
    },
    /// The pipelines the control plane scales (they exist even with no worker, so
    /// gateways hold their requests while a worker starts instead of refusing them).
    Pipelines {
        /// Every scaled pipeline.
        pipelines: Vec<PipelineInfo>,
    },
    /// Nothing changed; the stream is alive.
    Keepalive,
}

/// One pipeline's load at a gateway.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineLoad {
    /// Requests sent to workers and not yet answered.
    pub in_flight: u32,
    /// Requests held while no worker is ready.
    pub held: u32,
    /// Requests since the gateway started.
    pub requests_total: u64,
    /// Answers with a 5xx status since the gateway started.
    #[serde(default)]
    pub errors_total: u64,
    /// Requests by latency since the gateway started: one count per bucket of
    /// `etlmesh_telemetry::metrics::LATENCY_BUCKETS`, then one for slower.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_counts: Vec<u64>,
}

/// What a gateway reports to the control plane, twice a second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayLoad {
    /// By pipeline.
    pub pipelines: std::collections::BTreeMap<String, PipelineLoad>,
}

/// A scaling decision, as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleEvent {
    /// When (RFC 3339).
    pub time: String,
    /// The pipeline.
    pub pipeline: String,
    /// Replicas before.
    pub from: u32,
    /// Replicas after.
    pub to: u32,
    /// Why: `2 → 5: in-flight 38, target 8`.
    pub reason: String,
}

/// Every error response: what is wrong, what to do, and the trace id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable, machine-readable code (`unknown_pipeline`, `overloaded`, …).
    pub code: String,
    /// What is wrong and what to do.
    pub message: String,
    /// The request's trace id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl ErrorBody {
    /// An error body.
    pub fn new(code: &str, message: impl Into<String>, trace_id: Option<String>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
            trace_id,
        }
    }

    /// As JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| b"{\"code\":\"internal\"}".to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_tagged() {
        let e = EndpointEvent::Remove { id: "w1".into() };
        assert_eq!(
            serde_json::to_string(&e).expect("json"),
            r#"{"type":"remove","id":"w1"}"#
        );
        let back: EndpointEvent = serde_json::from_str(r#"{"type":"keepalive"}"#).expect("parse");
        assert_eq!(back, EndpointEvent::Keepalive);
    }
}
