//! The operator end to end: the real binary against a real control plane and
//! the KubeVirt and CircleCI simulators.

mod operator_common;

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams};
use operator_common::*;
use rp_testenv::circleci::{TEST_API_TOKEN, TEST_RESOURCE_CLASS, TEST_RUNNER_TOKEN};
use runner_provisioner::crd::CONDITION_READY;
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
