//! Accounting: one-second ticks of machine energy and process CPU time become joules,
//! kWh, gCO2e and the SCI of each pipeline.
//!
//! Each tick splits the machine's energy in three: the idle power (reported apart,
//! charged to nobody), the work of etlmesh's processes (charged by CPU time: each
//! CPU-second costs the same joules), and the rest of the machine's work ("other").
//! With RAPL the joules per CPU-second are measured (energy above idle over the
//! machine's busy CPU time), and the idle power is the lowest power seen unless the file
//! sets it; with the model they are the model's.
//!
//! A worker's CPU time goes to its pipelines in the shares of the CPU time it measured
//! polling each one's requests and streams; a batch job's to its pipeline. Carbon is
//! energy × the intensity at the tick; embodied carbon (SCI's M) is the hardware's
//! hourly share times the part of the machine's vCPUs the work held.

use std::collections::BTreeMap;

use etlmesh_proto::energy::{AvoidedEnergy, EnergyReport, PipelineEnergy, ProcessEnergy};

use crate::JOULES_PER_KWH;
use crate::carbon::Intensity;
use crate::model::PowerModel;

/// Processes kept in the report after they ended.
const MAX_PROCESSES: usize = 256;
/// Weight of the newest idle-worker sample in the learned idle power.
const IDLE_ALPHA: f64 = 0.1;

/// One process's work over a tick.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessSample {
    /// `worker:<id>`, `job:<id>`, or anything for the mesh's own processes.
    pub id: String,
    /// The pipelines its CPU time goes to, with shares summing to 1; empty for the
    /// gateway and the control plane (the mesh's overhead).
    pub pipelines: Vec<(String, f64)>,
    /// CPU seconds used during the tick.
    pub cpu_seconds: f64,
    /// Resident memory.
    pub rss_bytes: u64,
    /// A worker that did no work during the tick (teaches the idle worker's power).
    pub idle_worker: bool,
}

/// What one tick observed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tick {
    /// Its length, seconds.
    pub seconds: f64,
    /// Its end, Unix milliseconds.
    pub at_ms: i64,
    /// The machine's joules from RAPL (`None`: use the model).
    pub machine_joules: Option<f64>,
    /// The machine's busy CPU seconds.
    pub machine_busy_cpu: f64,
    /// The machine's memory in use, bytes.
    pub memory_in_use: u64,
    /// etlmesh's processes.
    pub processes: Vec<ProcessSample>,
    /// Records each pipeline handled.
    pub records: Vec<(String, u64)>,
    /// Pipelines at zero workers because they scale to zero.
    pub scaled_to_zero: Vec<String>,
}

#[derive(Debug, Default, Clone)]
struct PipelineTotals {
    cpu_seconds: f64,
    joules: f64,
    carbon_g: f64,
    embodied_g: f64,
    records: u64,
}

#[derive(Debug, Default, Clone)]
struct ProcessTotals {
    pipelines: Vec<String>,
    cpu_seconds: f64,
    joules: f64,
    last_tick: u64,
}

/// Running totals.
#[derive(Debug)]
pub struct Ledger {
    model: PowerModel,
    idle_watts_set: Option<f64>,
    idle_worker_watts_set: Option<f64>,
    embodied_g_per_hour: f64,
    intensity: Intensity,
    source: String,
    detail: String,
    since: String,
    ticks: u64,
    seconds: f64,
    power_watts: f64,
    per_cpu: f64,
    idle_watts: f64,
    lowest_watts: Option<f64>,
    idle_worker_watts: Option<f64>,
    joules_total: f64,
    idle_joules: f64,
    mesh_joules: f64,
    other_joules: f64,
    carbon_g_total: f64,
    intensity_now: f64,
    pipelines: BTreeMap<String, PipelineTotals>,
    processes: BTreeMap<String, ProcessTotals>,
    avoided: AvoidedEnergy,
}

/// How a ledger is set up.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// The model (used for the idle power and as the fallback).
    pub model: PowerModel,
    /// The machine's idle power, when known (RAPL: else the lowest seen).
    pub idle_watts: Option<f64>,
    /// An idle worker's power, when known (else learned, or estimated).
    pub idle_worker_watts: Option<f64>,
    /// The hardware's embodied carbon per hour, gCO2e (0: not counted).
    pub embodied_g_per_hour: f64,
    /// The grid.
    pub intensity: Intensity,
    /// `rapl` or `model`.
    pub source: String,
    /// The zones read or the coefficients.
    pub detail: String,
    /// When accounting started (RFC 3339).
    pub since: String,
}

impl Ledger {
    /// A ledger with nothing counted yet.
    pub fn new(c: LedgerConfig) -> Self {
        Self {
            intensity_now: c.intensity.at(0),
            model: c.model,
            idle_watts_set: c.idle_watts,
            idle_worker_watts_set: c.idle_worker_watts,
            embodied_g_per_hour: c.embodied_g_per_hour,
            intensity: c.intensity,
            source: c.source,
            detail: c.detail,
            since: c.since,
            ticks: 0,
            seconds: 0.0,
            power_watts: 0.0,
            per_cpu: 0.0,
            idle_watts: 0.0,
            lowest_watts: None,
            idle_worker_watts: None,
            joules_total: 0.0,
            idle_joules: 0.0,
            mesh_joules: 0.0,
            other_joules: 0.0,
            carbon_g_total: 0.0,
            pipelines: BTreeMap::new(),
            processes: BTreeMap::new(),
            avoided: AvoidedEnergy::default(),
        }
    }

    /// The intensity source.
    pub fn intensity(&self) -> &Intensity {
        &self.intensity
    }

    /// Joules a CPU-second of work cost in the last tick (the model's before the first).
    pub fn joules_per_cpu_second(&self) -> f64 {
        if self.ticks == 0 {
            self.model.joules_per_cpu_second()
        } else {
            self.per_cpu
        }
    }

    /// Joules per CPU-second of work and the machine's energy, idle part, for a tick.
    fn split(&mut self, t: &Tick) -> (f64, f64, f64) {
        let dt = t.seconds.max(1e-3);
        match t.machine_joules {
            Some(e) => {
                let watts = e / dt;
                // The lowest power seen is the best guess of idle a meter can make alone.
                if t.machine_busy_cpu > 0.0 || e > 0.0 {
                    self.lowest_watts = Some(self.lowest_watts.map_or(watts, |l| l.min(watts)));
                }
                let idle_w = self
                    .idle_watts_set
                    .or(self.lowest_watts)
                    .unwrap_or(watts)
                    .min(watts);
                let active = (e - idle_w * dt).max(0.0);
                let per_cpu = if t.machine_busy_cpu > 1e-6 {
                    active / t.machine_busy_cpu
                } else {
                    self.model.joules_per_cpu_second()
                };
                self.idle_watts = idle_w;
                (per_cpu, e, idle_w * dt)
            }
            None => {
                let idle_w = self
                    .idle_watts_set
                    .unwrap_or_else(|| self.model.idle_watts(t.memory_in_use));
                let per_cpu = self.model.joules_per_cpu_second();
                self.idle_watts = idle_w;
                let idle = idle_w * dt;
                (per_cpu, idle + per_cpu * t.machine_busy_cpu, idle)
            }
        }
    }

    /// Adds one tick.
    pub fn record(&mut self, t: &Tick) {
        self.ticks += 1;
        let dt = t.seconds.max(1e-3);
        let intensity = self.intensity.at(t.at_ms);
        self.intensity_now = intensity;
        let g_per_joule = intensity / JOULES_PER_KWH;
        let (per_cpu, machine, idle) = self.split(t);
        self.per_cpu = per_cpu;
        self.seconds += t.seconds;
        self.power_watts = machine / dt;
        self.joules_total += machine;
        self.idle_joules += idle;
        self.carbon_g_total += machine * g_per_joule;
        let embodied_per_cpu_s = self.embodied_g_per_hour / 3600.0 / self.model.vcpus.max(1.0);
        let mut charged = 0.0;
        for p in &t.processes {
            let cpu = p.cpu_seconds.max(0.0);
            let joules = cpu * per_cpu;
            charged += joules;
            if p.pipelines.is_empty() {
                self.mesh_joules += joules;
                continue;
            }
            if p.idle_worker {
                let watts = joules / dt + self.model.memory_watts(p.rss_bytes);
                self.idle_worker_watts = Some(match self.idle_worker_watts {
                    Some(w) => IDLE_ALPHA * watts + (1.0 - IDLE_ALPHA) * w,
                    None => watts,
                });
            }
            for (name, share) in &p.pipelines {
                let e = self.pipelines.entry(name.clone()).or_default();
                e.cpu_seconds += cpu * share;
                e.joules += joules * share;
                e.carbon_g += joules * share * g_per_joule;
                e.embodied_g += cpu * share * embodied_per_cpu_s;
            }
            let pt = self.processes.entry(p.id.clone()).or_default();
            pt.pipelines = p.pipelines.iter().map(|(n, _)| n.clone()).collect();
            pt.cpu_seconds += cpu;
            pt.joules += joules;
            pt.last_tick = self.ticks;
        }
        self.other_joules += (machine - idle - charged).max(0.0);
        for (name, n) in &t.records {
            self.pipelines.entry(name.clone()).or_default().records += n;
        }
        let idle_worker = self.idle_worker_watts();
        for _ in &t.scaled_to_zero {
            self.avoided.worker_seconds += dt;
            self.avoided.joules += idle_worker * dt;
            self.avoided.carbon_g += idle_worker * dt * g_per_joule;
        }
        self.avoided.idle_worker_watts = idle_worker;
        self.forget_old_processes();
    }

    /// An idle worker's power: set in the file, else learned, else a worker of 64 MiB
    /// that uses 0.5 % of a CPU.
    pub fn idle_worker_watts(&self) -> f64 {
        self.idle_worker_watts_set
            .or(self.idle_worker_watts)
            .unwrap_or_else(|| {
                self.model.memory_watts(64 << 20) + 0.005 * self.model.joules_per_cpu_second()
            })
    }

    fn forget_old_processes(&mut self) {
        while self.processes.len() > MAX_PROCESSES {
            let oldest = self
                .processes
                .iter()
                .min_by_key(|(_, p)| p.last_tick)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => self.processes.remove(&k),
                None => break,
            };
        }
    }

    /// The totals as the API reports them.
    pub fn report(&self) -> EnergyReport {
        let pipelines = self
            .pipelines
            .iter()
            .map(|(name, p)| PipelineEnergy {
                pipeline: name.clone(),
                cpu_seconds: p.cpu_seconds,
                joules: p.joules,
                kwh: p.joules / JOULES_PER_KWH,
                carbon_g: p.carbon_g,
                embodied_g: p.embodied_g,
                records: p.records,
                sci_g_per_million_records: (p.records > 0)
                    .then(|| (p.carbon_g + p.embodied_g) / p.records as f64 * 1e6),
            })
            .collect();
        let processes = self
            .processes
            .iter()
            .map(|(id, p)| ProcessEnergy {
                id: id.clone(),
                pipelines: p.pipelines.clone(),
                cpu_seconds: p.cpu_seconds,
                joules: p.joules,
                live: p.last_tick == self.ticks,
            })
            .collect();
        EnergyReport {
            source: self.source.clone(),
            detail: self.detail.clone(),
            intensity_source: self.intensity.describe(),
            intensity_g_per_kwh: self.intensity_now,
            since: self.since.clone(),
            seconds: self.seconds,
            power_watts: self.power_watts,
            idle_watts: self.idle_watts,
            joules_total: self.joules_total,
            idle_joules: self.idle_joules,
            mesh_joules: self.mesh_joules,
            other_joules: self.other_joules,
            carbon_g_total: self.carbon_g_total,
            pipelines,
            processes,
            avoided: self.avoided.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> PowerModel {
        PowerModel {
            vcpus: 2.0,
            idle_watts_per_vcpu: 0.74,
            max_watts_per_vcpu: 3.5,
            watts_per_gb: 0.392,
            pue: 1.0,
        }
    }

    fn ledger(intensity: f64, embodied: f64) -> Ledger {
        Ledger::new(LedgerConfig {
            model: model(),
            idle_watts: None,
            idle_worker_watts: None,
            embodied_g_per_hour: embodied,
            intensity: Intensity::Fixed(intensity),
            source: "model".into(),
            detail: String::new(),
            since: String::new(),
        })
    }

    fn worker(id: &str, pipeline: &str, cpu: f64) -> ProcessSample {
        ProcessSample {
            id: format!("worker:{id}"),
            pipelines: vec![(pipeline.into(), 1.0)],
            cpu_seconds: cpu,
            rss_bytes: 50_000_000,
            idle_worker: cpu < 0.01,
        }
    }

    #[test]
    fn charges_pipelines_by_cpu_time_and_keeps_idle_apart() {
        let mut l = ledger(400.0, 36.0);
        let tick = Tick {
            seconds: 1.0,
            at_ms: 0,
            machine_joules: None,
            machine_busy_cpu: 1.5,
            memory_in_use: 1_000_000_000,
            processes: vec![
                worker("a", "clean", 1.0),
                ProcessSample {
                    id: "job:1".into(),
                    pipelines: vec![("clean".into(), 0.5), ("agg".into(), 0.5)],
                    cpu_seconds: 0.2,
                    ..Default::default()
                },
                ProcessSample {
                    id: "up".into(),
                    cpu_seconds: 0.1,
                    ..Default::default()
                },
            ],
            records: vec![("clean".into(), 1_000_000)],
            scaled_to_zero: vec!["agg".into()],
        };
        l.record(&tick);
        let r = l.report();
        let jpc = 2.76;
        let clean = &r
            .pipelines
            .iter()
            .find(|p| p.pipeline == "clean")
            .expect("clean");
        assert!((clean.joules - 1.1 * jpc).abs() < 1e-9, "{clean:?}");
        assert!((clean.carbon_g - 1.1 * jpc * 400.0 / 3.6e6).abs() < 1e-12);
        // 36 g/h over 2 vCPUs: 0.005 g per CPU-second.
        assert!((clean.embodied_g - 1.1 * 0.005).abs() < 1e-12, "{clean:?}");
        let sci = (clean.carbon_g + clean.embodied_g) / 1e6 * 1e6;
        assert!((clean.sci_g_per_million_records.expect("sci") - sci).abs() < 1e-12);
        assert!((r.idle_joules - (1.48 + 0.392)).abs() < 1e-9, "{r:?}");
        assert!((r.mesh_joules - 0.1 * jpc).abs() < 1e-9);
        assert!((r.other_joules - 0.2 * jpc).abs() < 1e-9, "{r:?}");
        assert!((r.joules_total - (1.872 + 1.5 * jpc)).abs() < 1e-9);
        assert_eq!(r.avoided.worker_seconds, 1.0);
        assert!(r.avoided.joules > 0.0);
        let agg = &r
            .pipelines
            .iter()
            .find(|p| p.pipeline == "agg")
            .expect("agg");
        assert_eq!(agg.sci_g_per_million_records, None, "no records yet");
    }

    #[test]
    fn rapl_energy_above_the_lowest_power_goes_to_the_work() {
        let mut l = ledger(100.0, 0.0);
        l.source = "rapl".into();
        // An idle second at 5 W teaches the idle power.
        l.record(&Tick {
            seconds: 1.0,
            machine_joules: Some(5.0),
            machine_busy_cpu: 0.01,
            processes: vec![worker("a", "p", 0.0)],
            ..Default::default()
        });
        // A busy one: 25 J, 2 CPU-seconds busy, 1 of them the worker's.
        l.record(&Tick {
            seconds: 1.0,
            machine_joules: Some(25.0),
            machine_busy_cpu: 2.0,
            processes: vec![worker("a", "p", 1.0)],
            ..Default::default()
        });
        let r = l.report();
        assert!((r.idle_watts - 5.0).abs() < 1e-9);
        let p = &r.pipelines[0];
        assert!((p.joules - 10.0).abs() < 1e-9, "{p:?}");
        assert!((r.other_joules - 10.0).abs() < 1e-9, "{r:?}");
        assert!(
            r.avoided.idle_worker_watts > 0.0,
            "learned from the idle second"
        );
    }

    #[test]
    fn idle_costs_pipelines_nothing() {
        let mut l = ledger(400.0, 0.0);
        for _ in 0..10 {
            l.record(&Tick {
                seconds: 1.0,
                machine_busy_cpu: 0.02,
                processes: vec![worker("a", "p", 0.0)],
                ..Default::default()
            });
        }
        let r = l.report();
        assert_eq!(r.pipelines[0].joules, 0.0);
        assert!(r.idle_joules > 10.0);
    }
}
