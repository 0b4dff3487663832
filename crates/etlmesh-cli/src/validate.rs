//! `etlmesh validate FILE`: every check that can be made without running anything.

use std::path::PathBuf;
use std::sync::Arc;

use etlmesh_config::{Diagnostic, PipelineFile, SinkSpec, SourceKind};
use etlmesh_engine::{Engine, EngineConfig, Kind};

use crate::{CliError, runtime, sql_diag};

/// Arguments of `validate`.
#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// The pipeline file.
    pub file: PathBuf,
}

pub(crate) fn validate(args: &ValidateArgs) -> Result<(), CliError> {
    let file = PipelineFile::load(&args.file)?;
    let rt = runtime(1)?;
    let mut diags: Vec<Diagnostic> = Vec::new();
    let engine = Engine::new(EngineConfig::for_platform(&file.spec.platform, 1)).map_err(|e| {
        CliError::Config(file.located(vec![file.diagnostic("platform.sql_options", e.to_string())]))
    })?;
    for p in &file.spec.pipelines {
        for (i, sink) in p.sinks.iter().enumerate() {
            if let Err(e) = etlmesh_sink::check_writable(sink) {
                diags.push(file.diagnostic(
                    format!("pipelines.{}.sinks[{i}].path", p.name),
                    e.to_string(),
                ));
            }
        }
        let schema = match &p.schema {
            Some(_) if p.stream_source().is_some() => etlmesh_stream::sql_input_schema(p),
            Some(fields) => Some(etlmesh_codec::schema::arrow_schema(fields)),
            None => infer_from_source(&file, p),
        };
        let Some(schema) = schema else {
            println!(
                "pipeline {}: no schema declared and no sample to infer one; the SQL is checked at run time",
                p.name
            );
            continue;
        };
        match rt.block_on(engine.compile(&p.name, &p.transform, schema.clone())) {
            Ok(t) => {
                for (i, problem) in etlmesh_stream::check_sinks(p, t.output_schema()) {
                    diags
                        .push(file.diagnostic(format!("pipelines.{}.sinks[{i}]", p.name), problem));
                }
                for (i, sink) in p.sinks.iter().enumerate() {
                    if let SinkSpec::File(f) = sink {
                        for (j, col) in f.partition_by.iter().enumerate() {
                            if t.output_schema().index_of(col).is_err() {
                                diags.push(
                                    file.diagnostic(
                                        format!(
                                            "pipelines.{}.sinks[{i}].partition_by[{j}]",
                                            p.name
                                        ),
                                        format!(
                                            "`{col}` is not a column of the transform's output"
                                        ),
                                    )
                                    .with_help(format!(
                                        "the output has: {}",
                                        etlmesh_codec::schema::describe(t.output_schema())
                                    )),
                                );
                            }
                        }
                    }
                }
                let mode = match t.kind() {
                    Kind::RowWise => "per-batch",
                    Kind::WholeInput => "whole-input",
                };
                println!(
                    "pipeline {}: ok ({mode} SQL)\n  input:  {}\n  output: {}",
                    p.name,
                    etlmesh_codec::schema::describe(&schema),
                    etlmesh_codec::schema::describe(t.output_schema())
                );
                if let Some(m) = p.mqtt() {
                    println!("{}", broker_note(m, p.scaling.max_replicas));
                }
            }
            Err(e) => diags.push(sql_diag::plan_diagnostic(&file, &p.name, &e)),
        }
    }
    if diags.is_empty() {
        println!("{}: valid", args.file.display());
        Ok(())
    } else {
        Err(CliError::Config(file.located(diags)))
    }
}

/// What a stream needs of its MQTT broker to lose nothing, printed under the pipeline.
fn broker_note(m: &etlmesh_config::MqttSourceSpec, max_replicas: u32) -> String {
    let sub = if max_replicas == 1 {
        format!(
            "subscribes to `{}` (one worker: a plain persistent subscription, kept across a broker restart)",
            m.filter
        )
    } else {
        format!(
            "subscribes to `{}` (shared by up to {max_replicas} workers; Mosquitto forgets shared subscriptions when it restarts)",
            m.shared_filter()
        )
    };
    let queued = if m.broker_keeps_queued {
        "the broker is said to keep every queued message (`broker_keeps_queued: true`)".to_string()
    } else {
        "the broker must keep what it queues for a worker, or a sink that is down or a worker that dies can lose messages: Mosquitto drops past `max_queued_messages` (1,000 by default; set 0), then say `broker_keeps_queued: true`".to_string()
    };
    format!("  stream: {sub}\n  note: {queued}")
}

/// A schema inferred from the source's first file, when it names one that exists.
fn infer_from_source(
    file: &PipelineFile,
    p: &etlmesh_config::PipelineSpec,
) -> Option<Arc<arrow::datatypes::Schema>> {
    let SourceKind::File { path: Some(_) } = &p.source.kind else {
        return None;
    };
    let inputs = etlmesh_batch::resolve_inputs(p, &[]).ok()?;
    let first = inputs.first()?;
    let limits = etlmesh_codec::Limits {
        batch_size: file.spec.platform.batch_size,
        max_record_bytes: file.spec.platform.max_record_bytes,
    };
    etlmesh_batch::infer_schema(
        first,
        &p.source.csv,
        &limits,
        file.spec.platform.read_chunk as usize,
        p.source.infer_rows,
    )
    .ok()
}
