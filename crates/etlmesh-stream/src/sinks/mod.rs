//! Stream sinks. A stream sink says how far it has committed (the arrival number of the
//! newest message whose rows are durable); the runner acknowledges messages up to the
//! lowest of these. PostgreSQL and MQTT commit every write; file sinks commit when they
//! roll a file (by time, by size, or when the runner holds too many messages).
//!
//! [`build`] is the one list of stream sink kinds.

mod files;
mod mqtt;
mod postgres;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use etlmesh_config::{PipelineSpec, SinkSpec};
use futures::future::BoxFuture;

pub use files::RollingFiles;
pub use mqtt::MqttSink;
pub use postgres::PostgresSink;

/// Why a write did not commit.
#[derive(Debug, Clone)]
pub enum SinkFailure {
    /// The destination is unavailable (down, unreachable, full): keep the rows, try
    /// again later, acknowledge nothing meanwhile.
    Retry(String),
    /// The destination refuses these rows (a constraint, a type): they go to the dead
    /// letters with the reason.
    Refused(String),
    /// Rows already written are lost (a file that could not be finished): the stream
    /// stops without acknowledging them, and the broker sends them again to the
    /// restarted worker.
    Fatal(String),
}

impl std::fmt::Display for SinkFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkFailure::Retry(m) | SinkFailure::Refused(m) | SinkFailure::Fatal(m) => {
                f.write_str(m)
            }
        }
    }
}

/// A destination of a stream's rows.
pub trait StreamSink: Send {
    /// For logs and metrics: `postgres:readings`.
    fn describe(&self) -> String;
    /// Writes the rows of messages up to `seq`.
    fn write<'a>(
        &'a mut self,
        batches: &'a [RecordBatch],
        seq: u64,
    ) -> BoxFuture<'a, Result<(), SinkFailure>>;
    /// The newest message whose rows are committed.
    fn committed(&self) -> u64;
    /// Commits what is pending when it is due (or at once with `force`).
    fn flush(&mut self, force: bool) -> BoxFuture<'_, Result<(), SinkFailure>> {
        let _ = force;
        Box::pin(async { Ok(()) })
    }
}

/// Builds the stream sinks of a pipeline, for rows of `schema`.
pub fn build(
    pipeline: &PipelineSpec,
    schema: &SchemaRef,
    instance: &str,
) -> Result<Vec<Box<dyn StreamSink>>, String> {
    pipeline
        .sinks
        .iter()
        .map(|s| -> Result<Box<dyn StreamSink>, String> {
            Ok(match s {
                SinkSpec::File(f) => {
                    Box::new(RollingFiles::new(f.clone(), schema.clone(), instance))
                }
                SinkSpec::Postgres(p) => {
                    Box::new(PostgresSink::new(p.clone(), schema, &pipeline.dedup)?)
                }
                SinkSpec::Mqtt(m) => Box::new(MqttSink::new(m.clone(), schema, instance)?),
                SinkSpec::Stdout { .. } => {
                    return Err(format!(
                        "pipeline `{}`: stdout is not a stream sink",
                        pipeline.name
                    ));
                }
            })
        })
        .collect()
}
