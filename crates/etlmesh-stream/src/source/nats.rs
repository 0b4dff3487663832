//! The NATS JetStream source: one durable pull consumer per pipeline, shared by its
//! workers (each pulls its share, so they scale out), explicit acknowledgements sent
//! by the runner only once every sink committed.
//!
//! JetStream bounds what the pipeline holds unacknowledged (`max_ack_pending`, across
//! its workers) and sends a message again when it is not acknowledged within
//! `ack_wait`; the runner says `+WPI` (work in progress) for held messages while a
//! sink is down, so that an outage does not turn into redeliveries, and `-NAK` with a
//! delay for what it hands back on a stop. A message rejected whole is `+TERM`ed once
//! its dead letter is written. Messages wait for the runner in a bounded channel, and
//! their bytes in a budget: past either the pull stops, and JetStream keeps the rest.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, stream};
use bytes::Bytes;
use etlmesh_config::NatsSourceSpec;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;

use super::{Delivery, Outcome, Source};
use crate::{StreamError, StreamMetrics};

/// Bytes of payload held unacknowledged, at most.
const HELD_BYTES: usize = 256 << 20;
/// How long a NAKed message waits before JetStream sends it again.
const NAK_DELAY: Duration = Duration::from_secs(1);

/// A message's position: the subject its acknowledgement goes to.
pub struct Ack {
    reply: async_nats::Subject,
    _budget: OwnedSemaphorePermit,
}

/// A worker's side of the pipeline's consumer.
pub struct Consumer {
    client: async_nats::Client,
    window: usize,
    ack_wait: Duration,
    pull: tokio::task::AbortHandle,
}

impl Consumer {
    async fn send_all<'a>(
        &self,
        replies: impl Iterator<Item = &'a async_nats::Subject>,
        body: Bytes,
    ) -> Result<u64, String> {
        let mut sent = 0;
        for r in replies {
            self.client
                .publish(r.clone(), body.clone())
                .await
                .map_err(|e| e.to_string())?;
            sent += 1;
        }
        Ok(sent)
    }
}

impl Source for Consumer {
    type Ack = Ack;

    fn window(&self) -> usize {
        self.window
    }

    /// A third of `ack_wait`: held messages (an open window) are never sent again.
    fn keep_alive(&self) -> Option<Duration> {
        Some((self.ack_wait / 3).max(Duration::from_millis(200)))
    }

    async fn ack(&self, acks: Vec<(Ack, Outcome)>) -> Result<u64, StreamError> {
        let mut sent = 0;
        for (a, outcome) in &acks {
            let body = match outcome {
                Outcome::Done => Bytes::from_static(b"+ACK"),
                Outcome::DeadLettered => Bytes::from_static(b"+TERM"),
            };
            sent += self
                .send_all(std::iter::once(&a.reply), body)
                .await
                .map_err(|e| StreamError::Source(format!("cannot acknowledge: {e}")))?;
        }
        Ok(sent)
    }

    async fn hold<'a>(&'a self, held: Vec<&'a Ack>) {
        if let Err(e) = self
            .send_all(held.iter().map(|a| &a.reply), Bytes::from_static(b"+WPI"))
            .await
        {
            tracing::debug!(error = %e, "cannot say work in progress");
        }
    }

    fn stop(&self) {
        self.pull.abort();
    }

    async fn release(&self, unacked: Vec<Ack>) {
        let body = Bytes::from(format!("-NAK {{\"delay\":{}}}", NAK_DELAY.as_nanos()));
        if let Err(e) = self.send_all(unacked.iter().map(|a| &a.reply), body).await {
            tracing::debug!(error = %e, "cannot hand messages back: JetStream sends them again after ack_wait");
        }
        let _ = self.client.flush().await;
    }

    /// A pull consumer sends only what is pulled: stopping the pull is leaving.
    async fn leave(&self) {}

    async fn close(&self) {
        if let Err(e) = self.client.flush().await {
            tracing::debug!(error = %e, "cannot flush the last acknowledgements");
        }
    }
}

fn connect_error(spec: &NatsSourceSpec, message: impl std::fmt::Display) -> StreamError {
    StreamError::Nats {
        url: spec.url.clone(),
        message: message.to_string(),
    }
}

/// Connects to the server(s) of `url` (comma-separated), named for logs on the server.
pub async fn connect(url: &str, name: &str) -> Result<async_nats::Client, String> {
    let servers: Vec<&str> = url.split(',').map(str::trim).collect();
    async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .connect(servers)
        .await
        .map_err(|e| e.to_string())
}

/// The stream, created when asked and missing.
async fn stream(
    js: &jetstream::Context,
    spec: &NatsSourceSpec,
) -> Result<jetstream::stream::Stream, StreamError> {
    match js.get_stream(&spec.stream).await {
        Ok(s) => Ok(s),
        Err(e) if not_found(&e) && spec.create => js
            .create_stream(stream::Config {
                name: spec.stream.clone(),
                subjects: vec![spec.filter.clone()],
                ..Default::default()
            })
            .await
            .map_err(|e| {
                connect_error(
                    spec,
                    format!("cannot create JetStream stream `{}`: {e}", spec.stream),
                )
            }),
        Err(e) if not_found(&e) => Err(connect_error(
            spec,
            format!(
                "JetStream stream `{}` does not exist; create it (`nats stream add {} --subjects '{}'`) or set `create: true` on the source",
                spec.stream, spec.stream, spec.filter
            ),
        )),
        Err(e) => Err(connect_error(
            spec,
            format!(
                "cannot read JetStream stream `{}`: {e}; check that the server runs with JetStream (-js)",
                spec.stream
            ),
        )),
    }
}

fn not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// The pipeline's durable consumer, created when asked and missing.
async fn consumer(
    s: &jetstream::stream::Stream,
    spec: &NatsSourceSpec,
) -> Result<jetstream::consumer::Consumer<pull::Config>, StreamError> {
    let wanted = pull::Config {
        durable_name: Some(spec.consumer.clone()),
        filter_subject: spec.filter.clone(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        max_ack_pending: i64::try_from(spec.max_ack_pending).unwrap_or(i64::MAX),
        deliver_policy: jetstream::consumer::DeliverPolicy::All,
        ..Default::default()
    };
    let found = match s.consumer_info(&spec.consumer).await {
        Ok(_) => s
            .get_consumer::<pull::Config>(&spec.consumer)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(if is_missing(&e) {
            String::new()
        } else {
            e.to_string()
        }),
    };
    match found {
        Ok(c) => {
            let have = &c.cached_info().config;
            if have.ack_policy != jetstream::consumer::AckPolicy::Explicit {
                return Err(connect_error(
                    spec,
                    format!(
                        "JetStream consumer `{}` does not acknowledge each message (ack policy {:?}); etlmesh needs `explicit`: remove it (`nats consumer rm {} {}`) and let `create: true` make it",
                        spec.consumer, have.ack_policy, spec.stream, spec.consumer
                    ),
                ));
            }
            if have.filter_subject != spec.filter {
                tracing::warn!(consumer = %spec.consumer, has = %have.filter_subject, wants = %spec.filter, "the JetStream consumer filters another subject than the source's: it is used as it is");
            }
            Ok(c)
        }
        Err(e) if e.is_empty() && spec.create => {
            // Two workers may create it at once: the same config is not an error.
            s.create_consumer(wanted).await.map_err(|e| {
                connect_error(
                    spec,
                    format!("cannot create JetStream consumer `{}`: {e}", spec.consumer),
                )
            })
        }
        Err(e) => Err(connect_error(
            spec,
            format!(
                "JetStream consumer `{}` on stream `{}`: {}; create it (`nats consumer add {} {} --pull --ack explicit --filter '{}'`) or set `create: true` on the source",
                spec.consumer,
                spec.stream,
                if e.is_empty() { "does not exist" } else { &e },
                spec.stream,
                spec.consumer,
                spec.filter
            ),
        )),
    }
}

fn is_missing(e: &jetstream::context::ConsumerInfoError) -> bool {
    use jetstream::context::ConsumerInfoErrorKind as K;
    match e.kind() {
        K::NotFound => true,
        K::JetStream(j) => j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND,
        _ => false,
    }
}

/// Connects, finds (or creates) the stream and the consumer, and starts pulling.
/// Messages arrive on the returned channel; the consumer's backlog goes to `metrics`.
pub async fn open(
    spec: &NatsSourceSpec,
    pipeline: &str,
    worker: &str,
    batch: usize,
    metrics: StreamMetrics,
) -> Result<(Consumer, mpsc::Receiver<Delivery<Ack>>, JoinHandle<()>), StreamError> {
    let client = connect(&spec.url, &format!("etlmesh-{pipeline}-{worker}"))
        .await
        .map_err(|e| connect_error(spec, e))?;
    let js = jetstream::new(client.clone());
    let s = stream(&js, spec).await?;
    let mut c = consumer(&s, spec).await?;
    let ack_wait = c.cached_info().config.ack_wait;
    let window = c.cached_info().config.max_ack_pending;
    let window = usize::try_from(window)
        .ok()
        .filter(|w| *w > 0)
        .unwrap_or(spec.max_ack_pending);
    tracing::info!(url = %spec.url, stream = %spec.stream, consumer = %spec.consumer, filter = %spec.filter, max_ack_pending = window, pending = c.cached_info().num_pending, "JetStream consumer ready");
    // The channel holds one pull ahead of the runner.
    let (tx, rx) = mpsc::channel(batch.max(1) * 2);
    let budget = Arc::new(Semaphore::new(HELD_BYTES >> 10));
    let pipeline = pipeline.to_string();
    let with_meta = !spec.metadata.is_empty();
    let task = tokio::spawn(async move {
        let mut seq = 0u64;
        let mut backoff = Duration::from_millis(100);
        let mut last_info = tokio::time::Instant::now();
        loop {
            let pulled = c
                .stream()
                .max_messages_per_batch(batch.clamp(1, 10_000))
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await;
            let mut messages = match pulled {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(pipeline = %pipeline, error = %e, retry_in_ms = backoff.as_millis() as u64, "cannot pull from the JetStream consumer; trying again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            loop {
                if last_info.elapsed() >= Duration::from_secs(2) {
                    last_info = tokio::time::Instant::now();
                    if let Ok(i) = c.info().await {
                        metrics.source_backlog(&pipeline, i.num_pending, i.num_ack_pending);
                    }
                }
                let next = tokio::time::timeout(Duration::from_secs(2), messages.next()).await;
                let m = match next {
                    Err(_) => continue,
                    Ok(None) => break,
                    Ok(Some(Err(e))) => {
                        tracing::warn!(pipeline = %pipeline, error = %e, "JetStream pull: {e}; going on (what was not acknowledged comes again)");
                        if tx.is_closed() {
                            return;
                        }
                        continue;
                    }
                    Ok(Some(Ok(m))) => m,
                };
                backoff = Duration::from_millis(100);
                let redelivered = m.info().is_ok_and(|i| i.delivered > 1);
                // The acknowledgement goes to the message's reply subject.
                let msg = m.message;
                let Some(reply) = msg.reply else { continue };
                let kib = (msg.payload.len() >> 10).clamp(1, HELD_BYTES >> 10) as u32;
                let Ok(permit) = budget.clone().acquire_many_owned(kib).await else {
                    return;
                };
                seq += 1;
                if redelivered {
                    metrics.messages(&pipeline, "redelivered", 1);
                }
                let d = Delivery {
                    seq,
                    redelivered,
                    topic: Arc::from(msg.subject.as_str()),
                    meta: if with_meta {
                        super::Meta {
                            topic: Some(Arc::from(msg.subject.as_str())),
                            headers: msg
                                .headers
                                .iter()
                                .flat_map(|h| h.iter())
                                .flat_map(|(k, vs)| {
                                    let k: Arc<str> = Arc::from(k.as_ref());
                                    vs.iter().map(move |v| {
                                        (
                                            k.clone(),
                                            Some(Bytes::copy_from_slice(v.as_str().as_bytes())),
                                        )
                                    })
                                })
                                .collect(),
                            ..Default::default()
                        }
                    } else {
                        super::Meta::default()
                    },
                    payload: msg.payload,
                    ack: Ack {
                        reply,
                        _budget: permit,
                    },
                };
                if tx.send(d).await.is_err() {
                    return;
                }
            }
            if tx.is_closed() {
                return;
            }
            tracing::info!(pipeline = %pipeline, "the JetStream pull ended; pulling again");
        }
    });
    Ok((
        Consumer {
            client,
            window,
            ack_wait: if ack_wait.is_zero() {
                spec.ack_wait
            } else {
                ack_wait
            },
            pull: task.abort_handle(),
        },
        rx,
        task,
    ))
}
