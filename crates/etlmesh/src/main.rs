//! The `etlmesh` binary: parses arguments, sets up logging, and hands over to
//! [`etlmesh_cli`].

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use etlmesh_cli::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("ETLMESH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
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
    if json {
        registry.with(fmt.json().flatten_event(true)).init();
    } else {
        registry.with(fmt.with_target(false)).init();
    }
    etlmesh_cli::execute(cli)
}
