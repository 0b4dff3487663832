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

/// The streaming pipelines, built into the binary.
pub const STREAM_EXAMPLE: &str = include_str!("../../../examples/iot-stream.yaml");

/// Where the demo streams: the broker, and the PostgreSQL the example loads into.
pub(crate) const DEMO_BROKER: &str = "127.0.0.1:1883";
const DEMO_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// What the streaming part of the demo found.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct DemoStream {
    /// The stream pipelines run, fed by simulated devices.
    pub broker: bool,
    /// Nothing answered on 1883: `up` runs its own broker there.
    pub embedded: bool,
    /// PostgreSQL answers: `live_readings` loads it too.
    pub postgres: bool,
}

/// The demo's pipeline file: the request pipelines and the stream pipelines (without
/// the PostgreSQL sink when PostgreSQL does not answer). When no broker answers on
/// 1883, `up` runs the embedded one there.
fn demo_file() -> (String, DemoStream) {
    let answers = DEMO_BROKER
        .parse()
        .ok()
        .and_then(|a| {
            std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(1)).ok()
        })
        .is_some();
    let postgres = etlmesh_stream::postgres_answers(DEMO_POSTGRES);
    let streams = STREAM_EXAMPLE
        .split_once("\npipelines:\n")
        .map_or("", |(_, rest)| rest)
        .lines()
        .filter(|l| postgres || !l.contains("type: postgres"))
        .collect::<Vec<_>>()
        .join("\n");
    (
        format!("{EXAMPLE}\n{streams}\n"),
        DemoStream {
            broker: true,
            embedded: !answers,
            postgres,
        },
    )
}

/// Writes `data/iot.yaml` and a small sample for `etlmesh up --demo`; returns the file.
pub(crate) fn prepare_mesh_demo() -> Result<(PathBuf, DemoStream), CliError> {
    std::fs::create_dir_all("data").map_err(CliError::io("create data/"))?;
    let config = PathBuf::from("data/iot.yaml");
    let (text, stream) = demo_file();
    std::fs::write(&config, text).map_err(CliError::io("write data/iot.yaml"))?;
    let sample =
        std::fs::File::create("data/sample.csv").map_err(CliError::io("write data/sample.csv"))?;
    etlmesh_datagen::generate(
        sample,
        &GenOptions {
            rows: 1000,
            bad_fraction: 0.01,
            ..Default::default()
        },
    )
    .map_err(CliError::io("generate data/sample.csv"))?;
    Ok((config, stream))
}

pub(crate) fn demo(args: &DemoArgs) -> Result<(), CliError> {
    std::fs::create_dir_all(args.dir.join("data")).map_err(CliError::io("create data/"))?;
    std::env::set_current_dir(&args.dir).map_err(CliError::io("enter the demo directory"))?;
    let config = PathBuf::from("data/iot.yaml");
    std::fs::write(&config, EXAMPLE).map_err(CliError::io("write data/iot.yaml"))?;
    let readings = PathBuf::from("data/readings.csv");
    let file = std::fs::File::create(&readings).map_err(CliError::io("write data/readings.csv"))?;
    let stats = etlmesh_datagen::generate(
        file,
        &GenOptions {
            rows: args.rows,
            bad_fraction: 0.002,
            ..Default::default()
        },
    )
    .map_err(CliError::io("generate readings"))?;
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
            inputs_under: Vec::new(),
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
