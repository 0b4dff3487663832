//! Rows on standard output. They are spooled to a temporary file while the run goes
//! on and copied out at commit, so that a failed run prints nothing.

use parking_lot::Mutex;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use etlmesh_codec::encode::{BatchWriter, EncodeOptions, writer};
use etlmesh_config::Format;

use crate::{Committed, Sink, SinkError, SinkWriter, io_error};

/// Standard output, written at commit.
pub struct StdoutSink {
    describe: String,
    path: PathBuf,
    writer: Arc<Mutex<Option<Box<dyn BatchWriter>>>>,
}

impl StdoutSink {
    /// A sink that prints rows of `schema` as `format`.
    pub fn create(format: Format, schema: SchemaRef, run_id: &str) -> Result<Self, SinkError> {
        let describe = format!("stdout:{format}");
        // Two stdout sinks in one run each get their own spool file.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            ".etlmesh-stdout-{run_id}-{}-{n}.tmp",
            std::process::id()
        ));
        let file = File::create(&path).map_err(|e| io_error(&describe, &path, e))?;
        let w = writer(BufWriter::new(file), &schema, &EncodeOptions::new(format)).map_err(
            |error| SinkError::Encode {
                sink: describe.clone(),
                error,
            },
        )?;
        Ok(Self {
            describe,
            path,
            writer: Arc::new(Mutex::new(Some(w))),
        })
    }
}

struct Shared {
    sink: String,
    writer: Arc<Mutex<Option<Box<dyn BatchWriter>>>>,
}

impl SinkWriter for Shared {
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError> {
        let mut guard = self.writer.lock();
        match guard.as_mut() {
            Some(w) => w.write(batch).map_err(|error| SinkError::Encode {
                sink: self.sink.clone(),
                error,
            }),
            None => Ok(()),
        }
    }

    fn close(self: Box<Self>) -> Result<(), SinkError> {
        Ok(())
    }
}

impl Sink for StdoutSink {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn writer(&self) -> Result<Box<dyn SinkWriter>, SinkError> {
        Ok(Box::new(Shared {
            sink: self.describe.clone(),
            writer: self.writer.clone(),
        }))
    }

    fn commit(&self) -> Result<Committed, SinkError> {
        let w = self.writer.lock().take();
        if let Some(w) = w {
            w.finish().map_err(|error| SinkError::Encode {
                sink: self.describe.clone(),
                error,
            })?;
        }
        let mut file =
            File::open(&self.path).map_err(|e| io_error(&self.describe, &self.path, e))?;
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let bytes = std::io::copy(&mut file, &mut out)
            .map_err(|e| io_error(&self.describe, &self.path, e))?;
        out.flush()
            .map_err(|e| io_error(&self.describe, &self.path, e))?;
        let _ = std::fs::remove_file(&self.path);
        Ok(Committed {
            files: Vec::new(),
            bytes,
        })
    }

    fn abort(&self) {
        self.writer.lock().take();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for StdoutSink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
