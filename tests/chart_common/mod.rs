//! Helpers of the Helm chart tests (`tests/chart.rs`): the chart's paths,
//! `helm template` / `helm lint`, `kubectl` against the test control plane,
//! and queries over rendered manifests.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use rp_testenv::ControlPlane;
use serde::Deserialize;
use serde_json::Value;

/// Release name and namespace used for every render.
pub const RELEASE: &str = "rp";
pub const NAMESPACE: &str = "rp-system";
/// `<release>-runner-provisioner`.
pub const FULLNAME: &str = "rp-runner-provisioner";

/// The ci values files the chart must ship (`charts/runner-provisioner/ci/`).
pub const CI_FILES: &[&str] = &[
    "default-values.yaml",
    "existing-secret-values.yaml",
    "ha-values.yaml",
    "namespaced-values.yaml",
    "pools-values.yaml",
];

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn chart_dir() -> PathBuf {
    repo().join("charts/runner-provisioner")
}

pub fn ci_file(name: &str) -> PathBuf {
    chart_dir().join("ci").join(name)
}

/// Every `ci/*.yaml`, sorted; fails when one of [`CI_FILES`] is missing.
pub fn ci_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart_dir().join("ci"))
        .expect("charts/runner-provisioner/ci/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for want in CI_FILES {
        assert!(
            files.iter().any(|f| f.file_name().unwrap() == *want),
            "charts/runner-provisioner/ci/{want} is missing"
        );
    }
    files
}

/// helm from the tools cache; fails (never skips) when it was not built.
pub fn helm() -> PathBuf {
    rp_testenv::controlplane::tool("helm")
        .unwrap_or_else(|e| panic!("the chart tests need helm: {e:#}"))
}

/// kubectl from PATH; fails (never skips) when it is missing.
pub fn kubectl() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("kubectl"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "kubectl is not on PATH: the chart tests apply the rendered manifests with it \
                 (install kubectl, see README.md Requirements; then `make tools` for the control plane)"
            )
        })
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(mut cmd: Command, stdin: Option<&str>) -> Output {
    let shown = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{shown}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes()).expect("write stdin");
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{shown}: {e}"))
}

/// `helm template rp <chart> -n rp-system <args>`: the manifest, or helm's stderr.
pub fn try_template(args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(helm());
    cmd.arg("template")
        .arg(RELEASE)
        .arg(chart_dir())
        .args(["--namespace", NAMESPACE])
        .args(args);
    let out = run(cmd, None);
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(text(&out.stderr))
    }
}

/// Renders with the given values files (paths) and `--set`-style strings.
pub fn render_with(values: &[&Path], extra: &[&str]) -> Manifest {
    let mut args: Vec<String> = Vec::new();
    for v in values {
        args.push("-f".into());
        args.push(v.display().to_string());
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    match try_template(&argv) {
        Ok(text) => Manifest::parse(text),
        Err(e) => panic!("helm template {argv:?} failed:\n{e}"),
    }
}

/// Renders one ci values file (by file name) plus extra arguments.
pub fn render_ci(name: &str, extra: &[&str]) -> Manifest {
    render_with(&[&ci_file(name)], extra)
}

/// Renders a values document given inline (written to a temporary file).
pub fn try_render_values(values_yaml: &str) -> Result<Manifest, String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("values.yaml");
    std::fs::write(&path, values_yaml).expect("write values");
    try_template(&["-f", path.to_str().unwrap()]).map(Manifest::parse)
}

pub fn render_values(values_yaml: &str) -> Manifest {
    try_render_values(values_yaml)
        .unwrap_or_else(|e| panic!("helm template failed for values\n{values_yaml}\n{e}"))
}

/// `helm lint --strict <chart> [-f values]`: Ok(stdout) or Err(stdout+stderr).
pub fn lint(values: Option<&Path>) -> Result<String, String> {
    let mut cmd = Command::new(helm());
    cmd.args(["lint", "--strict"]).arg(chart_dir());
    if let Some(v) = values {
        cmd.arg("-f").arg(v);
    }
    let out = run(cmd, None);
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    if out.status.success() {
        Ok(all)
    } else {
        Err(all)
    }
}

/// Every document of a multi-document YAML string (null documents dropped).
pub fn parse_docs(yaml: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("invalid YAML: {e}\n{yaml}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// Back to multi-document YAML.
pub fn to_yaml(docs: &[&Value]) -> String {
    docs.iter()
        .map(|d| format!("---\n{}", serde_norway::to_string(d).expect("YAML")))
        .collect()
}

/// A rendered manifest.
pub struct Manifest {
    pub text: String,
    pub docs: Vec<Value>,
}

impl Manifest {
    pub fn parse(text: String) -> Manifest {
        let docs = parse_docs(&text);
        Manifest { text, docs }
    }

    pub fn kinds(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    pub fn get(&self, kind: &str, name: &str) -> Option<&Value> {
        self.docs
            .iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    }

    pub fn one(&self, kind: &str, name: &str) -> &Value {
        self.get(kind, name)
            .unwrap_or_else(|| panic!("no {kind} {name} in the render; it has: {:?}", self.names()))
    }

    /// `Kind/name` of every document.
    pub fn names(&self) -> Vec<String> {
        self.docs
            .iter()
            .map(|d| {
                format!(
                    "{}/{}",
                    d["kind"].as_str().unwrap_or("?"),
                    d["metadata"]["name"].as_str().unwrap_or("?")
                )
            })
            .collect()
    }

    pub fn deployment(&self) -> &Value {
        self.one("Deployment", FULLNAME)
    }

    /// The operator container.
    pub fn container(&self) -> &Value {
        let cs = self.deployment()["spec"]["template"]["spec"]["containers"]
            .as_array()
            .expect("containers");
        assert_eq!(cs.len(), 1, "one container");
        &cs[0]
    }

    pub fn args(&self) -> Vec<String> {
        strings(&self.container()["args"])
    }

    /// Value of an `env` entry with a plain `value`.
    pub fn env(&self, name: &str) -> Option<&Value> {
        self.container()["env"]
            .as_array()?
            .iter()
            .find(|e| e["name"] == name)
    }

    pub fn checksum(&self) -> String {
        self.deployment()["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            .as_str()
            .expect("checksum/config annotation")
            .to_string()
    }

    /// Namespaces the documents live in (or are), for pre-creating them.
    pub fn namespaces(&self) -> BTreeSet<String> {
        namespaces_of(&self.docs)
    }
}

pub fn namespaces_of(docs: &[Value]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for d in docs {
        if let Some(ns) = d["metadata"]["namespace"].as_str() {
            out.insert(ns.to_string());
        }
        if d["kind"] == "Namespace"
            && let Some(n) = d["metadata"]["name"].as_str()
        {
            out.insert(n.to_string());
        }
    }
    out
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Base64 of a string (Secret `data`).
pub fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The RunnerPool CRD's `spec` schema (from `crds/runnerpool.yaml`).
pub fn crd_spec_schema() -> Value {
    let crd = parse_docs(&std::fs::read_to_string(repo().join("crds/runnerpool.yaml")).unwrap())
        .remove(0);
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

pub fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// kubectl against the test control plane
// ---------------------------------------------------------------------------

pub fn kubectl_cmd(cp: &ControlPlane) -> Command {
    let mut cmd = Command::new(kubectl());
    cmd.arg("--kubeconfig").arg(cp.kubeconfig());
    cmd
}

/// `kubectl <args>` with optional stdin: Ok(stdout) or Err(stdout+stderr).
pub fn kubectl_run(
    cp: &ControlPlane,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, String> {
    let mut cmd = kubectl_cmd(cp);
    cmd.args(args);
    let out = run(cmd, stdin);
    if out.status.success() {
        Ok(text(&out.stdout))
    } else {
        Err(format!("{}{}", text(&out.stdout), text(&out.stderr)))
    }
}

/// `kubectl apply --server-side --dry-run=server -f -` of YAML text.
pub fn dry_run_apply(cp: &ControlPlane, yaml: &str) -> Result<String, String> {
    kubectl_run(
        cp,
        &[
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=chart-test",
            "-f",
            "-",
        ],
        Some(yaml),
    )
}

/// Creates (for real) each namespace that does not exist yet.
pub async fn ensure_namespaces<'a>(cp: &ControlPlane, names: impl IntoIterator<Item = &'a String>) {
    for ns in names {
        let yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n");
        cp.apply_yaml(&yaml)
            .await
            .unwrap_or_else(|e| panic!("creating namespace {ns}: {e:#}"));
    }
}

/// Starts the control plane with the RunnerPool and KubeVirt CRDs; fails with
/// a pointer to `make tools` when its binaries are missing.
pub async fn control_plane() -> ControlPlane {
    control_plane_with(vec![
        runner_provisioner::crd::crd_yaml(),
        rp_testenv::kubevirt::crds_yaml().to_string(),
    ])
    .await
}

pub async fn control_plane_with(crds: Vec<String>) -> ControlPlane {
    rp_testenv::init_crypto();
    ControlPlane::start(rp_testenv::ControlPlaneOptions { crds })
        .await
        .unwrap_or_else(|e| {
            panic!("the test control plane did not start: {e:#}\n(build it with `make tools`)")
        })
}

// ---------------------------------------------------------------------------
// values.schema.json's `definitions.pool`, generated from the CRD
// ---------------------------------------------------------------------------

/// JSON-schema keywords copied from the CRD's OpenAPI schema as they are.
const KEPT: &[&str] = &[
    "description",
    "pattern",
    "minLength",
    "maxLength",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "maxProperties",
];

/// One CRD (OpenAPI v3) schema node as a values schema node: every value may
/// also be null (null in an entry removes a poolDefaults value), unknown keys
/// are refused (typos fail at install time), `required` is dropped (entries
/// are partial; the merged pool is checked by the template and the CRD)
/// except inside list items, which are not merged. Defaults, formats and CEL
/// rules stay with the CRD.
pub fn values_schema_node(crd: &Value, in_item: bool) -> Value {
    let mut out = serde_json::Map::new();
    for k in KEPT {
        if let Some(v) = crd.get(*k) {
            out.insert(k.to_string(), v.clone());
        }
    }
    if let Some(t) = crd.get("type").and_then(Value::as_str) {
        out.insert("type".into(), serde_json::json!([t, "null"]));
    }
    if let Some(e) = crd.get("enum").and_then(Value::as_array) {
        let mut e = e.clone();
        e.push(Value::Null);
        out.insert("enum".into(), Value::Array(e));
    }
    if let Some(items) = crd.get("items") {
        out.insert("items".into(), values_schema_node(items, true));
    }
    let open = crd["x-kubernetes-preserve-unknown-fields"] == true;
    if let Some(props) = crd.get("properties").and_then(Value::as_object) {
        let props: serde_json::Map<String, Value> = props
            .iter()
            .map(|(k, v)| (k.clone(), values_schema_node(v, false)))
            .collect();
        out.insert("properties".into(), Value::Object(props));
        if !open {
            out.insert("additionalProperties".into(), Value::Bool(false));
        }
        if in_item && let Some(r) = crd.get("required") {
            out.insert("required".into(), r.clone());
        }
    } else if let Some(ap) = crd.get("additionalProperties") {
        out.insert("additionalProperties".into(), values_schema_node(ap, true));
    }
    Value::Object(out)
}

/// `definitions.pool` of values.schema.json: a `pools` entry (or
/// `poolDefaults`): every RunnerPool spec field of the CRD but `circleci`
/// (only its `apiUrl`; the token refs are derived), plus the chart's own keys.
pub fn pool_values_schema(crd_spec: &Value) -> Value {
    let props = crd_spec["properties"].as_object().expect("spec properties");
    let mut p = serde_json::Map::new();
    for (k, v) in props {
        if k == "circleci" {
            continue;
        }
        p.insert(k.clone(), values_schema_node(v, false));
    }
    let circleci = &props["circleci"]["properties"];
    p.insert(
        "circleci".into(),
        serde_json::json!({
            "description": "CircleCI settings of this pool (the token Secret references are derived by the chart).",
            "type": ["object", "null"],
            "additionalProperties": false,
            "properties": {"apiUrl": values_schema_node(&circleci["apiUrl"], false)},
        }),
    );
    p.insert(
        "runnerTokenSecretRef".into(),
        serde_json::json!({
            "description": "An existing Secret key with this pool's resource class token (instead of token or existingSecret).",
            "type": ["object", "null"],
            "additionalProperties": false,
            "required": ["name"],
            "properties": {
                "name": values_schema_node(&circleci["runnerTokenSecretRef"]["properties"]["name"], false),
                "key": values_schema_node(&circleci["runnerTokenSecretRef"]["properties"]["key"], false),
            },
        }),
    );
    let s = |d: &str| serde_json::json!({"description": d, "type": ["string", "null"]});
    let map = |d: &str| serde_json::json!({"description": d, "type": ["object", "null"], "additionalProperties": {"type": "string"}});
    p.insert(
        "name".into(),
        s("RunnerPool name (default: derived from the resource class)."),
    );
    p.insert(
        "resourceClass".into(),
        serde_json::json!({
            "description": "The resource class (default: the entry's key).",
            "type": ["string", "null"],
            "pattern": props["resourceClass"]["pattern"],
        }),
    );
    p.insert(
        "token".into(),
        s("The resource class token (rendered into the Secret <name>-runner-token)."),
    );
    p.insert("labels".into(), map("Labels of the RunnerPool object."));
    p.insert(
        "annotations".into(),
        map("Annotations of the RunnerPool object."),
    );
    p.insert(
        "spec".into(),
        serde_json::json!({
            "description": "The reference chart's name for template.spec (a KubeVirt VirtualMachineInstanceSpec).",
            "type": ["object", "null"],
        }),
    );
    serde_json::json!({
        "description": "A RunnerPool (an entry of pools) or the defaults merged into each (poolDefaults). Generated from crds/runnerpool.yaml by `make chart-crds`.",
        "type": ["object", "null"],
        "additionalProperties": false,
        "properties": Value::Object(p),
    })
}
