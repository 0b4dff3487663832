//! Scaling policies: how many workers a pipeline may have and when the autoscaler adds
//! or removes them. A pipeline's `scaling:` overrides `platform.scaling`, field by field.

use std::path::Path;
use std::time::Duration;

use crate::diag::Diagnostic;
use crate::raw::RawScaling;

/// How a pipeline's workers scale.
#[derive(Debug, Clone, PartialEq)]
pub struct ScalingSpec {
    /// Fewest workers; 0 lets an idle pipeline scale to zero.
    pub min_replicas: u32,
    /// Most workers.
    pub max_replicas: u32,
    /// In-flight requests one worker should carry.
    pub target_in_flight: f64,
    /// CPU one worker should use, in percent of a core (also scales when set).
    pub target_cpu_percent: Option<f64>,
    /// Messages waiting in a stream source (its consumer lag) one worker should carry
    /// (also scales when set; only sources that know their lag report it: JetStream,
    /// Kafka).
    pub target_lag: Option<u64>,
    /// How long the backlog may take to drain at the rate the pool is measured to
    /// process (also scales when set): a backlog that would take longer adds workers.
    pub target_drain: Option<Duration>,
    /// No scale-down before the load stayed lower for this long.
    pub scale_down_window: Duration,
    /// With `min_replicas: 0`: no request for this long scales to zero.
    pub idle_before_zero: Duration,
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            min_replicas: 1,
            max_replicas: 4,
            target_in_flight: 8.0,
            target_cpu_percent: None,
            target_lag: None,
            target_drain: None,
            scale_down_window: Duration::from_secs(30),
            idle_before_zero: Duration::from_secs(60),
        }
    }
}

/// `over` field by field on top of `base`, checked; problems go to `out` under `field`.
pub(crate) fn resolve(
    base: &ScalingSpec,
    over: Option<RawScaling>,
    field: &str,
    file: &Path,
    out: &mut Vec<Diagnostic>,
) -> ScalingSpec {
    let Some(r) = over else { return base.clone() };
    let s = ScalingSpec {
        min_replicas: r.min_replicas.unwrap_or(base.min_replicas),
        max_replicas: r.max_replicas.unwrap_or(base.max_replicas),
        target_in_flight: r.target_in_flight.unwrap_or(base.target_in_flight),
        target_cpu_percent: r.target_cpu_percent.or(base.target_cpu_percent),
        target_lag: r.target_lag.or(base.target_lag),
        target_drain: r.target_drain.map(|s| s.0).or(base.target_drain),
        scale_down_window: r.scale_down_window.map_or(base.scale_down_window, |s| s.0),
        idle_before_zero: r.idle_before_zero.map_or(base.idle_before_zero, |s| s.0),
    };
    let mut d = |f: &str, msg: String, help: &str| {
        out.push(Diagnostic::new(file, format!("{field}.{f}"), msg).with_help(help));
    };
    if s.max_replicas == 0 {
        d(
            "max_replicas",
            "must be at least 1".into(),
            "use min_replicas: 0 to let the pipeline scale to zero",
        );
    }
    if s.min_replicas > s.max_replicas {
        d(
            "min_replicas",
            format!(
                "is {} but max_replicas is {}",
                s.min_replicas, s.max_replicas
            ),
            "make min_replicas at most max_replicas",
        );
    }
    if s.target_in_flight.is_nan() || s.target_in_flight <= 0.0 {
        d(
            "target_in_flight",
            "must be above 0".into(),
            "the default is 8 requests per worker",
        );
    }
    if s.target_cpu_percent.is_some_and(|c| c.is_nan() || c <= 0.0) {
        d(
            "target_cpu_percent",
            "must be above 0".into(),
            "70 keeps each worker at 70 % of a core",
        );
    }
    if s.target_lag == Some(0) {
        d(
            "target_lag",
            "must be at least 1".into(),
            "10000 adds a worker for every 10,000 messages waiting",
        );
    }
    if s.target_drain.is_some_and(|t| t.is_zero()) {
        d(
            "target_drain",
            "must be above 0".into(),
            "30s adds workers while the backlog would take longer than 30 s to drain",
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use crate::PipelineFile;

    #[test]
    fn pipelines_override_the_platform_field_by_field() {
        let f = PipelineFile::parse(
            "s.yaml",
            "platform:\n  scaling: { max_replicas: 6, scale_down_window: 10s }\npipelines:\n  a:\n    scaling: { min_replicas: 0 }\n    sinks: [{ type: stdout }]\n  b:\n    sinks: [{ type: stdout }]\n",
        )
        .expect("valid");
        let a = &f.spec.pipelines[0].scaling;
        assert_eq!(
            (
                a.min_replicas,
                a.max_replicas,
                a.scale_down_window.as_secs()
            ),
            (0, 6, 10)
        );
        let b = &f.spec.pipelines[1].scaling;
        assert_eq!((b.min_replicas, b.max_replicas), (1, 6));
    }

    #[test]
    fn bad_policies_name_their_field() {
        let e = PipelineFile::parse(
            "s.yaml",
            "pipelines:\n  a:\n    scaling: { min_replicas: 5, max_replicas: 2 }\n    sinks: [{ type: stdout }]\n",
        )
        .expect_err("min above max");
        assert!(
            e.to_string()
                .contains("s.yaml:3:16: pipelines.a.scaling.min_replicas"),
            "{e}"
        );
    }
}
