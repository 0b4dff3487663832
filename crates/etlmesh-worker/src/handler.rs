//! `POST /v1/transform/{pipeline}`: decode the body, run the pipeline's SQL, encode
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
use etlmesh_http::error_response;
use etlmesh_proto::headers;
use etlmesh_telemetry::context::{self, RequestContext};
use etlmesh_telemetry::process::cpu_timed;
use http::{HeaderMap, HeaderValue, StatusCode, header};

use etlmesh_sink::dead_letter::{DeadLetterRoute, DeadLetterWrite, Routed};
use etlmesh_sink::tap::TapStage;

use crate::App;
use crate::metrics::{PipelineLabels, RequestLabels};
use crate::pipelines::Pipeline;

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
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the worker is draining",
            None,
        );
    }
    etlmesh_http::json_response(&serde_json::json!({ "status": "ok", "worker": app.id }))
}

pub(crate) async fn metrics(State(app): State<Arc<App>>) -> Response {
    for (name, dead) in app.pipelines.dead_letter_logs() {
        app.metrics.dead_letter_stats(name, dead.stats());
    }
    etlmesh_http::metrics_response(etlmesh_telemetry::metrics::render(&app.registry))
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
    tracing::debug!(
        pipeline = %name,
        trace_id = %trace_id,
        status = code,
        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "transform served"
    );
    if etlmesh_telemetry::otlp::enabled() {
        let records = |h: &str| {
            resp.headers()
                .get(h)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
        };
        etlmesh_telemetry::otlp::record(etlmesh_telemetry::otlp::SpanRecord {
            name: "worker.transform",
            context: &trace,
            parent,
            start: wall_start,
            attributes: vec![
                etlmesh_telemetry::otlp::KeyValue::new("pipeline", name.clone()),
                etlmesh_telemetry::otlp::KeyValue::new("etlmesh.worker", app.id.clone()),
                etlmesh_telemetry::otlp::KeyValue::new(
                    "http.response.status_code",
                    i64::from(code),
                ),
                etlmesh_telemetry::otlp::KeyValue::new(
                    "etlmesh.records_in",
                    records(headers::RECORDS_IN),
                ),
                etlmesh_telemetry::otlp::KeyValue::new(
                    "etlmesh.records_out",
                    records(headers::RECORDS_OUT),
                ),
                etlmesh_telemetry::otlp::KeyValue::new(
                    "etlmesh.records_dead_lettered",
                    records(headers::RECORDS_DEAD_LETTERED),
                ),
            ],
            error: (code >= 500).then(|| format!("answered {code}")),
        });
    }
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

const FORMATS: &str = "text/csv, application/x-ndjson, application/json, application/vnd.apache.parquet or application/vnd.apache.arrow.stream";

/// 404 for a pipeline this worker does not serve, listing those it does.
pub(crate) fn unknown_pipeline(app: &App, name: &str, tid: Option<String>) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "unknown_pipeline",
        format!(
            "no pipeline named `{name}`; this worker serves: {}",
            app.pipelines.names().join(", ")
        ),
        tid,
    )
}

async fn serve(app: &Arc<App>, name: &str, h: &HeaderMap, body: Body, trace_id: &str) -> Response {
    let tid = Some(trace_id.to_string());
    let Some(pipeline) = app.pipelines.get(name) else {
        return unknown_pipeline(app, name, tid);
    };
    let Some(_in_flight) = app.load.try_start(app.options.max_in_flight) else {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "the worker already serves {} requests; retry shortly",
                app.options.max_in_flight
            ),
            tid,
        );
    };
    if app.metrics.enabled {
        app.metrics.in_flight.set(i64::from(app.load.in_flight()));
    }
    let format = match h
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(Format::from_content_type)
    {
        Some(f) => f,
        None => {
            return error_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("set Content-Type to one of {FORMATS}"),
                tid,
            );
        }
    };
    let out_format = match response_format(h, format) {
        Ok(f) => f,
        Err(accept) => {
            return error_response(
                StatusCode::NOT_ACCEPTABLE,
                "not_acceptable",
                format!("cannot answer in `{accept}`; ask for one of {FORMATS}"),
                tid,
            );
        }
    };
    let deadline = deadline(h, app.options.default_deadline);
    let work = run(app, &pipeline, format, out_format, body, tid.clone());
    match tokio::time::timeout(deadline, work).await {
        Ok(resp) => resp,
        Err(_) => error_response(
            StatusCode::GATEWAY_TIMEOUT,
            "deadline_exceeded",
            format!(
                "the transform did not finish within its deadline of {} ms; send fewer records per request or a longer deadline",
                deadline.as_millis()
            ),
            tid,
        ),
    }
}

async fn run(
    app: &Arc<App>,
    p: &Arc<Pipeline>,
    format: Format,
    out_format: Format,
    body: Body,
    tid: Option<String>,
) -> Response {
    if let Some(delay) = app.options.inject_latency {
        tokio::time::sleep(delay).await;
    }
    let limit = app.options.max_body_bytes;
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(e) => {
            let too_large = e.into_inner().is::<http_body_util::LengthLimitError>();
            return if too_large {
                error_response(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!(
                        "the body is over the worker's limit of {limit} bytes; split it into smaller requests"
                    ),
                    tid,
                )
            } else {
                error_response(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    "the body could not be read",
                    tid,
                )
            };
        }
    };
    let handles = p.metrics.get_or_init(|| app.metrics.handles(&p.spec.name));
    if app.metrics.enabled {
        handles.bytes[0].inc_by(bytes.len() as u64);
    }
    let decoded = match decode(app, p, format, bytes).await {
        Ok(d) => d,
        Err(message) => {
            return error_response(StatusCode::BAD_REQUEST, "bad_body", message, tid);
        }
    };
    let (schema, decoded) = decoded;
    let mut counts = Counts {
        records_in: decoded.records,
        ..Default::default()
    };
    let decoded_rows = decoded.rows() as u64;
    if app.taps.is_tapped() {
        for b in &decoded.batches {
            app.taps
                .offer_batch(&p.spec.name, TapStage::Input, &b.batch);
        }
    }
    if let Some(resp) = rejects(app, p, &mut counts, decoded.rejects, &tid) {
        return resp;
    }
    let transform = match p.transform_for(&app.pipelines.engine, &schema).await {
        Ok(t) => t,
        Err(e) => {
            return error_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                "sql_does_not_plan",
                format!(
                    "the pipeline's SQL does not plan for this body's columns ({}): {e}",
                    etlmesh_codec::schema::describe(&schema)
                ),
                tid,
            );
        }
    };
    let mut outputs: Vec<RecordBatch> = Vec::new();
    match transform.kind() {
        Kind::RowWise => {
            for batch in &decoded.batches {
                match transform.apply(batch).await {
                    Ok(r) => {
                        counts.out += r.rows_out;
                        counts.filtered += r.filtered();
                        let failed = r.rejects;
                        outputs.extend(r.batches);
                        if let Some(resp) = rejects(app, p, &mut counts, failed, &tid) {
                            return resp;
                        }
                    }
                    Err(e) => return execution_failed(&e.to_string(), tid),
                }
            }
        }
        Kind::WholeInput => {
            let batches = decoded.batches.into_iter().map(|b| b.batch).collect();
            match transform.run_all(batches).await {
                Ok((out, into_state)) => {
                    let passed = into_state.unwrap_or(decoded_rows).min(decoded_rows);
                    counts.out = passed;
                    counts.filtered = decoded_rows - passed;
                    outputs = out;
                }
                Err(e) => return execution_failed(&e.to_string(), tid),
            }
        }
    }
    let name = &p.spec.name;
    if app.taps.is_tapped() {
        for b in &outputs {
            app.taps.offer_batch(name, TapStage::Output, b);
        }
    }
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
    let schema = transform.output_schema().clone();
    let encode = move || encode_to_vec(&outputs, &schema, &EncodeOptions::new(out_format));
    let encoded = if counts.records_in as usize > 10_000 {
        tokio::task::block_in_place(encode)
    } else {
        encode()
    };
    let bytes = match encoded {
        Ok(b) => b,
        Err(e) => return execution_failed(&format!("encoding the answer failed: {e}"), tid),
    };
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
    resp
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
/// written), the response that refuses the request.
fn rejects(
    app: &App,
    p: &Pipeline,
    counts: &mut Counts,
    rejects: Vec<Reject>,
    tid: &Option<String>,
) -> Option<Response> {
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
            None
        }
        Ok(Routed::Refused(first)) => Some(error_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_record",
            format!(
                "{first}; the pipeline refuses bad records (on_error: fail): fix the record, or give the pipeline a dead_letter sink"
            ),
            tid.clone(),
        )),
        Err(e) => {
            tracing::error!(pipeline = %p.spec.name, error = %e, "dead letters could not be written");
            Some(error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "dead_letter_failed",
                format!("bad records could not be dead-lettered, so the request is refused: {e}"),
                tid.clone(),
            ))
        }
    }
}

fn execution_failed(message: &str, tid: Option<String>) -> Response {
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "transform_failed",
        message.to_string(),
        tid,
    )
}
