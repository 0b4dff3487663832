//! The energy report as Prometheus metrics, rendered at each scrape: one table of
//! per-pipeline metrics, one of machine-wide ones, and the source in use.

use etlmesh_proto::energy::{EnergyReport, PipelineEnergy};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use super::EnergyCollector;

/// A metric taken from `T`: its name, help, kind, and value (none: not written).
struct Metric<T> {
    name: &'static str,
    help: &'static str,
    counter: bool,
    value: fn(&T) -> Option<f64>,
}

impl<T> Metric<T> {
    fn kind(&self) -> MetricType {
        if self.counter {
            MetricType::Counter
        } else {
            MetricType::Gauge
        }
    }

    fn encode(&self, v: f64, encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        if self.counter {
            ConstCounter::new(v).encode(encoder)
        } else {
            ConstGauge::new(v).encode(encoder)
        }
    }
}

/// Per pipeline, labelled `pipeline`.
const PER_PIPELINE: [Metric<PipelineEnergy>; 5] = [
    Metric {
        name: "energy_joules",
        help: "Energy of each pipeline's work above idle (RAPL or the CPU-time model: see etlmesh_energy_source)",
        counter: true,
        value: |p| Some(p.joules),
    },
    Metric {
        name: "carbon_grams",
        help: "Operational carbon of each pipeline's work, gCO2e",
        counter: true,
        value: |p| Some(p.carbon_g),
    },
    Metric {
        name: "embodied_carbon_grams",
        help: "Embodied carbon charged to each pipeline, gCO2e",
        counter: true,
        value: |p| Some(p.embodied_g),
    },
    Metric {
        name: "energy_records",
        help: "Records each pipeline handled, for the SCI",
        counter: true,
        value: |p| Some(p.records as f64),
    },
    Metric {
        name: "sci_grams_per_million_records",
        help: "SCI of each pipeline: (E x I + M) per million records, gCO2e",
        counter: false,
        value: |p| p.sci_g_per_million_records,
    },
];

/// The machine and the mesh as a whole.
const MACHINE: [Metric<EnergyReport>; 8] = [
    Metric {
        name: "power_watts",
        help: "The machine's power over the last second",
        counter: false,
        value: |r| Some(r.power_watts),
    },
    Metric {
        name: "idle_power_watts",
        help: "The machine's idle power (not charged to pipelines)",
        counter: false,
        value: |r| Some(r.idle_watts),
    },
    Metric {
        name: "grid_intensity_grams_per_kwh",
        help: "The grid's carbon intensity now, gCO2e/kWh",
        counter: false,
        value: |r| Some(r.intensity_g_per_kwh),
    },
    Metric {
        name: "machine_energy_joules",
        help: "All energy of the machine",
        counter: true,
        value: |r| Some(r.joules_total),
    },
    Metric {
        name: "idle_energy_joules",
        help: "Energy of the machine's idle power",
        counter: true,
        value: |r| Some(r.idle_joules),
    },
    Metric {
        name: "mesh_energy_joules",
        help: "Energy of the gateway's and control plane's work",
        counter: true,
        value: |r| Some(r.mesh_joules),
    },
    Metric {
        name: "energy_avoided_joules",
        help: "Energy scale-to-zero avoided (worker-seconds not run x an idle worker's power)",
        counter: true,
        value: |r| Some(r.avoided.joules),
    },
    Metric {
        name: "scaled_to_zero_worker_seconds",
        help: "Worker-seconds scale-to-zero did not run",
        counter: true,
        value: |r| Some(r.avoided.worker_seconds),
    },
];

impl prometheus_client::collector::Collector for EnergyCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let r = self.0.report();
        for m in &PER_PIPELINE {
            let mut family = encoder.encode_descriptor(m.name, m.help, None, m.kind())?;
            for p in &r.pipelines {
                if let Some(v) = (m.value)(p) {
                    m.encode(
                        v,
                        family.encode_family(&[("pipeline", p.pipeline.as_str())])?,
                    )?;
                }
            }
        }
        for m in &MACHINE {
            if let Some(v) = (m.value)(&r) {
                m.encode(
                    v,
                    encoder.encode_descriptor(m.name, m.help, None, m.kind())?,
                )?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "energy_source",
            "Where energy figures come from (1 for the source in use)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1i64).encode(family.encode_family(&[("source", r.source.as_str())])?)
    }
}
