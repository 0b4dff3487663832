//! The Kafka source: a consumer group that the pipeline's workers share (cooperative
//! rebalancing), offsets committed behind what every sink committed, and the record's
//! key, partition, offset, timestamp, topic and headers available as columns. The
//! Kafka sink is in [`crate::sinks::kafka`].

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::diag::Diagnostic;
use crate::raw::{RawCsv, RawMicroBatch};
use crate::stream::MicroBatch;
use crate::types::Format;

/// A pipeline that consumes Kafka topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaSourceSpec {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: String,
    /// The topics, or one regular expression (`^readings-.*`) when `pattern` is set.
    pub topics: Vec<String>,
    /// The topics are one regular expression (librdkafka subscribes to every topic
    /// matching it, also those created later).
    pub pattern: bool,
    /// The consumer group (shared by the pipeline's workers).
    pub group: String,
    /// Where a group without committed offsets starts: `earliest` or `latest`.
    pub start: String,
    /// Read only committed records of transactional producers (`read_committed`).
    pub read_committed: bool,
    /// Columns taken from the record rather than its payload.
    pub metadata: Vec<(String, RecordField)>,
    /// Records a worker holds unacknowledged, at most.
    pub max_pending: usize,
    /// librdkafka settings passed as given (`security.protocol`, `sasl.*`, `ssl.*`, …).
    pub options: BTreeMap<String, String>,
    /// Payload format: JSON (an object or an array per record) or CSV lines.
    pub format: Format,
    /// Micro-batch bounds.
    pub batch: MicroBatch,
}

/// What a metadata column holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordField {
    /// The record key, as text.
    Key,
    /// The partition (int32).
    Partition,
    /// The offset in its partition (int64).
    Offset,
    /// The record's timestamp (milliseconds, UTC).
    Timestamp,
    /// The topic.
    Topic,
    /// A header's value, as text.
    Header(String),
}

impl RecordField {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "key" => Self::Key,
            "partition" => Self::Partition,
            "offset" => Self::Offset,
            "timestamp" => Self::Timestamp,
            "topic" => Self::Topic,
            _ => Self::Header(s.strip_prefix("header:").filter(|h| !h.is_empty())?.into()),
        })
    }
}

impl crate::stream::StreamSourceKind for KafkaSourceSpec {
    fn kind(&self) -> &'static str {
        "kafka"
    }
    fn address(&self) -> &str {
        self.topics.first().map_or("", String::as_str)
    }
    fn address_field(&self) -> &'static str {
        "topics"
    }
    fn columns(&self) -> &[(usize, String)] {
        &[]
    }
    fn separator(&self) -> char {
        '/'
    }
    fn format(&self) -> Format {
        self.format
    }
    fn batch(&self) -> MicroBatch {
        self.batch
    }
    fn metadata(&self) -> &[(String, RecordField)] {
        &self.metadata
    }
}

/// `{ type: kafka, brokers, topics | topic | pattern, group, ... }` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawKafkaSource {
    pub format: Option<Format>,
    pub csv: Option<RawCsv>,
    brokers: Option<String>,
    topic: Option<String>,
    topics: Option<Vec<String>>,
    pattern: Option<String>,
    group: Option<String>,
    start: Option<String>,
    isolation: Option<String>,
    #[serde(default)]
    columns: BTreeMap<String, String>,
    max_pending: Option<usize>,
    #[serde(default)]
    options: BTreeMap<String, String>,
    batch: Option<RawMicroBatch>,
}

/// Settings the source decides itself: offsets committed behind the sinks need them.
const OWN: &[(&str, &str)] = &[
    ("bootstrap.servers", "take the brokers from `brokers`"),
    ("group.id", "set `group`"),
    (
        "enable.auto.commit",
        "offsets are committed once every sink committed",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed once every sink committed",
    ),
    ("auto.offset.reset", "set `start: earliest` or `latest`"),
    (
        "isolation.level",
        "set `isolation: read_committed` or `read_uncommitted`",
    ),
    (
        "partition.assignment.strategy",
        "the source rebalances cooperatively (cooperative-sticky)",
    ),
];

/// Problems with a `host:port[,…]` broker list, one message each.
pub(crate) fn broker_problems(brokers: &str) -> Vec<String> {
    brokers
        .split(',')
        .map(str::trim)
        .filter(|b| !b.is_empty())
        .filter(|b| {
            let hostport = b.split_once("://").map_or(*b, |(_, rest)| rest);
            !hostport
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        })
        .map(|b| format!("`{b}` is not host:port"))
        .collect()
}

/// Whether `t` may be a Kafka topic name.
pub(crate) fn valid_topic(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The Kafka source of a pipeline.
pub(crate) fn resolve_source(
    s: &RawKafkaSource,
    pipeline: &str,
    base: &str,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> KafkaSourceSpec {
    let field = |f: &str| format!("{base}.{f}");
    let diag = |f: &str, m: String| Diagnostic::new(file, field(f), m);
    let brokers = s.brokers.clone().unwrap_or_else(|| {
        out.push(
            diag("brokers", "is required for a kafka source".into())
                .with_help("add `brokers: 127.0.0.1:9092` (comma-separated for several)"),
        );
        String::new()
    });
    for p in broker_problems(&brokers) {
        out.push(diag("brokers", p).with_help("write brokers as `host:9092`, comma-separated"));
    }
    let (topics, pattern) = match (&s.topic, &s.topics, &s.pattern) {
        (Some(t), None, None) => (vec![t.clone()], false),
        (None, Some(ts), None) if !ts.is_empty() => (ts.clone(), false),
        (None, None, Some(p)) => (vec![p.clone()], true),
        (None, None, None) | (None, Some(_), None) => {
            out.push(
                diag("topics", "is required for a kafka source".into()).with_help(
                    "add `topic: readings`, `topics: [a, b]` or `pattern: '^readings-.*'`",
                ),
            );
            (Vec::new(), false)
        }
        _ => {
            out.push(
                diag(
                    "topics",
                    "give one of `topic`, `topics` and `pattern`".into(),
                )
                .with_help("`pattern` is a regular expression over topic names"),
            );
            (Vec::new(), false)
        }
    };
    if !pattern {
        for t in topics.iter().filter(|t| !valid_topic(t)) {
            out.push(
                diag("topics", format!("`{t}` is not a Kafka topic name")).with_help(
                    "use letters, digits, `.`, `_` and `-`; a regular expression goes in `pattern`",
                ),
            );
        }
    } else if let Some(p) = topics.first()
        && !p.starts_with('^')
    {
        out.push(
            diag("pattern", format!("`{p}` does not start with `^`"))
                .with_help("librdkafka takes a topic pattern only when it starts with `^`: write `^readings-.*`"),
        );
    }
    let group = s
        .group
        .clone()
        .unwrap_or_else(|| format!("etlmesh-{pipeline}"));
    if group.trim().is_empty() {
        out.push(
            diag("group", "is empty".into())
                .with_help("name the consumer group, or leave it out for etlmesh-<pipeline>"),
        );
    }
    let start = s.start.clone().unwrap_or_else(|| "earliest".into());
    if !matches!(start.as_str(), "earliest" | "latest") {
        out.push(
            diag("start", format!("`{start}` is not earliest or latest"))
                .with_help("a group without committed offsets starts at the `earliest` record (the default) or the `latest`"),
        );
    }
    let read_committed = match s.isolation.as_deref() {
        None | Some("read_committed") => true,
        Some("read_uncommitted") => false,
        Some(other) => {
            out.push(
                diag("isolation", format!("`{other}` is not an isolation level"))
                    .with_help("use read_committed (the default) or read_uncommitted"),
            );
            true
        }
    };
    let mut metadata = Vec::new();
    for (col, what) in &s.columns {
        match RecordField::parse(what) {
            Some(f) => metadata.push((col.clone(), f)),
            None => out.push(
                diag(
                    &format!("columns.{col}"),
                    format!("`{what}` is not a part of a record"),
                )
                .with_help("use key, partition, offset, timestamp, topic or header:<name>"),
            ),
        }
    }
    for (k, why) in OWN {
        if s.options.contains_key(*k) {
            out.push(diag(&format!("options.{k}"), "is set by the source".into()).with_help(*why));
        }
    }
    let format = crate::stream::payload_format(s.format, "Kafka", &field("format"), file, out);
    let batch = crate::stream::micro_batch(s.batch.as_ref(), &field("batch"), file, out);
    let max_pending = s.max_pending.unwrap_or(65_535);
    if max_pending < 2 * batch.records {
        out.push(
            diag(
                "max_pending",
                format!(
                    "{max_pending} is below twice the micro-batch ({} records)",
                    batch.records
                ),
            )
            .with_help(
                "raise it, or lower `batch.records`: commits must flow before the bound is reached",
            ),
        );
    }
    KafkaSourceSpec {
        brokers,
        topics,
        pattern,
        group,
        start,
        read_committed,
        metadata,
        max_pending,
        options: s.options.clone(),
        format,
        batch,
    }
}

#[cfg(test)]
mod tests {
    use crate::PipelineFile;

    fn file(source: &str) -> String {
        format!(
            "pipelines:\n  k:\n    source: {source}\n    schema: {{ device_id: utf8, seq: int64 }}\n    sinks: [{{ type: ndjson, path: o }}]\n    dead_letter: {{ type: ndjson, path: d }}\n"
        )
    }

    #[test]
    fn a_kafka_source_reads_its_keys() {
        let f = PipelineFile::parse(
            "k.yaml",
            file("{ type: kafka, brokers: '127.0.0.1:9092', topics: [a, b.c], columns: { device_id: key, p: partition, o: offset, t: timestamp, tr: 'header:traceparent' }, options: { security.protocol: SASL_SSL } }"),
        )
        .expect("parses");
        let crate::SourceKind::Kafka(k) = &f.spec.pipelines[0].source.kind else {
            panic!("a kafka source");
        };
        assert_eq!(k.topics, vec!["a", "b.c"]);
        assert_eq!(k.group, "etlmesh-k");
        assert!(k.read_committed);
        assert_eq!(k.start, "earliest");
        assert!(
            k.metadata
                .contains(&("device_id".into(), super::RecordField::Key))
        );
        assert!(k.metadata.contains(&(
            "tr".into(),
            super::RecordField::Header("traceparent".into())
        )));
        assert_eq!(k.options["security.protocol"], "SASL_SSL");
    }

    #[test]
    fn a_windowed_kafka_pipeline_may_run_on_many_workers_an_mqtt_one_may_not() {
        let windowed = |source: &str| {
            format!(
                "pipelines:\n  w:\n    source: {source}\n    schema: {{ device_id: utf8, ts: timestamp_ms }}\n    window: {{ time: ts, size: 1m }}\n    scaling: {{ max_replicas: 3 }}\n    transform: SELECT device_id, window_start, count(*) AS n FROM input GROUP BY 1, 2\n    sinks: [{{ type: ndjson, path: o }}]\n    dead_letter: {{ type: ndjson, path: d }}\n"
            )
        };
        PipelineFile::parse(
            "w.yaml",
            windowed(
                "{ type: kafka, brokers: '127.0.0.1:9092', topic: r, columns: { device_id: key } }",
            ),
        )
        .expect("Kafka's partitions spread the keys");
        let e = PipelineFile::parse(
            "w.yaml",
            windowed("{ type: mqtt, broker: 'mqtt://h:1883', topic: 's/+/r' }"),
        )
        .expect_err("MQTT has no partitions");
        let e = e.to_string();
        assert!(
            e.contains("pipelines.w.scaling.max_replicas") && e.contains("keyed"),
            "{e}"
        );
    }

    #[test]
    fn bad_kafka_sources_are_named_by_field() {
        let e = PipelineFile::parse(
            "k.yaml",
            file("{ type: kafka, brokers: 'nohost', topic: 'a b', start: middle, isolation: dirty, columns: { x: body }, options: { enable.auto.commit: 'true' } }"),
        )
        .expect_err("refused")
        .to_string();
        for want in [
            "pipelines.k.source.brokers",
            "`nohost` is not host:port",
            "`a b` is not a Kafka topic name",
            "pipelines.k.source.start",
            "pipelines.k.source.isolation",
            "pipelines.k.source.columns.x",
            "pipelines.k.source.options.enable.auto.commit",
        ] {
            assert!(e.contains(want), "{want} in {e}");
        }
        let e = PipelineFile::parse(
            "k.yaml",
            file("{ type: kafka, brokers: 'h:9092', pattern: 'readings-.*' }"),
        )
        .expect_err("refused")
        .to_string();
        assert!(e.contains("does not start with `^`"), "{e}");
    }
}
