//! `etlmesh demo`: a first look in one command. It writes the example pipeline file,
//! generates readings with a few bad rows, and runs both example pipelines over them.

use std::path::PathBuf;

use etlmesh_batch::{JobOptions, ProgressMode};
use etlmesh_config::PipelineFile;
use etlmesh_datagen::GenOptions;

use crate::{CliError, runtime};

/// The example pipeline file, built into the binary.
pub const EXAMPLE: &str = include_str!("../../../examples/iot.yaml");

/// Arguments of `demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Readings to generate.
    #[arg(long, default_value_t = 200_000)]
    pub rows: u64,
    /// Where the demo writes (its data/ directory is created there).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
}

/// Writes `data/iot.yaml` and a small sample for `etlmesh up --demo`; returns the file.
pub(crate) fn prepare_mesh_demo() -> Result<PathBuf, CliError> {
    let io = |what: &str, e: std::io::Error| CliError::Other(format!("demo: cannot {what}: {e}"));
    std::fs::create_dir_all("data").map_err(|e| io("create data/", e))?;
    let config = PathBuf::from("data/iot.yaml");
    std::fs::write(&config, EXAMPLE).map_err(|e| io("write data/iot.yaml", e))?;
    let sample =
        std::fs::File::create("data/sample.csv").map_err(|e| io("write data/sample.csv", e))?;
    etlmesh_datagen::generate(
        sample,
        &GenOptions {
            rows: 1000,
            bad_fraction: 0.01,
            ..Default::default()
        },
    )
    .map_err(|e| io("generate data/sample.csv", e))?;
    Ok(config)
}

pub(crate) fn demo(args: &DemoArgs) -> Result<(), CliError> {
    let io = |what: &str, e: std::io::Error| CliError::Other(format!("demo: cannot {what}: {e}"));
    std::fs::create_dir_all(args.dir.join("data")).map_err(|e| io("create data/", e))?;
    std::env::set_current_dir(&args.dir).map_err(|e| io("enter the demo directory", e))?;
    let config = PathBuf::from("data/iot.yaml");
    std::fs::write(&config, EXAMPLE).map_err(|e| io("write data/iot.yaml", e))?;
    let readings = PathBuf::from("data/readings.csv");
    let file = std::fs::File::create(&readings).map_err(|e| io("write data/readings.csv", e))?;
    let stats = etlmesh_datagen::generate(
        file,
        &GenOptions {
            rows: args.rows,
            bad_fraction: 0.002,
            ..Default::default()
        },
    )
    .map_err(|e| io("generate readings", e))?;
    eprintln!(
        "generated {} readings ({} malformed) into {}\n",
        stats.rows,
        stats.bad_rows,
        readings.display()
    );
    let file = PipelineFile::load(&config)?;
    let rt = runtime(file.spec.platform.effective_threads())?;
    for p in &file.spec.pipelines {
        let opts = JobOptions {
            inputs: vec![readings.display().to_string()],
            progress: ProgressMode::Auto,
        };
        let summary = rt.block_on(etlmesh_batch::run(&file, &p.name, &opts))?;
        eprintln!("{summary}");
    }
    eprintln!(
        "outputs are under {}/data/out; the pipeline file is {}",
        args.dir.display(),
        config.display()
    );
    eprintln!(
        "next: etlmesh run -c {} --pipeline readings_per_minute data/readings.csv",
        config.display()
    );
    Ok(())
}
