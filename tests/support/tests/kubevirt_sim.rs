//! The KubeVirt simulator against the real control plane: CRDs as KubeVirt
//! generates them, pool scale-in strategies, runStrategy, printableStatus,
//! cloud-init user-data, template updates.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use rp_testenv::kubevirt::{
    self, BootLatency, KubeVirtSim, KubeVirtSimConfig, POOL_FINALIZER, POOL_REVISION_LABEL,
    VM_CONTROLLER_FINALIZER, crds_yaml,
};
use rp_testenv::{ControlPlane, ControlPlaneOptions, GuestBoot, GuestRuntime, PowerOff, TimeScale};
use serde_json::{Value, json};

// ---------------------------------------------------------------- test guest

/// Records boots and vanishes; powers off only when told to (or after
/// `auto_off` when set).
#[derive(Default)]
struct TestGuest {
    boots: Mutex<Vec<GuestBoot>>,
    vanished: Mutex<Vec<String>>,
    handles: Mutex<HashMap<String, PowerOff>>,
    auto_off: Option<Duration>,
}

impl GuestRuntime for TestGuest {
    fn boot(&self, boot: GuestBoot, power_off: PowerOff) {
        let uid = boot.vmi_uid.clone();
        self.boots.lock().unwrap().push(boot);
        match self.auto_off {
            Some(d) => {
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    power_off.power_off();
                });
            }
            None => {
                self.handles.lock().unwrap().insert(uid, power_off);
            }
        }
    }
    fn vanish(&self, vmi_uid: &str) {
        self.vanished.lock().unwrap().push(vmi_uid.to_string());
    }
}

impl TestGuest {
    fn boots(&self) -> Vec<GuestBoot> {
        self.boots.lock().unwrap().clone()
    }
    fn boots_of(&self, ns: &str, vm: &str) -> Vec<GuestBoot> {
        self.boots()
            .into_iter()
            .filter(|b| b.namespace == ns && b.vm_name == vm)
            .collect()
    }
    fn vanished(&self) -> Vec<String> {
        self.vanished.lock().unwrap().clone()
    }
    fn power_off(&self, vmi_uid: &str) {
        let h = self
            .handles
            .lock()
            .unwrap()
            .remove(vmi_uid)
            .expect("a running guest with this uid");
        h.power_off();
    }
}

// ---------------------------------------------------------------- harness

struct Env {
    _cp: ControlPlane,
    sim: KubeVirtSim,
    guest: Arc<TestGuest>,
    client: Client,
}

/// 1 simulated second = 10 ms: boots take 100 ms, stops 50 ms.
const SCALE: f64 = 100.0;

/// Simulator logs in the test output: `RUST_LOG=rp_testenv=debug`.
fn init_logs() {
    if std::env::var_os("RUST_LOG").is_none() {
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .try_init();
}

async fn env_with(guest: TestGuest, config: KubeVirtSimConfig) -> Env {
    init_logs();
    let cp = ControlPlane::start(ControlPlaneOptions {
        crds: vec![crds_yaml().into()],
    })
    .await
    .expect("control plane starts");
    let client = cp.client();
    let guest = Arc::new(guest);
    let sim = KubeVirtSim::start(client.clone(), config, guest.clone())
        .await
        .expect("simulator starts");
    Env {
        _cp: cp,
        sim,
        guest,
        client,
    }
}

async fn env() -> Env {
    env_with(TestGuest::default(), config()).await
}

fn config() -> KubeVirtSimConfig {
    KubeVirtSimConfig {
        time_scale: TimeScale(SCALE),
        seed: 7,
        ..Default::default()
    }
}

impl Env {
    async fn namespace(&self, name: &str) -> String {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        api.create(&PostParams::default(), &ns)
            .await
            .expect("namespace created");
        name.to_string()
    }
    fn pools(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, &kubevirt::pool_resource())
    }
    fn vms(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, &kubevirt::vm_resource())
    }
    fn vmis(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, &kubevirt::vmi_resource())
    }
    async fn create_pool(&self, ns: &str, pool: Value) -> DynamicObject {
        let obj: DynamicObject = serde_json::from_value(pool).unwrap();
        self.pools(ns)
            .create(&PostParams::default(), &obj)
            .await
            .expect("pool created")
    }
    async fn scale(&self, ns: &str, pool: &str, replicas: i64) {
        self.pools(ns)
            .patch(
                pool,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"replicas": replicas}})),
            )
            .await
            .expect("pool scaled");
    }
    async fn pool(&self, ns: &str, name: &str) -> DynamicObject {
        self.pools(ns).get(name).await.expect("pool exists")
    }
    /// VMs by name.
    async fn vm_map(&self, ns: &str) -> HashMap<String, DynamicObject> {
        let list = self
            .vms(ns)
            .list(&ListParams::default())
            .await
            .expect("list VMs");
        list.items.into_iter().map(|v| (v.name_any(), v)).collect()
    }
    async fn vm_names(&self, ns: &str) -> BTreeSet<String> {
        self.vm_map(ns).await.into_keys().collect()
    }
    async fn live_vm_names(&self, ns: &str) -> BTreeSet<String> {
        self.vm_map(ns)
            .await
            .into_iter()
            .filter(|(_, v)| v.metadata.deletion_timestamp.is_none())
            .map(|(n, _)| n)
            .collect()
    }
    async fn vmi(&self, ns: &str, name: &str) -> Option<DynamicObject> {
        self.vmis(ns).get_opt(name).await.expect("get VMI")
    }
    async fn vm(&self, ns: &str, name: &str) -> Option<DynamicObject> {
        self.vms(ns).get_opt(name).await.expect("get VM")
    }
    async fn strip_pool_finalizer(&self, ns: &str, vm: &str) {
        let obj = self.vms(ns).get(vm).await.expect("VM exists");
        let kept: Vec<String> = obj
            .finalizers()
            .iter()
            .filter(|f| *f != POOL_FINALIZER)
            .cloned()
            .collect();
        self.vms(ns)
            .patch(
                vm,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": kept}})),
            )
            .await
            .expect("finalizer stripped");
    }
    /// Waits until these VMs (at least) are Running and Ready.
    async fn wait_named_running(&self, ns: &str, names: &[&str]) {
        eventually(&format!("{ns}: {names:?} running and ready"), || async {
            let vms = self.vm_map(ns).await;
            names.iter().all(|n| {
                vms.get(*n).is_some_and(|v| {
                    v.metadata.deletion_timestamp.is_none()
                        && v.data["status"]["printableStatus"] == "Running"
                        && v.data["status"]["ready"] == true
                })
            })
        })
        .await;
    }
    /// Waits until the live VMs of the namespace are exactly these, all
    /// Running and Ready.
    async fn wait_running(&self, ns: &str, names: &[&str]) {
        let want: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
        eventually(
            &format!("{ns}: exactly {want:?} running and ready"),
            || async {
                let vms = self.vm_map(ns).await;
                let live: BTreeSet<String> = vms
                    .iter()
                    .filter(|(_, v)| v.metadata.deletion_timestamp.is_none())
                    .map(|(n, _)| n.clone())
                    .collect();
                live == want
                    && want.iter().all(|n| {
                        vms[n].data["status"]["printableStatus"] == "Running"
                            && vms[n].data["status"]["ready"] == true
                    })
            },
        )
        .await;
    }
}

async fn eventually<F, Fut>(what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    rp_testenv::wait_until(what, Duration::from_secs(30), Duration::from_millis(50), f).await
}

/// Asserts `f` holds now and keeps holding for `for_` (things that must not happen).
async fn stays<F, Fut>(what: &str, for_: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + for_;
    while Instant::now() < deadline {
        assert!(f().await, "no longer true: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn vm_template(labels: Value, run_strategy: &str) -> Value {
    json!({
        "metadata": {"labels": labels},
        "spec": {
            "runStrategy": run_strategy,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "domain": {"devices": {}, "resources": {"requests": {"memory": "64Mi"}}},
                    "terminationGracePeriodSeconds": 0,
                },
            },
        },
    })
}

fn pool_manifest(name: &str, replicas: i64, extra_spec: Value) -> Value {
    let labels = json!({"kubevirt.io/vmpool": name});
    let mut p = json!({
        "apiVersion": "pool.kubevirt.io/v1beta1",
        "kind": "VirtualMachinePool",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "virtualMachineTemplate": vm_template(labels, "Always"),
        },
    });
    for (k, v) in extra_spec.as_object().unwrap() {
        p["spec"][k] = v.clone();
    }
    p
}

fn names(v: &[&str]) -> BTreeSet<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn vmi_uid(vmi: &DynamicObject) -> String {
    vmi.metadata.uid.clone().unwrap()
}

// ---------------------------------------------------------------- CRDs

#[tokio::test]
async fn crds_are_kubevirts_and_the_apiserver_enforces_their_schemas() {
    let cp = ControlPlane::start(ControlPlaneOptions {
        crds: vec![crds_yaml().into()],
    })
    .await
    .unwrap();
    let client = cp.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());

    let pool = crds
        .get("virtualmachinepools.pool.kubevirt.io")
        .await
        .unwrap();
    let short = pool.spec.names.short_names.clone().unwrap_or_default();
    assert_eq!(short, vec!["vmpool", "vmpools"]);
    let versions: Vec<(String, bool, bool)> = pool
        .spec
        .versions
        .iter()
        .map(|v| (v.name.clone(), v.served, v.storage))
        .collect();
    assert!(
        versions.contains(&("v1beta1".into(), true, true)),
        "{versions:?}"
    );
    assert!(
        versions.contains(&("v1alpha1".into(), true, false)),
        "{versions:?}"
    );
    let v1beta1 = pool
        .spec
        .versions
        .iter()
        .find(|v| v.name == "v1beta1")
        .unwrap();
    let sub = v1beta1.subresources.as_ref().unwrap();
    assert!(sub.status.is_some());
    let scale = sub.scale.as_ref().unwrap();
    assert_eq!(scale.spec_replicas_path, ".spec.replicas");
    assert_eq!(scale.status_replicas_path, ".status.replicas");
    assert_eq!(
        scale.label_selector_path.as_deref(),
        Some(".status.labelSelector")
    );
    let cols: Vec<String> = v1beta1
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(cols, vec!["Desired", "Current", "Ready", "Age"]);

    let vm = crds.get("virtualmachines.kubevirt.io").await.unwrap();
    assert_eq!(
        vm.spec.names.short_names.clone().unwrap_or_default(),
        vec!["vm", "vms"]
    );
    let v1 = vm.spec.versions.iter().find(|v| v.name == "v1").unwrap();
    assert!(v1.storage && v1.subresources.as_ref().unwrap().status.is_some());
    let cols: Vec<(String, String)> = v1
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.clone(), c.json_path.clone()))
        .collect();
    assert!(
        cols.contains(&("Status".into(), ".status.printableStatus".into())),
        "{cols:?}"
    );
    assert!(
        cols.contains(&(
            "Ready".into(),
            ".status.conditions[?(@.type=='Ready')].status".into()
        )),
        "{cols:?}"
    );

    let vmi = crds
        .get("virtualmachineinstances.kubevirt.io")
        .await
        .unwrap();
    assert_eq!(
        vmi.spec.names.short_names.clone().unwrap_or_default(),
        vec!["vmi", "vmis"]
    );
    let v1 = vmi.spec.versions.iter().find(|v| v.name == "v1").unwrap();
    let cols: Vec<String> = v1
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    for c in ["Age", "Phase", "IP", "NodeName", "Ready", "Live-Migratable"] {
        assert!(
            cols.contains(&c.to_string()),
            "VMI column {c} missing: {cols:?}"
        );
    }

    // A valid pool is accepted; unknown fields deep in the VMI spec are pruned.
    let pools: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "default", &kubevirt::pool_resource());
    let mut p = pool_manifest("valid", 2, json!({}));
    p["spec"]["virtualMachineTemplate"]["spec"]["template"]["spec"]["domain"]["notAKubeVirtField"] =
        json!(true);
    let created = pools
        .create(&PostParams::default(), &serde_json::from_value(p).unwrap())
        .await
        .unwrap();
    let domain =
        &created.data["spec"]["virtualMachineTemplate"]["spec"]["template"]["spec"]["domain"];
    assert!(
        domain.get("notAKubeVirtField").is_none(),
        "unknown field was not pruned: {domain}"
    );
    assert_eq!(domain["resources"]["requests"]["memory"], "64Mi");

    // Wrong types and out-of-range values are rejected.
    for (what, patch) in [
        ("replicas below 0", json!({"spec": {"replicas": -1}})),
        (
            "replicas not an integer",
            json!({"spec": {"replicas": "three"}}),
        ),
        (
            "sortPolicy not in the enum",
            json!({"spec": {"scaleInStrategy": {"proactive": {"selectionPolicy": {"sortPolicy": "Cheapest"}}}}}),
        ),
        (
            "runStrategy not a string",
            json!({"spec": {"virtualMachineTemplate": {"spec": {"runStrategy": 3}}}}),
        ),
    ] {
        let err = pools
            .patch("valid", &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        match err {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 422, "{what}: {s:?}"),
            other => panic!("{what}: expected a 422 rejection, got {other:?}"),
        }
    }
    // A pool without a selector is rejected (required).
    let mut p = pool_manifest("noselector", 1, json!({}));
    p["spec"].as_object_mut().unwrap().remove("selector");
    let err = pools
        .create(&PostParams::default(), &serde_json::from_value(p).unwrap())
        .await;
    assert!(
        matches!(err, Err(kube::Error::Api(ref s)) if s.code == 422),
        "{err:?}"
    );

    // v1alpha1 is served too (same schema, same storage).
    let alpha = kube::core::ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk("pool.kubevirt.io", "v1alpha1", "VirtualMachinePool"),
        "virtualmachinepools",
    );
    let alpha_api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &alpha);
    let mut p = pool_manifest("alpha", 1, json!({}));
    p["apiVersion"] = json!("pool.kubevirt.io/v1alpha1");
    alpha_api
        .create(&PostParams::default(), &serde_json::from_value(p).unwrap())
        .await
        .unwrap();
    assert_eq!(
        pools.get("alpha").await.unwrap().data["spec"]["replicas"],
        1
    );

    // The scale subresource works on the pool.
    let scale = pools.get_scale("valid").await.unwrap();
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(2));
}

// ---------------------------------------------------------------- scale-in

/// Default (proactive, Random) scale-in deletes running VMs, killing their
/// guests; the deleted VMs stay Terminating with the pool finalizer while the
/// pool has more VMs than replicas (KubeVirt 1.8.4 strips it only when
/// diff == 0), and they count in status.replicas.
#[tokio::test]
async fn default_scale_in_kills_random_guests_and_leaves_terminating_vms() {
    let env = env().await;
    let ns = env.namespace("default-scale").await;
    env.create_pool(&ns, pool_manifest("p", 0, json!({}))).await;
    eventually("finalizer on pool and empty status", || async {
        let p = env.pool(&ns, "p").await;
        p.finalizers().contains(&POOL_FINALIZER.to_string()) && p.data["status"]["replicas"] == 0
    })
    .await;

    env.scale(&ns, "p", 3).await;
    env.wait_running(&ns, &["p-0", "p-1", "p-2"]).await;
    eventually("readyReplicas 3", || async {
        env.pool(&ns, "p").await.data["status"]["readyReplicas"] == 3
    })
    .await;
    let p = env.pool(&ns, "p").await;
    assert_eq!(p.data["status"]["labelSelector"], "kubevirt.io/vmpool=p");
    let mut uids = HashMap::new();
    for n in ["p-0", "p-1", "p-2"] {
        let vm = env.vm(&ns, n).await.unwrap();
        let owner = &vm.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.controller),
            ("VirtualMachinePool", "p", Some(true))
        );
        assert_eq!(
            vm.labels().get("kubevirt.io/vmpool").map(String::as_str),
            Some("p")
        );
        let rev = vm
            .labels()
            .get(POOL_REVISION_LABEL)
            .cloned()
            .expect("revision label");
        assert!(rev.starts_with("p-"), "{rev}");
        let revs: Api<ControllerRevision> = Api::namespaced(env.client.clone(), &ns);
        assert!(
            revs.get_opt(&rev).await.unwrap().is_some(),
            "ControllerRevision {rev} exists"
        );
        assert!(vm.finalizers().contains(&POOL_FINALIZER.to_string()));
        assert!(
            vm.finalizers()
                .contains(&VM_CONTROLLER_FINALIZER.to_string())
        );
        uids.insert(n.to_string(), vmi_uid(&env.vmi(&ns, n).await.unwrap()));
    }
    assert_eq!(env.guest.boots().len(), 3);

    env.scale(&ns, "p", 1).await;
    eventually("two VMs deleted, their guests vanished", || async {
        env.live_vm_names(&ns).await.len() == 1 && env.guest.vanished().len() == 2
    })
    .await;
    let live = env.live_vm_names(&ns).await;
    let deleted: Vec<String> = names(&["p-0", "p-1", "p-2"])
        .difference(&live)
        .cloned()
        .collect();
    let mut vanished = env.guest.vanished();
    vanished.sort();
    let mut expected: Vec<String> = deleted.iter().map(|n| uids[n].clone()).collect();
    expected.sort();
    assert_eq!(
        vanished, expected,
        "exactly the deleted VMs' guests vanished"
    );
    // The deleted VMs lose their VMIs and the VM controller's finalizer but
    // keep the pool's: Terminating, counted in status.replicas.
    eventually("deleted VMs hold only the pool finalizer", || async {
        let vms = env.vm_map(&ns).await;
        deleted.iter().all(|n| {
            vms.get(n).is_some_and(|v| {
                v.finalizers() == [POOL_FINALIZER.to_string()]
                    && v.data["status"]["printableStatus"] == "Terminating"
            })
        })
    })
    .await;
    for n in &deleted {
        assert!(env.vmi(&ns, n).await.is_none(), "VMI of {n} is gone");
    }
    let three_one = || async {
        let st = env.pool(&ns, "p").await.data["status"].clone();
        env.vm_names(&ns).await.len() == 3 && st["replicas"] == 3 && st["readyReplicas"] == 1
    };
    eventually("pool status: replicas 3, readyReplicas 1", three_one).await;
    stays(
        "3 VMs (2 Terminating), replicas 3, readyReplicas 1",
        Duration::from_millis(800),
        three_one,
    )
    .await;
    assert!(env.sim.incidents().is_empty());

    // replicas 2 now: diff 1 with 2 VMs deleting -> KubeVirt 1.8.4 panics.
    env.scale(&ns, "p", 2).await;
    eventually("the scaleIn panic is recorded", || async {
        !env.sim.incidents().is_empty()
    })
    .await;
    assert!(
        env.sim.incidents()[0].message.contains("panics"),
        "{:?}",
        env.sim.incidents()
    );
    stays(
        "nothing changes while the controller would crash-loop",
        Duration::from_millis(500),
        || async { env.vm_names(&ns).await.len() == 3 && env.live_vm_names(&ns).await == live },
    )
    .await;

    // replicas 3: diff 0 -> the pool lets the Terminating VMs go, then
    // recreates them under the same (lowest free) names.
    env.scale(&ns, "p", 3).await;
    env.wait_running(&ns, &["p-0", "p-1", "p-2"]).await;
    for n in &deleted {
        let new_uid = vmi_uid(&env.vmi(&ns, n).await.unwrap());
        assert_ne!(new_uid, uids[n], "{n} is a new VM with a new VMI");
    }
    assert_eq!(env.guest.boots().len(), 5);

    // Deleting the pool lets its VMs go (their guests vanish).
    env.pools(&ns)
        .delete("p", &DeleteParams::default())
        .await
        .unwrap();
    eventually("pool and VMs gone", || async {
        env.pools(&ns).get_opt("p").await.unwrap().is_none() && env.vm_names(&ns).await.is_empty()
    })
    .await;
    eventually("their guests vanished", || async {
        env.guest.vanished().len() >= 5
    })
    .await;
    assert_eq!(env.guest.vanished().len(), 5);
    assert_eq!(env.sim.guest_stats().vanishes, 5);
}

#[tokio::test]
async fn scale_in_sort_policies_pick_by_ordinal_and_age() {
    let env = env().await;
    let run = |policy: &'static str| {
        let env = &env;
        async move {
            let ns = env.namespace(&policy.to_lowercase()).await;
            let extra = json!({"scaleInStrategy": {"proactive": {"selectionPolicy": {"sortPolicy": policy}}}});
            env.create_pool(&ns, pool_manifest("p", 0, extra)).await;
            // Created one by one, more than a second apart (creationTimestamp
            // has second resolution), so Newest/Oldest are well defined.
            for (i, want) in [&["p-0"][..], &["p-0", "p-1"], &["p-0", "p-1", "p-2"]]
                .iter()
                .enumerate()
            {
                env.scale(&ns, "p", i as i64 + 1).await;
                env.wait_running(&ns, want).await;
                if i < 2 {
                    tokio::time::sleep(Duration::from_millis(1100)).await;
                }
            }
            env.scale(&ns, "p", 1).await;
            eventually(&format!("{policy}: one VM left"), || async {
                env.live_vm_names(&ns).await.len() == 1
            })
            .await;
            (policy, env.live_vm_names(&ns).await)
        }
    };
    let results = tokio::join!(
        run("AscendingOrder"),
        run("DescendingOrder"),
        run("Oldest"),
        run("Newest")
    );
    assert_eq!(results.0, ("AscendingOrder", names(&["p-2"])));
    assert_eq!(results.1, ("DescendingOrder", names(&["p-0"])));
    assert_eq!(results.2, ("Oldest", names(&["p-2"])));
    assert_eq!(results.3, ("Newest", names(&["p-0"])));
    // A VM leaves the live list when its deletion starts; its guest vanishes
    // a moment later, when the VMI goes.
    eventually("the scaled-in guests vanished", || async {
        env.guest.vanished().len() >= 8
    })
    .await;
    assert_eq!(
        env.guest.vanished().len(),
        8,
        "each scale-in killed two running guests"
    );
}

/// `unmanaged`: the pool never deletes a VM and never strips its finalizer;
/// the operator lowers replicas, deletes the VM and strips the finalizer.
#[tokio::test]
async fn unmanaged_scale_in_leaves_deletion_to_the_operator() {
    let env = env().await;
    let ns = env.namespace("unmanaged").await;
    env.create_pool(
        &ns,
        pool_manifest("p", 3, json!({"scaleInStrategy": {"unmanaged": {}}})),
    )
    .await;
    env.wait_running(&ns, &["p-0", "p-1", "p-2"]).await;

    env.scale(&ns, "p", 1).await;
    stays(
        "nothing deleted, replicas stays 3",
        Duration::from_millis(800),
        || async {
            env.live_vm_names(&ns).await.len() == 3
                && env.pool(&ns, "p").await.data["status"]["replicas"] == 3
        },
    )
    .await;
    assert!(env.guest.vanished().is_empty());

    let uid1 = vmi_uid(&env.vmi(&ns, "p-1").await.unwrap());
    env.vms(&ns)
        .delete("p-1", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "p-1's guest vanished, its VMI is gone, only the pool finalizer is left",
        || async {
            env.guest.vanished() == vec![uid1.clone()]
                && env.vmi(&ns, "p-1").await.is_none()
                && env
                    .vm(&ns, "p-1")
                    .await
                    .is_some_and(|v| v.finalizers() == [POOL_FINALIZER.to_string()])
        },
    )
    .await;
    stays(
        "p-1 stays Terminating with the pool finalizer; replicas 3",
        Duration::from_millis(800),
        || async {
            let vm = env.vm(&ns, "p-1").await;
            vm.is_some_and(|v| v.finalizers() == [POOL_FINALIZER.to_string()])
                && env.pool(&ns, "p").await.data["status"]["replicas"] == 3
        },
    )
    .await;
    env.strip_pool_finalizer(&ns, "p-1").await;
    eventually("p-1 gone, replicas 2", || async {
        env.vm(&ns, "p-1").await.is_none()
            && env.pool(&ns, "p").await.data["status"]["replicas"] == 2
    })
    .await;
    env.vms(&ns)
        .delete("p-2", &DeleteParams::default())
        .await
        .unwrap();
    env.strip_pool_finalizer(&ns, "p-2").await;
    eventually("p-2 gone, replicas 1", || async {
        env.vm_names(&ns).await == names(&["p-0"])
            && env.pool(&ns, "p").await.data["status"]["replicas"] == 1
    })
    .await;
    stays(
        "at replicas 1 with one VM nothing happens",
        Duration::from_millis(300),
        || async { env.vm_names(&ns).await == names(&["p-0"]) },
    )
    .await;

    // Scale-out is automatic and takes the lowest free indexes.
    env.scale(&ns, "p", 2).await;
    env.wait_running(&ns, &["p-0", "p-1"]).await;

    // Deleting a VM without lowering replicas first: the pool replaces it.
    let uid0 = vmi_uid(&env.vmi(&ns, "p-0").await.unwrap());
    let vm_uid0 = env.vm(&ns, "p-0").await.unwrap().metadata.uid.unwrap();
    env.vms(&ns)
        .delete("p-0", &DeleteParams::default())
        .await
        .unwrap();
    env.strip_pool_finalizer(&ns, "p-0").await;
    eventually("p-0 replaced by a new VM of the same name", || async {
        env.vm(&ns, "p-0")
            .await
            .is_some_and(|v| v.metadata.uid.as_ref() != Some(&vm_uid0))
    })
    .await;
    env.wait_running(&ns, &["p-0", "p-1"]).await;
    assert!(env.guest.vanished().contains(&uid0));
    assert!(env.sim.incidents().is_empty());
}

/// `opportunistic` (KubeVirt 1.8.4 code): lowering replicas deletes nothing;
/// a VM deleted by someone else goes only when the pool is at diff == 0.
#[tokio::test]
async fn opportunistic_scale_in_deletes_nothing_and_frees_deleted_vms_at_diff_zero() {
    let env = env().await;
    let ns = env.namespace("opportunistic").await;
    env.create_pool(
        &ns,
        pool_manifest("p", 3, json!({"scaleInStrategy": {"opportunistic": {}}})),
    )
    .await;
    env.wait_running(&ns, &["p-0", "p-1", "p-2"]).await;

    env.scale(&ns, "p", 1).await;
    stays("nothing deleted", Duration::from_millis(800), || async {
        env.live_vm_names(&ns).await.len() == 3
    })
    .await;

    // Stopped VMs are not removed either.
    env.vms(&ns)
        .patch(
            "p-2",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"runStrategy": "Halted"}})),
        )
        .await
        .unwrap();
    eventually("p-2 stopped", || async {
        env.vm(&ns, "p-2").await.unwrap().data["status"]["printableStatus"] == "Stopped"
    })
    .await;
    stays(
        "stopped p-2 is kept",
        Duration::from_millis(500),
        || async { env.live_vm_names(&ns).await.len() == 3 },
    )
    .await;

    // Deleted by the user while diff > 0: stuck Terminating (the VM
    // controller drops its own finalizer at once: there is no VMI).
    env.vms(&ns)
        .delete("p-2", &DeleteParams::default())
        .await
        .unwrap();
    eventually("p-2 holds only the pool finalizer", || async {
        env.vm(&ns, "p-2")
            .await
            .is_some_and(|v| v.finalizers() == [POOL_FINALIZER.to_string()])
    })
    .await;
    stays(
        "p-2 Terminating with the pool finalizer",
        Duration::from_millis(800),
        || async {
            env.vm(&ns, "p-2")
                .await
                .is_some_and(|v| v.finalizers() == [POOL_FINALIZER.to_string()])
        },
    )
    .await;
    // replicas = number of VMs (diff 0): freed, then recreated.
    let old = env.vm(&ns, "p-2").await.unwrap().metadata.uid.unwrap();
    env.scale(&ns, "p", 3).await;
    eventually("p-2 replaced", || async {
        env.vm(&ns, "p-2")
            .await
            .is_some_and(|v| v.metadata.uid.as_deref() != Some(old.as_str()))
    })
    .await;
    env.wait_running(&ns, &["p-0", "p-1", "p-2"]).await;
    assert!(env.sim.incidents().is_empty());
}

/// Default strategy at diff == 0: a VM deleted by someone else is freed by
/// the pool and recreated with the same name; scale-out reuses the lowest
/// free index; a paused pool does not scale.
#[tokio::test]
async fn deleted_vms_come_back_under_the_lowest_free_name_and_paused_pools_hold() {
    let env = env().await;
    let ns = env.namespace("names").await;
    env.create_pool(&ns, pool_manifest("p", 3, json!({}))).await;
    env.wait_running(&ns, &["p-0", "p-1", "p-2"]).await;
    let old_vm = env.vm(&ns, "p-1").await.unwrap().metadata.uid.unwrap();
    let old_vmi = vmi_uid(&env.vmi(&ns, "p-1").await.unwrap());

    env.vms(&ns)
        .delete("p-1", &DeleteParams::default())
        .await
        .unwrap();
    eventually("p-1 recreated", || async {
        env.vm(&ns, "p-1")
            .await
            .is_some_and(|v| v.metadata.uid.as_deref() != Some(old_vm.as_str()))
    })
    .await;
    env.wait_running(&ns, &["p-0", "p-1", "p-2"]).await;
    assert_eq!(env.guest.vanished(), vec![old_vmi]);
    assert_eq!(env.guest.boots_of(&ns, "p-1").len(), 2);

    // Paused: replicas changes are ignored and the condition says so.
    env.pools(&ns)
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true, "replicas": 5}})),
        )
        .await
        .unwrap();
    eventually("ReplicaPaused", || async {
        env.pool(&ns, "p").await.data["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "ReplicaPaused" && c["status"] == "True")
            })
    })
    .await;
    stays(
        "no scale-out while paused",
        Duration::from_millis(500),
        || async { env.vm_names(&ns).await.len() == 3 },
    )
    .await;
    env.pools(&ns)
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false}})),
        )
        .await
        .unwrap();
    env.wait_running(&ns, &["p-0", "p-1", "p-2", "p-3", "p-4"])
        .await;
    eventually("ReplicaPaused removed", || async {
        let p = env.pool(&ns, "p").await;
        p.data["status"]["conditions"]
            .as_array()
            .is_none_or(|cs| cs.iter().all(|c| c["type"] != "ReplicaPaused"))
    })
    .await;

    // A hole in the middle is filled first on scale-out.
    env.pools(&ns)
        .patch(
            "p",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"scaleInStrategy": {"unmanaged": {}}, "replicas": 4}})),
        )
        .await
        .unwrap();
    env.vms(&ns)
        .delete("p-1", &DeleteParams::default())
        .await
        .unwrap();
    env.strip_pool_finalizer(&ns, "p-1").await;
    env.vms(&ns)
        .delete("p-3", &DeleteParams::default())
        .await
        .unwrap();
    env.strip_pool_finalizer(&ns, "p-3").await;
    // 3 VMs for 4 replicas: one new VM, at the lowest free index.
    env.wait_running(&ns, &["p-0", "p-1", "p-2", "p-4"]).await;
    assert!(env.sim.incidents().is_empty());
}

// ---------------------------------------------------------------- runStrategy

fn vm_manifest(name: &str, spec_extra: Value) -> Value {
    let labels = json!({"app": name});
    let mut t = vm_template(labels, "Always");
    t["spec"].as_object_mut().unwrap().remove("runStrategy");
    for (k, v) in spec_extra.as_object().unwrap() {
        t["spec"][k] = v.clone();
    }
    json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": {"name": name}, "spec": t["spec"]})
}

async fn create_vm(env: &Env, ns: &str, manifest: Value) {
    let obj: DynamicObject = serde_json::from_value(manifest).unwrap();
    env.vms(ns)
        .create(&PostParams::default(), &obj)
        .await
        .expect("VM created");
}

async fn status_of(env: &Env, ns: &str, vm: &str) -> Value {
    env.vm(ns, vm).await.expect("VM exists").data["status"].clone()
}

#[tokio::test]
async fn run_strategies_decide_what_a_guest_power_off_means() {
    let env = env().await;
    let ns = env.namespace("runstrategy").await;
    for (name, extra) in [
        ("always", json!({"runStrategy": "Always"})),
        ("running", json!({"running": true})),
        ("rerun", json!({"runStrategy": "RerunOnFailure"})),
        ("once", json!({"runStrategy": "Once"})),
        ("manual", json!({"runStrategy": "Manual"})),
        ("halted", json!({"runStrategy": "Halted"})),
    ] {
        create_vm(&env, &ns, vm_manifest(name, extra)).await;
    }
    // Manual VMs start only on request.
    stays(
        "manual and halted do not start",
        Duration::from_millis(400),
        || async {
            env.vmi(&ns, "manual").await.is_none() && env.vmi(&ns, "halted").await.is_none()
        },
    )
    .await;
    kubevirt::request_start(&env.client, &ns, "manual")
        .await
        .unwrap();
    env.wait_named_running(&ns, &["always", "running", "rerun", "once", "manual"])
        .await;
    let st = status_of(&env, &ns, "halted").await;
    assert_eq!(st["printableStatus"], "Stopped");
    assert_eq!(st["created"], false);
    let ready = st["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap()
        .clone();
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("False"), Some("VMINotExists"))
    );
    assert!(
        status_of(&env, &ns, "manual").await["stateChangeRequests"].is_null(),
        "start request consumed"
    );
    let st = status_of(&env, &ns, "always").await;
    assert_eq!(
        (
            st["created"].as_bool(),
            st["ready"].as_bool(),
            st["runStrategy"].as_str()
        ),
        (Some(true), Some(true), Some("Always"))
    );

    let uid = |n: &'static str| {
        let env = &env;
        let ns = ns.clone();
        async move { vmi_uid(&env.vmi(&ns, n).await.unwrap()) }
    };
    let first: HashMap<&str, String> = HashMap::from([
        ("always", uid("always").await),
        ("running", uid("running").await),
        ("rerun", uid("rerun").await),
        ("once", uid("once").await),
        ("manual", uid("manual").await),
    ]);
    for u in first.values() {
        env.guest.power_off(u);
    }

    // Always (and running: true): a fresh VMI boots.
    for n in ["always", "running"] {
        eventually(&format!("{n} rebooted with a new VMI"), || async {
            env.vmi(&ns, n)
                .await
                .is_some_and(|v| vmi_uid(&v) != first[n] && v.data["status"]["phase"] == "Running")
        })
        .await;
        assert_eq!(env.guest.boots_of(&ns, n).len(), 2);
    }
    // RerunOnFailure: VMI deleted, VM Stopped, not restarted.
    eventually("rerun stopped without VMI", || async {
        env.vmi(&ns, "rerun").await.is_none()
            && status_of(&env, &ns, "rerun").await["printableStatus"] == "Stopped"
    })
    .await;
    // Once and Manual: the Succeeded VMI stays, VM Stopped.
    for n in ["once", "manual"] {
        eventually(&format!("{n} stopped with a Succeeded VMI"), || async {
            let vmi = env.vmi(&ns, n).await;
            vmi.is_some_and(|v| {
                v.data["status"]["phase"] == "Succeeded" && v.finalizers().is_empty()
            }) && status_of(&env, &ns, n).await["printableStatus"] == "Stopped"
        })
        .await;
        let st = status_of(&env, &ns, n).await;
        assert_eq!(
            (st["created"].as_bool(), st["ready"].as_bool()),
            (Some(true), Some(false))
        );
    }
    stays(
        "rerun, once and manual stay stopped",
        Duration::from_millis(600),
        || async {
            env.guest.boots_of(&ns, "rerun").len() == 1
                && env.guest.boots_of(&ns, "once").len() == 1
                && env.guest.boots_of(&ns, "manual").len() == 1
        },
    )
    .await;
    assert!(
        env.guest.vanished().is_empty(),
        "powered-off guests never vanish"
    );

    // Manual: a start request replaces the finished VMI with a new run.
    kubevirt::request_start(&env.client, &ns, "manual")
        .await
        .unwrap();
    eventually("manual runs again", || async {
        env.vmi(&ns, "manual").await.is_some_and(|v| {
            vmi_uid(&v) != first["manual"] && v.data["status"]["phase"] == "Running"
        })
    })
    .await;
    // Once: deleting the finished VMI starts a new run.
    env.vmis(&ns)
        .delete("once", &DeleteParams::default())
        .await
        .unwrap();
    eventually("once runs again", || async {
        env.vmi(&ns, "once")
            .await
            .is_some_and(|v| vmi_uid(&v) != first["once"] && v.data["status"]["phase"] == "Running")
    })
    .await;

    // Stopping a running VM (runStrategy Halted) kills its guest, once.
    let running_uid = uid("always").await;
    kubevirt::request_stop(&env.client, &ns, "always")
        .await
        .unwrap();
    eventually("always stopped", || async {
        env.vmi(&ns, "always").await.is_none()
            && status_of(&env, &ns, "always").await["printableStatus"] == "Stopped"
    })
    .await;
    assert_eq!(env.guest.vanished(), vec![running_uid.clone()]);

    // Deleting a VM deletes its VMI (guest vanishes) and then the VM.
    let manual_uid = uid("manual").await;
    env.vms(&ns)
        .delete("manual", &DeleteParams::default())
        .await
        .unwrap();
    eventually("manual gone", || async {
        env.vm(&ns, "manual").await.is_none() && env.vmi(&ns, "manual").await.is_none()
    })
    .await;
    assert_eq!(env.guest.vanished(), vec![running_uid, manual_uid]);
    let stats = env.sim.guest_stats();
    assert_eq!(stats.power_offs, 5);
    assert_eq!(stats.vanishes, 2);
}

// ---------------------------------------------------------------- status progression

async fn record<F>(
    seen: Arc<Mutex<Vec<String>>>,
    api: Api<DynamicObject>,
    name: &'static str,
    field: F,
) where
    F: Fn(&DynamicObject) -> Option<String> + Send + 'static,
{
    use futures::StreamExt;
    let wc = kube::runtime::watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut stream = kube::runtime::watcher(api, wc).boxed();
    while let Some(ev) = stream.next().await {
        if let Ok(
            kube::runtime::watcher::Event::Apply(o) | kube::runtime::watcher::Event::InitApply(o),
        ) = ev
            && let Some(v) = field(&o)
        {
            let mut s = seen.lock().unwrap();
            if s.last() != Some(&v) {
                s.push(v);
            }
        }
    }
}

#[tokio::test]
async fn printable_status_and_vmi_phases_progress_and_ready_replicas_follow() {
    // Slow enough to observe every step: a 2 s boot takes 200 ms.
    let config = KubeVirtSimConfig {
        time_scale: TimeScale(10.0),
        boot_latency: BootLatency::Uniform {
            min: Duration::from_secs(2),
            max: Duration::from_secs(3),
        },
        stop_latency: Duration::from_secs(3),
        ..config()
    };
    let env = env_with(TestGuest::default(), config).await;
    let ns = env.namespace("progress").await;
    let vm_seen = Arc::new(Mutex::new(Vec::new()));
    let vmi_seen = Arc::new(Mutex::new(Vec::new()));
    let pool_seen = Arc::new(Mutex::new(Vec::new()));
    let tasks = [
        tokio::spawn(record(vm_seen.clone(), env.vms(&ns), "p-0", |o| {
            o.data["status"]["printableStatus"]
                .as_str()
                .map(String::from)
        })),
        tokio::spawn(record(vmi_seen.clone(), env.vmis(&ns), "p-0", |o| {
            o.data["status"]["phase"].as_str().map(String::from)
        })),
        tokio::spawn(record(pool_seen.clone(), env.pools(&ns), "p", |o| {
            o.data["status"]["readyReplicas"]
                .as_i64()
                .map(|r| r.to_string())
        })),
    ];
    env.create_pool(&ns, pool_manifest("p", 2, json!({}))).await;
    env.wait_running(&ns, &["p-0", "p-1"]).await;
    eventually("readyReplicas 2", || async {
        env.pool(&ns, "p").await.data["status"]["readyReplicas"] == 2
    })
    .await;
    let vmi = env.vmi(&ns, "p-0").await.unwrap();
    assert_eq!(vmi.data["status"]["nodeName"], "kubevirt-sim-node");
    assert!(vmi.data["status"]["interfaces"][0]["ipAddress"].is_string());

    // Stop p-0: Stopping while the guest shuts down, then Stopped.
    env.vms(&ns)
        .patch(
            "p-0",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"runStrategy": "Halted"}})),
        )
        .await
        .unwrap();
    eventually("p-0 stopped, readyReplicas 1", || async {
        status_of(&env, &ns, "p-0").await["printableStatus"] == "Stopped"
            && env.pool(&ns, "p").await.data["status"]["readyReplicas"] == 1
    })
    .await;
    assert_eq!(
        env.pool(&ns, "p").await.data["status"]["replicas"],
        2,
        "a stopped VM still counts"
    );
    env.vms(&ns)
        .delete("p-0", &DeleteParams::default())
        .await
        .unwrap();
    eventually("p-0 replaced and running", || async {
        env.vmi(&ns, "p-0")
            .await
            .is_some_and(|v| v.data["status"]["phase"] == "Running")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for t in tasks {
        t.abort();
    }
    let vm_seen = vm_seen.lock().unwrap().clone();
    let vmi_seen = vmi_seen.lock().unwrap().clone();
    let pool_seen = pool_seen.lock().unwrap().clone();
    let expect_in_order = |seen: &[String], want: &[&str]| {
        let mut it = seen.iter();
        for w in want {
            assert!(it.any(|s| s == w), "{want:?} not in order in {seen:?}");
        }
    };
    expect_in_order(
        &vm_seen,
        &[
            "Starting", "Running", "Stopping", "Stopped", "Starting", "Running",
        ],
    );
    expect_in_order(
        &vmi_seen,
        &[
            "Pending",
            "Scheduling",
            "Scheduled",
            "Running",
            "Succeeded",
            "Pending",
            "Running",
        ],
    );
    expect_in_order(&pool_seen, &["0", "2", "1", "2"]);
}

// ---------------------------------------------------------------- cloud-init

#[tokio::test]
async fn cloud_init_user_data_reaches_the_guest() {
    let env = env().await;
    let ns = env.namespace("cloudinit").await;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
    let secret = |name: &str, key: &str, value: &str| -> Secret {
        serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {key: value}}))
            .unwrap()
    };
    secrets
        .create(
            &PostParams::default(),
            &secret("ud-0", "userdata", "#cloud-config\nindex: 0\n"),
        )
        .await
        .unwrap();
    secrets
        .create(
            &PostParams::default(),
            &secret("ud-1", "userData", "#cloud-config\nindex: 1\n"),
        )
        .await
        .unwrap();

    let mut pool = pool_manifest(
        "p",
        3,
        json!({"nameGeneration": {"appendIndexToSecretRefs": true}}),
    );
    let spec = &mut pool["spec"]["virtualMachineTemplate"]["spec"]["template"]["spec"];
    spec["domain"]["devices"] =
        json!({"disks": [{"name": "cloudinit", "disk": {"bus": "virtio"}}]});
    spec["volumes"] =
        json!([{"name": "cloudinit", "cloudInitNoCloud": {"secretRef": {"name": "ud"}}}]);
    env.create_pool(&ns, pool).await;

    env.wait_named_running(&ns, &["p-0", "p-1"]).await;
    let vm = env.vm(&ns, "p-1").await.unwrap();
    assert_eq!(
        vm.data["spec"]["template"]["spec"]["volumes"][0]["cloudInitNoCloud"]["secretRef"]["name"],
        "ud-1",
        "appendIndexToSecretRefs"
    );
    for i in 0..2 {
        let boots = env.guest.boots_of(&ns, &format!("p-{i}"));
        assert_eq!(boots.len(), 1);
        assert_eq!(
            boots[0].user_data.as_deref(),
            Some(format!("#cloud-config\nindex: {i}\n").as_str())
        );
    }
    // p-2's secret does not exist: its pod cannot start, it stays Starting.
    let p2_waits = || async {
        env.vmi(&ns, "p-2")
            .await
            .is_some_and(|v| v.data["status"]["phase"] == "Scheduling")
            && status_of(&env, &ns, "p-2").await["printableStatus"] == "Starting"
    };
    eventually("p-2 Scheduling (its secret is missing)", p2_waits).await;
    stays(
        "p-2 waits for its secret",
        Duration::from_millis(500),
        p2_waits,
    )
    .await;
    secrets
        .create(&PostParams::default(), &secret("ud-2", "userdata", "late"))
        .await
        .unwrap();
    env.wait_running(&ns, &["p-0", "p-1", "p-2"]).await;
    assert_eq!(
        env.guest.boots_of(&ns, "p-2")[0].user_data.as_deref(),
        Some("late")
    );

    // Inline userData and userDataBase64.
    for (name, source) in [
        ("inline", json!({"userData": "#!/bin/sh\necho inline\n"})),
        (
            "b64",
            json!({"userDataBase64": "IyEvYmluL3NoCmVjaG8gYjY0Cg=="}),
        ),
    ] {
        let mut m = vm_manifest(name, json!({"runStrategy": "Always"}));
        m["spec"]["template"]["spec"]["domain"]["devices"] =
            json!({"disks": [{"name": "ci", "disk": {"bus": "virtio"}}]});
        m["spec"]["template"]["spec"]["volumes"] =
            json!([{"name": "ci", "cloudInitNoCloud": source}]);
        create_vm(&env, &ns, m).await;
    }
    eventually("inline guests booted", || async {
        env.guest.boots_of(&ns, "inline").len() == 1 && env.guest.boots_of(&ns, "b64").len() == 1
    })
    .await;
    assert_eq!(
        env.guest.boots_of(&ns, "inline")[0].user_data.as_deref(),
        Some("#!/bin/sh\necho inline\n")
    );
    assert_eq!(
        env.guest.boots_of(&ns, "b64")[0].user_data.as_deref(),
        Some("#!/bin/sh\necho b64\n")
    );
    // A Secret without a userdata/userData key: virt-launcher cannot build
    // the cloud-init disk, so the VMI never runs (a typo in the key shows as
    // a VM stuck Starting, not as a booted VM without a runner).
    secrets
        .create(
            &PostParams::default(),
            &secret("wrongkey", "user-data", "#cloud-config\n"),
        )
        .await
        .unwrap();
    let mut m = vm_manifest("wrongkey", json!({"runStrategy": "Always"}));
    m["spec"]["template"]["spec"]["domain"]["devices"] =
        json!({"disks": [{"name": "ci", "disk": {"bus": "virtio"}}]});
    m["spec"]["template"]["spec"]["volumes"] =
        json!([{"name": "ci", "cloudInitNoCloud": {"secretRef": {"name": "wrongkey"}}}]);
    create_vm(&env, &ns, m).await;
    eventually("wrongkey's VMI reaches Scheduled", || async {
        env.vmi(&ns, "wrongkey")
            .await
            .is_some_and(|v| v.data["status"]["phase"] == "Scheduled")
    })
    .await;
    stays(
        "wrongkey never runs",
        Duration::from_millis(500),
        || async {
            env.vmi(&ns, "wrongkey")
                .await
                .is_some_and(|v| v.data["status"]["phase"] == "Scheduled")
                && status_of(&env, &ns, "wrongkey").await["printableStatus"] == "Starting"
                && env.guest.boots_of(&ns, "wrongkey").is_empty()
        },
    )
    .await;
    secrets
        .patch(
            "wrongkey",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"userdata": "fixed"}})),
        )
        .await
        .unwrap();
    eventually("wrongkey boots once the key is there", || async {
        env.guest.boots_of(&ns, "wrongkey").len() == 1
    })
    .await;
    assert_eq!(
        env.guest.boots_of(&ns, "wrongkey")[0].user_data.as_deref(),
        Some("fixed")
    );

    // A VM without cloud-init boots with none.
    create_vm(
        &env,
        &ns,
        vm_manifest("plain", json!({"runStrategy": "Always"})),
    )
    .await;
    eventually("plain booted", || async {
        env.guest.boots_of(&ns, "plain").len() == 1
    })
    .await;
    assert_eq!(env.guest.boots_of(&ns, "plain")[0].user_data, None);
}

// ---------------------------------------------------------------- template updates

#[tokio::test]
async fn template_changes_restart_vmis_unless_the_update_strategy_is_opportunistic() {
    let env = env().await;
    let run = |ns_name: &'static str, update_strategy: Value| {
        let env = &env;
        async move {
            let ns = env.namespace(ns_name).await;
            let extra = if update_strategy.is_null() {
                json!({})
            } else {
                json!({"updateStrategy": update_strategy})
            };
            env.create_pool(&ns, pool_manifest("p", 2, extra)).await;
            env.wait_running(&ns, &["p-0", "p-1"]).await;
            let before: Vec<String> = [
                vmi_uid(&env.vmi(&ns, "p-0").await.unwrap()),
                vmi_uid(&env.vmi(&ns, "p-1").await.unwrap()),
            ]
            .into();
            let rev_before =
                env.vm(&ns, "p-0").await.unwrap().labels()[POOL_REVISION_LABEL].clone();
            // New memory request: a VMI template change.
            env.pools(&ns)
                .patch(
                    "p",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"virtualMachineTemplate": {"spec": {"template": {"spec": {"domain": {"resources": {"requests": {"memory": "128Mi"}}}}}}}}})),
                )
                .await
                .unwrap();
            eventually("VMs rewritten", || async {
                let vms = env.vm_map(&ns).await;
                ["p-0", "p-1"].iter().all(|n| {
                    vms.get(*n).is_some_and(|v| {
                        v.labels()[POOL_REVISION_LABEL] != rev_before
                            && v.data["spec"]["template"]["spec"]["domain"]["resources"]["requests"]
                                ["memory"]
                                == "128Mi"
                    })
                })
            })
            .await;
            (ns, before)
        }
    };
    let ((proactive_ns, proactive_before), (opp_ns, opp_before)) = tokio::join!(
        run("proactive-update", Value::Null),
        run("opportunistic-update", json!({"opportunistic": {}}))
    );

    // Default (proactive): every outdated VMI is deleted (guest killed) and
    // replaced with one from the new template.
    eventually("proactive: new VMIs with the new template", || async {
        let mut ok = true;
        for n in ["p-0", "p-1"] {
            ok &= env.vmi(&proactive_ns, n).await.is_some_and(|v| {
                !proactive_before.contains(&vmi_uid(&v))
                    && v.data["spec"]["domain"]["resources"]["requests"]["memory"] == "128Mi"
                    && v.data["status"]["phase"] == "Running"
            });
        }
        ok
    })
    .await;
    for u in &proactive_before {
        assert!(
            env.guest.vanished().contains(u),
            "proactive update killed guest {u}"
        );
    }
    // Opportunistic: VMs rewritten, VMIs untouched.
    stays(
        "opportunistic: VMIs keep running",
        Duration::from_millis(600),
        || async {
            let mut ok = true;
            for (n, u) in ["p-0", "p-1"].iter().zip(&opp_before) {
                ok &= env
                    .vmi(&opp_ns, n)
                    .await
                    .is_some_and(|v| &vmi_uid(&v) == u && v.data["status"]["phase"] == "Running");
            }
            ok
        },
    )
    .await;
    for u in &opp_before {
        assert!(!env.guest.vanished().contains(u));
    }
    // The old revision of the proactive pool is pruned once nothing uses it.
    let revs: Api<ControllerRevision> = Api::namespaced(env.client.clone(), &proactive_ns);
    eventually("one ControllerRevision left", || async {
        revs.list(&ListParams::default()).await.unwrap().items.len() == 1
    })
    .await;
}
