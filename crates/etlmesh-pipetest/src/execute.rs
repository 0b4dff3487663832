//! A test's input through its pipeline as a worker runs it, without a server: decode,
//! the SQL, and for a windowed stream the windows — each message its own micro-batch,
//! every window still open closed at the end of the input. Rows and rejects are kept
//! for the comparison; nothing is loaded.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use etlmesh_codec::{DecodedBatch, Limits, Provenance, Reject};
use etlmesh_config::{Format, PipelineSpec, StreamSource};
use etlmesh_engine::{Engine, Kind, Transform};
use etlmesh_stream::decode::MessageDecoder;
use etlmesh_stream::source::{Delivery, Meta};
use etlmesh_stream::window::{Shards, fmt_ms, refused};

use crate::TestError;
use crate::spec::{TestCase, TestInput, TestMessage};

/// What came out of a test's input.
pub struct Outcome {
    /// The rows' schema (the SQL's output).
    pub schema: SchemaRef,
    /// The rows.
    pub rows: Vec<RecordBatch>,
    /// The dead letters, with the message each came from (streams).
    pub letters: Vec<(Reject, Option<usize>)>,
}

/// Runs `case` through `spec`; `base` is the test file's folder.
pub async fn run(
    spec: &PipelineSpec,
    engine: &Engine,
    limits: Limits,
    case: &TestCase,
    base: &Path,
) -> Result<Outcome, TestError> {
    match spec.stream_source() {
        Some(source) => {
            let Some(messages) = &case.input.messages else {
                return Err(TestError::Input(format!(
                    "pipeline `{}` reads a stream ({}): give its input as `messages: [{{ topic, payload }}]`",
                    spec.name,
                    source.describe()
                )));
            };
            stream(spec, source, engine, limits, messages).await
        }
        None => {
            if case.input.messages.is_some() {
                return Err(TestError::Input(format!(
                    "pipeline `{}` reads files or requests: give its input as `text`, `file` or `records`",
                    spec.name
                )));
            }
            batch(spec, engine, limits, &case.input, base).await
        }
    }
}

/// The records of a batch pipeline's input, their format and their name in rejects.
fn records(
    spec: &PipelineSpec,
    input: &TestInput,
    base: &Path,
) -> Result<(Bytes, Format, String), TestError> {
    let given = [
        input.text.is_some(),
        input.file.is_some(),
        input.records.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(TestError::Input(
            "give the input as one of `text`, `file` and `records`".into(),
        ));
    }
    let format_of = |fallback: Option<Format>| {
        input
            .format
            .or(fallback)
            .or(spec.source.format)
            .ok_or_else(|| {
                TestError::Input(format!(
                    "the input's format is not known: add `format: csv` (or ndjson, json, parquet, arrow) to the input, or `format` to pipeline `{}`'s source",
                    spec.name
                ))
            })
    };
    if let Some(text) = &input.text {
        return Ok((Bytes::from(text.clone()), format_of(None)?, "input".into()));
    }
    if let Some(file) = &input.file {
        let path = base.join(file);
        let bytes = std::fs::read(&path).map_err(|e| {
            TestError::Input(format!(
                "cannot read the input {}: {e}; `file` is relative to the test file",
                path.display()
            ))
        })?;
        let format = format_of(Format::from_path(&path))?;
        return Ok((Bytes::from(bytes), format, path.display().to_string()));
    }
    let mut text = String::new();
    for r in input.records.iter().flatten() {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    Ok((
        Bytes::from(text),
        input.format.unwrap_or(Format::Ndjson),
        "records".into(),
    ))
}

async fn batch(
    spec: &PipelineSpec,
    engine: &Engine,
    limits: Limits,
    input: &TestInput,
    base: &Path,
) -> Result<Outcome, TestError> {
    let (bytes, format, label) = records(spec, input, base)?;
    let declared = spec
        .schema
        .as_ref()
        .map(|f| etlmesh_codec::schema::arrow_schema(f));
    let (schema, decoded) = etlmesh_codec::decode_body(
        bytes,
        &label,
        format,
        declared.as_ref(),
        &spec.source.csv,
        &limits,
        spec.source.infer_rows,
    )
    .map_err(|e| TestError::Input(e.to_string()))?;
    let transform = compile(engine, spec, schema).await?;
    let mut letters: Vec<(Reject, Option<usize>)> =
        decoded.rejects.into_iter().map(|r| (r, None)).collect();
    let mut rows = Vec::new();
    match transform.kind() {
        Kind::RowWise => {
            for b in &decoded.batches {
                let r = transform.apply(b).await.map_err(engine_error)?;
                letters.extend(r.rejects.into_iter().map(|r| (r, None)));
                rows.extend(r.batches);
            }
        }
        Kind::WholeInput => {
            let batches = decoded.batches.into_iter().map(|b| b.batch).collect();
            rows = transform.run_all(batches).await.map_err(engine_error)?.0;
        }
    }
    Ok(Outcome {
        schema: transform.output_schema().clone(),
        rows,
        letters,
    })
}

async fn stream(
    spec: &PipelineSpec,
    source: StreamSource<'_>,
    engine: &Engine,
    limits: Limits,
    messages: &[TestMessage],
) -> Result<Outcome, TestError> {
    let fields = spec.schema.as_ref().ok_or_else(|| {
        TestError::Input(format!(
            "pipeline `{}` has no schema: a stream needs one",
            spec.name
        ))
    })?;
    let declared = etlmesh_codec::schema::arrow_schema(fields);
    let decoder = MessageDecoder::new(source, &declared, &spec.source.csv, limits);
    let input = decoder.input_schema().clone();
    let mut windows = spec
        .window
        .clone()
        .map(|w| Shards::new(w, &input))
        .transpose()
        .map_err(TestError::Input)?;
    let sql_input = etlmesh_stream::window::sql_schema(&input, windows.is_some());
    let transform = compile(engine, spec, sql_input).await?;
    let time_field = spec.window.as_ref().map_or("", |w| w.time.as_str());
    let mut out = Outcome {
        schema: transform.output_schema().clone(),
        rows: Vec::new(),
        letters: Vec::new(),
    };
    for (i, m) in messages.iter().enumerate() {
        let n = i + 1;
        let d = delivery(source, m, n)?;
        let decoded = decoder.decode(std::slice::from_ref(&d));
        out.letters
            .extend(decoded.rejects.into_iter().map(|r| (r, Some(n))));
        match &mut windows {
            Some(w) => {
                let now = chrono::Utc::now().timestamp_millis();
                for b in &decoded.batches {
                    let seqs = decoded.lines.row_seqs(b);
                    let again = vec![false; b.batch.num_rows()];
                    let added = w
                        .add(&b.batch, &seqs, &again, &[], &|_| true, now)
                        .map_err(TestError::Input)?;
                    let refused =
                        refused(&added, b, &decoded.lines, time_field, w.max_future(), now);
                    out.letters
                        .extend(refused.into_iter().map(|r| (r, Some(n))));
                }
                // What the watermark closed, as the runner closes it between batches.
                let closed = w
                    .due(Instant::now(), false, &|_| false)
                    .map_err(TestError::Input)?;
                run_windows(&transform, closed, &mut out).await?;
            }
            None => {
                for b in &decoded.batches {
                    let r = transform.apply(b).await.map_err(engine_error)?;
                    out.letters.extend(
                        decoded
                            .lines
                            .place_all(r.rejects)
                            .into_iter()
                            .map(|r| (r, Some(n))),
                    );
                    out.rows.extend(r.batches);
                }
            }
        }
    }
    // The end of the input closes every window still open.
    if let Some(w) = &mut windows {
        let closed = w
            .due(Instant::now(), true, &|_| false)
            .map_err(TestError::Input)?;
        run_windows(&transform, closed, &mut out).await?;
    }
    Ok(out)
}

/// The SQL over windows that closed.
async fn run_windows(
    transform: &Transform,
    closed: Vec<etlmesh_stream::window::Closed>,
    out: &mut Outcome,
) -> Result<(), TestError> {
    for c in closed {
        let input = DecodedBatch {
            batch: c.batch,
            provenance: Provenance::Rows {
                source: Arc::from(format!("window {}..{}", fmt_ms(c.start), fmt_ms(c.end))),
                first_row: 1,
            },
        };
        let r = transform.apply(&input).await.map_err(engine_error)?;
        out.letters.extend(r.rejects.into_iter().map(|r| (r, None)));
        out.rows.extend(r.batches);
    }
    Ok(())
}

/// Message `n` as the source would hand it out.
fn delivery(
    source: StreamSource<'_>,
    m: &TestMessage,
    n: usize,
) -> Result<Delivery<()>, TestError> {
    let payload = match &m.payload {
        serde_json::Value::String(s) => Bytes::from(s.clone()),
        other => Bytes::from(other.to_string()),
    };
    let kafka = matches!(source, StreamSource::Kafka(_));
    let topic = match &m.topic {
        Some(t) => t.clone(),
        None if !source.columns().is_empty() => {
            return Err(TestError::Input(format!(
                "message {n} has no `topic`, and the source takes columns from it ({})",
                source.describe()
            )));
        }
        None => source.address().to_string(),
    };
    let (partition, offset) = (m.partition.unwrap_or(0), m.offset.unwrap_or(n as i64 - 1));
    let place = if kafka {
        format!("{topic}/{partition}@{offset}")
    } else {
        topic.clone()
    };
    Ok(Delivery {
        seq: n as u64,
        redelivered: false,
        topic: Arc::from(place),
        payload,
        meta: Meta {
            key: m.key.clone().map(Bytes::from),
            topic: Some(Arc::from(topic)),
            partition: kafka.then_some(partition),
            offset: kafka.then_some(offset),
            timestamp_ms: m.timestamp,
            headers: m
                .headers
                .iter()
                .map(|(k, v)| (Arc::from(k.as_str()), Some(Bytes::from(v.clone()))))
                .collect(),
        },
        ack: (),
    })
}

async fn compile(
    engine: &Engine,
    spec: &PipelineSpec,
    schema: SchemaRef,
) -> Result<Transform, TestError> {
    engine
        .compile(&spec.name, &spec.transform, schema)
        .await
        .map_err(engine_error)
}

fn engine_error(e: etlmesh_engine::EngineError) -> TestError {
    TestError::Pipeline(e.to_string())
}
