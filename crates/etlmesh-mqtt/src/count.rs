//! A bare subscriber: receives and counts, nothing else. `etlmesh subscribe` uses it to
//! watch a topic, and the streaming benchmark to measure what the broker can deliver
//! (the ceiling for a pipeline).

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event};

use crate::{Broker, MqttError};

/// What was received.
#[derive(Debug, Clone, Copy, Default)]
pub struct CountStats {
    /// Messages.
    pub messages: u64,
    /// Payload bytes.
    pub bytes: u64,
    /// From subscribing to the last message.
    pub elapsed: Duration,
}

/// Subscribes to `filter` (MQTT 5, the given QoS; the client acknowledges at once) and
/// counts until `count` messages came, or none came for `idle`. Calls `on_ready` once
/// subscribed.
pub async fn count(
    broker: &Broker,
    filter: &str,
    qos: u8,
    count: Option<u64>,
    idle: Duration,
    on_ready: impl FnOnce(),
) -> Result<CountStats, MqttError> {
    let address = broker.address();
    let err = |message: String| MqttError::Connection {
        broker: address.clone(),
        message,
    };
    let mut o = broker.options_v5(&format!("etlmesh-count-{}", std::process::id()));
    o.set_receive_maximum(Some(u16::MAX));
    let (client, mut ev) = AsyncClient::new(o, 1024);
    let q = if qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    client
        .subscribe(filter, q)
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut stats = CountStats::default();
    let mut ready = Some(on_ready);
    let start = Instant::now();
    loop {
        match tokio::time::timeout(idle, ev.poll()).await {
            Err(_) if stats.messages > 0 || ready.is_none() => break,
            Err(_) => return Err(err(format!("no answer within {idle:?}"))),
            Ok(Err(e)) => return Err(err(e.to_string())),
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                if let Some(f) = ready.take() {
                    f();
                }
            }
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                stats.messages += 1;
                stats.bytes += p.payload.len() as u64;
                stats.elapsed = start.elapsed();
                if count.is_some_and(|c| stats.messages >= c) {
                    break;
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    let _ = client.disconnect().await;
    Ok(stats)
}
