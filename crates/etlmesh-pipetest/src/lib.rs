//! Pipeline unit tests: `etlmesh test`, as `vector test` and `rpk connect test` are
//! for their pipelines.
//!
//! A test file (YAML, beside the pipeline file: `iot.yaml` → `iot.tests.yaml`) holds
//! tests, each an input through one pipeline and what must come out of it: rows,
//! their count, SQL conditions on every row, and the dead letters with their stage,
//! field and reason ([`spec`]). A test runs the pipeline as a worker does — decode with
//! the declared schema, the SQL, and for a windowed stream the windows, by event time
//! ([`execute`]) — without a server or a sink, and its report lists every difference
//! ([`expect`]). `etlmesh validate` checks a file without running anything; this runs
//! the pipelines on records.
//!
//! Stream pipelines take `messages` (topic, payload, and Kafka's key, headers,
//! partition, offset and timestamp), one micro-batch each; the end of the input closes
//! every window still open.

mod execute;
mod expect;
pub mod spec;

use std::path::{Path, PathBuf};

use etlmesh_codec::Limits;
use etlmesh_config::PipelineFile;
use etlmesh_engine::{Engine, EngineConfig};

pub use expect::describe_letter;
pub use spec::TestFile;

/// Why a test could not run (a test that ran and differed is a [`CaseReport`]).
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// The test file cannot be read or is not a test file.
    #[error("{0}")]
    File(String),
    /// The test's input.
    #[error("{0}")]
    Input(String),
    /// The pipeline (its SQL, its schema).
    #[error("{0}")]
    Pipeline(String),
}

/// One test, run.
#[derive(Debug)]
pub struct CaseReport {
    /// Its name.
    pub name: String,
    /// The pipeline it ran.
    pub pipeline: String,
    /// The differences (none: passed), or why it could not run.
    pub result: Result<Vec<String>, TestError>,
}

impl CaseReport {
    /// Whether it passed.
    pub fn passed(&self) -> bool {
        self.result.as_ref().is_ok_and(Vec::is_empty)
    }
}

/// The test file beside a pipeline file: `iot.yaml` → `iot.tests.yaml`.
pub fn beside(config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map_or_else(|| "pipelines".into(), |s| s.to_string_lossy().into_owned());
    config.with_file_name(format!("{stem}.tests.yaml"))
}

/// Reads a test file.
pub fn load(path: &Path) -> Result<TestFile, TestError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| TestError::File(format!("cannot read the tests {}: {e}", path.display())))?;
    serde_saphyr::from_str(&text).map_err(|e| {
        TestError::File(format!(
            "{}: {e}\n  help: a test file is `tests: [{{ name, pipeline, input: {{ text | file | records | messages }}, expect: {{ rows, row_count, conditions, dead_letters }} }}]`",
            path.display()
        ))
    })
}

/// Runs every test of the file at `tests` against the pipelines of `file`.
pub async fn run(file: &PipelineFile, tests: &Path) -> Result<Vec<CaseReport>, TestError> {
    let cases = load(tests)?;
    let platform = &file.spec.platform;
    let engine = Engine::new(EngineConfig::for_platform(platform, 1))
        .map_err(|e| TestError::Pipeline(e.to_string()))?;
    let limits = Limits {
        batch_size: platform.batch_size,
        max_record_bytes: platform.max_record_bytes,
    };
    let base = tests.parent().unwrap_or(Path::new("."));
    let mut reports = Vec::with_capacity(cases.tests.len());
    for case in &cases.tests {
        let result = match file.pipeline(&case.pipeline) {
            Err(e) => Err(TestError::Input(e.to_string())),
            Ok(spec) => match execute::run(spec, &engine, limits, case, base).await {
                Ok(out) => expect::check(&case.expect, &out, &engine).await,
                Err(e) => Err(e),
            },
        };
        reports.push(CaseReport {
            name: case.name.clone(),
            pipeline: case.pipeline.clone(),
            result,
        });
    }
    Ok(reports)
}
