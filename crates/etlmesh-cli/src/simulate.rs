//! `etlmesh simulate`: virtual IoT devices publishing readings to an MQTT broker.

use std::time::Duration;

use etlmesh_mqtt::simulate::{Payload, SimulateOptions, simulate as run_simulation};

use crate::mesh::duration;
use crate::{CliError, runtime};

/// Arguments of `simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// The broker: mqtt://[user[:password]@]host[:port].
    #[arg(
        long,
        default_value = "mqtt://127.0.0.1:1883",
        env = "ETLMESH_MQTT_BROKER"
    )]
    pub broker: String,
    /// Publish to NATS JetStream at this URL (`nats://host:4222`) instead of MQTT; the
    /// topic is then a subject (`sensors.{device_id}.reading`) that a stream takes.
    #[arg(long)]
    pub nats: Option<String>,
    /// The topic (or subject); `{device_id}` becomes the device's id.
    #[arg(long, default_value = "sensors/{device_id}/reading")]
    pub topic: String,
    /// Virtual devices.
    #[arg(long, default_value_t = 100)]
    pub devices: u32,
    /// Messages per second, all devices together.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this long (`30s`, `5m`); without it or --count, until Ctrl-C.
    #[arg(long, value_parser = duration)]
    pub duration: Option<Duration>,
    /// QoS: 0 (at most once) or 1 (at least once).
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// Event times move by up to this much either way.
    #[arg(long, default_value = "50ms", value_parser = duration)]
    pub jitter: Duration,
    /// Fraction of readings out of order (moved back by up to --disorder).
    #[arg(long, default_value_t = 0.01)]
    pub out_of_order: f64,
    /// How far back an out-of-order reading goes, at most.
    #[arg(long, default_value = "2s", value_parser = duration)]
    pub disorder: Duration,
    /// Fraction of late readings (moved back by --late-by).
    #[arg(long, default_value_t = 0.001)]
    pub late: f64,
    /// How far back a late reading goes.
    #[arg(long, default_value = "10m", value_parser = duration)]
    pub late_by: Duration,
    /// Fraction of malformed payloads.
    #[arg(long, default_value_t = 0.001)]
    pub malformed: f64,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The MQTT client id (default: etlmesh-simulate-<pid>).
    #[arg(long)]
    pub client_id: Option<String>,
    /// Payload: one JSON object, a JSON array of readings, or CSV lines (no header:
    /// device_id,ts,temperature_c,humidity,battery_v,status,seq).
    #[arg(long, value_enum, default_value_t = PayloadArg::Json)]
    pub payload: PayloadArg,
    /// Readings of one device per message (json-array and csv).
    #[arg(long, default_value_t = 1)]
    pub readings_per_message: u32,
}

/// Arguments of `subscribe`.
#[derive(Debug, clap::Args)]
pub struct SubscribeArgs {
    /// The broker: mqtt://[user[:password]@]host[:port].
    #[arg(
        long,
        default_value = "mqtt://127.0.0.1:1883",
        env = "ETLMESH_MQTT_BROKER"
    )]
    pub broker: String,
    /// Count what a JetStream stream (`--stream`) holds for the subject filter
    /// `--topic` at this URL, with a durable pull consumer and explicit acks, instead
    /// of an MQTT subscription.
    #[arg(long, requires = "stream")]
    pub nats: Option<String>,
    /// The JetStream stream (with `--nats`).
    #[arg(long)]
    pub stream: Option<String>,
    /// Count what the Kafka topic `--topic` holds, read by a consumer group at these
    /// bootstrap brokers (committing what it read), instead of an MQTT subscription.
    #[arg(long, conflicts_with = "nats")]
    pub kafka: Option<String>,
    /// The consumer group (with `--kafka`; default: etlmesh-subscribe-<pid>).
    #[arg(long, requires = "kafka")]
    pub group: Option<String>,
    /// The topic filter (`+` and `#` work), the subject filter with `--nats`, the
    /// topic with `--kafka`.
    #[arg(long, default_value = "sensors/+/reading")]
    pub topic: String,
    /// QoS: 0 or 1.
    #[arg(long, default_value_t = 1)]
    pub qos: u8,
    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop when no message came for this long.
    #[arg(long, default_value = "10s", value_parser = duration)]
    pub idle: Duration,
}

/// `etlmesh subscribe`: counts what a topic receives (a bare subscriber).
pub(crate) fn subscribe(args: &SubscribeArgs) -> Result<(), CliError> {
    let rt = runtime(1)?;
    let got = if let (Some(url), Some(stream)) = (&args.nats, &args.stream) {
        Some(rt.block_on(crate::simulate_nats::count(
            url,
            stream,
            &args.topic,
            args.count,
            args.idle,
            || eprintln!("subscribed to {} on {stream}", args.topic),
        ))?)
    } else if let Some(brokers) = &args.kafka {
        let group = args
            .group
            .clone()
            .unwrap_or_else(|| format!("etlmesh-subscribe-{}", std::process::id()));
        Some(rt.block_on(crate::subscribe_kafka::count(
            brokers,
            &args.topic,
            &group,
            args.count,
            args.idle,
            || eprintln!("subscribed to {} as group {group}", args.topic),
        ))?)
    } else {
        None
    };
    if let Some(got) = got {
        eprintln!(
            "received {} messages ({} bytes) in {:.3} s: {:.0} msg/s",
            got.messages,
            got.bytes,
            got.elapsed.as_secs_f64(),
            got.messages as f64 / got.elapsed.as_secs_f64().max(1e-9)
        );
        return Ok(());
    }
    let broker = etlmesh_mqtt::Broker::parse(&args.broker)?;
    let stats = rt.block_on(etlmesh_mqtt::count::count(
        &broker,
        &args.topic,
        args.qos,
        args.count,
        args.idle,
        || eprintln!("subscribed to {}", args.topic),
    ))?;
    eprintln!(
        "received {} messages ({} bytes) in {:.3} s: {:.0} msg/s",
        stats.messages,
        stats.bytes,
        stats.elapsed.as_secs_f64(),
        stats.messages as f64 / stats.elapsed.as_secs_f64().max(1e-9)
    );
    Ok(())
}

/// Payload shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PayloadArg {
    /// One JSON object.
    Json,
    /// A JSON array of readings.
    JsonArray,
    /// CSV lines without a header.
    Csv,
}

pub(crate) fn simulate(args: &SimulateArgs) -> Result<(), CliError> {
    let broker = etlmesh_mqtt::Broker::parse(&args.broker)?;
    let mut o = SimulateOptions::new(broker);
    o.topic = args.topic.clone();
    o.devices = args.devices;
    o.rate = args.rate;
    o.count = args.count;
    o.duration = args.duration;
    o.qos = args.qos;
    o.jitter = args.jitter;
    o.out_of_order = args.out_of_order;
    o.disorder = args.disorder;
    o.late = args.late;
    o.late_by = args.late_by;
    o.malformed = args.malformed;
    o.seed = args.seed;
    if let Some(id) = &args.client_id {
        o.client_id = id.clone();
    }
    o.payload = match args.payload {
        PayloadArg::Json => Payload::Json,
        PayloadArg::JsonArray => Payload::JsonArray,
        PayloadArg::Csv => Payload::Csv,
    };
    o.readings_per_message = args.readings_per_message;
    let rt = runtime(1)?;
    let stats = match &args.nats {
        Some(url) => rt.block_on(crate::simulate_nats::simulate(
            &o,
            url,
            crate::mesh::shutdown_signal(),
        ))?,
        None => rt.block_on(run_simulation(&o, crate::mesh::shutdown_signal()))?,
    };
    eprintln!(
        "published {} messages ({} malformed; {} readings, {} late, {} out of order) in {:.2} s: {:.0} msg/s; {} acknowledged",
        stats.published,
        stats.malformed,
        stats.readings,
        stats.late,
        stats.out_of_order,
        stats.elapsed.as_secs_f64(),
        stats.rate(),
        stats.acknowledged
    );
    Ok(())
}
