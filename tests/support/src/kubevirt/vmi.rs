//! VirtualMachineInstances: what virt-controller's VMI controller, the
//! virt-launcher pod and virt-handler do between a VMI's creation and its
//! end, with the guest played by a [`GuestRuntime`](crate::guest::GuestRuntime).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use base64::Engine as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::util::{self, controller_of, deleting, is_final, phase};
use super::{Ctx, DEPRECATED_VMI_FINALIZER, Result, Run, VM_CONTROLLER_FINALIZER, VMI_FINALIZER};
use crate::guest::{GuestBoot, PowerOff};

/// A watch event for a VMI: reconcile it (or forget it when gone) and its VM.
pub(crate) fn on_event(ctx: &Ctx, o: &DynamicObject, gone: bool) {
    let (ns, name) = (util::ns(o), util::name(o));
    if gone {
        let uid = util::uid(o);
        ctx.vanish_run(&uid);
        ctx.state().runs.remove(&uid);
    } else {
        ctx.enqueue_vmi(&ns, &name);
    }
    if let Some(owner) = controller_of(o)
        && owner.kind == "VirtualMachine"
    {
        ctx.enqueue_vm(&ns, &owner.name);
    }
}

/// The VMI watch relisted: runs whose VMI is no longer there ended unseen.
pub(crate) fn on_relisted(ctx: &Ctx) {
    let live: HashSet<String> = ctx.vmis.state().iter().map(|o| util::uid(o)).collect();
    let gone: Vec<String> = ctx
        .state()
        .runs
        .keys()
        .filter(|u| !live.contains(*u))
        .cloned()
        .collect();
    for uid in gone {
        ctx.vanish_run(&uid);
        if let Some(run) = ctx.state().runs.remove(&uid) {
            ctx.enqueue_vm(&run.namespace, &run.vm_name);
        }
    }
}

/// A guest powered itself off.
pub(crate) fn on_power_off(ctx: &Ctx, uid: &str) {
    let target = {
        let mut guard = ctx.state();
        let st = &mut *guard;
        match st.runs.get_mut(uid) {
            Some(run) if run.booted && !run.powered_off && !run.vanished => {
                run.powered_off = true;
                st.stats.power_offs += 1;
                Some((run.namespace.clone(), run.vm_name.clone()))
            }
            _ => None,
        }
    };
    if let Some((ns, name)) = target {
        tracing::info!(namespace = %ns, vmi = %name, vmi_uid = uid, "guest powered off");
        ctx.enqueue_vmi(&ns, &name);
    }
}

fn rank(phase: &str) -> u8 {
    match phase {
        "Pending" => 1,
        "Scheduling" => 2,
        "Scheduled" => 3,
        "Running" => 4,
        "Succeeded" | "Failed" => 5,
        _ => 0,
    }
}

fn ready_condition(status: &str, reason: &str, message: &str) -> Value {
    json!({
        "type": "Ready",
        "status": status,
        "reason": reason,
        "message": message,
        "lastProbeTime": null,
        "lastTransitionTime": util::now(),
    })
}

/// The status patch that moves a VMI to `phase`.
fn phase_status(ctx: &Ctx, vmi: &DynamicObject, phase: &str, ready: Value) -> Value {
    let status = &vmi.data["status"];
    let mut conditions = status["conditions"].as_array().cloned().unwrap_or_default();
    util::upsert_condition(&mut conditions, ready);
    let mut transitions = status["phaseTransitionTimestamps"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    transitions.push(json!({"phase": phase, "phaseTransitionTimestamp": util::now()}));
    let mut s = json!({
        "phase": phase,
        "conditions": conditions,
        "phaseTransitionTimestamps": transitions,
    });
    if rank(phase) >= 3 && status["nodeName"].is_null() {
        s["nodeName"] = json!(ctx.cfg.node_name);
    }
    if phase == "Running" {
        // A stable pod-network address per VMI, for the IP printer column.
        let h = util::uid(vmi)
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32));
        let ip = format!("10.244.{}.{}", (h >> 8) % 256, (h % 254) + 1);
        s["interfaces"] = json!([{"name": "default", "ipAddress": ip, "ipAddresses": [ip]}]);
        s["guestOSInfo"] = json!({});
    }
    json!({ "status": s })
}

/// Writes a VMI's status. KubeVirt's VMI CRD has no status subresource
/// (virt-controller and virt-handler update the whole object), so this is a
/// merge patch of the object itself, guarded by its resourceVersion as their
/// updates are: a VMI that changed meanwhile is reconciled again.
async fn patch_status(ctx: &Ctx, vmi: &DynamicObject, status: &Value) -> Result<()> {
    let mut patch = status.clone();
    patch["metadata"] = json!({"resourceVersion": vmi.metadata.resource_version});
    let name = util::name(vmi);
    match ctx
        .vmi_api(&util::ns(vmi))
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if util::is_not_found(&e) => Ok(()),
        Err(e) => Err(anyhow::Error::from(e)
            .context(format!("updating status of VMI {name}"))
            .into()),
    }
}

/// What virt-launcher finds for a VMI's cloud-init disk when its pod starts.
enum CloudInit {
    /// The user-data (`None`: the VMI has no cloud-init user-data).
    Ready(Option<String>),
    /// A referenced Secret does not exist: the pod cannot start (its volume
    /// cannot be mounted), the VMI stays `Scheduling`.
    SecretMissing(String),
    /// The Secret has no (or an empty) `userdata`/`userData` key and the
    /// volume has no network data either: virt-launcher cannot build the disk
    /// ("UserData or NetworkData is required for cloud-init data source"),
    /// the VMI stays `Scheduled` and never runs.
    NoData(String),
}

/// The cloud-init user-data of a VMI, as virt-launcher builds the NoCloud
/// (or ConfigDrive) disk when its pod starts.
async fn resolve_user_data(ctx: &Ctx, vmi: &DynamicObject) -> anyhow::Result<CloudInit> {
    let ns = util::ns(vmi);
    for vol in vmi.data["spec"]["volumes"].as_array().into_iter().flatten() {
        for src in ["cloudInitNoCloud", "cloudInitConfigDrive"] {
            let ci = &vol[src];
            if !ci.is_object() {
                continue;
            }
            if let Some(s) = ci["userData"].as_str() {
                return Ok(CloudInit::Ready(Some(s.to_string())));
            }
            if let Some(b64) = ci["userDataBase64"].as_str() {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .context("decoding userDataBase64")?;
                return Ok(CloudInit::Ready(Some(
                    String::from_utf8_lossy(&bytes).into_owned(),
                )));
            }
            if let Some(secret) = ci["secretRef"]["name"].as_str() {
                let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
                let Some(s) = api.get_opt(secret).await? else {
                    return Ok(CloudInit::SecretMissing(secret.to_string()));
                };
                // pkg/cloud-init: `userdata`, else `userData`; then an empty
                // user-data without network data fails GenerateLocalData.
                let data = s.data.unwrap_or_default();
                let value = data
                    .get("userdata")
                    .or_else(|| data.get("userData"))
                    .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                    .filter(|v| !v.is_empty());
                let network = ci["networkDataSecretRef"].is_object()
                    || ci["networkData"].is_string()
                    || ci["networkDataBase64"].is_string();
                if value.is_none() && !network {
                    return Ok(CloudInit::NoData(secret.to_string()));
                }
                return Ok(CloudInit::Ready(value));
            }
        }
    }
    Ok(CloudInit::Ready(None))
}

/// Records a cloud-init problem of a run; true when it is new (log it then).
fn note_problem(ctx: &Ctx, uid: &str, problem: Option<String>) -> bool {
    let mut st = ctx.state();
    let Some(run) = st.runs.get_mut(uid) else {
        return false;
    };
    let new = problem.is_some() && run.cloud_init_problem != problem;
    run.cloud_init_problem = problem;
    new
}

pub(crate) async fn reconcile(vmi: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action> {
    let (ns, name, uid) = (util::ns(&vmi), util::name(&vmi), util::uid(&vmi));
    let api = ctx.vmi_api(&ns);
    let now = Instant::now();
    let (first_seen, boot, booted, powered_off, user_data) = {
        let mut guard = ctx.state();
        let st = &mut *guard;
        let rng = &mut st.rng;
        let run = st.runs.entry(uid.clone()).or_insert_with(|| Run {
            namespace: ns.clone(),
            vm_name: name.clone(),
            first_seen: now,
            boot: ctx.cfg.time_scale.wall(ctx.cfg.boot_latency.sample(rng)),
            user_data: None,
            cloud_init_problem: None,
            booted: false,
            powered_off: false,
            vanished: false,
            stop_at: None,
        });
        (
            run.first_seen,
            run.boot,
            run.booted,
            run.powered_off,
            run.user_data.clone(),
        )
    };
    let cur = phase(&vmi).to_string();

    if deleting(&vmi) {
        if !is_final(&vmi) {
            // virt-handler shuts the domain down: whatever the guest ran is lost.
            ctx.vanish_run(&uid);
            let stop_at = {
                let mut st = ctx.state();
                let wall = ctx.wall(ctx.cfg.stop_latency);
                *st.runs
                    .get_mut(&uid)
                    .expect("run exists")
                    .stop_at
                    .get_or_insert(now + wall)
            };
            if now < stop_at {
                return Ok(Action::requeue(stop_at - now));
            }
            // ACPI shutdown of a running guest ends as Succeeded; a VMI that
            // never ran is Failed.
            let final_phase = if cur == "Running" {
                "Succeeded"
            } else {
                "Failed"
            };
            let ready = ready_condition(
                "False",
                "PodTerminating",
                "virt-launcher pod is terminating",
            );
            patch_status(&ctx, &vmi, &phase_status(&ctx, &vmi, final_phase, ready)).await?;
            return Ok(Action::await_change());
        }
        // Final and being deleted: the pod is gone, finalizers go.
        let mut remove = vec![VMI_FINALIZER, DEPRECATED_VMI_FINALIZER];
        if !has_owner_vm(&ctx, &vmi) {
            remove.push(VM_CONTROLLER_FINALIZER);
        }
        util::remove_finalizers(&api, &vmi, &remove).await?;
        return Ok(Action::await_change());
    }

    if is_final(&vmi) {
        // The pod is gone: the VMI controller's finalizer goes; the VMI stays.
        util::remove_finalizers(&api, &vmi, &[VMI_FINALIZER, DEPRECATED_VMI_FINALIZER]).await?;
        return Ok(Action::await_change());
    }

    if powered_off {
        let ready = ready_condition(
            "False",
            "PodTerminating",
            "virt-launcher pod is terminating",
        );
        patch_status(&ctx, &vmi, &phase_status(&ctx, &vmi, "Succeeded", ready)).await?;
        return Ok(Action::await_change());
    }

    // Boot progression.
    let elapsed = now - first_seen;
    let at = |f: f64| boot.mul_f64(f);
    let mut target = if elapsed >= boot {
        "Running"
    } else if elapsed >= at(0.5) {
        "Scheduled"
    } else if elapsed >= at(0.1) {
        "Scheduling"
    } else {
        "Pending"
    };
    let mut retry: Option<Duration> = None;
    let mut user_data = user_data;
    // The virt-launcher pod starts: cloud-init secrets are read now (and
    // again until they are usable). A VMI found Running (the simulator
    // restarted) is booted with whatever there is.
    if rank(target) >= 3 && user_data.is_none() && cur != "Running" {
        // Polled like kubelet retries a volume mount: not faster than 100 ms.
        let poll = ctx
            .wall(Duration::from_secs(2))
            .max(Duration::from_millis(100));
        match resolve_user_data(&ctx, &vmi).await? {
            CloudInit::Ready(ud) => {
                note_problem(&ctx, &uid, None);
                if let Some(run) = ctx.state().runs.get_mut(&uid) {
                    run.user_data = Some(ud.clone());
                }
                user_data = Some(ud);
            }
            CloudInit::SecretMissing(secret) => {
                if note_problem(&ctx, &uid, Some(format!("secret {secret} missing"))) {
                    tracing::warn!(namespace = %ns, vmi = %name, secret, "cloud-init secret not found: the pod cannot start");
                }
                target = if rank(&cur) >= 2 {
                    cur.as_str()
                } else {
                    "Scheduling"
                };
                retry = Some(poll);
            }
            CloudInit::NoData(secret) => {
                if note_problem(&ctx, &uid, Some(format!("secret {secret} without data"))) {
                    tracing::warn!(
                        namespace = %ns, vmi = %name, secret,
                        "cloud-init secret has no userdata/userData key (or it is empty) and there is no \
                         network data: virt-launcher cannot build the cloud-init disk, the VMI does not start"
                    );
                }
                target = "Scheduled";
                retry = Some(poll);
            }
        }
    }
    if rank(target) > rank(&cur) {
        let ready = match target {
            "Running" => json!({
                "type": "Ready", "status": "True", "reason": null, "message": null,
                "lastProbeTime": null, "lastTransitionTime": util::now(),
            }),
            "Pending" => ready_condition(
                "False",
                "PodNotExists",
                "virt-launcher pod has not yet been scheduled",
            ),
            _ => ready_condition(
                "False",
                "GuestNotRunning",
                "Guest VM is not reported as running",
            ),
        };
        patch_status(&ctx, &vmi, &phase_status(&ctx, &vmi, target, ready)).await?;
    }
    if (target == "Running" || cur == "Running") && !booted {
        let user_data = match user_data {
            Some(ud) => ud,
            // Running before we saw it start (the simulator was restarted).
            None => match resolve_user_data(&ctx, &vmi).await? {
                CloudInit::Ready(ud) => ud,
                CloudInit::SecretMissing(_) | CloudInit::NoData(_) => None,
            },
        };
        let first = {
            let mut guard = ctx.state();
            let st = &mut *guard;
            match st.runs.get_mut(&uid) {
                Some(run) if !run.booted && !run.vanished => {
                    run.booted = true;
                    st.stats.boots += 1;
                    true
                }
                _ => false,
            }
        };
        if first {
            tracing::info!(namespace = %ns, vmi = %name, vmi_uid = %uid, "VMI running: booting guest");
            let tx = ctx.power_off_tx.clone();
            let power_uid = uid.clone();
            ctx.guest.boot(
                GuestBoot {
                    namespace: ns.clone(),
                    vm_name: name.clone(),
                    vmi_uid: uid.clone(),
                    user_data,
                },
                PowerOff::new(move || {
                    let _ = tx.unbounded_send(power_uid);
                }),
            );
        }
        return Ok(Action::await_change());
    }
    let next = if let Some(r) = retry {
        Some(r)
    } else {
        [at(0.1), at(0.5), boot]
            .into_iter()
            .find(|t| *t > elapsed)
            .map(|t| t - elapsed)
    };
    Ok(next
        .map(|d| Action::requeue(d.max(Duration::from_millis(1))))
        .unwrap_or_else(Action::await_change))
}

fn has_owner_vm(ctx: &Ctx, vmi: &DynamicObject) -> bool {
    match controller_of(vmi) {
        Some(r) if r.kind == "VirtualMachine" => ctx
            .get_vm(&util::ns(vmi), &r.name)
            .is_some_and(|vm| util::uid(&vm) == r.uid),
        _ => false,
    }
}
