//! NATS JetStream: the source (a durable pull consumer that the pipeline's workers
//! share) and the sink (every publish awaited for JetStream's acknowledgement).

use std::path::Path;
use std::time::Duration;

use crate::diag::Diagnostic;
use serde::Deserialize;

use crate::raw::{RawCsv, RawMicroBatch};
use crate::stream::MicroBatch;
use crate::types::Format;
use crate::units::Span;

/// A pipeline that consumes a JetStream stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSourceSpec {
    /// `nats://[user:password@]host[:port]` (`tls://` for TLS); several separated by `,`.
    pub url: String,
    /// The JetStream stream.
    pub stream: String,
    /// The subject as written, with `{column}` tokens.
    pub subject: String,
    /// The consumer's filter: `{column}` tokens become `*`.
    pub filter: String,
    /// Columns taken from subject tokens, with the token index.
    pub subject_columns: Vec<(usize, String)>,
    /// The durable consumer's name (shared by the pipeline's workers).
    pub consumer: String,
    /// Create the stream and the consumer when they do not exist.
    pub create: bool,
    /// How long JetStream waits for an acknowledgement before it sends a message again.
    pub ack_wait: Duration,
    /// Messages delivered and not yet acknowledged, at most, across the workers.
    pub max_ack_pending: usize,
    /// Payload format: JSON (an object or an array per message) or CSV lines.
    pub format: Format,
    /// Micro-batch bounds.
    pub batch: MicroBatch,
    /// Columns taken from the message rather than its payload: its subject, headers.
    pub metadata: Vec<(String, crate::kafka::RecordField)>,
}

/// Rows published to JetStream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsSinkSpec {
    /// The server(s).
    pub url: String,
    /// The subject, with `{column}` tokens taken from each row.
    pub subject: String,
    /// The stream that takes the subject; created with `create`.
    pub stream: Option<String>,
    /// Create the stream when it does not exist.
    pub create: bool,
    /// Columns that identify a row: its message id (`Nats-Msg-Id`) is made of them, so
    /// that JetStream drops a row published twice within its duplicate window. Every
    /// column when empty.
    pub key: Vec<String>,
}

impl crate::stream::StreamSourceKind for NatsSourceSpec {
    fn kind(&self) -> &'static str {
        "nats"
    }
    fn address(&self) -> &str {
        &self.subject
    }
    fn address_field(&self) -> &'static str {
        "subject"
    }
    fn columns(&self) -> &[(usize, String)] {
        &self.subject_columns
    }
    fn separator(&self) -> char {
        '.'
    }
    fn format(&self) -> Format {
        self.format
    }
    fn batch(&self) -> MicroBatch {
        self.batch
    }
    fn metadata(&self) -> &[(String, crate::kafka::RecordField)] {
        &self.metadata
    }
}

/// `{ type: nats, url, stream, subject, ... }` (a source) as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNatsSource {
    pub format: Option<Format>,
    pub csv: Option<RawCsv>,
    pub url: Option<String>,
    pub stream: Option<String>,
    pub subject: Option<String>,
    pub consumer: Option<String>,
    pub create: Option<bool>,
    pub ack_wait: Option<Span>,
    pub max_ack_pending: Option<usize>,
    pub batch: Option<RawMicroBatch>,
    #[serde(default)]
    pub columns: std::collections::BTreeMap<String, String>,
}

/// `{ type: nats, url, subject, stream, create, key }` (a sink) as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNatsSink {
    url: Option<String>,
    subject: Option<String>,
    stream: Option<String>,
    create: Option<bool>,
    key: Option<Vec<String>>,
}

/// Checks a `nats://` URL list.
fn check_url(url: &str, field: &str, file: &Path, out: &mut Vec<Diagnostic>) {
    for u in url.split(',') {
        let u = u.trim();
        let rest = ["nats://", "tls://", "ws://", "wss://"]
            .iter()
            .find_map(|s| u.strip_prefix(s));
        let host = rest.map(|r| r.rsplit('@').next().unwrap_or(r));
        if host.is_none_or(|h| h.is_empty() || h.contains('/')) {
            out.push(
                Diagnostic::new(file, field, format!("`{u}` is not a NATS server address"))
                    .with_help("write nats://127.0.0.1:4222 (tls:// for TLS; several with `,`)"),
            );
        }
    }
}

/// A stream or consumer name: JetStream forbids `.`, `*`, `>`, spaces and path characters.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 200
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `sensors.{device_id}.reading` → the filter `sensors.*.reading` and the columns.
pub(crate) fn subject_columns(
    subject: &str,
    field: &str,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> (String, Vec<(usize, String)>) {
    let mut cols = Vec::new();
    let mut filter = Vec::new();
    for (i, tok) in subject.split('.').enumerate() {
        if tok.is_empty() {
            out.push(
                Diagnostic::new(file, field, format!("`{subject}` has an empty token"))
                    .with_help("tokens are separated by single dots: sensors.{device_id}.reading"),
            );
        }
        match tok.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
            Some(c) if !c.is_empty() => {
                cols.push((i, c.to_string()));
                filter.push("*");
            }
            _ if tok.contains(['{', '}']) => {
                out.push(
                    Diagnostic::new(
                        file,
                        field,
                        format!("`{tok}`: a column must be a whole subject token"),
                    )
                    .with_help("write sensors.{device_id}.reading, not sensors.dev-{id}"),
                );
                filter.push(tok);
            }
            _ => filter.push(tok),
        }
    }
    (filter.join("."), cols)
}

/// The JetStream source of a pipeline.
pub(crate) fn resolve_source(
    s: &RawNatsSource,
    pipeline: &str,
    base: &str,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> NatsSourceSpec {
    let field = |f: &str| format!("{base}.{f}");
    let url = s
        .url
        .clone()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    check_url(&url, &field("url"), file, out);
    let stream = s.stream.clone().unwrap_or_else(|| {
        out.push(
            Diagnostic::new(file, field("stream"), "is required for a nats source")
                .with_help("name the JetStream stream: `stream: SENSORS`"),
        );
        String::new()
    });
    if !stream.is_empty() && !valid_name(&stream) {
        out.push(
            Diagnostic::new(
                file,
                field("stream"),
                format!("`{stream}` is not a stream name"),
            )
            .with_help("use letters, digits, `_` and `-`"),
        );
    }
    let subject = s.subject.clone().unwrap_or_else(|| {
        out.push(
            Diagnostic::new(file, field("subject"), "is required for a nats source")
                .with_help("add `subject: sensors.{device_id}.reading` (`*` and `>` work too)"),
        );
        ">".into()
    });
    let (filter, subject_columns) = subject_columns(&subject, &field("subject"), file, out);
    let consumer = s.consumer.clone().unwrap_or_else(|| pipeline.to_string());
    if !valid_name(&consumer) {
        out.push(
            Diagnostic::new(
                file,
                field("consumer"),
                format!("`{consumer}` is not a consumer name"),
            )
            .with_help("use letters, digits, `_` and `-` (the pipeline's name is the default)"),
        );
    }
    let format = crate::stream::payload_format(s.format, "NATS", &field("format"), file, out);
    let batch = crate::stream::micro_batch(s.batch.as_ref(), &field("batch"), file, out);
    let max_ack_pending = s.max_ack_pending.unwrap_or(20_000);
    if max_ack_pending < 2 * batch.records {
        out.push(
            Diagnostic::new(
                file,
                field("max_ack_pending"),
                format!(
                    "{max_ack_pending} is below twice the micro-batch ({} records)",
                    batch.records
                ),
            )
            .with_help("raise it, or lower `batch.records`: acknowledgements must flow before the window is full"),
        );
    }
    let ack_wait = s.ack_wait.map_or(Duration::from_secs(30), |d| d.0);
    if ack_wait < Duration::from_secs(1) {
        out.push(
            Diagnostic::new(file, field("ack_wait"), "is below 1s")
                .with_help("30s is the default: a message is sent again only after it"),
        );
    }
    let mut metadata = Vec::new();
    for (col, what) in &s.columns {
        use crate::kafka::RecordField;
        let f = match what.as_str() {
            "subject" => Some(RecordField::Topic),
            h => h
                .strip_prefix("header:")
                .filter(|h| !h.is_empty())
                .map(|h| RecordField::Header(h.into())),
        };
        match f {
            Some(f) => metadata.push((col.clone(), f)),
            None => out.push(
                Diagnostic::new(
                    file,
                    field(&format!("columns.{col}")),
                    format!("`{what}` is not a part of a message"),
                )
                .with_help("use subject or header:<name> (subject tokens: write them as {column} in `subject`)"),
            ),
        }
    }
    NatsSourceSpec {
        metadata,
        url,
        stream,
        subject,
        filter,
        subject_columns,
        consumer,
        create: s.create.unwrap_or(false),
        ack_wait,
        max_ack_pending,
        format,
        batch,
    }
}

/// The JetStream sink of a pipeline.
pub(crate) fn resolve_sink(
    s: &RawNatsSink,
    base: &str,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> NatsSinkSpec {
    let field = |f: &str| format!("{base}.{f}");
    let url = s
        .url
        .clone()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    check_url(&url, &field("url"), file, out);
    let subject = s.subject.clone().unwrap_or_else(|| {
        out.push(
            Diagnostic::new(file, field("subject"), "is required for a nats sink")
                .with_help("add `subject: results.{device_id}`"),
        );
        String::new()
    });
    if subject.split('.').any(|t| t == "*" || t == ">") {
        out.push(
            Diagnostic::new(file, field("subject"), "wildcards cannot be published to")
                .with_help("use `{column}` to take a token from each row"),
        );
    }
    let _ = subject_columns(&subject, &field("subject"), file, out);
    if let Some(st) = &s.stream
        && !valid_name(st)
    {
        out.push(
            Diagnostic::new(
                file,
                field("stream"),
                format!("`{st}` is not a stream name"),
            )
            .with_help("use letters, digits, `_` and `-`"),
        );
    }
    let create = s.create.unwrap_or(false);
    if create && s.stream.is_none() {
        out.push(
            Diagnostic::new(
                file,
                field("create"),
                "needs `stream`: the stream to create",
            )
            .with_help("add `stream: RESULTS`"),
        );
    }
    NatsSinkSpec {
        url,
        subject,
        stream: s.stream.clone(),
        create,
        key: s.key.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tokens_become_columns_and_wildcards() {
        let mut out = Vec::new();
        let (f, c) = subject_columns("s.{device_id}.r.>", "x", Path::new("f"), &mut out);
        assert!(out.is_empty());
        assert_eq!(f, "s.*.r.>");
        assert_eq!(c, vec![(1, "device_id".to_string())]);
        subject_columns("s.dev-{id}", "x", Path::new("f"), &mut out);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn the_subject_and_headers_can_be_columns() {
        let yaml = |cols: &str| {
            format!(
                "pipelines:\n  p:\n    source: {{ type: nats, stream: S, subject: s.r, columns: {cols} }}\n    schema: {{ seq: int64 }}\n    sinks: [{{ type: ndjson, path: o }}]\n    dead_letter: {{ type: ndjson, path: d }}\n"
            )
        };
        let f = crate::PipelineFile::parse(
            "n.yaml",
            yaml("{ subj: subject, id: 'header:Nats-Msg-Id' }"),
        )
        .expect("valid");
        let src = f.spec.pipelines[0].stream_source().expect("a stream");
        assert_eq!(
            src.metadata(),
            [
                (
                    "id".to_string(),
                    crate::RecordField::Header("Nats-Msg-Id".into())
                ),
                ("subj".to_string(), crate::RecordField::Topic),
            ]
        );
        let e = crate::PipelineFile::parse("n.yaml", yaml("{ k: key }"))
            .expect_err("a JetStream message has no key")
            .to_string();
        assert!(e.contains("pipelines.p.source.columns.k"), "{e}");
    }

    #[test]
    fn urls_are_checked() {
        let mut out = Vec::new();
        check_url(
            "nats://a:4222, tls://u:p@b:4223",
            "x",
            Path::new("f"),
            &mut out,
        );
        assert!(out.is_empty());
        check_url("http://a", "x", Path::new("f"), &mut out);
        assert_eq!(out.len(), 1);
    }
}
