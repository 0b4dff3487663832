//! One event per request served, the same in every process that serves pipelines
//! (the gateway's `gateway.request`, the worker's `worker.transform`): a debug log
//! line ([`served!`](crate::served), so that its target is the caller's module and
//! `ETLMESH_LOG=etlmesh_worker=debug` still selects it) and, when an OTLP exporter
//! runs, a span with the request's trace context. Each process counts its own
//! metrics; what a request says about itself is built here once (Vector's
//! `internal_events` are the model).

use std::time::{Duration, SystemTime};

use crate::TraceContext;
use crate::otlp::{self, KeyValue};

/// A request that was answered.
#[derive(Debug)]
pub struct Served<'a> {
    /// The span's name: `gateway.request`, `worker.transform`.
    pub span: &'static str,
    /// This hop's trace context.
    pub trace: &'a TraceContext,
    /// The calling span, from the request's `traceparent`.
    pub parent: Option<u64>,
    /// When it arrived (wall clock, for the span).
    pub start: SystemTime,
    /// The pipeline asked for.
    pub pipeline: &'a str,
    /// The answer's status.
    pub status: u16,
    /// How long it took.
    pub elapsed: Duration,
}

impl Served<'_> {
    /// Exports the request's span when an OTLP exporter runs; `attributes` adds the
    /// process's own (built only then). [`served!`](crate::served) logs it as well.
    pub fn export(self, attributes: impl FnOnce(&mut Vec<KeyValue>)) {
        if !otlp::enabled() {
            return;
        }
        let mut attrs = vec![
            KeyValue::new("pipeline", self.pipeline.to_string()),
            KeyValue::new("http.response.status_code", i64::from(self.status)),
        ];
        attributes(&mut attrs);
        otlp::record(otlp::SpanRecord {
            name: self.span,
            context: self.trace,
            parent: self.parent,
            start: self.start,
            attributes: attrs,
            error: (self.status >= 500).then(|| format!("answered {}", self.status)),
        });
    }
}

/// Logs a [`Served`] request at debug level (in the caller's module) and exports
/// its span: `served!(served, |attributes| ...)`.
#[macro_export]
macro_rules! served {
    ($served:expr, $attributes:expr) => {{
        let served: $crate::served::Served<'_> = $served;
        ::tracing::debug!(
            pipeline = %served.pipeline,
            trace_id = %served.trace.trace_id_hex(),
            status = served.status,
            elapsed_ms = served.elapsed.as_secs_f64() * 1000.0,
            "request served"
        );
        served.export($attributes);
    }};
}
