//! The JetStream sink: each row published as one JSON object to a subject that may
//! take tokens from the row (`results.{device_id}`). A write commits only once
//! JetStream acknowledged every message of it (its PubAck: stored). Each message
//! carries a `Nats-Msg-Id` made of the row's key columns (every column by default),
//! so that a row published again — a write retried, a message redelivered after a
//! crash — is stored once within the stream's duplicate window.

use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use async_nats::jetstream::{self, context::PublishAckFuture};
use bytes::Bytes;
use etlmesh_config::NatsSinkSpec;
use futures::future::BoxFuture;
use tokio::sync::OnceCell;

use super::{RefusedRow, SinkFailure, StreamSink};
use crate::source::fnv1a;

/// How long a write waits for JetStream's acknowledgements.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

enum Part {
    Text(String),
    Column(usize),
}

/// Rows published to a JetStream subject.
pub struct NatsSink {
    spec: NatsSinkSpec,
    subject: Vec<Part>,
    /// Columns of the message id.
    key: Vec<usize>,
    pipeline: String,
    js: OnceCell<jetstream::Context>,
    committed: u64,
}

impl NatsSink {
    /// Checks the subject and key against the rows; connects at the first write.
    pub fn new(spec: NatsSinkSpec, schema: &SchemaRef, pipeline: &str) -> Result<Self, String> {
        let column = |c: &str, what: &str| {
            schema.index_of(c).map_err(|_| {
                format!(
                    "sink nats:{}: {what} `{c}` is not a column the SQL produces",
                    spec.subject
                )
            })
        };
        let mut subject = Vec::new();
        for (i, tok) in spec.subject.split('.').enumerate() {
            if i > 0 {
                subject.push(Part::Text(".".into()));
            }
            match tok.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                Some(col) => subject.push(Part::Column(column(col, "subject token")?)),
                None => subject.push(Part::Text(tok.to_string())),
            }
        }
        let key = if spec.key.is_empty() {
            (0..schema.fields().len()).collect()
        } else {
            spec.key
                .iter()
                .map(|c| column(c, "key column"))
                .collect::<Result<_, _>>()?
        };
        Ok(Self {
            spec,
            subject,
            key,
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

    /// Subjects, message ids and payloads of the rows.
    fn messages(
        &self,
        batches: &[RecordBatch],
    ) -> Result<Vec<(String, String, Bytes)>, SinkFailure> {
        let opts = FormatOptions::default();
        let mut out = Vec::new();
        for b in batches {
            let mut json = Vec::new();
            {
                let mut w = arrow::json::LineDelimitedWriter::new(&mut json);
                w.write(b).map_err(|e| self.fail(e))?;
                w.finish().map_err(|e| self.fail(e))?;
            }
            let formatters: Vec<Option<ArrayFormatter<'_>>> = (0..b.num_columns())
                .map(|i| {
                    let used = self.key.contains(&i)
                        || self
                            .subject
                            .iter()
                            .any(|p| matches!(p, Part::Column(c) if *c == i));
                    used.then(|| ArrayFormatter::try_new(b.column(i).as_ref(), &opts).ok())
                        .flatten()
                })
                .collect();
            let value = |c: usize, r: usize| -> String {
                match formatters.get(c) {
                    Some(Some(f)) if b.column(c).is_valid(r) => f.value(r).to_string(),
                    _ => String::new(),
                }
            };
            for (r, line) in json
                .split(|&c| c == b'\n')
                .filter(|l| !l.is_empty())
                .enumerate()
            {
                let mut subject = String::new();
                for p in &self.subject {
                    match p {
                        Part::Text(t) => subject.push_str(t),
                        Part::Column(c) => subject.push_str(&value(*c, r)),
                    }
                }
                let mut id = String::with_capacity(64);
                id.push_str(&self.pipeline);
                for c in &self.key {
                    id.push('\u{1f}');
                    id.push_str(&value(*c, r));
                }
                let id = format!("{}-{:016x}", self.pipeline, fnv1a(id.as_bytes()));
                out.push((subject, id, Bytes::copy_from_slice(line)));
            }
        }
        Ok(out)
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
