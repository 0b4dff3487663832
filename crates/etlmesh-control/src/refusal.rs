//! Why the control plane's API refused a request: one variant per reason, each with
//! its status and code ([`etlmesh_http::ApiError`]).

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use etlmesh_http::ApiError;
use http::StatusCode;

use crate::jobs::JobsError;

/// A request the control plane refuses or could not serve.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    /// `POST /v1/pools/{p}/activate` for a pipeline it does not scale.
    #[error("`{0}` is not a pipeline this control plane scales")]
    NotScaled(String),
    /// A registration without an id or an address.
    #[error("a registration needs an id and an address")]
    BadRegistration,
    /// A heartbeat from a worker it does not know.
    #[error("no worker `{0}`; register first")]
    UnknownWorker(String),
    /// A log level it does not know.
    #[error("level must be one of error, warn, info, debug, trace")]
    BadLevel,
    /// No worker serves the pipeline to tap.
    #[error(
        "no worker serves `{0}` now; check the name at /api/v1/pipelines (a pipeline scaled to zero starts on its next request)"
    )]
    NoWorker(String),
    /// It runs without a pipeline file, which `what` needs.
    #[error(
        "this control plane runs without a pipeline file: start it with -c FILE (or use etlmesh up) to {what}"
    )]
    NoPipelineFile { what: &'static str },
    /// A replay runs already.
    #[error("a dead-letter replay is running; try again when it has finished")]
    ReplayRunning,
    /// `etlmesh deadletters` could not be started.
    #[error("cannot run etlmesh deadletters: {0}")]
    DeadLettersFailed(#[source] std::io::Error),
    /// `etlmesh deadletters` ran past its limit.
    #[error(
        "etlmesh deadletters {action} took more than {limit:?} and was stopped; pick fewer letters (since, where, ids)"
    )]
    DeadLettersTimeout { action: String, limit: Duration },
    /// `etlmesh deadletters` refused (what it said on stderr).
    #[error("{message}")]
    DeadLettersRefused { message: String, not_found: bool },
    /// No token, or one it does not know.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A token that may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// It runs without a mesh.
    #[error("this control plane runs without mTLS: there is nothing to join")]
    NoMesh,
    /// A join token it does not accept.
    #[error(
        "{0}; use the one in the control plane's state directory (mesh/join-token), or mint one with `etlmesh token join`"
    )]
    BadJoinToken(String),
    /// A certificate request it cannot sign.
    #[error("{0}")]
    BadCertificateRequest(#[source] etlmesh_tls::TlsError),
    /// A peer without a certificate of this mesh.
    #[error("{0}")]
    NoMeshCertificate(&'static str),
    /// A renewal of a revoked certificate.
    #[error("certificate {0} is revoked; join again with a join token")]
    RenewRevoked(String),
    /// A request with a revoked certificate.
    #[error("this certificate is revoked: join again with a join token")]
    Revoked,
    /// A renewal for another identity than the certificate's.
    #[error(
        "a certificate renews itself only: this one is `{name}` ({role}, hosts {hosts:?}); join with a join token for another identity"
    )]
    IdentityMismatch {
        name: String,
        role: &'static str,
        hosts: Vec<String>,
    },
    /// The worker protocol asked of the admin listener.
    #[error(
        "the worker protocol is served on the control plane's mesh listener, over mTLS; join the mesh and use its https:// address"
    )]
    MeshListenerOnly,
    /// It runs no batch jobs.
    #[error(
        "this control plane runs no batch jobs\n  help: start it with a pipeline file (-c FILE) to run jobs"
    )]
    JobsDisabled,
    /// A job that is not valid JSON.
    #[error(
        "the job is not valid JSON: {0}\n  help: send {{\"pipeline\": \"…\", \"inputs\": [\"data/*.csv\"], \"deadline\": \"RFC 3339\", \"expected_duration_secs\": 600}}"
    )]
    BadJobJson(#[source] serde_json::Error),
    /// A jobs query it cannot read.
    #[error(
        "{0}\n  help: give at most one `state` (scheduled, running, succeeded, failed, cancelled) and one `limit` (a number)"
    )]
    BadQuery(String),
    /// A job state it does not know.
    #[error("no job state `{0}`; use scheduled, running, succeeded, failed or cancelled")]
    BadState(String),
    /// What the job store refused.
    #[error(transparent)]
    Jobs(#[from] JobsError),
}

impl ApiError for Refusal {
    fn status(&self) -> StatusCode {
        match self {
            Self::NotScaled(_)
            | Self::UnknownWorker(_)
            | Self::NoWorker(_)
            | Self::NoPipelineFile { .. }
            | Self::NoMesh
            | Self::JobsDisabled => StatusCode::NOT_FOUND,
            Self::BadRegistration
            | Self::BadLevel
            | Self::BadCertificateRequest(_)
            | Self::BadJobJson(_)
            | Self::BadQuery(_)
            | Self::BadState(_) => StatusCode::BAD_REQUEST,
            Self::ReplayRunning => StatusCode::CONFLICT,
            Self::DeadLettersFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::DeadLettersTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Self::DeadLettersRefused { not_found, .. } => {
                if *not_found {
                    StatusCode::NOT_FOUND
                } else {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
            }
            Self::Unauthorized(_)
            | Self::BadJoinToken(_)
            | Self::NoMeshCertificate(_)
            | Self::Revoked => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_)
            | Self::RenewRevoked(_)
            | Self::IdentityMismatch { .. }
            | Self::MeshListenerOnly => StatusCode::FORBIDDEN,
            Self::Jobs(e) => match e {
                JobsError::Invalid(_) => StatusCode::BAD_REQUEST,
                JobsError::NotFound(_) => StatusCode::NOT_FOUND,
                JobsError::Conflict(_) => StatusCode::CONFLICT,
                JobsError::Full(_) => StatusCode::SERVICE_UNAVAILABLE,
                JobsError::Db(_) | JobsError::Open { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    fn code(&self) -> &'static str {
        match self {
            Self::NotScaled(_) => "not_scaled",
            Self::BadRegistration => "bad_registration",
            Self::UnknownWorker(_) => "unknown_worker",
            Self::BadLevel => "bad_level",
            Self::NoWorker(_) => "no_worker",
            Self::NoPipelineFile { .. } => "no_pipeline_file",
            Self::ReplayRunning => "replay_running",
            Self::DeadLettersFailed(_) => "deadletters_failed",
            Self::DeadLettersTimeout { .. } => "deadletters_timeout",
            Self::DeadLettersRefused { .. } => "deadletters_refused",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NoMesh => "no_mesh",
            Self::BadJoinToken(_) => "bad_join_token",
            Self::BadCertificateRequest(_) => "bad_certificate_request",
            Self::NoMeshCertificate(_) => "no_mesh_certificate",
            Self::RenewRevoked(_) | Self::Revoked => "certificate_revoked",
            Self::IdentityMismatch { .. } => "identity_mismatch",
            Self::MeshListenerOnly => "mesh_listener_only",
            Self::JobsDisabled => "jobs_disabled",
            Self::BadJobJson(_) => "bad_job",
            Self::BadQuery(_) => "bad_query",
            Self::BadState(_) => "bad_state",
            Self::Jobs(e) => match e {
                JobsError::Invalid(_) => "bad_job",
                JobsError::NotFound(_) => "unknown_job",
                JobsError::Conflict(_) => "job_state",
                JobsError::Full(_) => "jobs_full",
                JobsError::Db(_) | JobsError::Open { .. } => "jobs_store",
            },
        }
    }

    fn challenge(&self) -> Option<&'static str> {
        matches!(self, Self::Unauthorized(_)).then_some("Bearer")
    }

    fn retry_after(&self) -> Option<u64> {
        // A full job queue empties as jobs finish, in minutes rather than seconds.
        matches!(self, Self::Jobs(JobsError::Full(_))).then_some(60)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        self.respond(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_job_queue_asks_for_a_minute() {
        let r = Refusal::Jobs(JobsError::Full(64)).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[http::header::RETRY_AFTER], "60");
    }

    #[test]
    fn both_revocations_say_certificate_revoked() {
        let renew = Refusal::RenewRevoked("0a".into());
        assert_eq!(
            (renew.status(), renew.code()),
            (StatusCode::FORBIDDEN, "certificate_revoked")
        );
        assert_eq!(Refusal::Revoked.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn a_refused_replay_of_an_unknown_pipeline_is_not_found() {
        let e = Refusal::DeadLettersRefused {
            message: "no pipeline named `x`".into(),
            not_found: true,
        };
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.into_response().status(), StatusCode::NOT_FOUND);
    }
}
