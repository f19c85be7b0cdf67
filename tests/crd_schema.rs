//! The RunnerPool CRD against a real kube-apiserver: defaults are applied,
//! unknown template fields are preserved, and bad objects are rejected with a
//! message that says what is wrong.

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::{Client, ResourceExt};
use rp_testenv::{ControlPlane, ControlPlaneOptions};
use runner_provisioner::crd::{
    CONDITION_DEGRADED, CONDITION_READY, RunnerPool, RunnerPoolStatus, crd_yaml,
};
use runner_provisioner::resources::{CondStatus, set_condition};
use serde_json::{Value, json};

const NS: &str = "ci-runners";

async fn start() -> ControlPlane {
    rp_testenv::init_crypto();
    let cp = ControlPlane::start(ControlPlaneOptions {
        crds: vec![crd_yaml()],
    })
    .await
    .expect("the control plane starts and accepts the RunnerPool CRD");
    let ns: Api<Namespace> = Api::all(cp.client());
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": NS}})).expect("namespace"),
    )
    .await
    .expect("namespace created");
    cp
}

fn dynamic_api(client: &Client) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), NS, &ApiResource::erase::<RunnerPool>(&()))
}

fn valid(name: &str) -> Value {
    json!({
        "apiVersion": "runners.provisioner.dev/v1alpha1",
        "kind": "RunnerPool",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "resourceClass": "my-org/linux-large",
            "circleci": {
                "apiTokenSecretRef": {"name": "circleci-api"},
                "runnerTokenSecretRef": {"name": "linux-large-runner"},
            },
            "scaling": {"maxReplicas": 10},
        },
    })
}

async fn create(api: &Api<DynamicObject>, obj: Value) -> Result<DynamicObject, kube::Error> {
    let obj: DynamicObject = serde_json::from_value(obj).expect("a DynamicObject");
    api.create(&PostParams::default(), &obj).await
}

/// Creates `obj` and expects a 422 whose message contains every `needle`.
async fn rejected(api: &Api<DynamicObject>, what: &str, obj: Value, needles: &[&str]) {
    match create(api, obj).await {
        Ok(_) => panic!("{what}: the apiserver accepted an invalid RunnerPool"),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{what}: {status:?}");
            for n in needles {
                assert!(
                    status.message.contains(n),
                    "{what}: {n:?} not in {:?}",
                    status.message
                );
            }
            eprintln!("{what}: {}", status.message);
        }
        Err(e) => panic!("{what}: unexpected error {e}"),
    }
}

#[tokio::test]
async fn runnerpool_schema_on_a_real_apiserver() {
    let cp = start().await;
    let client = cp.client();
    let api = dynamic_api(&client);
    let typed: Api<RunnerPool> = Api::namespaced(client.clone(), NS);

    // --- a minimal object is accepted and defaulted -----------------------
    create(&api, valid("minimal"))
        .await
        .expect("a minimal RunnerPool is accepted");
    let p = typed
        .get("minimal")
        .await
        .expect("read back as the Rust type");
    let s = &p.spec;
    assert_eq!(s.circleci.api_url, "https://runner.circleci.com");
    assert_eq!(s.circleci.api_token_secret_ref.key, "token");
    assert_eq!(s.circleci.runner_token_secret_ref.key, "token");
    assert_eq!(s.scaling.min_replicas, 0);
    assert_eq!(s.scaling.poll_interval, "5s");
    assert_eq!(s.scaling.idle_timeout, "10m");
    assert!(s.runner_bundle.enabled);
    assert_eq!(s.runner_bundle.image, "docker.io/circleci/runner-bundle");
    assert_eq!(
        s.template.spec["volumes"][0]["containerDisk"]["image"],
        "quay.io/containerdisks/ubuntu:24.04"
    );
    assert_eq!(
        s.template.spec["domain"]["resources"]["requests"]["memory"],
        "2Gi"
    );
    // The defaults are stored in the object, not only filled in by serde.
    let raw = api.get("minimal").await.expect("raw");
    assert_eq!(raw.data["spec"]["scaling"]["pollInterval"], "5s");
    assert_eq!(raw.data["spec"]["runnerBundle"]["enabled"], true);
    assert_eq!(
        raw.data["spec"]["circleci"]["apiUrl"],
        "https://runner.circleci.com"
    );
    runner_provisioner::crd::validate(s).expect("the defaulted spec passes validate()");

    // --- template metadata only: the VMI spec still gets its default ------
    let mut v = valid("labels-only");
    v["spec"]["template"] = json!({"metadata": {"labels": {"team": "ci"}}});
    create(&api, v).await.expect("accepted");
    let p = typed.get("labels-only").await.expect("read back");
    assert_eq!(p.spec.template.metadata.labels["team"], "ci");
    assert!(
        p.spec.template.spec["volumes"].is_array(),
        "{:?}",
        p.spec.template.spec
    );

    // --- unknown fields in template.spec survive --------------------------
    let mut v = valid("passthrough");
    v["spec"]["template"]["spec"] = json!({
        "domain": {"devices": {}, "firmware": {"bootloader": {"efi": {"secureBoot": false}}}},
        "someFutureKubevirtField": {"nested": [1, {"deep": true}]},
    });
    create(&api, v).await.expect("accepted");
    let raw = api.get("passthrough").await.expect("read back");
    assert_eq!(
        raw.data["spec"]["template"]["spec"]["someFutureKubevirtField"],
        json!({"nested": [1, {"deep": true}]})
    );
    assert_eq!(
        raw.data["spec"]["template"]["spec"]["domain"]["firmware"]["bootloader"]["efi"]["secureBoot"],
        false
    );

    // --- a field the schema does not know is pruned, not stored -----------
    let mut v = valid("pruned");
    v["spec"]["scaling"]["noSuchField"] = json!(2);
    create(&api, v)
        .await
        .expect("accepted (unknown fields are pruned)");
    let raw = api.get("pruned").await.expect("read back");
    assert!(raw.data["spec"]["scaling"].get("noSuchField").is_none());

    // --- the examples are accepted ----------------------------------------
    let root = env!("CARGO_MANIFEST_DIR");
    for f in [
        "runnerpool-secrets.yaml",
        "runnerpool-ubuntu.yaml",
        "runnerpool-minimal.yaml",
    ] {
        let yaml = std::fs::read_to_string(format!("{root}/examples/{f}")).expect("example");
        cp.apply_yaml(&yaml)
            .await
            .unwrap_or_else(|e| panic!("examples/{f}: {e:#}"));
    }
    let ubuntu = typed.get("linux-large").await.expect("example read back");
    runner_provisioner::crd::validate(&ubuntu.spec).expect("the example passes validate()");
    assert_eq!(ubuntu.spec.scaling.min_replicas, 1);

    // --- status subresource and conditions merged by type -----------------
    let mut status = RunnerPoolStatus {
        observed_generation: Some(1),
        desired_replicas: Some(3),
        selector: Some("runners.provisioner.dev/pool=minimal".into()),
        last_poll_time: Some(Time(k8s_openapi::jiff::Timestamp::now())),
        ..Default::default()
    };
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    set_condition(
        &mut status.conditions,
        CONDITION_READY,
        CondStatus::True,
        "Reconciled",
        "ok",
        Some(1),
        now.clone(),
    );
    set_condition(
        &mut status.conditions,
        CONDITION_DEGRADED,
        CondStatus::False,
        "AsExpected",
        "",
        Some(1),
        now,
    );
    typed
        .patch_status(
            "minimal",
            &PatchParams::apply("runner-provisioner").force(),
            &Patch::Apply(json!({
                "apiVersion": "runners.provisioner.dev/v1alpha1",
                "kind": "RunnerPool",
                "status": status,
            })),
        )
        .await
        .expect("status applied");
    let p = typed.get("minimal").await.expect("read back");
    let got = p.status.clone().expect("status stored");
    assert_eq!(got.desired_replicas, Some(3));
    assert_eq!(got.conditions.len(), 2);
    assert_eq!(
        got.condition(CONDITION_READY).map(|c| c.status.as_str()),
        Some("True")
    );
    // A second field manager owning another condition type does not erase ours.
    typed
        .patch_status(
            "minimal",
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(json!({
                "apiVersion": "runners.provisioner.dev/v1alpha1",
                "kind": "RunnerPool",
                "status": {"conditions": [{
                    "type": "Other", "status": "True", "reason": "X", "message": "",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }]},
            })),
        )
        .await
        .expect("second manager's status applied");
    let got = typed
        .get("minimal")
        .await
        .expect("read back")
        .status
        .expect("status");
    let types: Vec<_> = got.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types.len(), 3, "{types:?}");
    assert!(
        types.contains(&"Ready") && types.contains(&"Other"),
        "{types:?}"
    );
    assert_eq!(
        p.metadata.generation,
        Some(1),
        "a status write does not bump the generation"
    );
    assert_eq!(
        typed
            .get("minimal")
            .await
            .expect("read")
            .metadata
            .generation,
        Some(1)
    );
    assert_eq!(p.name_any(), "minimal");

    // --- invalid objects are rejected with a clear message ----------------
    let mut v = valid("min-gt-max");
    v["spec"]["scaling"] = json!({"minReplicas": 5, "maxReplicas": 2});
    rejected(
        &api,
        "min > max",
        v,
        &[
            "spec.scaling.minReplicas",
            "minReplicas must not be greater than maxReplicas",
        ],
    )
    .await;

    let mut v = valid("delay-gt-idle");
    v["spec"]["scaling"] = json!({"maxReplicas": 2, "idleTimeout": "1m", "scaleDownDelay": "5m"});
    rejected(
        &api,
        "idleTimeout < scaleDownDelay",
        v,
        &["idleTimeout must be at least scaleDownDelay"],
    )
    .await;

    let mut v = valid("dup-schedules");
    let sch = json!({"name": "day", "start": "0 8 * * *", "end": "0 18 * * *"});
    v["spec"]["scaling"] = json!({"maxReplicas": 2, "schedules": [sch.clone(), sch]});
    rejected(
        &api,
        "duplicate schedules",
        v,
        &["schedule names must be unique"],
    )
    .await;

    let mut v = valid("neg-min");
    v["spec"]["scaling"] = json!({"minReplicas": -1, "maxReplicas": 2});
    rejected(
        &api,
        "min < 0",
        v,
        &["spec.scaling.minReplicas", "greater than or equal to 0"],
    )
    .await;

    let mut v = valid("no-max");
    v["spec"]["scaling"] = json!({"minReplicas": 1});
    rejected(
        &api,
        "maxReplicas missing",
        v,
        &["spec.scaling.maxReplicas", "Required value"],
    )
    .await;

    for bad in ["MyOrg/linux", "linux", "my-org/linux large", "my-org/a/b"] {
        let mut v = valid("bad-class");
        v["spec"]["resourceClass"] = json!(bad);
        rejected(
            &api,
            &format!("resourceClass {bad:?}"),
            v,
            &["spec.resourceClass", "should match"],
        )
        .await;
    }

    for bad in ["10 minutes", "10", "1d", "-5m", "m"] {
        let mut v = valid("bad-idle");
        v["spec"]["scaling"]["idleTimeout"] = json!(bad);
        rejected(
            &api,
            &format!("idleTimeout {bad:?}"),
            v,
            &["spec.scaling.idleTimeout", "must be a duration such as"],
        )
        .await;
    }

    let mut v = valid("bad-maxrun");
    v["spec"]["runner"] = json!({"maxRunTime": "five hours"});
    rejected(
        &api,
        "maxRunTime",
        v,
        &["spec.runner.maxRunTime", "must be a duration"],
    )
    .await;

    for bad in ["500ms", "0s", "0.5s"] {
        let mut v = valid("fast-poll");
        v["spec"]["scaling"]["pollInterval"] = json!(bad);
        rejected(
            &api,
            &format!("pollInterval {bad:?}"),
            v,
            &["spec.scaling.pollInterval", "must be at least 1s"],
        )
        .await;
    }
    let mut v = valid("bad-poll");
    v["spec"]["scaling"]["pollInterval"] = json!("often");
    rejected(
        &api,
        "pollInterval not a duration",
        v,
        &["spec.scaling.pollInterval", "must be a duration"],
    )
    .await;

    let mut v = valid("both-userdata");
    v["spec"]["userData"] = json!("echo hi");
    v["spec"]["userDataSecretRef"] = json!({"name": "scripts"});
    rejected(
        &api,
        "userData and userDataSecretRef",
        v,
        &["set at most one of userData and userDataSecretRef"],
    )
    .await;

    for bad in [
        "ftp://runner.example.com",
        "runner.circleci.com",
        "https://",
    ] {
        let mut v = valid("bad-url");
        v["spec"]["circleci"]["apiUrl"] = json!(bad);
        rejected(
            &api,
            &format!("apiUrl {bad:?}"),
            v,
            &["spec.circleci.apiUrl", "must be an http or https URL"],
        )
        .await;
    }

    let mut v = valid("tag-and-digest");
    v["spec"]["runnerBundle"] =
        json!({"tag": "1.0", "digest": format!("sha256:{}", "a".repeat(64))});
    rejected(
        &api,
        "tag and digest",
        v,
        &["spec.runnerBundle", "set either tag or digest, not both"],
    )
    .await;

    let mut v = valid("image-with-tag");
    v["spec"]["runnerBundle"] = json!({"image": "docker.io/circleci/runner-bundle:1.0"});
    rejected(
        &api,
        "image with a tag",
        v,
        &["spec.runnerBundle.image", "without tag or digest"],
    )
    .await;

    let mut v = valid("bad-secret-name");
    v["spec"]["circleci"]["apiTokenSecretRef"] = json!({"name": "Not_A_Name"});
    rejected(
        &api,
        "secret name",
        v,
        &["spec.circleci.apiTokenSecretRef.name"],
    )
    .await;

    let mut v = valid("reserved-label");
    v["spec"]["template"] = json!({"metadata": {"labels": {"runners.provisioner.dev/pool": "x"}}});
    rejected(
        &api,
        "reserved label",
        v,
        &["spec.template.metadata.labels", "reserved for the operator"],
    )
    .await;

    let mut v = valid("relative-workdir");
    v["spec"]["runner"] = json!({"workingDirectory": "work"});
    rejected(
        &api,
        "relative workingDirectory",
        v,
        &["spec.runner.workingDirectory", "absolute path"],
    )
    .await;

    let long = "a".repeat(53);
    rejected(
        &api,
        "name too long",
        valid(&long),
        &["at most 52 characters"],
    )
    .await;
    create(&api, valid(&"a".repeat(52)))
        .await
        .expect("a 52-character name is accepted");

    // Edge values that must stay accepted.
    let mut v = valid("edges");
    v["spec"]["scaling"] =
        json!({"minReplicas": 0, "maxReplicas": 0, "idleTimeout": "0s", "pollInterval": "1s"});
    v["spec"]["resourceClass"] = json!("dev-team/custom:arm64+x_y");
    v["spec"]["circleci"]["apiUrl"] = json!("http://127.0.0.1:8080/");
    v["spec"]["runner"] =
        json!({"maxRunTime": "1h30m", "commandPrefix": ["sudo", "-u", "circleci"]});
    v["spec"]["runnerBundle"] = json!({"image": "registry.local:5000/rp/bundle", "digest": format!("sha256:{}", "ab".repeat(32)), "imagePullPolicy": "Always"});
    create(&api, v).await.expect("edge values are accepted");
    let p = typed.get("edges").await.expect("read back");
    runner_provisioner::crd::validate(&p.spec).expect("edge values pass validate()");
}
