//! Recent log lines, kept in memory so that the control plane can collect them.
//!
//! [`Capture`] is a `tracing` layer: every event that passes the process's filter
//! becomes a [`LogLine`] in a bounded [`LogRing`] (the oldest line goes when it is
//! full), with the trace id and pipeline of the request it happened in (a span's
//! fields, or the task's [`crate::context`]). Workers and gateways ship new lines to
//! the control plane; it keeps a ring per process (`etlmesh logs`) and groups the
//! errors ([`crate::errors`]).

use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// Lines a process keeps before the oldest goes.
pub const RING_LINES: usize = 2000;
/// Extra fields kept per line; the rest are dropped.
const MAX_FIELDS: usize = 16;
/// A field value or message is cut at this many bytes.
const MAX_VALUE: usize = 2048;

/// One log line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    /// Order within its ring (the collector renumbers).
    pub seq: u64,
    /// RFC 3339 time, UTC, milliseconds.
    pub time: String,
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: String,
    /// The module that logged it.
    pub target: String,
    /// The message.
    pub message: String,
    /// The trace of the request it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The pipeline it concerns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// A machine-readable error kind (`error_kind` field), when it reports an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    /// The process it came from (set by the collector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Other fields of the event.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, String>,
}

impl LogLine {
    /// The line's level (`INFO` when it cannot be read).
    pub fn level(&self) -> Level {
        parse_level(&self.level).unwrap_or(Level::INFO)
    }

    /// Whether it reports an error: an `error_kind`, or a warning or worse.
    pub fn is_error(&self) -> bool {
        self.error_kind.is_some() || self.level() <= Level::WARN
    }

    /// The line as a terminal shows it.
    pub fn to_text(&self) -> String {
        let mut s = format!("{} {:>5}", self.time, self.level);
        if let Some(src) = &self.source {
            let _ = write!(s, " [{src}]");
        }
        if let Some(p) = &self.pipeline {
            let _ = write!(s, " pipeline={p}");
        }
        if let Some(t) = &self.trace_id {
            let _ = write!(s, " trace_id={t}");
        }
        let _ = write!(s, " {}", self.message);
        if let Some(k) = &self.error_kind {
            let _ = write!(s, " error_kind={k}");
        }
        for (k, v) in &self.fields {
            let _ = write!(s, " {k}={v}");
        }
        s
    }
}

/// `error`, `WARN`, `info`…: a level, any case.
pub fn parse_level(s: &str) -> Option<Level> {
    s.trim().parse().ok()
}

/// A bounded ring of lines, oldest first.
#[derive(Debug)]
pub struct LogRing {
    inner: Mutex<RingInner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct RingInner {
    lines: VecDeque<LogLine>,
    next_seq: u64,
}

impl LogRing {
    /// A ring of `capacity` lines.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(RingInner {
                lines: VecDeque::with_capacity(capacity.min(1024)),
                next_seq: 1,
            }),
            capacity: capacity.max(1),
        }
    }

    /// Adds a line, numbering it; the oldest goes when the ring is full.
    pub fn push(&self, mut line: LogLine) -> u64 {
        let mut g = self.inner.lock();
        line.seq = g.next_seq;
        g.next_seq += 1;
        if g.lines.len() == self.capacity {
            g.lines.pop_front();
        }
        g.lines.push_back(line);
        g.next_seq - 1
    }

    /// Up to `max` lines numbered after `after`, and how many between were lost
    /// (pushed out of the ring before they were read).
    pub fn since(&self, after: u64, max: usize) -> (Vec<LogLine>, u64) {
        let g = self.inner.lock();
        let first = g.lines.front().map_or(g.next_seq, |l| l.seq);
        let lost = first.saturating_sub(after + 1);
        let start = g.lines.partition_point(|l| l.seq <= after);
        let lines = g.lines.range(start..).take(max).cloned().collect();
        (lines, lost)
    }

    /// The number of the newest line (0: none yet).
    pub fn last_seq(&self) -> u64 {
        let g = self.inner.lock();
        g.next_seq - 1
    }
}

static GLOBAL: OnceLock<Arc<LogRing>> = OnceLock::new();

/// This process's ring (the one [`Capture::global`] fills).
pub fn global() -> Arc<LogRing> {
    GLOBAL
        .get_or_init(|| Arc::new(LogRing::new(RING_LINES)))
        .clone()
}

/// The layer that fills a ring.
#[derive(Debug, Clone)]
pub struct Capture {
    ring: Arc<LogRing>,
}

impl Capture {
    /// Captures into `ring`.
    pub fn new(ring: Arc<LogRing>) -> Self {
        Self { ring }
    }

    /// Captures into the process's ring ([`global`]).
    pub fn global() -> Self {
        Self::new(global())
    }
}

/// The context a span gives the events inside it.
#[derive(Debug, Default, Clone)]
struct SpanContext {
    trace_id: Option<String>,
    pipeline: Option<String>,
}

impl Visit for SpanContext {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field, value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if matches!(field.name(), "trace_id" | "pipeline") {
            self.set(field, format!("{value:?}"));
        }
    }
}

impl SpanContext {
    fn set(&mut self, field: &Field, value: String) {
        match field.name() {
            "trace_id" => self.trace_id = Some(value),
            "pipeline" => self.pipeline = Some(value),
            _ => {}
        }
    }
}

#[derive(Default)]
struct EventVisitor {
    message: String,
    ctx: SpanContext,
    error_kind: Option<String>,
    fields: BTreeMap<String, String>,
}

fn cut(mut s: String) -> String {
    if s.len() > MAX_VALUE {
        let mut end = MAX_VALUE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

impl EventVisitor {
    fn put(&mut self, field: &Field, value: String) {
        match field.name() {
            "message" => self.message = cut(value),
            "trace_id" | "pipeline" => self.ctx.set(field, value),
            "error_kind" => self.error_kind = Some(value),
            name => {
                if self.fields.len() < MAX_FIELDS {
                    self.fields.insert(name.to_string(), cut(value));
                }
            }
        }
    }
}

impl Visit for EventVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.to_string());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.put(field, format!("{value:?}"));
    }
}

impl<S> Layer<S> for Capture
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut sc = SpanContext::default();
        attrs.record(&mut sc);
        if (sc.trace_id.is_some() || sc.pipeline.is_some())
            && let Some(span) = ctx.span(id)
        {
            span.extensions_mut().insert(sc);
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut v = EventVisitor::default();
        event.record(&mut v);
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope {
                if v.ctx.trace_id.is_some() && v.ctx.pipeline.is_some() {
                    break;
                }
                if let Some(sc) = span.extensions().get::<SpanContext>() {
                    if v.ctx.trace_id.is_none() {
                        v.ctx.trace_id.clone_from(&sc.trace_id);
                    }
                    if v.ctx.pipeline.is_none() {
                        v.ctx.pipeline.clone_from(&sc.pipeline);
                    }
                }
            }
        }
        // Request handlers give their context without a span.
        if v.ctx.trace_id.is_none() || v.ctx.pipeline.is_none() {
            crate::context::with_current(|r| {
                if v.ctx.trace_id.is_none() {
                    v.ctx.trace_id = Some(r.trace_id_hex());
                }
                if v.ctx.pipeline.is_none() {
                    v.ctx.pipeline = Some(r.pipeline.clone());
                }
            });
        }
        let meta = event.metadata();
        self.ring.push(LogLine {
            seq: 0,
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            level: meta.level().to_string(),
            target: meta.target().to_string(),
            message: v.message,
            trace_id: v.ctx.trace_id,
            pipeline: v.ctx.pipeline,
            error_kind: v.error_kind,
            source: None,
            fields: v.fields,
        });
    }
}

/// What a process ships to the control plane: new lines, and how many were lost
/// since the last shipment (pushed out of its ring before they could be sent).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LogBatch {
    /// The lines, oldest first.
    pub lines: Vec<LogLine>,
    /// Lines lost before these.
    #[serde(default)]
    pub lost: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn lines_carry_their_span_context() {
        let ring = Arc::new(LogRing::new(10));
        let sub = tracing_subscriber::registry().with(Capture::new(ring.clone()));
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("request", pipeline = "p1", trace_id = %"abc");
            span.in_scope(|| {
                tracing::warn!(error_kind = "overloaded", status = 503, "busy: {}", 7);
            });
            tracing::info!("outside");
        });
        let (lines, lost) = ring.since(0, 100);
        assert_eq!(lost, 0);
        assert_eq!(lines.len(), 2);
        let l = &lines[0];
        assert_eq!(l.message, "busy: 7");
        assert_eq!(l.level, "WARN");
        assert_eq!(l.trace_id.as_deref(), Some("abc"));
        assert_eq!(l.pipeline.as_deref(), Some("p1"));
        assert_eq!(l.error_kind.as_deref(), Some("overloaded"));
        assert_eq!(l.fields.get("status").map(String::as_str), Some("503"));
        assert!(l.is_error());
        assert!(!lines[1].is_error());
        assert_eq!(lines[1].trace_id, None);
        assert!(l.to_text().contains("trace_id=abc"));
    }

    #[tokio::test]
    async fn lines_carry_the_request_their_task_serves() {
        let ring = Arc::new(LogRing::new(10));
        let sub = tracing_subscriber::registry().with(Capture::new(ring.clone()));
        let _g = tracing::subscriber::set_default(sub);
        let ctx = crate::context::RequestContext::new(0x4bf9, "p2");
        crate::context::scope(ctx, async {
            tokio::task::yield_now().await;
            tracing::info!(error_kind = "bad_body", "cannot read");
            tracing::info!(trace_id = "own", "names its trace");
        })
        .await;
        let (lines, _) = ring.since(0, 100);
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0].trace_id.as_deref(),
            Some("00000000000000000000000000004bf9")
        );
        assert_eq!(lines[0].pipeline.as_deref(), Some("p2"));
        assert_eq!(lines[1].trace_id.as_deref(), Some("own"));
        assert_eq!(lines[1].pipeline.as_deref(), Some("p2"));
    }

    #[test]
    fn the_ring_is_bounded_and_says_what_was_lost() {
        let ring = LogRing::new(3);
        for i in 0..5 {
            ring.push(LogLine {
                seq: 0,
                time: String::new(),
                level: "INFO".into(),
                target: String::new(),
                message: format!("{i}"),
                trace_id: None,
                pipeline: None,
                error_kind: None,
                source: None,
                fields: BTreeMap::new(),
            });
        }
        let (lines, lost) = ring.since(0, 10);
        assert_eq!(lost, 2);
        assert_eq!(
            lines.iter().map(|l| l.message.as_str()).collect::<Vec<_>>(),
            ["2", "3", "4"]
        );
        let (lines, lost) = ring.since(4, 10);
        assert_eq!((lines.len(), lost), (1, 0));
        assert_eq!(ring.last_seq(), 5);
        assert_eq!(parse_level("warn"), Some(Level::WARN));
    }
}
