//! The MQTT sink: each row published as one JSON object, to a topic that may take
//! levels from the row (`results/{device_id}`). With QoS 1 a write commits only once
//! the broker acknowledged every message of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use etlmesh_config::MqttSinkSpec;
use etlmesh_mqtt::Broker;
use futures::future::BoxFuture;
use rumqttc::{AsyncClient, Event, Packet, QoS};

use super::{RefusedRow, SinkFailure, StreamSink};

/// How long a write waits for the broker's acknowledgements.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

enum Part {
    Text(String),
    Column(usize),
}

/// Rows published to a topic.
pub struct MqttSink {
    spec: MqttSinkSpec,
    topic: Vec<Part>,
    client: AsyncClient,
    acked: Arc<AtomicU64>,
    connected: Arc<AtomicBool>,
    published: u64,
    committed: u64,
}

impl MqttSink {
    /// Connects in the background (the first write waits for the connection).
    pub fn new(spec: MqttSinkSpec, schema: &SchemaRef, instance: &str) -> Result<Self, String> {
        let mut topic = Vec::new();
        for (i, level) in spec.topic.split('/').enumerate() {
            if i > 0 {
                topic.push(Part::Text("/".into()));
            }
            match level.strip_prefix('{').and_then(|l| l.strip_suffix('}')) {
                Some(col) => topic.push(Part::Column(schema.index_of(col).map_err(|_| {
                    format!(
                        "sink mqtt:{}: `{{{col}}}` is not a column the SQL produces",
                        spec.topic
                    )
                })?)),
                None => topic.push(Part::Text(level.to_string())),
            }
        }
        let broker = Broker::parse(&spec.broker).map_err(|e| e.to_string())?;
        let mut opts = broker.options(&format!("etlmesh-sink-{instance}-{}", std::process::id()));
        opts.set_inflight(1000);
        let (client, mut ev) = AsyncClient::new(opts, 4096);
        let acked = Arc::new(AtomicU64::new(0));
        let connected = Arc::new(AtomicBool::new(false));
        let (a, c, addr) = (acked.clone(), connected.clone(), broker.address());
        tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        a.fetch_add(1, Ordering::AcqRel);
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => c.store(true, Ordering::Release),
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
                    Ok(_) => {}
                    Err(e) => {
                        c.store(false, Ordering::Release);
                        tracing::warn!(broker = %addr, error = %e, "MQTT sink: connection lost; reconnecting");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(Self {
            spec,
            topic,
            client,
            acked,
            connected,
            published: 0,
            committed: 0,
        })
    }

    async fn publish(&mut self, batches: &[RecordBatch]) -> Result<(), SinkFailure> {
        let fail = |m: String| SinkFailure::Retry(format!("mqtt:{}: {m}", self.spec.topic));
        let qos = if self.spec.qos == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let opts = FormatOptions::default();
        // Acknowledgements count from here: a retried write publishes again.
        let base = self.acked.load(Ordering::Acquire);
        let mut messages: Vec<(String, Vec<u8>)> = Vec::new();
        for b in batches {
            let mut json = Vec::new();
            {
                let mut w = arrow::json::LineDelimitedWriter::new(&mut json);
                w.write(b).map_err(|e| fail(e.to_string()))?;
                w.finish().map_err(|e| fail(e.to_string()))?;
            }
            let formatters: Vec<Option<ArrayFormatter<'_>>> = (0..b.num_columns())
                .map(|i| {
                    self.topic
                        .iter()
                        .any(|p| matches!(p, Part::Column(c) if *c == i))
                        .then(|| ArrayFormatter::try_new(b.column(i).as_ref(), &opts).ok())
                        .flatten()
                })
                .collect();
            for (r, line) in json
                .split(|&c| c == b'\n')
                .filter(|l| !l.is_empty())
                .enumerate()
            {
                let mut topic = String::new();
                for p in &self.topic {
                    match p {
                        Part::Text(t) => topic.push_str(t),
                        Part::Column(c) => {
                            if let Some(Some(f)) = formatters.get(*c) {
                                topic.push_str(&f.value(r).to_string());
                            }
                        }
                    }
                }
                messages.push((topic, line.to_vec()));
            }
        }
        let mut sent = 0u64;
        for (topic, payload) in messages {
            self.client
                .publish(topic, qos, false, payload)
                .await
                .map_err(|e| fail(e.to_string()))?;
            sent += 1;
        }
        self.published += sent;
        if qos == QoS::AtLeastOnce && sent > 0 {
            let start = Instant::now();
            while self.acked.load(Ordering::Acquire) < base + sent {
                if start.elapsed() > ACK_TIMEOUT {
                    let state = if self.connected.load(Ordering::Acquire) {
                        "connected"
                    } else {
                        "disconnected"
                    };
                    return Err(fail(format!(
                        "the broker acknowledged {} of {sent} messages within {} s ({state})",
                        self.acked.load(Ordering::Acquire) - base,
                        ACK_TIMEOUT.as_secs()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        Ok(())
    }
}

impl StreamSink for MqttSink {
    fn describe(&self) -> String {
        format!("mqtt:{}", self.spec.topic)
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
