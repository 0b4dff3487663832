//! Pipeline files: the YAML that declares etlmesh's pipelines and platform settings.
//!
//! Loading goes in three steps:
//! 1. [`raw`] deserializes the YAML into structs that reject unknown keys;
//! 2. [`spec`] checks the values and builds typed specifications ([`Spec`]);
//! 3. [`index`] keeps a map from field paths to lines, so that checks made later (the
//!    SQL planned by the engine, a sink's directory) still name the line of a mistake.
//!
//! Every problem is a [`Diagnostic`] naming the file, line, column and field, with a
//! hint on how to fix it; [`PipelineFile::load`] returns all of them at once.

pub mod access;
pub mod broker;
pub mod diag;
pub mod energy;
pub mod index;
pub mod kafka;
pub mod mesh;
pub mod nats;
pub mod object;
pub mod query;
mod raw;
pub mod scaling;
mod sinks;
mod sources;
pub mod spec;
pub mod stream;
pub mod types;
pub mod units;

use std::path::{Path, PathBuf};

pub use access::{AccessSpec, TlsSpec, TokenSpec};
pub use broker::{BrokerSpec, BrokerUser};
pub use diag::{ConfigError, Diagnostic};
pub use energy::{CarbonSpec, EnergySource, EnergySpec};
pub use kafka::{KafkaSourceSpec, RecordField};
pub use mesh::MeshSpec;
pub use nats::{NatsSinkSpec, NatsSourceSpec};
pub use object::{ObjectTarget, S3Options};
pub use query::QuerySpec;
pub use raw::OnError;
pub use scaling::ScalingSpec;
pub use sinks::kafka::KafkaSinkSpec;
pub use spec::{
    Compression, CsvOptions, DeadLetterSpec, FileSinkSpec, JobsSpec, PipelineSpec, Platform,
    SinkSpec, SourceKind, SourceSpec, Spec,
};
pub use stream::{
    MicroBatch, MqttProtocol, MqttSinkSpec, MqttSourceSpec, PostgresSinkSpec, Rolling,
    StreamSource, StreamSourceKind, WindowSpec,
};
pub use types::{FieldSpec, FieldType, Format};

/// A loaded, checked pipeline file.
#[derive(Debug, Clone)]
pub struct PipelineFile {
    /// Where it was read from (or the label given to [`PipelineFile::parse`]).
    pub path: PathBuf,
    /// Its text.
    pub text: String,
    /// Field path → line.
    pub index: index::PositionIndex,
    /// The checked specification.
    pub spec: Spec,
}

impl PipelineFile {
    /// Reads and checks a file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::one(
                Diagnostic::new(path, "", format!("cannot read the pipeline file: {e}"))
                    .with_help("check the path given with -c/--config"),
            )
        })?;
        Self::parse(path, text)
    }

    /// Checks a file's text; `path` labels the diagnostics.
    pub fn parse(path: impl Into<PathBuf>, text: impl Into<String>) -> Result<Self, ConfigError> {
        let path = path.into();
        let text = text.into();
        let index = index::PositionIndex::build(&text);
        let raw: raw::RawFile = serde_saphyr::from_str_with_options(&text, yaml_options())
            .map_err(|e| {
                ConfigError::one(place_unknown_key(
                    yaml_error(&path, &text, &e, &index),
                    &index,
                ))
            })?;
        let mut diags: Vec<Diagnostic> = index
            .duplicates()
            .iter()
            .map(|(field, pos)| {
                Diagnostic::new(&path, field.clone(), "is given twice")
                    .at(pos.line, pos.column)
                    .with_help("keep one; YAML would silently use the last")
            })
            .collect();
        let spec = spec::resolve(raw, &path, &mut diags);
        let file = Self {
            path,
            text,
            index,
            spec,
        };
        if diags.is_empty() {
            Ok(file)
        } else {
            Err(file.located(diags))
        }
    }

    /// The pipeline called `name`.
    pub fn pipeline(&self, name: &str) -> Result<&PipelineSpec, ConfigError> {
        self.spec
            .pipelines
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self
                    .spec
                    .pipelines
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect();
                let hint = match diag::suggest(name, names.iter().copied()) {
                    Some(s) => format!(
                        "did you mean `{s}`? The file declares: {}",
                        names.join(", ")
                    ),
                    None => format!("the file declares: {}", names.join(", ")),
                };
                ConfigError::one(
                    Diagnostic::new(
                        &self.path,
                        "pipelines",
                        format!("no pipeline named `{name}`"),
                    )
                    .with_help(hint),
                )
            })
    }

    /// A diagnostic about `field`, placed at its line.
    pub fn diagnostic(&self, field: impl Into<String>, message: impl Into<String>) -> Diagnostic {
        let mut d = Diagnostic::new(&self.path, field, message);
        self.place(&mut d);
        d
    }

    /// Fills in the line and column of diagnostics that have none.
    pub fn located(&self, mut diags: Vec<Diagnostic>) -> ConfigError {
        for d in &mut diags {
            self.place(d);
        }
        diags.sort_by_key(|d| d.line.unwrap_or(0));
        ConfigError { diagnostics: diags }
    }

    fn place(&self, d: &mut Diagnostic) {
        if d.line.is_none()
            && let Some(pos) = self.index.locate(&d.field)
        {
            d.line = Some(pos.line);
            d.column = Some(pos.column);
        }
    }

    /// Maps a 1-based (line, column) inside pipeline `name`'s transform SQL to the
    /// file's line and column, and returns the file line's text for a snippet.
    pub fn sql_position(
        &self,
        name: &str,
        sql_line: usize,
        sql_col: usize,
    ) -> Option<(usize, usize, &str)> {
        let pipeline = self.spec.pipelines.iter().find(|p| p.name == name)?;
        let key = self.index.locate(&format!("pipelines.{name}.transform"))?;
        let file_lines: Vec<&str> = self.text.lines().collect();
        let sql_lines: Vec<&str> = pipeline.transform.lines().collect();
        let first = sql_lines.iter().position(|l| !l.trim().is_empty())?;
        let first_text = sql_lines[first].trim();
        // The first file line at or after the key that holds the SQL's first line.
        let start = (key.line.saturating_sub(1)..file_lines.len())
            .find(|&i| file_lines[i].contains(first_text))?;
        let target = start + sql_line.checked_sub(1 + first)?;
        let text = *file_lines.get(target)?;
        let sql_text = sql_lines.get(sql_line - 1)?.trim_end();
        let offset = if sql_text.trim().is_empty() {
            0
        } else {
            text.find(sql_text.trim_start())?
        };
        let lead = sql_text.len() - sql_text.trim_start().len();
        let col = offset + sql_col.saturating_sub(lead);
        Some((target + 1, col.max(1), text))
    }
}

/// An unknown key inside a map picked by `type:` (a source, a sink): serde reads such a
/// map buffered and places the map's start, so the key is placed from the file's index
/// (`sinks[1].partiton_by` at its own line and column).
fn place_unknown_key(mut d: Diagnostic, index: &index::PositionIndex) -> Diagnostic {
    if d.message.starts_with("unknown key `")
        && let Some(pos) = index.exact(&d.field)
    {
        d.line = Some(pos.line);
        d.column = Some(pos.column);
    }
    d
}

/// The plain scalar that starts at `line`, `column` (1-based), up to a flow delimiter.
fn scalar_at(text: &str, line: usize, column: usize) -> Option<&str> {
    let l = text.lines().nth(line.checked_sub(1)?)?;
    let start = l.char_indices().nth(column.checked_sub(1)?)?.0;
    let rest = &l[start..];
    let end = rest.find([',', '}', ']', '#']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

/// How pipeline files are read: YAML 1.2 booleans only (`yes` is a string, as in
/// serde_yaml before), duplicate keys left to the index (which names both places),
/// no source snippet in messages (diagnostics carry the line and column).
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::LastWins,
        with_snippet: false,
    }
}

/// A YAML error as a diagnostic: the field is found in the index from the error's
/// location, and an unknown key or value gets a "did you mean".
fn yaml_error(
    path: &Path,
    text: &str,
    e: &serde_saphyr::Error,
    index: &index::PositionIndex,
) -> Diagnostic {
    use serde_saphyr::Error as E;
    let e = e.without_snippet();
    let (mut line, mut column) = match e.location() {
        Some(loc) if loc.line() > 0 => (Some(loc.line() as usize), Some(loc.column() as usize)),
        _ => (None, None),
    };
    let field = match (line, column) {
        (Some(l), Some(c)) => index.path_at(l, c).unwrap_or_default().to_string(),
        _ => String::new(),
    };
    let unknown = |bad: &str, expected: &[&str]| match diag::suggest(bad, expected.iter().copied())
    {
        Some(s) => format!("did you mean `{s}`?"),
        None => format!("expected one of: {}", expected.join(", ")),
    };
    let (field, message, help) = match e {
        E::SerdeUnknownField {
            field: bad,
            expected,
            ..
        } => {
            // The location is the unknown key itself when the index has it.
            let field = if field.ends_with(bad.as_str()) {
                field
            } else if field.is_empty() {
                bad.clone()
            } else {
                format!("{field}.{bad}")
            };
            (
                field,
                format!("unknown key `{bad}`"),
                Some(unknown(bad, expected)),
            )
        }
        E::SerdeUnknownVariant {
            variant, expected, ..
        } => (
            field,
            format!(
                "unknown value `{variant}`; expected one of: {}",
                expected.join(", ")
            ),
            Some(unknown(variant, expected)),
        ),
        E::SerdeMissingField { field: missing, .. } => {
            // Placed at the map's first key: name the map, at its own line.
            let map = match index.exact(&field) {
                Some(p) if Some(p.line) == line && Some(p.column) == column => {
                    field.rfind(['.', '[']).map_or("", |cut| &field[..cut])
                }
                _ => field.as_str(),
            };
            if let Some(p) = index.exact(map) {
                (line, column) = (Some(p.line), Some(p.column));
            }
            (
                map.to_string(),
                format!("missing key `{missing}`"),
                Some(format!("add `{missing}:` here")),
            )
        }
        E::InvalidScalar { ty, .. } => {
            let value = line
                .zip(column)
                .and_then(|(l, c)| scalar_at(text, l, c))
                .unwrap_or_default();
            let want = match *ty {
                "bool" => "true or false",
                "f32" | "f64" => "a number",
                t if t.starts_with('u') => "a whole number, 0 or more",
                t if t.starts_with('i') => "a whole number",
                t => t,
            };
            (field, format!("`{value}` is not {want}"), None)
        }
        E::SerdeInvalidType {
            unexpected,
            expected,
            ..
        }
        | E::SerdeInvalidValue {
            unexpected,
            expected,
            ..
        } => (
            field,
            format!("invalid value: {unexpected}, expected {expected}"),
            None,
        ),
        other => {
            let mut msg = other.to_string();
            if let Some(cut) = msg.rfind(" at line ") {
                msg.truncate(cut);
            }
            (field, msg, None)
        }
    };
    let mut d = Diagnostic::new(path, field, message);
    if let (Some(l), Some(c)) = (line, column) {
        d = d.at(l, c);
    }
    if let Some(h) = help {
        d = d.with_help(h);
    }
    d
}

#[cfg(test)]
mod tests;
