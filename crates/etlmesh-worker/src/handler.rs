//! `POST /v1/pipelines/{pipeline}`: decode the body, run the pipeline's SQL, encode
//! the answer in the format asked for, and say what happened to every record.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::Response;
use bytes::Bytes;
use etlmesh_codec::encode::{EncodeOptions, encode_to_vec};
use etlmesh_codec::{DecodeOutput, Reject};
use etlmesh_config::Format;
use etlmesh_engine::Kind;
use etlmesh_http::ApiError;
use etlmesh_proto::headers;
use etlmesh_telemetry::context::{self, RequestContext};
use etlmesh_telemetry::otlp::KeyValue;
use etlmesh_telemetry::process::cpu_timed;
use etlmesh_telemetry::served::Served;
use http::{HeaderMap, HeaderValue, header};

use etlmesh_sink::dead_letter::{DeadLetterRoute, DeadLetterWrite, Routed};
use etlmesh_sink::tap::TapStage;

use crate::App;
use crate::metrics::{PipelineLabels, RequestLabels};
use crate::pipelines::Pipeline;
use crate::refusal::Refusal;

/// Bodies larger than this are decoded off the async threads.
const BLOCKING_DECODE_BYTES: usize = 256 << 10;

/// What a transform did with the request's records.
#[derive(Debug, Default)]
struct Counts {
    records_in: u64,
    out: u64,
    filtered: u64,
    dead: u64,
    first_error: Option<String>,
}

pub(crate) async fn healthz(State(app): State<Arc<App>>) -> Response {
    if *app.draining.borrow() {
        return Refusal::Draining.respond(None);
    }
    etlmesh_http::json_response(&serde_json::json!({ "status": "ok", "worker": app.id }))
}

pub(crate) async fn metrics(State(app): State<Arc<App>>) -> Response {
    for (name, dead) in app.pipelines.dead_letter_logs() {
        app.metrics.dead_letter_stats(name, dead.stats());
    }
    etlmesh_http::metrics_response(&app.registry)
}

pub(crate) async fn transform(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
    req_headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let wall_start = std::time::SystemTime::now();
    let (trace, parent) = etlmesh_http::server_span(&req_headers);
    let trace_id = trace.trace_id_hex();
    // The CPU time of serving goes to the pipeline's usage (energy accounting).
    let cpu = app
        .pipelines
        .get(&name)
        .map(|p| p.usage.cpu_ns.clone())
        .unwrap_or_default();
    if !app.options.telemetry {
        let mut resp = cpu_timed(serve(&app, &name, &req_headers, body, &trace_id), cpu).await;
        let h = resp.headers_mut();
        h.insert(headers::TRACEPARENT, value(&trace.header()));
        h.insert(headers::TRACE_ID, value(&trace_id));
        h.insert(headers::WORKER, value(&app.id));
        return resp;
    }
    // Log lines of the request name its trace and pipeline (no span: see
    // `etlmesh_telemetry::context`).
    let ctx = RequestContext::new(trace.trace_id, &name);
    let work = cpu_timed(serve(&app, &name, &req_headers, body, &trace_id), cpu);
    let mut resp = context::scope(ctx, work).await;
    let code = resp.status().as_u16();
    let h = resp.headers_mut();
    h.insert(headers::TRACEPARENT, value(&trace.header()));
    h.insert(headers::TRACE_ID, value(&trace_id));
    h.insert(headers::WORKER, value(&app.id));
    let known = app.pipelines.get(&name);
    match &known {
        Some(p) => {
            let m = p.metrics.get_or_init(|| app.metrics.handles(&name));
            if code == 200 {
                m.ok.inc();
            } else {
                app.metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        pipeline: name.clone(),
                        code,
                    })
                    .inc();
            }
            m.latency.observe(started.elapsed().as_secs_f64());
        }
        None => {
            let label = "unknown".to_string();
            app.metrics
                .requests
                .get_or_create(&RequestLabels {
                    pipeline: label.clone(),
                    code,
                })
                .inc();
            app.metrics
                .latency
                .get_or_create(&PipelineLabels { pipeline: label })
                .observe(started.elapsed().as_secs_f64());
        }
    }
    app.metrics.ewma_latency.set(app.load.ewma_ms() / 1000.0);
    let records = |h: &str| {
        resp.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
    };
    etlmesh_telemetry::served!(
        Served {
            span: "worker.transform",
            trace: &trace,
            parent,
            start: wall_start,
            pipeline: &name,
            status: code,
            elapsed: started.elapsed(),
        },
        |a| a.extend([
            KeyValue::new("etlmesh.worker", app.id.clone()),
            KeyValue::new("etlmesh.records_in", records(headers::RECORDS_IN)),
            KeyValue::new("etlmesh.records_out", records(headers::RECORDS_OUT)),
            KeyValue::new(
                "etlmesh.records_dead_lettered",
                records(headers::RECORDS_DEAD_LETTERED),
            ),
        ])
    );
    resp
}

fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn deadline(h: &HeaderMap, default: Duration) -> Duration {
    h.get(headers::DEADLINE_MS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(default, Duration::from_millis)
}

/// The response format: `Accept` if it names one, else the request's.
fn response_format(h: &HeaderMap, request: Format) -> Result<Format, String> {
    Format::from_accept(h.get(header::ACCEPT).and_then(|v| v.to_str().ok()), request)
}

/// The refusal for a pipeline this worker does not serve, listing those it does.
pub(crate) fn unknown_pipeline(app: &App, name: &str) -> Refusal {
    Refusal::UnknownPipeline {
        name: name.to_string(),
        serves: app.pipelines.names().join(", "),
    }
}

async fn serve(app: &Arc<App>, name: &str, h: &HeaderMap, body: Body, trace_id: &str) -> Response {
    let tid = Some(trace_id.to_string());
    serve_within_deadline(app, name, h, body)
        .await
        .unwrap_or_else(|refusal| refusal.respond(tid))
}

async fn serve_within_deadline(
    app: &Arc<App>,
    name: &str,
    h: &HeaderMap,
    body: Body,
) -> Result<Response, Refusal> {
    let pipeline = app
        .pipelines
        .get(name)
        .ok_or_else(|| unknown_pipeline(app, name))?;
    let _in_flight = app
        .load
        .try_start(app.options.max_in_flight)
        .ok_or(Refusal::Overloaded(app.options.max_in_flight))?;
    if app.metrics.enabled {
        app.metrics.in_flight.set(i64::from(app.load.in_flight()));
    }
    let format = h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(Format::from_content_type)
        .ok_or(Refusal::UnsupportedMediaType)?;
    let out_format = response_format(h, format).map_err(Refusal::NotAcceptable)?;
    let deadline = deadline(h, app.options.default_deadline);
    let work = serve_body(app, &pipeline, format, out_format, body);
    tokio::time::timeout(deadline, work)
        .await
        .map_err(|_| Refusal::Deadline(deadline))?
}

/// Reads, decodes, transforms and answers one request's body.
async fn serve_body(
    app: &Arc<App>,
    p: &Arc<Pipeline>,
    format: Format,
    out_format: Format,
    body: Body,
) -> Result<Response, Refusal> {
    if let Some(delay) = app.options.inject_latency {
        tokio::time::sleep(delay).await;
    }
    let bytes = read_body(body, app.options.max_body_bytes).await?;
    let handles = p.metrics.get_or_init(|| app.metrics.handles(&p.spec.name));
    if app.metrics.enabled {
        handles.bytes[0].inc_by(bytes.len() as u64);
    }
    let (schema, decoded) = decode(app, p, format, bytes)
        .await
        .map_err(Refusal::BadBody)?;
    let mut counts = Counts {
        records_in: decoded.records,
        ..Default::default()
    };
    if app.taps.is_tapped() {
        for b in &decoded.batches {
            app.taps
                .offer_batch(&p.spec.name, TapStage::Input, &b.batch);
        }
    }
    let decoded_rows = decoded.rows() as u64;
    rejects(app, p, &mut counts, decoded.rejects)?;
    let transform = p
        .transform_for(&app.pipelines.engine, &schema)
        .await
        .map_err(|source| Refusal::SqlDoesNotPlan {
            columns: etlmesh_codec::schema::describe(&schema),
            source: Box::new(source),
        })?;
    let outputs = match transform.kind() {
        Kind::RowWise => {
            let mut outputs = Vec::new();
            for batch in &decoded.batches {
                let r = transform
                    .apply(batch)
                    .await
                    .map_err(|e| Refusal::TransformFailed(e.to_string()))?;
                counts.out += r.rows_out;
                counts.filtered += r.filtered();
                outputs.extend(r.batches);
                rejects(app, p, &mut counts, r.rejects)?;
            }
            outputs
        }
        Kind::WholeInput => {
            let batches = decoded.batches.into_iter().map(|b| b.batch).collect();
            let (out, into_state) = transform
                .run_all(batches)
                .await
                .map_err(|e| Refusal::TransformFailed(e.to_string()))?;
            let passed = into_state.unwrap_or(decoded_rows).min(decoded_rows);
            counts.out = passed;
            counts.filtered = decoded_rows - passed;
            out
        }
    };
    if app.taps.is_tapped() {
        for b in &outputs {
            app.taps.offer_batch(&p.spec.name, TapStage::Output, b);
        }
    }
    count(app, p, handles, &counts);
    answer(
        app,
        handles,
        &counts,
        outputs,
        transform.output_schema(),
        out_format,
    )
}

/// The body, bounded by the worker's limit.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, Refusal> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let inner = e.into_inner();
        if inner.is::<http_body_util::LengthLimitError>() {
            Refusal::TooLarge(limit)
        } else {
            Refusal::Unreadable(Box::new(axum::Error::new(inner)))
        }
    })
}

/// Counts the request's records in the pipeline's usage and metrics.
fn count(app: &App, p: &Pipeline, handles: &crate::metrics::PipelineHandles, counts: &Counts) {
    p.usage
        .records
        .fetch_add(counts.records_in, std::sync::atomic::Ordering::Relaxed);
    if app.metrics.enabled {
        for (c, n) in handles.records.iter().zip([
            counts.records_in,
            counts.out,
            counts.filtered,
            counts.dead,
        ]) {
            if n > 0 {
                c.inc_by(n);
            }
        }
    }
}

/// The answer: the output in `out_format`, the counts in headers.
fn answer(
    app: &App,
    handles: &crate::metrics::PipelineHandles,
    counts: &Counts,
    outputs: Vec<RecordBatch>,
    schema: &arrow::datatypes::SchemaRef,
    out_format: Format,
) -> Result<Response, Refusal> {
    let schema = schema.clone();
    let encode = move || encode_to_vec(&outputs, &schema, &EncodeOptions::new(out_format));
    let encoded = if counts.records_in as usize > 10_000 {
        tokio::task::block_in_place(encode)
    } else {
        encode()
    };
    let bytes = encoded
        .map_err(|e| Refusal::TransformFailed(format!("encoding the answer failed: {e}")))?;
    if app.metrics.enabled {
        handles.bytes[1].inc_by(bytes.len() as u64);
    }
    let mut resp = Response::new(Body::from(bytes));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(out_format.content_type()),
    );
    h.insert(headers::RECORDS_IN, counts.records_in.into());
    h.insert(headers::RECORDS_OUT, counts.out.into());
    h.insert(headers::RECORDS_FILTERED, counts.filtered.into());
    h.insert(headers::RECORDS_DEAD_LETTERED, counts.dead.into());
    if let Some(e) = counts
        .first_error
        .as_deref()
        .and_then(|e| HeaderValue::from_str(&e.replace(['\r', '\n'], " ")).ok())
    {
        h.insert(headers::FIRST_ERROR, e);
    }
    Ok(resp)
}

async fn decode(
    app: &Arc<App>,
    p: &Arc<Pipeline>,
    format: Format,
    bytes: Bytes,
) -> Result<(arrow::datatypes::SchemaRef, DecodeOutput), String> {
    let limits = app.pipelines.limits;
    let schema = p.schema.clone();
    let csv = p.spec.source.csv.clone();
    let infer = p.spec.source.infer_rows;
    let big = bytes.len() > BLOCKING_DECODE_BYTES;
    let job = move || {
        etlmesh_codec::decode_body(
            bytes,
            "request",
            format,
            schema.as_ref(),
            &csv,
            &limits,
            infer,
        )
        .map_err(|e| e.to_string())
    };
    if big {
        tokio::task::block_in_place(job)
    } else {
        job()
    }
}

/// Dead-letters rejects; with `on_error: fail` (or when dead letters cannot be
/// written), the refusal of the request.
fn rejects(
    app: &App,
    p: &Pipeline,
    counts: &mut Counts,
    rejects: Vec<Reject>,
) -> Result<(), Refusal> {
    let route = DeadLetterRoute {
        pipeline: &p.spec.name,
        on_error: p.spec.on_error,
        sink: p.dead.as_deref().map(|d| d as &dyn DeadLetterWrite),
        taps: Some(&app.taps),
    };
    let routed = route.route(&rejects);
    if counts.first_error.is_none()
        && let Some(first) = etlmesh_sink::dead_letter::first(&rejects)
    {
        counts.first_error = Some(first.to_string());
    }
    match routed {
        Ok(Routed::DeadLettered(n)) => {
            counts.dead += n as u64;
            Ok(())
        }
        Ok(Routed::Refused(first)) => Err(Refusal::BadRecord(first.to_string())),
        Err(e) => {
            tracing::error!(pipeline = %p.spec.name, error = %e, "dead letters could not be written");
            Err(Refusal::DeadLetterFailed(Box::new(e)))
        }
    }
}

#[cfg(test)]
mod tests;
