//! Why the worker's API did not transform a request: one variant per reason, each
//! with its status and code ([`etlmesh_http::ApiError`]).

use std::time::Duration;

use etlmesh_http::ApiError;
use http::StatusCode;

const FORMATS: &str = etlmesh_config::Format::CONTENT_TYPES;

/// A request the worker refuses or could not serve.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// The worker drains: gateways should send elsewhere.
    #[error("the worker is draining")]
    Draining,
    /// No pipeline of that name here.
    #[error("no pipeline named `{name}`; this worker serves: {serves}")]
    UnknownPipeline { name: String, serves: String },
    /// As many requests in flight as it takes.
    #[error("the worker already serves {0} requests; retry shortly")]
    Overloaded(usize),
    /// `Content-Type` names no format the worker reads.
    #[error("set Content-Type to one of {FORMATS}")]
    UnsupportedMediaType,
    /// `Accept` names no format the worker writes.
    #[error("cannot answer in `{0}`; ask for one of {FORMATS}")]
    NotAcceptable(String),
    /// The request's deadline passed.
    #[error("the transform did not finish within its deadline of {} ms; send fewer records per request or a longer deadline", .0.as_millis())]
    Deadline(Duration),
    /// The body is over the limit.
    #[error("the body is over the worker's limit of {0} bytes; split it into smaller requests")]
    TooLarge(usize),
    /// The body could not be read off the connection.
    #[error("the body could not be read")]
    Unreadable(#[source] Box<axum::Error>),
    /// The body does not decode as a whole (a bad record is a reject, not this).
    #[error("{0}")]
    BadBody(String),
    /// The pipeline's SQL does not plan over the columns the body has.
    #[error("the pipeline's SQL does not plan for this body's columns ({columns}): {source}")]
    SqlDoesNotPlan {
        columns: String,
        #[source]
        source: Box<etlmesh_engine::EngineError>,
    },
    /// A bad record, and the pipeline refuses them (`on_error: fail`).
    #[error(
        "{0}; the pipeline refuses bad records (on_error: fail): fix the record, or give the pipeline a dead_letter sink"
    )]
    BadRecord(String),
    /// Bad records could not be dead-lettered.
    #[error("bad records could not be dead-lettered, so the request is refused: {0}")]
    DeadLetterFailed(#[source] Box<etlmesh_sink::SinkError>),
    /// The SQL failed while running, or the answer could not be encoded.
    #[error("{0}")]
    TransformFailed(String),
    /// `etlmesh tap` asked for a stage that does not exist.
    #[error("no stage `{0}`; tap one of input, output, dead_letter")]
    BadStage(String),
}

impl ApiError for Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Self::Draining | Self::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::UnknownPipeline { .. } => StatusCode::NOT_FOUND,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            Self::Deadline(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Unreadable(_) | Self::BadBody(_) | Self::BadStage(_) => StatusCode::BAD_REQUEST,
            Self::SqlDoesNotPlan { .. } | Self::BadRecord(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::DeadLetterFailed(_) | Self::TransformFailed(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::Draining => "draining",
            Self::UnknownPipeline { .. } => "unknown_pipeline",
            Self::Overloaded(_) => "overloaded",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::NotAcceptable(_) => "not_acceptable",
            Self::Deadline(_) => "deadline_exceeded",
            Self::TooLarge(_) => "payload_too_large",
            Self::Unreadable(_) | Self::BadBody(_) => "bad_body",
            Self::SqlDoesNotPlan { .. } => "sql_does_not_plan",
            Self::BadRecord(_) => "bad_record",
            Self::DeadLetterFailed(_) => "dead_letter_failed",
            Self::TransformFailed(_) => "transform_failed",
            Self::BadStage(_) => "bad_stage",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_names_what_to_do() {
        let e = Refusal::Deadline(Duration::from_millis(250));
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(e.to_string().contains("250 ms"), "{e}");
        let e = Refusal::TooLarge(1024);
        assert_eq!(
            (e.status(), e.code()),
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        );
        assert!(e.to_string().contains("split it"), "{e}");
    }

    #[test]
    fn shed_answers_ask_to_retry() {
        for e in [Refusal::Draining, Refusal::Overloaded(8)] {
            let resp = e.respond(Some("abc".into()));
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(resp.headers()[http::header::RETRY_AFTER], "1");
        }
    }
}
