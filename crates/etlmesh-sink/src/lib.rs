//! Sinks: where a pipeline's rows and its dead letters go.
//!
//! Every sink writes atomically: data goes to hidden temporary files (`.name.tmp`)
//! next to their final place, and [`Sink::commit`] renames them when the run
//! succeeds; [`Sink::abort`] removes them when it fails. A crash never leaves a
//! half-written file under a final name.
//!
//! - [`file::FileSink`]: CSV, NDJSON, Parquet or Arrow files in a directory,
//!   optionally Hive-partitioned (`device_id=d1/part-….parquet`), or in a bucket
//!   (`s3://…`): staged locally, uploaded at commit ([`object`]).
//! - [`stdout::StdoutSink`]: the encoded rows on standard output, written at commit.
//! - [`dead_letter::DeadLetterSink`]: rejected records as NDJSON with their origin
//!   and reason.
//! - [`tap::TapHub`]: live samples of records for `etlmesh tap`, free when no one
//!   listens.
//!
//! [`build`] is the one list of sink kinds.

pub mod dead_letter;
pub mod file;
pub mod object;
mod partition;
pub mod stdout;
pub mod tap;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use etlmesh_config::SinkSpec;

/// Errors of sinks.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A directory or file cannot be written.
    #[error("sink {sink}: cannot write to {path}: {error}\n  help: {help}")]
    Io {
        /// The sink.
        sink: String,
        /// The path.
        path: PathBuf,
        /// The error.
        error: std::io::Error,
        /// What to do.
        help: String,
    },
    /// The settings do not fit the data.
    #[error("sink {sink}: {message}")]
    Config {
        /// The sink.
        sink: String,
        /// What is wrong, and what to do.
        message: String,
    },
    /// Object storage refused or failed a request (an upload at commit, or the check
    /// when the sink starts). The files not uploaded stay for the next commit.
    #[error("sink {sink}: object storage {url}: {error}\n  help: {help}")]
    Store {
        /// The sink.
        sink: String,
        /// The sink's `s3://` URL.
        url: String,
        /// The error.
        #[source]
        error: Box<object_store::Error>,
        /// What to do.
        help: String,
    },
    /// Encoding failed.
    #[error("sink {sink}: {error}")]
    Encode {
        /// The sink.
        sink: String,
        /// The error.
        error: etlmesh_codec::CodecError,
    },
}

pub(crate) fn io_error(sink: &str, path: &Path, error: std::io::Error) -> SinkError {
    let help = match error.kind() {
        std::io::ErrorKind::PermissionDenied => {
            "fix the directory's permissions, or choose another path".to_string()
        }
        std::io::ErrorKind::NotADirectory | std::io::ErrorKind::AlreadyExists => {
            "a file stands where a directory is needed; choose another path".to_string()
        }
        std::io::ErrorKind::StorageFull => "free some disk space".to_string(),
        _ => "check that the path is a directory you can write to".to_string(),
    };
    SinkError::Io {
        sink: sink.to_string(),
        path: path.to_path_buf(),
        error,
        help,
    }
}

impl SinkError {
    /// Whether trying again later may succeed (object storage unavailable or refusing):
    /// a stream holds its messages instead of stopping.
    pub fn is_outage(&self) -> bool {
        matches!(self, SinkError::Store { .. })
    }
}

/// What a commit made visible.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Committed {
    /// Files now under their final names (`s3://bucket/key` for objects).
    pub files: Vec<PathBuf>,
    /// Bytes in them.
    pub bytes: u64,
}

/// A destination of rows.
pub trait Sink: Send + Sync {
    /// For logs: `parquet:out/clean`.
    fn describe(&self) -> String;
    /// A writer for one worker thread; each writes its own files.
    fn writer(&self) -> Result<Box<dyn SinkWriter>, SinkError>;
    /// Makes everything written visible under final names.
    fn commit(&self) -> Result<Committed, SinkError>;
    /// Removes everything written.
    fn abort(&self);
}

/// Writes one worker's rows.
pub trait SinkWriter: Send {
    /// Writes rows.
    fn write(&mut self, batch: &RecordBatch) -> Result<(), SinkError>;
    /// Finishes this writer's files (they still wait for the sink's commit).
    fn close(self: Box<Self>) -> Result<(), SinkError>;
}

/// A name unique to one run, used in file names: `20261126T105501Z-1a2b3c`.
pub fn run_id() -> String {
    let now = chrono::Utc::now();
    let salt = (now.timestamp_subsec_nanos() ^ std::process::id().rotate_left(16)) & 0xff_ffff;
    format!("{}-{salt:06x}", now.format("%Y%m%dT%H%M%SZ"))
}

/// Builds the sink a spec describes, for rows of `schema`. This is the one list of
/// sink kinds.
pub fn build(
    spec: &SinkSpec,
    schema: &SchemaRef,
    run_id: &str,
) -> Result<Arc<dyn Sink>, SinkError> {
    Ok(match spec {
        SinkSpec::File(f) => Arc::new(file::FileSink::create(f.clone(), schema.clone(), run_id)?),
        SinkSpec::Stdout { format } => {
            Arc::new(stdout::StdoutSink::create(*format, schema.clone(), run_id)?)
        }
        SinkSpec::Postgres(_) | SinkSpec::Mqtt(_) | SinkSpec::Nats(_) | SinkSpec::Kafka(_) => {
            return Err(SinkError::Config {
                sink: spec.describe(),
                message: "loads streams only: run the pipeline in workers (`etlmesh up`, `etlmesh worker`)".into(),
            });
        }
    })
}

/// Checks, without writing anything, that a file sink's directory could be created
/// and written: the nearest existing ancestor must be a writable directory.
pub fn check_writable(spec: &SinkSpec) -> Result<(), SinkError> {
    let SinkSpec::File(f) = spec else {
        return Ok(());
    };
    let sink = spec.describe();
    let mut p: &Path = &f.path;
    loop {
        match std::fs::metadata(p) {
            Ok(m) if m.is_dir() => {
                return if m.permissions().readonly() {
                    Err(io_error(
                        &sink,
                        p,
                        std::io::Error::from(std::io::ErrorKind::PermissionDenied),
                    ))
                } else {
                    Ok(())
                };
            }
            Ok(_) => {
                return Err(io_error(
                    &sink,
                    p,
                    std::io::Error::from(std::io::ErrorKind::NotADirectory),
                ));
            }
            Err(_) => match p.parent() {
                Some(parent) if !parent.as_os_str().is_empty() => p = parent,
                _ => return Ok(()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_look_like_timestamps() {
        let id = run_id();
        assert_eq!(id.len(), 23, "{id}");
        assert!(id.starts_with("20"), "{id}");
    }
}
