//! The foundation's file sinks for streams: rows go to a hidden file that is renamed
//! into place when it rolls — after the roll interval, past the roll size, or when
//! the runner asks (it holds too many unacknowledged messages). Messages are
//! acknowledged once their file is in place.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use etlmesh_config::FileSinkSpec;
use etlmesh_sink::file::FileSink;
use etlmesh_sink::{Sink, SinkWriter};
use futures::future::BoxFuture;

use super::{RefusedRow, SinkFailure, StreamSink};

static ROLLS: AtomicU64 = AtomicU64::new(0);

struct Current {
    sink: Arc<FileSink>,
    writer: Box<dyn SinkWriter>,
    opened: Instant,
    bytes: u64,
}

/// A rolled file set whose commit failed on an outage (object storage refusing or
/// away): its rows are written, not yet visible; the next write or flush tries again.
struct Sealed {
    sink: Arc<FileSink>,
    /// Newest write in it.
    upto: u64,
}

/// Files rolled by time and size.
pub struct RollingFiles {
    spec: FileSinkSpec,
    schema: SchemaRef,
    instance: String,
    current: Option<Current>,
    sealed: Option<Sealed>,
    /// Newest write into `current`.
    pending: u64,
    committed: u64,
}

impl RollingFiles {
    /// A sink writing rows of `schema`; `instance` keeps file names of workers apart.
    pub fn new(spec: FileSinkSpec, schema: SchemaRef, instance: &str) -> Self {
        Self {
            spec,
            schema,
            instance: instance.to_string(),
            current: None,
            sealed: None,
            pending: 0,
            committed: 0,
        }
    }

    fn retry(&self, e: impl std::fmt::Display) -> SinkFailure {
        SinkFailure::Retry(format!("{}: {e}", self.describe()))
    }

    fn fatal(&mut self, e: impl std::fmt::Display) -> SinkFailure {
        if let Some(c) = self.current.take() {
            c.sink.abort();
        }
        SinkFailure::Fatal(format!("{}: {e}", self.describe()))
    }

    /// Finishes the current files and commits them (see [`RollingFiles::commit_sealed`]).
    async fn roll(&mut self) -> Result<(), SinkFailure> {
        if let Some(c) = self.current.take() {
            let sink = c.sink.clone();
            if let Err(e) = c.writer.close() {
                sink.abort();
                return Err(SinkFailure::Fatal(format!("{}: {e}", self.describe())));
            }
            self.sealed = Some(Sealed {
                sink,
                upto: self.pending,
            });
            return self.commit_sealed().await;
        }
        if self.sealed.is_none() {
            self.committed = self.pending;
        }
        Ok(())
    }

    /// Commits the sealed files: renamed into place, or uploaded (on a blocking thread:
    /// an upload takes a while). An outage keeps them sealed and says `Retry`; any
    /// other failure loses them (`Fatal`: the stream restarts, its messages come again).
    async fn commit_sealed(&mut self) -> Result<(), SinkFailure> {
        let Some(sealed) = self.sealed.take() else {
            return Ok(());
        };
        let sink = sealed.sink.clone();
        let done = tokio::task::spawn_blocking(move || sink.commit())
            .await
            .map_err(|e| {
                SinkFailure::Fatal(format!("{}: the commit task failed: {e}", self.describe()))
            })?;
        match done {
            Ok(d) => {
                tracing::debug!(sink = %self.describe(), files = d.files.len(), bytes = d.bytes, "rolled");
                self.committed = sealed.upto;
                Ok(())
            }
            Err(e) if e.is_outage() => {
                self.sealed = Some(sealed);
                Err(self.retry(e))
            }
            Err(e) => {
                sealed.sink.abort();
                Err(SinkFailure::Fatal(format!("{}: {e}", self.describe())))
            }
        }
    }
}

impl StreamSink for RollingFiles {
    fn describe(&self) -> String {
        format!("{}:{}", self.spec.format, self.spec.location())
    }

    fn write<'a>(
        &'a mut self,
        batches: &'a [RecordBatch],
        write: u64,
    ) -> BoxFuture<'a, Result<Vec<RefusedRow>, SinkFailure>> {
        Box::pin(async move {
            // Files sealed by an earlier roll go first: while they cannot commit, this
            // write is refused whole (the runner holds it and sends it again).
            self.commit_sealed().await?;
            if batches.iter().all(|b| b.num_rows() == 0) {
                self.pending = write;
                if self.current.is_none() {
                    self.committed = write;
                }
                return Ok(Vec::new());
            }
            if self.current.is_none() {
                let n = ROLLS.fetch_add(1, Ordering::Relaxed);
                let run = format!("{}-{}-{n:04}", etlmesh_sink::run_id(), self.instance);
                // Blocking: with object storage, the first sink checks the bucket.
                let (spec, schema) = (self.spec.clone(), self.schema.clone());
                let sink =
                    tokio::task::spawn_blocking(move || FileSink::create(spec, schema, &run))
                        .await
                        .map_err(|e| self.retry(e))?
                        .map_err(|e| self.retry(e))?;
                let sink = Arc::new(sink);
                let writer = sink.writer().map_err(|e| self.retry(e))?;
                self.current = Some(Current {
                    sink,
                    writer,
                    opened: Instant::now(),
                    bytes: 0,
                });
            }
            let mut bytes = 0;
            for b in batches {
                let Some(c) = self.current.as_mut() else {
                    return Ok(Vec::new());
                };
                if let Err(e) = c.writer.write(b) {
                    return Err(self.fatal(e));
                }
                c.bytes += b.get_array_memory_size() as u64;
                bytes = c.bytes;
            }
            self.pending = write;
            if bytes >= self.spec.rolling.size {
                // The rows are written either way: an outage now leaves them sealed
                // (not committed, so not acknowledged) for the next write or flush.
                if let Err(e) = self.roll().await {
                    match e {
                        SinkFailure::Retry(m) => {
                            tracing::warn!(sink = %self.describe(), error = %m, "rolled files wait for their commit")
                        }
                        fatal => return Err(fatal),
                    }
                }
            }
            Ok(Vec::new())
        })
    }

    fn committed(&self) -> u64 {
        self.committed
    }

    fn flush(&mut self, force: bool) -> BoxFuture<'_, Result<(), SinkFailure>> {
        Box::pin(async move {
            self.commit_sealed().await?;
            let due = self
                .current
                .as_ref()
                .is_some_and(|c| force || c.opened.elapsed() >= self.spec.rolling.interval);
            if due { self.roll().await } else { Ok(()) }
        })
    }
}
