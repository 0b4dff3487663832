//! The streams a worker runs: one `etlmesh_stream::run` task per served pipeline with
//! an MQTT source, stopped when the worker drains.

use etlmesh_config::PipelineFile;
use etlmesh_stream::{StreamError, StreamMetrics, StreamOptions};
use etlmesh_telemetry::metrics::SharedRegistry;
use etlmesh_telemetry::process::cpu_timed;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::pipelines::Pipelines;

/// A running stream: its pipeline and its task.
pub(crate) type Running = (String, JoinHandle<Result<(), StreamError>>);

/// What streams share with the rest of the worker.
pub(crate) struct Shared {
    /// Open taps.
    pub taps: std::sync::Arc<etlmesh_sink::tap::TapHub>,
    /// Where streams keep their state.
    pub state_dir: Option<std::path::PathBuf>,
    /// Set when the worker leaves its pool for good.
    pub leaving: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The worker's drain grace.
    pub linger: std::time::Duration,
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
        .filter(|p| pipelines.names().contains(&p.name) && p.stream_source().is_some())
        .cloned()
        .collect();
    if specs.is_empty() {
        return Vec::new();
    }
    let opts = StreamOptions {
        worker: worker.to_string(),
        engine: pipelines.engine.clone(),
        limits: pipelines.limits,
        metrics: StreamMetrics::register(registry),
        taps: shared.taps,
        state_dir: shared.state_dir,
        leaving: shared.leaving,
        dead_letters: None,
        linger: shared.linger,
    };
    specs
        .into_iter()
        .map(|spec| {
            let name = spec.name.clone();
            // Records and CPU time go to the pipeline's usage (energy accounting).
            let mut opts = opts.clone();
            let run = match pipelines.get(&name) {
                Some(p) => {
                    opts.metrics = opts
                        .metrics
                        .count_records_in(p.usage.records.clone())
                        .report_source_pending(p.usage.source_pending.clone())
                        .report_partitions(p.usage.partitions.clone());
                    // One dead-letter file per pipeline and worker, for requests and stream.
                    opts.dead_letters = p.dead.clone();
                    cpu_timed(
                        etlmesh_stream::run(spec, opts, drain.clone()),
                        p.usage.cpu_ns.clone(),
                    )
                }
                None => cpu_timed(
                    etlmesh_stream::run(spec, opts, drain.clone()),
                    Default::default(),
                ),
            };
            let task = tokio::spawn(run);
            (name, task)
        })
        .collect()
}
