//! Batch jobs: `etlmesh run`. Files (or standard input) go through decode, the
//! pipeline's SQL and the sinks, on every core, with a progress display and a summary.
//!
//! ```text
//! reader thread ──chunks / row groups (bounded)──▶ N lanes: decode ─▶ rejects ─▶ dead letters
//!                                                        │
//!                       per-batch SQL ─▶ sink writers ◀──┤ (row-wise SQL)
//!                       whole-input SQL (N partitions) ◀─┘ (aggregates…) ─▶ sink writers
//! ```
//!
//! Invariants:
//! - nothing is visible under a final name until every stage succeeded: sinks are
//!   committed at the end, and aborted on any failure (and with `on_error: fail`, at
//!   the first bad record);
//! - every record read is counted once: `records_in = out + filtered + dead_lettered`.

mod inputs;
mod lanes;
pub mod progress;
mod reader;
mod summary;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use arrow::datatypes::SchemaRef;
use etlmesh_codec::{Limits, Reject};
use etlmesh_config::{ConfigError, Format, PipelineFile};
use etlmesh_engine::{Engine, EngineConfig, EngineError, Kind};
use etlmesh_sink::dead_letter::DeadLetterSink;
use etlmesh_sink::{Sink, SinkError};
use futures::StreamExt;
use tokio::sync::{Mutex, mpsc};

pub use inputs::{Input, resolve as resolve_inputs};
pub use progress::{Counters, ProgressMode};
pub use summary::Summary;

use crate::lanes::{Output, Shared};
use crate::progress::Reporter;
use crate::reader::{Prefetched, ReaderSetup};

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The pipeline file or pipeline name.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// An input as a whole.
    #[error("{0}")]
    Input(String),
    /// The SQL engine.
    #[error("{0}")]
    Engine(#[from] EngineError),
    /// A sink.
    #[error("{0}")]
    Sink(#[from] SinkError),
    /// A bad record, with `on_error: fail`.
    #[error(
        "{0}\n  help: the pipeline stops at the first bad record (on_error: fail); add a dead_letter sink and `on_error: dead_letter` to keep going"
    )]
    Record(Box<Reject>),
}

/// How to run a job.
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// Inputs (paths, directories, patterns, `-`); the source's when empty.
    pub inputs: Vec<String>,
    /// Progress display.
    pub progress: ProgressMode,
    /// When not empty, every input must be a file under one of these directories.
    pub inputs_under: Vec<std::path::PathBuf>,
}

/// Runs pipeline `name` of `file` as a batch job.
pub async fn run(file: &PipelineFile, name: &str, opts: &JobOptions) -> Result<Summary, JobError> {
    let started = Instant::now();
    let job = Job::prepare(file, name, opts).await?;
    let outputs = Outputs::open(&job.spec, &job.transform)?;
    let counters = Arc::new(Counters::default());
    let total = job
        .inputs
        .iter()
        .map(|i| match i {
            Input::File { size, .. } => Some(*size),
            Input::Stdin { .. } => None,
        })
        .sum::<Option<u64>>();
    let reporter = Reporter::start(
        &job.spec.name,
        counters.clone(),
        total,
        opts.progress,
        job.platform.progress_interval,
    );
    let shared = Arc::new(Shared {
        pipeline: job.spec.name.clone(),
        transform: job.transform.clone(),
        dead: outputs.dead.clone(),
        on_error: job.spec.on_error,
        counters: counters.clone(),
        cancel: Arc::new(AtomicBool::new(false)),
    });
    let setup = ReaderSetup {
        inputs: job.inputs.clone(),
        schema: job.schema.clone(),
        csv: job.spec.source.csv.clone(),
        limits: job.limits,
        read_chunk: job.read_chunk,
        prefetched: job.prefetched,
        counters: counters.clone(),
        cancel: shared.cancel.clone(),
    };
    let result = execute(setup, shared, &outputs.sinks, job.threads).await;
    reporter.finish().await;
    let (rows_into_state, spilled) = match result {
        Ok(r) => r,
        Err(e) => {
            outputs.abort();
            return Err(e);
        }
    };
    let (files, bytes_out, dead_file) = outputs.commit()?;
    let mode = mode_name(job.transform.kind());
    let summary = Summary::new(
        &job.spec.name,
        mode,
        job.inputs.len(),
        &counters,
        rows_into_state,
        bytes_out,
        files,
        dead_file,
        spilled,
        started.elapsed(),
    );
    summary.check_invariant();
    Ok(summary)
}

/// A job ready to run: its inputs found, its schema known, its SQL compiled.
struct Job {
    spec: etlmesh_config::PipelineSpec,
    platform: etlmesh_config::Platform,
    threads: usize,
    limits: Limits,
    read_chunk: usize,
    inputs: Vec<Input>,
    schema: SchemaRef,
    /// What schema inference read already, handed to the reader.
    prefetched: Option<Prefetched>,
    transform: Arc<etlmesh_engine::Transform>,
}

impl Job {
    async fn prepare(file: &PipelineFile, name: &str, opts: &JobOptions) -> Result<Self, JobError> {
        let spec = file.pipeline(name)?.clone();
        let platform = file.spec.platform.clone();
        let threads = platform.effective_threads();
        let limits = Limits {
            batch_size: platform.batch_size,
            max_record_bytes: platform.max_record_bytes,
        };
        let read_chunk = platform.read_chunk as usize;
        let inputs = inputs::resolve(&spec, &opts.inputs)?;
        inputs::check_under(&inputs, &opts.inputs_under)?;
        let (schema, prefetched) = match &spec.schema {
            Some(fields) => (etlmesh_codec::schema::arrow_schema(fields), None),
            None => infer(
                &inputs,
                &spec.source.csv,
                &limits,
                read_chunk,
                spec.source.infer_rows,
            )?,
        };
        let engine = Engine::new(EngineConfig::for_platform(&platform, threads))?;
        let transform = Arc::new(
            engine
                .compile(&spec.name, &spec.transform, schema.clone())
                .await?,
        );
        let mode = mode_name(transform.kind());
        tracing::info!(
            pipeline = %spec.name,
            inputs = inputs.len(),
            mode,
            threads,
            "running: {} input(s), {mode} SQL, {threads} threads",
            inputs.len(),
        );
        Ok(Self {
            spec,
            platform,
            threads,
            limits,
            read_chunk,
            inputs,
            schema,
            prefetched,
            transform,
        })
    }
}

/// A job's sinks and dead-letter sink: nothing they write is visible before
/// [`Outputs::commit`], and [`Outputs::abort`] removes it.
struct Outputs {
    sinks: Vec<Arc<dyn Sink>>,
    dead: Option<Arc<DeadLetterSink>>,
}

impl Outputs {
    fn open(
        spec: &etlmesh_config::PipelineSpec,
        transform: &etlmesh_engine::Transform,
    ) -> Result<Self, JobError> {
        let run_id = etlmesh_sink::run_id();
        let sinks = spec
            .sinks
            .iter()
            .map(|s| etlmesh_sink::build(s, transform.output_schema(), &run_id))
            .collect::<Result<_, _>>()?;
        let dead = spec
            .dead_letter
            .as_ref()
            .map(|d| DeadLetterSink::create(d, &spec.name, &run_id).map(Arc::new))
            .transpose()?;
        Ok(Self { sinks, dead })
    }

    fn abort(&self) {
        for s in &self.sinks {
            s.abort();
        }
        if let Some(d) = &self.dead {
            d.abort();
        }
    }

    /// Makes every output visible: the files written, their bytes, the dead-letter file.
    fn commit(
        &self,
    ) -> Result<(Vec<std::path::PathBuf>, u64, Option<std::path::PathBuf>), JobError> {
        let mut files = Vec::new();
        let mut bytes = 0;
        for s in &self.sinks {
            let done = s.commit()?;
            bytes += done.bytes;
            files.extend(done.files);
        }
        let dead_file = match &self.dead {
            Some(d) => d.commit()?.files.into_iter().next(),
            None => None,
        };
        Ok((files, bytes, dead_file))
    }
}

fn mode_name(k: Kind) -> &'static str {
    match k {
        Kind::RowWise => "per-batch",
        Kind::WholeInput => "whole-input",
    }
}

/// Infers the schema of a text input from its first chunk, or reads a Parquet or
/// Arrow input's schema.
pub fn infer_schema(
    input: &Input,
    csv: &etlmesh_config::CsvOptions,
    limits: &Limits,
    read_chunk: usize,
    rows: usize,
) -> Result<SchemaRef, JobError> {
    infer(std::slice::from_ref(input), csv, limits, read_chunk, rows).map(|(s, _)| s)
}

/// Infers the schema from the first input; keeps what it read.
fn infer(
    inputs: &[Input],
    csv: &etlmesh_config::CsvOptions,
    limits: &Limits,
    read_chunk: usize,
    rows: usize,
) -> Result<(SchemaRef, Option<Prefetched>), JobError> {
    let Some(first) = inputs.first() else {
        return Err(JobError::Input("no input".into()));
    };
    match first.format() {
        Format::Parquet | Format::Arrow => {
            let Input::File { path, .. } = first else {
                return Err(JobError::Input(
                    "stdin: Parquet and Arrow on stdin need a declared schema\n  help: declare the pipeline's `schema`".into(),
                ));
            };
            let schema = if first.format() == Format::Parquet {
                etlmesh_codec::binary::ParquetFile::open(path).map(|f| f.schema)
            } else {
                std::fs::File::open(path)
                    .map_err(|e| etlmesh_codec::CodecError::Io {
                        input: first.name(),
                        error: e,
                    })
                    .and_then(|f| {
                        etlmesh_codec::binary::ipc_batches(f, &first.name()).map(|(s, _)| s)
                    })
            }
            .map_err(|e| JobError::Input(e.to_string()))?;
            Ok((schema, None))
        }
        format => {
            let mut chunker = reader::open_text(first, csv, limits, read_chunk)?;
            let chunk = chunker
                .next_chunk()
                .map_err(|e| JobError::Input(e.to_string()))?;
            let Some(chunk) = chunk else {
                return Err(JobError::Input(format!(
                    "{}: the input is empty, so no schema can be inferred\n  help: declare the pipeline's `schema`",
                    first.name()
                )));
            };
            let schema = etlmesh_codec::infer_schema(format, &chunk, csv, rows)
                .map_err(|e| JobError::Input(e.to_string()))?;
            tracing::info!(input = %first.name(), "inferred schema: {}", etlmesh_codec::schema::describe(&schema));
            Ok((
                schema,
                Some(Prefetched {
                    chunker,
                    first: Some(chunk),
                }),
            ))
        }
    }
}

/// Runs the reader and the lanes; returns rows that reached the whole-input SQL's state, and
/// bytes it spilled.
async fn execute(
    setup: ReaderSetup,
    shared: Arc<Shared>,
    sinks: &[Arc<dyn Sink>],
    threads: usize,
) -> Result<(Option<u64>, usize), JobError> {
    let (tx, rx) = mpsc::channel(threads * 2);
    let reader = std::thread::Builder::new()
        .name("etlmesh-reader".into())
        .spawn(move || reader::read_all(setup, tx))
        .map_err(|e| JobError::Input(format!("cannot start the reader thread: {e}")))?;
    let rx = Arc::new(Mutex::new(rx));
    let writers = |sinks: &[Arc<dyn Sink>]| -> Result<Vec<_>, JobError> {
        sinks
            .iter()
            .map(|s| s.writer().map_err(JobError::Sink))
            .collect()
    };
    let mut first_error: Option<JobError> = None;
    let mut keep = |r: Result<(), JobError>, shared: &Shared| {
        if let Err(e) = r {
            shared
                .cancel
                .store(true, std::sync::atomic::Ordering::Relaxed);
            first_error.get_or_insert(e);
        }
    };
    let mut outcome = (None, 0);
    match shared.transform.kind() {
        Kind::RowWise => {
            let mut tasks = Vec::new();
            for _ in 0..threads {
                let output = Output::PerBatch(writers(sinks)?);
                tasks.push(tokio::spawn(lanes::drive(
                    rx.clone(),
                    shared.clone(),
                    output,
                )));
            }
            drop(rx);
            for t in tasks {
                keep(joined(t.await), &shared);
            }
        }
        Kind::WholeInput => {
            let mut job = shared.transform.start_whole_input().await?;
            let input = job
                .input
                .take()
                .ok_or_else(|| JobError::Input("internal: no stream input".into()))?;
            let mut drains = Vec::new();
            for stream in std::mem::take(&mut job.outputs) {
                let mut ws = writers(sinks)?;
                let counters = shared.counters.clone();
                let pipeline = shared.transform.pipeline().to_string();
                drains.push(tokio::spawn(async move {
                    drain(stream, &mut ws, &counters, &pipeline).await
                }));
            }
            let mut feeders = Vec::new();
            for _ in 0..threads {
                let output = Output::WholeInput(input.clone());
                feeders.push(tokio::spawn(lanes::drive(
                    rx.clone(),
                    shared.clone(),
                    output,
                )));
            }
            drop((rx, input));
            for d in drains {
                keep(joined(d.await), &shared);
            }
            job.close_input().await;
            for f in feeders {
                keep(joined(f.await), &shared);
            }
            outcome = (job.rows_into_state(), job.spilled_bytes());
            tracing::debug!(plan = %job.plan_display(), "whole-input plan with metrics");
        }
    }
    if reader.join().is_err() {
        first_error.get_or_insert(JobError::Input("the reader thread panicked".into()));
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(outcome),
    }
}

fn joined(r: Result<Result<(), JobError>, tokio::task::JoinError>) -> Result<(), JobError> {
    r.unwrap_or_else(|e| Err(JobError::Input(format!("a lane failed: {e}"))))
}

/// Writes one output partition of the whole-input SQL.
async fn drain(
    mut stream: etlmesh_engine::SendableRecordBatchStream,
    writers: &mut Vec<Box<dyn etlmesh_sink::SinkWriter>>,
    counters: &Counters,
    pipeline: &str,
) -> Result<(), JobError> {
    while let Some(b) = stream.next().await {
        let b = b.map_err(|e| JobError::Engine(etlmesh_engine::execution_error(pipeline, &e)))?;
        for w in writers.iter_mut() {
            w.write(&b)?;
        }
        Counters::add(&counters.rows_written, b.num_rows() as u64);
    }
    for w in writers.drain(..) {
        w.close()?;
    }
    Ok(())
}
