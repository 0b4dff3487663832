//! Energy and carbon as the control plane reports them (`GET /api/v1/energy`).

use serde::{Deserialize, Serialize};

/// The mesh's energy and carbon since the control plane started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EnergyReport {
    /// `rapl` (measured) or `model` (estimated from CPU time).
    pub source: String,
    /// The RAPL zones read, or the model's coefficients.
    pub detail: String,
    /// `fixed` or `forecast:<file>`.
    pub intensity_source: String,
    /// The grid's intensity now, gCO2e/kWh.
    pub intensity_g_per_kwh: f64,
    /// When accounting started (RFC 3339).
    pub since: String,
    /// Seconds accounted.
    pub seconds: f64,
    /// The machine's power over the last second, watts.
    pub power_watts: f64,
    /// The machine's idle power, watts (reported apart, not charged to pipelines).
    pub idle_watts: f64,
    /// All energy of the machine, joules.
    pub joules_total: f64,
    /// Of it, the idle power's.
    pub idle_joules: f64,
    /// Of it, the gateway's and control plane's work.
    pub mesh_joules: f64,
    /// Of it, work of other programs on the machine.
    pub other_joules: f64,
    /// Carbon of all energy, gCO2e.
    pub carbon_g_total: f64,
    /// By pipeline.
    pub pipelines: Vec<PipelineEnergy>,
    /// By process (workers and batch jobs).
    pub processes: Vec<ProcessEnergy>,
    /// What scale-to-zero saved.
    pub avoided: AvoidedEnergy,
}

/// One pipeline's energy and carbon.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineEnergy {
    /// The pipeline.
    pub pipeline: String,
    /// CPU seconds of its work (its workers and jobs).
    pub cpu_seconds: f64,
    /// Joules of its work, above idle.
    pub joules: f64,
    /// The same in kWh.
    pub kwh: f64,
    /// Operational carbon (energy × intensity), gCO2e.
    pub carbon_g: f64,
    /// Embodied carbon, its share of the hardware's (SCI's M), gCO2e.
    pub embodied_g: f64,
    /// Records handled.
    pub records: u64,
    /// SCI: (E × I + M) per million records, gCO2e; none before the first record.
    pub sci_g_per_million_records: Option<f64>,
}

/// One process's energy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessEnergy {
    /// `worker:<id>` or `job:<id>`.
    pub id: String,
    /// The pipelines it works for.
    pub pipelines: Vec<String>,
    /// CPU seconds.
    pub cpu_seconds: f64,
    /// Joules above idle.
    pub joules: f64,
    /// Still running.
    pub live: bool,
}

/// Energy that scale-to-zero avoided: worker-seconds not run × an idle worker's power.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AvoidedEnergy {
    /// Seconds of workers that scale-to-zero did not run.
    pub worker_seconds: f64,
    /// An idle worker's power (learned from idle workers, or estimated), watts.
    pub idle_worker_watts: f64,
    /// Joules avoided.
    pub joules: f64,
    /// gCO2e avoided.
    pub carbon_g: f64,
}
