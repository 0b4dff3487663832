//! API errors. Each API has one error enum; its variants decide the status and the
//! stable code of the answer ([`ApiError`]), so that a handler says *what* went wrong
//! and this module alone decides *how* it is answered: a JSON body
//! `{"code", "message", "trace_id"}`, `Retry-After` on 429 and 503, and a log line
//! (warn for 5xx, info otherwise) that exception tracking collects.

use axum::body::Body;
use axum::response::Response;
use etlmesh_proto::ErrorBody;
use http::{HeaderValue, StatusCode, header};

/// An error an API answers with.
pub trait ApiError: std::error::Error {
    /// The HTTP status.
    fn status(&self) -> StatusCode;

    /// The stable, machine-readable code (`overloaded`, `unknown_pipeline`, …).
    fn code(&self) -> &'static str;

    /// Seconds to wait before trying again, where it is not the default (1 s on 429
    /// and 503).
    fn retry_after(&self) -> Option<u64> {
        None
    }

    /// The authentication scheme a 401 asks for (`WWW-Authenticate`), if any.
    fn challenge(&self) -> Option<&'static str> {
        None
    }

    /// The answer to the request whose trace is `trace_id`.
    fn respond(&self, trace_id: Option<String>) -> Response {
        let mut resp = error_response(self.status(), self.code(), self.to_string(), trace_id);
        let h = resp.headers_mut();
        if let Some(secs) = self.retry_after() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Some(scheme) = self.challenge() {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(scheme));
        }
        resp
    }
}

/// A JSON error response: `{"code", "message", "trace_id"}`.
pub(crate) fn error_response(
    status: StatusCode,
    code: &str,
    message: impl Into<String>,
    trace_id: Option<String>,
) -> Response {
    let message = message.into();
    // Every error answer is an event for exception tracking (`/api/v1/errors`); the
    // request's context (task-local or span) adds its trace id and pipeline.
    if status.is_server_error() {
        tracing::warn!(error_kind = code, status = status.as_u16(), "{message}");
    } else {
        tracing::info!(error_kind = code, status = status.as_u16(), "{message}");
    }
    let body = ErrorBody::new(code, message, trace_id).to_json();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if matches!(
        status,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
    ) {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}
