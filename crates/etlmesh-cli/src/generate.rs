//! `etlmesh generate`: realistic IoT readings for trying pipelines and benchmarks.

use std::path::PathBuf;

use clap::ValueEnum;
use etlmesh_datagen::{GenFormat, GenOptions};

use crate::CliError;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// CSV with a header.
    Csv,
    /// One JSON object per line.
    Ndjson,
}

/// Arguments of `generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// Readings to write.
    #[arg(long, default_value_t = 100_000)]
    pub rows: u64,
    /// Distinct devices.
    #[arg(long, default_value_t = 1000)]
    pub devices: u32,
    /// Fraction of malformed rows (0 to 1).
    #[arg(long, default_value_t = 0.001)]
    pub bad_fraction: f64,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Format (default: from the output's extension, else CSV).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Output file (stdout when absent).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
}

pub(crate) fn generate(args: &GenerateArgs) -> Result<(), CliError> {
    if !(0.0..=1.0).contains(&args.bad_fraction) {
        return Err(CliError::argument(
            "--bad-fraction",
            format!("{} is not between 0 and 1", args.bad_fraction),
        ));
    }
    let format = match args.format {
        Some(Format::Csv) => GenFormat::Csv,
        Some(Format::Ndjson) => GenFormat::Ndjson,
        None => match args
            .output
            .as_ref()
            .and_then(|p| p.extension())
            .and_then(|e| e.to_str())
        {
            Some("ndjson" | "jsonl") => GenFormat::Ndjson,
            _ => GenFormat::Csv,
        },
    };
    let opts = GenOptions {
        rows: args.rows,
        devices: args.devices,
        bad_fraction: args.bad_fraction,
        seed: args.seed,
        format,
        ..GenOptions::default()
    };
    let stats = match &args.output {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(CliError::io(format!("create {}", dir.display())))?;
            }
            let f = std::fs::File::create(path)
                .map_err(CliError::io(format!("write {}", path.display())))?;
            etlmesh_datagen::generate(f, &opts)
        }
        None => etlmesh_datagen::generate(std::io::stdout().lock(), &opts),
    }
    .map_err(CliError::io("write the readings"))?;
    eprintln!(
        "wrote {} readings ({} malformed) from {} devices, {} bytes{}",
        stats.rows,
        stats.bad_rows,
        args.devices,
        stats.bytes,
        args.output
            .as_ref()
            .map(|p| format!(" to {}", p.display()))
            .unwrap_or_default()
    );
    Ok(())
}
