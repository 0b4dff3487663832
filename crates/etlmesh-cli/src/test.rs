//! `etlmesh test -c FILE [TESTS...]`: runs the pipeline file's tests (by default the
//! file beside it, `<name>.tests.yaml`) without any server, prints each test with the
//! differences of those that failed, and exits non-zero when one did.

use std::path::PathBuf;

use etlmesh_config::PipelineFile;

use crate::{CliError, ConfigArg, runtime};

/// Arguments of `test`.
#[derive(Debug, clap::Args)]
pub struct TestArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Test files (default: `<file>.tests.yaml` beside the pipeline file).
    pub tests: Vec<PathBuf>,
}

pub(crate) fn test(args: &TestArgs) -> Result<(), CliError> {
    let file = PipelineFile::load(&args.config.config)?;
    let tests = if args.tests.is_empty() {
        let beside = etlmesh_pipetest::beside(&args.config.config);
        if !beside.exists() {
            return Err(CliError::NoTests {
                config: args.config.config.clone(),
                beside,
            });
        }
        vec![beside]
    } else {
        args.tests.clone()
    };
    let rt = runtime(1)?;
    let (mut passed, mut failed) = (0usize, 0usize);
    for t in &tests {
        let reports = rt
            .block_on(etlmesh_pipetest::run(&file, t))
            .map_err(CliError::from)?;
        for r in reports {
            let head = format!("test {}: {} (pipeline {})", t.display(), r.name, r.pipeline);
            match &r.result {
                Ok(diff) if diff.is_empty() => {
                    passed += 1;
                    println!("{head} ... ok");
                }
                Ok(diff) => {
                    failed += 1;
                    println!("{head} ... FAILED");
                    for d in diff {
                        println!("    {d}");
                    }
                }
                Err(e) => {
                    failed += 1;
                    println!("{head} ... ERROR");
                    println!("    {e}");
                }
            }
        }
    }
    println!(
        "\n{} tests: {passed} passed, {failed} failed",
        passed + failed
    );
    if failed > 0 {
        return Err(CliError::TestsFailed { failed });
    }
    Ok(())
}
