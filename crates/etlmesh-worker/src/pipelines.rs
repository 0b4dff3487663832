//! The pipelines a worker serves: compiled once when their schema is declared, per
//! distinct body schema (a small cache) when it is inferred.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use etlmesh_codec::Limits;
use etlmesh_config::{PipelineFile, PipelineSpec};
use etlmesh_engine::{Engine, EngineConfig, EngineError, Transform};
use etlmesh_proto::PipelineInfo;
use etlmesh_sink::dead_letter::DeadLetterLog;

use crate::WorkerError;

/// Inferred schemas kept compiled per pipeline.
const INFERRED_CACHE: usize = 16;

/// One pipeline.
pub(crate) struct Pipeline {
    pub spec: PipelineSpec,
    pub schema: Option<SchemaRef>,
    pub transform: Option<Arc<Transform>>,
    pub dead: Option<Arc<DeadLetterLog>>,
    inferred: Mutex<Vec<(SchemaRef, Arc<Transform>)>>,
    /// Its Prometheus handles, made on its first request.
    pub metrics: std::sync::OnceLock<crate::metrics::PipelineHandles>,
    /// Records and CPU time of its work, for the energy accounting.
    pub usage: Arc<crate::load::Usage>,
}

impl Pipeline {
    /// The transform for rows of `schema`.
    pub async fn transform_for(
        &self,
        engine: &Engine,
        schema: &SchemaRef,
    ) -> Result<Arc<Transform>, EngineError> {
        if let Some(t) = &self.transform {
            return Ok(t.clone());
        }
        if let Some((_, t)) = self.inferred.lock().iter().find(|(s, _)| s == schema) {
            return Ok(t.clone());
        }
        let t = Arc::new(
            engine
                .compile(&self.spec.name, &self.spec.transform, schema.clone())
                .await?,
        );
        let mut cache = self.inferred.lock();
        if cache.len() >= INFERRED_CACHE {
            cache.remove(0);
        }
        cache.push((schema.clone(), t.clone()));
        Ok(t)
    }
}

/// Every pipeline of the file.
pub(crate) struct Pipelines {
    pub engine: Engine,
    pub limits: Limits,
    map: HashMap<String, Arc<Pipeline>>,
    order: Vec<String>,
}

impl Pipelines {
    /// Compiles the pipelines whose schema is declared; opens dead-letter logs.
    /// Compiles the pipelines named in `only` (every pipeline when empty).
    pub async fn compile(
        file: &PipelineFile,
        worker: &str,
        only: &[String],
    ) -> Result<Self, WorkerError> {
        for name in only {
            file.pipeline(name)
                .map_err(|e| WorkerError::Pipeline(e.to_string()))?;
        }
        let platform = &file.spec.platform;
        let engine = Engine::new(EngineConfig::for_platform(platform, 1))
            .map_err(|e| WorkerError::Pipeline(e.to_string()))?;
        let mut map = HashMap::new();
        let mut order = Vec::new();
        for spec in file
            .spec
            .pipelines
            .iter()
            .filter(|p| only.is_empty() || only.contains(&p.name))
        {
            let schema = spec
                .schema
                .as_ref()
                .map(|f| etlmesh_codec::schema::arrow_schema(f));
            // A windowed pipeline's SQL reads window columns: it runs on the stream only.
            let transform = match &schema {
                Some(_)
                    if spec.window.is_some()
                        || spec
                            .stream_source()
                            .is_some_and(|m| !m.columns().is_empty()) =>
                {
                    None
                }
                Some(s) => Some(Arc::new(
                    engine
                        .compile(&spec.name, &spec.transform, s.clone())
                        .await
                        .map_err(|e| WorkerError::Pipeline(e.to_string()))?,
                )),
                None => None,
            };
            let dead = spec
                .dead_letter
                .as_ref()
                .map(|d| DeadLetterLog::open(d, &spec.name, worker).map(Arc::new))
                .transpose()
                .map_err(|e| WorkerError::Pipeline(e.to_string()))?;
            order.push(spec.name.clone());
            map.insert(
                spec.name.clone(),
                Arc::new(Pipeline {
                    spec: spec.clone(),
                    schema,
                    transform,
                    dead,
                    inferred: Mutex::default(),
                    metrics: std::sync::OnceLock::new(),
                    usage: Arc::default(),
                }),
            );
        }
        let limits = Limits {
            batch_size: platform.batch_size,
            max_record_bytes: platform.max_record_bytes,
        };
        Ok(Self {
            engine,
            limits,
            map,
            order,
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<Pipeline>> {
        self.map.get(name).cloned()
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn names(&self) -> &[String] {
        &self.order
    }

    /// The dead-letter log of each pipeline that has one.
    pub fn dead_letter_logs(&self) -> impl Iterator<Item = (&str, &Arc<DeadLetterLog>)> {
        self.order.iter().filter_map(|n| {
            self.map
                .get(n)
                .and_then(|p| p.dead.as_ref().map(|d| (n.as_str(), d)))
        })
    }

    /// Each pipeline's usage counters, in file order.
    pub fn usage(&self) -> Vec<(String, Arc<crate::load::Usage>)> {
        self.order
            .iter()
            .filter_map(|n| self.map.get(n).map(|p| (n.clone(), p.usage.clone())))
            .collect()
    }

    /// What the worker tells the control plane about its pipelines.
    pub fn infos(&self) -> Vec<PipelineInfo> {
        self.order
            .iter()
            .filter_map(|n| self.map.get(n))
            .map(|p| PipelineInfo {
                name: p.spec.name.clone(),
                description: p.spec.description.clone(),
                input_schema: p
                    .schema
                    .as_ref()
                    .map(|s| etlmesh_codec::schema::describe(s)),
                output_schema: p
                    .transform
                    .as_ref()
                    .map(|t| etlmesh_codec::schema::describe(t.output_schema())),
                output_schema_ipc: p
                    .transform
                    .as_ref()
                    .and_then(|t| etlmesh_codec::schema::schema_to_base64(t.output_schema())),
                source: Some(p.spec.describe_source()),
                sinks: p.spec.describe_sinks(),
            })
            .collect()
    }
}
