//! Harness of the operator's end-to-end tests: a real control plane (etcd,
//! kube-apiserver, kube-controller-manager), the KubeVirt and CircleCI
//! simulators, and the real `runner-provisioner` binary as a child process
//! whose stderr (JSON logs) is captured in a file.
#![allow(dead_code)]

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use rp_testenv::circleci::{
    CircleCiSim, CircleCiSimConfig, TEST_API_TOKEN, TEST_RESOURCE_CLASS, TEST_RUNNER_TOKEN,
};
use rp_testenv::kubevirt::{self, BootLatency, KubeVirtSim, KubeVirtSimConfig};
use rp_testenv::{ControlPlane, ControlPlaneOptions, TimeScale};
use runner_provisioner::crd::{RunnerPool, crd_yaml};
use serde_json::{Value, json};

pub const NS: &str = "ci-runners";
pub const API_SECRET: &str = "circleci-api";
pub const RUNNER_SECRET: &str = "sim-linux-runner";

/// Simulated seconds per wall second in these tests.
pub const SCALE: f64 = 60.0;

pub struct Env {
    pub cp: ControlPlane,
    pub client: Client,
    pub circleci: CircleCiSim,
    pub kubevirt: KubeVirtSim,
    pub dir: tempfile::TempDir,
}

/// Starts everything but the operator; creates namespace [`NS`] with the
/// token Secrets [`API_SECRET`] and [`RUNNER_SECRET`]. VMs boot in 30..90
/// simulated seconds.
pub async fn env() -> Env {
    env_with(Duration::from_secs(30), Duration::from_secs(90), SCALE).await
}

/// [`env`] with VM boot times uniform in `[boot_min, boot_max]` (simulated)
/// and simulated time running `scale` times faster than wall time.
pub async fn env_with(boot_min: Duration, boot_max: Duration, scale: f64) -> Env {
    rp_testenv::init_crypto();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kube_client=off")),
        )
        .with_test_writer()
        .try_init();
    let cp = ControlPlane::start(ControlPlaneOptions {
        crds: vec![crd_yaml(), kubevirt::crds_yaml().to_string()],
    })
    .await
    .expect("the control plane starts (build it with `make tools`)");
    let client = cp.client();
    let circleci = CircleCiSim::start(CircleCiSimConfig::for_tests().with_time_scale(scale))
        .await
        .expect("CircleCI simulator starts");
    let kubevirt = KubeVirtSim::start(
        client.clone(),
        KubeVirtSimConfig {
            time_scale: TimeScale(scale),
            boot_latency: BootLatency::Uniform {
                min: boot_min,
                max: boot_max,
            },
            seed: 42,
            ..Default::default()
        },
        circleci.guest(),
    )
    .await
    .expect("KubeVirt simulator starts");
    let ns: Api<Namespace> = Api::all(client.clone());
    ns.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap(),
    )
    .await
    .expect("namespace");
    let env = Env {
        cp,
        client,
        circleci,
        kubevirt,
        dir: tempfile::tempdir().expect("temp dir"),
    };
    env.put_secret(API_SECRET, TEST_API_TOKEN).await;
    env.put_secret(RUNNER_SECRET, TEST_RUNNER_TOKEN).await;
    env
}

impl Env {
    pub async fn put_secret(&self, name: &str, token: &str) {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), NS);
        let s: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": NS},
            "stringData": {"token": token},
        }))
        .unwrap();
        api.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&s))
            .await
            .expect("secret applied");
    }

    /// Starts the operator watching [`NS`].
    pub fn operator(&self, name: &str, extra: &[&str]) -> Operator {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("log file");
        let mut args = vec![
            "run",
            "--namespace",
            NS,
            "--ready-addr",
            "127.0.0.1:0",
            "--live-addr",
            "127.0.0.1:0",
            "--lease-namespace",
            NS,
            "--identity",
            name,
        ];
        args.extend_from_slice(extra);
        let child = Command::new(env!("CARGO_BIN_EXE_runner-provisioner"))
            .args(&args)
            .env("KUBECONFIG", self.cp.kubeconfig())
            .env("RUST_LOG", "info,runner_provisioner=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("operator starts");
        Operator {
            child: Some(child),
            log,
        }
    }

    pub fn pools(&self) -> Api<RunnerPool> {
        Api::namespaced(self.client.clone(), NS)
    }

    pub fn vmpools(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), NS, &kubevirt::pool_resource())
    }

    pub fn vms(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), NS, &kubevirt::vm_resource())
    }

    pub async fn apply_pool(&self, manifest: Value) {
        let name = manifest["metadata"]["name"].as_str().unwrap().to_string();
        let api: Api<DynamicObject> = Api::namespaced_with(
            self.client.clone(),
            NS,
            &kube::core::ApiResource::erase::<RunnerPool>(&()),
        );
        let obj: DynamicObject = serde_json::from_value(manifest).unwrap();
        api.patch(
            &name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&obj),
        )
        .await
        .expect("RunnerPool applied");
    }

    /// `spec.replicas` of the pool's VirtualMachinePool.
    pub async fn replicas(&self, name: &str) -> Option<i64> {
        let p = self.vmpools().get_opt(name).await.ok()??;
        p.data["spec"]["replicas"].as_i64()
    }

    /// The pool's VMs (name, printableStatus).
    pub async fn vm_states(&self) -> Vec<(String, String)> {
        let list = self
            .vms()
            .list(&ListParams::default())
            .await
            .expect("list vms");
        list.items
            .iter()
            .map(|v| {
                (
                    v.name_any(),
                    v.data["status"]["printableStatus"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                )
            })
            .collect()
    }

    pub async fn events_text(&self) -> String {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), NS);
        let list = api.list(&ListParams::default()).await.expect("events");
        serde_json::to_string(&list.items).unwrap()
    }
}

/// A RunnerPool for the simulator's sample class.
pub fn pool_manifest(name: &str, api_url: &str, min: i64, max: i64) -> Value {
    json!({
        "apiVersion": "runners.provisioner.dev/v1alpha1",
        "kind": "RunnerPool",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "resourceClass": TEST_RESOURCE_CLASS,
            "circleci": {
                "apiUrl": api_url,
                "apiTokenSecretRef": {"name": API_SECRET},
                "runnerTokenSecretRef": {"name": RUNNER_SECRET},
            },
            "scaling": {
                "minReplicas": min,
                "maxReplicas": max,
                "idleTimeout": "10m",
                "pollInterval": "1s",
            },
        },
    })
}

pub struct Operator {
    child: Option<Child>,
    pub log: PathBuf,
}

impl Operator {
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// JSON log records.
    pub fn records(&self) -> Vec<Value> {
        self.logs()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// SIGKILL, as a crash or a lost node would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (graceful shutdown).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        rp_testenv::operator_bin::terminate(self.child.take()?, Duration::from_secs(20))
    }

    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let logs = self.logs();
            let tail: Vec<_> = logs.lines().rev().take(60).collect();
            eprintln!(
                "---- operator log {} (last 60 lines) ----",
                self.log.display()
            );
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Polls `f` every 100 ms until it returns `Some`, or panics after `timeout`
/// with `what` and the last value seen.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match f().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts that none of `needles` appears in `hay`.
pub fn assert_no_secret(where_: &str, hay: &str, needles: &[&str]) {
    for n in needles {
        assert!(!hay.contains(n), "a token appears in {where_}");
    }
}
