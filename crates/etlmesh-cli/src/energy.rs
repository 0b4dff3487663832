//! `etlmesh energy`: each pipeline's energy, carbon and SCI, from the control plane.

use std::time::Duration;

use etlmesh_http::JsonClient;
use etlmesh_proto::energy::EnergyReport;

use crate::CliError;
use crate::logs::ControlPlaneArg;

/// `etlmesh energy`.
#[derive(Debug, clap::Args)]
pub struct EnergyArgs {
    #[command(flatten)]
    pub cp: ControlPlaneArg,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn energy(args: &EnergyArgs) -> Result<(), CliError> {
    let base = args.cp.base();
    let rt = crate::runtime(1)?;
    let report: EnergyReport = rt.block_on(async {
        JsonClient::new(Duration::from_secs(5))
            .get(&format!("{base}/api/v1/energy"))
            .await
            .map_err(|e| crate::logs::unreachable(&base, e))
    })?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).map_err(CliError::from)?;
        println!("{text}");
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// Joules in a readable unit.
fn joules(j: f64) -> String {
    if j >= 3.6e6 {
        format!("{:.3} kWh", j / 3.6e6)
    } else if j >= 1000.0 {
        format!("{:.2} kJ", j / 1000.0)
    } else {
        format!("{j:.2} J")
    }
}

/// Grams in a readable unit.
fn grams(g: f64) -> String {
    if g >= 1000.0 {
        format!("{:.2} kg", g / 1000.0)
    } else if g >= 0.01 {
        format!("{g:.3} g")
    } else {
        format!("{:.3} mg", g * 1000.0)
    }
}

/// The report as a table.
pub(crate) fn render(r: &EnergyReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "energy source: {} — {}\ngrid: {:.0} gCO2e/kWh ({}); accounted {:.0} s since {}\n",
        r.source, r.detail, r.intensity_g_per_kwh, r.intensity_source, r.seconds, r.since
    ));
    out.push_str(&format!(
        "machine: {:.2} W now, idle {:.2} W; {} in all (idle {}, mesh {}, other programs {}); {}\n\n",
        r.power_watts,
        r.idle_watts,
        joules(r.joules_total),
        joules(r.idle_joules),
        joules(r.mesh_joules),
        joules(r.other_joules),
        grams(r.carbon_g_total),
    ));
    out.push_str(&format!(
        "{:<22} {:>9} {:>11} {:>12} {:>11} {:>11} {:>12} {:>16}\n",
        "PIPELINE", "CPU s", "ENERGY", "kWh", "CARBON", "EMBODIED", "RECORDS", "SCI g/M records"
    ));
    for p in &r.pipelines {
        out.push_str(&format!(
            "{:<22} {:>9.2} {:>11} {:>12.3e} {:>11} {:>11} {:>12} {:>16}\n",
            p.pipeline,
            p.cpu_seconds,
            joules(p.joules),
            p.kwh,
            grams(p.carbon_g),
            grams(p.embodied_g),
            p.records,
            p.sci_g_per_million_records
                .map_or("-".to_string(), |s| format!("{s:.4}")),
        ));
    }
    if r.pipelines.is_empty() {
        out.push_str("(no pipeline has worked yet)\n");
    }
    let a = &r.avoided;
    out.push_str(&format!(
        "\nscale-to-zero avoided {:.0} worker-seconds × {:.3} W = {} ({})\n",
        a.worker_seconds,
        a.idle_worker_watts,
        joules(a.joules),
        grams(a.carbon_g)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use etlmesh_proto::energy::PipelineEnergy;

    #[test]
    fn renders_a_row_per_pipeline() {
        let r = EnergyReport {
            source: "model".into(),
            pipelines: vec![PipelineEnergy {
                pipeline: "clean".into(),
                cpu_seconds: 2.0,
                joules: 5.52,
                kwh: 5.52 / 3.6e6,
                carbon_g: 0.0007,
                records: 100_000,
                sci_g_per_million_records: Some(0.007),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = render(&r);
        assert!(text.contains("clean"), "{text}");
        assert!(text.contains("5.52 J"), "{text}");
        assert!(text.contains("0.0070"), "{text}");
        assert!(text.contains("100000"), "{text}");
    }
}
