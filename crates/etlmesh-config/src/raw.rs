//! The pipeline file exactly as written: serde types, every struct closed to unknown keys.
//! [`crate::spec`] turns these into checked, typed specifications.

use std::fmt;
use std::path::PathBuf;

use indexmap::IndexMap;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::types::FieldType;
use crate::units::{ByteSize, ScalarText, Span};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    #[serde(default)]
    pub platform: RawPlatform,
    #[serde(default)]
    pub pipelines: IndexMap<String, RawPipeline>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPlatform {
    pub memory_limit: Option<ByteSize>,
    pub threads: Option<usize>,
    pub batch_size: Option<usize>,
    pub max_record_bytes: Option<ByteSize>,
    pub read_chunk: Option<ByteSize>,
    pub spill_dir: Option<PathBuf>,
    pub progress_interval: Option<Span>,
    pub sql_options: Option<IndexMap<String, ScalarText>>,
    pub scaling: Option<RawScaling>,
    pub energy: Option<crate::energy::RawEnergy>,
    pub carbon: Option<crate::energy::RawCarbon>,
    pub query: Option<crate::query::RawQuery>,
    pub access: Option<crate::access::RawAccess>,
    pub mesh: Option<crate::mesh::RawMesh>,
    pub broker: Option<crate::broker::RawBroker>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScaling {
    pub min_replicas: Option<u32>,
    pub max_replicas: Option<u32>,
    pub target_in_flight: Option<f64>,
    pub target_cpu_percent: Option<f64>,
    pub target_lag: Option<u64>,
    pub target_drain: Option<Span>,
    pub scale_down_window: Option<Span>,
    pub idle_before_zero: Option<Span>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPipeline {
    pub description: Option<String>,
    pub source: Option<crate::sources::RawSource>,
    pub schema: Option<IndexMap<String, RawField>>,
    pub transform: Option<String>,
    #[serde(default)]
    pub sinks: Vec<crate::sinks::RawSink>,
    pub dead_letter: Option<RawDeadLetter>,
    pub on_error: Option<OnError>,
    pub scaling: Option<RawScaling>,
    pub dedup: Option<Vec<String>>,
    pub window: Option<RawWindow>,
    pub jobs: Option<RawJobs>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWindow {
    pub time: String,
    pub size: Span,
    pub slide: Option<Span>,
    pub allowed_lateness: Option<Span>,
    pub idle_timeout: Option<Span>,
    pub max_future: Option<Span>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMicroBatch {
    pub records: Option<usize>,
    pub wait: Option<Span>,
}

/// What a pipeline does with a record it cannot decode, cast or transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    /// Send the record to the dead-letter sink with the reason, and go on.
    DeadLetter,
    /// Stop the run at the first bad record, exit non-zero, leave no output.
    Fail,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCsv {
    pub header: Option<bool>,
    pub delimiter: Option<String>,
    pub quote: Option<String>,
    pub escape: Option<String>,
    pub null: Option<Vec<String>>,
    pub newlines_in_values: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawDeadLetterKind {
    Ndjson,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDeadLetter {
    #[serde(rename = "type")]
    #[allow(dead_code)]
    // one kind for now; the key is kept so that files stay forward-compatible
    pub kind: RawDeadLetterKind,
    pub path: PathBuf,
    pub max_size: Option<ByteSize>,
    pub max_files: Option<usize>,
    pub s3: Option<crate::object::S3Options>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawJobs {
    pub inputs: Option<Vec<PathBuf>>,
    pub timeout: Option<Span>,
}

/// A schema field: `float64`, or `{ type: float64, nullable: false }`.
#[derive(Debug)]
pub(crate) struct RawField {
    pub ty: FieldType,
    pub nullable: bool,
}

struct FieldVisitor;

fn field_type<E: de::Error>(name: &str) -> Result<FieldType, E> {
    FieldType::from_name(name).ok_or_else(|| {
        let hint = crate::diag::suggest(name, FieldType::NAMES.iter().copied())
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        E::custom(format!(
            "unknown type `{name}`{hint}; use one of {}",
            FieldType::NAMES.join(", ")
        ))
    })
}

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = RawField;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a type name such as float64, or { type: float64, nullable: false }")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawField, E> {
        Ok(RawField {
            ty: field_type(v)?,
            nullable: true,
        })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawField, A::Error> {
        let mut ty = None;
        let mut nullable = true;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "type" => ty = Some(field_type(&map.next_value::<String>()?)?),
                "nullable" => nullable = map.next_value()?,
                other => return Err(de::Error::unknown_field(other, &["type", "nullable"])),
            }
        }
        let ty = ty.ok_or_else(|| de::Error::missing_field("type"))?;
        Ok(RawField { ty, nullable })
    }
}

impl<'de> Deserialize<'de> for RawField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}
