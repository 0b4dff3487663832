//! The test file, as written: `tests:`, each with a pipeline, an input and what to
//! expect of it.
//!
//! ```yaml
//! tests:
//!   - name: Fahrenheit, and text in a number dead-lettered
//!     pipeline: clean_readings
//!     input:
//!       format: csv
//!       text: |
//!         device_id,ts,temperature_c
//!         d1,2024-01-01T00:00:00Z,20
//!         d2,2024-01-01T00:00:01Z,warm
//!     expect:
//!       rows: [{ device_id: d1, temperature_f: 68.0 }]
//!       dead_letters: [{ line: 3, stage: cast, field: temperature_c }]
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use etlmesh_config::Format;
use serde::Deserialize;

/// A file of tests.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    /// The tests, run in order.
    pub tests: Vec<TestCase>,
}

/// One test: an input through one pipeline, and what must come out.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    /// Said in the report.
    pub name: String,
    /// The pipeline of the pipeline file that runs it.
    pub pipeline: String,
    /// What goes in.
    pub input: TestInput,
    /// What must come out; nothing said, nothing checked.
    #[serde(default)]
    pub expect: Expect,
}

/// What goes in: records of a batch pipeline (`text`, `file` or `records`), or messages
/// of a stream pipeline (`messages`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestInput {
    /// The records' format; by default the pipeline's, the file's extension, or NDJSON
    /// for `records`.
    pub format: Option<Format>,
    /// Records as text (CSV with its header, NDJSON lines, …).
    pub text: Option<String>,
    /// A file of records, relative to the test file.
    pub file: Option<PathBuf>,
    /// Records as objects (NDJSON).
    pub records: Option<Vec<serde_json::Value>>,
    /// A stream's messages, in order of arrival.
    pub messages: Option<Vec<TestMessage>>,
}

/// A message of a stream pipeline.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestMessage {
    /// MQTT topic or JetStream subject (the source's topic columns read it); a Kafka
    /// record's topic.
    pub topic: Option<String>,
    /// The payload: an object (or array) sent as JSON, or text sent as it is.
    pub payload: serde_json::Value,
    /// Kafka: the record key.
    pub key: Option<String>,
    /// Kafka and JetStream: headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Kafka: the partition.
    pub partition: Option<i32>,
    /// Kafka: the offset.
    pub offset: Option<i64>,
    /// Kafka: the record timestamp, epoch milliseconds.
    pub timestamp: Option<i64>,
}

/// What must come out.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Exactly these rows (each compared on the columns it names), in any order
    /// unless `ordered`.
    pub rows: Option<Vec<serde_json::Map<String, serde_json::Value>>>,
    /// `rows` in this order.
    #[serde(default)]
    pub ordered: bool,
    /// How many rows.
    pub row_count: Option<usize>,
    /// SQL conditions every row must meet (`temperature_f BETWEEN -40 AND 200`).
    #[serde(default)]
    pub conditions: Vec<String>,
    /// Exactly these dead letters, in any order (`[]`: none).
    pub dead_letters: Option<Vec<ExpectedLetter>>,
}

/// A dead letter that must be written; each field said must match.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedLetter {
    /// The record's line in the input (batch pipelines), or in its message.
    pub line: Option<u64>,
    /// Stream pipelines: the message (1-based, in order of `messages`).
    pub message: Option<usize>,
    /// `decode`, `cast`, `transform`, `limit`, `late`, `future`.
    pub stage: Option<String>,
    /// The field at fault.
    pub field: Option<String>,
    /// Words the reason contains.
    pub reason: Option<String>,
}
