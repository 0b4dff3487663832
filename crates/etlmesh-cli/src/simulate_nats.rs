//! `etlmesh simulate --nats URL`: the same virtual devices, publishing to NATS
//! JetStream. Each message waits for its PubAck (at most 512 at once) and carries a
//! `Nats-Msg-Id`, so a publish retried is stored once.

use std::future::Future;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use etlmesh_mqtt::simulate::{Devices, SimulateOptions, SimulateStats};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use crate::CliError;

/// PubAcks awaited at once, at most.
const IN_FLIGHT: usize = 512;

/// Publishes until the count or the duration is reached, or `stop` completes.
pub(crate) async fn simulate(
    opts: &SimulateOptions,
    url: &str,
    stop: impl Future<Output = ()>,
) -> Result<SimulateStats, CliError> {
    opts.check()?;
    let fail = CliError::client("NATS", url);
    let client = etlmesh_stream::source::nats::connect(url, &opts.client_id)
        .await
        .map_err(|e| {
            fail(format!(
                "{e}; check --nats and that nats-server runs with -js"
            ))
        })?;
    let js = jetstream::new(client);
    tracing::info!(url, subject = %opts.topic, rate = opts.rate, devices = opts.devices, "simulating devices on JetStream");
    let mut devices = Devices::new(opts);
    let mut stats = SimulateStats::default();
    let mut pending = FuturesUnordered::new();
    let start = Instant::now();
    let interval = 1.0 / opts.rate;
    tokio::pin!(stop);
    let run = format!("{:x}", std::process::id());
    loop {
        if opts.count.is_some_and(|c| stats.published >= c)
            || opts.duration.is_some_and(|d| start.elapsed() >= d)
        {
            break;
        }
        let due = start + Duration::from_secs_f64(stats.published as f64 * interval);
        if due > Instant::now() + Duration::from_millis(1) {
            tokio::select! {
                () = tokio::time::sleep_until(due.into()) => {}
                () = &mut stop => break,
            }
        }
        while pending.len() >= IN_FLIGHT {
            acknowledged(pending.next().await, &mut stats, &fail)?;
        }
        let (subject, payload) = devices.message(&mut stats);
        let m = jetstream::message::PublishMessage::build()
            .payload(payload.into())
            .message_id(format!("sim-{run}-{}", stats.published));
        let ack = js.send_publish(subject, m).await.map_err(|e| {
            fail(format!(
                "cannot publish: {e}; is there a stream for the subject?"
            ))
        })?;
        pending.push(ack.into_future());
        stats.published += 1;
    }
    let wait = Instant::now();
    while !pending.is_empty() && wait.elapsed() < Duration::from_secs(60) {
        acknowledged(pending.next().await, &mut stats, &fail)?;
    }
    stats.elapsed = start.elapsed();
    Ok(stats)
}

fn acknowledged<E: std::fmt::Display>(
    ack: Option<Result<jetstream::publish::PublishAck, E>>,
    stats: &mut SimulateStats,
    fail: &impl Fn(String) -> CliError,
) -> Result<(), CliError> {
    match ack {
        Some(Ok(_)) => {
            stats.acknowledged += 1;
            Ok(())
        }
        Some(Err(e)) => Err(fail(format!("not stored: {e}"))),
        None => Ok(()),
    }
}

/// What a bare consumer received.
pub(crate) struct Counted {
    pub messages: u64,
    pub bytes: u64,
    pub elapsed: Duration,
}

/// `etlmesh subscribe --nats URL --stream S`: a bare JetStream consumer — a durable pull
/// consumer with explicit acks, as a stream's source uses, that only counts and
/// acknowledges each message — the ceiling a pipeline is measured against. Stops after
/// `count` messages or when none came for `idle`.
pub(crate) async fn count(
    url: &str,
    stream: &str,
    filter: &str,
    count: Option<u64>,
    idle: Duration,
    subscribed: impl FnOnce(),
) -> Result<Counted, CliError> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    let fail = CliError::client("NATS", url);
    let client = etlmesh_stream::source::nats::connect(url, "etlmesh-subscribe")
        .await
        .map_err(&fail)?;
    let js = jetstream::new(client.clone());
    let s = js
        .get_stream(stream)
        .await
        .map_err(|e| fail(format!("stream `{stream}`: {e}")))?;
    let name = format!("etlmesh-subscribe-{}", std::process::id());
    let consumer = s
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: filter.to_string(),
            ack_policy: AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await
        .map_err(|e| fail(format!("cannot create a consumer: {e}")))?;
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .map_err(|e| fail(e.to_string()))?;
    subscribed();
    let mut got = Counted {
        messages: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
    };
    let mut start: Option<Instant> = None;
    let mut last = Instant::now();
    let ack = bytes::Bytes::from_static(b"+ACK");
    while count.is_none_or(|c| got.messages < c) {
        match tokio::time::timeout(idle, messages.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(Err(e))) => tracing::warn!(error = %e, "pull: {e}"),
            Ok(Some(Ok(m))) => {
                start.get_or_insert_with(Instant::now);
                got.messages += 1;
                got.bytes += m.message.payload.len() as u64;
                if let Some(reply) = m.message.reply {
                    client
                        .publish(reply, ack.clone())
                        .await
                        .map_err(|e| fail(format!("cannot acknowledge: {e}")))?;
                }
                last = Instant::now();
            }
        }
    }
    let _ = client.flush().await;
    got.elapsed = start.map_or(Duration::ZERO, |s| last.duration_since(s));
    let _ = s.delete_consumer(&name).await;
    Ok(got)
}
