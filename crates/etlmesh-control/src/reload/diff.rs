//! What a reload changes: pipelines added, removed, changed (their workers are
//! replaced), rescaled (only their `scaling` differs: the pool takes the new policy,
//! its workers stay) and unchanged (not touched).

use etlmesh_config::{PipelineSpec, Spec};
use serde::Serialize;

/// The difference between the running file and a new one, by pipeline name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Diff {
    /// Declared now, not before: their pools start.
    pub added: Vec<String>,
    /// Declared before, not now: their workers drain and their routes go.
    pub removed: Vec<String>,
    /// Declared in both, differently: new workers replace the old.
    pub changed: Vec<String>,
    /// Only their `scaling` differs: the pool takes the new policy.
    pub rescaled: Vec<String>,
    /// Equal in both: not touched.
    pub unchanged: Vec<String>,
    /// `platform` differs: its settings take effect when etlmesh restarts.
    pub platform: bool,
}

impl Diff {
    /// Compares two files.
    pub fn between(old: &Spec, new: &Spec) -> Self {
        let mut d = Diff {
            platform: old.platform != new.platform,
            ..Default::default()
        };
        for p in &new.pipelines {
            match old.pipelines.iter().find(|o| o.name == p.name) {
                None => d.added.push(p.name.clone()),
                Some(o) if o == p => d.unchanged.push(p.name.clone()),
                Some(o) if same_but_scaling(o, p) => d.rescaled.push(p.name.clone()),
                Some(_) => d.changed.push(p.name.clone()),
            }
        }
        for o in &old.pipelines {
            if !new.pipelines.iter().any(|p| p.name == o.name) {
                d.removed.push(o.name.clone());
            }
        }
        d
    }

    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.rescaled.is_empty()
            && !self.platform
    }

    /// One line for logs: `added a; changed b, c; removed d`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (what, names) in [
            ("added", &self.added),
            ("changed", &self.changed),
            ("rescaled", &self.rescaled),
            ("removed", &self.removed),
        ] {
            if !names.is_empty() {
                parts.push(format!("{what} {}", names.join(", ")));
            }
        }
        if self.platform {
            parts.push("platform settings changed (applied at the next start)".into());
        }
        if parts.is_empty() {
            "no change".into()
        } else {
            parts.join("; ")
        }
    }
}

fn same_but_scaling(a: &PipelineSpec, b: &PipelineSpec) -> bool {
    let mut a = a.clone();
    a.scaling = b.scaling.clone();
    a == *b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Spec {
        etlmesh_config::PipelineFile::parse("p.yaml", text)
            .expect("a valid file")
            .spec
    }

    const BASE: &str = r#"pipelines:
  keep:
    schema: { a: int64 }
    transform: SELECT a FROM input
    sinks: [{ type: stdout }]
  edit:
    schema: { a: int64 }
    transform: SELECT a FROM input
    sinks: [{ type: stdout }]
  scale:
    schema: { a: int64 }
    transform: SELECT a FROM input
    sinks: [{ type: stdout }]
  drop:
    schema: { a: int64 }
    transform: SELECT a FROM input
    sinks: [{ type: stdout }]
"#;

    #[test]
    fn each_pipeline_is_sorted_by_what_a_reload_does_to_it() {
        let new = r#"pipelines:
  keep:
    schema: { a: int64 }
    transform: SELECT a FROM input
    sinks: [{ type: stdout }]
  edit:
    schema: { a: int64 }
    transform: SELECT a + 1 AS a FROM input
    sinks: [{ type: stdout }]
  scale:
    schema: { a: int64 }
    transform: SELECT a FROM input
    sinks: [{ type: stdout }]
    scaling: { max_replicas: 3 }
  fresh:
    schema: { a: int64 }
    transform: SELECT a FROM input
    sinks: [{ type: stdout }]
"#;
        let d = Diff::between(&spec(BASE), &spec(new));
        assert_eq!(d.unchanged, ["keep"]);
        assert_eq!(d.changed, ["edit"]);
        assert_eq!(d.rescaled, ["scale"]);
        assert_eq!(d.added, ["fresh"]);
        assert_eq!(d.removed, ["drop"]);
        assert!(!d.platform);
        assert_eq!(
            d.summary(),
            "added fresh; changed edit; rescaled scale; removed drop"
        );
    }

    #[test]
    fn the_same_file_is_no_change() {
        let d = Diff::between(&spec(BASE), &spec(BASE));
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(d.summary(), "no change");
    }
}
