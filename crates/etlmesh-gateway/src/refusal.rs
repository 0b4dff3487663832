//! Why the gateway's API did not answer a request with a worker's (or the analytics
//! engine's, or the control plane's) answer: one variant per reason, each with its
//! status and code ([`etlmesh_http::ApiError`]). Routing's own reasons are
//! [`crate::dispatch::Refusal`], which Arrow Flight maps to gRPC codes as well.

use axum::response::{IntoResponse, Response};
use etlmesh_http::ApiError;
use etlmesh_query::QueryError;
use http::StatusCode;

use crate::dispatch;

const FORMATS: &str = etlmesh_config::Format::CONTENT_TYPES;

/// What the gateway answers when it cannot serve a request.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiRefusal {
    /// No worker's answer: routing's reason.
    #[error(transparent)]
    Dispatch(#[from] dispatch::Refusal),
    /// It has not heard from the control plane yet.
    #[error("the gateway has not received the endpoint set from the control plane yet")]
    NotReady,
    /// A query string it cannot read.
    #[error("{0}")]
    BadQuery(String),
    /// A body in no format the workers read.
    #[error("set Content-Type to one of {FORMATS} (got {0})")]
    UnsupportedMediaType(String),
    /// A body over the limit.
    #[error("the body is over the gateway's limit of {0} bytes; split it into smaller requests")]
    TooLarge(usize),
    /// A body that could not be read off the connection.
    #[error("the body could not be read")]
    Unreadable,
    /// No token, or one it does not know.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A token that may not do this.
    #[error(
        "token `{token}` may not use {what}\n  help: add it to the token's entry in platform.access.tokens"
    )]
    Forbidden { token: String, what: String },
    /// A token over its rate.
    #[error(
        "token `{token}` is over its rate of {rate} requests per second (burst {burst})\n  help: retry after the Retry-After seconds, or raise the token's rate"
    )]
    RateLimited {
        token: String,
        rate: f64,
        burst: f64,
        wait: u64,
    },
    /// No analytics here.
    #[error(
        "this gateway serves no analytics: it was started without a pipeline file\n  help: start it with -c FILE (etlmesh up does), so that the file's Parquet and PostgreSQL sinks are datasets"
    )]
    NoAnalytics,
    /// A query request it cannot read.
    #[error("{0}")]
    BadRequest(String),
    /// An answer format it does not write.
    #[error("cannot answer in `{0}`; ask for JSON, NDJSON, CSV, Parquet or Arrow")]
    NotAcceptable(String),
    /// The analytics engine refused or failed.
    #[error(transparent)]
    Query(#[from] QueryError),
    /// The answer could not be encoded or the request not built.
    #[error("{0}")]
    QueryFailed(String),
    /// The analytics process did not answer in time.
    #[error("the analytics process did not answer in time")]
    AnalyticsTimeout,
    /// The analytics process does not answer: it restarts.
    #[error("the analytics process does not answer ({0}); it is restarting: retry in a second")]
    AnalyticsUnavailable(String),
    /// A query took the analytics process past its memory cap.
    #[error(
        "the query took the analytics process past its memory cap (platform.query.process_memory) and ended it; it restarts — ask for less"
    )]
    AnalyticsDied,
    /// What the analytics process refused, as it said it.
    #[error("{message}")]
    Relayed {
        status: StatusCode,
        code: &'static str,
        message: String,
    },
    /// Someone other than its gateway asked the analytics process.
    #[error("this process answers its gateway only")]
    NotItsGateway,
    /// A job request over the limit.
    #[error("a job request holds at most {} bytes", crate::jobs::MAX_JOB_BODY)]
    JobTooLarge,
    /// A job the control plane does not know.
    #[error("no job `{0}`\n  help: `etlmesh job list` shows the jobs")]
    UnknownJob(String),
    /// A token that may not run jobs of the pipeline.
    #[error("token `{token}` may not run jobs of pipeline `{pipeline}`")]
    JobForbidden { token: String, pipeline: String },
    /// The control plane, which keeps the jobs, does not answer.
    #[error(
        "the control plane, which keeps the jobs, does not answer: {0}\n  help: retry shortly; check that the control plane runs"
    )]
    ControlPlaneUnavailable(String),
    /// The control plane's answer could not be read.
    #[error("the control plane's answer could not be read; retry")]
    ControlPlaneAnswer,
}

impl ApiError for ApiRefusal {
    fn status(&self) -> StatusCode {
        match self {
            Self::Dispatch(r) => r.status(),
            Self::NotReady | Self::AnalyticsUnavailable(_) | Self::ControlPlaneUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::BadQuery(_) | Self::Unreadable | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooLarge(_) | Self::JobTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } | Self::NotItsGateway | Self::JobForbidden { .. } => {
                StatusCode::FORBIDDEN
            }
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::NoAnalytics | Self::UnknownJob(_) => StatusCode::NOT_FOUND,
            Self::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            Self::Query(e) => match e {
                QueryError::Refused(_) | QueryError::Forbidden(_) => StatusCode::FORBIDDEN,
                QueryError::Invalid(_) => StatusCode::BAD_REQUEST,
                QueryError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                QueryError::Memory { .. } => StatusCode::UNPROCESSABLE_ENTITY,
                QueryError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
                QueryError::Unavailable(_) => StatusCode::BAD_GATEWAY,
                QueryError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Self::QueryFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::AnalyticsTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::AnalyticsDied => StatusCode::UNPROCESSABLE_ENTITY,
            Self::ControlPlaneAnswer => StatusCode::BAD_GATEWAY,
            Self::Relayed { status, .. } => *status,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Dispatch(r) => r.code(),
            Self::NotReady => "not_ready",
            Self::BadQuery(_) => "bad_query",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::TooLarge(_) => "payload_too_large",
            Self::Unreadable => "bad_body",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden { .. } | Self::NotItsGateway | Self::JobForbidden { .. } => "forbidden",
            Self::RateLimited { .. } => "rate_limited",
            Self::NoAnalytics => "no_analytics",
            Self::BadRequest(_) => "bad_request",
            Self::NotAcceptable(_) => "not_acceptable",
            Self::Query(e) => e.code(),
            Self::QueryFailed(_) => "query_failed",
            Self::AnalyticsTimeout => "query_timeout",
            Self::AnalyticsUnavailable(_) => "analytics_unavailable",
            Self::AnalyticsDied => "query_too_large",
            Self::JobTooLarge => "too_large",
            Self::UnknownJob(_) => "unknown_job",
            Self::ControlPlaneUnavailable(_) => "control_plane_unavailable",
            Self::ControlPlaneAnswer => "control_plane_answer",
            Self::Relayed { code, .. } => code,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { wait, .. } => Some(*wait),
            // The control plane restarts in seconds, not in one.
            Self::ControlPlaneUnavailable(_) => Some(5),
            _ => None,
        }
    }

    fn challenge(&self) -> Option<&'static str> {
        matches!(self, Self::Unauthorized(_)).then_some("Bearer")
    }
}

impl ApiRefusal {
    /// The code the analytics process answered with, among those its refusals have
    /// (metric labels stay a closed set): `query_failed` for any other.
    pub(crate) fn known_code(code: &str) -> &'static str {
        /// The analytics process's own refusals besides its queries' ([`QueryError::CODES`]).
        const OWN: [&str; 4] = [
            "bad_request",
            "not_acceptable",
            "no_analytics",
            "query_too_large",
        ];
        QueryError::CODES
            .into_iter()
            .chain(OWN)
            .find(|k| *k == code)
            .unwrap_or("query_failed")
    }
}

impl IntoResponse for ApiRefusal {
    fn into_response(self) -> Response {
        self.respond(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    #[test]
    fn a_rate_limit_says_how_long_to_wait() {
        let r = ApiRefusal::RateLimited {
            token: "ci".into(),
            rate: 4.0,
            burst: 4.0,
            wait: 3,
        }
        .into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
    }

    #[test]
    fn unauthorized_answers_name_the_scheme() {
        let r = ApiRefusal::Unauthorized("send a token").into_response();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(r.headers()[header::WWW_AUTHENTICATE], "Bearer");
    }

    #[test]
    fn a_relayed_refusal_keeps_its_status_and_a_known_code() {
        let r = ApiRefusal::Relayed {
            status: StatusCode::FORBIDDEN,
            code: ApiRefusal::known_code("query_refused"),
            message: "only SELECT".into(),
        };
        assert_eq!(
            (r.status(), r.code()),
            (StatusCode::FORBIDDEN, "query_refused")
        );
        assert_eq!(ApiRefusal::known_code("anything else"), "query_failed");
    }

    #[test]
    fn routing_refusals_keep_their_codes() {
        let r = ApiRefusal::from(dispatch::Refusal::NoWorker("p".into()));
        assert_eq!(
            (r.status(), r.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "no_ready_worker")
        );
        assert!(r.to_string().contains("`p`"), "{r}");
    }
}
