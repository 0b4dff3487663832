//! The Kafka sink: each row one record (a JSON object) in a topic that may take parts
//! from the row (`readings-{site}`), keyed by the sink's key columns so that a key's
//! rows stay in order in one partition. The producer is idempotent (`acks=all`), so a
//! record retried inside the client is written once; a write commits only once every
//! record's delivery report said stored. A write retried after a failure may write
//! some rows again (at least once, as for every sink that is not transactional).

use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use etlmesh_config::KafkaSinkSpec;
use futures::future::BoxFuture;
use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use super::rows::RowMessages;
use super::{RefusedRow, SinkFailure, StreamSink};

/// How long a record may wait for its delivery report (librdkafka's
/// `message.timeout.ms`): past it the write fails and is retried.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// librdkafka's own logs and errors, at debug level: it reports every failed
/// reconnect, while an outage is the sink's to report (a failed write, retried with
/// backoff, on the runner's log line and metrics).
struct Quiet {
    topic: String,
}

impl ClientContext for Quiet {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        tracing::debug!(sink = %format_args!("kafka:{}", self.topic), ?level, fac, "librdkafka: {log_message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(sink = %format_args!("kafka:{}", self.topic), %error, "librdkafka: {reason}");
    }
}

/// Rows produced to a Kafka topic.
pub struct KafkaSink {
    spec: KafkaSinkSpec,
    rows: RowMessages,
    config: ClientConfig,
    producer: FutureProducer<Quiet>,
    committed: u64,
}

impl KafkaSink {
    /// Checks the topic and key against the rows and makes the producer (it connects
    /// in the background; a broker that is down is an outage at the first write).
    pub fn new(spec: KafkaSinkSpec, schema: &SchemaRef, pipeline: &str) -> Result<Self, String> {
        let sink = format!("kafka:{}", spec.topic);
        let key = RowMessages::key_columns(&spec.key, schema, &sink)?;
        let rows = RowMessages::new(&spec.topic, &key, schema, &sink)?;
        let mut config = ClientConfig::new();
        for (k, v) in &spec.options {
            config.set(k, v);
        }
        config
            .set("bootstrap.servers", &spec.brokers)
            .set("client.id", format!("etlmesh-{pipeline}"))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set(
                "message.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            );
        let producer = producer(&config, &spec.topic)
            .map_err(|e| format!("sink {sink}: cannot make a Kafka producer: {e}"))?;
        Ok(Self {
            spec,
            rows,
            config,
            producer,
            committed: 0,
        })
    }

    fn fail(&self, m: impl std::fmt::Display) -> SinkFailure {
        SinkFailure::Retry(format!(
            "kafka:{} (brokers {}): {m}",
            self.spec.topic, self.spec.brokers
        ))
    }

    async fn produce(&self, batches: &[RecordBatch]) -> Result<(), SinkFailure> {
        let messages = self.rows.messages(batches).map_err(|e| self.fail(e))?;
        if messages.is_empty() {
            return Ok(());
        }
        let n = messages.len();
        let mut reports = Vec::with_capacity(n);
        for m in &messages {
            let mut record = FutureRecord::to(&m.address).payload(&m.payload[..]);
            if let Some(k) = &m.key {
                record = record.key(k.as_str());
            }
            // A full local queue waits for room (backpressure), up to the timeout.
            let f = self
                .producer
                .send_result(record)
                .map_err(|(e, _)| self.fail(format!("cannot queue a record: {e}")))?;
            reports.push(f);
        }
        let results = futures::future::join_all(reports).await;
        let mut failed = 0usize;
        let mut first: Option<String> = None;
        for r in results {
            match r {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    failed += 1;
                    first.get_or_insert_with(|| e.to_string());
                }
                Err(_) => {
                    failed += 1;
                    first.get_or_insert_with(|| "the producer was dropped".into());
                }
            }
        }
        match first {
            None => Ok(()),
            Some(e) => Err(self.fail(format!("{failed} of {n} records not stored: {e}"))),
        }
    }

    /// An idempotent producer whose state the broker lost (a broker that came back
    /// empty) fails for good: the next write gets a new one.
    fn renew_if_fatal(&mut self) {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            tracing::warn!(sink = %self.describe(), ?code, "the Kafka producer failed for good ({reason}); making a new one");
            match producer(&self.config, &self.spec.topic) {
                Ok(p) => self.producer = p,
                Err(e) => {
                    tracing::error!(sink = %self.describe(), error = %e, "cannot make a new Kafka producer")
                }
            }
        }
    }
}

fn producer(config: &ClientConfig, topic: &str) -> Result<FutureProducer<Quiet>, KafkaError> {
    config.create_with_context(Quiet {
        topic: topic.to_string(),
    })
}

impl StreamSink for KafkaSink {
    fn describe(&self) -> String {
        format!("kafka:{}", self.spec.topic)
    }

    fn write<'a>(
        &'a mut self,
        batches: &'a [RecordBatch],
        write: u64,
    ) -> BoxFuture<'a, Result<Vec<RefusedRow>, SinkFailure>> {
        Box::pin(async move {
            if let Err(e) = self.produce(batches).await {
                self.renew_if_fatal();
                return Err(e);
            }
            self.committed = write;
            Ok(Vec::new())
        })
    }

    fn committed(&self) -> u64 {
        self.committed
    }
}
