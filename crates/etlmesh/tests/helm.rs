//! The Helm chart under `deploy/helm/etlmesh`, rendered by Helm's own library
//! (`deploy/helm/render.py`, PyPI's helm-python-sdk; no binary, no cluster) and
//! checked against the Kubernetes schemas (`kubernetes-validate --strict`): the
//! objects have the expected kinds with and without the optional parts (broker,
//! ServiceMonitor, the mesh), the chart's pipeline file is valid, every flag it passes
//! exists — and the mesh material it makes (an Ed25519 trust anchor and the join
//! token) is what `etlmesh` accepts: a control plane on that anchor, a worker and a
//! gateway joining with that token, a request answered over mTLS.
//!
//! `.ci/run` installs both tools; elsewhere the rendering tests skip, saying so.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Scratch;
use common::mesh::*;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/helm/etlmesh")
}

fn required() -> bool {
    std::env::var("ETLMESH_REQUIRE_SERVICES").as_deref() == Ok("1")
}

/// The chart's objects with `values` over values.yaml, or `None` (said) when
/// helm-python-sdk is not installed and this run does not require it.
fn render(values: &serde_json::Value) -> Option<Vec<serde_json::Value>> {
    let script = chart().join("../render.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(values.to_string())
        .output()
        .expect("python3 runs");
    if out.status.code() == Some(2) {
        assert!(
            !required(),
            "helm-python-sdk is missing and this run requires it: pip install helm-python-sdk"
        );
        eprintln!("skipped: helm-python-sdk is not installed (pip install helm-python-sdk)");
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the chart does not render with {values}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    validate(&text, values);
    Some(parse(&text, "the rendered chart"))
}

/// `kubernetes-validate --strict` on the manifests: every object against the
/// Kubernetes schemas (a CRD's kind, the ServiceMonitor, has none there and is warned
/// about, not failed).
fn validate(manifests: &str, values: &serde_json::Value) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("manifests.yaml");
    std::fs::write(&file, manifests).expect("write");
    let Ok(out) = Command::new("kubernetes-validate")
        .args(["--strict", "--quiet"])
        .arg(&file)
        .output()
    else {
        assert!(
            !required(),
            "kubernetes-validate is missing and this run requires it: pip install kubernetes-validate"
        );
        eprintln!("not validated: kubernetes-validate is not installed");
        return;
    };
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !said.contains("ERROR"),
        "the manifests with {values} fail the Kubernetes schemas:\n{said}"
    );
    for line in said.lines().filter(|l| l.contains("WARN")) {
        assert!(
            line.contains("ServiceMonitor"),
            "only the CRD lacks a schema: {line}"
        );
    }
}

fn parse(text: &str, what: &str) -> Vec<serde_json::Value> {
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text)
        .unwrap_or_else(|e| panic!("{what}: not valid YAML: {e}\n{text}"));
    docs.into_iter()
        .filter(|v| !matches!(v, serde_json::Value::Null))
        .collect()
}

fn kinds(objects: &[serde_json::Value]) -> BTreeMap<String, usize> {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for o in objects {
        assert!(o["metadata"]["name"].is_string(), "name in {o:?}");
        *kinds
            .entry(o["kind"].as_str().expect("kind").to_string())
            .or_default() += 1;
    }
    kinds
}

fn named<'a>(objects: &'a [serde_json::Value], kind: &str, suffix: &str) -> &'a serde_json::Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(suffix))
        })
        .unwrap_or_else(|| panic!("a {kind} named …{suffix}"))
}

fn args(o: &serde_json::Value) -> String {
    serde_json::to_string(&o["spec"]["template"]["spec"]["containers"][0]["args"]).expect("args")
}

fn expected(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

#[test]
fn the_chart_renders_the_mesh_with_mtls_by_default() {
    let Some(objects) = render(&serde_json::json!({})) else {
        return;
    };
    // Two pipelines in values.yaml: two worker StatefulSets, each with its budget.
    assert_eq!(
        kinds(&objects),
        expected(&[
            ("ConfigMap", 1),
            ("Deployment", 2),
            ("PodDisruptionBudget", 3),
            ("Role", 1),
            ("RoleBinding", 1),
            ("Secret", 1),
            ("Service", 3),
            ("ServiceAccount", 1),
            ("StatefulSet", 2),
        ])
    );
    let role = named(&objects, "Role", "scaler");
    let rules = serde_json::to_string(&role["rules"]).expect("rules");
    assert!(
        rules.contains("statefulsets/scale")
            && rules.contains("patch")
            && rules.contains("\"get\""),
        "{rules}"
    );

    let control = named(&objects, "Deployment", "control-plane");
    let a = args(control);
    for flag in [
        "--scaler=kubernetes",
        "--k8s-kind=statefulset",
        "--mesh-listen=0.0.0.0:9443",
        "--mesh-ca-cert=",
    ] {
        assert!(a.contains(flag), "{flag} in {a}");
    }
    for (kind, name) in [
        ("StatefulSet", "worker-clean-readings"),
        ("Deployment", "gateway"),
    ] {
        let o = named(&objects, kind, name);
        let a = args(o);
        assert!(
            a.contains("--control-plane=https://test-etlmesh-control-plane:9443"),
            "{name} joins the mesh listener: {a}"
        );
        let env = serde_json::to_string(&o["spec"]["template"]["spec"]["containers"][0]["env"])
            .expect("env");
        assert!(
            env.contains("ETLMESH_JOIN_TOKEN") && env.contains("test-etlmesh-mesh"),
            "{name} takes the join token from the Secret: {env}"
        );
    }
    let worker = named(&objects, "StatefulSet", "worker-clean-readings");
    assert_eq!(worker["spec"]["podManagementPolicy"], "Parallel");
    assert!(args(worker).contains("--id=$(POD_NAME)"));
}

#[test]
fn the_optional_parts_render_and_the_mesh_can_be_turned_off() {
    let values = serde_json::json!({
        "broker": { "enabled": true },
        "serviceMonitor": { "enabled": true },
        "mesh": { "enabled": false },
        "gateway": { "podDisruptionBudget": { "enabled": false } },
        "objectStorage": {
            "endpoint": "http://minio.storage:9000",
            "region": "eu-west-1",
            "allowHttp": true,
            "existingSecret": "lake-credentials",
        },
    });
    let Some(objects) = render(&values) else {
        return;
    };
    assert_eq!(
        kinds(&objects),
        expected(&[
            ("ConfigMap", 1),
            ("Deployment", 3),
            ("PodDisruptionBudget", 2),
            ("Role", 1),
            ("RoleBinding", 1),
            ("Service", 4),
            ("ServiceAccount", 1),
            ("ServiceMonitor", 1),
            ("StatefulSet", 2),
        ])
    );
    let worker = named(&objects, "StatefulSet", "worker-clean-readings");
    assert!(
        args(worker).contains("--control-plane=http://test-etlmesh-control-plane:9090"),
        "{}",
        args(worker)
    );
    let monitor = named(&objects, "ServiceMonitor", "etlmesh");
    let scraped = serde_json::to_string(&monitor["spec"]["selector"]).expect("selector");
    assert!(
        scraped.contains("worker"),
        "without mTLS the workers are scraped: {scraped}"
    );
    assert!(args(named(&objects, "Deployment", "broker")).contains("--metrics="));
    // Workers upload to the bucket and gateways read it: both get its settings.
    for (kind, name) in [
        ("StatefulSet", "worker-clean-readings"),
        ("Deployment", "gateway"),
    ] {
        let env = serde_json::to_string(
            &named(&objects, kind, name)["spec"]["template"]["spec"]["containers"][0]["env"],
        )
        .expect("env");
        for needle in [
            r#"{"name":"AWS_ENDPOINT_URL","value":"http://minio.storage:9000"}"#,
            r#"{"name":"AWS_REGION","value":"eu-west-1"}"#,
            r#""secretKeyRef":{"key":"secret-access-key","name":"lake-credentials"}"#,
        ] {
            assert!(env.contains(needle), "{name}: {needle} in {env}");
        }
    }
}

/// The mesh Secret the chart makes, as files: `ca.crt`, `ca.key`, and the token.
fn mesh_secret(objects: &[serde_json::Value], dir: &Path) -> String {
    use base64::Engine as _;
    let secret = named(objects, "Secret", "mesh");
    let get = |k: &str| {
        let b64 = secret["data"][k].as_str().unwrap_or_else(|| panic!("{k}"));
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap_or_else(|e| panic!("{k} is base64: {e}"))
    };
    std::fs::write(dir.join("ca.crt"), get("ca.crt")).expect("write");
    std::fs::write(dir.join("ca.key"), get("ca.key")).expect("write");
    String::from_utf8(get("join-token")).expect("the token is text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_trust_anchor_and_join_token_make_a_working_mesh() {
    let Some(objects) = render(&serde_json::json!({})) else {
        return;
    };
    let scratch = Scratch::new();
    let dir = scratch.dir.path();
    let token = mesh_secret(&objects, dir);
    // What the chart's init container does: the token where the authority keeps it.
    std::fs::create_dir_all(dir.join("st/mesh")).expect("mkdir");
    std::fs::write(dir.join("st/mesh/join-token"), &token).expect("write");
    scratch.write("mesh.yaml", MESH_YAML);
    let cp = Proc::start(
        dir,
        &[
            "control-plane",
            "--listen",
            "127.0.0.1:0",
            "--mesh-listen",
            "127.0.0.1:0",
            "--mesh-ca-cert",
            "ca.crt",
            "--mesh-ca-key",
            "ca.key",
            "--state-dir",
            "st",
        ],
    );
    let mesh = cp.url("control plane mesh");
    assert_eq!(
        std::fs::read_to_string(dir.join("st/mesh/join-token"))
            .expect("token")
            .trim(),
        token.trim(),
        "the control plane keeps the chart's token: it is for the chart's anchor"
    );
    assert!(
        !dir.join("st/mesh/ca.pem").exists(),
        "no anchor of its own beside the chart's"
    );
    let env = [("ETLMESH_JOIN_TOKEN".to_string(), token.trim().to_string())];
    let gw = Proc::gateway(dir, &mesh, &env);
    let _worker = Proc::worker(dir, "mesh.yaml", "w1", &mesh, &env);
    let gw_url = gw.url("gateway");
    let a = Http::new()
        .post_until_ok(&format!("{gw_url}/v1/pipelines/clean"), 200)
        .await
        .unwrap_or_else(|status| {
            panic!(
                "a request through the chart's mesh: {status}\n{}\n{}",
                cp.output(),
                gw.output()
            )
        });
    assert_eq!(a.header("etlmesh-worker"), "w1");
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
        ("broker.yaml", "broker"),
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
