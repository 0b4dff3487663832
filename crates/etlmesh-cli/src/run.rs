//! `etlmesh run -c FILE --pipeline NAME [INPUT...]`: a batch job on this machine.

use std::path::PathBuf;

use clap::ValueEnum;
use etlmesh_batch::{JobError, JobOptions, ProgressMode};
use etlmesh_config::PipelineFile;

use crate::{CliError, ConfigArg, runtime, sql_diag};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Progress {
    /// A bar on a terminal, log lines otherwise.
    Auto,
    /// Periodic log lines.
    Log,
    /// Nothing.
    Off,
}

/// Arguments of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The pipeline to run.
    #[arg(short, long)]
    pub pipeline: String,
    /// Input files, directories or patterns (`data/*.csv`), or `-` for stdin; the
    /// source's path when none is given.
    pub inputs: Vec<String>,
    /// Progress display.
    #[arg(long, value_enum, default_value_t = Progress::Auto)]
    pub progress: Progress,
    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub summary_json: Option<PathBuf>,
    /// Threads (default: the file's `platform.threads`, else one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Read inputs only under this directory (repeatable; symbolic links resolved):
    /// how the control plane runs jobs submitted through the gateway.
    #[arg(long, value_name = "DIR")]
    pub inputs_under: Vec<PathBuf>,
}

pub(crate) fn run(args: &RunArgs) -> Result<(), CliError> {
    let mut file = PipelineFile::load(&args.config.config)?;
    if let Some(t) = args.threads {
        file.spec.platform.threads = t;
    }
    let opts = JobOptions {
        inputs: args.inputs.clone(),
        progress: match args.progress {
            Progress::Auto => ProgressMode::Auto,
            Progress::Log => ProgressMode::Log,
            Progress::Off => ProgressMode::Off,
        },
        inputs_under: args.inputs_under.clone(),
    };
    let rt = runtime(file.spec.platform.effective_threads())?;
    let summary = match rt.block_on(etlmesh_batch::run(&file, &args.pipeline, &opts)) {
        Ok(s) => s,
        Err(JobError::Engine(e @ etlmesh_engine::EngineError::Plan { .. })) => {
            let d = sql_diag::plan_diagnostic(&file, &args.pipeline, &e);
            return Err(CliError::Config(etlmesh_config::ConfigError::one(d)));
        }
        Err(e) => return Err(e.into()),
    };
    eprint!("{summary}");
    tracing::info!(
        pipeline = %summary.pipeline,
        records_in = summary.records_in,
        records_out = summary.records_out,
        filtered = summary.filtered,
        dead_lettered = summary.dead_lettered,
        elapsed_secs = summary.elapsed_secs,
        "run finished"
    );
    if let Some(path) = &args.summary_json {
        // The run's CPU time rides along: a job's energy is charged from it.
        let mut value = serde_json::to_value(&summary).map_err(CliError::from)?;
        if let Some(cpu) = etlmesh_telemetry::process::cpu_seconds(None) {
            value["cpu_seconds"] = serde_json::json!(cpu);
        }
        let json = serde_json::to_vec_pretty(&value).map_err(CliError::from)?;
        std::fs::write(path, json).map_err(CliError::io(format!(
            "write the summary to {}",
            path.display()
        )))?;
    }
    Ok(())
}
