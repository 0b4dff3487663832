//! Streaming settings: the MQTT source, micro-batches, event-time windows, and the
//! sinks that only streams use (PostgreSQL, MQTT).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::diag::Diagnostic;
use serde::Deserialize;

use crate::raw::{RawCsv, RawMicroBatch, RawWindow};
use crate::types::{FieldSpec, FieldType, Format};
use crate::units::{ScalarText, Span};

/// The MQTT protocol version a source speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttProtocol {
    /// MQTT 3.1.1 (the broker bounds unacknowledged messages by its own setting).
    V311,
    /// MQTT 5 (the client's receive maximum bounds unacknowledged messages).
    V5,
}

/// How many records, and how long, a micro-batch collects before the SQL runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MicroBatch {
    /// Records at most.
    pub records: usize,
    /// Time at most after the first record.
    pub wait: Duration,
}

impl Default for MicroBatch {
    fn default() -> Self {
        Self {
            records: 5000,
            wait: Duration::from_millis(200),
        }
    }
}

/// A pipeline that subscribes to an MQTT broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSourceSpec {
    /// `mqtt://[user[:password]@]host[:port]`, or `mqtts://` for TLS.
    pub broker: String,
    /// The topic as written, with `{column}` segments.
    pub topic: String,
    /// The subscription filter: `{column}` segments become `+`.
    pub filter: String,
    /// Columns taken from topic segments, with the segment index.
    pub topic_columns: Vec<(usize, String)>,
    /// The shared-subscription group (`$share/<group>/<filter>`).
    pub group: String,
    /// 0 or 1.
    pub qos: u8,
    /// The protocol version.
    pub protocol: MqttProtocol,
    /// Client id prefix; the worker's id is appended so each slot keeps its session.
    pub client_id: String,
    /// How long the broker keeps a worker's session (and its unacknowledged messages)
    /// after a disconnect.
    pub session_expiry: Duration,
    /// CA certificates (PEM) for `mqtts://`; the system's roots when absent.
    pub ca_file: Option<PathBuf>,
    /// Payload format: JSON (an object or an array per message) or CSV lines.
    pub format: Format,
    /// Micro-batch bounds.
    pub batch: MicroBatch,
    /// The operator says the broker keeps every message queued for an offline session
    /// (Mosquitto: `max_queued_messages 0`): no warning about its defaults at start.
    pub broker_keeps_queued: bool,
    /// Unacknowledged messages the broker may send a worker (MQTT 5): a backlog up to
    /// this is held in flight, which brokers never drop; what a worker that dies held
    /// is what the broker must keep for it.
    pub receive_maximum: u16,
}

impl MqttSourceSpec {
    /// The subscription: `$share/<group>/<filter>`.
    pub fn shared_filter(&self) -> String {
        format!("$share/{}/{}", self.group, self.filter)
    }
}

/// What every kind of stream source tells the runner, the decoder and the checks. A
/// kind implements it in its own module.
pub trait StreamSourceKind: std::fmt::Debug + Sync {
    /// `mqtt`, `nats`: the prefix of a message's place in dead letters.
    fn kind(&self) -> &'static str;
    /// The topic or subject as written.
    fn address(&self) -> &str;
    /// The field that holds the address in the pipeline file (`topic`, `subject`).
    fn address_field(&self) -> &'static str;
    /// Columns taken from the address's levels or tokens, with their index.
    fn columns(&self) -> &[(usize, String)];
    /// What separates the address's levels: `/` or `.`.
    fn separator(&self) -> char;
    /// The payload format.
    fn format(&self) -> Format;
    /// Micro-batch bounds.
    fn batch(&self) -> MicroBatch;
    /// Columns taken from the record rather than its payload (Kafka's key, partition,
    /// offset, timestamp, headers).
    fn metadata(&self) -> &[(String, crate::kafka::RecordField)] {
        &[]
    }
}

/// A stream source, whichever its kind. Adding a kind adds a variant here and one arm
/// in [`StreamSource::spec`]; the compiler shows every other place that must learn it.
#[derive(Debug, Clone, Copy)]
pub enum StreamSource<'a> {
    /// An MQTT subscription.
    Mqtt(&'a MqttSourceSpec),
    /// A JetStream consumer.
    Nats(&'a crate::nats::NatsSourceSpec),
    /// A Kafka consumer group.
    Kafka(&'a crate::kafka::KafkaSourceSpec),
}

impl<'a> StreamSource<'a> {
    /// The source's settings as every kind has them.
    pub fn spec(&self) -> &'a dyn StreamSourceKind {
        match *self {
            StreamSource::Mqtt(m) => m,
            StreamSource::Nats(n) => n,
            StreamSource::Kafka(k) => k,
        }
    }

    /// `mqtt` or `nats`: the prefix of a message's place in dead letters.
    pub fn kind(&self) -> &'static str {
        self.spec().kind()
    }

    /// The topic or subject as written.
    pub fn address(&self) -> &'a str {
        self.spec().address()
    }

    /// The field that holds the address in the pipeline file (`topic`, `subject`).
    pub fn address_field(&self) -> &'static str {
        self.spec().address_field()
    }

    /// Columns taken from the address's levels or tokens, with their index.
    pub fn columns(&self) -> &'a [(usize, String)] {
        self.spec().columns()
    }

    /// What separates the address's levels: `/` or `.`.
    pub fn separator(&self) -> char {
        self.spec().separator()
    }

    /// The payload format.
    pub fn format(&self) -> Format {
        self.spec().format()
    }

    /// Micro-batch bounds.
    pub fn batch(&self) -> MicroBatch {
        self.spec().batch()
    }

    /// Columns taken from the record rather than its payload.
    pub fn metadata(&self) -> &'a [(String, crate::kafka::RecordField)] {
        self.spec().metadata()
    }

    /// `mqtt:sensors/+/reading`, `nats:sensors.*.reading`.
    pub fn describe(&self) -> String {
        format!("{}:{}", self.kind(), self.address())
    }
}

impl StreamSourceKind for MqttSourceSpec {
    fn kind(&self) -> &'static str {
        "mqtt"
    }
    fn address(&self) -> &str {
        &self.topic
    }
    fn address_field(&self) -> &'static str {
        "topic"
    }
    fn columns(&self) -> &[(usize, String)] {
        &self.topic_columns
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
}

/// Event-time windows over a timestamp column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSpec {
    /// The event-time column.
    pub time: String,
    /// Window length.
    pub size: Duration,
    /// Distance between window starts (equal to `size` for tumbling windows).
    pub slide: Duration,
    /// The watermark trails the newest event time by this much; a record for a window
    /// already closed is late.
    pub allowed_lateness: Duration,
    /// With no record for this long, open windows close anyway.
    pub idle_timeout: Duration,
    /// A record whose event time is further ahead of the wall clock than this is a
    /// dead letter (stage `future`): it never moves the watermark, which would make
    /// every later record late.
    pub max_future: Duration,
}

/// How far ahead of the wall clock an event time may be, unless the window says.
pub const DEFAULT_MAX_FUTURE: Duration = Duration::from_secs(300);

impl WindowSpec {
    /// Whether windows overlap.
    pub fn is_hopping(&self) -> bool {
        self.slide < self.size
    }
}

/// Rows into a PostgreSQL table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresSinkSpec {
    /// `postgres://user@host:port/db` (or key=value settings).
    pub url: String,
    /// The table, optionally `schema.table`.
    pub table: String,
    /// Create the table from the rows' schema when it does not exist.
    pub create: bool,
    /// Upsert on these columns (INSERT … ON CONFLICT DO UPDATE); appends use binary
    /// COPY when empty.
    pub key: Vec<String>,
}

/// Rows published to an MQTT topic, one JSON object per message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MqttSinkSpec {
    /// The broker.
    pub broker: String,
    /// The topic; `{column}` is replaced by the row's value.
    pub topic: String,
    /// 0 or 1 (1 waits for the broker's acknowledgement before committing).
    pub qos: u8,
}

/// When a stream's file sink finishes a file and starts the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rolling {
    /// After this long.
    pub interval: Duration,
    /// Or past this many bytes.
    pub size: u64,
}

impl Default for Rolling {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            size: 128 << 20,
        }
    }
}

/// Checks a broker address's scheme and host, without resolving anything.
pub(crate) fn check_broker(url: &str, field: &str, file: &Path, out: &mut Vec<Diagnostic>) {
    let rest = match url.split_once("://") {
        Some(("mqtt" | "mqtts" | "tcp" | "ssl", rest)) => rest,
        Some((scheme, _)) => {
            out.push(
                Diagnostic::new(file, field, format!("scheme `{scheme}` is not MQTT"))
                    .with_help("write mqtt://host:1883, or mqtts://host:8883 for TLS"),
            );
            return;
        }
        None => url,
    };
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    if host.trim_end_matches('/').is_empty() || host.starts_with(':') {
        out.push(
            Diagnostic::new(file, field, format!("`{url}` names no host"))
                .with_help("write mqtt://host:1883"),
        );
    }
}

/// Splits a topic with `{column}` segments into a subscription filter and columns.
/// A stream source's payload format: JSON (an object or an array per message) or CSV
/// lines; `kind` names the source in the diagnostic.
pub(crate) fn payload_format(
    format: Option<Format>,
    kind: &str,
    field: &str,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> Format {
    match format {
        None | Some(Format::Json | Format::Ndjson) => Format::Json,
        Some(Format::Csv) => Format::Csv,
        Some(other) => {
            out.push(
                Diagnostic::new(file, field, format!("{kind} payloads cannot be `{other}`"))
                    .with_help(
                        "use json (an object or an array per message) or csv (lines, no header)",
                    ),
            );
            Format::Json
        }
    }
}

fn topic_columns(
    topic: &str,
    field: &str,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> (String, Vec<(usize, String)>) {
    let mut cols = Vec::new();
    let mut filter = Vec::new();
    for (i, seg) in topic.split('/').enumerate() {
        if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            if name.is_empty() || cols.iter().any(|(_, c)| c == name) {
                out.push(
                    Diagnostic::new(file, field, format!("`{seg}` is empty or repeated"))
                        .with_help("name each column once: sensors/{device_id}/reading"),
                );
            }
            cols.push((i, name.to_string()));
            filter.push("+");
        } else {
            if seg.contains(['{', '}']) {
                out.push(
                    Diagnostic::new(
                        file,
                        field,
                        format!("`{seg}`: a column must be a whole topic level"),
                    )
                    .with_help("write sensors/{device_id}/reading, not sensors/dev-{id}"),
                );
            }
            filter.push(seg);
        }
    }
    (filter.join("/"), cols)
}

/// `{ type: mqtt, broker, topic, ... }` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMqttSource {
    pub format: Option<Format>,
    pub csv: Option<RawCsv>,
    pub broker: Option<String>,
    pub topic: Option<String>,
    pub group: Option<String>,
    pub qos: Option<u8>,
    pub protocol: Option<ScalarText>,
    pub client_id: Option<String>,
    pub session_expiry: Option<Span>,
    pub ca_file: Option<PathBuf>,
    pub batch: Option<RawMicroBatch>,
    pub broker_keeps_queued: Option<bool>,
    pub receive_maximum: Option<u16>,
}

/// The MQTT source of a pipeline.
pub(crate) fn resolve_mqtt(
    s: &RawMqttSource,
    pipeline: &str,
    base: &str,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> MqttSourceSpec {
    let field = |f: &str| format!("{base}.{f}");
    let broker = s.broker.clone().unwrap_or_else(|| {
        out.push(
            Diagnostic::new(file, field("broker"), "is required for an mqtt source")
                .with_help("add `broker: mqtt://127.0.0.1:1883`"),
        );
        String::new()
    });
    if !broker.is_empty() {
        check_broker(&broker, &field("broker"), file, out);
    }
    let topic = s.topic.clone().unwrap_or_else(|| {
        out.push(
            Diagnostic::new(file, field("topic"), "is required for an mqtt source")
                .with_help("add `topic: sensors/{device_id}/reading` (`+` and `#` work too)"),
        );
        "#".into()
    });
    let (filter, topic_columns) = topic_columns(&topic, &field("topic"), file, out);
    let qos = s.qos.unwrap_or(1);
    if qos > 1 {
        out.push(
            Diagnostic::new(file, field("qos"), format!("QoS {qos} is not supported"))
                .with_help("use 1 (at least once) or 0 (at most once)"),
        );
    }
    let protocol = match s.protocol.as_ref().map(|p| p.0.as_str()) {
        None | Some("5" | "5.0" | "v5") => MqttProtocol::V5,
        Some("3.1.1" | "4" | "v4" | "v3.1.1") => MqttProtocol::V311,
        Some(other) => {
            out.push(
                Diagnostic::new(
                    file,
                    field("protocol"),
                    format!("`{other}` is not an MQTT version"),
                )
                .with_help("use 5 or 3.1.1"),
            );
            MqttProtocol::V5
        }
    };
    let format = payload_format(s.format, "MQTT", &field("format"), file, out);
    let batch = micro_batch(s.batch.as_ref(), &field("batch"), file, out);
    let group = s.group.clone().unwrap_or_else(|| pipeline.to_string());
    if group.is_empty() || group.contains(['/', '+', '#']) {
        out.push(
            Diagnostic::new(
                file,
                field("group"),
                format!("`{group}` is not a valid group"),
            )
            .with_help("use letters, digits, `_` and `-`"),
        );
    }
    MqttSourceSpec {
        broker,
        topic,
        filter,
        topic_columns,
        group,
        qos,
        protocol,
        client_id: s.client_id.clone().unwrap_or_else(|| "etlmesh".into()),
        session_expiry: s.session_expiry.map_or(Duration::from_secs(3600), |d| d.0),
        ca_file: s.ca_file.clone(),
        format,
        batch,
        broker_keeps_queued: s.broker_keeps_queued.unwrap_or(false),
        receive_maximum: match s.receive_maximum {
            Some(n) if n < 16 => {
                out.push(
                    Diagnostic::new(file, field("receive_maximum"), format!("{n} is too few"))
                        .with_help("give 16 to 65535; the default is 65535"),
                );
                16
            }
            Some(n) => n,
            None => u16::MAX,
        },
    }
}

pub(crate) fn micro_batch(
    b: Option<&RawMicroBatch>,
    field: &str,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> MicroBatch {
    let def = MicroBatch::default();
    let Some(b) = b else { return def };
    let mb = MicroBatch {
        records: b.records.unwrap_or(def.records),
        wait: b.wait.map_or(def.wait, |w| w.0),
    };
    if mb.records == 0 || mb.records > 60_000 {
        out.push(
            Diagnostic::new(
                file,
                format!("{field}.records"),
                format!("{} is outside 1..=60000", mb.records),
            )
            .with_help("5000 is a good start; unacknowledged messages are bounded by it"),
        );
    }
    if mb.wait.is_zero() {
        out.push(
            Diagnostic::new(file, format!("{field}.wait"), "must be above 0")
                .with_help("200ms is a good start"),
        );
    }
    mb
}

/// A pipeline's window, checked against its schema.
pub(crate) fn resolve_window(
    w: RawWindow,
    schema: Option<&[FieldSpec]>,
    base: &str,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> WindowSpec {
    let field = |f: &str| format!("{base}.{f}");
    let size = w.size.0;
    let slide = w.slide.map_or(size, |s| s.0);
    if size.is_zero() {
        out.push(Diagnostic::new(file, field("size"), "must be above 0").with_help("try 1m"));
    }
    if slide.is_zero() || slide > size {
        out.push(
            Diagnostic::new(
                file,
                field("slide"),
                "must be above 0 and at most the window's size",
            )
            .with_help("leave it out for tumbling windows; a smaller slide makes hopping windows"),
        );
    } else if !size.is_zero() && !size.as_millis().is_multiple_of(slide.as_millis()) {
        out.push(
            Diagnostic::new(file, field("slide"), "must divide the window's size")
                .with_help("for a 1m window, use 10s, 15s, 20s or 30s"),
        );
    }
    if let Some(schema) = schema {
        match schema.iter().find(|f| f.name == w.time) {
            None => out.push(
                Diagnostic::new(
                    file,
                    field("time"),
                    format!("`{}` is not a column of the schema", w.time),
                )
                .with_help("name the event-time column, a timestamp"),
            ),
            Some(f)
                if !matches!(
                    f.ty,
                    FieldType::TimestampS
                        | FieldType::TimestampMs
                        | FieldType::TimestampUs
                        | FieldType::TimestampNs
                ) =>
            {
                out.push(
                    Diagnostic::new(
                        file,
                        field("time"),
                        format!("`{}` is {}, not a timestamp", w.time, f.ty),
                    )
                    .with_help(
                        "declare it as timestamp_ms (epoch milliseconds or RFC 3339 text are read)",
                    ),
                )
            }
            Some(_) => {}
        }
    }
    WindowSpec {
        time: w.time,
        size,
        slide,
        allowed_lateness: w.allowed_lateness.map_or(Duration::from_secs(5), |d| d.0),
        idle_timeout: w.idle_timeout.map_or(Duration::from_secs(30), |d| d.0),
        max_future: w.max_future.map_or(DEFAULT_MAX_FUTURE, |d| d.0),
    }
}

#[cfg(test)]
mod tests {
    use crate::{PipelineFile, SinkSpec};

    const STREAM: &str = "pipelines:\n  live:\n    source: { type: mqtt, broker: mqtt://h:1883, topic: 'sensors/{device_id}/reading', batch: { records: 100, wait: 50ms } }\n    schema: { device_id: utf8, ts: timestamp_ms, t: float64 }\n    window: { time: ts, size: 1m, slide: 15s }\n    scaling: { max_replicas: 1 }\n    sinks: [{ type: postgres, url: 'postgres://x@h/db', table: iot.agg, create: true, key: [device_id] }]\n    dead_letter: { type: ndjson, path: out/dl }\n";

    #[test]
    fn a_stream_pipeline_reads_its_topic_columns_window_and_sinks() {
        let f = PipelineFile::parse("s.yaml", STREAM).expect("valid");
        let p = &f.spec.pipelines[0];
        let m = p.mqtt().expect("mqtt");
        assert_eq!(m.filter, "sensors/+/reading");
        assert_eq!(m.shared_filter(), "$share/live/sensors/+/reading");
        assert_eq!(m.topic_columns, vec![(1, "device_id".to_string())]);
        assert_eq!((m.batch.records, m.batch.wait.as_millis()), (100, 50));
        let w = p.window.as_ref().expect("window");
        assert!(w.is_hopping());
        assert!(matches!(&p.sinks[0], SinkSpec::Postgres(s) if s.table == "iot.agg" && s.create));
    }

    #[test]
    fn stream_mistakes_name_their_field() {
        for (from, to, expect) in [
            (
                "scaling: { max_replicas: 1 }",
                "scaling: { max_replicas: 3 }",
                "pipelines.live.scaling.max_replicas",
            ),
            ("time: ts,", "time: tss,", "pipelines.live.window.time"),
            ("slide: 15s", "slide: 7s", "pipelines.live.window.slide"),
            (
                "broker: mqtt://h:1883",
                "broker: http://h",
                "pipelines.live.source.broker",
            ),
            (
                "table: iot.agg",
                "table: 'a b'",
                "pipelines.live.sinks[0].table",
            ),
            (
                "    dead_letter: { type: ndjson, path: out/dl }\n",
                "",
                "pipelines.live.dead_letter",
            ),
            (
                "    schema: { device_id: utf8, ts: timestamp_ms, t: float64 }\n",
                "",
                "pipelines.live.schema",
            ),
            (
                "device_id: utf8",
                "device_id: int64",
                "pipelines.live.source.topic",
            ),
            (
                "batch: { records: 100, wait: 50ms }",
                "format: csv, csv: { header: true }",
                "pipelines.live.source.csv.header",
            ),
        ] {
            let text = STREAM.replace(from, to);
            assert_ne!(text, STREAM, "{from}");
            let e = PipelineFile::parse("s.yaml", text).expect_err(expect);
            assert!(e.to_string().contains(expect), "{expect}: {e}");
        }
    }
}
