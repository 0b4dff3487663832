//! The request a task is serving — its trace id and pipeline — for the log lines it
//! emits, without a `tracing` span.
//!
//! The gateway's and the workers' request handlers run inside [`scope`]: a tokio
//! task-local, which costs a thread-local swap per poll. A `tracing` span per request
//! cost more than the rest of the telemetry together (profiled: about 2 % of the
//! gateway's and the worker's CPU in the registry's slab, the span's formatted fields
//! and the bookkeeping of every enter and exit), for lines that are rarely written.
//! Log lines pick the context up when they are written: [`crate::logs::Capture`]
//! for the collected lines and [`WithRequest`] for the lines on stderr.
//!
//! Work a request hands to another task does not carry the context; such lines name
//! their trace or pipeline as fields when they need to.

use std::fmt::{self, Write as _};
use std::future::Future;

use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::json_fields::escape;

/// What a log line written while serving a request says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestContext {
    /// The request's W3C trace id.
    pub trace_id: u128,
    /// The pipeline it runs through.
    pub pipeline: String,
}

impl RequestContext {
    /// The context of a request for `pipeline` in trace `trace_id`.
    pub fn new(trace_id: u128, pipeline: &str) -> Self {
        Self {
            trace_id,
            pipeline: pipeline.to_string(),
        }
    }

    /// The trace id as the 32 hex digits of `traceparent`.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

tokio::task_local! {
    static CURRENT: RequestContext;
}

/// Runs `work` with `ctx` as the request being served.
pub fn scope<F: Future>(ctx: RequestContext, work: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(ctx, work)
}

/// Calls `f` with the request being served, if any.
pub fn with_current<R>(f: impl FnOnce(&RequestContext) -> R) -> Option<R> {
    CURRENT.try_with(f).ok()
}

/// An event formatter that adds the request being served to a line: `trace_id` and
/// `pipeline` as fields of a JSON line, or `trace_id=… pipeline=…` at the end of a
/// text line. Fields the event names itself are not repeated. Lines outside a
/// request are written by the inner formatter as they are.
///
/// Give a text formatter its ANSI choice (`Format::with_ansi`): the inner line is
/// formatted into a buffer first, which would otherwise lose it.
#[derive(Debug, Clone)]
pub struct WithRequest<E> {
    inner: E,
    json: bool,
}

impl<E> WithRequest<E> {
    /// Wraps a JSON (`json: true`) or text event formatter.
    pub fn new(inner: E, json: bool) -> Self {
        Self { inner, json }
    }
}

impl<S, N, E> FormatEvent<S, N> for WithRequest<E>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    E: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let Some(req) = with_current(Clone::clone) else {
            return self.inner.format_event(ctx, writer, event);
        };
        let fields = event.metadata().fields();
        let add_trace = fields.field("trace_id").is_none();
        let add_pipeline = fields.field("pipeline").is_none();
        let mut line = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut line), event)?;
        let body = line.strip_suffix('\n').unwrap_or(&line);
        let mut extra = String::new();
        if self.json {
            let Some(object) = body.strip_suffix('}') else {
                return writer.write_str(&line);
            };
            if add_trace {
                write!(extra, ",\"trace_id\":\"{:032x}\"", req.trace_id)?;
            }
            if add_pipeline {
                extra.push_str(",\"pipeline\":\"");
                escape(&mut extra, &req.pipeline)?;
                extra.push('"');
            }
            writeln!(writer, "{object}{extra}}}")
        } else {
            if add_trace {
                write!(extra, " trace_id={:032x}", req.trace_id)?;
            }
            if add_pipeline {
                write!(extra, " pipeline={}", req.pipeline)?;
            }
            writeln!(writer, "{body}{extra}")
        }
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;
    use crate::test_buf::Buf;

    async fn log_in_and_out_of_a_request() {
        tracing::info!("outside");
        let ctx = RequestContext::new(0xabc, "cl\"ean");
        scope(ctx, async {
            tokio::task::yield_now().await;
            tracing::info!(status = 200u64, "inside");
            tracing::warn!(pipeline = "other", "names its own pipeline");
        })
        .await;
    }

    #[tokio::test]
    async fn json_lines_in_a_request_carry_its_trace_and_pipeline() {
        let buf = Buf::default();
        let w = buf.clone();
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(move || w.clone())
            .json()
            .flatten_event(true)
            .fmt_fields(crate::json_fields::LeanJsonFields);
        let fmt = fmt.map_event_format(|e| WithRequest::new(e, true));
        let _g = tracing::subscriber::set_default(tracing_subscriber::registry().with(fmt));
        log_in_and_out_of_a_request().await;
        let lines: Vec<serde_json::Value> = buf
            .lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["message"], "outside");
        assert!(lines[0].get("trace_id").is_none());
        assert_eq!(lines[1]["message"], "inside");
        assert_eq!(lines[1]["status"], 200);
        assert_eq!(lines[1]["trace_id"], format!("{:032x}", 0xabc));
        assert_eq!(lines[1]["pipeline"], "cl\"ean");
        // The event's own field wins, once.
        assert_eq!(lines[2]["pipeline"], "other");
        assert_eq!(lines[2]["trace_id"], format!("{:032x}", 0xabc));
    }

    #[tokio::test]
    async fn text_lines_in_a_request_end_with_its_trace_and_pipeline() {
        let buf = Buf::default();
        let w = buf.clone();
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .map_event_format(|e| WithRequest::new(e.with_ansi(false), false));
        let _g = tracing::subscriber::set_default(tracing_subscriber::registry().with(fmt));
        log_in_and_out_of_a_request().await;
        let lines = buf.lines();
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(lines[0].ends_with("outside"), "{}", lines[0]);
        let trace = format!("{:032x}", 0xabc);
        assert!(
            lines[1].ends_with(&format!(
                "inside status=200 trace_id={trace} pipeline=cl\"ean"
            )),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].ends_with(&format!("pipeline=\"other\" trace_id={trace}")),
            "{}",
            lines[2]
        );
    }

    #[tokio::test]
    async fn the_context_is_the_tasks_own() {
        assert!(with_current(|_| ()).is_none());
        let seen = scope(RequestContext::new(7, "p"), async {
            let inner = tokio::spawn(async { with_current(|c| c.clone()) })
                .await
                .expect("task");
            (with_current(|c| c.clone()), inner)
        })
        .await;
        assert_eq!(seen.0, Some(RequestContext::new(7, "p")));
        assert_eq!(seen.1, None, "a spawned task does not inherit it");
    }
}
