//! What a subcommand reports before exiting non-zero: one [`CliError`] whose
//! variants say which kind of thing went wrong, keep the error underneath as their
//! source, and end with what to do next.

use std::fmt;

/// An error underneath a [`CliError`], of whichever library raised it.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The mesh service a command talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// The gateway's public side (`--gateway`).
    Gateway,
    /// The control plane's admin API (`--control-plane`).
    ControlPlane,
}

impl Peer {
    /// What to do when it does not answer.
    fn help(self) -> &'static str {
        match self {
            Peer::Gateway => "start the mesh with `etlmesh up`, or pass --gateway URL",
            Peer::ControlPlane => "start one with `etlmesh up`, or pass --control-plane URL",
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Peer::Gateway => "gateway",
            Peer::ControlPlane => "control plane",
        })
    }
}

/// Errors a subcommand reports before exiting non-zero.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A pipeline file problem.
    #[error("{0}")]
    Config(#[from] etlmesh_config::ConfigError),
    /// A job failed.
    #[error("{0}")]
    Job(#[from] etlmesh_batch::JobError),
    /// The control plane.
    #[error("{0}")]
    Control(#[from] etlmesh_control::ControlError),
    /// A scaler could not be set up.
    #[error("{0}")]
    Scale(#[from] etlmesh_scale::ScaleError),
    /// MQTT.
    #[error("{0}")]
    Mqtt(#[from] etlmesh_mqtt::MqttError),
    /// A worker stopped with an error.
    #[error("{0}")]
    Worker(#[from] etlmesh_worker::WorkerError),
    /// The gateway stopped with an error.
    #[error("{0}")]
    Gateway(#[from] etlmesh_gateway::GatewayError),
    /// `etlmesh up` stopped with an error.
    #[error("{0}")]
    Up(#[from] etlmesh_up::UpError),
    /// The embedded MQTT broker.
    #[error("{0}")]
    Broker(#[from] etlmesh_broker::BrokerError),
    /// Certificates, join tokens, revocations.
    #[error("{0}")]
    Tls(#[from] etlmesh_tls::TlsError),
    /// An analytics query.
    #[error("{0}")]
    Query(#[from] etlmesh_query::QueryError),
    /// Dead letters: the store, a selection, a replay.
    #[error("{0}")]
    DeadLetters(#[from] etlmesh_deadletters::DeadLetterError),
    /// Pipeline tests.
    #[error("{0}")]
    PipelineTest(#[from] etlmesh_pipetest::TestError),
    /// JSON that could not be written.
    #[error("cannot write JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Span export is misconfigured in the environment.
    #[error(
        "{0}\n  help: fix or unset OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL, OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG"
    )]
    Telemetry(#[source] etlmesh_telemetry::otlp::OtlpError),
    /// An argument (or the environment variable standing for it) that cannot be used.
    #[error("{arg}: {reason}")]
    Argument {
        /// The flag or variable, as the user wrote it.
        arg: String,
        /// Why, and what to give instead.
        reason: String,
    },
    /// The pipeline file lacks what the command needs.
    #[error("{file}: {missing}\n  help: {help}")]
    Missing {
        /// The pipeline file, or the pipeline in it.
        file: String,
        /// What is not there.
        missing: String,
        /// What to add.
        help: String,
    },
    /// Something on this machine failed: a file, a directory, a listener, the terminal.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done, as a verb phrase.
        what: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The gateway or the control plane does not answer.
    #[error("cannot reach the {peer} at {url}: {}\n  help: {}", etlmesh_tls::error_chain(source.as_ref()), peer.help())]
    Unreachable {
        /// Which one.
        peer: Peer,
        /// Where it was looked for.
        url: String,
        /// Why the request failed.
        #[source]
        source: BoxError,
    },
    /// The gateway or the control plane answered with an error.
    #[error("the {peer} answered {status}{}: {message}", code_suffix(code))]
    Refused {
        /// Which one.
        peer: Peer,
        /// The HTTP status.
        status: http::StatusCode,
        /// The error code of its JSON body, if it had one.
        code: Option<String>,
        /// Its message.
        message: String,
    },
    /// The gateway or the control plane answered something this command cannot read.
    #[error("unexpected answer from the {peer}: {source}")]
    Unreadable {
        /// Which one.
        peer: Peer,
        /// Why it could not be read.
        #[source]
        source: BoxError,
    },
    /// A Kafka or NATS client failed.
    #[error("{system} {address}: {reason}")]
    Client {
        /// "Kafka" or "NATS".
        system: &'static str,
        /// The brokers or server.
        address: String,
        /// What failed and why.
        reason: String,
    },
    /// The process could not join the mesh (mTLS).
    #[error("{name}: {source}")]
    Join {
        /// The process's name in the mesh.
        name: String,
        /// Why.
        #[source]
        source: etlmesh_tls::TlsError,
    },
    /// No test file was named and none lies beside the pipeline file.
    #[error("no tests for {}: write {} (see the README's \"Pipeline tests\"), or name test files after the pipeline file", config.display(), beside.display())]
    NoTests {
        /// The pipeline file.
        config: std::path::PathBuf,
        /// Where its tests were looked for.
        beside: std::path::PathBuf,
    },
    /// Pipeline tests ran and some failed.
    #[error("{failed} pipeline tests failed")]
    TestsFailed {
        /// How many.
        failed: usize,
    },
    /// The terminal could not be drawn on.
    #[error("cannot draw: {0}")]
    Draw(String),
    /// The system's random source failed (a token or a key could not be made).
    #[error("the system's random source failed")]
    Random,
}

fn code_suffix(code: &Option<String>) -> String {
    code.as_deref()
        .filter(|c| !c.is_empty())
        .map_or_else(String::new, |c| format!(" ({c})"))
}

impl CliError {
    /// An argument that cannot be used, and why.
    pub(crate) fn argument(arg: impl Into<String>, reason: impl Into<String>) -> Self {
        CliError::Argument {
            arg: arg.into(),
            reason: reason.into(),
        }
    }

    /// A local operation that failed; `what` is a verb phrase ("write data.csv").
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |source| CliError::Io { what, source }
    }

    /// A request to `peer` at `url` that got no answer.
    pub(crate) fn unreachable(
        peer: Peer,
        url: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        CliError::Unreachable {
            peer,
            url: url.into(),
            source: source.into(),
        }
    }

    /// Failures of a Kafka or NATS client at `address`, from what failed and why.
    pub(crate) fn client(system: &'static str, address: &str) -> impl Fn(String) -> Self + use<> {
        let address = address.to_string();
        move |reason| CliError::Client {
            system,
            address: address.clone(),
            reason,
        }
    }

    /// An answer from `peer` that could not be read.
    pub(crate) fn unreadable(peer: Peer, source: impl Into<BoxError>) -> Self {
        CliError::Unreadable {
            peer,
            source: source.into(),
        }
    }

    /// An error answer from `peer`, from its status and body (the mesh's JSON error
    /// body, or text).
    pub(crate) fn refused(peer: Peer, status: http::StatusCode, body: &[u8]) -> Self {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let message = v["message"]
            .as_str()
            .map_or_else(|| String::from_utf8_lossy(body).into_owned(), String::from);
        CliError::Refused {
            peer,
            status,
            code: v["code"].as_str().map(String::from),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_reads_the_json_error_body_or_falls_back_to_text() {
        let json = br#"{"code":"not_found","message":"no pipeline `x`"}"#;
        let e = CliError::refused(Peer::Gateway, http::StatusCode::NOT_FOUND, json);
        assert_eq!(
            e.to_string(),
            "the gateway answered 404 Not Found (not_found): no pipeline `x`"
        );
        let e = CliError::refused(
            Peer::ControlPlane,
            http::StatusCode::BAD_GATEWAY,
            b"upstream down",
        );
        assert_eq!(
            e.to_string(),
            "the control plane answered 502 Bad Gateway: upstream down"
        );
    }

    #[test]
    fn an_unreachable_peer_keeps_its_cause_and_says_what_to_do() {
        let cause = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = CliError::unreachable(Peer::ControlPlane, "http://127.0.0.1:1", cause);
        let text = e.to_string();
        assert!(
            text.starts_with("cannot reach the control plane at http://127.0.0.1:1: refused"),
            "{text}"
        );
        assert!(text.ends_with("pass --control-plane URL"), "{text}");
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn a_local_failure_keeps_the_operating_systems_error() {
        let e = CliError::io("write out.csv")(std::io::Error::from(
            std::io::ErrorKind::PermissionDenied,
        ));
        assert!(e.to_string().starts_with("cannot write out.csv: "), "{e}");
        let source = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
        assert_eq!(
            source.map(std::io::Error::kind),
            Some(std::io::ErrorKind::PermissionDenied)
        );
    }
}
