//! `GET /api/v1/overview`: everything a live view shows in one answer — the
//! pipelines with their source, sinks and latest figures, the workers with their
//! load, the series since a time, scaling decisions, error groups and log sources.

use std::collections::BTreeMap;

use etlmesh_proto::PipelineInfo;
use serde::Serialize;

use crate::api::ControlState;
use crate::registry::WorkerView;
use crate::timeline::{PipelineStats, Point};

/// Scaling decisions shown at most.
const EVENTS: usize = 50;
/// Error groups shown at most.
const ERROR_GROUPS: usize = 20;

/// One pipeline: what it is and how it does now.
#[derive(Debug, Serialize)]
pub struct PipelineOverview {
    /// Its name.
    pub name: String,
    /// Where records come from (`http`, `mqtt:<topic>`).
    pub source: Option<String>,
    /// Where they go.
    pub sinks: Vec<String>,
    /// The latest figures.
    #[serde(flatten)]
    pub now: PipelineStats,
    /// Errors collected for it (all kinds).
    pub errors_total: u64,
}

/// The answer.
#[derive(Debug, Serialize)]
pub struct Overview {
    /// Unix time in milliseconds.
    pub time: i64,
    /// The scaler in use (none: fixed workers).
    pub scaler: Option<String>,
    /// Gateways heard from in the last seconds.
    pub gateways: usize,
    /// The pipelines.
    pub pipelines: Vec<PipelineOverview>,
    /// The workers.
    pub workers: Vec<WorkerView>,
    /// The series, oldest first.
    pub series: Vec<Point>,
    /// The latest scaling decisions, newest last.
    pub scaling: Vec<etlmesh_proto::ScaleEvent>,
    /// Errors counted in all.
    pub errors_total: u64,
    /// The most recent error groups.
    pub errors: Vec<etlmesh_telemetry::errors::ErrorGroup>,
    /// Energy and carbon since the control plane started.
    pub energy: etlmesh_proto::energy::EnergyReport,
    /// The latest reloads of the pipeline file, newest last.
    pub reloads: Vec<crate::reload::ReloadRecord>,
}

/// Builds the overview; the series holds points after `since` (unix ms).
pub fn build(st: &ControlState, since: i64) -> Overview {
    let mut infos: BTreeMap<String, PipelineInfo> = BTreeMap::new();
    if let Some(a) = &st.autoscaling {
        for i in a.pipelines() {
            infos.insert(i.name.clone(), i);
        }
    }
    for v in st.registry.pipelines() {
        infos.entry(v.info.name.clone()).or_insert(v.info);
    }
    let latest = st.timeline.latest();
    let groups = st.logs.errors();
    let pipelines = infos
        .into_values()
        .map(|i| PipelineOverview {
            now: latest
                .as_ref()
                .and_then(|p| p.pipelines.get(&i.name).cloned())
                .unwrap_or_default(),
            errors_total: groups
                .iter()
                .filter(|g| g.pipeline.as_deref() == Some(i.name.as_str()))
                .map(|g| g.count)
                .sum(),
            name: i.name,
            source: i.source,
            sinks: i.sinks,
        })
        .collect();
    let mut workers = st.registry.workers();
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    let (scaler, mut scaling) = match &st.autoscaling {
        Some(a) => (Some(a.scaler_name().to_string()), a.events()),
        None => (None, Vec::new()),
    };
    if scaling.len() > EVENTS {
        scaling.drain(..scaling.len() - EVENTS);
    }
    Overview {
        time: chrono::Utc::now().timestamp_millis(),
        scaler,
        gateways: st.timeline.gateways(),
        pipelines,
        workers,
        series: st.timeline.points(since),
        scaling,
        errors_total: st.logs.errors_total(),
        errors: groups.into_iter().take(ERROR_GROUPS).collect(),
        energy: st.meter.report(),
        reloads: st
            .reloader
            .as_ref()
            .map(|r| r.records())
            .unwrap_or_default(),
    }
}
