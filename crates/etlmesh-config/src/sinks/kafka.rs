//! The Kafka sink (streams): each row a JSON object in a record of a topic that may
//! take parts from the row (`readings-{site}`), keyed by columns of the row.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Place;
use crate::diag::Diagnostic;
use crate::spec::SinkSpec;

/// A Kafka topic rows are produced to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSinkSpec {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: String,
    /// The topic; `{column}` is replaced by the row's value.
    pub topic: String,
    /// Columns whose values, joined, are the record key (rows of a key stay in order in
    /// one partition); no key when empty.
    pub key: Vec<String>,
    /// librdkafka settings passed as given (`security.protocol`, `sasl.mechanism`,
    /// `sasl.username`, `ssl.ca.location`, `compression.type`, …).
    pub options: BTreeMap<String, String>,
    /// Each write is a Kafka transaction that also commits the source's consumer
    /// offsets (Kafka to Kafka, exactly once for `read_committed` readers).
    pub exactly_once: bool,
}

impl KafkaSinkSpec {
    /// The columns the topic names, in order.
    pub fn topic_columns(&self) -> Vec<&str> {
        template_columns(&self.topic)
    }
}

/// `{ type: kafka, brokers, topic, key, options, exactly_once }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKafkaSink {
    brokers: Option<String>,
    topic: Option<String>,
    #[serde(default)]
    key: Vec<String>,
    #[serde(default)]
    options: BTreeMap<String, String>,
    #[serde(default)]
    exactly_once: bool,
}

/// Settings the sink decides itself: producing exactly once per write needs them.
const OWN: &[&str] = &[
    "bootstrap.servers",
    "enable.idempotence",
    "acks",
    "max.in.flight.requests.per.connection",
    "transactional.id",
];

pub(crate) fn resolve(s: RawKafkaSink, at: &Place<'_>, out: &mut Vec<Diagnostic>) -> SinkSpec {
    let brokers = s.brokers.unwrap_or_else(|| {
        out.push(
            at.diag("brokers", "is required for a kafka sink")
                .with_help("add `brokers: 127.0.0.1:9092` (comma-separated for several)"),
        );
        String::new()
    });
    for p in crate::kafka::broker_problems(&brokers) {
        out.push(
            at.diag("brokers", p)
                .with_help("write brokers as `host:9092`, comma-separated"),
        );
    }
    let topic = s.topic.unwrap_or_else(|| {
        out.push(at.diag("topic", "is required for a kafka sink").with_help(
            "add `topic: readings` (or `readings-{site}` to take a part from each row)",
        ));
        String::new()
    });
    let literal: String = strip_columns(&topic);
    if let Some(c) = literal
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        out.push(
            at.diag("topic", format!("`{c}` cannot be in a Kafka topic name"))
                .with_help(
                    "use letters, digits, `.`, `_` and `-`; `{column}` takes a part from the row",
                ),
        );
    }
    for k in OWN {
        if s.options.contains_key(*k) {
            out.push(
                at.diag(&format!("options.{k}"), "is set by the sink")
                    .with_help("remove it: the sink produces idempotently with acks=all, names its own transactions (`exactly_once`) and takes the brokers from `brokers`"),
            );
        }
    }
    SinkSpec::Kafka(KafkaSinkSpec {
        brokers,
        topic,
        key: s.key,
        options: s.options,
        exactly_once: s.exactly_once,
    })
}

/// The `{column}` names of a template, in order.
fn template_columns(t: &str) -> Vec<&str> {
    let mut cols = Vec::new();
    let mut rest = t;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        cols.push(&rest[start + 1..start + len]);
        rest = &rest[start + len + 1..];
    }
    cols
}

/// The template without its `{column}` parts.
fn strip_columns(t: &str) -> String {
    let mut s = t.to_string();
    for c in template_columns(t) {
        s = s.replacen(&format!("{{{c}}}"), "", 1);
    }
    s
}

#[cfg(test)]
mod tests {
    use crate::PipelineFile;

    fn file(sink: &str) -> String {
        format!(
            "pipelines:\n  p:\n    source: {{ type: nats, url: \"nats://127.0.0.1:4222\", stream: S, subject: \"a.*\" }}\n    schema: {{ site: utf8 }}\n    sinks:\n      - {sink}\n    dead_letter: {{ type: ndjson, path: out/dead }}\n"
        )
    }

    #[test]
    fn a_kafka_sink_reads_its_keys() {
        let f = PipelineFile::parse(
            "k.yaml",
            file("{ type: kafka, brokers: \"127.0.0.1:9092\", topic: \"out-{site}\", key: [site], options: { compression.type: lz4 } }"),
        )
        .expect("valid");
        let etlmesh_config_sink = &f.spec.pipelines[0].sinks[0];
        let crate::SinkSpec::Kafka(k) = etlmesh_config_sink else {
            panic!("a kafka sink: {etlmesh_config_sink:?}");
        };
        assert_eq!(k.topic_columns(), ["site"]);
        assert_eq!(k.key, ["site"]);
        assert_eq!(k.options["compression.type"], "lz4");
    }

    #[test]
    fn bad_brokers_topics_and_owned_options_are_named() {
        let e = PipelineFile::parse(
            "k.yaml",
            file("{ type: kafka, brokers: \"nohost\", topic: \"out/{site}\", options: { acks: \"1\" } }"),
        )
        .expect_err("invalid");
        let text = e.to_string();
        assert!(
            text.contains("sinks[0].brokers: `nohost` is not host:port"),
            "{text}"
        );
        assert!(
            text.contains("`/` cannot be in a Kafka topic name"),
            "{text}"
        );
        assert!(
            text.contains("sinks[0].options.acks: is set by the sink"),
            "{text}"
        );
    }

    #[test]
    fn exactly_once_needs_a_kafka_source_one_sink_no_window_and_one_worker() {
        let kafka = "{ type: kafka, brokers: '127.0.0.1:9092', topic: r }";
        let eos = "{ type: kafka, brokers: '127.0.0.1:9092', topic: out, exactly_once: true }";
        let pipeline = |source: &str, sinks: &str, extra: &str| {
            format!(
                "pipelines:\n  p:\n    source: {source}\n    schema: {{ device_id: utf8, ts: timestamp_ms }}\n    sinks: [{sinks}]\n    dead_letter: {{ type: ndjson, path: d }}\n{extra}"
            )
        };
        let one = "    scaling: { max_replicas: 1 }\n";
        let f = PipelineFile::parse("k.yaml", pipeline(kafka, eos, one)).expect("valid");
        assert!(f.spec.pipelines[0].exactly_once());
        assert!(f.spec.pipelines[0].one_worker());
        let refused = |source: &str, sinks: &str, extra: &str| {
            PipelineFile::parse("k.yaml", pipeline(source, sinks, extra))
                .expect_err("refused")
                .to_string()
        };
        let e = refused(
            "{ type: nats, url: 'nats://127.0.0.1:4222', stream: S, subject: 'a.*' }",
            eos,
            one,
        );
        assert!(
            e.contains("sinks[0].exactly_once: needs a Kafka source"),
            "{e}"
        );
        let e = refused(kafka, &format!("{eos}, {{ type: ndjson, path: o }}"), one);
        assert!(e.contains("the pipeline has 2 sinks"), "{e}");
        let e = refused(kafka, eos, "");
        assert!(e.contains("may run on 4 workers"), "{e}");
        let e = refused(
            kafka,
            eos,
            "    scaling: { max_replicas: 1 }\n    window: { time: ts, size: 1m }\n    transform: SELECT device_id, window_start, count(*) AS n FROM input GROUP BY 1, 2\n",
        );
        assert!(e.contains("windowed pipeline"), "{e}");
    }
}
