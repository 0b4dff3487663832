//! The HTTP front door: `POST /v1/pipelines/{name}`, `GET /v1/pipelines`, `/healthz`,
//! `/readyz`, `/metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use etlmesh_config::Format;
use etlmesh_http::{ApiError, json_response};
use etlmesh_proto::headers;
use etlmesh_telemetry::TraceContext;
use etlmesh_telemetry::context::{self, RequestContext};
use etlmesh_telemetry::otlp::KeyValue;
use etlmesh_telemetry::served::Served;
use http::{HeaderMap, HeaderValue, header};
use http_body_util::{BodyExt, Limited};
use tower::BoxError;

use crate::Gateway;
use crate::discovery::ControlLink;
use crate::endpoint::{Payload, WorkerResponse};
use crate::metrics::{EndpointLabels, PipelineHandles, RequestLabels};
use crate::refusal::ApiRefusal;

/// Query parameters of a transform request.
#[derive(Debug, Default, serde::Deserialize)]
pub struct TransformQuery {
    /// The deadline, in milliseconds (also `etlmesh-timeout-ms`).
    pub timeout_ms: Option<u64>,
}

/// Alive; and whether it follows the control plane now (`control_plane`: `false` while
/// it serves from its last endpoint set, `null` before it ever had one).
pub(crate) async fn healthz(State(gw): State<Arc<Gateway>>) -> Response {
    let control_plane = match *gw.connected.borrow() {
        ControlLink::Never => serde_json::Value::Null,
        ControlLink::Up => true.into(),
        ControlLink::Lost => false.into(),
    };
    json_response(&serde_json::json!({ "status": "ok", "control_plane": control_plane }))
}

/// Ready once it has had an endpoint set: while the control plane is away (a restart,
/// a partition) it keeps serving from the last one, and says so.
pub(crate) async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    let link = *gw.connected.borrow();
    let ready: usize = gw.routes.pipelines().iter().map(|(_, n)| *n).sum();
    match link {
        ControlLink::Never => ApiRefusal::NotReady.into_response(),
        ControlLink::Up => json_response(
            &serde_json::json!({ "status": "ready", "control_plane": true, "ready_endpoints": ready }),
        ),
        ControlLink::Lost => json_response(&serde_json::json!({
            "status": "ready",
            "control_plane": false,
            "ready_endpoints": ready,
            "serving": "the last endpoint set, while the control plane is unreachable",
        })),
    }
}

pub(crate) async fn metrics(State(gw): State<Arc<Gateway>>) -> Response {
    etlmesh_http::metrics_response(&gw.registry)
}

pub(crate) async fn list(State(gw): State<Arc<Gateway>>) -> Response {
    let list: Vec<serde_json::Value> = gw
        .routes
        .pipelines()
        .into_iter()
        .map(|(info, ready)| {
            let mut v = serde_json::to_value(&info).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert("ready_workers".into(), ready.into());
            }
            v
        })
        .collect();
    json_response(&list)
}

/// `POST /v1/pipelines/{name}`: the request routed to a worker of the pipeline, with
/// its metrics, log context and span when telemetry is on.
pub(crate) async fn transform(
    State(gw): State<Arc<Gateway>>,
    Path(name): Path<String>,
    q: Result<Query<TransformQuery>, QueryRejection>,
    version: http::Version,
    req_headers: HeaderMap,
    body: Body,
) -> Response {
    let q = match transform_query(q) {
        Ok(q) => q,
        Err(refusal) => return refusal.into_response(),
    };
    let (trace, parent) = etlmesh_http::server_span(&req_headers);
    let trace_id = trace.trace_id_hex();
    let routed = route(&gw, &name, q, req_headers, body, trace, &trace_id);
    let mut resp = if gw.options.telemetry {
        measured(&gw, &name, trace, parent, routed).await
    } else {
        routed.await
    };
    let refused_unread = resp.status() == http::StatusCode::PAYLOAD_TOO_LARGE;
    let h = resp.headers_mut();
    // An HTTP/1 body refused unread leaves the connection unusable: say so,
    // or a client may reuse it and lose its next request.
    if refused_unread && version < http::Version::HTTP_2 {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if !h.contains_key(headers::TRACE_ID)
        && let Ok(v) = HeaderValue::from_str(&trace_id)
    {
        h.insert(headers::TRACE_ID, v);
    }
    resp
}

/// The query string, or the refusal a malformed one gets (the JSON error body every
/// error has).
fn transform_query(
    q: Result<Query<TransformQuery>, QueryRejection>,
) -> Result<TransformQuery, ApiRefusal> {
    match q {
        Ok(Query(TransformQuery {
            timeout_ms: Some(0),
        })) => Err(ApiRefusal::BadQuery(
            "timeout_ms is 0\n  help: give the deadline in milliseconds, at least 1".into(),
        )),
        Ok(Query(q)) => Ok(q),
        Err(e) => Err(ApiRefusal::BadQuery(format!(
            "{e}\n  help: the only parameter is timeout_ms, in milliseconds"
        ))),
    }
}

/// Awaits `routed` counted in the pipeline's metrics (in flight, requests by code,
/// latency; the route's own latency and errors for the balancer), with the request's
/// trace and pipeline on its log lines, and ends with its one `served!` event.
async fn measured(
    gw: &Gateway,
    name: &str,
    trace: TraceContext,
    parent: Option<u64>,
    routed: impl Future<Output = Response>,
) -> Response {
    let started = Instant::now();
    let wall_start = std::time::SystemTime::now();
    let known_route = gw.routes.get(name);
    let unknown;
    let handles = match &known_route {
        Some(r) => r.metrics.get_or_init(|| gw.metrics.handles(name)),
        None => {
            unknown = gw.metrics.handles("unknown");
            &unknown
        }
    };
    let in_flight = &handles.in_flight;
    in_flight.inc();
    // Log lines of the request name its trace and pipeline (no span: see
    // `etlmesh_telemetry::context`).
    let resp = context::scope(RequestContext::new(trace.trace_id, name), routed).await;
    in_flight.dec();
    let code = resp.status().as_u16();
    if code == 200 {
        handles.ok.inc();
    } else {
        gw.metrics
            .requests
            .get_or_create(&RequestLabels {
                pipeline: if known_route.is_some() {
                    name.to_string()
                } else {
                    "unknown".into()
                },
                code,
            })
            .inc();
    }
    let elapsed = started.elapsed().as_secs_f64();
    handles.latency.observe(elapsed);
    if let Some(r) = &known_route {
        r.latency.observe(elapsed);
        if code >= 500 {
            r.errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    etlmesh_telemetry::served!(
        Served {
            span: "gateway.request",
            trace: &trace,
            parent,
            start: wall_start,
            pipeline: name,
            status: code,
            elapsed: started.elapsed(),
        },
        |a| a.push(KeyValue::new("etlmesh.gateway", gw.options.id.clone()))
    );
    resp
}

fn deadline(gw: &Gateway, q: &TransformQuery, h: &HeaderMap) -> Duration {
    let asked = q.timeout_ms.or_else(|| {
        h.get(headers::TIMEOUT_MS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    });
    asked
        .map_or(gw.options.default_deadline, Duration::from_millis)
        .min(gw.options.max_deadline)
}

async fn route(
    gw: &Arc<Gateway>,
    name: &str,
    q: TransformQuery,
    h: HeaderMap,
    body: Body,
    trace: TraceContext,
    trace_id: &str,
) -> Response {
    // Only error answers need the trace id as a string of their own.
    route_or_refuse(gw, name, q, h, body, &trace)
        .await
        .unwrap_or_else(|r| r.respond(Some(trace_id.to_string())))
}

async fn route_or_refuse(
    gw: &Arc<Gateway>,
    name: &str,
    q: TransformQuery,
    h: HeaderMap,
    body: Body,
    trace: &TraceContext,
) -> Result<Response, ApiRefusal> {
    let route = gw.lookup(name)?;
    let ct = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    if ct.and_then(Format::from_content_type).is_none() {
        return Err(ApiRefusal::UnsupportedMediaType(
            ct.unwrap_or("none").to_string(),
        ));
    }
    let max = gw.options.max_body_bytes;
    let length = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if length.is_some_and(|l| l > max) {
        return Err(ApiRefusal::TooLarge(max));
    }
    let payload = match length {
        Some(l) if l <= gw.options.retry_buffer_bytes => {
            match Limited::new(body, max).collect().await {
                Ok(b) => Payload::Buffered(b.to_bytes()),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return Err(ApiRefusal::TooLarge(max));
                }
                Err(_) => return Err(ApiRefusal::Unreadable),
            }
        }
        _ => streaming(body, max),
    };
    let mut out = HeaderMap::new();
    for k in [header::CONTENT_TYPE, header::ACCEPT, header::CONTENT_LENGTH] {
        if let Some(v) = h.get(&k) {
            out.insert(k, v.clone());
        }
    }
    let timeout = deadline(gw, &q, &h);
    let held = route.clone();
    let r = gw.dispatch(route, out, payload, trace, timeout).await?;
    Ok(relay(
        gw,
        name,
        held.metrics.get_or_init(|| gw.metrics.handles(name)),
        r,
    ))
}

/// A body passed through once, cut at `max` bytes.
fn streaming(body: Body, max: usize) -> Payload {
    fn boxed(e: Box<dyn std::error::Error + Send + Sync>) -> BoxError {
        e
    }
    Payload::Streaming(parking_lot::Mutex::new(Some(
        Limited::new(body, max).map_err(boxed).boxed_unsync(),
    )))
}

fn count(h: &HeaderMap, name: &str) -> u64 {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Passes a worker's answer on, body streaming.
fn relay(gw: &Gateway, name: &str, handles: &PipelineHandles, r: WorkerResponse) -> Response {
    let (parts, body) = r.response.into_parts();
    if !gw.options.telemetry {
        let mut resp = Response::new(Body::new(body));
        *resp.status_mut() = parts.status;
        *resp.headers_mut() = parts.headers;
        return resp;
    }
    let code = parts.status.as_u16();
    if code == 200 {
        r.ok.inc();
    } else {
        gw.metrics
            .endpoint_requests
            .get_or_create(&EndpointLabels {
                pipeline: name.to_string(),
                worker: r.worker.to_string(),
                code,
            })
            .inc();
    }
    // In the order of RECORD_OUTCOMES.
    for (i, h) in [
        headers::RECORDS_IN,
        headers::RECORDS_OUT,
        headers::RECORDS_FILTERED,
        headers::RECORDS_DEAD_LETTERED,
    ]
    .into_iter()
    .enumerate()
    {
        let n = count(&parts.headers, h);
        if n > 0 {
            handles.records[i].inc_by(n);
        }
    }
    let mut resp = Response::new(Body::new(body));
    *resp.status_mut() = parts.status;
    *resp.headers_mut() = parts.headers;
    resp
}
