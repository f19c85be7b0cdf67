//! The real control plane: versions are real, CRD schemas (OpenAPI and CEL)
//! are enforced, the garbage collector and namespace controller work, and
//! nothing survives a drop.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use rp_testenv::{ControlPlane, ControlPlaneOptions};
use serde_json::json;

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.test.rp.dev
spec:
  group: test.rp.dev
  names: {kind: Widget, plural: widgets, singular: widget}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            x-kubernetes-validations:
            - rule: self.min <= self.max
              message: min must not exceed max
            properties:
              min: {type: integer, minimum: 0}
              max: {type: integer}
              class: {type: string, pattern: '^[a-z0-9_-]+/[A-Za-z0-9:_+-]+$'}
"#;

async fn eventually<F, Fut>(what: &str, timeout: Duration, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    rp_testenv::wait_until(what, timeout, Duration::from_millis(200), f).await
}

#[tokio::test]
async fn control_plane_is_real_and_enforces_schemas() {
    let cp = ControlPlane::start(ControlPlaneOptions {
        crds: vec![WIDGET_CRD.into()],
    })
    .await
    .expect("control plane starts");
    eprintln!("control plane started in {:?}", cp.startup);
    let client = cp.client();

    let version = client.apiserver_version().await.unwrap();
    assert_eq!(
        version.git_version,
        format!(
            "v{}",
            rp_testenv::controlplane::pinned_version("KUBE_VERSION")
        )
    );

    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("test.rp.dev", "v1", "Widget"));
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let widget = |name: &str, spec: serde_json::Value| {
        serde_json::from_value::<DynamicObject>(json!({
            "apiVersion": "test.rp.dev/v1", "kind": "Widget",
            "metadata": {"name": name}, "spec": spec,
        }))
        .unwrap()
    };
    api.create(
        &PostParams::default(),
        &widget("ok", json!({"min": 1, "max": 2, "class": "acme/linux"})),
    )
    .await
    .expect("a valid object is accepted");

    let err = api
        .create(
            &PostParams::default(),
            &widget("cel", json!({"min": 3, "max": 2})),
        )
        .await
        .expect_err("CEL rule rejects min > max");
    assert!(err.to_string().contains("min must not exceed max"), "{err}");

    let err = api
        .create(
            &PostParams::default(),
            &widget("pattern", json!({"min": 0, "max": 1, "class": "Bad/x"})),
        )
        .await
        .expect_err("pattern rejects a bad class");
    assert!(err.to_string().contains("spec.class"), "{err}");

    let err = api
        .create(
            &PostParams::default(),
            &widget("neg", json!({"min": -1, "max": 1})),
        )
        .await
        .expect_err("minimum rejects a negative min");
    assert!(err.to_string().contains("spec.min"), "{err}");
}

#[tokio::test]
async fn garbage_collector_and_namespace_controller_run() {
    let mut cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .unwrap();
    let client = cp.client();

    let ns: Api<Namespace> = Api::all(client.clone());
    ns.patch(
        "gc-test",
        &PatchParams::apply("test"),
        &Patch::Apply(
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "gc-test"}}),
        ),
    )
    .await
    .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "gc-test");
    let owner = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap(),
        )
        .await
        .unwrap();
    let uid = owner.metadata.uid.unwrap();
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "child", "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
        ]}}))
        .unwrap(),
    )
    .await
    .unwrap();

    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    eventually(
        "the garbage collector to delete the owned ConfigMap",
        Duration::from_secs(60),
        || {
            let cms = cms.clone();
            async move { cms.get_opt("child").await.unwrap().is_none() }
        },
    )
    .await;

    ns.delete("gc-test", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the namespace controller to finish deleting gc-test",
        Duration::from_secs(60),
        || {
            let ns = ns.clone();
            async move { ns.get_opt("gc-test").await.unwrap().is_none() }
        },
    )
    .await;
    assert!(
        cp.exited().is_empty(),
        "no control-plane process exited: {:?}",
        cp.exited()
    );
}

#[tokio::test]
async fn drop_stops_every_process_and_removes_the_directory() {
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .unwrap();
    let dir = cp.dir().to_path_buf();
    let port: u16 = cp.server().rsplit(':').next().unwrap().parse().unwrap();
    drop(cp);
    assert!(!dir.exists(), "{} removed", dir.display());
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on the apiserver port after drop"
    );
    let leftovers = std::process::Command::new("pgrep")
        .args(["-f", &dir.display().to_string()])
        .output()
        .unwrap();
    assert!(
        leftovers.stdout.is_empty(),
        "no process still uses {}",
        dir.display()
    );
}
