//! The JetStream sink: each row published as one JSON object to a subject that may
//! take tokens from the row (`results.{device_id}`). A write commits only once
//! JetStream acknowledged every message of it (its PubAck: stored). Each message
//! carries a `Nats-Msg-Id` made of the row's key columns (every column by default),
//! so that a row published again — a write retried, a message redelivered after a
//! crash — is stored once within the stream's duplicate window.

use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_nats::jetstream::{self, context::PublishAckFuture};
use bytes::Bytes;
use etlmesh_config::NatsSinkSpec;
use futures::future::BoxFuture;
use tokio::sync::OnceCell;

use super::rows::RowMessages;
use super::{RefusedRow, SinkFailure, StreamSink};
use crate::source::fnv1a;

/// How long a write waits for JetStream's acknowledgements.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Rows published to a JetStream subject.
pub struct NatsSink {
    spec: NatsSinkSpec,
    rows: RowMessages,
    pipeline: String,
    js: OnceCell<jetstream::Context>,
    committed: u64,
}

impl NatsSink {
    /// Checks the subject and key against the rows; connects at the first write.
    pub fn new(spec: NatsSinkSpec, schema: &SchemaRef, pipeline: &str) -> Result<Self, String> {
        let sink = format!("nats:{}", spec.subject);
        let key = if spec.key.is_empty() {
            (0..schema.fields().len()).collect()
        } else {
            RowMessages::key_columns(&spec.key, schema, &sink)?
        };
        let rows = RowMessages::new(&spec.subject, &key, schema, &sink)?;
        Ok(Self {
            spec,
            rows,
            pipeline: pipeline.to_string(),
            js: OnceCell::new(),
            committed: 0,
        })
    }

    fn fail(&self, m: impl std::fmt::Display) -> SinkFailure {
        SinkFailure::Retry(format!("nats:{}: {m}", self.spec.subject))
    }

    async fn context(&self) -> Result<&jetstream::Context, SinkFailure> {
        self.js
            .get_or_try_init(|| async {
                let client = crate::source::nats::connect(
                    &self.spec.url,
                    &format!("etlmesh-sink-{}", self.pipeline),
                )
                .await
                .map_err(|e| self.fail(format!("cannot connect to {}: {e}", self.spec.url)))?;
                let js = jetstream::new(client);
                if let Some(stream) = &self.spec.stream {
                    let found = js.get_stream(stream).await;
                    if found.is_err() && self.spec.create {
                        let subjects = vec![
                            self.spec
                                .subject
                                .split('.')
                                .map(|t| if t.starts_with('{') { "*" } else { t })
                                .collect::<Vec<_>>()
                                .join("."),
                        ];
                        js.create_stream(jetstream::stream::Config {
                            name: stream.clone(),
                            subjects,
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| {
                            self.fail(format!("cannot create JetStream stream `{stream}`: {e}"))
                        })?;
                    } else if let Err(e) = found {
                        return Err(self.fail(format!(
                            "JetStream stream `{stream}`: {e}; create it or set `create: true` on the sink"
                        )));
                    }
                }
                Ok(js)
            })
            .await
    }

    /// Subjects, message ids and payloads of the rows: the id is a digest of the
    /// pipeline and the row's key.
    fn messages(
        &self,
        batches: &[RecordBatch],
    ) -> Result<Vec<(String, String, Bytes)>, SinkFailure> {
        let rows = self.rows.messages(batches).map_err(|e| self.fail(e))?;
        Ok(rows
            .into_iter()
            .map(|m| {
                let mut id = self.pipeline.clone();
                id.push('\u{1f}');
                id.push_str(m.key.as_deref().unwrap_or(""));
                let id = format!("{}-{:016x}", self.pipeline, fnv1a(id.as_bytes()));
                (m.address, id, m.payload)
            })
            .collect())
    }

    async fn publish(&self, batches: &[RecordBatch]) -> Result<(), SinkFailure> {
        let messages = self.messages(batches)?;
        if messages.is_empty() {
            return Ok(());
        }
        let js = self.context().await?;
        let n = messages.len();
        let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(n);
        for (subject, id, payload) in messages {
            let m = jetstream::message::PublishMessage::build()
                .payload(payload)
                .message_id(id);
            let f = js
                .send_publish(subject, m)
                .await
                .map_err(|e| self.fail(format!("cannot publish: {e}")))?;
            acks.push(f);
        }
        let all =
            futures::future::join_all(acks.into_iter().map(std::future::IntoFuture::into_future));
        let results = tokio::time::timeout(ACK_TIMEOUT, all).await.map_err(|_| {
            self.fail(format!(
                "JetStream acknowledged not all of {n} messages within {} s",
                ACK_TIMEOUT.as_secs()
            ))
        })?;
        for r in results {
            r.map_err(|e| self.fail(format!("not stored: {e}")))?;
        }
        Ok(())
    }
}

impl StreamSink for NatsSink {
    fn describe(&self) -> String {
        format!("nats:{}", self.spec.subject)
    }

    fn write<'a>(
        &'a mut self,
        batches: &'a [RecordBatch],
        write: u64,
    ) -> BoxFuture<'a, Result<Vec<RefusedRow>, SinkFailure>> {
        Box::pin(async move {
            self.publish(batches).await?;
            self.committed = write;
            Ok(Vec::new())
        })
    }

    fn committed(&self) -> u64 {
        self.committed
    }
}
