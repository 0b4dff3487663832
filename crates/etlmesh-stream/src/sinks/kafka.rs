//! The Kafka sink: each row one record (a JSON object) in a topic that may take parts
//! from the row (`readings-{site}`), keyed by the sink's key columns so that a key's
//! rows stay in order in one partition. The producer is idempotent (`acks=all`), so a
//! record retried inside the client is written once; a write commits only once every
//! record's delivery report said stored. A write retried after a failure may write
//! some rows again (at least once, as for every sink that is not transactional).
//!
//! With `exactly_once`, each write is a Kafka transaction (`transactional.id`
//! `etlmesh-<pipeline>-<worker>`) holding the write's records and the source's
//! consumer offsets after them ([`SourceOffsets`]): both commit, or neither does and
//! the write is tried again in a new transaction. A worker that restarts fences the
//! transaction its predecessor left open (`init_transactions` aborts it), so readers
//! with `isolation.level=read_committed` see every row once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

use super::rows::{RowMessage, RowMessages};
use super::{RefusedRow, SinkFailure, SourceOffsets, StreamSink};

/// How long a record may wait for its delivery report (librdkafka's
/// `message.timeout.ms`, unless `options` sets it): past it the write fails and is
/// retried.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a transaction's steps (start, offsets, commit, abort) may block.
const TXN_TIMEOUT: Duration = Duration::from_secs(30);

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
    /// Exactly once: the producer's transactions are initialised.
    transactions_ready: bool,
    /// A delivery failed in a way this producer cannot recover from (fenced).
    stale: AtomicBool,
    /// Exactly once: the source's offsets the next transaction commits.
    offsets: Option<Arc<SourceOffsets>>,
}

impl KafkaSink {
    /// Checks the topic and key against the rows and makes the producer (it connects
    /// in the background; a broker that is down is an outage at the first write).
    pub fn new(
        spec: KafkaSinkSpec,
        schema: &SchemaRef,
        pipeline: &str,
        worker: &str,
    ) -> Result<Self, String> {
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
            .set("max.in.flight.requests.per.connection", "5");
        if !spec.options.contains_key("message.timeout.ms") {
            config.set(
                "message.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            );
        }
        if spec.exactly_once {
            // One per worker slot: its next run fences what this one left open.
            config.set("transactional.id", format!("etlmesh-{pipeline}-{worker}"));
        }
        let producer = producer(&config, &spec.topic)
            .map_err(|e| format!("sink {sink}: cannot make a Kafka producer: {e}"))?;
        Ok(Self {
            spec,
            rows,
            config,
            producer,
            committed: 0,
            transactions_ready: false,
            stale: AtomicBool::new(false),
            offsets: None,
        })
    }

    fn fail(&self, m: impl std::fmt::Display) -> SinkFailure {
        SinkFailure::Retry(format!(
            "kafka:{} (brokers {}): {m}",
            self.spec.topic, self.spec.brokers
        ))
    }

    /// Sends the messages and waits for every delivery report.
    async fn send(&self, messages: &[RowMessage]) -> Result<(), SinkFailure> {
        let n = messages.len();
        let mut reports = Vec::with_capacity(n);
        for m in messages {
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
                    if is_stale(&e) {
                        self.stale.store(true, Ordering::Relaxed);
                    }
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

    /// One transaction: the records and the source's offsets, committed together.
    async fn transaction(&mut self, messages: &[RowMessage]) -> Result<(), SinkFailure> {
        if messages.is_empty() && self.offsets.is_none() {
            return Ok(());
        }
        if !self.transactions_ready {
            let p = self.producer.clone();
            blocking(move || p.init_transactions(TXN_TIMEOUT))
                .await
                .map_err(|e| self.fail(format!("cannot start transactions: {e}")))?;
            self.transactions_ready = true;
        }
        let p = self.producer.clone();
        blocking(move || p.begin_transaction())
            .await
            .map_err(|e| self.fail(format!("cannot begin a transaction: {e}")))?;
        if let Err(e) = self.send(messages).await {
            self.abort().await;
            return Err(e);
        }
        let (p, offsets) = (self.producer.clone(), self.offsets.clone());
        let committed = blocking(move || {
            if let Some(o) = offsets {
                p.send_offsets_to_transaction(&o.offsets, &o.group, TXN_TIMEOUT)?;
            }
            p.commit_transaction(TXN_TIMEOUT)
        })
        .await;
        if let Err(e) = committed {
            self.abort().await;
            return Err(self.fail(format!("the transaction did not commit: {e}")));
        }
        self.offsets = None;
        Ok(())
    }

    /// Aborts the open transaction; a producer that cannot is replaced (the new one
    /// fences it).
    async fn abort(&mut self) {
        let p = self.producer.clone();
        if let Err(e) = blocking(move || p.abort_transaction(TXN_TIMEOUT)).await {
            tracing::warn!(sink = %self.describe(), error = %e, "cannot abort the transaction: a new producer fences it");
            self.renew();
        }
    }

    fn renew(&mut self) {
        match producer(&self.config, &self.spec.topic) {
            Ok(p) => {
                self.producer = p;
                self.transactions_ready = false;
            }
            Err(e) => {
                tracing::error!(sink = %self.describe(), error = %e, "cannot make a new Kafka producer")
            }
        }
    }

    /// An idempotent producer whose state the broker lost (a broker that came back
    /// empty) fails for good: the next write gets a new one.
    fn renew_if_fatal(&mut self) {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            tracing::warn!(sink = %self.describe(), ?code, "the Kafka producer failed for good ({reason}); making a new one");
            self.renew();
        } else if self.stale.swap(false, Ordering::Relaxed) {
            tracing::warn!(sink = %self.describe(), "the broker fenced the Kafka producer (its id or epoch is stale, e.g. after records timed out in flight); making a new one");
            self.renew();
        }
    }
}

/// A delivery error that this producer will get forever: the broker no longer takes
/// its id or epoch (a new producer is needed).
fn is_stale(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::ProducerFenced
                | C::InvalidProducerEpoch
                | C::UnknownProducerId
                | C::OutOfOrderSequenceNumber
        )
    )
}

/// Runs one of librdkafka's blocking calls (transactions) off the runtime's threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
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
            let messages = self.rows.messages(batches).map_err(|e| self.fail(e))?;
            let sent = if self.spec.exactly_once {
                self.transaction(&messages).await
            } else {
                self.send(&messages).await
            };
            if let Err(e) = sent {
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

    fn commit_with(&mut self, offsets: Arc<SourceOffsets>) {
        if self.spec.exactly_once {
            self.offsets = Some(offsets);
        }
    }
}
