//! The Helm chart `charts/runner-provisioner`: `helm lint --strict` and
//! `helm template` with every `ci/*.yaml`, assertions on what it renders
//! (hardening, probes, exact RBAC, HA, pools and their merged defaults, token
//! Secrets, the config checksum), the rendered manifests and every file of
//! `examples/` against a real kube-apiserver (server-side dry-run), the
//! chart's CRD against `crds/runnerpool.yaml`, values.schema.json against the
//! CRD, and the operator binary running with nothing but the chart's
//! ServiceAccount and RBAC after a real `helm install`.
//!
//! Needs helm and the control plane from `make tools`, and kubectl on PATH:
//! the tests fail (never skip) without them.

mod chart_common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chart_common::*;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------
// 1. helm lint
// ---------------------------------------------------------------------------

#[test]
fn helm_lint_strict_passes_with_every_ci_values_file() {
    let t0 = Instant::now();
    let mut failures = Vec::new();
    if let Err(e) = lint(None) {
        failures.push(format!("(chart defaults)\n{e}"));
    }
    for f in ci_files() {
        if let Err(e) = lint(Some(&f)) {
            failures.push(format!("{}\n{e}", f.display()));
        }
    }
    assert!(
        failures.is_empty(),
        "helm lint --strict failed:\n{}",
        failures.join("\n")
    );
    eprintln!("helm lint: {:?}", t0.elapsed());
}

// ---------------------------------------------------------------------------
// 2. helm template: what the chart renders
// ---------------------------------------------------------------------------

const NAMESPACED_KINDS: &[&str] = &[
    "ServiceAccount",
    "Secret",
    "Deployment",
    "Service",
    "Role",
    "RoleBinding",
    "PodDisruptionBudget",
    "ServiceMonitor",
    "RunnerPool",
];

#[test]
fn every_ci_values_file_renders_well_formed_objects() {
    for f in ci_files() {
        let m = render_with(&[&f], &[]);
        let mut seen = BTreeSet::new();
        for d in &m.docs {
            let kind = d["kind"].as_str().expect("kind");
            assert!(d["apiVersion"].is_string(), "{kind} without apiVersion");
            let name = d["metadata"]["name"].as_str().expect("metadata.name");
            let ns = d["metadata"]["namespace"].as_str();
            if NAMESPACED_KINDS.contains(&kind) {
                assert!(
                    ns.is_some(),
                    "{}: {kind} {name} has no namespace: helm template output must be applicable as is",
                    f.display()
                );
            } else {
                assert!(ns.is_none(), "{kind} {name} is cluster-scoped");
            }
            assert!(
                seen.insert((kind.to_string(), ns.map(String::from), name.to_string())),
                "{}: {kind} {name} rendered twice",
                f.display()
            );
            assert_eq!(
                d["metadata"]["labels"]["app.kubernetes.io/managed-by"], "Helm",
                "{kind} {name} labels"
            );
        }
        for kind in ["Deployment", "ServiceAccount", "Service"] {
            assert_eq!(m.kinds(kind).len(), 1, "{}: one {kind}", f.display());
        }
    }
}

#[test]
fn operator_pod_is_hardened_probed_and_configured() {
    let m = render_ci("default-values.yaml", &[]);
    let dep = m.deployment();
    let pod = &dep["spec"]["template"]["spec"];
    let psc = &pod["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert_eq!(psc["runAsUser"], 65532);
    assert!(psc["fsGroup"].is_u64(), "fsGroup set: {psc}");
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");

    let c = m.container();
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert!(sc["capabilities"]["add"].is_null(), "no capability added");
    assert_ne!(sc["privileged"], true);

    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 8000);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/live");
    assert_eq!(c["livenessProbe"]["httpGet"]["port"], 8001);
    let ports: BTreeMap<String, u64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().into(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(ports["http-metrics"], 8000);
    assert_eq!(ports["http-live"], 8001);

    // Downward API and the log filter.
    assert_eq!(
        m.env("POD_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        m.env("POD_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(m.env("RUST_LOG").unwrap()["value"], "info");

    // Image, resources, service account.
    assert_eq!(
        c["image"],
        "ghcr.io/runner-provisioner/runner-provisioner:0.1.0"
    );
    assert_eq!(c["resources"]["requests"]["cpu"], "50m");
    assert_eq!(c["resources"]["requests"]["memory"], "64Mi");
    assert_eq!(c["resources"]["limits"]["memory"], "512Mi");
    assert_eq!(pod["serviceAccountName"], FULLNAME);
    m.one("ServiceAccount", FULLNAME);

    // Command line: all namespaces, leader election with a per-release Lease.
    let args = m.args();
    assert_eq!(args[0], "run");
    assert!(
        !args.iter().any(|a| a.starts_with("--namespace")),
        "{args:?}"
    );
    for want in [
        "--leader-election=true",
        &format!("--lease-name={FULLNAME}"),
        "--log-format=json",
        "--ready-addr=0.0.0.0:8000",
        "--live-addr=0.0.0.0:8001",
    ] {
        assert!(args.iter().any(|a| a == want), "{want} not in {args:?}");
    }

    // One replica: Recreate, no PodDisruptionBudget.
    assert_eq!(dep["spec"]["replicas"], 1);
    assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
    assert!(m.kinds("PodDisruptionBudget").is_empty());

    // Metrics Service on 8000, selecting the pod; no ServiceMonitor by default.
    let svc = m.one("Service", FULLNAME);
    let sp = &svc["spec"]["ports"][0];
    assert_eq!(sp["name"], "http-metrics");
    assert_eq!(sp["port"], 8000);
    let sel = &svc["spec"]["selector"];
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    for (k, v) in sel.as_object().unwrap() {
        assert_eq!(&labels[k], v, "Service selects the operator pod ({k})");
    }
    assert!(m.kinds("ServiceMonitor").is_empty());
    // No pools, no token: no Secret and no RunnerPool.
    assert!(m.kinds("Secret").is_empty(), "{:?}", m.names());
    assert!(m.kinds("RunnerPool").is_empty());
}

#[test]
fn deployment_values_are_honoured() {
    let m = render_values(
        r#"
image: {digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", tag: "9.9.9", pullPolicy: Always}
imagePullSecrets: [regcred, {name: other}]
logLevel: "info,runner_provisioner=debug"
logFormat: text
extraEnv: [{name: HTTPS_PROXY, value: "http://proxy:3128"}]
extraArgs: ["--metrics-addr=0.0.0.0:9090"]
nodeSelector: {kubernetes.io/os: linux}
tolerations: [{key: ci, operator: Exists}]
priorityClassName: system-cluster-critical
podAnnotations: {example.com/a: "1"}
podLabels: {team: platform}
serviceAccount: {name: custom-sa, annotations: {example.com/role: x}}
"#,
    );
    let c = m.container();
    assert_eq!(
        c["image"],
        "ghcr.io/runner-provisioner/runner-provisioner@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "the digest wins over the tag"
    );
    assert_eq!(c["imagePullPolicy"], "Always");
    assert_eq!(
        m.env("RUST_LOG").unwrap()["value"],
        "info,runner_provisioner=debug"
    );
    assert_eq!(m.env("HTTPS_PROXY").unwrap()["value"], "http://proxy:3128");
    let args = m.args();
    assert!(args.contains(&"--log-format=text".to_string()), "{args:?}");
    assert!(args.contains(&"--metrics-addr=0.0.0.0:9090".to_string()));
    let pod = &m.deployment()["spec"]["template"];
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{"name": "regcred"}, {"name": "other"}])
    );
    assert_eq!(pod["spec"]["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(pod["spec"]["tolerations"][0]["key"], "ci");
    assert_eq!(pod["spec"]["priorityClassName"], "system-cluster-critical");
    assert_eq!(pod["metadata"]["annotations"]["example.com/a"], "1");
    assert_eq!(pod["metadata"]["labels"]["team"], "platform");
    assert_eq!(pod["spec"]["serviceAccountName"], "custom-sa");
    let sa = m.one("ServiceAccount", "custom-sa");
    assert_eq!(sa["metadata"]["annotations"]["example.com/role"], "x");
    for b in m
        .kinds("ClusterRoleBinding")
        .into_iter()
        .chain(m.kinds("RoleBinding"))
    {
        assert_eq!(b["subjects"][0]["name"], "custom-sa");
        assert_eq!(b["subjects"][0]["namespace"], NAMESPACE);
    }

    // image.tag defaults to the appVersion; an explicit tag is used as is.
    let m = render_values("image: {tag: \"1.2\"}");
    assert_eq!(
        m.container()["image"],
        "ghcr.io/runner-provisioner/runner-provisioner:1.2"
    );
    // An existing ServiceAccount.
    let m = render_values("serviceAccount: {create: false, name: byo}");
    assert!(m.kinds("ServiceAccount").is_empty());
    assert_eq!(
        m.deployment()["spec"]["template"]["spec"]["serviceAccountName"],
        "byo"
    );
}

/// (apiGroup, resource, resourceNames) -> verbs, flattened over all rules.
type Grants = BTreeMap<(String, String, Vec<String>), BTreeSet<String>>;

fn grants(role: &Value) -> Grants {
    let mut out = Grants::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert!(rule["nonResourceURLs"].is_null(), "no non-resource URLs");
        let names = strings(&rule["resourceNames"]);
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                out.entry((g.clone(), r, names.clone()))
                    .or_default()
                    .extend(strings(&rule["verbs"]));
            }
        }
    }
    out
}

fn expect_grants(list: &[(&str, &str, &[&str], &[&str])]) -> Grants {
    list.iter()
        .map(|(g, r, names, verbs)| {
            (
                (
                    g.to_string(),
                    r.to_string(),
                    names.iter().map(|s| s.to_string()).collect(),
                ),
                verbs.iter().map(|s| s.to_string()).collect(),
            )
        })
        .collect()
}

/// Exactly what the operator uses (see src/): a verb more or less fails.
fn operator_grants() -> Grants {
    expect_grants(&[
        (
            "runners.provisioner.dev",
            "runnerpools",
            &[],
            &["get", "list", "watch", "patch", "update"],
        ),
        (
            "runners.provisioner.dev",
            "runnerpools/status",
            &[],
            &["get", "patch", "update"],
        ),
        (
            "runners.provisioner.dev",
            "runnerpools/finalizers",
            &[],
            &["update"],
        ),
        (
            "",
            "secrets",
            &[],
            &["get", "list", "watch", "create", "patch"],
        ),
        (
            "pool.kubevirt.io",
            "virtualmachinepools",
            &[],
            &["get", "list", "watch", "create", "patch"],
        ),
        (
            "pool.kubevirt.io",
            "virtualmachinepools/scale",
            &[],
            &["get", "patch", "update"],
        ),
        (
            "kubevirt.io",
            "virtualmachines",
            &[],
            &["get", "list", "watch", "delete", "patch"],
        ),
        ("events.k8s.io", "events", &[], &["create", "patch"]),
        ("", "events", &[], &["create", "patch"]),
    ])
}

fn lease_grants(lease: &str) -> Grants {
    expect_grants(&[
        ("coordination.k8s.io", "leases", &[], &["create"]),
        (
            "coordination.k8s.io",
            "leases",
            &[lease],
            &["get", "update"],
        ),
    ])
}

fn assert_binding(b: &Value, kind: &str, role: &str) {
    assert_eq!(b["roleRef"]["kind"], kind);
    assert_eq!(b["roleRef"]["name"], role);
    assert_eq!(
        b["subjects"],
        json!([{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}])
    );
}

#[test]
fn rbac_grants_exactly_what_the_operator_needs() {
    let lease_role = format!("{FULLNAME}-leader-election");

    // All namespaces: a ClusterRole; the Lease by a Role in the release namespace.
    let m = render_ci("default-values.yaml", &[]);
    let cr = m.one("ClusterRole", FULLNAME);
    assert_eq!(grants(cr), operator_grants(), "ClusterRole rules");
    assert_binding(
        m.one("ClusterRoleBinding", FULLNAME),
        "ClusterRole",
        FULLNAME,
    );
    let roles = m.kinds("Role");
    assert_eq!(roles.len(), 1, "only the Lease Role: {:?}", m.names());
    let lr = m.one("Role", &lease_role);
    assert_eq!(lr["metadata"]["namespace"], NAMESPACE);
    assert_eq!(grants(lr), lease_grants(FULLNAME));
    assert_binding(m.one("RoleBinding", &lease_role), "Role", &lease_role);
    assert_eq!(m.kinds("RoleBinding").len(), 1);

    // One namespace: a Role there, no cluster-wide grant at all; the Lease
    // Role stays in the release namespace.
    let m = render_ci("namespaced-values.yaml", &[]);
    assert!(m.kinds("ClusterRole").is_empty(), "{:?}", m.names());
    assert!(m.kinds("ClusterRoleBinding").is_empty());
    let r = m.one("Role", FULLNAME);
    assert_eq!(r["metadata"]["namespace"], "ci-runners");
    assert_eq!(grants(r), operator_grants(), "namespaced Role rules");
    let rb = m.one("RoleBinding", FULLNAME);
    assert_eq!(rb["metadata"]["namespace"], "ci-runners");
    assert_binding(rb, "Role", FULLNAME);
    let lr = m.one("Role", &lease_role);
    assert_eq!(lr["metadata"]["namespace"], NAMESPACE);
    assert_eq!(grants(lr), lease_grants(FULLNAME));
    assert!(m.args().contains(&"--namespace=ci-runners".to_string()));
    // Its pools and their Secrets live in the watched namespace.
    for kind in ["RunnerPool", "Secret"] {
        for d in m.kinds(kind) {
            assert_eq!(d["metadata"]["namespace"], "ci-runners", "{kind}");
        }
    }

    // Without leader election: no Lease grant.
    let m = render_ci(
        "default-values.yaml",
        &["--set", "leaderElection.enabled=false"],
    );
    assert!(m.kinds("Role").is_empty() && m.kinds("RoleBinding").is_empty());
    assert!(m.args().contains(&"--leader-election=false".to_string()));
    // A custom Lease name is the one granted.
    let m = render_ci(
        "default-values.yaml",
        &["--set", "leaderElection.leaseName=my-lease"],
    );
    assert_eq!(grants(m.one("Role", &lease_role)), lease_grants("my-lease"));
    assert!(m.args().contains(&"--lease-name=my-lease".to_string()));
}

#[test]
fn ha_has_a_pdb_rolling_updates_and_a_service_monitor() {
    let m = render_ci("ha-values.yaml", &[]);
    let dep = m.deployment();
    assert_eq!(dep["spec"]["replicas"], 2);
    assert_eq!(dep["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(
        dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    assert!(m.args().contains(&"--leader-election=true".to_string()));
    let pdb = m.one("PodDisruptionBudget", FULLNAME);
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert!(pdb["spec"]["maxUnavailable"].is_null());
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "PDB selects the operator pods ({k})");
    }
    assert!(
        dep["spec"]["template"]["spec"]["topologySpreadConstraints"].is_array(),
        "topologySpreadConstraints passed through"
    );
    let sm = m.one("ServiceMonitor", FULLNAME);
    assert_eq!(sm["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "http-metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(sm["spec"]["endpoints"][0]["interval"], "30s");
    assert_eq!(
        sm["spec"]["namespaceSelector"]["matchNames"],
        json!([NAMESPACE])
    );

    // maxUnavailable wins over minAvailable; the PDB can be turned off.
    let m = render_ci(
        "ha-values.yaml",
        &["--set", "podDisruptionBudget.maxUnavailable=1"],
    );
    let pdb = m.one("PodDisruptionBudget", FULLNAME);
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert!(pdb["spec"]["minAvailable"].is_null());
    let m = render_ci(
        "ha-values.yaml",
        &["--set", "podDisruptionBudget.enabled=false"],
    );
    assert!(m.kinds("PodDisruptionBudget").is_empty());
    // An explicit strategy wins.
    let m = render_ci("ha-values.yaml", &["--set", "strategy.type=Recreate"]);
    assert_eq!(
        m.deployment()["spec"]["strategy"],
        json!({"type": "Recreate"})
    );
}

fn pool<'a>(m: &'a Manifest, name: &str) -> &'a Value {
    &m.one("RunnerPool", name)["spec"]
}

#[test]
fn pools_merge_the_defaults_field_by_field_and_the_entry_wins() {
    let m = render_ci("pools-values.yaml", &[]);
    let names: BTreeSet<&str> = m
        .kinds("RunnerPool")
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, BTreeSet::from(["linux-arm64", "my-org-linux-large"]));
    for p in m.kinds("RunnerPool") {
        assert_eq!(p["apiVersion"], "runners.provisioner.dev/v1alpha1");
        assert_eq!(p["metadata"]["namespace"], NAMESPACE);
        let spec_keys = keys(&p["spec"]);
        let crd_keys = keys(&crd_spec_schema()["properties"]);
        assert!(
            spec_keys.is_subset(&crd_keys),
            "RunnerPool spec has fields the CRD does not know: {:?}",
            spec_keys.difference(&crd_keys).collect::<Vec<_>>()
        );
    }

    let large = pool(&m, "my-org-linux-large");
    assert_eq!(large["resourceClass"], "my-org/linux-large");
    // scaling: the entry's 0 and 20 win, the rest comes from poolDefaults.
    assert_eq!(
        large["scaling"],
        json!({"minReplicas": 0, "maxReplicas": 20, "idleTimeout": "10m", "pollInterval": "5s", "headroom": 1})
    );
    assert_eq!(
        large["runner"],
        json!({"workingDirectory": "/var/lib/circleci-runner/workdir", "maxRunTime": "5h"})
    );
    // The entry's `false` wins; the default's tag stays.
    assert_eq!(
        large["runnerBundle"],
        json!({"enabled": false, "tag": "0.1.0"})
    );
    assert_eq!(large["deletionPolicy"], "Drain");
    assert_eq!(
        large["userData"],
        "apt-get update\napt-get install -y --no-install-recommends jq\n"
    );
    assert!(large["userDataSecretRef"].is_null());
    // The reference chart's `spec` is template.spec, merged into the default VMI spec.
    let vmi = &large["template"]["spec"];
    assert_eq!(vmi["domain"]["cpu"]["cores"], 8);
    assert_eq!(vmi["domain"]["resources"]["requests"]["memory"], "16Gi");
    assert_eq!(vmi["domain"]["devices"]["disks"][0]["name"], "rootdisk");
    assert_eq!(
        vmi["volumes"][0]["containerDisk"]["image"],
        "quay.io/containerdisks/ubuntu:24.04"
    );
    assert_eq!(vmi["evictionStrategy"], "None");
    assert_eq!(
        large["template"]["metadata"],
        json!({"labels": {"team": "platform"}})
    );
    assert_eq!(
        large["circleci"],
        json!({
            "apiUrl": "https://circleci.example.com",
            "apiTokenSecretRef": {"name": "rp-circleci-api", "key": "token"},
            "runnerTokenSecretRef": {"name": "my-org-linux-large-runner-token", "key": "token"},
        })
    );

    let arm = pool(&m, "linux-arm64");
    assert_eq!(arm["resourceClass"], "my-org/linux-arm64:xl");
    assert_eq!(arm["deletionPolicy"], "Delete");
    assert_eq!(arm["scaling"]["minReplicas"], 1, "from poolDefaults");
    assert_eq!(arm["scaling"]["headroom"], 1, "from poolDefaults");
    assert_eq!(arm["scaling"]["schedules"][0]["timeZone"], "Europe/Berlin");
    assert_eq!(
        arm["runnerBundle"],
        json!({"enabled": true, "tag": "0.1.0"})
    );
    // The entry's userDataSecretRef replaces the default userData (the CRD
    // allows only one of them).
    assert_eq!(arm["userDataSecretRef"], json!({"name": "arm-userdata"}));
    assert!(arm["userData"].is_null());
    assert_eq!(
        arm["template"]["spec"]["nodeSelector"]["kubernetes.io/arch"],
        "arm64"
    );
    assert_eq!(arm["template"]["spec"]["domain"]["cpu"]["cores"], 2);
    assert_eq!(
        arm["template"]["metadata"],
        json!({"labels": {"team": "platform"}, "annotations": {"example.com/arch": "arm64"}})
    );
    assert_eq!(
        arm["circleci"]["runnerTokenSecretRef"],
        json!({"name": "linux-arm64-runner-token", "key": "token"})
    );

    // null in an entry removes a default; a list in an entry replaces the default's.
    let m = render_values(
        r#"
circleToken: t
poolDefaults:
  scaling: {maxReplicas: 3, idleTimeout: 10m}
  runner: {commandPrefix: [sudo, -niHu, circleci, --]}
  runnerBundle: {tag: "1.0"}
pools:
  "my-org/a":
    token: a
    scaling: {idleTimeout: null}
    runner: {commandPrefix: [nice]}
    runnerBundle: {digest: "sha256:0123456789abcdef0123456789abcdef"}
"#,
    );
    let a = pool(&m, "my-org-a");
    assert_eq!(a["scaling"], json!({"maxReplicas": 3}));
    assert_eq!(a["runner"]["commandPrefix"], json!(["nice"]));
    assert_eq!(
        a["runnerBundle"],
        json!({"digest": "sha256:0123456789abcdef0123456789abcdef"}),
        "the entry's digest replaces the default tag (the CRD allows only one)"
    );
    assert_eq!(a["circleci"]["apiUrl"], "https://runner.circleci.com");
}

#[test]
fn every_runnerpool_field_can_be_set_from_values() {
    let m = render_values(
        r#"
circleToken: t
pools:
  "my-org/full":
    token: a
    labels: {example.com/l: "1"}
    annotations: {argocd.argoproj.io/sync-wave: "1"}
    circleci: {apiUrl: "https://circleci.internal"}
    scaling:
      minReplicas: 1
      maxReplicas: 2
      idleTimeout: 1m
      pollInterval: 10s
      headroom: 1
      schedules: [{name: office-hours, start: "0 8 * * 1-5", end: "0 18 * * 1-5", minReplicas: 2}]
    runner: {workingDirectory: /w, commandPrefix: [a], maxRunTime: 1h, grantSudo: true}
    userData: "echo"
    runnerBundle: {enabled: true, image: registry.example.com/bundle, tag: "1", imagePullPolicy: Always, imagePullSecret: pull}
    deletionPolicy: Delete
    template: {metadata: {labels: {a: b}, annotations: {c: d}}, spec: {domain: {cpu: {cores: 1}}}}
  "my-org/ref":
    runnerTokenSecretRef: {name: my-secret, key: rc}
    scaling: {maxReplicas: 1}
    userDataSecretRef: {name: ud, key: script}
"#,
    );
    let p = m.one("RunnerPool", "my-org-full");
    assert_eq!(p["metadata"]["labels"]["example.com/l"], "1");
    assert_eq!(
        p["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"],
        "1"
    );
    let spec = &p["spec"];
    let crd = crd_spec_schema();
    let mut missing: Vec<String> = keys(&crd["properties"])
        .into_iter()
        .filter(|k| spec[k].is_null())
        .collect();
    missing.retain(|k| k != "userDataSecretRef");
    assert!(
        missing.is_empty(),
        "CRD spec fields the chart cannot set: {missing:?}"
    );
    assert_eq!(spec["scaling"]["headroom"], 1);
    assert_eq!(spec["runner"]["grantSudo"], true);
    assert_eq!(spec["scaling"]["schedules"][0]["name"], "office-hours");
    assert_eq!(spec["circleci"]["apiUrl"], "https://circleci.internal");
    let r = pool(&m, "my-org-ref");
    assert_eq!(
        r["userDataSecretRef"],
        json!({"name": "ud", "key": "script"})
    );
    assert_eq!(
        r["circleci"]["runnerTokenSecretRef"],
        json!({"name": "my-secret", "key": "rc"})
    );
    assert!(m.get("Secret", "my-org-ref-runner-token").is_none());
}

/// `definitions.pool` of values.schema.json is generated from the CRD, so
/// every RunnerPool field can be set from values and a typo is refused.
/// `RP_UPDATE_CHART=1` (or `make chart-crds`) rewrites it.
#[test]
fn values_schema_is_generated_from_the_crd() {
    let path = chart_dir().join("values.schema.json");
    let mut schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
        .expect("values.schema.json is JSON");
    let want = pool_values_schema(&crd_spec_schema());
    if std::env::var_os("RP_UPDATE_CHART").is_some() {
        schema["definitions"]["pool"] = want.clone();
        let text = serde_json::to_string_pretty(&schema).unwrap() + "\n";
        std::fs::write(&path, text).expect("write values.schema.json");
    }
    assert!(
        schema["definitions"]["pool"] == want,
        "charts/runner-provisioner/values.schema.json (definitions.pool) is stale: run `make chart-crds`"
    );
    assert_eq!(
        schema["properties"]["pools"]["additionalProperties"]["$ref"],
        "#/definitions/pool"
    );
    assert_eq!(
        schema["properties"]["poolDefaults"]["$ref"],
        "#/definitions/pool"
    );
}

#[test]
fn token_secrets_have_the_documented_names_and_keys() {
    // circleToken and per-pool tokens: Secrets rendered by the chart.
    let m = render_ci("pools-values.yaml", &[]);
    let api = m.one("Secret", "rp-circleci-api");
    assert_eq!(api["metadata"]["namespace"], NAMESPACE);
    assert_eq!(api["data"], json!({"token": b64("pools-api-token")}));
    assert_eq!(
        m.one("Secret", "my-org-linux-large-runner-token")["data"],
        json!({"token": b64("large-rc-token")})
    );
    assert_eq!(
        m.one("Secret", "linux-arm64-runner-token")["data"],
        json!({"token": b64("arm-rc-token")})
    );
    assert_eq!(m.kinds("Secret").len(), 3, "{:?}", m.names());
    assert!(
        !m.text.contains("pools-api-token") && !m.text.contains("large-rc-token"),
        "tokens only appear base64-encoded in Secret data"
    );

    // existingSecret: no Secret rendered, both refs point into it.
    let m = render_ci("existing-secret-values.yaml", &[]);
    assert!(m.kinds("Secret").is_empty(), "{:?}", m.names());
    assert_eq!(
        pool(&m, "my-org-linux-medium")["circleci"],
        json!({
            "apiUrl": "https://runner.circleci.com",
            "apiTokenSecretRef": {"name": "circleci-tokens", "key": "token"},
            "runnerTokenSecretRef": {"name": "circleci-tokens", "key": "my-org.linux-medium"},
        })
    );
    // Characters a Secret key cannot hold (`:` and `+` are valid in class names) become `_`.
    let m = render_values(
        "existingSecret: s\npools:\n  \"dev-team/custom:arm64\": {scaling: {maxReplicas: 1}}\n",
    );
    assert_eq!(
        pool(&m, "dev-team-custom-arm64")["circleci"]["runnerTokenSecretRef"],
        json!({"name": "s", "key": "dev-team.custom_arm64"})
    );

    // circleToken alone (pools written elsewhere) still renders the API Secret.
    let m = render_values("circleToken: abc");
    assert_eq!(
        m.one("Secret", "rp-circleci-api")["data"]["token"],
        b64("abc")
    );
}

#[test]
fn config_checksum_changes_with_the_api_token() {
    let f = ci_file("pools-values.yaml");
    let sum = |extra: &[&str]| render_with(&[&f], extra).checksum();
    let base = sum(&[]);
    assert_eq!(base, sum(&[]), "the checksum is deterministic");
    assert_eq!(base.len(), 64, "a sha256");
    assert_ne!(
        base,
        sum(&["--set", "circleToken=rotated"]),
        "API token rotation rolls the pods"
    );
    assert_ne!(base, sum(&["--set", "concurrency=4"]), "args are covered");
    assert_eq!(
        base,
        sum(&["--set", "pools.my-org/linux-large.token=rotated"]),
        "resource class tokens do not restart the operator (it watches their Secrets)"
    );
    let e = ci_file("existing-secret-values.yaml");
    assert_ne!(
        render_with(&[&e], &[]).checksum(),
        render_with(&[&e], &["--set", "existingSecret=other"]).checksum(),
        "switching the existing Secret rolls the pods"
    );
}

#[test]
fn pool_names_are_derived_from_the_resource_class() {
    let long = format!("my-org/{}-tail", "a".repeat(44)); // truncation lands on '-'
    let cases: Vec<(String, String)> = vec![
        ("my-org/linux-large".into(), "my-org-linux-large".into()),
        ("acme_corp/large-gpu".into(), "acme-corp-large-gpu".into()),
        (
            "dev-team/custom:arm64".into(),
            "dev-team-custom-arm64".into(),
        ),
        ("my-org/Linux+GPU".into(), "my-org-linux-gpu".into()),
        ("_x/y".into(), "x-y".into()),
        (long.clone(), format!("my-org-{}", "a".repeat(44))),
    ];
    let mut values =
        String::from("circleToken: t\npoolDefaults: {scaling: {maxReplicas: 1}}\npools:\n");
    for (class, _) in &cases {
        values.push_str(&format!("  {class:?}: {{token: x}}\n"));
    }
    let m = render_values(&values);
    for (class, want) in &cases {
        assert!(want.len() <= 52);
        let p = m.one("RunnerPool", want);
        assert_eq!(&p["spec"]["resourceClass"], class);
        m.one("Secret", &format!("{want}-runner-token"));
    }
}

#[test]
fn invalid_values_fail_with_a_clear_message() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "two classes with the same derived name",
            "circleToken: t\npoolDefaults: {scaling: {maxReplicas: 1}}\npools: {\"my-org/a+b\": {token: x}, \"my-org/a:b\": {token: z}}",
            "set `name` on one of them",
        ),
        (
            "a pool without a token",
            "circleToken: t\npools: {\"my-org/a\": {scaling: {maxReplicas: 1}}}",
            "set token (the resource class token), existingSecret, or runnerTokenSecretRef",
        ),
        (
            "pools without the API token",
            "pools: {\"my-org/a\": {token: x, scaling: {maxReplicas: 1}}}",
            "set circleToken or existingSecret",
        ),
        (
            "no maxReplicas",
            "circleToken: t\npools: {\"my-org/a\": {token: x}}",
            "scaling.maxReplicas is required",
        ),
        (
            "circleToken and existingSecret",
            "circleToken: t\nexistingSecret: s",
            "set either circleToken or existingSecret, not both",
        ),
        (
            "a token in values with existingSecret",
            "existingSecret: s\npools: {\"my-org/a\": {token: x, scaling: {maxReplicas: 1}}}",
            "put the token into Secret s, key my-org.a",
        ),
        (
            "HA without the Lease",
            "replicaCount: 2\nleaderElection: {enabled: false}",
            "replicaCount > 1 needs leaderElection.enabled",
        ),
        (
            "a resource class CircleCI would refuse",
            "circleToken: t\npools: {\"My-Org/a\": {token: x, scaling: {maxReplicas: 1}}}",
            "is not a CircleCI resource class",
        ),
        (
            "an invalid explicit name",
            "circleToken: t\npools: {\"my-org/a\": {name: Bad_Name, token: x, scaling: {maxReplicas: 1}}}",
            "must be at most 52 lowercase letters",
        ),
        (
            "spec and template.spec in one entry",
            "circleToken: t\npools: {\"my-org/a\": {token: x, scaling: {maxReplicas: 1}, spec: {}, template: {spec: {}}}}",
            "set either spec or template.spec",
        ),
        (
            "the reference chart's layout",
            "provisioner: {circleToken: t}",
            "additional properties 'provisioner' not allowed",
        ),
        (
            "a scaling field we do not have",
            "circleToken: t\npools: {\"my-org/a\": {token: x, scaling: {maxReplicas: 1, maxReplica: 2}}}",
            "additional properties 'maxReplica' not allowed",
        ),
        (
            "a runner option we do not have",
            "circleToken: t\npoolDefaults: {runner: {grantSudoo: true}}",
            "additional properties 'grantSudoo' not allowed",
        ),
        (
            "a shared name in poolDefaults",
            "poolDefaults: {name: x}",
            "poolDefaults.name",
        ),
        (
            "poolsNamespace outside the watched namespace",
            "watchNamespace: a\npoolsNamespace: b",
            "must equal watchNamespace",
        ),
    ];
    for (what, values, needle) in cases {
        match try_render_values(values) {
            Ok(m) => panic!("{what}: rendered instead of failing: {:?}", m.names()),
            Err(e) => assert!(e.contains(needle), "{what}: {needle:?} not in:\n{e}"),
        }
    }
}

// ---------------------------------------------------------------------------
// 3. The rendered manifests against a real kube-apiserver
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_manifests_are_accepted_by_the_apiserver() {
    let t0 = Instant::now();
    let renders: Vec<(PathBuf, Manifest)> = ci_files()
        .into_iter()
        .map(|f| {
            let m = render_with(&[&f], &[]);
            (f, m)
        })
        .collect();
    let cp = control_plane().await;
    let started = t0.elapsed();
    let mut namespaces = BTreeSet::from([NAMESPACE.to_string()]);
    for (_, m) in &renders {
        namespaces.extend(m.namespaces());
    }
    ensure_namespaces(&cp, &namespaces).await;
    for (f, m) in &renders {
        // The test cluster has no Prometheus Operator, so no ServiceMonitor
        // CRD: leave that one object out (its shape is checked by
        // ha_has_a_pdb_rolling_updates_and_a_service_monitor).
        let docs: Vec<&Value> = m
            .docs
            .iter()
            .filter(|d| d["kind"] != "ServiceMonitor")
            .collect();
        let out = dry_run_apply(&cp, &to_yaml(&docs))
            .unwrap_or_else(|e| panic!("{}: the apiserver refused the render:\n{e}", f.display()));
        let applied = out
            .lines()
            .filter(|l| l.contains("(server dry run)"))
            .count();
        assert_eq!(
            applied,
            docs.len(),
            "{}: every object applied:\n{out}",
            f.display()
        );
    }
    eprintln!(
        "apiserver dry-run of {} renders: {:?} (control plane start {started:?})",
        renders.len(),
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 4. The chart's CRD is the repository's
// ---------------------------------------------------------------------------

#[test]
fn chart_crd_is_the_repository_crd() {
    let repo_crd =
        std::fs::read(repo().join("crds/runnerpool.yaml")).expect("crds/runnerpool.yaml");
    let chart_crd = std::fs::read(chart_dir().join("crds/runnerpool.yaml"))
        .expect("charts/runner-provisioner/crds/runnerpool.yaml");
    assert!(
        repo_crd == chart_crd,
        "charts/runner-provisioner/crds/runnerpool.yaml differs from crds/runnerpool.yaml: \
         run `make chart-crds` (after `make crds` if the types changed)"
    );
    let files: Vec<_> = std::fs::read_dir(chart_dir().join("crds"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        files,
        vec!["runnerpool.yaml"],
        "only the RunnerPool CRD in the chart"
    );
}

// ---------------------------------------------------------------------------
// 5. examples/ against a real kube-apiserver
// ---------------------------------------------------------------------------

/// Every file under `examples/` (recursively), sorted.
fn example_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            example_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

fn is_yaml(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "yaml" || e == "yml")
}

fn is_kustomization(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        matches!(
            n,
            "kustomization.yaml" | "kustomization.yml" | "Kustomization"
        )
    })
}

/// A minimal CRD (any content accepted) for a kind the test cluster does not
/// serve, e.g. an Argo CD Application or a Flux Kustomization.
fn stand_in_crd(group: &str, kind: &str, versions: &BTreeSet<String>, namespaced: bool) -> String {
    let plural = format!("{}s", kind.to_lowercase());
    let versions: Vec<Value> = versions
        .iter()
        .enumerate()
        .map(|(i, v)| {
            json!({
                "name": v, "served": true, "storage": i == 0,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}},
            })
        })
        .collect();
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}")},
        "spec": {
            "group": group,
            "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "listKind": format!("{kind}List")},
            "scope": if namespaced { "Namespaced" } else { "Cluster" },
            "versions": versions,
        },
    });
    serde_norway::to_string(&crd).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_is_accepted_by_the_apiserver() {
    let t0 = Instant::now();
    let mut files = Vec::new();
    // RP_EXAMPLES_DIR: check another directory the same way (to try this test itself).
    let dir = std::env::var_os("RP_EXAMPLES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("examples"));
    example_files(&dir, &mut files);
    assert!(files.iter().any(|f| is_yaml(f)), "examples/ has YAML files");

    // What to apply: each manifest file as is; a kustomization directory as
    // `kubectl kustomize` renders it (the kustomization file itself is a build
    // input, not an API object); a chart values file (`*values.yaml`, no
    // apiVersion/kind) as the chart renders it.
    struct Item {
        what: String,
        docs: Vec<Value>,
        file: Option<PathBuf>,
    }
    let mut items = Vec::new();
    let mut kustomize_dirs = BTreeSet::new();
    for f in files.iter().filter(|f| is_yaml(f)) {
        if is_kustomization(f) {
            kustomize_dirs.insert(f.parent().unwrap().to_path_buf());
            continue;
        }
        let docs = parse_docs(&std::fs::read_to_string(f).unwrap());
        let objects = docs
            .iter()
            .all(|d| d["apiVersion"].is_string() && d["kind"].is_string());
        let name = f.file_name().unwrap().to_string_lossy();
        if objects {
            items.push(Item {
                what: f.display().to_string(),
                docs,
                file: Some(f.clone()),
            });
        } else if name.ends_with("values.yaml") {
            let m = render_with(&[f], &[]);
            items.push(Item {
                what: format!("the chart with {}", f.display()),
                docs: m.docs,
                file: None,
            });
        } else {
            panic!(
                "{}: a document without apiVersion/kind; examples/ holds Kubernetes manifests \
                 (or chart values files named *values.yaml)",
                f.display()
            );
        }
    }

    let cp = control_plane().await;
    let started = t0.elapsed();
    for dir in &kustomize_dirs {
        let out = kubectl_run(&cp, &["kustomize", dir.to_str().unwrap()], None)
            .unwrap_or_else(|e| panic!("kubectl kustomize {}: {e}", dir.display()));
        items.push(Item {
            what: format!("kubectl kustomize {}", dir.display()),
            docs: parse_docs(&out),
            file: None,
        });
    }

    // Kinds the test cluster does not serve (GitOps objects such as an Argo CD
    // Application or a Flux Kustomization) get a stand-in CRD that accepts any
    // content: the apiserver then checks their envelope (apiVersion, kind,
    // metadata, namespace) while their own controllers' schemas are not
    // available here.
    let discovery = kube::discovery::Discovery::new(cp.client())
        .run()
        .await
        .expect("discovery");
    let mut missing: BTreeMap<(String, String), (BTreeSet<String>, bool)> = BTreeMap::new();
    for it in &items {
        for d in &it.docs {
            let (api_version, kind) = (
                d["apiVersion"].as_str().unwrap(),
                d["kind"].as_str().unwrap(),
            );
            let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
            if kind == "CustomResourceDefinition" {
                continue;
            }
            let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
            if discovery.resolve_gvk(&gvk).is_none() {
                assert!(
                    !group.is_empty(),
                    "{}: core kind {kind} is not served",
                    it.what
                );
                let e = missing
                    .entry((group.to_string(), kind.to_string()))
                    .or_default();
                e.0.insert(version.to_string());
                e.1 |= d["metadata"]["namespace"].is_string();
            }
        }
    }
    for ((group, kind), (versions, namespaced)) in &missing {
        eprintln!("examples: stand-in CRD for {kind}.{group} {versions:?}");
        cp.apply_yaml(&stand_in_crd(group, kind, versions, *namespaced))
            .await
            .unwrap_or_else(|e| panic!("stand-in CRD for {kind}.{group}: {e:#}"));
    }

    let mut namespaces = BTreeSet::new();
    for it in &items {
        namespaces.extend(namespaces_of(&it.docs));
    }
    ensure_namespaces(&cp, &namespaces).await;

    let mut failures = Vec::new();
    for it in &items {
        let result = match &it.file {
            Some(f) => kubectl_run(
                &cp,
                &[
                    "apply",
                    "--server-side",
                    "--dry-run=server",
                    "--field-manager=examples-test",
                    "-f",
                    f.to_str().unwrap(),
                ],
                None,
            ),
            None => {
                let docs: Vec<&Value> = it
                    .docs
                    .iter()
                    .filter(|d| d["kind"] != "ServiceMonitor")
                    .collect();
                dry_run_apply(&cp, &to_yaml(&docs))
            }
        };
        match result {
            Ok(out) => eprintln!("{}:\n{}", it.what, out.trim_end()),
            Err(e) => failures.push(format!("{}:\n{e}", it.what)),
        }
    }
    assert!(
        failures.is_empty(),
        "examples refused by the apiserver:\n{}",
        failures.join("\n")
    );
    eprintln!(
        "examples: {} applied in {:?} (control plane start {started:?})",
        items.len(),
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 6. The operator runs with the chart's ServiceAccount and RBAC only
// ---------------------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A kubeconfig for the apiserver with a bearer token instead of the admin certificate.
fn token_kubeconfig(admin: &Path, token: &str, out: &Path) {
    let kc = parse_docs(&std::fs::read_to_string(admin).unwrap()).remove(0);
    let cluster = &kc["clusters"][0]["cluster"];
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: sa}}\ncurrent-context: c\n",
        cluster["server"].as_str().unwrap(),
        cluster["certificate-authority-data"].as_str().unwrap(),
    );
    std::fs::write(out, yaml).unwrap();
}

/// The operator process: SIGTERM on drop (it gives up the Lease, so the next
/// instance does not wait for it to expire), SIGKILL after 10 s.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The README's CRD upgrade step after a Helm install (Helm owns the CRD's
/// fields): a changed CRD conflicts without `--force-conflicts` and applies
/// with it.
fn crd_upgrade_as_documented(cp: &rp_testenv::ControlPlane) {
    let crd_dir = chart_dir().join("crds");
    let crd = std::fs::read_to_string(crd_dir.join("runnerpool.yaml")).unwrap();
    let changed = crd.replacen(
        "description: A RunnerPool keeps",
        "description: A changed RunnerPool keeps",
        1,
    );
    assert_ne!(crd, changed);
    let apply = |force: bool| {
        let mut args = vec!["apply", "--server-side"];
        if force {
            args.push("--force-conflicts");
        }
        args.extend(["-f", "-"]);
        kubectl_run(cp, &args, Some(&changed))
    };
    let err = apply(false).expect_err("a changed CRD conflicts with Helm's field manager");
    assert!(err.contains("conflict"), "{err}");
    apply(true).expect("kubectl apply --server-side --force-conflicts");
    // The documented command itself, on the chart's crds/ directory.
    kubectl_run(
        cp,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            crd_dir.to_str().unwrap(),
        ],
        None,
    )
    .expect("kubectl apply --server-side --force-conflicts -f charts/runner-provisioner/crds/");
}

/// The README's uninstall: remove the pools while the operator runs, wait
/// for them to drain (no VMs here, so at once), then `helm uninstall`.
fn uninstall_as_documented(
    cp: &rp_testenv::ControlPlane,
    helm_cmd: &dyn Fn(&str, &[&str]),
    pools_ns: &str,
    pool_name: &str,
) {
    helm_cmd("upgrade", &["--set", "pools=null"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while kubectl_run(cp, &["-n", pools_ns, "get", "runnerpool", pool_name], None).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the RunnerPool removed from values did not drain"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = std::process::Command::new(helm())
        .args([
            "uninstall",
            RELEASE,
            "--namespace",
            NAMESPACE,
            "--kubeconfig",
        ])
        .arg(cp.kubeconfig())
        .output()
        .unwrap();
    assert!(out.status.success(), "helm uninstall: {out:?}");
    kubectl_run(
        cp,
        &["get", "crd", "runnerpools.runners.provisioner.dev"],
        None,
    )
    .expect("helm uninstall keeps the CRD");
    assert!(
        kubectl_run(
            cp,
            &["-n", pools_ns, "get", "secret", "rp-circleci-api"],
            None
        )
        .is_err(),
        "the chart's Secrets go with the release"
    );
}

/// Installs the chart for real (`helm install`, which also installs the CRD
/// from crds/, then `helm upgrade`), runs the operator binary with the
/// rendered args and env, authenticated as the chart's ServiceAccount: it must
/// become ready (leader, caches synced) and reconcile and scale the chart's
/// RunnerPool, first watching one namespace (a Role), then all (a
/// ClusterRole). RBAC that is too narrow shows up here; RBAC that is too wide
/// is caught by rbac_grants_exactly_what_the_operator_needs. Also walks the
/// README's CRD upgrade and uninstall steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_runs_with_only_the_chart_rbac() {
    use rp_testenv::circleci::{
        CircleCiSim, CircleCiSimConfig, TEST_API_TOKEN, TEST_RESOURCE_CLASS, TEST_RUNNER_TOKEN,
    };
    let t0 = Instant::now();
    // KubeVirt's CRDs only: `helm install` installs the RunnerPool CRD from
    // the chart's crds/, as on a real first install.
    let cp = control_plane_with(vec![rp_testenv::kubevirt::crds_yaml().to_string()]).await;
    let started = t0.elapsed();
    let sim = CircleCiSim::start(CircleCiSimConfig::for_tests())
        .await
        .expect("CircleCI simulator");
    let tmp = tempfile::tempdir().unwrap();
    let pools_ns = "ci-runners";
    ensure_namespaces(&cp, &[NAMESPACE.to_string(), pools_ns.to_string()]).await;

    let values = tmp.path().join("values.yaml");
    std::fs::write(
        &values,
        format!(
            "circleciAPIAddr: {}\ncircleToken: {TEST_API_TOKEN}\npoolsNamespace: {pools_ns}\n\
             pools:\n  {TEST_RESOURCE_CLASS:?}:\n    token: {TEST_RUNNER_TOKEN}\n    \
             scaling: {{minReplicas: 1, maxReplicas: 2, pollInterval: 1s}}\n",
            sim.base_url()
        ),
    )
    .unwrap();
    let pool_name = "sim-org-linux";

    let helm_cmd = |verb: &str, extra: &[&str]| {
        let out = std::process::Command::new(helm())
            .arg(verb)
            .arg(RELEASE)
            .arg(chart_dir())
            .args(["--namespace", NAMESPACE, "--kubeconfig"])
            .arg(cp.kubeconfig())
            .arg("-f")
            .arg(&values)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm {verb} {extra:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // Two modes, one after the other: watching one namespace (a Role there),
    // then all namespaces (helm upgrade to a ClusterRole).
    let modes: [(&str, Vec<&str>); 2] = [
        ("namespaced", vec!["--set", "watchNamespace=ci-runners"]),
        ("cluster-wide", vec![]),
    ];
    for (i, (mode, extra)) in modes.iter().enumerate() {
        let t = Instant::now();
        helm_cmd(if i == 0 { "install" } else { "upgrade" }, extra);
        if i == 0 {
            crd_upgrade_as_documented(&cp);
        }
        let mut args = vec!["-f", values.to_str().unwrap()];
        args.extend(extra.iter().copied());
        let m = render_with(&[], &args);

        if i > 0 {
            // What the first mode's operator created must be created again.
            for (kind, name) in [
                ("virtualmachinepool", pool_name.to_string()),
                ("secret", format!("{pool_name}-cloudinit")),
            ] {
                kubectl_run(
                    &cp,
                    &["-n", pools_ns, "delete", kind, &name, "--wait=false"],
                    None,
                )
                .unwrap_or_else(|e| panic!("delete {kind} {name}: {e}"));
            }
        }
        let token = kubectl_run(
            &cp,
            &[
                "-n",
                NAMESPACE,
                "create",
                "token",
                FULLNAME,
                "--duration=1h",
            ],
            None,
        )
        .expect("a token for the chart's ServiceAccount");
        let kubeconfig = tmp.path().join(format!("sa-{mode}.kubeconfig"));
        token_kubeconfig(cp.kubeconfig(), token.trim(), &kubeconfig);

        let (ready, live) = (free_port(), free_port());
        let mut args: Vec<String> = m
            .args()
            .into_iter()
            .filter(|a| !a.starts_with("--ready-addr") && !a.starts_with("--live-addr"))
            .collect();
        args.push(format!("--ready-addr=127.0.0.1:{ready}"));
        args.push(format!("--live-addr=127.0.0.1:{live}"));
        let log = tmp.path().join(format!("operator-{mode}.log"));
        let logf = std::fs::File::create(&log).unwrap();
        let _op = Child(
            std::process::Command::new(env!("CARGO_BIN_EXE_runner-provisioner"))
                .args(&args)
                .env_clear()
                .env("KUBECONFIG", &kubeconfig)
                .env("POD_NAME", format!("rp-test-{mode}"))
                .env("POD_NAMESPACE", NAMESPACE)
                .env(
                    "RUST_LOG",
                    m.env("RUST_LOG").unwrap()["value"].as_str().unwrap(),
                )
                .stdin(std::process::Stdio::null())
                .stdout(logf.try_clone().unwrap())
                .stderr(logf)
                .spawn()
                .expect("the operator starts"),
        );
        let logs = || std::fs::read_to_string(&log).unwrap_or_default();

        // Ready: it holds the Lease and its caches (RunnerPools, Secrets,
        // pools, VMs) synced, i.e. list/watch and the Lease are allowed.
        let http = reqwest::Client::new();
        let ready_url = format!("http://127.0.0.1:{ready}/ready");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = http
                .get(&ready_url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode}: operator not ready:\n{}",
                logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // Reconciled and scaled: the VirtualMachinePool (create, scale), the
        // cloud-init Secret (apply), the finalizer and status (patch).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pool = kubectl_run(
                &cp,
                &[
                    "-n",
                    pools_ns,
                    "get",
                    "virtualmachinepool",
                    pool_name,
                    "-o",
                    "json",
                ],
                None,
            )
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok());
            let rp = kubectl_run(
                &cp,
                &["-n", pools_ns, "get", "runnerpool", pool_name, "-o", "json"],
                None,
            )
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok());
            let secret = kubectl_run(
                &cp,
                &[
                    "-n",
                    pools_ns,
                    "get",
                    "secret",
                    &format!("{pool_name}-cloudinit"),
                ],
                None,
            );
            let done = pool.as_ref().is_some_and(|p| p["spec"]["replicas"] == 1)
                && secret.is_ok()
                && rp.as_ref().is_some_and(|r| {
                    r["metadata"]["finalizers"]
                        .as_array()
                        .is_some_and(|f| !f.is_empty())
                        && r["status"]["observedGeneration"].is_i64()
                        && r["status"]["desiredReplicas"] == 1
                });
            if done {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode}: the chart's RunnerPool was not reconciled\npool: {pool:?}\nrunnerpool: {rp:?}\nlogs:\n{}",
                logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let text = logs();
        assert!(
            !text.contains("forbidden") && !text.contains("403"),
            "{mode}: the operator was refused something:\n{text}"
        );
        assert!(
            !text.contains(TEST_API_TOKEN) && !text.contains(TEST_RUNNER_TOKEN),
            "tokens in logs"
        );
        eprintln!("{mode}: ready and reconciled in {:?}", t.elapsed());
        if i == modes.len() - 1 {
            uninstall_as_documented(&cp, &helm_cmd, pools_ns, pool_name);
        }
        // Dropping _op stops it before the next mode.
    }
    eprintln!(
        "operator with chart RBAC: {:?} (control plane start {started:?})",
        t0.elapsed()
    );
}
