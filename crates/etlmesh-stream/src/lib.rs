//! Streams: pipelines that consume an MQTT subscription or a JetStream consumer while
//! their workers run.
//!
//! A worker serving a pipeline with a stream source (`type: mqtt`, `type: nats`) runs
//! one [`run`] task for it:
//!
//! 1. a [`source`] hands it messages with their positions: a persistent MQTT session
//!    (a stable client id per worker slot and source, a shared subscription
//!    `$share/<group>/<filter>` — or a plain one when one worker serves the pipeline —
//!    manual acknowledgements), or a durable JetStream pull consumer shared by the
//!    pipeline's workers (explicit acknowledgements);
//! 2. the runner ([`runner`]) collects micro-batches (so many records or so long),
//!    decodes them ([`decode`]) into the pipeline's schema with the topic's levels as
//!    columns, drops duplicate keys, and runs the SQL — per micro-batch, or per
//!    event-time window when it closes ([`window`]);
//! 3. [`sinks`] load the rows (PostgreSQL, MQTT, JetStream, rolling files); bad and late records
//!    go to the dead letters;
//! 4. messages are acknowledged, in the order they came, only up to the oldest one
//!    whose rows some sink has not committed or an open window still holds.
//!
//! A worker killed at any point loses nothing: what it had not acknowledged, the
//! broker sends again when the slot's session comes back. Duplicates that this
//! creates are removed by a `dedup` key where the sink can honour it; windows resume
//! from the watermark their sinks committed ([`state`]), so redelivered records of
//! windows already loaded are not counted twice.

pub mod decode;
mod dedup;
mod metrics;
pub mod runner;
pub mod sinks;
pub mod source;
pub mod state;
pub mod window;

pub use metrics::{PartitionLags, StreamMetrics};
pub use runner::{StreamOptions, run};

/// Errors that stop a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The broker cannot be reached or refused the client.
    #[error(
        "MQTT broker {broker}: {message}; check the source's `broker` and that the broker runs"
    )]
    Connect {
        /// host:port.
        broker: String,
        /// What happened.
        message: String,
    },
    /// The JetStream server cannot be reached, or the stream or consumer is missing.
    #[error("NATS {url}: {message}")]
    Nats {
        /// The server(s).
        url: String,
        /// What happened and what to do.
        message: String,
    },
    /// The Kafka brokers cannot be reached, or a topic is missing.
    #[error("Kafka {brokers}: {message}")]
    Kafka {
        /// The bootstrap brokers.
        brokers: String,
        /// What happened and what to do.
        message: String,
    },
    /// The MQTT session failed.
    #[error("MQTT: {0}")]
    Mqtt(String),
    /// Another source failed (JetStream).
    #[error("source: {0}")]
    Source(String),
    /// The pipeline cannot run as a stream.
    #[error("pipeline `{pipeline}`: {message}")]
    Pipeline {
        /// The pipeline.
        pipeline: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// A sink lost rows it had taken: the stream stops so that the broker sends the
    /// messages again to a new worker.
    #[error("pipeline `{pipeline}`: {message}; stopping so that the broker redelivers")]
    Sink {
        /// The pipeline.
        pipeline: String,
        /// What happened.
        message: String,
    },
}

use arrow::datatypes::SchemaRef;
use etlmesh_config::PipelineSpec;

/// The schema of the table `input` that a stream pipeline's SQL reads: the declared
/// fields, the topic's `{column}` levels, and `window_start`/`window_end` when it has
/// a window. `None` for pipelines that do not stream (or declare no schema).
pub fn sql_input_schema(spec: &PipelineSpec) -> Option<SchemaRef> {
    let source = spec.stream_source()?;
    let declared = etlmesh_codec::schema::arrow_schema(spec.schema.as_ref()?);
    let decoder = decode::MessageDecoder::new(
        source,
        &declared,
        &spec.source.csv,
        etlmesh_codec::Limits::default(),
    );
    Some(window::sql_schema(
        decoder.input_schema(),
        spec.window.is_some(),
    ))
}

/// Checks the stream sinks of a pipeline against the rows its SQL produces: the
/// problems, by sink index.
pub fn check_sinks(spec: &PipelineSpec, output: &SchemaRef) -> Vec<(usize, String)> {
    spec.sinks
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s {
            etlmesh_config::SinkSpec::Postgres(p) => {
                sinks::PostgresSink::new(p.clone(), output, &spec.dedup)
                    .err()
                    .map(|e| (i, e))
            }
            _ => None,
        })
        .collect()
}

/// Whether a PostgreSQL server accepts a connection at `url` within 2 s.
pub fn postgres_answers(url: &str) -> bool {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return false;
    };
    rt.block_on(async {
        matches!(
            tokio::time::timeout(
                std::time::Duration::from_secs(2),
                tokio_postgres::connect(url, tokio_postgres::NoTls)
            )
            .await,
            Ok(Ok(_))
        )
    })
}
