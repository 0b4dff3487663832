//! Head sampling: which traces are exported over OTLP, chosen where a trace starts
//! and carried in the `traceparent` flags, from the standard variables
//! `OTEL_TRACES_SAMPLER` (`always_on`, `always_off`, `traceidratio`,
//! `parentbased_always_on` — the default —, `parentbased_always_off`,
//! `parentbased_traceidratio`) and `OTEL_TRACES_SAMPLER_ARG` (the ratio, 0 to 1).
//!
//! Exporting every span costs CPU in every process and in the collector; a ratio
//! keeps whole traces (the decision follows the trace id, as the OpenTelemetry SDKs'
//! `TraceIdRatioBased` does, so every process agrees). Sampling only decides export:
//! trace ids are still made, passed on and written in logs and error bodies.

use std::sync::OnceLock;

/// A sampling rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    root: Root,
    /// Follow the caller's decision when there is one.
    parent_based: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Root {
    On,
    Off,
    /// Sampled when the trace id's low 63 bits fall under this bound.
    Ratio(u64),
}

impl Default for Sampler {
    /// `parentbased_always_on`, the OpenTelemetry default.
    fn default() -> Self {
        Self {
            root: Root::On,
            parent_based: true,
        }
    }
}

impl Sampler {
    /// A sampler from the values of `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`.
    pub fn parse(name: Option<&str>, arg: Option<&str>) -> Result<Self, String> {
        let name = name.map(str::trim).filter(|n| !n.is_empty());
        let ratio = || -> Result<Root, String> {
            let Some(a) = arg.map(str::trim).filter(|a| !a.is_empty()) else {
                return Ok(Root::On); // the specification's default ratio: 1.0
            };
            match a.parse::<f64>() {
                Ok(r) if (0.0..=1.0).contains(&r) => {
                    Ok(Root::Ratio((r * (1u64 << 63) as f64) as u64))
                }
                _ => Err(format!(
                    "OTEL_TRACES_SAMPLER_ARG={a} is not a ratio; give a number from 0 to 1 (0.1 exports one trace in ten)"
                )),
            }
        };
        let (root, parent_based) = match name.unwrap_or("parentbased_always_on") {
            "always_on" => (Root::On, false),
            "always_off" => (Root::Off, false),
            "traceidratio" => (ratio()?, false),
            "parentbased_always_on" => (Root::On, true),
            "parentbased_always_off" => (Root::Off, true),
            "parentbased_traceidratio" => (ratio()?, true),
            other => {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={other} is not supported; use always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                ));
            }
        };
        Ok(Self { root, parent_based })
    }

    /// From the environment.
    pub fn from_env() -> Result<Self, String> {
        let var = |k: &str| std::env::var(k).ok();
        Self::parse(
            var("OTEL_TRACES_SAMPLER").as_deref(),
            var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )
    }

    /// Whether a trace is sampled: `parent` is the caller's flag, if it sent one.
    pub fn sampled(&self, trace_id: u128, parent: Option<bool>) -> bool {
        if self.parent_based
            && let Some(p) = parent
        {
            return p;
        }
        match self.root {
            Root::On => true,
            Root::Off => false,
            Root::Ratio(bound) => ((trace_id as u64) >> 1) < bound,
        }
    }
}

static INSTALLED: OnceLock<Sampler> = OnceLock::new();

/// Makes `s` this process's sampler (the first call wins).
pub fn install(s: Sampler) {
    let _ = INSTALLED.set(s);
}

/// This process's sampler (the default until one is installed).
pub fn current() -> Sampler {
    INSTALLED.get().copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ratios() {
        let s = Sampler::parse(None, None).expect("default");
        assert_eq!(s, Sampler::default());
        assert!(s.sampled(1, None));
        assert!(!s.sampled(1, Some(false)), "follows its parent");
        let off = Sampler::parse(Some("always_off"), None).expect("off");
        assert!(!off.sampled(1, Some(true)), "ignores its parent");
        let on = Sampler::parse(Some("parentbased_traceidratio"), None).expect("ratio 1");
        assert!(on.sampled(u128::MAX, None));
        for bad in [
            ("nope", None),
            ("traceidratio", Some("2")),
            ("traceidratio", Some("x")),
        ] {
            let e = Sampler::parse(Some(bad.0), bad.1).expect_err("refused");
            assert!(e.contains("OTEL_TRACES_SAMPLER"), "{e}");
        }
    }

    #[test]
    fn a_ratio_keeps_its_share_of_traces_and_decides_by_trace_id() {
        let s = Sampler::parse(Some("traceidratio"), Some("0.1")).expect("ratio");
        let ids: Vec<u128> = (0..20_000).map(|_| rand::random()).collect();
        let kept = ids.iter().filter(|&&t| s.sampled(t, None)).count();
        assert!((1_600..2_400).contains(&kept), "{kept} of 20,000");
        // The same trace id gets the same answer in every process.
        for &t in &ids[..100] {
            assert_eq!(s.sampled(t, None), s.sampled(t, Some(true)));
        }
        let pb = Sampler::parse(Some("parentbased_traceidratio"), Some("0")).expect("ratio 0");
        assert!(!pb.sampled(u128::MAX, None));
        assert!(pb.sampled(u128::MAX, Some(true)));
    }
}
