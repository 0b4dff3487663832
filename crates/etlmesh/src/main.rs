//! The `etlmesh` binary: parses arguments, sets up logging, and hands over to
//! [`etlmesh_cli`].

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use etlmesh_cli::{Cli, LogFormat};
use etlmesh_telemetry::context::WithRequest;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

mod alloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A static per-target filter when ETLMESH_LOG is one (the usual case): it costs
    // nothing when a span is entered, where `EnvFilter` takes a lock to track span
    // scopes. Span and field directives (`[request{pipeline=x}]=debug`) need `EnvFilter`.
    let spec = std::env::var("ETLMESH_LOG").unwrap_or_else(|_| "info".into());
    let filter: Box<dyn Layer<Registry> + Send + Sync> = match spec.parse::<Targets>() {
        Ok(targets) => Box::new(targets),
        Err(_) => Box::new(EnvFilter::try_new(&spec).unwrap_or_else(|_| EnvFilter::new("info"))),
    };
    let json = match cli.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    // Lines also go to an in-memory ring that the control plane collects (`etlmesh logs`).
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(etlmesh_telemetry::logs::Capture::global());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // Lines written while a request is served name its trace and pipeline (the
    // handlers' task-local context, cheaper than a span per request).
    if json {
        // Span fields are formatted when a span starts: the lean formatter keeps that cheap.
        registry
            .with(
                fmt.json()
                    .flatten_event(true)
                    .fmt_fields(etlmesh_telemetry::json_fields::LeanJsonFields)
                    .map_event_format(|f| WithRequest::new(f, true)),
            )
            .init();
    } else {
        let ansi = std::io::stderr().is_terminal();
        registry
            .with(
                fmt.with_target(false)
                    .with_ansi(ansi)
                    .map_event_format(|f| WithRequest::new(f.with_ansi(ansi), false)),
            )
            .init();
    }
    etlmesh_cli::execute(cli)
}
