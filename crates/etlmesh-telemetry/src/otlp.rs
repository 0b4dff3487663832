//! OTLP span export: when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, the gateway's request spans and the
//! workers' transform spans go to an OpenTelemetry collector over OTLP/HTTP —
//! protobuf by default, JSON with `OTEL_EXPORTER_OTLP_PROTOCOL=http/json` — in
//! batches from a background thread. Which traces go is the head sampler's choice
//! ([`crate::sampler`], `OTEL_TRACES_SAMPLER`): all of them unless told.
//!
//! Spans keep the ids of the W3C `traceparent` the processes already pass on (the
//! trace id is the one in logs and error bodies), so a trace reads client → gateway →
//! worker in any tracing backend. With no endpoint set, [`record`] is one atomic load.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::Context;
/// A span attribute.
pub use opentelemetry::KeyValue;
use opentelemetry::trace::{
    SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{IdGenerator, SdkTracerProvider, Tracer};

use crate::TraceContext;

/// Errors setting the exporter up.
#[derive(Debug)]
pub struct OtlpError(String);

impl std::fmt::Display for OtlpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OTLP export: {}", self.0)
    }
}

impl std::error::Error for OtlpError {}

struct Exporter {
    provider: SdkTracerProvider,
    tracer: Tracer,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Flushes and stops the exporter when dropped (the end of a command).
#[derive(Debug)]
pub struct OtlpGuard(());

impl Drop for OtlpGuard {
    fn drop(&mut self) {
        if let Some(e) = EXPORTER.get() {
            let _ = e.provider.force_flush();
            let _ = e.provider.shutdown();
        }
    }
}

/// Where spans go, from the standard variables; `None` when export is off.
pub fn endpoint_from_env() -> Option<String> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| {
        var("OTEL_EXPORTER_OTLP_ENDPOINT").map(|e| format!("{}/v1/traces", e.trim_end_matches('/')))
    })
}

/// Starts exporting as `service` when the environment names an endpoint. Returns a
/// guard that flushes at the end, or `None` when export is off.
pub fn init_from_env(service: &str) -> Result<Option<OtlpGuard>, OtlpError> {
    // The sampler applies even without an endpoint: its decision travels in
    // `traceparent` to processes that may export.
    let sampler = crate::sampler::Sampler::from_env().map_err(OtlpError)?;
    crate::sampler::install(sampler);
    let Some(url) = endpoint_from_env() else {
        return Ok(None);
    };
    let protocol = match std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL").as_deref() {
        Ok("http/json") => Protocol::HttpJson,
        Ok("http/protobuf") | Err(_) => Protocol::HttpBinary,
        Ok(other) => {
            return Err(OtlpError(format!(
                "OTEL_EXPORTER_OTLP_PROTOCOL={other} is not supported; use http/protobuf or http/json"
            )));
        }
    };
    let client = BlockingHyper::new().map_err(OtlpError)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(protocol)
        .with_endpoint(url.clone())
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| OtlpError(e.to_string()))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_id_generator(OurIds)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        )
        .build();
    let tracer = provider.tracer("etlmesh");
    if EXPORTER.set(Exporter { provider, tracer }).is_err() {
        return Err(OtlpError("already started".into()));
    }
    tracing::info!(endpoint = %url, service, sampler = ?sampler, "exporting spans over OTLP");
    Ok(Some(OtlpGuard(())))
}

/// Whether spans are exported.
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// A finished span, as the gateway and the workers describe their work.
#[derive(Debug)]
pub struct SpanRecord<'a> {
    /// `gateway.request`, `worker.transform`, …
    pub name: &'static str,
    /// This span's trace and span ids.
    pub context: &'a TraceContext,
    /// The span that called it (from the incoming `traceparent`).
    pub parent: Option<u64>,
    /// When it started.
    pub start: SystemTime,
    /// Attributes (`pipeline`, `http.response.status_code`, …).
    pub attributes: Vec<KeyValue>,
    /// An error, when it failed.
    pub error: Option<String>,
}

thread_local! {
    /// The ids the next span built on this thread takes (see [`OurIds`]).
    static NEXT_IDS: Cell<Option<(u128, u64)>> = const { Cell::new(None) };
}

/// The SDK draws ids from its generator; this one hands out the ids of the span
/// being recorded, so that exported spans keep the `traceparent` ids.
#[derive(Debug)]
struct OurIds;

impl IdGenerator for OurIds {
    fn new_trace_id(&self) -> TraceId {
        let id = NEXT_IDS
            .with(Cell::get)
            .map_or_else(|| TraceContext::new_root().trace_id, |(t, _)| t);
        TraceId::from_bytes(id.to_be_bytes())
    }

    fn new_span_id(&self) -> SpanId {
        let id = NEXT_IDS
            .with(Cell::get)
            .map_or_else(|| TraceContext::new_root().span_id, |(_, s)| s);
        SpanId::from_bytes(id.to_be_bytes())
    }
}

/// Exports a finished span (nothing when export is off or the trace is not sampled).
pub fn record(span: SpanRecord<'_>) {
    let Some(e) = EXPORTER.get() else {
        return;
    };
    if !span.context.sampled {
        return;
    }
    let trace_id = TraceId::from_bytes(span.context.trace_id.to_be_bytes());
    let cx = match span.parent {
        Some(p) => Context::new().with_remote_span_context(SpanContext::new(
            trace_id,
            SpanId::from_bytes(p.to_be_bytes()),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        )),
        None => Context::new(),
    };
    let builder = SpanBuilder::from_name(span.name)
        .with_kind(SpanKind::Server)
        .with_start_time(span.start)
        .with_attributes(span.attributes);
    NEXT_IDS.with(|n| n.set(Some((span.context.trace_id, span.context.span_id))));
    let mut s = e.tracer.build_with_context(builder, &cx);
    NEXT_IDS.with(|n| n.set(None));
    if let Some(err) = span.error {
        opentelemetry::trace::Span::set_status(&mut s, Status::error(err));
    }
    opentelemetry::trace::Span::end_with_timestamp(&mut s, SystemTime::now());
}

/// An HTTP client for the exporter's background thread: hyper on a runtime of its
/// own (the thread is not a Tokio thread, so it may block on it).
struct BlockingHyper {
    rt: tokio::runtime::Runtime,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl std::fmt::Debug for BlockingHyper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BlockingHyper")
    }
}

impl BlockingHyper {
    fn new() -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the exporter's runtime: {e}"))?;
        Ok(Self {
            rt,
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for BlockingHyper {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let request = http::Request::from_parts(parts, Full::new(body));
        let send = async {
            let resp = self.client.request(request).await?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(parts, body))
        };
        let timed = async {
            tokio::time::timeout(Duration::from_secs(10), send)
                .await
                .map_err(|_| opentelemetry_http::HttpError::from("timed out after 10 s"))?
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Called on a Tokio thread (a flush at shutdown): do not block it.
            return Err("the OTLP client runs on the exporter's thread only".into());
        }
        self.rt.block_on(timed)
    }
}
