//! Replay: the original bytes of dead letters through the pipeline as it is now —
//! decode, SQL — into its sinks; then the letters are moved aside.
//!
//! - A letter of a record (stage decode, cast, transform, limit…) goes through the
//!   whole pipeline: a stream's payload as a message of its topic (`mqtt:a/b`,
//!   `kafka:t/3@17`: the topic columns are rebuilt; a Kafka key, headers and timestamp
//!   are not in a letter and come back null), a file's line with the file's header.
//! - A `load` letter is a row the destination refused (its bytes are the row as JSON):
//!   it goes to the sinks alone, without the SQL.
//! - A record cannot join a window or a whole-input aggregate after the fact: in a
//!   windowed stream or an aggregating batch pipeline, only `load` letters replay; the
//!   others are kept, saying why. So are letters whose bytes were cut.
//! - A letter that fails again becomes a new dead letter with its new reason (and its
//!   original source, place and bytes); the old one is moved aside.
//!
//! Streams load through their stream sinks (each write committed, with the sinks' keys
//! and `dedup`), batch pipelines through their file sinks (a new file per replay).

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use bytes::Bytes;
use etlmesh_codec::{DecodedBatch, Limits, Provenance, Reject, Stage};
use etlmesh_config::{Format, PipelineFile, PipelineSpec, StreamSource};
use etlmesh_engine::{Engine, EngineConfig, Kind, Transform};
use etlmesh_sink::dead_letter::DeadLetterSink;
use etlmesh_stream::decode::MessageDecoder;
use etlmesh_stream::source::{Delivery, Meta};

use crate::DeadLetterError;
use crate::letter::Stored;
use crate::store::{Moved, Store};

/// What became of one letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Through the pipeline: its rows were loaded (or the SQL filtered them out).
    Replayed,
    /// It failed again: a new dead letter with this stage and reason.
    Failed {
        /// The stage that refused it now.
        stage: String,
        /// Why.
        reason: String,
    },
    /// Not replayed, left where it is: why.
    Kept(String),
}

/// What a replay did.
#[derive(Debug)]
pub struct ReplayReport {
    /// The replay run (in file names).
    pub run: String,
    /// Each selected letter and what became of it.
    pub outcomes: Vec<(Stored, Outcome)>,
    /// Rows that reached the sinks.
    pub rows_out: u64,
    /// Rows the SQL filtered out.
    pub rows_filtered: u64,
    /// Rows a sink refused (new `load` dead letters).
    pub rows_refused: u64,
    /// The sinks loaded into.
    pub sinks: Vec<String>,
    /// The new dead letters of those that failed again.
    pub dead_file: Option<PathBuf>,
    /// The ledger the replayed letters were moved to.
    pub ledger: Option<PathBuf>,
    /// Nothing was loaded or moved.
    pub dry_run: bool,
}

impl ReplayReport {
    /// Letters with this outcome kind: (replayed, failed, kept).
    pub fn counts(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for (_, o) in &self.outcomes {
            match o {
                Outcome::Replayed => c.0 += 1,
                Outcome::Failed { .. } => c.1 += 1,
                Outcome::Kept(_) => c.2 += 1,
            }
        }
        c
    }
}

/// Replays `picked` (letters of `store`) through pipeline `name` of `file`. With
/// `dry_run`, runs decode and SQL and reports, loading and moving nothing.
pub async fn replay(
    file: &PipelineFile,
    name: &str,
    store: &Store,
    picked: Vec<Stored>,
    dry_run: bool,
) -> Result<ReplayReport, DeadLetterError> {
    let spec = file
        .pipeline(name)
        .map_err(|e| DeadLetterError::Replay(e.to_string()))?
        .clone();
    if spec.sinks.is_empty() {
        return Err(DeadLetterError::Replay(format!(
            "pipeline `{name}` has no sinks: its rows went back to the clients that sent them, and a replay has nowhere to load them\n  help: add a sink to the pipeline, or send the records again (`etlmesh deadletters show {name}` prints their bytes)"
        )));
    }
    let platform = &file.spec.platform;
    let limits = Limits {
        batch_size: platform.batch_size,
        max_record_bytes: platform.max_record_bytes,
    };
    let engine = Engine::new(EngineConfig::for_platform(platform, 1))
        .map_err(|e| DeadLetterError::Replay(e.to_string()))?;
    let mut run = Run {
        spec: &spec,
        limits,
        outcomes: picked.into_iter().map(|s| (s, None)).collect(),
        rows: Vec::new(),
        filtered: 0,
    };
    let (input, decoded) = run.decode_records().await?;
    let transform = match &input {
        Some(schema) => Some(
            engine
                .compile(&spec.name, &spec.transform, schema.clone())
                .await
                .map_err(|e| DeadLetterError::Replay(e.to_string()))?,
        ),
        None => None,
    };
    let output = match &transform {
        Some(t) => t.output_schema().clone(),
        None => output_schema(&engine, &spec, &run).await?,
    };
    if let Some(t) = &transform {
        if t.kind() == Kind::WholeInput || spec.window.is_some() {
            run.keep_records(if spec.window.is_some() {
                "the pipeline aggregates over event-time windows, and a record cannot join a window that has closed; only `load` letters (rows a sink refused) replay — run the record's input again instead"
            } else {
                "the pipeline aggregates over its whole input, and one record cannot join that aggregate after the fact; only `load` letters replay — run the input again with `etlmesh run` instead"
            });
        } else {
            run.transform(t, decoded).await?;
        }
    }
    run.decode_loads(&output);

    let mut report = ReplayReport {
        run: format!("replay-{}", etlmesh_sink::run_id()),
        outcomes: Vec::new(),
        rows_out: run.rows.iter().map(|b| b.num_rows() as u64).sum(),
        rows_filtered: run.filtered,
        rows_refused: 0,
        sinks: spec.sinks.iter().map(|s| s.describe()).collect(),
        dead_file: None,
        ledger: None,
        dry_run,
    };
    let mut refused = Vec::new();
    if !dry_run && !run.rows.is_empty() {
        refused = if spec.stream_source().is_some() {
            load_stream(&spec, &output, &run.rows, &report.run).await?
        } else {
            load_batch(&spec, &output, &run.rows, &report.run)?
        };
    }
    report.rows_refused = refused.len() as u64;
    report.rows_out -= report.rows_refused;
    report.outcomes = run
        .outcomes
        .into_iter()
        .map(|(s, o)| (s, o.unwrap_or(Outcome::Replayed)))
        .collect();
    if dry_run {
        return Ok(report);
    }

    // The letters that failed again (and the rows a sink refused) first, then the
    // ledger: a crash in between shows a letter twice, never zero times.
    let mut again: Vec<Reject> = report
        .outcomes
        .iter()
        .filter_map(|(s, o)| match o {
            Outcome::Failed { .. } => Some(letter_again(s, o)),
            _ => None,
        })
        .collect();
    again.extend(refused);
    if !again.is_empty() {
        let Some(dl) = &spec.dead_letter else {
            return Err(DeadLetterError::Replay(format!(
                "pipeline `{name}` has no dead_letter sink for the letters that failed again"
            )));
        };
        let sink = DeadLetterSink::create(dl, &spec.name, &report.run)
            .map_err(|e| DeadLetterError::Replay(e.to_string()))?;
        sink.write(&again)
            .and_then(|_| sink.commit())
            .map_err(|e| DeadLetterError::Replay(e.to_string()))?;
        report.dead_file = Some(sink.path().clone());
    }
    let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let moved: Vec<Moved> = report
        .outcomes
        .iter()
        .filter_map(|(s, o)| {
            let (outcome, new_reason) = match o {
                Outcome::Replayed => ("replayed", None),
                Outcome::Failed { reason, .. } => ("failed", Some(reason.clone())),
                Outcome::Kept(_) => return None,
            };
            Some(Moved {
                id: s.id.clone(),
                replay_run: report.run.clone(),
                replayed_at: at.clone(),
                outcome: outcome.into(),
                new_reason,
                letter: s.letter.clone(),
            })
        })
        .collect();
    if !moved.is_empty() {
        report.ledger = Some(store.move_aside(&report.run, &moved)?);
    }
    let (replayed, failed, kept) = report.counts();
    tracing::info!(
        pipeline = %spec.name,
        run = %report.run,
        replayed,
        failed,
        kept,
        rows_out = report.rows_out,
        rows_refused = report.rows_refused,
        "dead letters replayed: {replayed} through the pipeline, {failed} failed again, {kept} kept"
    );
    Ok(report)
}

/// The letters of one replay and what has become of them so far.
struct Run<'a> {
    spec: &'a PipelineSpec,
    limits: Limits,
    outcomes: Vec<(Stored, Option<Outcome>)>,
    /// Output rows for the sinks.
    rows: Vec<RecordBatch>,
    filtered: u64,
}

/// Rows decoded from letter `i`.
type FromLetter = (usize, DecodedBatch);

impl Run<'_> {
    fn is_record(s: &Stored) -> bool {
        s.letter.stage != Stage::Load.as_str()
    }

    /// The letters of records, decoded as the source decodes them. Returns the SQL's
    /// input schema (`None` when no letter is a record).
    async fn decode_records(
        &mut self,
    ) -> Result<(Option<SchemaRef>, Vec<FromLetter>), DeadLetterError> {
        if !self.outcomes.iter().any(|(s, _)| Self::is_record(s)) {
            return Ok((None, Vec::new()));
        }
        let spec = self.spec;
        let declared = spec
            .schema
            .as_ref()
            .map(|f| etlmesh_codec::schema::arrow_schema(f));
        let mut out = Vec::new();
        let schema = match (spec.stream_source(), declared) {
            (Some(source), Some(declared)) => {
                let decoder = MessageDecoder::new(source, &declared, &spec.source.csv, self.limits);
                for i in 0..self.outcomes.len() {
                    let Some(payload) = self.bytes_of_record(i) else {
                        continue;
                    };
                    let d = delivery(source, &self.outcomes[i].0.letter.source, payload, i);
                    let decoded = decoder.decode(std::slice::from_ref(&d));
                    self.fail(i, decoded.rejects.into_iter().next());
                    out.extend(decoded.batches.into_iter().map(|b| (i, b)));
                }
                decoder.input_schema().clone()
            }
            (Some(_), None) => {
                return Err(DeadLetterError::Replay(format!(
                    "pipeline `{}` streams without a schema; declare its `schema`",
                    spec.name
                )));
            }
            (None, declared) => {
                let schema = match declared {
                    Some(s) => s,
                    None => self.infer()?,
                };
                for i in 0..self.outcomes.len() {
                    let Some(raw) = self.bytes_of_record(i) else {
                        continue;
                    };
                    let source = self.outcomes[i].0.letter.source.clone();
                    let format = self.format_of(&source, &raw);
                    let body = match self.with_header(&source, format, &schema, raw) {
                        Ok(b) => b,
                        Err(why) => {
                            self.outcomes[i].1 = Some(Outcome::Kept(why));
                            continue;
                        }
                    };
                    match etlmesh_codec::decode_body(
                        body,
                        &source,
                        format,
                        Some(&schema),
                        &spec.source.csv,
                        &self.limits,
                        spec.source.infer_rows,
                    ) {
                        Ok((_, decoded)) => {
                            self.fail(i, decoded.rejects.into_iter().next());
                            out.extend(decoded.batches.into_iter().map(|b| (i, b)));
                        }
                        Err(e) => self.fail_with(i, Stage::Decode.as_str(), e.to_string()),
                    }
                }
                schema
            }
        };
        Ok((Some(schema), out))
    }

    /// The bytes of record letter `i`, or `None` (and the letter kept) when it is not
    /// a record or cannot be replayed.
    fn bytes_of_record(&mut self, i: usize) -> Option<Bytes> {
        let (s, outcome) = &mut self.outcomes[i];
        if !Self::is_record(s) || outcome.is_some() {
            return None;
        }
        if s.letter.raw_truncated {
            *outcome = Some(Outcome::Kept(
                "its bytes were cut when it was dead-lettered (longer than the dead letter keeps)"
                    .into(),
            ));
            return None;
        }
        let raw = s.letter.raw_bytes();
        if raw.is_none() {
            *outcome = Some(Outcome::Kept("it holds no original bytes".into()));
        }
        raw
    }

    /// A schema for a pipeline that declares none: inferred from the letter's input
    /// file when it is still there (as the run that wrote the letter did), else from
    /// the letters.
    fn infer(&self) -> Result<SchemaRef, DeadLetterError> {
        let spec = self.spec;
        let platform_chunk = 4 << 20;
        let first = self
            .outcomes
            .iter()
            .find(|(s, _)| Self::is_record(s))
            .map(|(s, _)| s.letter.source.clone())
            .unwrap_or_default();
        if let Ok(inputs) = etlmesh_batch::resolve_inputs(spec, std::slice::from_ref(&first))
            && let Some(input) = inputs.first()
        {
            return etlmesh_batch::infer_schema(
                input,
                &spec.source.csv,
                &self.limits,
                platform_chunk,
                spec.source.infer_rows,
            )
            .map_err(|e| DeadLetterError::Replay(e.to_string()));
        }
        Err(DeadLetterError::Replay(format!(
            "pipeline `{}` declares no schema and its input {first} is gone, so the letters' columns are not known\n  help: declare the pipeline's `schema`",
            spec.name
        )))
    }

    /// The format a letter's bytes are in.
    fn format_of(&self, source: &str, raw: &[u8]) -> Format {
        self.spec
            .source
            .format
            .or_else(|| Format::from_path(std::path::Path::new(source)))
            .map(|f| match f {
                // A typed record's bytes are the row as JSON.
                Format::Parquet | Format::Arrow | Format::Json => Format::Ndjson,
                f => f,
            })
            .unwrap_or(if raw.trim_ascii_start().starts_with(b"{") {
                Format::Ndjson
            } else {
                Format::Csv
            })
    }

    /// A body the decoder reads: a CSV line after its file's header (the input's first
    /// line when the file is still there, else the declared columns in order).
    fn with_header(
        &self,
        source: &str,
        format: Format,
        schema: &SchemaRef,
        raw: Bytes,
    ) -> Result<Bytes, String> {
        let csv = &self.spec.source.csv;
        if format != Format::Csv || !csv.header {
            return Ok(raw);
        }
        let header = match first_line(source) {
            Some(h) => h,
            None if self.spec.schema.is_some() => schema
                .fields()
                .iter()
                .map(|f| f.name().as_str())
                .collect::<Vec<_>>()
                .join(&char::from(csv.delimiter).to_string()),
            None => {
                return Err(format!(
                    "its input {source} is gone and the pipeline declares no schema, so its columns are not known"
                ));
            }
        };
        let mut body = Vec::with_capacity(header.len() + raw.len() + 2);
        body.extend_from_slice(header.as_bytes());
        body.push(b'\n');
        body.extend_from_slice(&raw);
        body.push(b'\n');
        Ok(Bytes::from(body))
    }

    /// Letters of records through the SQL, in batches; a row it cannot evaluate fails
    /// its letter.
    async fn transform(
        &mut self,
        t: &Transform,
        decoded: Vec<FromLetter>,
    ) -> Result<(), DeadLetterError> {
        let size = self.limits.batch_size.max(1);
        let mut pending: Vec<FromLetter> = Vec::new();
        let mut rows = 0usize;
        let mut it = decoded.into_iter().peekable();
        while let Some(next) = it.next() {
            rows += next.1.batch.num_rows();
            pending.push(next);
            if rows >= size || it.peek().is_none() {
                self.apply(t, std::mem::take(&mut pending)).await?;
                rows = 0;
            }
        }
        Ok(())
    }

    async fn apply(&mut self, t: &Transform, part: Vec<FromLetter>) -> Result<(), DeadLetterError> {
        let Some((_, first)) = part.first() else {
            return Ok(());
        };
        let schema = first.batch.schema();
        let mut letter_of_row: Vec<u64> = Vec::new();
        for (i, b) in &part {
            letter_of_row.extend(std::iter::repeat_n(*i as u64 + 1, b.batch.num_rows()));
        }
        let batch = arrow::compute::concat_batches(&schema, part.iter().map(|(_, b)| &b.batch))
            .map_err(|e| {
                DeadLetterError::Replay(format!("cannot gather the letters' rows: {e}"))
            })?;
        let input = DecodedBatch {
            batch,
            provenance: Provenance::Picked {
                source: Arc::from("replay"),
                rows: letter_of_row.into(),
                offset: 0,
            },
        };
        let r = t
            .apply(&input)
            .await
            .map_err(|e| DeadLetterError::Replay(e.to_string()))?;
        self.filtered += r.filtered();
        for reject in r.rejects {
            if let Some(i) = reject
                .row
                .and_then(|n| usize::try_from(n).ok()?.checked_sub(1))
            {
                self.fail(i, Some(reject));
            }
        }
        self.rows.extend(r.batches);
        Ok(())
    }

    /// Keeps every record letter not decided yet, saying why.
    fn keep_records(&mut self, why: &str) {
        for (s, o) in &mut self.outcomes {
            if Self::is_record(s) && o.is_none() {
                *o = Some(Outcome::Kept(why.to_string()));
            }
        }
    }

    /// `load` letters: rows a sink refused, back to rows of the output.
    fn decode_loads(&mut self, output: &SchemaRef) {
        for i in 0..self.outcomes.len() {
            let (s, o) = &self.outcomes[i];
            if Self::is_record(s) || o.is_some() {
                continue;
            }
            let Some(raw) = s.letter.raw_bytes() else {
                self.outcomes[i].1 = Some(Outcome::Kept("it holds no original bytes".into()));
                continue;
            };
            match etlmesh_codec::decode_body(
                raw,
                &s.letter.source.clone(),
                Format::Ndjson,
                Some(output),
                &Default::default(),
                &self.limits,
                0,
            ) {
                Ok((_, decoded)) => match decoded.rejects.into_iter().next() {
                    Some(r) => self.fail_with(
                        i,
                        Stage::Load.as_str(),
                        format!("the row no longer fits the pipeline's output: {}", r.reason),
                    ),
                    None => self
                        .rows
                        .extend(decoded.batches.into_iter().map(|b| b.batch)),
                },
                Err(e) => self.fail_with(
                    i,
                    Stage::Load.as_str(),
                    format!("the row no longer fits the pipeline's output: {e}"),
                ),
            }
        }
    }

    fn fail(&mut self, i: usize, reject: Option<Reject>) {
        if let Some(r) = reject {
            let reason = match &r.field {
                Some(f) => format!("{f}: {}", r.reason),
                None => r.reason.clone(),
            };
            self.fail_with(i, r.stage.as_str(), reason);
        }
    }

    fn fail_with(&mut self, i: usize, stage: &str, reason: String) {
        if let Some((_, o)) = self.outcomes.get_mut(i)
            && !matches!(o, Some(Outcome::Failed { .. }))
        {
            *o = Some(Outcome::Failed {
                stage: stage.to_string(),
                reason,
            });
        }
    }
}

/// The output schema of a pipeline whose letters are all `load` letters.
async fn output_schema(
    engine: &Engine,
    spec: &PipelineSpec,
    run: &Run<'_>,
) -> Result<SchemaRef, DeadLetterError> {
    let Some(fields) = &spec.schema else {
        return Err(DeadLetterError::Replay(format!(
            "pipeline `{}` declares no schema, so the rows of its `load` letters cannot be read back\n  help: declare the pipeline's `schema`",
            spec.name
        )));
    };
    let declared = etlmesh_codec::schema::arrow_schema(fields);
    let input = match spec.stream_source() {
        Some(source) => {
            let d = MessageDecoder::new(source, &declared, &spec.source.csv, run.limits);
            etlmesh_stream::window::sql_schema(d.input_schema(), spec.window.is_some())
        }
        None => declared,
    };
    engine
        .compile(&spec.name, &spec.transform, input)
        .await
        .map(|t| t.output_schema().clone())
        .map_err(|e| DeadLetterError::Replay(e.to_string()))
}

/// A letter's first line of input, when its file is still there.
fn first_line(source: &str) -> Option<String> {
    use std::io::BufRead;
    let f = std::fs::File::open(source).ok()?;
    let mut line = String::new();
    std::io::BufReader::new(f).read_line(&mut line).ok()?;
    let line = line.trim_end_matches(['\n', '\r']).to_string();
    (!line.is_empty()).then_some(line)
}

/// A stream letter as the message it was: `mqtt:<topic>`, `nats:<subject>`,
/// `kafka:<topic>/<partition>@<offset>`.
fn delivery(source: StreamSource<'_>, place: &str, payload: Bytes, i: usize) -> Delivery<()> {
    let place = place.split_once(':').map_or(place, |(_, p)| p);
    let kafka = matches!(source, StreamSource::Kafka(_));
    let (topic, partition, offset) = match kafka.then(|| kafka_place(place)).flatten() {
        Some((t, p, o)) => (t, Some(p), Some(o)),
        None => (place.to_string(), None, None),
    };
    Delivery {
        seq: i as u64 + 1,
        redelivered: false,
        topic: Arc::from(place),
        payload,
        meta: Meta {
            topic: Some(Arc::from(topic)),
            partition,
            offset,
            ..Meta::default()
        },
        ack: (),
    }
}

/// `topic/3@17` → (`topic`, 3, 17).
fn kafka_place(place: &str) -> Option<(String, i32, i64)> {
    let (rest, offset) = place.rsplit_once('@')?;
    let (topic, partition) = rest.rsplit_once('/')?;
    Some((
        topic.to_string(),
        partition.parse().ok()?,
        offset.parse().ok()?,
    ))
}

/// A letter that failed again, as a new dead letter: its place and bytes, the new
/// stage and reason.
fn letter_again(s: &Stored, o: &Outcome) -> Reject {
    let (stage, reason) = match o {
        Outcome::Failed { stage, reason } => (stage.as_str(), reason.clone()),
        _ => ("decode", String::new()),
    };
    let stage = [
        Stage::Decode,
        Stage::Cast,
        Stage::Transform,
        Stage::Limit,
        Stage::Late,
        Stage::Future,
        Stage::Load,
    ]
    .into_iter()
    .find(|st| st.as_str() == stage)
    .unwrap_or(Stage::Decode);
    let l = &s.letter;
    // The report says `field: reason`; the letter keeps the field apart.
    let reason = match l.field.as_deref() {
        Some(f) => reason
            .strip_prefix(&format!("{f}: "))
            .map_or(reason.clone(), str::to_string),
        None => reason,
    };
    let mut r = Reject::new(
        &Arc::from(l.source.as_str()),
        stage,
        reason,
        l.raw_bytes().unwrap_or_default(),
    );
    r.line = l.line;
    r.row = l.row;
    r.field = l.field.clone();
    r
}

/// Loads rows through a stream pipeline's sinks, each write committed; returns the
/// rows a sink refused, as `load` dead letters.
async fn load_stream(
    spec: &PipelineSpec,
    schema: &SchemaRef,
    rows: &[RecordBatch],
    run: &str,
) -> Result<Vec<Reject>, DeadLetterError> {
    let mut sinks = etlmesh_stream::sinks::build(spec, schema, run)
        .map_err(|e| DeadLetterError::Replay(format!("pipeline `{}`: {e}", spec.name)))?;
    let mut refused = Vec::new();
    for sink in &mut sinks {
        let what = sink.describe();
        let bad = sink
            .write(rows, 1)
            .await
            .map_err(|e| DeadLetterError::Replay(format!("{what}: {e}")))?;
        sink.flush(true)
            .await
            .map_err(|e| DeadLetterError::Replay(format!("{what}: {e}")))?;
        if sink.committed() < 1 {
            return Err(DeadLetterError::Replay(format!(
                "{what} did not commit the replayed rows"
            )));
        }
        for b in bad {
            if let Some(batch) = rows.get(b.batch) {
                refused.push(Reject::new(
                    &Arc::from(format!("replay:{what}")),
                    Stage::Load,
                    b.reason,
                    etlmesh_codec::record::row_as_json(batch, b.row),
                ));
            }
        }
    }
    Ok(refused)
}

/// Loads rows through a batch pipeline's sinks: new files, committed together.
fn load_batch(
    spec: &PipelineSpec,
    schema: &SchemaRef,
    rows: &[RecordBatch],
    run: &str,
) -> Result<Vec<Reject>, DeadLetterError> {
    let err = |e: etlmesh_sink::SinkError| DeadLetterError::Replay(e.to_string());
    let sinks: Vec<_> = spec
        .sinks
        .iter()
        .map(|s| etlmesh_sink::build(s, schema, run))
        .collect::<Result<_, _>>()
        .map_err(err)?;
    let written = sinks.iter().try_for_each(|s| {
        let mut w = s.writer()?;
        for b in rows {
            w.write(b)?;
        }
        w.close()
    });
    let committed = written.and_then(|_| sinks.iter().try_for_each(|s| s.commit().map(|_| ())));
    if let Err(e) = committed {
        for s in &sinks {
            s.abort();
        }
        return Err(err(e));
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kafka_place_is_topic_partition_offset() {
        assert_eq!(kafka_place("orders/3@17"), Some(("orders".into(), 3, 17)));
        assert_eq!(kafka_place("a/b/0@1"), Some(("a/b".into(), 0, 1)));
        assert_eq!(kafka_place("orders"), None);
    }
}
