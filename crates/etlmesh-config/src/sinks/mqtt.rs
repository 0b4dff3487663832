//! The MQTT sink (streams): each row a JSON object to a topic.

use serde::Deserialize;

use super::Place;
use crate::diag::Diagnostic;
use crate::spec::SinkSpec;
use crate::stream::MqttSinkSpec;

/// `{ type: mqtt, broker, topic, qos }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMqttSink {
    broker: Option<String>,
    topic: Option<String>,
    qos: Option<u8>,
}

pub(crate) fn resolve(s: RawMqttSink, at: &Place<'_>, out: &mut Vec<Diagnostic>) -> SinkSpec {
    let broker = s.broker.unwrap_or_else(|| {
        out.push(
            at.diag("broker", "is required for an mqtt sink")
                .with_help("add `broker: mqtt://127.0.0.1:1883`"),
        );
        String::new()
    });
    if !broker.is_empty() {
        crate::stream::check_broker(&broker, &format!("{}.broker", at.base), at.file, out);
    }
    let topic = s.topic.unwrap_or_else(|| {
        out.push(
            at.diag("topic", "is required for an mqtt sink")
                .with_help("add `topic: results/{device_id}`"),
        );
        String::new()
    });
    if topic.contains(['+', '#']) {
        out.push(
            at.diag("topic", "wildcards cannot be published to")
                .with_help("use `{column}` to take a level from each row"),
        );
    }
    let qos = s.qos.unwrap_or(1);
    if qos > 1 {
        out.push(
            at.diag("qos", format!("QoS {qos} is not supported"))
                .with_help("use 0 or 1"),
        );
    }
    SinkSpec::Mqtt(MqttSinkSpec { broker, topic, qos })
}
