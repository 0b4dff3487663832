//! The energy meter: once a second it reads the machine (RAPL or the model's CPU time),
//! the CPU time and per-pipeline work every worker reported in its heartbeat, its own
//! CPU time and that of running batch jobs, and adds a tick to the
//! [`etlmesh_energy::Ledger`]. `/api/v1/energy`, `etlmesh energy`, the dashboard and
//! `/metrics` read the ledger.

mod collector;

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etlmesh_config::{CarbonSpec, EnergySource, EnergySpec};
use etlmesh_energy::ledger::LedgerConfig;
use etlmesh_energy::model::{MachineCpu, memory_in_use};
use etlmesh_energy::{Forecast, Intensity, Ledger, PowerModel, ProcessSample, Rapl, Tick};
use etlmesh_proto::energy::EnergyReport;
use etlmesh_proto::{PipelineUsage, WorkerState};

use crate::Registry;
use crate::autoscale::Autoscaling;

/// The sampling period.
pub const PERIOD: Duration = Duration::from_secs(1);
/// A worker seen for the first time is charged its CPU time so far only if it is
/// younger than this (a control plane that restarts does not charge old workers' lives).
const NEW_WORKER: u64 = 10;

/// The meter cannot start.
#[derive(Debug, thiserror::Error)]
pub enum EnergyError {
    /// `source: rapl` and no counter can be read.
    #[error(
        "energy: platform.energy.source is `rapl` but no RAPL counter under {0} can be read\n  help: run where /sys/class/powercap/intel-rapl:*/energy_uj is readable, or use `source: auto` to fall back to the CPU-time model"
    )]
    NoRapl(String),
    /// A forecast file.
    #[error("{0}")]
    Forecast(#[from] etlmesh_energy::ForecastError),
}

#[derive(Debug, Default)]
struct WorkerSeen {
    cpu: f64,
    pipelines: BTreeMap<String, PipelineUsage>,
}

#[derive(Debug)]
struct Readings {
    at: Instant,
    rapl: Option<Rapl>,
    machine: Option<MachineCpu>,
    own_cpu: Option<f64>,
    workers: HashMap<String, WorkerSeen>,
}

/// The meter and its ledger.
pub struct Meter {
    ledger: Mutex<Ledger>,
    readings: Mutex<Readings>,
    jobs: Mutex<Vec<ProcessSample>>,
    job_records: Mutex<BTreeMap<String, u64>>,
    own_id: String,
}

/// The grid intensity the file asks for.
pub fn intensity(carbon: &CarbonSpec) -> Result<Intensity, EnergyError> {
    Ok(match &carbon.forecast {
        Some(path) => Intensity::Forecast(Forecast::load(path)?, path.clone()),
        None => Intensity::Fixed(carbon.intensity),
    })
}

impl Meter {
    /// A meter as the file says; `own_id` names this process in the report.
    pub fn new(
        energy: &EnergySpec,
        carbon: &CarbonSpec,
        own_id: &str,
    ) -> Result<Self, EnergyError> {
        let model = PowerModel {
            vcpus: energy.vcpus.unwrap_or_else(etlmesh_energy::model::vcpus),
            idle_watts_per_vcpu: energy.idle_watts_per_vcpu,
            max_watts_per_vcpu: energy.max_watts_per_vcpu,
            watts_per_gb: energy.watts_per_gb,
            pue: energy.pue,
        };
        let rapl = match energy.source {
            EnergySource::Model => None,
            EnergySource::Auto => Rapl::discover(&energy.powercap),
            EnergySource::Rapl => Some(
                Rapl::discover(&energy.powercap)
                    .ok_or_else(|| EnergyError::NoRapl(energy.powercap.display().to_string()))?,
            ),
        };
        let (source, detail) = match &rapl {
            Some(r) => ("rapl", format!("RAPL zones {}", r.zone_names().join(", "))),
            None => (
                "model",
                format!(
                    "CPU-time model: {} vCPUs, {} to {} W per vCPU, {} W per GB, PUE {}",
                    model.vcpus,
                    model.idle_watts_per_vcpu,
                    model.max_watts_per_vcpu,
                    model.watts_per_gb,
                    model.pue
                ),
            ),
        };
        tracing::info!(source, %detail, "energy meter");
        let ledger = Ledger::new(LedgerConfig {
            model,
            idle_watts: energy.idle_watts,
            idle_worker_watts: energy.idle_worker_watts,
            embodied_g_per_hour: energy.embodied_g_per_hour,
            intensity: intensity(carbon)?,
            source: source.into(),
            detail,
            since: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        });
        Ok(Self {
            ledger: Mutex::new(ledger),
            readings: Mutex::new(Readings {
                at: Instant::now(),
                rapl,
                machine: MachineCpu::read(),
                own_cpu: etlmesh_telemetry::process::cpu_seconds(None),
                workers: HashMap::new(),
            }),
            jobs: Mutex::default(),
            job_records: Mutex::default(),
            own_id: own_id.to_string(),
        })
    }

    /// The grid's intensity (for placing jobs).
    pub fn intensity(&self) -> Intensity {
        self.ledger.lock().intensity().clone()
    }

    /// Charges `cpu` seconds of a batch job to its pipeline (at the next tick) and
    /// returns their joules and gCO2e at the current rate.
    pub fn charge_job(&self, id: &str, pipeline: &str, cpu: f64) -> (f64, f64) {
        let (per_cpu, g_per_kwh) = {
            let l = self.ledger.lock();
            let now = chrono::Utc::now().timestamp_millis();
            (l.joules_per_cpu_second(), l.intensity().at(now))
        };
        self.jobs.lock().push(ProcessSample {
            id: format!("job:{id}"),
            pipelines: vec![(pipeline.to_string(), 1.0)],
            cpu_seconds: cpu,
            ..Default::default()
        });
        let joules = cpu * per_cpu;
        (joules, joules * g_per_kwh / etlmesh_energy::JOULES_PER_KWH)
    }

    /// Counts records a batch job handled for `pipeline` (at the next tick).
    pub fn add_records(&self, pipeline: &str, n: u64) {
        *self
            .job_records
            .lock()
            .entry(pipeline.to_string())
            .or_default() += n;
    }

    /// The totals.
    pub fn report(&self) -> EnergyReport {
        self.ledger.lock().report()
    }

    /// Reads everything once and adds a tick.
    pub fn tick(&self, registry: &Registry, autoscaling: Option<&Autoscaling>) {
        let tick = self.observe(registry, autoscaling);
        self.ledger.lock().record(&tick);
    }

    fn observe(&self, registry: &Registry, autoscaling: Option<&Autoscaling>) -> Tick {
        let mut r = self.readings.lock();
        let now = Instant::now();
        let seconds = now.duration_since(r.at).as_secs_f64();
        r.at = now;
        let machine = MachineCpu::read();
        let busy = match (r.machine, machine) {
            (Some(a), Some(b)) => (b.busy - a.busy).max(0.0),
            _ => 0.0,
        };
        r.machine = machine;
        let machine_joules = r.rapl.as_mut().and_then(Rapl::joules);
        let mut processes = Vec::new();
        let own = etlmesh_telemetry::process::cpu_seconds(None);
        if let (Some(a), Some(b)) = (r.own_cpu, own) {
            processes.push(ProcessSample {
                id: self.own_id.clone(),
                cpu_seconds: (b - a).max(0.0),
                ..Default::default()
            });
        }
        r.own_cpu = own;
        let mut records: BTreeMap<String, u64> = BTreeMap::new();
        let mut live = HashMap::new();
        for w in registry.workers() {
            let fresh = WorkerSeen::default();
            let (seen, first) = match r.workers.remove(&w.id) {
                Some(s) => (s, false),
                None => (fresh, true),
            };
            let charge_past = !first || w.uptime_secs <= NEW_WORKER;
            let cpu = if charge_past {
                (w.load.cpu_seconds_total - seen.cpu).max(0.0)
            } else {
                0.0
            };
            let mut work = Vec::new();
            let mut did_work = false;
            for (name, u) in &w.load.pipelines {
                let before = seen.pipelines.get(name).cloned().unwrap_or_default();
                let (dc, dr) = if charge_past {
                    (
                        (u.cpu_seconds_total - before.cpu_seconds_total).max(0.0),
                        u.records_total.saturating_sub(before.records_total),
                    )
                } else {
                    (0.0, 0)
                };
                *records.entry(name.clone()).or_default() += dr;
                did_work |= dr > 0;
                work.push((name.clone(), dc));
            }
            let measured: f64 = work.iter().map(|(_, c)| c).sum();
            let shares: Vec<(String, f64)> = if measured > 1e-6 {
                work.into_iter().map(|(n, c)| (n, c / measured)).collect()
            } else {
                let n = w.pipelines.len().max(1) as f64;
                w.pipelines.iter().map(|p| (p.clone(), 1.0 / n)).collect()
            };
            processes.push(ProcessSample {
                id: format!("worker:{}", w.id),
                pipelines: shares,
                cpu_seconds: cpu,
                rss_bytes: w.load.rss_bytes,
                idle_worker: !did_work && w.load.in_flight == 0 && w.state == WorkerState::Ready,
            });
            live.insert(
                w.id.clone(),
                WorkerSeen {
                    cpu: w.load.cpu_seconds_total,
                    pipelines: w.load.pipelines.clone(),
                },
            );
        }
        r.workers = live;
        processes.append(&mut self.jobs.lock());
        for (name, n) in std::mem::take(&mut *self.job_records.lock()) {
            *records.entry(name).or_default() += n;
        }
        let scaled_to_zero = autoscaling
            .map(|a| {
                a.view(registry)
                    .into_iter()
                    .filter(|p| p.min_replicas == 0 && p.desired == 0 && p.ready == 0)
                    .map(|p| p.pipeline)
                    .collect()
            })
            .unwrap_or_default();
        Tick {
            seconds,
            at_ms: chrono::Utc::now().timestamp_millis(),
            machine_joules,
            machine_busy_cpu: busy,
            memory_in_use: memory_in_use().unwrap_or(0),
            processes,
            records: records.into_iter().collect(),
            scaled_to_zero,
        }
    }
}

/// Ticks every [`PERIOD`] until aborted.
pub async fn meter_forever(
    meter: Arc<Meter>,
    registry: Arc<Registry>,
    autoscaling: Option<Arc<Autoscaling>>,
) {
    let mut every = tokio::time::interval(PERIOD);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        every.tick().await;
        meter.tick(&registry, autoscaling.as_deref());
    }
}

/// Renders the ledger at each scrape of `/metrics`.
#[derive(Debug)]
pub struct EnergyCollector(pub Arc<Meter>);

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter")
            .field("own_id", &self.own_id)
            .finish()
    }
}
