//! VirtualMachines: virt-controller's VM controller (`pkg/virt-controller/
//! watch/vm/vm.go` at v1.8.4): `sync`, `syncRunStrategy`, `updateStatus`.

use std::sync::Arc;

use anyhow::Context as _;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::util::{self, deleting, is_final, phase};
use super::{Ctx, Result, VM_CONTROLLER_FINALIZER, VM_GENERATION_ANNOTATION, VMI_FINALIZER};

/// `spec.runStrategy` (or `spec.running`) of a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStrategy {
    Always,
    RerunOnFailure,
    Once,
    Manual,
    Halted,
    WaitAsReceiver,
}

impl RunStrategy {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStrategy::Always => "Always",
            RunStrategy::RerunOnFailure => "RerunOnFailure",
            RunStrategy::Once => "Once",
            RunStrategy::Manual => "Manual",
            RunStrategy::Halted => "Halted",
            RunStrategy::WaitAsReceiver => "WaitAsReceiver",
        }
    }
}

/// KubeVirt's `VirtualMachine.RunStrategy()`: `running` and `runStrategy` are
/// exclusive; neither means Halted.
pub(crate) fn run_strategy(vm: &DynamicObject) -> Result<RunStrategy, String> {
    let spec = &vm.data["spec"];
    let running = spec["running"].as_bool();
    let rs = spec["runStrategy"].as_str();
    match (running, rs) {
        (Some(_), Some(_)) => Err("running and runstrategy are mutually exclusive".into()),
        (Some(true), None) => Ok(RunStrategy::Always),
        (Some(false), None) | (None, None) => Ok(RunStrategy::Halted),
        (None, Some(s)) => match s {
            "Always" => Ok(RunStrategy::Always),
            "RerunOnFailure" => Ok(RunStrategy::RerunOnFailure),
            "Once" => Ok(RunStrategy::Once),
            "Manual" => Ok(RunStrategy::Manual),
            "Halted" => Ok(RunStrategy::Halted),
            "WaitAsReceiver" => Ok(RunStrategy::WaitAsReceiver),
            other => Err(format!("unknown runstrategy: {other}")),
        },
    }
}

fn first_request(vm: &DynamicObject) -> Option<Value> {
    util::state_change_requests(vm).into_iter().next()
}

fn has_start_request(vm: &DynamicObject) -> bool {
    first_request(vm).is_some_and(|r| r["action"] == "Start")
}

fn has_stop_request_for(vm: &DynamicObject, vmi: &DynamicObject) -> bool {
    first_request(vm).is_some_and(|r| {
        r["action"] == "Stop" && r["uid"].as_str() == Some(util::uid(vmi).as_str())
    })
}

/// What one pass did, for printableStatus (KubeVirt's expectations).
#[derive(Default)]
struct Pass {
    start_expected: bool,
    stop_expected: bool,
    provisioning: bool,
    start_request_added: bool,
}

pub(crate) async fn reconcile(vm: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action> {
    let (ns, name) = (util::ns(&vm), util::name(&vm));
    let api = ctx.vm_api(&ns);
    let vm_uid = util::uid(&vm);
    // The VMI with the VM's name, if this VM controls it (or nobody does).
    let vmi = ctx
        .get_vmi(&ns, &name)
        .filter(|vmi| match util::controller_of(vmi) {
            Some(r) => r.uid == vm_uid,
            None => true,
        });
    let mut pass = Pass::default();
    let mut requeue = None;

    if deleting(&vm) {
        match &vmi {
            None => {
                util::remove_finalizers(&api, &vm, &[VM_CONTROLLER_FINALIZER]).await?;
            }
            Some(vmi) => stop_vmi(&ctx, vmi, &mut pass).await?,
        }
        update_status(&ctx, &vm, vmi.as_deref(), &pass).await?;
        return Ok(Action::await_change());
    }
    util::add_finalizer(&api, &vm, VM_CONTROLLER_FINALIZER).await?;

    let strategy = match run_strategy(&vm) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(namespace = %ns, vm = %name, "{e}");
            return Ok(Action::await_change());
        }
    };

    // DataVolumes are not simulated beyond a provisioning delay.
    let has_dvs = vm.data["spec"]["dataVolumeTemplates"]
        .as_array()
        .is_some_and(|a| !a.is_empty());
    if has_dvs && strategy != RunStrategy::Halted {
        let now = Instant::now();
        let ready_at = *ctx
            .state()
            .provisioning
            .entry(vm_uid.clone())
            .or_insert_with(|| now + ctx.wall(ctx.cfg.provisioning_latency));
        if now < ready_at {
            pass.provisioning = true;
            update_status(&ctx, &vm, vmi.as_deref(), &pass).await?;
            return Ok(Action::requeue(ready_at - now));
        }
    }

    match strategy {
        RunStrategy::Always => match &vmi {
            Some(vmi) => {
                if has_stop_request_for(&vm, vmi) || is_final(vmi) {
                    stop_vmi(&ctx, vmi, &mut pass).await?;
                }
            }
            None => start_vmi(&ctx, &vm, &mut pass, &mut requeue).await?,
        },
        RunStrategy::RerunOnFailure => match &vmi {
            Some(vmi) => {
                let failed = phase(vmi) == "Failed";
                if !deleting(vmi)
                    && (has_stop_request_for(&vm, vmi) || failed || phase(vmi) == "Succeeded")
                {
                    stop_vmi(&ctx, vmi, &mut pass).await?;
                    if failed {
                        add_start_request(&ctx, &vm).await?;
                        pass.start_request_added = true;
                    }
                }
            }
            None => {
                // Started once already (status.runStrategy recorded): only a
                // start request starts it again.
                let recorded = vm.data["status"]["runStrategy"].as_str() == Some(strategy.as_str());
                if has_start_request(&vm) || !recorded {
                    start_vmi(&ctx, &vm, &mut pass, &mut requeue).await?;
                }
            }
        },
        RunStrategy::Manual => match &vmi {
            Some(vmi) => {
                if has_stop_request_for(&vm, vmi) {
                    stop_vmi(&ctx, vmi, &mut pass).await?;
                }
            }
            None => {
                if has_start_request(&vm) {
                    start_vmi(&ctx, &vm, &mut pass, &mut requeue).await?;
                }
            }
        },
        RunStrategy::Halted => match &vmi {
            None => {
                if has_start_request(&vm) {
                    let patch = if vm.data["spec"]["runStrategy"].is_string() {
                        json!({"spec": {"runStrategy": "Always"}})
                    } else {
                        json!({"spec": {"running": true}})
                    };
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await?;
                }
            }
            Some(vmi) => stop_vmi(&ctx, vmi, &mut pass).await?,
        },
        RunStrategy::Once => {
            if vmi.is_none() {
                start_vmi(&ctx, &vm, &mut pass, &mut requeue).await?;
            }
        }
        RunStrategy::WaitAsReceiver => {
            tracing::warn!(namespace = %ns, vm = %name, "runStrategy WaitAsReceiver is not simulated");
        }
    }

    update_status(&ctx, &vm, vmi.as_deref(), &pass).await?;
    Ok(requeue
        .map(Action::requeue)
        .unwrap_or_else(Action::await_change))
}

/// `stopVMI`: delete the VMI unless it is already being deleted.
async fn stop_vmi(ctx: &Ctx, vmi: &DynamicObject, pass: &mut Pass) -> Result<()> {
    if deleting(vmi) {
        return Ok(());
    }
    match ctx
        .vmi_api(&util::ns(vmi))
        .delete(&util::name(vmi), &DeleteParams::default())
        .await
    {
        Ok(_) => {}
        Err(e) if util::is_not_found(&e) => {}
        Err(e) => return Err(anyhow::Error::from(e).context("deleting VMI").into()),
    }
    pass.stop_expected = true;
    Ok(())
}

/// `startVMI` (`SetupVMIFromVM`): a VMI named after the VM from its template.
async fn start_vmi(
    ctx: &Ctx,
    vm: &DynamicObject,
    pass: &mut Pass,
    requeue: &mut Option<std::time::Duration>,
) -> Result<()> {
    let (ns, name) = (util::ns(vm), util::name(vm));
    let tmpl = &vm.data["spec"]["template"];
    let mut annotations = tmpl["metadata"]["annotations"].clone();
    if !annotations.is_object() {
        annotations = json!({});
    }
    annotations[VM_GENERATION_ANNOTATION] = json!(vm.metadata.generation.unwrap_or(1).to_string());
    let mut meta = json!({
        "name": name,
        "namespace": ns,
        "annotations": annotations,
        "ownerReferences": [util::controller_ref("kubevirt.io/v1", "VirtualMachine", vm)],
        "finalizers": [VM_CONTROLLER_FINALIZER, VMI_FINALIZER],
    });
    if tmpl["metadata"]["labels"].is_object() {
        meta["labels"] = tmpl["metadata"]["labels"].clone();
    }
    let body = json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": meta,
        "spec": tmpl["spec"],
    });
    let obj: DynamicObject = serde_json::from_value(body).context("building VMI")?;
    match ctx.vmi_api(&ns).create(&PostParams::default(), &obj).await {
        Ok(_) => {
            tracing::info!(namespace = %ns, vm = %name, "starting VMI");
            pass.start_expected = true;
        }
        Err(e) if util::is_conflict(&e) => {
            // The previous VMI of this name is still going away.
            *requeue = Some(std::time::Duration::from_millis(50));
        }
        Err(e) => return Err(anyhow::Error::from(e).context("creating VMI").into()),
    }
    Ok(())
}

async fn add_start_request(ctx: &Ctx, vm: &DynamicObject) -> Result<()> {
    let mut reqs = util::state_change_requests(vm);
    reqs.push(json!({"action": "Start"}));
    ctx.vm_api(&util::ns(vm))
        .patch_status(
            &util::name(vm),
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"stateChangeRequests": reqs}})),
        )
        .await?;
    Ok(())
}

/// `isTrimFirstChangeRequestNeeded`.
fn trim_first_request(vm: &DynamicObject, vmi: Option<&DynamicObject>) -> bool {
    let Some(req) = first_request(vm) else {
        return false;
    };
    match req["action"].as_str() {
        Some("Stop") => match vmi {
            None => true,
            Some(vmi) => req["uid"].as_str() != Some(util::uid(vmi).as_str()),
        },
        Some("Start") => vmi.is_some_and(|v| !deleting(v) && !is_final(v)),
        _ => false,
    }
}

fn printable_status(vm: &DynamicObject, vmi: Option<&DynamicObject>, pass: &Pass) -> &'static str {
    if deleting(vm) {
        return "Terminating";
    }
    if let Some(v) = vmi
        && !is_final(v)
        && (deleting(v) || pass.stop_expected)
    {
        return "Stopping";
    }
    if vmi.is_some_and(|v| phase(v) == "Running") {
        return "Running";
    }
    if pass.provisioning {
        return "Provisioning";
    }
    match vmi {
        None if pass.start_expected => return "Starting",
        Some(v) if matches!(phase(v), "" | "Pending" | "Scheduling" | "Scheduled") => {
            return "Starting";
        }
        _ => {}
    }
    match vmi {
        Some(v) if is_final(v) => "Stopped",
        None if !pass.start_expected => "Stopped",
        _ => "Unknown",
    }
}

/// `updateStatus`: created, ready, runStrategy, stateChangeRequests, the Ready
/// condition, printableStatus; and the VM controller's finalizer on a final VMI.
async fn update_status(
    ctx: &Ctx,
    vm: &DynamicObject,
    vmi: Option<&DynamicObject>,
    pass: &Pass,
) -> Result<()> {
    let old = &vm.data["status"];
    let created = vmi.is_some();
    let ready = vmi.is_some_and(|v| util::condition_true(v, "Ready"));
    let mut status = json!({
        "created": created,
        "ready": ready,
    });
    if let Ok(rs) = run_strategy(vm)
        && (old["runStrategy"].as_str().is_some_and(|s| !s.is_empty()) || created)
    {
        status["runStrategy"] = json!(rs.as_str());
    }
    let mut reqs = util::state_change_requests(vm);
    if pass.start_request_added {
        reqs.push(json!({"action": "Start"}));
    }
    if trim_first_request(vm, vmi) {
        reqs.remove(0);
        status["stateChangeRequests"] = if reqs.is_empty() {
            Value::Null
        } else {
            json!(reqs)
        };
    }
    let mut conditions = old["conditions"].as_array().cloned().unwrap_or_default();
    let ready_cond = match vmi.and_then(|v| util::condition(v, "Ready")) {
        Some(c) => {
            let mut c = c.clone();
            c["type"] = json!("Ready");
            c
        }
        None => {
            let (reason, message) = if vmi.is_none() {
                ("VMINotExists", "VMI does not exist")
            } else {
                ("VMIConditionMissing", "VMI is missing the Ready condition")
            };
            json!({
                "type": "Ready", "status": "False", "reason": reason, "message": message,
                "lastProbeTime": null, "lastTransitionTime": util::now(),
            })
        }
    };
    util::upsert_condition(&mut conditions, ready_cond);
    status["conditions"] = json!(conditions);
    status["printableStatus"] = json!(printable_status(vm, vmi, pass));

    let changed = status.as_object().expect("object").iter().any(|(k, v)| {
        if v.is_null() {
            !old[k].is_null()
        } else {
            &old[k] != v
        }
    });
    if changed {
        util::patch_status(
            &ctx.vm_api(&util::ns(vm)),
            &util::name(vm),
            &json!({ "status": status }),
        )
        .await?;
    }

    // Our finalizer comes off a final VMI once its status is recorded.
    if let Some(v) = vmi
        && is_final(v)
        && util::has_finalizer(v, VM_CONTROLLER_FINALIZER)
    {
        util::remove_finalizers(&ctx.vmi_api(&util::ns(v)), v, &[VM_CONTROLLER_FINALIZER]).await?;
    }
    Ok(())
}
