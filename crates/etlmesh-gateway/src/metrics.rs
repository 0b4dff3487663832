//! The gateway's Prometheus metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

use etlmesh_telemetry::metrics::{SharedRegistry, latency_histogram};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub pipeline: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub pipeline: String,
    pub worker: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    pub pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordLabels {
    pub pipeline: String,
    pub outcome: &'static str,
}

pub use etlmesh_proto::RECORD_OUTCOMES;

/// One pipeline's per-request metrics, looked up once per route: a request then
/// builds no label and searches no family.
#[derive(Clone)]
pub struct PipelineHandles {
    /// Requests answered 200.
    pub ok: Counter,
    pub latency: Histogram,
    pub in_flight: Gauge,
    /// By [`RECORD_OUTCOMES`].
    pub records: [Counter; 4],
}

/// The gateway's metrics.
#[derive(Clone)]
pub struct GatewayMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub endpoint_requests: Family<EndpointLabels, Counter>,
    pub latency: Family<PipelineLabels, Histogram, fn() -> Histogram>,
    pub in_flight: Family<PipelineLabels, Gauge>,
    pub retries: Family<PipelineLabels, Counter>,
    pub budget_exhausted: Family<PipelineLabels, Counter>,
    pub shed: Family<PipelineLabels, Counter>,
    pub ejections: Family<WorkerLabels, Counter>,
    pub records: Family<RecordLabels, Counter>,
    pub endpoints: Family<PipelineLabels, Gauge>,
    /// 1 while the endpoint stream from the control plane is up, 0 while the gateway
    /// serves from the last endpoint set it had.
    pub control_plane: Gauge,
}

impl GatewayMetrics {
    /// The handles of `pipeline`'s per-request metrics.
    pub fn handles(&self, pipeline: &str) -> PipelineHandles {
        let p = PipelineLabels {
            pipeline: pipeline.to_string(),
        };
        let record = |outcome: &'static str| {
            self.records
                .get_or_create(&RecordLabels {
                    pipeline: pipeline.to_string(),
                    outcome,
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
            latency: self.latency.get_or_create(&p).clone(),
            in_flight: self.in_flight.get_or_create(&p).clone(),
            records: RECORD_OUTCOMES.map(record),
        }
    }

    pub fn register(registry: &SharedRegistry) -> Self {
        let m = Self {
            requests: Family::default(),
            endpoint_requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            in_flight: Family::default(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            shed: Family::default(),
            ejections: Family::default(),
            records: Family::default(),
            endpoints: Family::default(),
            control_plane: Gauge::default(),
        };
        let mut r = registry.lock();
        r.register(
            "gateway_requests",
            "Requests by pipeline and status",
            m.requests.clone(),
        );
        r.register(
            "gateway_endpoint_requests",
            "Requests answered by each worker, by pipeline and status",
            m.endpoint_requests.clone(),
        );
        r.register(
            "gateway_request_duration_seconds",
            "Time to answer a request",
            m.latency.clone(),
        );
        r.register(
            "gateway_in_flight",
            "Requests being served",
            m.in_flight.clone(),
        );
        r.register(
            "gateway_retries",
            "Requests sent again to another worker",
            m.retries.clone(),
        );
        r.register(
            "gateway_retry_budget_exhausted",
            "Retries refused because the retry budget was spent",
            m.budget_exhausted.clone(),
        );
        r.register(
            "gateway_shed",
            "Requests refused with 503 because the queue was full",
            m.shed.clone(),
        );
        r.register(
            "gateway_ejections",
            "Workers ejected by failure accrual",
            m.ejections.clone(),
        );
        r.register(
            "gateway_records",
            "Records by pipeline and outcome, as workers report them",
            m.records.clone(),
        );
        r.register(
            "gateway_endpoints",
            "Ready workers by pipeline",
            m.endpoints.clone(),
        );
        r.register(
            "gateway_control_plane_connected",
            "1 while the gateway follows the control plane, 0 while it serves from its last endpoint set",
            m.control_plane.clone(),
        );
        m
    }
}
