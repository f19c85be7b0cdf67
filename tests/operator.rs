//! The operator end to end: the real binary against a real control plane and
//! the KubeVirt and CircleCI simulators.

mod operator_common;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use operator_common::*;
use rp_testenv::circleci::{
    Fault, OutageMode, TEST_API_TOKEN, TEST_RESOURCE_CLASS, TEST_RUNNER_TOKEN,
};
use runner_provisioner::crd::{CONDITION_DEGRADED, CONDITION_READY, CONDITION_STALLED};
use serde_json::json;

const POOL: &str = "linux";
const T: Duration = Duration::from_secs(60);

fn condition(p: &runner_provisioner::crd::RunnerPool, t: &str) -> Option<(String, String)> {
    let c = p.status.as_ref()?.condition(t)?;
    Some((c.status.clone(), c.reason.clone()))
}

async fn ready_pool(env: &Env) {
    eventually("RunnerPool Ready", T, || async {
        let p = env.pools().get(POOL).await.map_err(|e| e.to_string())?;
        match condition(&p, CONDITION_READY) {
            Some((s, _)) if s == "True" => Ok(()),
            other => Err(format!("{other:?} {:?}", p.status)),
        }
    })
    .await
}

#[tokio::test]
async fn scales_to_the_queue_runs_every_task_and_kills_none() {
    let env = env().await;
    let mut op = env.operator("op-a", &["--leader-election", "false"]);
    env.apply_pool(pool_manifest(POOL, &env.circleci.base_url(), 1, 5))
        .await;

    // The owned objects appear with the expected content.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), NS);
    let cloudinit = eventually("cloud-init Secret", T, || async {
        secrets
            .get_opt("linux-cloudinit")
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "missing".to_string())
    })
    .await;
    let ud = String::from_utf8(cloudinit.data.unwrap()["userdata"].0.clone()).unwrap();
    assert!(ud.starts_with("#cloud-config"), "{ud}");
    assert!(
        ud.contains(TEST_RUNNER_TOKEN),
        "the runner token reaches the VMs"
    );
    assert!(
        !ud.contains(TEST_API_TOKEN),
        "the API token never reaches the VMs"
    );
    let vmp = eventually("VirtualMachinePool", T, || async {
        env.vmpools()
            .get_opt(POOL)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "missing".to_string())
    })
    .await;
    let spec = &vmp.data["spec"];
    assert_eq!(spec["scaleInStrategy"], json!({"unmanaged": {}}));
    assert_eq!(spec["updateStrategy"], json!({"opportunistic": {}}));
    assert_eq!(
        spec["virtualMachineTemplate"]["spec"]["runStrategy"],
        "RerunOnFailure"
    );
    let vols = spec["virtualMachineTemplate"]["spec"]["template"]["spec"]["volumes"].to_string();
    assert!(vols.contains("linux-cloudinit"), "{vols}");
    assert!(
        !serde_json::to_string(&vmp)
            .unwrap()
            .contains(TEST_RUNNER_TOKEN)
    );
    assert_eq!(
        vmp.owner_references()[0].uid,
        env.pools().get(POOL).await.unwrap().uid().unwrap()
    );

    // Warm to min, Ready.
    eventually("one ready VM", T, || async {
        let p = env.pools().get(POOL).await.map_err(|e| e.to_string())?;
        let s = p.status.clone().unwrap_or_default();
        let vms = env
            .vms()
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let st: Vec<_> = vms
            .items
            .iter()
            .map(|v| v.data["status"]["printableStatus"].clone())
            .collect();
        let vmis: Api<kube::api::DynamicObject> = Api::namespaced_with(
            env.client.clone(),
            NS,
            &rp_testenv::kubevirt::vmi_resource(),
        );
        let vmis = vmis
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let st: Vec<_> = st
            .into_iter()
            .chain(vmis.items.iter().map(|v| v.data["status"].clone()))
            .collect();
        (s.ready_replicas == Some(1))
            .then_some(())
            .ok_or(format!("{:?} vms {st:?}", s.ready_replicas))
    })
    .await;
    ready_pool(&env).await;

    // A burst of 4 tasks of 2 simulated minutes (2 s wall).
    for _ in 0..4 {
        env.circleci
            .enqueue(TEST_RESOURCE_CLASS, Duration::from_secs(120));
    }
    eventually("replicas follow unclaimed + running", T, || async {
        match env.replicas(POOL).await {
            Some(r) if r >= 4 => Ok(()),
            r => Err(format!("{r:?}")),
        }
    })
    .await;
    let ledger = eventually("every task finished", Duration::from_secs(120), || async {
        let l = env.circleci.ledger();
        let done = l.iter().filter(|t| t.finished_at.is_some()).count();
        (done == 4 && l.iter().all(|t| t.finished_at.is_some() || t.killed))
            .then_some(l.clone())
            .ok_or(format!("{done} done of {}", l.len()))
    })
    .await;
    assert!(
        ledger.iter().all(|t| !t.killed),
        "no task was killed: {ledger:?}"
    );
    // Back to min: finished VMs were deleted, one warm VM remains.
    eventually("pool back to min", T, || async {
        let vms = env.vm_states().await;
        let r = env.replicas(POOL).await;
        (vms.len() == 1 && r == Some(1))
            .then_some(())
            .ok_or(format!("{vms:?} replicas {r:?}"))
    })
    .await;

    // Logs: one record per poll as the reference words it.
    let recs = op.records();
    let poll = recs
        .iter()
        .find(|r| r["loop_name"] == "scaler" && r["desired_vms"].as_u64() >= Some(4))
        .unwrap_or_else(|| panic!("a scaler record with desired_vms >= 4 in {}", op.logs()));
    assert_eq!(poll["pool"], POOL);
    assert_eq!(poll["namespace"], NS);
    assert!(poll["unclaimed_tasks"].is_u64() && poll["running_tasks"].is_u64());
    let events = env.events_text().await;
    assert!(events.contains("Scaled"), "{events}");

    // No token in logs, events or status.
    let status = serde_json::to_string(&env.pools().get(POOL).await.unwrap().status).unwrap();
    for (where_, text) in [("logs", op.logs()), ("events", events), ("status", status)] {
        assert_no_secret(where_, &text, &[TEST_API_TOKEN, TEST_RUNNER_TOKEN]);
    }
    assert!(op.exited().is_none(), "the operator is still running");
}

async fn cond_is(env: &Env, pool: &str, t: &str, status: &str) -> (String, String) {
    eventually(&format!("{pool} {t}={status}"), T, || async {
        let p = env.pools().get(pool).await.map_err(|e| e.to_string())?;
        let c = p
            .status
            .as_ref()
            .and_then(|s| s.condition(t))
            .ok_or("no condition".to_string())?;
        (c.status == status)
            .then(|| (c.reason.clone(), c.message.clone()))
            .ok_or(format!("{c:?}"))
    })
    .await
}

/// CircleCI requests of `class` made during `window`.
async fn requests_during(env: &Env, class: &str, window: Duration) -> u64 {
    let n = |env: &Env| {
        env.circleci
            .requests()
            .by_class
            .get(class)
            .copied()
            .unwrap_or(0)
    };
    let before = n(env);
    tokio::time::sleep(window).await;
    n(env) - before
}

#[tokio::test]
async fn circleci_trouble_holds_the_pool_degrades_recovers_and_spares_other_pools() {
    const OTHER: &str = "sim-org/other";
    let env = env().await;
    env.circleci
        .add_resource_class(OTHER, "sim-other-runner-token");
    env.put_secret("other-runner", "sim-other-runner-token")
        .await;
    let _op = env.operator("op-a", &["--leader-election", "false"]);
    env.apply_pool(pool_manifest(POOL, &env.circleci.base_url(), 1, 6))
        .await;
    let mut other = pool_manifest("other", &env.circleci.base_url(), 0, 4);
    other["spec"]["resourceClass"] = json!(OTHER);
    other["spec"]["circleci"]["runnerTokenSecretRef"]["name"] = json!("other-runner");
    env.apply_pool(other).await;
    ready_pool(&env).await;

    // Three long tasks keep three VMs busy through the faults.
    for _ in 0..3 {
        env.circleci
            .enqueue(TEST_RESOURCE_CLASS, Duration::from_secs(3600));
    }
    eventually("3 tasks running", T, || async {
        let (u, r) = env.circleci.counts(TEST_RESOURCE_CLASS);
        (r == 3)
            .then_some(())
            .ok_or(format!("unclaimed {u} running {r}"))
    })
    .await;
    let held = env.replicas(POOL).await.expect("replicas");
    assert!(held >= 3, "{held}");

    let faults = [
        (
            "outage",
            Fault::outage(OutageMode::Reset),
            "CircleCIUnavailable",
        ),
        ("5xx", Fault::server_error(503), "CircleCIUnavailable"),
        ("malformed", Fault::malformed(), "CircleCIUnavailable"),
        ("429", Fault::rate_limited(3), "RateLimited"),
    ];
    for (what, fault, reason) in faults {
        env.circleci
            .inject_fault(fault.for_class(TEST_RESOURCE_CLASS))
            .expect("fault");
        let (r, msg) = cond_is(&env, POOL, CONDITION_DEGRADED, "True").await;
        assert_eq!(r, reason, "{what}: {msg}");
        assert!(!msg.contains(TEST_API_TOKEN), "{what}");
        cond_is(&env, POOL, CONDITION_READY, "False").await;
        // While failing: the pool neither shrinks nor grows, and polls back off.
        let n = requests_during(&env, TEST_RESOURCE_CLASS, Duration::from_secs(6)).await;
        assert!(
            n <= 10,
            "{what}: {n} requests in 6 s of backoff (1 s polls, 2 calls each)"
        );
        assert_eq!(
            env.replicas(POOL).await,
            Some(held),
            "{what}: replicas held"
        );
        // The other pool keeps polling (2 calls per second).
        let m = requests_during(&env, OTHER, Duration::from_secs(3)).await;
        assert!(
            m >= 4,
            "{what}: the other pool was disturbed ({m} requests in 3 s)"
        );
        env.circleci.clear_faults();
        cond_is(&env, POOL, CONDITION_DEGRADED, "False").await;
        cond_is(&env, POOL, CONDITION_READY, "True").await;
    }
    let events = env.events_text().await;
    assert!(
        events.contains("CircleCIUnavailable") && events.contains("CircleCIRecovered"),
        "{events}"
    );
    assert!(env.circleci.ledger().iter().all(|t| !t.killed));
}

#[tokio::test]
async fn missing_secrets_and_invalid_specs_show_in_status_and_rotation_needs_no_restart() {
    let env = env().await;
    let op = env.operator("op-a", &["--leader-election", "false"]);
    let mut m = pool_manifest(POOL, &env.circleci.base_url(), 1, 3);
    m["spec"]["circleci"]["runnerTokenSecretRef"]["name"] = json!("late-runner");
    env.apply_pool(m).await;
    let (reason, msg) = cond_is(&env, POOL, CONDITION_STALLED, "True").await;
    assert_eq!(reason, "SecretNotFound");
    assert!(
        msg.contains("late-runner") && msg.contains("runnerTokenSecretRef"),
        "{msg}"
    );
    cond_is(&env, POOL, CONDITION_READY, "False").await;
    assert!(
        env.vmpools().get_opt(POOL).await.unwrap().is_none(),
        "no pool without its token"
    );
    eventually("SecretNotFound event", T, || async {
        let e = env.events_text().await;
        e.contains("SecretNotFound").then_some(()).ok_or(e)
    })
    .await;

    // The Secret appears: the pool comes up without a restart.
    env.put_secret("late-runner", TEST_RUNNER_TOKEN).await;
    cond_is(&env, POOL, CONDITION_STALLED, "False").await;
    ready_pool(&env).await;

    // Rotating the runner token rewrites the VMs' cloud-init.
    env.put_secret("late-runner", "rotated-runner-token").await;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), NS);
    eventually("rotated token in the cloud-init Secret", T, || async {
        let s = secrets
            .get("linux-cloudinit")
            .await
            .map_err(|e| e.to_string())?;
        let ud = String::from_utf8(s.data.unwrap()["userdata"].0.clone()).unwrap();
        ud.contains("rotated-runner-token")
            .then_some(())
            .ok_or("old token".to_string())
    })
    .await;

    // A wrong API token: Degraded (401), then fixed by rotation.
    env.put_secret(API_SECRET, "wrong-token").await;
    let (_, msg) = cond_is(&env, POOL, CONDITION_DEGRADED, "True").await;
    assert!(msg.contains("401"), "{msg}");
    env.put_secret(API_SECRET, TEST_API_TOKEN).await;
    cond_is(&env, POOL, CONDITION_DEGRADED, "False").await;

    // A spec the schema lets through but the operator refuses.
    let mut bad = pool_manifest("bad", &env.circleci.base_url(), 0, 2);
    bad["spec"]["template"] =
        json!({"spec": {"volumes": [{"name": "rp-cloudinit", "emptyDir": {}}]}});
    env.apply_pool(bad).await;
    let (reason, msg) = cond_is(&env, "bad", CONDITION_STALLED, "True").await;
    assert_eq!(reason, "InvalidSpec", "{msg}");
    assert!(msg.contains("rp-cloudinit"), "{msg}");
    ready_pool(&env).await;
    for t in [
        "wrong-token",
        "rotated-runner-token",
        TEST_API_TOKEN,
        TEST_RUNNER_TOKEN,
    ] {
        assert!(!op.logs().contains(t), "a token in the logs");
        assert!(!env.events_text().await.contains(t), "a token in events");
    }
}

#[tokio::test]
async fn deleting_a_pool_drains_running_jobs_and_leaves_nothing_behind() {
    let env = env().await;
    let _op = env.operator("op-a", &["--leader-election", "false"]);
    env.apply_pool(pool_manifest(POOL, &env.circleci.base_url(), 2, 4))
        .await;
    ready_pool(&env).await;
    eventually("two VMs", T, || async {
        let v = env.vm_states().await;
        (v.iter().filter(|(_, s)| s == "Running").count() == 2)
            .then_some(())
            .ok_or(format!("{v:?}"))
    })
    .await;
    // A 5-minute (simulated) job is running when the pool is deleted.
    env.circleci
        .enqueue(TEST_RESOURCE_CLASS, Duration::from_secs(300));
    eventually("job claimed", T, || async {
        let (_, r) = env.circleci.counts(TEST_RESOURCE_CLASS);
        (r == 1).then_some(()).ok_or(format!("running {r}"))
    })
    .await;
    env.pools()
        .delete(POOL, &DeleteParams::default())
        .await
        .expect("delete");
    // Draining: the RunnerPool waits, no VM is added, the job is not killed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = env
        .pools()
        .get(POOL)
        .await
        .expect("still there while draining");
    assert!(p.metadata.deletion_timestamp.is_some());
    let (reason, msg) = cond_is(&env, POOL, CONDITION_READY, "False").await;
    assert_eq!(reason, "Draining", "{msg}");
    assert!(env.vm_states().await.len() <= 2);
    eventually("everything gone", Duration::from_secs(90), || async {
        let pool = env.pools().get_opt(POOL).await.map_err(|e| e.to_string())?;
        let vmp = env
            .vmpools()
            .get_opt(POOL)
            .await
            .map_err(|e| e.to_string())?;
        let vms = env.vm_states().await;
        let secrets: Api<Secret> = Api::namespaced(env.client.clone(), NS);
        let ci = secrets
            .get_opt("linux-cloudinit")
            .await
            .map_err(|e| e.to_string())?;
        (pool.is_none() && vmp.is_none() && vms.is_empty() && ci.is_none())
            .then_some(())
            .ok_or(format!(
                "pool {} vmp {} vms {vms:?} secret {}",
                pool.is_some(),
                vmp.is_some(),
                ci.is_some()
            ))
    })
    .await;
    let ledger = env.circleci.ledger();
    assert_eq!(ledger.len(), 1);
    assert!(
        ledger[0].finished_at.is_some() && !ledger[0].killed,
        "{ledger:?}"
    );
}

async fn lease_holder(env: &Env) -> Option<String> {
    let api: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), NS);
    api.get_opt("runner-provisioner")
        .await
        .ok()??
        .spec?
        .holder_identity
}

#[tokio::test]
async fn two_operators_elect_one_leader_and_the_standby_takes_over() {
    let env = env().await;
    let fast = [
        "--lease-duration",
        "4s",
        "--renew-deadline",
        "3s",
        "--retry-period",
        "500ms",
    ];
    let mut a = env.operator("op-a", &fast);
    let mut b = env.operator("op-b", &fast);
    env.apply_pool(pool_manifest(POOL, &env.circleci.base_url(), 1, 5))
        .await;
    ready_pool(&env).await;
    let leader = eventually("a leader", T, || async {
        lease_holder(&env).await.ok_or("no holder".to_string())
    })
    .await;
    let (leader_op, standby_op) = if leader == "op-a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let polls = |op: &Operator| {
        op.records()
            .iter()
            .filter(|r| r["loop_name"] == "scaler")
            .count()
    };
    assert!(polls(leader_op) > 0, "the leader scales");
    assert_eq!(
        polls(standby_op),
        0,
        "the standby does nothing: {}",
        standby_op.logs()
    );

    leader_op.kill();
    // 10-minute (simulated; 10 s wall) jobs: demand stays at 3 however long
    // the takeover takes.
    for _ in 0..3 {
        env.circleci
            .enqueue(TEST_RESOURCE_CLASS, Duration::from_secs(600));
    }
    let new_leader = eventually("the standby takes over", T, || async {
        match lease_holder(&env).await {
            Some(h) if h != leader => Ok(h),
            h => Err(format!("{h:?}")),
        }
    })
    .await;
    assert_ne!(new_leader, leader);
    eventually("scaling continues", T, || async {
        match env.replicas(POOL).await {
            Some(r) if r >= 3 => Ok(()),
            r => Err(format!("{r:?}")),
        }
    })
    .await;
    eventually("all tasks done", Duration::from_secs(90), || async {
        let l = env.circleci.ledger();
        (l.iter().filter(|t| t.finished_at.is_some()).count() == 3)
            .then_some(())
            .ok_or(format!("{l:?}"))
    })
    .await;
    assert!(env.circleci.ledger().iter().all(|t| !t.killed));
    assert!(polls(standby_op) > 0);
    // Graceful stop releases the Lease at once.
    assert!(standby_op.terminate().is_some_and(|s| s.success()));
    eventually("lease released", T, || async {
        match lease_holder(&env).await {
            None => Ok(()),
            h => Err(format!("{h:?}")),
        }
    })
    .await;
}

fn addr_from_logs(op: &Operator, field: &str) -> String {
    op.records()
        .iter()
        .find_map(|r| r[field].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no {field} in {}", op.logs()))
}

async fn http_get(url: &str) -> (u16, String) {
    let r = reqwest::get(url).await.expect("GET");
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

#[tokio::test]
async fn steady_state_writes_nothing_and_probes_and_metrics_are_served() {
    let env = env().await;
    let op = env.operator("op-a", &["--leader-election", "false"]);
    let mut m = pool_manifest("steady", &env.circleci.base_url(), 1, 3);
    m["spec"]["scaling"]["idleTimeout"] = json!("0s");
    env.apply_pool(m).await;
    cond_is(&env, "steady", CONDITION_READY, "True").await;
    eventually("one ready VM", T, || async {
        let p = env.pools().get("steady").await.map_err(|e| e.to_string())?;
        let r = p.status.and_then(|s| s.ready_replicas);
        (r == Some(1)).then_some(()).ok_or(format!("{r:?}"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), NS);
    let snapshot = || async {
        (
            env.pools().get("steady").await.unwrap().resource_version(),
            env.vmpools()
                .get("steady")
                .await
                .unwrap()
                .metadata
                .generation,
            secrets
                .get("steady-cloudinit")
                .await
                .unwrap()
                .resource_version(),
        )
    };
    let before = snapshot().await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        snapshot().await,
        before,
        "an unchanged pool is not rewritten"
    );

    let ready = addr_from_logs(&op, "ready");
    let live = addr_from_logs(&op, "live");
    assert_eq!(http_get(&format!("http://{ready}/ready")).await.0, 200);
    assert_eq!(http_get(&format!("http://{live}/live")).await.0, 200);
    let (code, text) = http_get(&format!("http://{ready}/metrics")).await;
    assert_eq!(code, 200);
    for needle in [
        r#"runner_provisioner_desired_replicas{namespace="ci-runners",pool="steady"} 1"#,
        r#"runner_provisioner_ready_replicas{namespace="ci-runners",pool="steady"} 1"#,
        r#"runner_provisioner_polls_total{namespace="ci-runners",pool="steady"}"#,
        "runner_provisioner_circleci_request_duration_seconds_bucket",
        "runner_provisioner_reconcile_duration_seconds_count",
        "runner_provisioner_leader 1",
    ] {
        assert!(text.contains(needle), "{needle} missing in\n{text}");
    }
}

#[tokio::test]
async fn startup_fails_fast_when_the_crd_or_kubevirt_is_missing() {
    rp_testenv::init_crypto();
    let run = |cp: &rp_testenv::ControlPlane| {
        std::process::Command::new(env!("CARGO_BIN_EXE_runner-provisioner"))
            .args([
                "run",
                "--ready-addr",
                "127.0.0.1:0",
                "--live-addr",
                "127.0.0.1:0",
            ])
            .env("KUBECONFIG", cp.kubeconfig())
            .output()
            .expect("runs")
    };
    let cp = rp_testenv::ControlPlane::start(Default::default())
        .await
        .expect("control plane");
    let out = run(&cp);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kubectl apply -f crds/runnerpool.yaml"),
        "{err}"
    );
    drop(cp);
    let cp = rp_testenv::ControlPlane::start(rp_testenv::ControlPlaneOptions {
        crds: vec![runner_provisioner::crd::crd_yaml()],
    })
    .await
    .expect("control plane");
    let out = run(&cp);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("KubeVirt") && err.contains("1.7"), "{err}");
}
