//! Messages to rows: the payloads of a micro-batch become one text chunk (a JSON
//! object per line, JSON arrays split into their elements, CSV lines as they are),
//! decoded at once by the foundation's codecs; the topic's `{column}` levels and the
//! record's metadata (Kafka's key, partition, offset, timestamp, headers) are added as
//! columns; every reject is traced back to its message and topic.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use bytes::Bytes;
use etlmesh_codec::{Chunk, CsvLayout, DecodedBatch, Decoder, Limits, Provenance, Reject, Stage};
use etlmesh_config::{CsvOptions, Format, RecordField, StreamSource};

use crate::source::{Delivery, Meta};

/// Decodes the messages of one pipeline.
pub struct MessageDecoder {
    decoder: Decoder,
    layout: CsvLayout,
    input: SchemaRef,
    /// For each input column: a topic level, or a column of the decoded rows.
    columns: Vec<ColumnSource>,
    /// `mqtt` or `nats`: how a message's place is written (`mqtt:<topic>`).
    scheme: &'static str,
    /// What separates the levels of a topic (`/`) or the tokens of a subject (`.`).
    separator: char,
    /// Whether a column comes from the records' metadata.
    has_meta: bool,
}

enum ColumnSource {
    Topic(usize),
    Payload(usize),
    /// A part of the record, cast to the declared type.
    Meta(RecordField, DataType),
}

impl ColumnSource {
    /// The type a metadata column has when the schema does not declare it.
    fn natural_type(f: &RecordField) -> DataType {
        match f {
            RecordField::Key | RecordField::Topic | RecordField::Header(_) => DataType::Utf8,
            RecordField::Partition => DataType::Int32,
            RecordField::Offset => DataType::Int64,
            RecordField::Timestamp => {
                DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some("UTC".into()))
            }
        }
    }

    /// The column of a metadata field for the rows' messages.
    fn meta_column(f: &RecordField, rows: &[Option<usize>], metas: &[Meta]) -> ArrayRef {
        let meta = |m: &Option<usize>| m.and_then(|m| metas.get(m));
        let text = |b: Option<&Bytes>| b.map(|b| String::from_utf8_lossy(b).into_owned());
        match f {
            RecordField::Key => Arc::new(
                rows.iter()
                    .map(|m| text(meta(m).and_then(|x| x.key.as_ref())))
                    .collect::<StringArray>(),
            ),
            RecordField::Topic => Arc::new(
                rows.iter()
                    .map(|m| meta(m).and_then(|x| x.topic.as_deref()))
                    .collect::<StringArray>(),
            ),
            RecordField::Header(name) => Arc::new(
                rows.iter()
                    .map(|m| {
                        text(meta(m).and_then(|x| {
                            x.headers
                                .iter()
                                .find(|(k, _)| k.as_ref() == name)
                                .and_then(|(_, v)| v.as_ref())
                        }))
                    })
                    .collect::<StringArray>(),
            ),
            RecordField::Partition => Arc::new(
                rows.iter()
                    .map(|m| meta(m).and_then(|x| x.partition))
                    .collect::<Int32Array>(),
            ),
            RecordField::Offset => Arc::new(
                rows.iter()
                    .map(|m| meta(m).and_then(|x| x.offset))
                    .collect::<Int64Array>(),
            ),
            RecordField::Timestamp => Arc::new(
                rows.iter()
                    .map(|m| meta(m).and_then(|x| x.timestamp_ms))
                    .collect::<TimestampMillisecondArray>()
                    .with_timezone("UTC"),
            ),
        }
    }
}

/// One micro-batch, decoded.
#[derive(Default)]
pub struct Decoded {
    /// Rows in the input schema (topic columns included).
    pub batches: Vec<DecodedBatch>,
    /// Records that could not be read, traced to their message.
    pub rejects: Vec<Reject>,
    /// Records seen.
    pub records: u64,
    /// Which message each line of the chunk came from.
    pub lines: LineMap,
    /// Messages rejected whole (nothing of them became a row), by arrival number:
    /// once their dead letters are written they are finished for good.
    pub dead: Vec<u64>,
}

/// Lines of the decoded chunk → messages.
#[derive(Default)]
pub struct LineMap {
    line_msg: Vec<u32>,
    first_line: Vec<u64>,
    lines: Vec<u32>,
    topics: Vec<Arc<str>>,
    arrays: Vec<bool>,
    seqs: Vec<u64>,
    redelivered: Vec<bool>,
    /// Each message's metadata, when a column takes from it.
    metas: Vec<Meta>,
}

impl LineMap {
    fn message(&self, line: u64) -> Option<usize> {
        let i = usize::try_from(line.checked_sub(1)?).ok()?;
        self.line_msg.get(i).map(|&m| m as usize)
    }

    /// The arrival number of the message a row (by its chunk line) came from.
    pub fn seq_of_line(&self, line: u64) -> u64 {
        self.message(line).map_or(0, |m| self.seqs[m])
    }

    /// A reject placed at its message: `mqtt:<topic>`, with the line inside the message
    /// (CSV) or the element of the array (JSON).
    pub fn place(&self, mut r: Reject) -> Reject {
        let Some(m) = r.line.and_then(|l| self.message(l)) else {
            return r;
        };
        let within = r.line.unwrap_or(1).saturating_sub(self.first_line[m]) + 1;
        r.source = self.topics[m].clone();
        r.line = None;
        if self.arrays[m] {
            r.row = Some(within);
        } else if self.lines[m] > 1 {
            r.line = Some(within);
        }
        r
    }

    /// Places every reject.
    pub fn place_all(&self, rejects: Vec<Reject>) -> Vec<Reject> {
        rejects.into_iter().map(|r| self.place(r)).collect()
    }

    /// Whether the message a row (by its chunk line) came from was sent again by the
    /// broker (an earlier connection of the session had it).
    pub fn redelivered_line(&self, line: u64) -> bool {
        self.message(line).is_some_and(|m| self.redelivered[m])
    }

    /// For each row of a decoded batch, whether its message was sent again.
    pub fn row_redelivered(&self, b: &DecodedBatch) -> Vec<bool> {
        match &b.provenance {
            Provenance::Text { spans, offset, .. } => (0..b.batch.num_rows())
                .map(|i| {
                    spans
                        .get(offset + i)
                        .is_some_and(|s| self.redelivered_line(s.line))
                })
                .collect(),
            _ => vec![false; b.batch.num_rows()],
        }
    }

    /// The arrival numbers of the rows of a decoded batch.
    pub fn row_seqs(&self, b: &DecodedBatch) -> Vec<u64> {
        match &b.provenance {
            Provenance::Text { spans, offset, .. } => (0..b.batch.num_rows())
                .map(|i| {
                    spans
                        .get(offset + i)
                        .map_or(0, |s| self.seq_of_line(s.line))
                })
                .collect(),
            _ => vec![0; b.batch.num_rows()],
        }
    }
}

impl MessageDecoder {
    /// The decoder of a pipeline whose declared schema is `declared` (the topic columns
    /// may be among its fields; those that are not are appended as text).
    /// CSV payloads are read with `csv`'s delimiter, quote and nulls, and no header.
    pub fn new(
        spec: StreamSource<'_>,
        declared: &SchemaRef,
        csv: &CsvOptions,
        limits: Limits,
    ) -> Self {
        let topic_cols = spec.columns();
        let is_topic = |name: &str| topic_cols.iter().find(|(_, c)| c == name).map(|(i, _)| *i);
        let meta_cols = spec.metadata();
        let is_meta = |name: &str| meta_cols.iter().find(|(c, _)| c == name).map(|(_, f)| f);
        let payload: Vec<Arc<Field>> = declared
            .fields()
            .iter()
            .filter(|f| is_topic(f.name()).is_none() && is_meta(f.name()).is_none())
            .cloned()
            .collect();
        let payload_schema = Arc::new(Schema::new(payload));
        let mut fields: Vec<Field> = Vec::new();
        let mut columns = Vec::new();
        for f in declared.fields() {
            if let Some(m) = is_meta(f.name()) {
                fields.push(f.as_ref().clone());
                columns.push(ColumnSource::Meta(m.clone(), f.data_type().clone()));
                continue;
            }
            match is_topic(f.name()) {
                Some(level) => {
                    fields.push(Field::new(f.name(), DataType::Utf8, f.is_nullable()));
                    columns.push(ColumnSource::Topic(level));
                }
                None => {
                    let i = payload_schema.index_of(f.name()).unwrap_or(0);
                    fields.push(f.as_ref().clone());
                    columns.push(ColumnSource::Payload(i));
                }
            }
        }
        for (level, name) in topic_cols {
            if declared.field_with_name(name).is_err() {
                fields.push(Field::new(name, DataType::Utf8, false));
                columns.push(ColumnSource::Topic(*level));
            }
        }
        for (name, m) in meta_cols {
            if declared.field_with_name(name).is_err() {
                let ty = ColumnSource::natural_type(m);
                fields.push(Field::new(name, ty.clone(), true));
                columns.push(ColumnSource::Meta(m.clone(), ty));
            }
        }
        let format = if spec.format() == Format::Csv {
            Format::Csv
        } else {
            Format::Ndjson
        };
        let csv = CsvOptions {
            header: false,
            ..csv.clone()
        };
        Self {
            layout: CsvLayout::positional(&payload_schema),
            decoder: Decoder {
                format,
                schema: payload_schema,
                csv,
                limits,
            },
            input: Arc::new(Schema::new(fields)),
            columns,
            scheme: spec.kind(),
            separator: spec.separator(),
            has_meta: !meta_cols.is_empty(),
        }
    }

    /// The schema of the table `input`.
    pub fn input_schema(&self) -> &SchemaRef {
        &self.input
    }

    /// Decodes a micro-batch.
    pub fn decode<A>(&self, messages: &[Delivery<A>]) -> Decoded {
        let mut out = self.decode_messages(messages);
        let mut has_rows = vec![false; messages.len()];
        for b in &out.batches {
            if let Provenance::Text { spans, offset, .. } = &b.provenance {
                for s in spans.iter().skip(*offset).take(b.batch.num_rows()) {
                    if let Some(m) = out.lines.message(s.line) {
                        has_rows[m] = true;
                    }
                }
            }
        }
        out.dead = messages
            .iter()
            .zip(has_rows)
            .filter(|(_, rows)| !rows)
            .map(|(m, _)| m.seq)
            .collect();
        out
    }

    fn decode_messages<A>(&self, messages: &[Delivery<A>]) -> Decoded {
        let (buf, mut out) = self.frame(messages);
        if !buf.is_empty() {
            self.decode_chunk(buf, messages, &mut out);
        }
        out
    }

    /// Every message's records as the lines of one chunk, with the map from its lines
    /// back to the messages; a message that gives no record is rejected whole here.
    fn frame<A>(&self, messages: &[Delivery<A>]) -> (Vec<u8>, Decoded) {
        let mut out = Decoded::default();
        let mut buf: Vec<u8> =
            Vec::with_capacity(messages.iter().map(|m| m.payload.len() + 1).sum());
        let mut line = 0u64;
        for (i, m) in messages.iter().enumerate() {
            let topic: Arc<str> = Arc::from(format!("{}:{}", self.scheme, m.topic));
            let first = line + 1;
            let (n, array) = match self.frame_one(&m.payload, &mut buf) {
                Ok(framed) => framed,
                Err((stage, reason)) => {
                    out.records += 1;
                    out.rejects
                        .push(Reject::new(&topic, stage, reason, m.payload.clone()));
                    (0, false)
                }
            };
            line += n;
            let lines = &mut out.lines;
            lines.line_msg.extend((0..n).map(|_| i as u32));
            lines.first_line.push(first);
            lines.lines.push(n as u32);
            lines.topics.push(topic);
            lines.arrays.push(array);
            lines.seqs.push(m.seq);
            lines.redelivered.push(m.redelivered);
            if self.has_meta {
                lines.metas.push(m.meta.clone());
            }
        }
        (buf, out)
    }

    /// Appends one message's records to `buf`, a line each: a CSV payload as it is, an
    /// NDJSON record on one line, a JSON array's elements one per line. The lines
    /// added and whether it was an array; or why the message gives no record.
    fn frame_one(&self, payload: &[u8], buf: &mut Vec<u8>) -> Result<(u64, bool), (Stage, String)> {
        let max = self.decoder.limits.max_record_bytes as usize;
        if payload.len() > max {
            return Err((
                Stage::Limit,
                format!(
                    "the message is {} bytes, over max_record_bytes ({max})",
                    payload.len()
                ),
            ));
        }
        if self.decoder.format == Format::Csv {
            let p = trim_end(payload);
            if p.is_empty() {
                return Err((Stage::Decode, "empty message".into()));
            }
            buf.extend_from_slice(p);
            buf.push(b'\n');
            return Ok((1 + memchr::memchr_iter(b'\n', p).count() as u64, false));
        }
        let p = trim_end(trim_start(payload));
        if p.is_empty() {
            return Err((Stage::Decode, "empty message".into()));
        }
        if p.first() != Some(&b'[') {
            buf.extend(
                p.iter()
                    .map(|&b| if b == b'\n' || b == b'\r' { b' ' } else { b }),
            );
            buf.push(b'\n');
            return Ok((1, false));
        }
        match serde_json::from_slice::<Vec<serde_json::Value>>(p) {
            Ok(items) if !items.is_empty() => {
                for item in &items {
                    // Writing JSON into a Vec cannot fail.
                    let _ = serde_json::to_writer(&mut *buf, item);
                    buf.push(b'\n');
                }
                Ok((items.len() as u64, true))
            }
            Ok(_) => Err((Stage::Decode, "empty JSON array".into())),
            Err(e) => Err((Stage::Decode, format!("not a JSON array of records: {e}"))),
        }
    }

    /// Decodes the framed chunk into rows (topic and metadata columns added), placing
    /// each reject at its message. A failure of the whole chunk rejects every message.
    fn decode_chunk<A>(&self, buf: Vec<u8>, messages: &[Delivery<A>], out: &mut Decoded) {
        let chunk = Chunk {
            source: Arc::from(self.scheme),
            data: Bytes::from(buf),
            first_line: 1,
            spans: None,
            skipped: Vec::new(),
        };
        match self.decoder.decode_text(&chunk, &self.layout) {
            Ok(d) => {
                out.records += d.records;
                out.rejects.extend(out.lines.place_all(d.rejects));
                for b in d.batches {
                    match self.with_topic_columns(&b, &out.lines) {
                        Ok(batch) => out.batches.push(DecodedBatch {
                            batch,
                            provenance: b.provenance,
                        }),
                        Err(e) => {
                            for i in 0..b.batch.num_rows() {
                                let r =
                                    b.provenance.reject(&b.batch, i, Stage::Cast, e.to_string());
                                out.rejects.push(out.lines.place(r));
                            }
                        }
                    }
                }
            }
            Err(e) => {
                for m in messages {
                    out.records += 1;
                    out.rejects.push(Reject::new(
                        &Arc::from(format!("{}:{}", self.scheme, m.topic)),
                        Stage::Decode,
                        e.to_string(),
                        m.payload.clone(),
                    ));
                }
            }
        }
    }

    fn with_topic_columns(
        &self,
        b: &DecodedBatch,
        lines: &LineMap,
    ) -> Result<RecordBatch, arrow::error::ArrowError> {
        let rows = b.batch.num_rows();
        let msgs: Vec<Option<usize>> = match &b.provenance {
            Provenance::Text { spans, offset, .. } => (0..rows)
                .map(|i| spans.get(offset + i).and_then(|s| lines.message(s.line)))
                .collect(),
            _ => vec![None; rows],
        };
        let columns: Vec<ArrayRef> = self
            .columns
            .iter()
            .map(|c| -> Result<ArrayRef, arrow::error::ArrowError> {
                Ok(match c {
                    ColumnSource::Payload(i) => b.batch.column(*i).clone(),
                    ColumnSource::Topic(level) => {
                        let values: StringArray = msgs
                            .iter()
                            .map(|m| {
                                m.and_then(|m| {
                                    lines.topics[m]
                                        .strip_prefix(self.scheme)
                                        .and_then(|t| t.strip_prefix(':'))
                                        .and_then(|t| t.split(self.separator).nth(*level))
                                })
                            })
                            .collect();
                        Arc::new(values) as ArrayRef
                    }
                    ColumnSource::Meta(f, ty) => {
                        let natural = ColumnSource::meta_column(f, &msgs, &lines.metas);
                        if natural.data_type() == ty {
                            natural
                        } else {
                            arrow::compute::cast(&natural, ty)?
                        }
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        RecordBatch::try_new(self.input.clone(), columns)
    }
}

fn trim_start(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    &b[n..]
}

fn trim_end(b: &[u8]) -> &[u8] {
    let n = b
        .iter()
        .rev()
        .take_while(|c| c.is_ascii_whitespace())
        .count();
    &b[..b.len() - n]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::detached_delivery;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::Int64Type;
    use etlmesh_config::{FieldSpec, FieldType, PipelineFile};

    fn spec(format: &str) -> (etlmesh_config::MqttSourceSpec, SchemaRef) {
        let f = PipelineFile::parse(
            "s.yaml",
            format!("pipelines:\n  p:\n    source: {{ type: mqtt, broker: mqtt://h, topic: 's/{{device_id}}/r', format: {format} }}\n    schema: {{ seq: int64, t: float64 }}\n    sinks: [{{ type: ndjson, path: o }}]\n    dead_letter: {{ type: ndjson, path: d }}\n"),
        )
        .expect("valid");
        let p = &f.spec.pipelines[0];
        let fields: Vec<FieldSpec> = p.schema.clone().expect("schema");
        assert_eq!(fields[0].ty, FieldType::Int64);
        (
            p.mqtt().expect("mqtt").clone(),
            etlmesh_codec::schema::arrow_schema(&fields),
        )
    }

    #[test]
    fn a_records_key_partition_offset_timestamp_and_headers_become_columns() {
        let f = PipelineFile::parse(
            "s.yaml",
            "pipelines:\n  p:\n    source: { type: kafka, brokers: 'h:9092', topic: r, columns: { device_id: key, part: partition, off: offset, at: timestamp, tr: 'header:trace' } }\n    schema: { seq: int64, part: int64, device_id: utf8 }\n    sinks: [{ type: ndjson, path: o }]\n    dead_letter: { type: ndjson, path: d }\n",
        )
        .expect("valid");
        let p = &f.spec.pipelines[0];
        let declared = etlmesh_codec::schema::arrow_schema(&p.schema.clone().expect("schema"));
        let source = p.stream_source().expect("a stream");
        let d = MessageDecoder::new(source, &declared, &p.source.csv, Limits::default());
        let names: Vec<&str> = d
            .input_schema()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        // Declared ones keep their place (and type: `part` is cast to int64); the others
        // follow with their own types.
        assert_eq!(names, ["seq", "part", "device_id", "at", "off", "tr"]);
        let mut m = detached_delivery(1, "r/3@41", br#"[{"seq": 1}, {"seq": 2}]"#);
        m.meta = Meta {
            key: Some(Bytes::from_static(b"dev-7")),
            topic: Some(Arc::from("r")),
            partition: Some(3),
            offset: Some(41),
            timestamp_ms: Some(1_700_000_000_000),
            headers: vec![(Arc::from("trace"), Some(Bytes::from_static(b"t-1")))],
        };
        let mut bad = detached_delivery(2, "r/3@42", b"not json");
        bad.meta.partition = Some(3);
        let out = d.decode(&[m, bad]);
        assert_eq!(out.batches.len(), 1);
        let b = &out.batches[0].batch;
        assert_eq!(b.num_rows(), 2);
        assert_eq!(b.column(1).as_primitive::<Int64Type>().value(1), 3);
        assert_eq!(b.column(2).as_string::<i32>().value(0), "dev-7");
        assert_eq!(b.column(4).as_primitive::<Int64Type>().value(0), 41);
        assert_eq!(b.column(5).as_string::<i32>().value(1), "t-1");
        assert!(matches!(
            b.column(3).data_type(),
            DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, Some(_))
        ));
        // A reject names the record: topic, partition and offset.
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(out.rejects[0].source.as_ref(), "kafka:r/3@42");
    }

    #[test]
    fn objects_arrays_and_topic_levels_become_rows_and_rejects_name_their_message() {
        let (m, schema) = spec("json");
        let d = MessageDecoder::new(
            StreamSource::Mqtt(&m),
            &schema,
            &CsvOptions::default(),
            Limits::default(),
        );
        assert_eq!(d.input_schema().field(2).name(), "device_id");
        let msgs = vec![
            detached_delivery(1, "s/a/r", b"{\"seq\": 1, \"t\": 1.5}"),
            detached_delivery(
                2,
                "s/b/r",
                b"[{\"seq\": 2, \"t\": 2.5}, {\"seq\": 3, \"t\": \"hot\"}]",
            ),
            detached_delivery(3, "s/c/r", b"{\"seq\": 4,"),
            detached_delivery(4, "s/d/r", b"[1, 2"),
        ];
        let out = d.decode(&msgs);
        assert_eq!(out.records, 5);
        assert_eq!(out.dead, vec![3, 4], "messages of which no row came");
        let b = &out.batches[0];
        assert_eq!(b.batch.num_rows(), 2);
        let seqs = b.batch.column(0).as_primitive::<Int64Type>();
        assert_eq!((seqs.value(0), seqs.value(1)), (1, 2));
        let dev = b.batch.column(2).as_string::<i32>();
        assert_eq!((dev.value(0), dev.value(1)), ("a", "b"));
        assert_eq!(out.lines.row_seqs(b), vec![1, 2]);
        let mut where_: Vec<(String, Option<u64>)> = out
            .rejects
            .iter()
            .map(|r| (r.source.to_string(), r.row))
            .collect();
        where_.sort();
        assert_eq!(
            where_,
            vec![
                ("mqtt:s/b/r".into(), Some(2)),
                ("mqtt:s/c/r".into(), None),
                ("mqtt:s/d/r".into(), None),
            ]
        );
    }

    #[test]
    fn csv_lines_are_read_in_schema_order() {
        let (m, schema) = spec("csv");
        let d = MessageDecoder::new(
            StreamSource::Mqtt(&m),
            &schema,
            &CsvOptions::default(),
            Limits::default(),
        );
        let msgs = vec![
            detached_delivery(7, "s/x/r", b"1,0.5\n2,1.5\n"),
            detached_delivery(8, "s/y/r", b"3,abc"),
        ];
        let out = d.decode(&msgs);
        assert_eq!(out.records, 3);
        assert_eq!(
            out.batches
                .iter()
                .map(|b| b.batch.num_rows())
                .sum::<usize>(),
            2
        );
        assert_eq!(out.rejects.len(), 1);
        assert_eq!(&*out.rejects[0].source, "mqtt:s/y/r");
        assert_eq!(out.rejects[0].field.as_deref(), Some("t"));
        assert!(out.batches[0].batch.column(2).null_count() == 0);
    }
}
