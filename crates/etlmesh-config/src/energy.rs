//! `platform.energy` and `platform.carbon`: how energy is measured or modelled, and the
//! grid's carbon intensity.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::diag::Diagnostic;

/// Where energy figures come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnergySource {
    /// RAPL when its counters can be read, the model otherwise.
    #[default]
    Auto,
    /// RAPL only (fails at start when it cannot be read).
    Rapl,
    /// The CPU-time model only.
    Model,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEnergy {
    pub source: Option<EnergySource>,
    pub powercap: Option<PathBuf>,
    pub vcpus: Option<f64>,
    pub idle_watts_per_vcpu: Option<f64>,
    pub max_watts_per_vcpu: Option<f64>,
    pub watts_per_gb: Option<f64>,
    pub pue: Option<f64>,
    pub idle_watts: Option<f64>,
    pub idle_worker_watts: Option<f64>,
    pub embodied_g_per_hour: Option<f64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCarbon {
    pub intensity: Option<f64>,
    pub forecast: Option<PathBuf>,
}

/// Energy settings (coefficients of Cloud Carbon Footprint by default).
#[derive(Debug, Clone, PartialEq)]
pub struct EnergySpec {
    /// RAPL, the model, or RAPL when readable.
    pub source: EnergySource,
    /// The powercap directory.
    pub powercap: PathBuf,
    /// vCPUs of the machine (default: those this process may use).
    pub vcpus: Option<f64>,
    /// Watts of an idle vCPU.
    pub idle_watts_per_vcpu: f64,
    /// Watts of a vCPU at full load.
    pub max_watts_per_vcpu: f64,
    /// Watts per GB of memory in use.
    pub watts_per_gb: f64,
    /// Power usage effectiveness.
    pub pue: f64,
    /// The machine's idle power, when known.
    pub idle_watts: Option<f64>,
    /// An idle worker's power, when known.
    pub idle_worker_watts: Option<f64>,
    /// The hardware's embodied carbon per hour of use, gCO2e (SCI's M; 0: not counted).
    pub embodied_g_per_hour: f64,
}

impl Default for EnergySpec {
    fn default() -> Self {
        Self {
            source: EnergySource::Auto,
            powercap: PathBuf::from("/sys/class/powercap"),
            vcpus: None,
            idle_watts_per_vcpu: 0.74,
            max_watts_per_vcpu: 3.5,
            watts_per_gb: 0.392,
            pue: 1.0,
            idle_watts: None,
            idle_worker_watts: None,
            embodied_g_per_hour: 0.0,
        }
    }
}

/// The grid's carbon intensity.
#[derive(Debug, Clone, PartialEq)]
pub struct CarbonSpec {
    /// A fixed intensity, gCO2e/kWh (the world's mean, 475, by default).
    pub intensity: f64,
    /// A forecast file (Carbon Aware SDK JSON, or CSV), used instead when given.
    pub forecast: Option<PathBuf>,
}

impl Default for CarbonSpec {
    fn default() -> Self {
        Self {
            intensity: 475.0,
            forecast: None,
        }
    }
}

fn check(value: f64, field: &str, min: f64, help: &str, file: &Path, out: &mut Vec<Diagnostic>) {
    if !value.is_finite() || value < min {
        out.push(
            Diagnostic::new(file, field, format!("is {value}, must be at least {min}"))
                .with_help(help),
        );
    }
}

pub(crate) fn resolve_energy(
    raw: Option<RawEnergy>,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> EnergySpec {
    let d = EnergySpec::default();
    let Some(r) = raw else { return d };
    let s = EnergySpec {
        source: r.source.unwrap_or(d.source),
        powercap: r.powercap.unwrap_or(d.powercap),
        vcpus: r.vcpus,
        idle_watts_per_vcpu: r.idle_watts_per_vcpu.unwrap_or(d.idle_watts_per_vcpu),
        max_watts_per_vcpu: r.max_watts_per_vcpu.unwrap_or(d.max_watts_per_vcpu),
        watts_per_gb: r.watts_per_gb.unwrap_or(d.watts_per_gb),
        pue: r.pue.unwrap_or(d.pue),
        idle_watts: r.idle_watts,
        idle_worker_watts: r.idle_worker_watts,
        embodied_g_per_hour: r.embodied_g_per_hour.unwrap_or(d.embodied_g_per_hour),
    };
    let f = "platform.energy";
    if let Some(v) = s.vcpus {
        check(
            v,
            &format!("{f}.vcpus"),
            0.01,
            "the machine's vCPUs, for example 2",
            file,
            out,
        );
    }
    check(
        s.idle_watts_per_vcpu,
        &format!("{f}.idle_watts_per_vcpu"),
        0.0,
        "Cloud Carbon Footprint uses 0.74",
        file,
        out,
    );
    check(
        s.max_watts_per_vcpu,
        &format!("{f}.max_watts_per_vcpu"),
        s.idle_watts_per_vcpu.max(0.0),
        "at least idle_watts_per_vcpu; Cloud Carbon Footprint uses 3.5",
        file,
        out,
    );
    check(
        s.watts_per_gb,
        &format!("{f}.watts_per_gb"),
        0.0,
        "Cloud Carbon Footprint uses 0.392",
        file,
        out,
    );
    check(
        s.pue,
        &format!("{f}.pue"),
        1.0,
        "1.0 counts no data-centre overhead; clouds publish 1.1 to 1.2",
        file,
        out,
    );
    check(
        s.embodied_g_per_hour,
        &format!("{f}.embodied_g_per_hour"),
        0.0,
        "0 leaves embodied carbon out",
        file,
        out,
    );
    for (v, name) in [
        (s.idle_watts, "idle_watts"),
        (s.idle_worker_watts, "idle_worker_watts"),
    ] {
        if let Some(v) = v {
            check(
                v,
                &format!("{f}.{name}"),
                0.0,
                "watts, 0 or more",
                file,
                out,
            );
        }
    }
    s
}

pub(crate) fn resolve_carbon(
    raw: Option<RawCarbon>,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> CarbonSpec {
    let d = CarbonSpec::default();
    let Some(r) = raw else { return d };
    if r.intensity.is_some() && r.forecast.is_some() {
        out.push(
            Diagnostic::new(
                file,
                "platform.carbon.forecast",
                "is given with `intensity`",
            )
            .with_help("give one: a fixed intensity, or a forecast file"),
        );
    }
    let s = CarbonSpec {
        intensity: r.intensity.unwrap_or(d.intensity),
        forecast: r.forecast,
    };
    check(
        s.intensity,
        "platform.carbon.intensity",
        0.0,
        "gCO2e per kWh of the grid, for example 475",
        file,
        out,
    );
    if let Some(p) = &s.forecast
        && !p.is_file()
    {
        out.push(
            Diagnostic::new(
                file,
                "platform.carbon.forecast",
                format!("`{}` is not a file", p.display()),
            )
            .with_help(
                "give the path of a Carbon Aware SDK forecast (JSON) or a CSV of timestamp,value",
            ),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use crate::PipelineFile;

    #[test]
    fn defaults_and_overrides() {
        let f = PipelineFile::parse(
            "e.yaml",
            "pipelines:\n  a:\n    sinks: [{ type: stdout }]\n",
        )
        .expect("valid");
        assert_eq!(f.spec.platform.energy.max_watts_per_vcpu, 3.5);
        assert_eq!(f.spec.platform.carbon.intensity, 475.0);
        let f = PipelineFile::parse(
            "e.yaml",
            "platform:\n  energy: { source: model, pue: 1.2, embodied_g_per_hour: 10 }\n  carbon: { intensity: 120 }\npipelines:\n  a:\n    sinks: [{ type: stdout }]\n",
        )
        .expect("valid");
        assert_eq!(f.spec.platform.energy.pue, 1.2);
        assert_eq!(f.spec.platform.carbon.intensity, 120.0);
    }

    #[test]
    fn bad_values_name_their_field() {
        let e = PipelineFile::parse(
            "e.yaml",
            "platform:\n  energy:\n    pue: 0.5\n  carbon:\n    forecast: /nonexistent/f.json\npipelines:\n  a:\n    sinks: [{ type: stdout }]\n",
        )
        .expect_err("bad");
        let s = e.to_string();
        assert!(s.contains("e.yaml:3:5: platform.energy.pue"), "{s}");
        assert!(s.contains("platform.carbon.forecast"), "{s}");
        let e = PipelineFile::parse(
            "e.yaml",
            "platform:\n  energy: { sourse: rapl }\npipelines:\n  a:\n    sinks: [{ type: stdout }]\n",
        )
        .expect_err("typo");
        assert!(e.to_string().contains("did you mean `source`"), "{e}");
    }
}
