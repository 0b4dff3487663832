//! Checked, typed specifications built from the raw file. Everything the runtime reads
//! comes from here; nothing downstream sees a raw YAML value.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::raw::{RawCsv, RawFile, RawPipeline};
use crate::scaling::ScalingSpec;
use crate::stream::{MqttSinkSpec, MqttSourceSpec, PostgresSinkSpec, Rolling, WindowSpec};
use crate::types::{FieldSpec, Format};
use crate::{OnError, diag::Diagnostic};

/// Settings of the platform, shared by every pipeline of the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Platform {
    /// Memory the SQL engine may hold before it spills to disk.
    pub memory_limit: u64,
    /// Worker threads; 0 means one per core.
    pub threads: usize,
    /// Records per batch.
    pub batch_size: usize,
    /// The longest record (a CSV or NDJSON line, a JSON element) accepted; longer ones
    /// are rejected without being read whole.
    pub max_record_bytes: u64,
    /// Bytes read from an input at a time (the unit of parallel decoding).
    pub read_chunk: u64,
    /// Where the SQL engine spills; the system temporary directory when unset.
    pub spill_dir: Option<PathBuf>,
    /// Period of progress log lines when the output is not a terminal.
    pub progress_interval: Duration,
    /// DataFusion settings passed through (`datafusion.execution.…`), checked by the engine.
    pub sql_options: Vec<(String, String)>,
    /// The scaling policy of pipelines that set none.
    pub scaling: ScalingSpec,
    /// How energy is measured or modelled.
    pub energy: crate::energy::EnergySpec,
    /// The grid's carbon intensity.
    pub carbon: crate::energy::CarbonSpec,
    /// Limits of the analytics service's read-only queries.
    pub query: crate::query::QuerySpec,
    /// Who may use the gateway.
    pub access: crate::access::AccessSpec,
    /// mTLS inside the mesh.
    pub mesh: crate::mesh::MeshSpec,
    /// The MQTT broker run in etlmesh's own process, when asked for.
    pub broker: Option<crate::broker::BrokerSpec>,
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            memory_limit: 1 << 30,
            threads: 0,
            batch_size: 65_536,
            max_record_bytes: 1 << 20,
            read_chunk: 1 << 20,
            spill_dir: None,
            progress_interval: Duration::from_secs(5),
            sql_options: Vec::new(),
            scaling: ScalingSpec::default(),
            energy: crate::energy::EnergySpec::default(),
            carbon: crate::energy::CarbonSpec::default(),
            query: crate::query::QuerySpec::default(),
            access: crate::access::AccessSpec::default(),
            mesh: crate::mesh::MeshSpec::default(),
            broker: None,
        }
    }
}

impl Platform {
    /// The number of threads to use.
    pub fn effective_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        }
    }
}

/// One declared pipeline.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineSpec {
    /// Its name (the key under `pipelines`).
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Where records come from when the pipeline runs as a job.
    pub source: SourceSpec,
    /// The declared schema; inferred from a sample when absent.
    pub schema: Option<Vec<FieldSpec>>,
    /// SQL over the table `input`.
    pub transform: String,
    /// Where transformed records go.
    pub sinks: Vec<SinkSpec>,
    /// Where bad records go.
    pub dead_letter: Option<DeadLetterSpec>,
    /// What to do with a bad record.
    pub on_error: OnError,
    /// How its workers scale.
    pub scaling: ScalingSpec,
    /// Columns that identify a record: duplicates inside a micro-batch are dropped, and
    /// sinks that can (PostgreSQL) load each key once.
    pub dedup: Vec<String>,
    /// Event-time windows (streams).
    pub window: Option<WindowSpec>,
    /// Batch jobs through the gateway: where their inputs may be, how long they run.
    pub jobs: JobsSpec,
}

impl PipelineSpec {
    /// Where records come from in the mesh, for topology views: `mqtt:<topic>` for a
    /// stream, else `http` (requests through the gateway).
    pub fn describe_source(&self) -> String {
        match self.stream_source() {
            Some(s) => s.describe(),
            None => "http".to_string(),
        }
    }

    /// The sinks described ([`SinkSpec::describe`]), the dead letters last.
    pub fn describe_sinks(&self) -> Vec<String> {
        let mut v: Vec<String> = self.sinks.iter().map(SinkSpec::describe).collect();
        if let Some(d) = &self.dead_letter {
            v.push(format!("dead_letter:{}", d.location()));
        }
        v
    }

    /// The stream source, when the pipeline streams (MQTT, JetStream).
    pub fn stream_source(&self) -> Option<crate::stream::StreamSource<'_>> {
        match &self.source.kind {
            SourceKind::Mqtt(m) => Some(crate::stream::StreamSource::Mqtt(m)),
            SourceKind::Nats(n) => Some(crate::stream::StreamSource::Nats(n)),
            SourceKind::Kafka(k) => Some(crate::stream::StreamSource::Kafka(k)),
            SourceKind::File { .. } | SourceKind::Stdin => None,
        }
    }

    /// Whether each write is a Kafka transaction with the source's offsets (a Kafka
    /// sink with `exactly_once`).
    pub fn exactly_once(&self) -> bool {
        self.sinks
            .iter()
            .any(|s| matches!(s, SinkSpec::Kafka(k) if k.exactly_once))
    }

    /// Whether the pipeline must run on one worker whatever its pool is told: a window
    /// over a source without partitions (MQTT, JetStream), or an exactly-once pipeline.
    pub fn one_worker(&self) -> bool {
        let partitioned = matches!(self.source.kind, SourceKind::Kafka(_));
        (self.window.is_some() && !partitioned) || self.exactly_once()
    }

    /// The MQTT source, when the pipeline streams from a broker.
    pub fn mqtt(&self) -> Option<&MqttSourceSpec> {
        match &self.source.kind {
            SourceKind::Mqtt(m) => Some(m),
            _ => None,
        }
    }
}

/// Where a pipeline reads from in a batch job.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    /// File or standard input.
    pub kind: SourceKind,
    /// The format; from the file extension when absent.
    pub format: Option<Format>,
    /// CSV settings.
    pub csv: CsvOptions,
    /// Records sampled to infer a schema.
    pub infer_rows: usize,
}

impl Default for SourceSpec {
    fn default() -> Self {
        Self {
            kind: SourceKind::File { path: None },
            format: None,
            csv: CsvOptions::default(),
            infer_rows: 1000,
        }
    }
}

/// The kinds of batch source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// Files: a path, a directory or a glob (`data/*.csv`); command-line inputs override it.
    File {
        /// The path or pattern.
        path: Option<String>,
    },
    /// Standard input.
    Stdin,
    /// An MQTT subscription (a stream: workers consume it while they run).
    Mqtt(Box<MqttSourceSpec>),
    /// A JetStream consumer (a stream).
    Nats(Box<crate::nats::NatsSourceSpec>),
    /// A Kafka consumer group (a stream).
    Kafka(Box<crate::kafka::KafkaSourceSpec>),
}

/// How CSV is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvOptions {
    /// The first line names the columns.
    pub header: bool,
    /// Field separator.
    pub delimiter: u8,
    /// Quote character.
    pub quote: u8,
    /// Escape character inside quotes (doubled quotes are always accepted).
    pub escape: Option<u8>,
    /// Field values read as null (the empty field always is, except in text columns).
    pub null_values: Vec<String>,
    /// Whether a quoted field may hold line breaks: `None` (the default) where its
    /// quote closes as a field ends (followed by the delimiter or the line's end), so a
    /// quote that never closes costs its own line only; `Some(true)` always (a quote
    /// that never closes takes the input up to `max_record_bytes`); `Some(false)` never.
    pub newlines_in_values: Option<bool>,
}

impl Default for CsvOptions {
    fn default() -> Self {
        Self {
            header: true,
            delimiter: b',',
            quote: b'"',
            escape: None,
            null_values: Vec::new(),
            newlines_in_values: None,
        }
    }
}

/// Parquet compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// zstd at the given level.
    Zstd(i32),
    /// Snappy.
    Snappy,
    /// LZ4 (raw).
    Lz4,
    /// None.
    None,
}

/// A sink.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkSpec {
    /// Files in a directory.
    File(FileSinkSpec),
    /// Standard output.
    Stdout {
        /// The encoding.
        format: Format,
    },
    /// A PostgreSQL table.
    Postgres(PostgresSinkSpec),
    /// An MQTT topic.
    Mqtt(MqttSinkSpec),
    /// A JetStream subject.
    Nats(crate::nats::NatsSinkSpec),
    /// A Kafka topic.
    Kafka(crate::sinks::kafka::KafkaSinkSpec),
}

impl SinkSpec {
    /// A short description for logs: `parquet:out/clean` or `stdout:ndjson`.
    pub fn describe(&self) -> String {
        match self {
            SinkSpec::File(f) => format!("{}:{}", f.format, f.location()),
            SinkSpec::Stdout { format } => format!("stdout:{format}"),
            SinkSpec::Postgres(p) => format!("postgres:{}", p.table),
            SinkSpec::Mqtt(m) => format!("mqtt:{}", m.topic),
            SinkSpec::Nats(n) => format!("nats:{}", n.subject),
            SinkSpec::Kafka(k) => format!("kafka:{}", k.topic),
        }
    }

    /// Whether the sink loads streams only (not batch runs or requests).
    pub fn streams_only(&self) -> bool {
        match self {
            SinkSpec::File(_) | SinkSpec::Stdout { .. } => false,
            SinkSpec::Postgres(_) | SinkSpec::Mqtt(_) | SinkSpec::Nats(_) | SinkSpec::Kafka(_) => {
                true
            }
        }
    }
}

/// Files written into a directory, atomically.
#[derive(Debug, Clone, PartialEq)]
pub struct FileSinkSpec {
    /// The directory.
    pub path: PathBuf,
    /// The encoding.
    pub format: Format,
    /// Hive-style partition columns (`device_id=d1/part-….parquet`).
    pub partition_by: Vec<String>,
    /// Parquet compression.
    pub compression: Compression,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
    /// CSV header line.
    pub header: bool,
    /// CSV delimiter.
    pub delimiter: u8,
    /// Open partition files at most; the least recently used is finished past it.
    pub max_open_files: usize,
    /// In streams: when a file is finished and the next begins.
    pub rolling: Rolling,
    /// With `path: s3://…`: the bucket the files are uploaded to at commit; `path` is
    /// then the local staging directory.
    pub object: Option<crate::object::ObjectTarget>,
}

impl FileSinkSpec {
    /// Where the files end up, for people: the directory, or the `s3://` URL.
    pub fn location(&self) -> String {
        match &self.object {
            Some(o) => o.url.clone(),
            None => self.path.display().to_string(),
        }
    }
}

/// Where bad records go: NDJSON files in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterSpec {
    /// The directory.
    pub path: PathBuf,
    /// A worker's dead-letter file of a pipeline is rotated past this size.
    pub max_size: u64,
    /// Rotated files kept per pipeline and worker; older ones are removed (counted,
    /// logged as an error). Together with `max_size`, the most disk dead letters take.
    pub max_files: usize,
    /// With `path: s3://…`: the bucket that dead letters are uploaded to (a batch run's
    /// file at commit, a worker's files as they rotate); `path` is then the local
    /// staging directory.
    pub object: Option<crate::object::ObjectTarget>,
}

impl DeadLetterSpec {
    /// Where the dead letters end up, for people: the directory, or the `s3://` URL.
    pub fn location(&self) -> String {
        match &self.object {
            Some(o) => o.url.clone(),
            None => self.path.display().to_string(),
        }
    }

    /// Dead letters in `path` with the default bounds (64 MiB a file, 4 rotated files).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_size: 64 << 20,
            max_files: 4,
            object: None,
        }
    }
}

/// Batch jobs of a pipeline submitted through the gateway (`/v1/jobs`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JobsSpec {
    /// Directories a job's inputs must be under (resolved against the pipeline file's
    /// directory); empty: the pipeline file's directory.
    pub inputs: Vec<PathBuf>,
    /// A run longer than this is stopped and fails; by default three times the job's
    /// expected duration, at least a minute.
    pub timeout: Option<Duration>,
}

/// The pipelines and platform settings of one file.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// Platform settings.
    pub platform: Platform,
    /// Pipelines in file order.
    pub pipelines: Vec<PipelineSpec>,
}

/// Turns the raw file into specs; every problem becomes a diagnostic with its field path.
pub(crate) fn resolve(raw: RawFile, file: &Path, out: &mut Vec<Diagnostic>) -> Spec {
    let d = |field: String, msg: String| Diagnostic::new(file, field, msg);
    let p = raw.platform;
    let defaults = Platform::default();
    let mut platform = Platform {
        memory_limit: p.memory_limit.map_or(defaults.memory_limit, |s| s.0),
        threads: p.threads.unwrap_or(0),
        batch_size: p.batch_size.unwrap_or(defaults.batch_size),
        max_record_bytes: p
            .max_record_bytes
            .map_or(defaults.max_record_bytes, |s| s.0),
        read_chunk: p.read_chunk.map_or(defaults.read_chunk, |s| s.0),
        spill_dir: p.spill_dir,
        progress_interval: p
            .progress_interval
            .map_or(defaults.progress_interval, |s| s.0),
        sql_options: p
            .sql_options
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect(),
        scaling: crate::scaling::resolve(
            &ScalingSpec::default(),
            p.scaling,
            "platform.scaling",
            file,
            out,
        ),
        energy: crate::energy::resolve_energy(p.energy, file, out),
        carbon: crate::energy::resolve_carbon(p.carbon, file, out),
        query: crate::query::resolve_query(p.query, file, out),
        access: crate::access::resolve_access(
            p.access,
            &raw.pipelines.keys().cloned().collect::<Vec<_>>(),
            file,
            out,
        ),
        mesh: crate::mesh::resolve_mesh(p.mesh, file, out),
        broker: crate::broker::resolve_broker(p.broker, file, out),
    };
    if platform.batch_size == 0 {
        out.push(
            d("platform.batch_size".into(), "must be at least 1".into()).with_help("try 65536"),
        );
        platform.batch_size = defaults.batch_size;
    }
    if platform.memory_limit < (16 << 20) {
        out.push(
            d(
                "platform.memory_limit".into(),
                "is below 16MiB, too little for the SQL engine".into(),
            )
            .with_help("give at least 64MiB; the engine spills to disk past the limit"),
        );
    }
    if platform.max_record_bytes < 64 {
        out.push(d(
            "platform.max_record_bytes".into(),
            "must be at least 64 bytes".into(),
        ));
    }
    if platform.read_chunk < platform.max_record_bytes.min(64 << 10) {
        out.push(d(
            "platform.read_chunk".into(),
            "must be at least 64KiB".into(),
        ));
    }

    if raw.pipelines.is_empty() {
        out.push(
            d("pipelines".into(), "the file declares no pipeline".into())
                .with_help("add one under `pipelines:`; see examples/iot.yaml"),
        );
    }
    let pipelines = raw
        .pipelines
        .into_iter()
        .map(|(name, rp)| resolve_pipeline(name, rp, &platform.scaling, file, out))
        .collect();
    Spec {
        platform,
        pipelines,
    }
}

fn resolve_pipeline(
    name: String,
    rp: RawPipeline,
    scaling: &ScalingSpec,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> PipelineSpec {
    let base = format!("pipelines.{name}");
    let d = |field: &str, msg: String| Diagnostic::new(file, format!("{base}.{field}"), msg);
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        out.push(
            Diagnostic::new(
                file,
                base.clone(),
                format!("`{name}` is not a valid pipeline name"),
            )
            .with_help("use letters, digits, `_` and `-`"),
        );
    }
    let source = rp
        .source
        .map(|s| crate::sources::resolve(s, &name, &format!("{base}.source"), file, out))
        .unwrap_or_default();

    let schema = rp.schema.map(|fields| {
        if fields.is_empty() {
            out.push(
                d("schema", "is empty".into())
                    .with_help("list the fields, or remove `schema` to infer it"),
            );
        }
        fields
            .into_iter()
            .map(|(name, f)| FieldSpec {
                name,
                ty: f.ty,
                nullable: f.nullable,
            })
            .collect::<Vec<_>>()
    });

    let transform = match rp.transform {
        Some(sql) if !sql.trim().is_empty() => sql,
        Some(_) => {
            out.push(d("transform", "is empty".into()).with_help(
                "write SQL over the table `input`, or remove the key to pass records through",
            ));
            "SELECT * FROM input".into()
        }
        None => "SELECT * FROM input".into(),
    };

    if rp.sinks.is_empty() {
        out.push(
            d("sinks", "the pipeline has no sink".into())
                .with_help("add one, for example `sinks: [{ type: parquet, path: out/clean }]`"),
        );
    }
    let sinks = rp
        .sinks
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| crate::sinks::resolve(s, &format!("{base}.sinks[{i}]"), file, out))
        .collect();

    let dead_letter = rp.dead_letter.map(|dl| {
        let def = DeadLetterSpec::new(&dl.path);
        let max_size = dl.max_size.map_or(def.max_size, |s| s.0);
        if max_size < 4096 {
            out.push(
                d(
                    "dead_letter.max_size",
                    format!("{max_size} bytes is too small"),
                )
                .with_help("give at least 4KiB, for example 64MiB"),
            );
        }
        let (path, object) = if crate::object::is_object_url(&dl.path) {
            let url = dl.path.to_string_lossy().into_owned();
            match crate::object::parse_url(&url, dl.s3.unwrap_or_default()) {
                Ok(t) => (crate::object::staging_dir(&t), Some(t)),
                Err(message) => {
                    out.push(d("dead_letter.path", message));
                    (dl.path, None)
                }
            }
        } else {
            if dl.s3.is_some() {
                out.push(
                    d(
                        "dead_letter.s3",
                        "is only for a path in object storage".into(),
                    )
                    .with_help("remove it, or write `path: s3://bucket/prefix`"),
                );
            }
            (dl.path, None)
        };
        DeadLetterSpec {
            path,
            max_size: max_size.max(4096),
            max_files: dl.max_files.unwrap_or(def.max_files),
            object,
        }
    });
    let jobs = rp.jobs.map_or_else(JobsSpec::default, |j| JobsSpec {
        inputs: j.inputs.unwrap_or_default(),
        timeout: j.timeout.map(|t| t.0),
    });
    let on_error = match (rp.on_error, &dead_letter) {
        (Some(OnError::DeadLetter), None) => {
            out.push(
                d("on_error", "is dead_letter, but the pipeline has no dead_letter sink".into())
                    .with_help("add `dead_letter: { type: ndjson, path: out/dead_letter }`, or set `on_error: fail`"),
            );
            OnError::Fail
        }
        (Some(policy), _) => policy,
        (None, Some(_)) => OnError::DeadLetter,
        (None, None) => OnError::Fail,
    };

    let window = rp.window.map(|w| {
        crate::stream::resolve_window(w, schema.as_deref(), &format!("{base}.window"), file, out)
    });
    let scaling =
        crate::scaling::resolve(scaling, rp.scaling, &format!("{base}.scaling"), file, out);
    let spec = PipelineSpec {
        name,
        description: rp.description,
        source,
        schema,
        transform,
        sinks,
        dead_letter,
        on_error,
        scaling,
        dedup: rp.dedup.unwrap_or_default(),
        window,
        jobs,
    };
    check_stream(&spec, &base, file, out);
    spec
}

/// An exactly-once Kafka sink commits the source's offsets in its transactions: the
/// source must be Kafka, the sink the only one, the rows not windowed, the worker one.
fn check_exactly_once(
    p: &PipelineSpec,
    kafka_source: bool,
    base: &str,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) {
    let Some(i) = p
        .sinks
        .iter()
        .position(|s| matches!(s, SinkSpec::Kafka(k) if k.exactly_once))
    else {
        return;
    };
    let d = |msg: String, help: &str| {
        Diagnostic::new(file, format!("{base}.sinks[{i}].exactly_once"), msg).with_help(help)
    };
    if !kafka_source {
        out.push(d(
            "needs a Kafka source: its consumer offsets are committed in the sink's transactions".into(),
            "read a Kafka topic (`source: { type: kafka, … }`), or leave exactly_once out: the sink is at least once, and a PostgreSQL sink with `dedup` loads each key once",
        ));
    }
    if p.sinks.len() > 1 {
        out.push(d(
            format!("is set, but the pipeline has {} sinks", p.sinks.len()),
            "a transaction holds one Kafka sink's records and the source's offsets: keep that one sink here and load the others from a second pipeline on the same topic",
        ));
    }
    if p.window.is_some() {
        out.push(d(
            "is set on a windowed pipeline".into(),
            "windowed rows are at least once: load them into PostgreSQL (a window's row is kept once), or leave exactly_once out",
        ));
    }
    if p.scaling.max_replicas > 1 {
        out.push(d(
            format!(
                "is set, but the pipeline may run on {} workers (scaling.max_replicas)",
                p.scaling.max_replicas
            ),
            "set `scaling: { max_replicas: 1 }`: one worker owns every partition, and a worker that restarts fences the transaction its predecessor left open",
        ));
    }
}

/// Checks that only make sense once the whole pipeline is known: streams need a
/// schema and a worker, windows one worker (or Kafka's partitions), dedup columns
/// must exist.
fn check_stream(p: &PipelineSpec, base: &str, file: &Path, out: &mut Vec<Diagnostic>) {
    let d = |field: &str, msg: String| Diagnostic::new(file, format!("{base}.{field}"), msg);
    let source = p.stream_source();
    let topic_cols: Vec<&str> = source
        .map(|m| m.columns().iter().map(|(_, c)| c.as_str()).collect())
        .unwrap_or_default();
    let known = |c: &str| {
        topic_cols.contains(&c)
            || p.schema
                .as_ref()
                .is_none_or(|s| s.iter().any(|f| f.name == c))
    };
    for (i, c) in p.dedup.iter().enumerate() {
        if !known(c) {
            out.push(
                d(
                    &format!("dedup[{i}]"),
                    format!("`{c}` is not a column of the input"),
                )
                .with_help("name columns of the schema (or of the topic)"),
            );
        }
    }
    if p.window.is_some() && source.is_none() {
        out.push(
            d("window", "windows need a stream source".into()).with_help(
                "use a stream source (`type: mqtt` or `type: nats`), or GROUP BY a time bucket in batch SQL",
            ),
        );
    }
    // Kafka's partitions are the key partitions: each worker windows the partitions it
    // owns. MQTT and JetStream have none: every record of a key must reach one worker.
    let partitioned = matches!(source, Some(crate::StreamSource::Kafka(_)));
    if p.window.is_some() && p.scaling.max_replicas > 1 && !partitioned {
        out.push(
            d(
                "scaling.max_replicas",
                format!(
                    "is {}, but a windowed pipeline on {} runs on one worker",
                    p.scaling.max_replicas,
                    source.map_or("this source", |s| s.kind())
                ),
            )
            .with_help(
                "set `scaling: { max_replicas: 1 }` (a window must see every record of its key), or re-publish the stream into a Kafka topic keyed by what the window groups by and window that topic: its partitions spread the keys over workers",
            ),
        );
    }
    check_exactly_once(p, partitioned, base, file, out);
    let Some(source) = source else {
        for (i, s) in p.sinks.iter().enumerate() {
            if s.streams_only() {
                out.push(
                    d(
                        &format!("sinks[{i}]"),
                        format!("`{}` sinks load streams", s.describe()),
                    )
                    .with_help("use it in a pipeline with a stream source (mqtt, nats)"),
                );
            }
        }
        return;
    };
    let kind = source.kind();
    match &p.schema {
        None => out.push(
            d("schema", format!("is required for a {kind} source"))
                .with_help("declare the fields of the payload: a stream cannot be sampled first"),
        ),
        Some(schema) => {
            for c in &topic_cols {
                if let Some(f) = schema.iter().find(|f| f.name == *c)
                    && f.ty != crate::types::FieldType::Utf8
                {
                    out.push(
                        d(
                            &format!("source.{}", source.address_field()),
                            format!(
                                "{0} column `{c}` is declared {1}, but {0} levels are text",
                                source.address_field(),
                                f.ty
                            ),
                        )
                        .with_help(format!("declare `{c}: utf8`, or cast it in the SQL")),
                    );
                }
            }
        }
    }
    if p.dead_letter.is_none() {
        out.push(
            d("dead_letter", "is required for a stream".into())
                .with_help("add `dead_letter: { type: ndjson, path: out/dead_letter }`: a bad message must not stop the stream nor vanish"),
        );
    }
    if p.scaling.min_replicas == 0 {
        out.push(
            d(
                "scaling.min_replicas",
                "is 0, but a stream needs a worker subscribed".into(),
            )
            .with_help("set min_replicas: 1; the broker holds messages only for sessions it knows"),
        );
    }
    if p.sinks.iter().any(|s| matches!(s, SinkSpec::Stdout { .. })) {
        out.push(
            d("sinks", "stdout is not a stream sink".into())
                .with_help("use a file, postgres, mqtt, nats or kafka sink"),
        );
    }
}

pub(crate) fn single_byte(
    value: &str,
    field: String,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> Option<u8> {
    let v = match value {
        "\\t" | "tab" => "\t",
        other => other,
    };
    if v.len() == 1 && v.is_ascii() {
        Some(v.as_bytes()[0])
    } else {
        out.push(
            Diagnostic::new(
                file,
                field,
                format!("`{value}` is not a single ASCII character"),
            )
            .with_help("write one character, such as \",\", \";\" or \"\\t\""),
        );
        None
    }
}

pub(crate) fn resolve_csv(
    c: RawCsv,
    base: &str,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> CsvOptions {
    let def = CsvOptions::default();
    CsvOptions {
        header: c.header.unwrap_or(def.header),
        delimiter: c
            .delimiter
            .and_then(|v| single_byte(&v, format!("{base}.delimiter"), file, out))
            .unwrap_or(def.delimiter),
        quote: c
            .quote
            .and_then(|v| single_byte(&v, format!("{base}.quote"), file, out))
            .unwrap_or(def.quote),
        escape: c
            .escape
            .and_then(|v| single_byte(&v, format!("{base}.escape"), file, out)),
        null_values: c.null.unwrap_or_default(),
        newlines_in_values: c.newlines_in_values,
    }
}

pub(crate) fn parse_compression(v: &str) -> Option<Compression> {
    let v = v.to_ascii_lowercase();
    if let Some(level) = v.strip_prefix("zstd") {
        let level = level
            .trim_start_matches([':', '(', '-'])
            .trim_end_matches(')');
        return if level.is_empty() {
            Some(Compression::Zstd(1))
        } else {
            level
                .parse()
                .ok()
                .filter(|l| (1..=22).contains(l))
                .map(Compression::Zstd)
        };
    }
    match v.as_str() {
        "snappy" => Some(Compression::Snappy),
        "lz4" => Some(Compression::Lz4),
        "none" | "uncompressed" => Some(Compression::None),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_names() {
        assert_eq!(parse_compression("zstd"), Some(Compression::Zstd(1)));
        assert_eq!(parse_compression("zstd(9)"), Some(Compression::Zstd(9)));
        assert_eq!(parse_compression("snappy"), Some(Compression::Snappy));
        assert_eq!(parse_compression("zstd(99)"), None);
        assert_eq!(parse_compression("gzip"), None);
    }
}
