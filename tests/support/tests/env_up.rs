//! `env-up.sh` / `rp-env` / `env-down.sh` end to end, in a temporary
//! directory: the env file, the kubeconfig, the demo namespace and Secrets,
//! the KubeVirt CRDs, the CircleCI simulator's auth, the KubeVirt simulator
//! booting CircleCI agents, and that nothing is left running afterwards.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use rp_testenv::circleci::{RunnerMode, render_user_data};
use rp_testenv::controlplane::client_from_kubeconfig;
use rp_testenv::kubevirt;
use serde_json::{Value, json};

/// `tests/support`, where env-up.sh and env-down.sh are.
const SCRIPTS: &str = env!("CARGO_MANIFEST_DIR");

fn script(dir: &Path, name: &str, args: &[&str]) -> Output {
    Command::new(Path::new(SCRIPTS).join(name))
        .args(args)
        .env("RP_DEV_DIR", dir)
        .env("RP_ENV_BIN", env!("CARGO_BIN_EXE_rp-env"))
        .env_remove("RP_ENV_ARGS")
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"))
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs env-down.sh when dropped unless it already ran (a failing test must
/// not leave a control plane behind).
struct Down<'a> {
    dir: &'a Path,
    done: bool,
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = script(self.dir, "env-down.sh", &[]);
        }
    }
}

/// `export NAME=value` lines, values bare or single-quoted (as rp-env writes them).
fn parse_env(body: &str) -> HashMap<String, String> {
    let mut vars = HashMap::new();
    for line in body.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let rest = line
            .strip_prefix("export ")
            .unwrap_or_else(|| panic!("not an export line: {line:?}"));
        let (k, v) = rest
            .split_once('=')
            .unwrap_or_else(|| panic!("no '=' in {line:?}"));
        let v = match v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) {
            Some(inner) => inner.replace(r"'\''", "'"),
            None => v.to_string(),
        };
        vars.insert(k.to_string(), v);
    }
    vars
}

/// State and parent pid from `/proc/PID/stat`; `None` when the process is gone.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Gone, or a zombie nobody reaped yet (the orphaned rp-env's parent is
/// init, which may reap late): it holds no resources and runs no code.
fn gone(pid: u32) -> bool {
    proc_stat(pid).is_none_or(|(state, _)| state == 'Z' || state == 'X')
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    rp_testenv::wait_until(what, timeout, Duration::from_millis(100), f).await
}

#[tokio::test]
async fn env_up_serves_everything_and_env_down_leaves_nothing() {
    rp_testenv::init_crypto();
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("dev");
    let mut down = Down {
        dir: &dir,
        done: false,
    };

    let t0 = Instant::now();
    let up = script(
        &dir,
        "env-up.sh",
        &[
            "--time-scale",
            "100",
            "--boot-latency",
            "10s",
            "--seed",
            "5",
        ],
    );
    assert!(up.status.success(), "env-up.sh failed:\n{}", text(&up));
    eprintln!("env-up.sh took {:?}", t0.elapsed());
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(stdout.contains("environment up"), "{}", text(&up));
    assert!(
        stdout.contains(&format!("source {}/env", dir.display())),
        "{}",
        text(&up)
    );

    // The env file, parsed (not sourced).
    let env = parse_env(&std::fs::read_to_string(dir.join("env")).expect("DIR/env written"));
    let kubeconfig = dir.join("kubeconfig");
    assert_eq!(env["KUBECONFIG"], kubeconfig.display().to_string());
    assert!(Path::new(&env["KUBECONFIG"]).is_absolute());
    assert_eq!(env["CIRCLECI_RESOURCE_CLASS"], "sim-org/linux");
    assert_eq!(env["RP_TIME_SCALE"], "100");
    assert_eq!(env["RP_DEMO_NAMESPACE"], "ci-runners");
    assert_eq!(
        env["CIRCLECI_SIM_CONTROL_URL"],
        format!("{}/control", env["CIRCLECI_SIM_URL"])
    );
    assert!(
        env["CIRCLECI_SIM_URL"].starts_with("http://127.0.0.1:"),
        "{env:?}"
    );
    assert_ne!(env["CIRCLECI_API_TOKEN"], env["CIRCLECI_RUNNER_TOKEN"]);
    assert!(
        !dir.join("env.tmp").exists(),
        "written through a temporary file"
    );

    // rp-env and its control-plane children run.
    let rp_pid: u32 = std::fs::read_to_string(dir.join("rp-env.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(env["RP_ENV_PID"], rp_pid.to_string());
    let pids: Vec<(String, u32)> = std::fs::read_to_string(dir.join("control-plane.pids"))
        .unwrap()
        .lines()
        .map(|l| {
            let (n, p) = l.split_once(' ').unwrap();
            (n.to_string(), p.parse().unwrap())
        })
        .collect();
    let names: Vec<&str> = pids.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["etcd", "kube-apiserver", "kube-controller-manager"]);
    assert!(!gone(rp_pid), "rp-env runs");
    for (name, pid) in &pids {
        let (state, ppid) = proc_stat(*pid).unwrap_or_else(|| panic!("{name} ({pid}) runs"));
        assert_ne!(state, 'Z', "{name} runs");
        assert_eq!(ppid, rp_pid, "{name} is a child of rp-env");
    }

    // A second env-up on the same directory refuses.
    let again = script(&dir, "env-up.sh", &[]);
    assert!(
        !again.status.success(),
        "second env-up must fail:\n{}",
        text(&again)
    );
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already up"),
        "{}",
        text(&again)
    );

    // The kubeconfig works: demo namespace, Secrets, KubeVirt CRDs.
    let client = client_from_kubeconfig(&kubeconfig)
        .await
        .expect("kubeconfig loads");
    let namespaces: Vec<String> = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .expect("namespaces listed")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(
        namespaces.contains(&"ci-runners".to_string()),
        "{namespaces:?}"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "ci-runners");
    for (name, var) in [
        ("circleci-api", "CIRCLECI_API_TOKEN"),
        ("sim-linux-runner", "CIRCLECI_RUNNER_TOKEN"),
    ] {
        let s = secrets
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("Secret {name}: {e}"));
        let token = &s.data.unwrap()["token"].0;
        assert_eq!(
            String::from_utf8_lossy(token),
            env[var],
            "Secret {name} key token"
        );
    }
    let crds: Vec<String> = Api::<CustomResourceDefinition>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    for crd in [
        "virtualmachinepools.pool.kubevirt.io",
        "virtualmachines.kubevirt.io",
        "virtualmachineinstances.kubevirt.io",
    ] {
        assert!(crds.contains(&crd.to_string()), "{crd} installed: {crds:?}");
    }

    // The CircleCI simulator answers with the token, and 401 without.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let url = format!(
        "{}/api/v3/runner/tasks?resource-class=sim-org/linux",
        env["CIRCLECI_SIM_URL"]
    );
    let r = http
        .get(&url)
        .header("Circle-Token", &env["CIRCLECI_API_TOKEN"])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["unclaimed_task_count"], 0, "{body}");
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // The KubeVirt simulator boots CircleCI agents: a queued task is claimed
    // and finished by a VM whose cloud-init Secret carries the runner config.
    let control = &env["CIRCLECI_SIM_CONTROL_URL"];
    let r = http
        .post(format!("{control}/tasks"))
        .json(&json!({"resource_class": "sim-org/linux", "duration_secs": 30}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{r:?}");
    let r = http
        .get(&url)
        .header("Circle-Token", &env["CIRCLECI_API_TOKEN"])
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["unclaimed_task_count"], 1);
    let user_data = render_user_data(
        &env["CIRCLECI_SIM_URL"],
        &env["CIRCLECI_RUNNER_TOKEN"],
        RunnerMode::SingleTask,
        None,
    );
    let ud_secret: Secret = serde_json::from_value(
        json!({"metadata": {"name": "runner-0"}, "stringData": {"userdata": user_data}}),
    )
    .unwrap();
    secrets
        .create(&PostParams::default(), &ud_secret)
        .await
        .unwrap();
    let vm: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
        "metadata": {"name": "runner-0"},
        "spec": {"runStrategy": "Once", "template": {"spec": {
            "domain": {"devices": {"disks": [{"name": "ci", "disk": {"bus": "virtio"}}]}},
            "volumes": [{"name": "ci", "cloudInitNoCloud": {"secretRef": {"name": "runner-0"}}}],
        }}},
    }))
    .unwrap();
    let vms: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "ci-runners", &kubevirt::vm_resource());
    vms.create(&PostParams::default(), &vm).await.unwrap();
    eventually(
        "the task finished on runner-0 and the VM stopped",
        Duration::from_secs(30),
        || async {
            let ledger: Value = http
                .get(format!("{control}/ledger"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let finished =
                ledger[0]["state"] == "finished" && ledger[0]["runner"]["vm_name"] == "runner-0";
            let vm = vms.get("runner-0").await.unwrap();
            finished && vm.data["status"]["printableStatus"] == "Stopped"
        },
    )
    .await;
    let kc = std::fs::read_to_string(&kubeconfig).unwrap();
    let server = kc
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .expect("server in kubeconfig");
    let apiserver_port: u16 = server.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", apiserver_port)).is_ok(),
        "apiserver listens"
    );

    // env-down stops everything it started, and only that.
    let t0 = Instant::now();
    let out = script(&dir, "env-down.sh", &[]);
    down.done = true;
    assert!(out.status.success(), "env-down.sh failed:\n{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("environment down"),
        "{}",
        text(&out)
    );
    eprintln!("env-down.sh took {:?}", t0.elapsed());
    assert!(
        gone(rp_pid),
        "rp-env ({rp_pid}) stopped: {:?}",
        proc_stat(rp_pid)
    );
    for (name, pid) in &pids {
        assert!(gone(*pid), "{name} ({pid}) stopped: {:?}", proc_stat(*pid));
    }
    assert!(!dir.join("env").exists(), "DIR/env removed");
    assert!(!dir.join("kubeconfig").exists(), "DIR/kubeconfig removed");
    assert!(!dir.join("rp-env.pid").exists(), "pid file removed");
    assert!(
        !Path::new(&env["RP_CONTROL_PLANE_DIR"]).exists(),
        "control plane temp dir removed"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", apiserver_port)).is_err(),
        "apiserver port closed"
    );
    let log = std::fs::read_to_string(dir.join("rp-env.log")).unwrap();
    assert!(
        log.contains("SIGTERM: shutting down") && log.contains("stopped"),
        "{log}"
    );
    assert!(
        !log.contains(&env["CIRCLECI_RUNNER_TOKEN"]),
        "the runner token is not logged"
    );

    // Down again: nothing to do.
    let again = script(&dir, "env-down.sh", &[]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("not running"),
        "{}",
        text(&again)
    );
}
