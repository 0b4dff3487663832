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
    let fail = |m: String| CliError::Other(format!("NATS {url}: {m}"));
    let servers: Vec<&str> = url.split(',').map(str::trim).collect();
    let client = async_nats::ConnectOptions::new()
        .name(&opts.client_id)
        .connection_timeout(Duration::from_secs(5))
        .connect(servers)
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
