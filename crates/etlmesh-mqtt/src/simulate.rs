//! `etlmesh simulate`: virtual devices that publish readings to an MQTT broker.
//!
//! Each message is one JSON object — `device_id`, `ts` (epoch milliseconds, event
//! time), `temperature_c`, `humidity`, `battery_v`, `status`, `seq` (the device's
//! reading number: with `device_id`, a key) — on a topic that may name
//! the device (`sensors/{device_id}/reading`). Messages are paced to a total rate;
//! event times carry jitter, a fraction is out of order (moved back by up to
//! `disorder`) or late (moved back by `late_by`), and a fraction is malformed in the
//! ways real feeds go wrong (truncated, text in a number, broken JSON, invalid UTF-8).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use etlmesh_datagen::{Device, GenFormat, Reading, corrupt};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, Packet, QoS};

use crate::{Broker, MqttError};

/// The shape of a message's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// One JSON object (with one reading per message).
    Json,
    /// A JSON array of readings.
    JsonArray,
    /// CSV lines without a header: `device_id,ts,temperature_c,humidity,battery_v,status,seq`.
    Csv,
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    /// The broker.
    pub broker: Broker,
    /// The topic; `{device_id}` is replaced by the device's id.
    pub topic: String,
    /// Virtual devices.
    pub devices: u32,
    /// Messages per second, all devices together.
    pub rate: f64,
    /// Stop after this many messages.
    pub count: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// 0 (at most once) or 1 (at least once: waits for every acknowledgement).
    pub qos: u8,
    /// Event times move by up to this much either way.
    pub jitter: Duration,
    /// Fraction of readings out of order.
    pub out_of_order: f64,
    /// How far back an out-of-order reading goes, at most.
    pub disorder: Duration,
    /// Fraction of readings that are late.
    pub late: f64,
    /// How far back a late reading goes.
    pub late_by: Duration,
    /// Fraction of payloads that are malformed.
    pub malformed: f64,
    /// Random seed.
    pub seed: u64,
    /// The MQTT client id.
    pub client_id: String,
    /// The payload's shape.
    pub payload: Payload,
    /// Readings of one device per message (JSON arrays and CSV; 1 for JSON objects).
    pub readings_per_message: u32,
}

impl SimulateOptions {
    /// Defaults: 100 devices, 1,000 messages per second, QoS 1, 0.1 % malformed.
    pub fn new(broker: Broker) -> Self {
        Self {
            broker,
            topic: "sensors/{device_id}/reading".into(),
            devices: 100,
            rate: 1000.0,
            count: None,
            duration: None,
            qos: 1,
            jitter: Duration::from_millis(50),
            out_of_order: 0.01,
            disorder: Duration::from_secs(2),
            late: 0.001,
            late_by: Duration::from_secs(600),
            malformed: 0.001,
            seed: 42,
            client_id: format!("etlmesh-simulate-{}", std::process::id()),
            payload: Payload::Json,
            readings_per_message: 1,
        }
    }

    /// Checks the options: fractions, rate, QoS, payload shape.
    pub fn check(&self) -> Result<(), MqttError> {
        let fraction = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(MqttError::Options(format!(
                    "--{name} {v} is not a fraction between 0 and 1"
                )))
            }
        };
        fraction("out-of-order", self.out_of_order)?;
        fraction("late", self.late)?;
        fraction("malformed", self.malformed)?;
        if self.rate.is_nan() || self.rate <= 0.0 {
            return Err(MqttError::Options(format!(
                "--rate {} must be above 0 messages per second",
                self.rate
            )));
        }
        if self.qos > 1 {
            return Err(MqttError::Options(format!(
                "--qos {} is not supported; use 0 or 1",
                self.qos
            )));
        }
        if self.payload == Payload::Json && self.readings_per_message > 1 {
            return Err(MqttError::Options(
                "a JSON object carries one reading: use --payload json-array or csv for --readings-per-message above 1".into(),
            ));
        }
        if self.devices == 0 {
            return Err(MqttError::Options("--devices must be at least 1".into()));
        }
        Ok(())
    }
}

/// What was published.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SimulateStats {
    /// Messages published.
    pub published: u64,
    /// Readings in them.
    pub readings: u64,
    /// Acknowledged by the broker (QoS 1).
    pub acknowledged: u64,
    /// Malformed messages among them.
    pub malformed: u64,
    /// Late readings.
    pub late: u64,
    /// Out-of-order readings.
    pub out_of_order: u64,
    /// From the first message to the last acknowledgement.
    pub elapsed: Duration,
}

impl SimulateStats {
    /// Messages per second.
    pub fn rate(&self) -> f64 {
        self.published as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Publishes until the count or the duration is reached, or `stop` completes.
pub async fn simulate(
    opts: &SimulateOptions,
    stop: impl Future<Output = ()>,
) -> Result<SimulateStats, MqttError> {
    opts.check()?;
    let broker = opts.broker.address();
    let conn_err = |message: String| MqttError::Connection {
        broker: broker.clone(),
        message,
    };
    let mut mqtt = opts.broker.options(&opts.client_id);
    mqtt.set_inflight(500);
    let (client, mut eventloop) = AsyncClient::new(mqtt, 1024);

    // Connect first, so that a wrong address fails at once with a clear error.
    loop {
        match tokio::time::timeout(Duration::from_secs(10), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => break,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(conn_err(e.to_string())),
            Err(_) => return Err(conn_err("no answer within 10 s".into())),
        }
    }
    tracing::info!(broker = %broker, topic = %opts.topic, rate = opts.rate, devices = opts.devices, "simulating devices");

    let acked = Arc::new(AtomicU64::new(0));
    let driver = {
        let acked = acked.clone();
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
        })
    };

    let qos = if opts.qos == 1 {
        QoS::AtLeastOnce
    } else {
        QoS::AtMostOnce
    };
    let mut devices = Devices::new(opts);
    let mut stats = SimulateStats::default();
    let start = Instant::now();
    let interval = 1.0 / opts.rate;
    tokio::pin!(stop);
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
        let (topic, payload) = devices.message(&mut stats);
        client
            .publish(topic, qos, false, payload)
            .await
            .map_err(|e| conn_err(e.to_string()))?;
        stats.published += 1;
        if driver.is_finished() {
            break;
        }
    }

    // At least once: every message acknowledged before we leave.
    if qos == QoS::AtLeastOnce {
        let wait = Instant::now();
        while acked.load(Ordering::Relaxed) < stats.published && !driver.is_finished() {
            if wait.elapsed() > Duration::from_secs(60) {
                tracing::warn!(
                    acknowledged = acked.load(Ordering::Relaxed),
                    published = stats.published,
                    "not every message was acknowledged within 60 s"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    stats.elapsed = start.elapsed();
    stats.acknowledged = acked.load(Ordering::Relaxed);
    let _ = client.disconnect().await;
    if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(5), driver).await {
        return Err(conn_err(e));
    }
    Ok(stats)
}

/// The virtual devices: each call makes the next message (its topic and payload) and
/// counts it in `stats` (readings, late, out of order, malformed — not `published`).
pub struct Devices<'a> {
    opts: &'a SimulateOptions,
    rng: SmallRng,
    devices: Vec<Device>,
    /// Per device, the number of each reading: with the device id, a reading's key.
    seqs: Vec<u64>,
    next: u64,
}

impl<'a> Devices<'a> {
    /// The devices of `opts`, seeded.
    pub fn new(opts: &'a SimulateOptions) -> Self {
        let mut rng = SmallRng::seed_from_u64(opts.seed);
        let devices: Vec<Device> = (0..opts.devices).map(|_| Device::new(&mut rng)).collect();
        let seqs = vec![0u64; devices.len()];
        Self {
            opts,
            rng,
            devices,
            seqs,
            next: 0,
        }
    }

    /// The next message: devices take turns.
    pub fn message(&mut self, stats: &mut SimulateStats) -> (String, Vec<u8>) {
        let opts = self.opts;
        let dev = (self.next % u64::from(opts.devices.max(1))) as usize;
        self.next += 1;
        let id = format!("dev-{dev:05}");
        let mut payload = Vec::with_capacity(192);
        if opts.payload == Payload::JsonArray {
            payload.push(b'[');
        }
        for i in 0..opts.readings_per_message.max(1) {
            let reading = self.devices[dev].next(&mut self.rng);
            let ts = event_time(opts, &mut self.rng, stats);
            match (opts.payload, i) {
                (Payload::Csv, 0) => {}
                (Payload::Csv, _) => payload.push(b'\n'),
                (_, 0) => {}
                (_, _) => payload.push(b','),
            }
            self.seqs[dev] += 1;
            write_reading(
                &mut payload,
                opts.payload,
                &id,
                self.seqs[dev],
                ts,
                &reading,
            );
            stats.readings += 1;
        }
        if opts.payload == Payload::JsonArray {
            payload.push(b']');
        }
        if opts.malformed > 0.0 && self.rng.random_bool(opts.malformed) {
            let format = match opts.payload {
                Payload::Csv => GenFormat::Csv,
                _ => GenFormat::Ndjson,
            };
            corrupt(&mut payload, format, &mut self.rng);
            stats.malformed += 1;
        }
        (opts.topic.replace("{device_id}", &id), payload)
    }
}

/// Now, with jitter, and moved back for out-of-order and late readings.
fn event_time(opts: &SimulateOptions, rng: &mut SmallRng, stats: &mut SimulateStats) -> i64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let jitter = opts.jitter.as_millis() as i64;
    let mut ts = now + rng.random_range(-jitter..=jitter);
    let roll: f64 = rng.random();
    if roll < opts.late {
        ts -= opts.late_by.as_millis() as i64;
        stats.late += 1;
    } else if roll < opts.late + opts.out_of_order {
        let back = opts.disorder.as_millis().max(1) as i64;
        ts -= rng.random_range(1..=back);
        stats.out_of_order += 1;
    }
    ts
}

fn write_reading(out: &mut Vec<u8>, payload: Payload, id: &str, seq: u64, ts: i64, r: &Reading) {
    use std::io::Write as _;
    // Writing into a Vec cannot fail.
    let _ = match payload {
        Payload::Csv => write!(
            out,
            "{id},{ts},{:.2},{:.1},{:.3},{},{seq}",
            r.temperature_c, r.humidity, r.battery_v, r.status
        ),
        Payload::Json | Payload::JsonArray => write!(
            out,
            r#"{{"device_id":"{id}","ts":{ts},"temperature_c":{:.2},"humidity":{:.1},"battery_v":{:.3},"status":"{}","seq":{seq}}}"#,
            r.temperature_c, r.humidity, r.battery_v, r.status
        ),
    };
}
