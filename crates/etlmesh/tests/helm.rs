//! The Helm chart under `deploy/helm/etlmesh`: rendered with `helm template` when helm
//! is installed; otherwise every template, with its actions replaced by placeholders,
//! must still be valid YAML. Either way the objects have the expected kinds, the
//! chart's pipeline file is valid, and every flag the chart passes exists in the CLI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/etlmesh")
}

/// The chart's objects, and whether helm rendered them (else: placeholders).
fn objects() -> (Vec<serde_json::Value>, bool) {
    match Command::new("helm")
        .args(["template", "test"])
        .arg(chart())
        .output()
    {
        Ok(out) => {
            assert!(
                out.status.success(),
                "helm template failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            (
                parse(&String::from_utf8_lossy(&out.stdout), "helm template"),
                true,
            )
        }
        Err(_) => {
            eprintln!("helm is not installed: checking the templates with placeholders");
            let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("templates"))
                .expect("templates")
                .map(|e| e.expect("entry").path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
                .collect();
            files.sort();
            let mut all = Vec::new();
            for f in files {
                let src = std::fs::read_to_string(&f).expect("template");
                all.extend(parse(&placeholders(&src), &f.display().to_string()));
            }
            (all, false)
        }
    }
}

/// Drops lines that are only template actions; replaces inline actions with `x`.
fn placeholders(src: &str) -> String {
    let mut out = String::new();
    for line in src.lines() {
        let t = line.trim();
        if t.starts_with("{{") && t.ends_with("}}") && t.matches("{{").count() == 1 {
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let end = rest[start..].find("}}").expect("closed action") + start + 2;
            out.push('x');
            rest = &rest[end..];
        }
        out.push_str(rest);
        out.push('\n');
    }
    out
}

fn parse(text: &str, what: &str) -> Vec<serde_json::Value> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text)
        .unwrap_or_else(|e| panic!("{what}: not valid YAML: {e}\n{text}"));
    docs.into_iter()
        .filter(|v| !matches!(v, serde_json::Value::Null))
        .collect()
}

#[test]
fn the_chart_renders_the_expected_objects() {
    let (objects, rendered) = objects();
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for o in &objects {
        assert!(o["apiVersion"].is_string(), "apiVersion in {o:?}");
        let kind = o["kind"].as_str().expect("kind").to_string();
        assert!(o["metadata"]["name"].is_string(), "name in {o:?}");
        *kinds.entry(kind).or_default() += 1;
    }
    // Two pipelines in values.yaml: two worker Deployments once rendered, one template.
    let workers = if rendered { 2 } else { 1 };
    let expected: BTreeMap<String, usize> = [
        ("ConfigMap", 1),
        ("Deployment", 2 + workers),
        ("Role", 1),
        ("RoleBinding", 1),
        ("Service", 2),
        ("ServiceAccount", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(kinds, expected);

    let role = objects.iter().find(|o| o["kind"] == "Role").expect("role");
    let rules = serde_json::to_string(&role["rules"]).expect("rules");
    assert!(rules.contains("deployments/scale"), "{rules}");
    assert!(rules.contains("patch"), "{rules}");

    let control = objects
        .iter()
        .find(|o| {
            o["kind"] == "Deployment"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with("control-plane"))
        })
        .expect("control plane deployment");
    let args = serde_json::to_string(&control["spec"]["template"]["spec"]["containers"][0]["args"])
        .expect("args");
    assert!(args.contains("--scaler=kubernetes"), "{args}");
    if rendered {
        let names: Vec<&str> = objects
            .iter()
            .filter_map(|o| o["metadata"]["name"].as_str())
            .collect();
        for d in [
            "test-etlmesh-worker-clean-readings",
            "test-etlmesh-worker-readings-per-minute",
        ] {
            assert!(names.contains(&d), "{d} in {names:?}");
        }
    }
}

#[test]
fn the_charts_pipeline_file_is_valid_and_names_its_pipelines() {
    let values: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(chart().join("values.yaml")).expect("values"),
    )
    .expect("values.yaml is YAML");
    let file = values["pipelineFile"].as_str().expect("pipelineFile");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pipelines.yaml");
    std::fs::write(&path, file).expect("write");
    let parsed = etlmesh_config::PipelineFile::load(&path)
        .unwrap_or_else(|e| panic!("the chart's pipeline file: {e}"));
    let mut in_file: Vec<String> = parsed
        .spec
        .pipelines
        .iter()
        .map(|p| p.name.clone())
        .collect();
    let mut in_values: Vec<String> = values["pipelines"]
        .as_array()
        .expect("pipelines")
        .iter()
        .map(|p| p["name"].as_str().expect("name").to_string())
        .collect();
    in_file.sort();
    in_values.sort();
    assert_eq!(
        in_file, in_values,
        "values.pipelines matches the pipeline file"
    );
}

#[test]
fn every_flag_the_chart_passes_exists() {
    let templates = chart().join("templates");
    for (file, sub) in [
        ("control-plane.yaml", "control-plane"),
        ("gateway.yaml", "gateway"),
        ("workers.yaml", "worker"),
    ] {
        let src = std::fs::read_to_string(templates.join(file)).expect("template");
        let help = Command::new(env!("CARGO_BIN_EXE_etlmesh"))
            .args([sub, "--help"])
            .output()
            .expect("etlmesh runs");
        let help = String::from_utf8_lossy(&help.stdout);
        for line in src.lines() {
            let Some(arg) = line.trim().strip_prefix("- --") else {
                continue;
            };
            let flag = arg.split('=').next().unwrap_or(arg);
            assert!(
                help.contains(&format!("--{flag}")),
                "{file}: `etlmesh {sub}` has no --{flag}"
            );
        }
    }
}
