//! Stream sinks. The runner numbers its writes; a stream sink says how far it has
//! committed (the newest write whose rows are durable), and the runner acknowledges
//! the messages of the writes every sink committed. PostgreSQL, MQTT, JetStream and
//! Kafka commit every write; file sinks commit when they roll a file (by time, by
//! size, or when the runner holds too many messages). An exactly-once Kafka sink
//! commits the source's offsets in the write's own transaction ([`SourceOffsets`]).
//!
//! [`build`] is the one list of stream sink kinds.

mod files;
mod kafka;
mod mqtt;
mod nats;
mod postgres;
mod rows;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use etlmesh_config::{PipelineSpec, SinkSpec};
use futures::future::BoxFuture;

pub use files::RollingFiles;
pub use kafka::KafkaSink;
pub use mqtt::MqttSink;
pub use nats::NatsSink;
pub use postgres::PostgresSink;

/// The source's consumer offsets that an exactly-once write commits in its own
/// transaction (Kafka to Kafka): per partition the next record to read, and the
/// consumer group they belong to.
pub struct SourceOffsets {
    /// `topic[partition]@next`.
    pub offsets: rdkafka::TopicPartitionList,
    /// The consumer's group and generation.
    pub group: rdkafka::consumer::ConsumerGroupMetadata,
}

/// Why a write did not commit.
#[derive(Debug, Clone)]
pub enum SinkFailure {
    /// The destination is unavailable (down, unreachable, full, a table that is gone,
    /// a grant revoked): keep the rows, try again later, acknowledge nothing meanwhile.
    Retry(String),
    /// Rows already written are lost (a file that could not be finished): the stream
    /// stops without acknowledging them, and the broker sends them again to the
    /// restarted worker.
    Fatal(String),
}

impl std::fmt::Display for SinkFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkFailure::Retry(m) | SinkFailure::Fatal(m) => f.write_str(m),
        }
    }
}

/// A row that a sink would not take however often it is sent (a constraint, a value
/// the destination cannot hold): it goes to the dead letters with the reason, and the
/// rest of its write commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRow {
    /// The batch of the write.
    pub batch: usize,
    /// The row in that batch.
    pub row: usize,
    /// The destination's own words.
    pub reason: String,
}

/// A destination of a stream's rows.
pub trait StreamSink: Send {
    /// For logs and metrics: `postgres:readings`.
    fn describe(&self) -> String;
    /// Writes rows; `write` numbers the write (increasing). The rows it refused are
    /// returned; the others are written (committed, or pending for
    /// [`StreamSink::flush`]), and the write counts as handled either way.
    fn write<'a>(
        &'a mut self,
        batches: &'a [RecordBatch],
        write: u64,
    ) -> BoxFuture<'a, Result<Vec<RefusedRow>, SinkFailure>>;
    /// The newest write whose rows are committed.
    fn committed(&self) -> u64;
    /// For a sink whose writes are transactions (an exactly-once Kafka sink): the
    /// source's offsets that the next write commits with its rows. Others ignore it.
    fn commit_with(&mut self, offsets: std::sync::Arc<SourceOffsets>) {
        let _ = offsets;
    }
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
                    let sink = PostgresSink::new(p.clone(), schema, &pipeline.dedup)?;
                    // A window's row is final: loaded again (a partition moved), the
                    // first stays.
                    Box::new(if pipeline.window.is_some() {
                        sink.keep_first()
                    } else {
                        sink
                    })
                }
                SinkSpec::Mqtt(m) => Box::new(MqttSink::new(m.clone(), schema, instance)?),
                SinkSpec::Nats(n) => Box::new(NatsSink::new(n.clone(), schema, &pipeline.name)?),
                SinkSpec::Kafka(k) => {
                    Box::new(KafkaSink::new(k.clone(), schema, &pipeline.name, instance)?)
                }
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
