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
pub mod diag;
pub mod energy;
pub mod index;
pub mod mesh;
pub mod nats;
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
pub use diag::{ConfigError, Diagnostic};
pub use energy::{CarbonSpec, EnergySource, EnergySpec};
pub use mesh::MeshSpec;
pub use nats::{NatsSinkSpec, NatsSourceSpec};
pub use query::QuerySpec;
pub use raw::OnError;
pub use scaling::ScalingSpec;
pub use spec::{
    Compression, CsvOptions, DeadLetterSpec, FileSinkSpec, JobsSpec, PipelineSpec, Platform,
    SinkSpec, SourceKind, SourceSpec, Spec,
};
pub use stream::{
    MicroBatch, MqttProtocol, MqttSinkSpec, MqttSourceSpec, PostgresSinkSpec, Rolling,
    StreamSource, WindowSpec,
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
        let raw: raw::RawFile = serde_yaml::from_str(&text)
            .map_err(|e| ConfigError::one(in_list(yaml_error(&path, &e), &index)))?;
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

/// An unknown key inside a map picked by `type:` (a source, a sink): serde places the
/// map's start, and inside a list names only the list, so the key is looked up in the
/// file's index to name and place it exactly (`source.topik`, `sinks[1].partiton_by`).
fn in_list(mut d: Diagnostic, index: &index::PositionIndex) -> Diagnostic {
    let Some(bad) = d
        .message
        .strip_prefix("unknown key `")
        .and_then(|m| m.strip_suffix('`'))
        .map(str::to_string)
    else {
        return d;
    };
    if index.exact(&d.field).is_some() {
        return d;
    }
    // A map picked by `type:` at a key (the source): serde names the map's parent and
    // places the map's key; the unknown key is under the path that starts there.
    if let (Some(line), Some(column)) = (d.line, d.column) {
        let found = index.paths_at(line, column).into_iter().find_map(|p| {
            let field = format!("{p}.{bad}");
            index.exact(&field).map(|pos| (field, pos))
        });
        if let Some((field, pos)) = found {
            d.field = field;
            d.line = Some(pos.line);
            d.column = Some(pos.column);
            return d;
        }
    }
    let Some(list) = d.field.strip_suffix(&format!(".{bad}")).map(str::to_string) else {
        return d;
    };
    // The first element with the key is the one serde stopped at: those before it
    // were read without error.
    for i in 0..1024 {
        let element = format!("{list}[{i}]");
        if index.exact(&element).is_none() {
            break;
        }
        let field = format!("{element}.{bad}");
        if let Some(pos) = index.exact(&field) {
            d.field = field;
            d.line = Some(pos.line);
            d.column = Some(pos.column);
            break;
        }
    }
    d
}

/// A serde_yaml error as a diagnostic, with a "did you mean" for unknown keys.
fn yaml_error(path: &Path, e: &serde_yaml::Error) -> Diagnostic {
    let mut msg = e.to_string();
    if let Some(cut) = msg.rfind(" at line ") {
        msg.truncate(cut);
    }
    // serde_yaml prefixes the field path: "pipelines.a.sinks[0]: unknown field ..."
    let (mut field, mut message) = match msg.split_once(": ") {
        Some((p, m)) if !p.contains(' ') => (p.to_string(), m.to_string()),
        _ => (String::new(), msg.clone()),
    };
    let mut help = None;
    if message.starts_with("unknown field") || message.starts_with("unknown variant") {
        let ticked: Vec<&str> = message.split('`').skip(1).step_by(2).collect();
        if let Some((bad, expected)) = ticked.split_first() {
            if message.starts_with("unknown field") {
                field = if field.is_empty() {
                    bad.to_string()
                } else {
                    format!("{field}.{bad}")
                };
            }
            help = Some(match diag::suggest(bad, expected.iter().copied()) {
                Some(s) => format!("did you mean `{s}`?"),
                None => format!("expected one of: {}", expected.join(", ")),
            });
            message = if message.starts_with("unknown field") {
                format!("unknown key `{bad}`")
            } else {
                format!(
                    "unknown value `{bad}`; expected one of: {}",
                    expected.join(", ")
                )
            };
        }
    }
    let mut d = Diagnostic::new(path, field, message);
    if let Some(loc) = e.location() {
        d = d.at(loc.line(), loc.column());
    }
    if let Some(h) = help {
        d = d.with_help(h);
    }
    d
}

#[cfg(test)]
mod tests;
