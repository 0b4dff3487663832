//! The `etlmesh` binary: parses arguments, sets up logging, and hands over to
//! [`etlmesh_cli`].

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use etlmesh_cli::{Cli, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_env("ETLMESH_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match cli.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.with_target(false).init();
    }
    etlmesh_cli::execute(cli)
}
