//! Lanes: the tasks of a batch run that each take a unit of work from the reader,
//! decode it, send rejects to the dead-letter sink (or stop the run), then either
//! transform each batch and write it (per-batch mode) or feed it to the whole-input SQL.
//! (Not to be confused with the mesh's ETL workers, `etlmesh-worker`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arrow::array::RecordBatch;
use etlmesh_codec::{DecodeOutput, Provenance, Reject};
use etlmesh_config::OnError;
use etlmesh_engine::Transform;
use etlmesh_sink::SinkWriter;
use etlmesh_sink::dead_letter::{DeadLetterRoute, DeadLetterSink, DeadLetterWrite, Routed};
use tokio::sync::{Mutex, mpsc};

use crate::JobError;
use crate::progress::Counters;
use crate::reader::Work;

/// What every lane shares.
pub(crate) struct Shared {
    /// The pipeline's name, for its dead letters.
    pub pipeline: String,
    pub transform: Arc<Transform>,
    pub dead: Option<Arc<DeadLetterSink>>,
    pub on_error: OnError,
    pub counters: Arc<Counters>,
    pub cancel: Arc<AtomicBool>,
}

/// Where a lane's decoded batches go.
pub(crate) enum Output {
    /// Transform here and write to these sink writers.
    PerBatch(Vec<Box<dyn SinkWriter>>),
    /// Feed the whole-input SQL.
    WholeInput(mpsc::Sender<RecordBatch>),
}

impl Shared {
    pub(crate) fn rejects(&self, rejects: Vec<Reject>) -> Result<(), JobError> {
        let route = DeadLetterRoute {
            pipeline: &self.pipeline,
            on_error: self.on_error,
            sink: self.dead.as_deref().map(|d| d as &dyn DeadLetterWrite),
            taps: None,
        };
        match route.route(&rejects).map_err(JobError::Sink)? {
            Routed::DeadLettered(n) => {
                Counters::add(&self.counters.dead_lettered, n as u64);
                Ok(())
            }
            Routed::Refused(first) => {
                self.cancel.store(true, Ordering::Relaxed);
                Err(JobError::Record(Box::new(first.clone())))
            }
        }
    }
}

fn decode(work: Work) -> Result<DecodeOutput, JobError> {
    let codec = |e: etlmesh_codec::CodecError| JobError::Input(e.to_string());
    match work {
        Work::Text {
            chunk,
            layout,
            decoder,
        } => decoder.decode_text(&chunk, &layout).map_err(codec),
        Work::Typed {
            batch,
            provenance,
            decoder,
        } => Ok(decoder.decode_typed(&batch, &provenance)),
        Work::ParquetGroup {
            file,
            group,
            decoder,
        } => {
            let reader = file
                .read_groups(vec![group], decoder.limits.batch_size)
                .map_err(codec)?;
            let mut out = DecodeOutput::default();
            let mut row = file.first_row_of(group);
            for b in reader {
                let b = b.map_err(|e| {
                    JobError::Input(format!("{}: bad Parquet data: {e}", file.path))
                })?;
                let prov = Provenance::Rows {
                    source: file.path.clone(),
                    first_row: row,
                };
                row += b.num_rows() as u64;
                let o = decoder.decode_typed(&b, &prov);
                out.records += o.records;
                out.batches.extend(o.batches);
                out.rejects.extend(o.rejects);
            }
            Ok(out)
        }
    }
}

/// Runs one lane until the work runs out.
pub(crate) async fn drive(
    rx: Arc<Mutex<mpsc::Receiver<Result<Work, JobError>>>>,
    shared: Arc<Shared>,
    mut output: Output,
) -> Result<(), JobError> {
    let result = work_loop(&rx, &shared, &mut output).await;
    if let Output::PerBatch(writers) = output {
        for w in writers {
            w.close().map_err(JobError::Sink)?;
        }
    }
    result
}

async fn work_loop(
    rx: &Mutex<mpsc::Receiver<Result<Work, JobError>>>,
    shared: &Shared,
    output: &mut Output,
) -> Result<(), JobError> {
    let c = &shared.counters;
    loop {
        if shared.cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        let next = rx.lock().await.recv().await;
        let Some(work) = next else { return Ok(()) };
        let decoded = decode(work?)?;
        Counters::add(&c.records_in, decoded.records);
        Counters::add(&c.decoded, decoded.rows() as u64);
        shared.rejects(decoded.rejects)?;
        for batch in decoded.batches {
            match output {
                Output::PerBatch(writers) => {
                    let r = shared
                        .transform
                        .apply(&batch)
                        .await
                        .map_err(JobError::Engine)?;
                    Counters::add(&c.records_out, r.rows_out);
                    Counters::add(&c.filtered, r.filtered());
                    shared.rejects(r.rejects)?;
                    for out in &r.batches {
                        for w in writers.iter_mut() {
                            w.write(out).map_err(JobError::Sink)?;
                        }
                        Counters::add(&c.rows_written, out.num_rows() as u64);
                    }
                }
                Output::WholeInput(tx) => {
                    if tx.send(batch.batch).await.is_err() {
                        // The SQL stopped reading (a LIMIT was reached, or it failed).
                        return Ok(());
                    }
                }
            }
        }
    }
}
