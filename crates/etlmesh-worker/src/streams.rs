//! The streams a worker runs: one `etlmesh_stream::run` task per served pipeline with
//! an MQTT source, stopped when the worker drains.

use etlmesh_config::PipelineFile;
use etlmesh_stream::{StreamError, StreamMetrics, StreamOptions};
use etlmesh_telemetry::metrics::SharedRegistry;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::pipelines::Pipelines;

/// A running stream: its pipeline and its task.
pub(crate) type Running = (String, JoinHandle<Result<(), StreamError>>);

/// What streams share with the rest of the worker.
pub(crate) struct Shared {
    /// Records in, counted into the load the worker reports.
    pub records_in: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Open taps.
    pub taps: std::sync::Arc<etlmesh_sink::tap::TapHub>,
}

/// Starts the stream of every served pipeline with an MQTT source.
pub(crate) fn start(
    file: &PipelineFile,
    worker: &str,
    pipelines: &Pipelines,
    registry: &SharedRegistry,
    shared: Shared,
    drain: watch::Receiver<bool>,
) -> Vec<Running> {
    let specs: Vec<_> = file
        .spec
        .pipelines
        .iter()
        .filter(|p| pipelines.names().contains(&p.name) && p.mqtt().is_some())
        .cloned()
        .collect();
    if specs.is_empty() {
        return Vec::new();
    }
    let opts = StreamOptions {
        worker: worker.to_string(),
        engine: pipelines.engine.clone(),
        limits: pipelines.limits,
        metrics: StreamMetrics::register(registry).count_records_in(shared.records_in),
        taps: shared.taps,
    };
    specs
        .into_iter()
        .map(|spec| {
            let name = spec.name.clone();
            let task = tokio::spawn(etlmesh_stream::run(spec, opts.clone(), drain.clone()));
            (name, task)
        })
        .collect()
}
