//! VirtualMachinePools: virt-controller's pool controller
//! (`pkg/virt-controller/watch/pool/pool.go` at v1.8.4), transcribed:
//! `execute`, `scale`, `scaleOut`, `proactiveScaleIn`, `scaleIn`,
//! `opportunisticScaleIn`, `update`, `pruneUnusedRevisions`, `updateStatus`,
//! `handlePoolDeletion` and `ReleaseDetachedVirtualMachines`.

use std::cmp::Reverse;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use futures::future::join_all;
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::api::{
    Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, PropagationPolicy,
};
use kube::runtime::controller::Action;
use rand::seq::SliceRandom;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::selector::Selector;
use super::util::{self, controller_of, deleting, has_finalizer, str_map};
use super::{Ctx, POOL_FINALIZER, POOL_REVISION_LABEL, Result, SimError};

/// KubeVirt's retry delay when `maxUnavailable` holds a proactive update back.
const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(3);

/// A failed step, recorded in the `ReplicaFailure` condition.
struct SyncError {
    reason: &'static str,
    message: String,
}

/// Where KubeVirt 1.8.4 would panic (virt-controller crash-loops): the pass
/// stops here, without a status update, and is retried.
struct Panic(String);

pub(crate) async fn reconcile(pool: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action> {
    let (ns, name, uid) = (util::ns(&pool), util::name(&pool), util::uid(&pool));
    let spec = &pool.data["spec"];
    let selector = match Selector::from_label_selector(&spec["selector"]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(namespace = %ns, pool = %name, "Invalid selector on pool, will not re-enqueue: {e}");
            return Ok(Action::await_change());
        }
    };
    if !selector.matches(&str_map(
        &spec["virtualMachineTemplate"]["metadata"]["labels"],
    )) {
        tracing::error!(namespace = %ns, pool = %name, "Selector does not match template labels, will not re-enqueue.");
        return Ok(Action::await_change());
    }

    let ns_vms: Vec<Arc<DynamicObject>> = ctx
        .vms
        .state()
        .into_iter()
        .filter(|v| util::ns(v) == ns)
        .collect();
    // Owned VMs; those whose labels stopped matching are released. Orphans
    // are never adopted.
    let mut vms = Vec::new();
    for vm in ns_vms
        .iter()
        .filter(|v| controller_of(v).is_some_and(|r| r.uid == uid))
    {
        if selector.matches(&util::labels(vm)) {
            vms.push(vm.clone());
        } else {
            release(&ctx, &pool, vm).await?;
        }
    }

    let pool_api = ctx.pool_api(&ns);
    if !deleting(&pool) {
        util::add_finalizer(&pool_api, &pool, POOL_FINALIZER).await?;
    }

    let paused = spec["paused"].as_bool() == Some(true);
    let mut sync_err: Option<SyncError> = None;
    let mut requeue: Option<Duration> = None;
    let satisfied = expectations_satisfied(&ctx, &uid, &ns);
    if satisfied && !paused && !deleting(&pool) {
        let scale_stable = match scale(&ctx, &pool, &vms).await {
            Ok(Ok(stable)) => stable,
            Ok(Err(e)) => {
                sync_err = Some(e);
                false
            }
            Err(Panic(msg)) => {
                ctx.incident(&ns, &name, msg.clone());
                return Err(SimError(anyhow!(msg)));
            }
        };
        let mut update_stable = false;
        if sync_err.is_none() && scale_stable && expectations_satisfied(&ctx, &uid, &ns) {
            match update(&ctx, &pool, &vms).await {
                Ok((stable, rq)) => {
                    update_stable = stable;
                    requeue = rq;
                }
                Err(e) => {
                    sync_err = Some(SyncError {
                        reason: "FailedUpdate",
                        message: format!("{e:#}"),
                    })
                }
            }
        }
        if sync_err.is_none()
            && scale_stable
            && update_stable
            && expectations_satisfied(&ctx, &uid, &ns)
            && let Err(e) = prune_unused_revisions(&ctx, &pool, &vms).await
        {
            sync_err = Some(SyncError {
                reason: "FailedRevisionPruning",
                message: format!("error while pruning vmpool revisions: {e:#}"),
            });
        }
    } else if deleting(&pool) {
        handle_pool_deletion(&ctx, &pool, &selector, &ns_vms).await?;
        if let Err(e) = prune_unused_revisions(&ctx, &pool, &vms).await {
            tracing::warn!(namespace = %ns, pool = %name, "pruning revisions: {e:#}");
        }
    } else if !satisfied {
        requeue = Some(Duration::from_millis(500));
    }

    update_status(&ctx, &pool, &vms, &selector, sync_err.as_ref()).await?;
    if let Some(e) = sync_err {
        return Err(SimError(anyhow!("{}: {}", e.reason, e.message)));
    }
    Ok(requeue
        .map(Action::requeue)
        .unwrap_or_else(Action::await_change))
}

/// `ReleaseVirtualMachine` (with KubeVirt 1.8.4's patch, see the incident).
async fn release(ctx: &Ctx, pool: &DynamicObject, vm: &DynamicObject) -> Result<()> {
    let others: Vec<String> = util::finalizers(vm)
        .into_iter()
        .filter(|f| f != POOL_FINALIZER)
        .collect();
    let (ns, pool_name, vm_name) = (util::ns(pool), util::name(pool), util::name(vm));
    if !others.is_empty() {
        // fmt.Sprintf(`{"metadata":{"ownerReferences":[],"finalizers":%s}}`, []string{...})
        let msg = format!(
            "VM {vm_name} no longer matches the selector of pool {pool_name}: KubeVirt 1.8.4 sends the release \
             patch {{\"metadata\":{{\"ownerReferences\":[],\"finalizers\":[{}]}}}}, which is not JSON; the apiserver \
             rejects it and the pool is retried with that error forever (no scaling, no status)",
            others.join(" ")
        );
        ctx.incident(&ns, &pool_name, msg.clone());
        return Err(SimError(anyhow!(msg)));
    }
    let patch = json!({"metadata": {"ownerReferences": [], "finalizers": []}});
    match ctx
        .vm_api(&ns)
        .patch(&vm_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if util::is_not_found(&e) => Ok(()),
        Err(e) => Err(anyhow::Error::from(e).context("releasing VM").into()),
    }
}

/// Expectations are met when every VM created is in the store and every VM
/// deleted is gone or being deleted (or after 60 s, as a safety net).
fn expectations_satisfied(ctx: &Ctx, pool_uid: &str, ns: &str) -> bool {
    let pending = {
        let st = ctx.state();
        match st.expectations.get(pool_uid) {
            None => return true,
            Some(e) => (e.adds.clone(), e.dels.clone(), e.since),
        }
    };
    let (adds, dels, since) = pending;
    let adds_ok = adds.iter().all(|n| ctx.get_vm(ns, n).is_some());
    let dels_ok = dels.iter().all(|key| {
        let (name, uid) = key.split_once('/').unwrap_or((key, ""));
        ctx.get_vm(ns, name)
            .is_none_or(|v| util::uid(&v) != uid || deleting(&v))
    });
    let expired = since.is_some_and(|s| s.elapsed() > Duration::from_secs(60));
    if (adds_ok && dels_ok) || expired {
        ctx.state().expectations.remove(pool_uid);
        true
    } else {
        false
    }
}

fn expect(ctx: &Ctx, pool_uid: &str, adds: &[String], dels: &[String]) {
    let mut st = ctx.state();
    let e = st.expectations.entry(pool_uid.to_string()).or_default();
    e.adds.extend(adds.iter().cloned());
    e.dels.extend(dels.iter().cloned());
    e.since.get_or_insert(Instant::now());
}

fn observed(ctx: &Ctx, pool_uid: &str, add: Option<&str>, del: Option<&str>) {
    let mut st = ctx.state();
    if let Some(e) = st.expectations.get_mut(pool_uid) {
        if let Some(a) = add {
            e.adds.remove(a);
        }
        if let Some(d) = del {
            e.dels.remove(d);
        }
    }
}

fn replicas(pool: &DynamicObject) -> i64 {
    pool.data["spec"]["replicas"].as_i64().unwrap_or(1)
}

fn scale_in_strategy(pool: &DynamicObject) -> &Value {
    &pool.data["spec"]["scaleInStrategy"]
}

fn is_unmanaged(pool: &DynamicObject) -> bool {
    scale_in_strategy(pool)["unmanaged"].is_object()
}

fn is_opportunistic(pool: &DynamicObject) -> bool {
    scale_in_strategy(pool)["opportunistic"].is_object()
}

/// `scale`: Ok(Ok(stable)), Ok(Err(sync error)) or Err(panic).
async fn scale(
    ctx: &Ctx,
    pool: &DynamicObject,
    vms: &[Arc<DynamicObject>],
) -> Result<Result<bool, SyncError>, Panic> {
    let diff = vms.len() as i64 - replicas(pool);
    if diff == 0 {
        // At the desired size, or someone deleted a VM: let deleted VMs go.
        if let Err(e) = opportunistic_scale_in(ctx, pool, vms).await {
            return Ok(Err(SyncError {
                reason: "FailedScaleIn",
                message: format!("error during opportunistic scale in: {e:#}"),
            }));
        }
        return Ok(Ok(true));
    }
    let max_diff = diff.unsigned_abs().min(ctx.cfg.burst_replicas as u64) as i64;
    if diff < 0 {
        if let Err(e) = scale_out(ctx, pool, max_diff as usize).await {
            return Ok(Err(SyncError {
                reason: "FailedScaleOut",
                message: format!("error during scale out: {e:#}"),
            }));
        }
    } else {
        match proactive_scale_in(ctx, pool, vms, max_diff).await? {
            Ok(()) => {}
            Err(e) => {
                return Ok(Err(SyncError {
                    reason: "FailedScaleIn",
                    message: format!("error during scale in: {e:#}"),
                }));
            }
        }
    }
    Ok(Ok(false))
}

async fn opportunistic_scale_in(
    ctx: &Ctx,
    pool: &DynamicObject,
    vms: &[Arc<DynamicObject>],
) -> anyhow::Result<()> {
    if is_unmanaged(pool) {
        return Ok(());
    }
    let mut last = Ok(());
    for vm in vms.iter().filter(|v| deleting(v)) {
        // statePreservation (PVC/DataVolume owner references) is not simulated.
        if let Err(e) =
            util::remove_finalizers(&ctx.vm_api(&util::ns(vm)), vm, &[POOL_FINALIZER]).await
        {
            last = Err(e);
        } else {
            tracing::info!(namespace = %util::ns(vm), vm = %util::name(vm), "Removing VM from pool");
        }
    }
    last
}

async fn proactive_scale_in(
    ctx: &Ctx,
    pool: &DynamicObject,
    vms: &[Arc<DynamicObject>],
    count: i64,
) -> Result<anyhow::Result<()>, Panic> {
    if is_unmanaged(pool) || is_opportunistic(pool) {
        return Ok(Ok(()));
    }
    let eligible: Vec<Arc<DynamicObject>> = vms.iter().filter(|v| !deleting(v)).cloned().collect();
    // Already deleting VMs count towards the scale-in.
    let count = count - (vms.len() - eligible.len()) as i64;
    scale_in(ctx, pool, eligible, count).await
}

fn index_from_name(name: &str) -> Option<i64> {
    name.rsplit('-').next()?.parse().ok()
}

async fn scale_in(
    ctx: &Ctx,
    pool: &DynamicObject,
    vms: Vec<Arc<DynamicObject>>,
    count: i64,
) -> Result<anyhow::Result<()>, Panic> {
    if vms.is_empty() || count == 0 {
        return Ok(Ok(()));
    }
    let count = count.min(vms.len() as i64);
    if count < 0 {
        return Err(Panic(format!(
            "pool {}: more VMs of the pool are being deleted than replicas are in excess; KubeVirt 1.8.4 \
             computes count={count} in scaleIn and panics (slice bounds out of range [:{count}]), so \
             virt-controller crash-loops",
            util::name(pool)
        )));
    }
    let mut eligible = vms;
    let proactive = &scale_in_strategy(pool)["proactive"];
    let policy = proactive["selectionPolicy"]["sortPolicy"]
        .as_str()
        .unwrap_or("Random");
    sort_vms(ctx, &mut eligible, policy);
    let selectors = &proactive["selectionPolicy"]["selectors"];
    if selectors.is_object() {
        eligible = match filter_by_selectors(&eligible, selectors) {
            Ok(v) => v,
            Err(e) => return Ok(Err(e)),
        };
    }
    if count as usize > eligible.len() {
        return Err(Panic(format!(
            "pool {}: scale-in selectors match {} VMs but {count} must go; KubeVirt 1.8.4 panics \
             (slice bounds out of range [:{count}] with capacity {}), so virt-controller crash-loops",
            util::name(pool),
            eligible.len(),
            eligible.len()
        )));
    }
    let delete: Vec<Arc<DynamicObject>> = eligible.into_iter().take(count as usize).collect();
    let pool_uid = util::uid(pool);
    let keys: Vec<String> = delete
        .iter()
        .map(|v| format!("{}/{}", util::name(v), util::uid(v)))
        .collect();
    expect(ctx, &pool_uid, &[], &keys);
    tracing::info!(pool = %util::name(pool), "Removing {count} VMs from pool");
    let pool_uid = &pool_uid;
    let results = join_all(delete.iter().zip(&keys).map(|(vm, key)| async move {
        let r = ctx.vm_api(&util::ns(vm)).delete(&util::name(vm), &DeleteParams::default()).await;
        match r {
            Ok(_) => {
                tracing::info!(namespace = %util::ns(vm), vm = %util::name(vm), "Deleted vm from pool");
                Ok(())
            }
            Err(e) => {
                observed(ctx, pool_uid, None, Some(key));
                if util::is_not_found(&e) {
                    Ok(())
                } else {
                    Err(anyhow::Error::from(e).context(format!("deleting VM {}", util::name(vm))))
                }
            }
        }
    }))
    .await;
    Ok(results
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()
        .map(|_| ()))
}

fn sort_vms(ctx: &Ctx, vms: &mut [Arc<DynamicObject>], policy: &str) {
    match policy {
        "AscendingOrder" => vms.sort_by_key(|v| index_from_name(&util::name(v)).unwrap_or(0)),
        "DescendingOrder" => {
            vms.sort_by_key(|v| Reverse(index_from_name(&util::name(v)).unwrap_or(0)))
        }
        "Newest" => vms.sort_by_key(|v| Reverse(v.metadata.creation_timestamp.clone())),
        "Oldest" => vms.sort_by_key(|v| v.metadata.creation_timestamp.clone()),
        other => {
            if other != "Random" {
                tracing::warn!(
                    "Sorting VMs based on random policy as the provided sort policy is invalid: {other}"
                );
            }
            vms.shuffle(&mut ctx.state().rng);
        }
    }
}

/// Selectors match the VM's *template* labels and the template's nodeSelector.
fn filter_by_selectors(
    vms: &[Arc<DynamicObject>],
    selectors: &Value,
) -> anyhow::Result<Vec<Arc<DynamicObject>>> {
    let label = if selectors["labelSelector"].is_null() {
        None
    } else {
        Some(
            Selector::from_label_selector(&selectors["labelSelector"])
                .map_err(|e| anyhow!("failed to parse label selector from pool: {e}"))?,
        )
    };
    let node = if selectors["nodeSelectorRequirementMatcher"].is_null() {
        None
    } else {
        Some(
            Selector::from_node_selector_requirements(&selectors["nodeSelectorRequirementMatcher"])
                .map_err(|e| anyhow!("failed to parse node selector from pool: {e}"))?,
        )
    };
    if label.is_none() && node.is_none() {
        return Ok(vms.to_vec());
    }
    Ok(vms
        .iter()
        .filter(|vm| {
            let tmpl = &vm.data["spec"]["template"];
            label
                .as_ref()
                .is_none_or(|s| s.matches(&str_map(&tmpl["metadata"]["labels"])))
                && node
                    .as_ref()
                    .is_none_or(|s| s.matches(&str_map(&tmpl["spec"]["nodeSelector"])))
        })
        .cloned()
        .collect())
}

/// `indexVMSpec`: the template's VM spec for index `idx`.
pub(crate) fn index_vm_spec(pool_spec: &Value, idx: i64) -> Value {
    let mut spec = pool_spec["virtualMachineTemplate"]["spec"].clone();
    let suffix = format!("-{idx}");
    let mut dv_names = std::collections::HashMap::new();
    if let Some(dvts) = spec["dataVolumeTemplates"].as_array_mut() {
        for dvt in dvts {
            if let Some(n) = dvt["metadata"]["name"].as_str().map(String::from) {
                let indexed = format!("{n}{suffix}");
                dv_names.insert(n, indexed.clone());
                dvt["metadata"]["name"] = json!(indexed);
            }
        }
    }
    let ng = &pool_spec["nameGeneration"];
    let cm = ng["appendIndexToConfigMapRefs"].as_bool() == Some(true);
    let secrets = ng["appendIndexToSecretRefs"].as_bool() == Some(true);
    let append = |v: &mut Value| {
        if let Some(s) = v.as_str() {
            *v = json!(format!("{s}{suffix}"));
        }
    };
    if let Some(vols) = spec["template"]["spec"]["volumes"].as_array_mut() {
        for vol in vols {
            if vol["persistentVolumeClaim"].is_object() {
                if let Some(n) = vol["persistentVolumeClaim"]["claimName"]
                    .as_str()
                    .and_then(|n| dv_names.get(n))
                {
                    vol["persistentVolumeClaim"]["claimName"] = json!(n);
                }
            } else if vol["dataVolume"].is_object() {
                if let Some(n) = vol["dataVolume"]["name"]
                    .as_str()
                    .and_then(|n| dv_names.get(n))
                {
                    vol["dataVolume"]["name"] = json!(n);
                }
            } else if vol["configMap"].is_object() && cm {
                append(&mut vol["configMap"]["name"]);
            } else if vol["secret"].is_object() && secrets {
                append(&mut vol["secret"]["secretName"]);
            } else if secrets {
                for src in ["cloudInitNoCloud", "cloudInitConfigDrive"] {
                    if vol[src].is_object() {
                        if vol[src]["secretRef"].is_object() {
                            append(&mut vol[src]["secretRef"]["name"]);
                        }
                        if vol[src]["networkDataSecretRef"].is_object() {
                            append(&mut vol[src]["networkDataSecretRef"]["name"]);
                        }
                        break;
                    }
                }
            }
        }
    }
    spec
}

fn revision_name(pool: &DynamicObject) -> String {
    format!(
        "{}-{}",
        util::name(pool),
        pool.metadata.generation.unwrap_or(0)
    )
}

fn pool_owner_ref(pool: &DynamicObject) -> Value {
    util::controller_ref("pool.kubevirt.io/v1beta1", "VirtualMachinePool", pool)
}

/// The pool spec stored in a ControllerRevision (cached; they do not change).
async fn get_revision(ctx: &Ctx, ns: &str, name: &str) -> anyhow::Result<Option<Value>> {
    if let Some(v) = ctx
        .state()
        .revisions
        .get(&(ns.to_string(), name.to_string()))
    {
        return Ok(Some(v.clone()));
    }
    let api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), ns);
    let Some(cr) = api.get_opt(name).await? else {
        return Ok(None);
    };
    let spec = cr.data.0;
    ctx.state()
        .revisions
        .insert((ns.to_string(), name.to_string()), spec.clone());
    Ok(Some(spec))
}

/// `ensureControllerRevision`: `<pool>-<generation>` holding the pool spec.
async fn ensure_revision(ctx: &Ctx, pool: &DynamicObject) -> anyhow::Result<String> {
    let (ns, name) = (util::ns(pool), revision_name(pool));
    ctx.state()
        .pool_revisions
        .entry(util::uid(pool))
        .or_default()
        .insert(name.clone());
    if get_revision(ctx, &ns, &name).await?.is_some() {
        return Ok(name);
    }
    let cr = ControllerRevision {
        metadata: serde_json::from_value(json!({
            "name": name, "namespace": ns, "ownerReferences": [pool_owner_ref(pool)],
        }))?,
        data: RawExtension(pool.data["spec"].clone()),
        revision: Some(pool.metadata.generation.unwrap_or(0)),
    };
    let api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), &ns);
    match api.create(&PostParams::default(), &cr).await {
        Ok(_) => {
            ctx.state()
                .revisions
                .insert((ns, name.clone()), pool.data["spec"].clone());
        }
        Err(e) if util::is_conflict(&e) => {}
        Err(e) => return Err(anyhow::Error::from(e).context("creating ControllerRevision")),
    }
    Ok(name)
}

/// The VM object for index `idx` of the pool at revision `revision`.
fn vm_for(pool: &DynamicObject, vm_name: &str, idx: i64, revision: &str) -> Value {
    let tmpl = &pool.data["spec"]["virtualMachineTemplate"];
    let mut labels = tmpl["metadata"]["labels"].clone();
    if !labels.is_object() {
        labels = json!({});
    }
    labels[POOL_REVISION_LABEL] = json!(revision);
    let mut spec = index_vm_spec(&pool.data["spec"], idx);
    if !spec["template"]["metadata"].is_object() {
        spec["template"]["metadata"] = json!({});
    }
    if !spec["template"]["metadata"]["labels"].is_object() {
        spec["template"]["metadata"]["labels"] = json!({});
    }
    spec["template"]["metadata"]["labels"][POOL_REVISION_LABEL] = json!(revision);
    let mut meta = json!({
        "name": vm_name,
        "namespace": util::ns(pool),
        "labels": labels,
        "finalizers": [POOL_FINALIZER],
        "ownerReferences": [pool_owner_ref(pool)],
    });
    if tmpl["metadata"]["annotations"].is_object() {
        meta["annotations"] = tmpl["metadata"]["annotations"].clone();
    }
    json!({"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine", "metadata": meta, "spec": spec})
}

/// `scaleOut`: `count` VMs at the lowest free indexes.
async fn scale_out(ctx: &Ctx, pool: &DynamicObject, count: usize) -> anyhow::Result<()> {
    let (ns, pool_name, pool_uid) = (util::ns(pool), util::name(pool), util::uid(pool));
    let mut names = Vec::new();
    let mut i = 0i64;
    while names.len() < count {
        let n = format!("{pool_name}-{i}");
        if ctx.get_vm(&ns, &n).is_none() {
            names.push(n);
        }
        i += 1;
    }
    let revision = ensure_revision(ctx, pool).await?;
    tracing::info!(namespace = %ns, pool = %pool_name, "Adding {} VMs to pool", names.len());
    expect(ctx, &pool_uid, &names, &[]);
    let api = ctx.vm_api(&ns);
    let ns = &ns;
    let results = join_all(names.iter().map(|n| {
        let api = api.clone();
        let revision = revision.clone();
        let pool_uid = pool_uid.clone();
        async move {
            let idx = index_from_name(n).expect("generated name ends in an index");
            let obj: DynamicObject = serde_json::from_value(vm_for(pool, n, idx, &revision))?;
            match api.create(&PostParams::default(), &obj).await {
                Ok(_) => Ok(()),
                Err(e) => {
                    observed(ctx, &pool_uid, Some(n), None);
                    Err(anyhow::Error::from(e)
                        .context(format!("failed to add vm {ns}/{n} to pool")))
                }
            }
        }
    }))
    .await;
    results
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()
        .map(|_| ())
}

/// `handlePoolDeletion`: the pool finalizer comes off every VM in the
/// namespace matching the selector, then off the pool (GC deletes the VMs).
async fn handle_pool_deletion(
    ctx: &Ctx,
    pool: &DynamicObject,
    selector: &Selector,
    ns_vms: &[Arc<DynamicObject>],
) -> Result<()> {
    for vm in ns_vms {
        if selector.matches(&util::labels(vm)) && has_finalizer(vm, POOL_FINALIZER) {
            util::remove_finalizers(&ctx.vm_api(&util::ns(vm)), vm, &[POOL_FINALIZER]).await?;
        }
    }
    util::remove_finalizers(&ctx.pool_api(&util::ns(pool)), pool, &[POOL_FINALIZER]).await?;
    Ok(())
}

/// `isOutdatedVM`: the VM's revision's template differs from the pool's.
async fn is_outdated_vm(
    ctx: &Ctx,
    pool: &DynamicObject,
    vm: &DynamicObject,
) -> anyhow::Result<bool> {
    let Some(rev) = util::labels(vm).get(POOL_REVISION_LABEL).cloned() else {
        return Ok(true);
    };
    let Some(old) = get_revision(ctx, &util::ns(pool), &rev).await? else {
        return Ok(true);
    };
    Ok(old["virtualMachineTemplate"] != pool.data["spec"]["virtualMachineTemplate"])
}

#[derive(Debug, PartialEq)]
enum VmiUpdate {
    None,
    Restart,
    PatchRevisionLabel,
    DeleteVm,
}

/// `isOutdatedVMI`: compares the templates of the VM's and the VMI's revisions.
async fn is_outdated_vmi(
    ctx: &Ctx,
    vm: &DynamicObject,
    vmi: &DynamicObject,
) -> anyhow::Result<VmiUpdate> {
    let ns = util::ns(vm);
    let Some(vm_rev) = util::labels(vm).get(POOL_REVISION_LABEL).cloned() else {
        return Ok(VmiUpdate::None);
    };
    let Some(vmi_rev) = util::labels(vmi).get(POOL_REVISION_LABEL).cloned() else {
        return Ok(VmiUpdate::Restart);
    };
    if vm_rev == vmi_rev {
        return Ok(VmiUpdate::None);
    }
    let Some(for_vm) = get_revision(ctx, &ns, &vm_rev).await? else {
        return Ok(VmiUpdate::None);
    };
    let Some(for_vmi) = get_revision(ctx, &ns, &vmi_rev).await? else {
        return Ok(VmiUpdate::Restart);
    };
    let (a, b) = (
        &for_vm["virtualMachineTemplate"]["spec"],
        &for_vmi["virtualMachineTemplate"]["spec"],
    );
    if a["dataVolumeTemplates"] != b["dataVolumeTemplates"] {
        return Ok(VmiUpdate::DeleteVm);
    }
    if a["template"] != b["template"] {
        return Ok(VmiUpdate::Restart);
    }
    Ok(VmiUpdate::PatchRevisionLabel)
}

async fn handle_resource_update(
    ctx: &Ctx,
    vm: &DynamicObject,
    vmi: &DynamicObject,
    what: VmiUpdate,
) -> anyhow::Result<()> {
    let ns = util::ns(vm);
    match what {
        VmiUpdate::None => {}
        VmiUpdate::Restart => {
            tracing::info!(namespace = %ns, vm = %util::name(vm), "Proactive update of VM by deleting outdated VMI");
            ctx.vmi_api(&ns)
                .delete(&util::name(vmi), &DeleteParams::default())
                .await?;
        }
        VmiUpdate::DeleteVm => {
            let dp = DeleteParams {
                propagation_policy: Some(PropagationPolicy::Foreground),
                ..Default::default()
            };
            ctx.vm_api(&ns).delete(&util::name(vm), &dp).await?;
        }
        VmiUpdate::PatchRevisionLabel => {
            let Some(rev) = util::labels(vm).get(POOL_REVISION_LABEL).cloned() else {
                return Ok(());
            };
            let patch = json!({"metadata": {
                "labels": {POOL_REVISION_LABEL: rev},
                "resourceVersion": vmi.metadata.resource_version,
            }});
            ctx.vmi_api(&ns)
                .patch(
                    &util::name(vmi),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .context("patching of vmi labels with new pool revision name")?;
        }
    }
    Ok(())
}

fn vmi_of(ctx: &Ctx, vm: &DynamicObject) -> Option<Arc<DynamicObject>> {
    ctx.get_vmi(&util::ns(vm), &util::name(vm))
}

fn vmi_ready(vmi: &DynamicObject) -> bool {
    !deleting(vmi) && util::phase(vmi) == "Running" && util::condition_true(vmi, "Ready")
}

/// `update`: Ok((stable, requeue)).
async fn update(
    ctx: &Ctx,
    pool: &DynamicObject,
    vms: &[Arc<DynamicObject>],
) -> anyhow::Result<(bool, Option<Duration>)> {
    let update_strategy = &pool.data["spec"]["updateStrategy"];
    if update_strategy["unmanaged"].is_object() {
        return Ok((true, None));
    }
    let mut filtered = vms.to_vec();
    let selectors = &update_strategy["proactive"]["selectionPolicy"]["selectors"];
    if selectors.is_object() {
        filtered = filter_by_selectors(vms, selectors)
            .context("failed to filter VMs based on ordered policies")?;
    }
    let (mut outdated, mut current) = (Vec::new(), Vec::new());
    for vm in filtered {
        if is_outdated_vm(ctx, pool, &vm)
            .await
            .context("error while detecting outdated VMs")?
        {
            outdated.push(vm);
        } else {
            current.push(vm);
        }
    }
    // Always: rewrite outdated VM objects.
    opportunistic_update(ctx, pool, &outdated)
        .await
        .context("error during VM update")?;
    let mut requeue = None;
    if !update_strategy["opportunistic"].is_object() {
        requeue = proactive_update(ctx, pool, current)
            .await
            .context("error during VMI update")?;
    }
    Ok((outdated.is_empty(), requeue))
}

async fn opportunistic_update(
    ctx: &Ctx,
    pool: &DynamicObject,
    outdated: &[Arc<DynamicObject>],
) -> anyhow::Result<()> {
    if outdated.is_empty() {
        return Ok(());
    }
    let revision = ensure_revision(ctx, pool).await?;
    let results = join_all(outdated.iter().map(|vm| {
        let revision = revision.clone();
        async move {
            let name = util::name(vm);
            let idx =
                index_from_name(&name).with_context(|| format!("no index in VM name {name}"))?;
            let fresh = vm_for(pool, &name, idx, &revision);
            let mut updated = (**vm).clone();
            updated.metadata.labels = Some(str_map(&fresh["metadata"]["labels"]));
            updated.metadata.annotations = fresh["metadata"]["annotations"]
                .is_object()
                .then(|| str_map(&fresh["metadata"]["annotations"]));
            let mut spec = fresh["spec"].clone();
            // Firmware UUID and serial identify the VM to its guest: kept.
            let old_fw = &vm.data["spec"]["template"]["spec"]["domain"]["firmware"];
            for key in ["uuid", "serial"] {
                if let Some(v) = old_fw[key].as_str().filter(|s| !s.is_empty()) {
                    if !spec["template"]["spec"]["domain"]["firmware"].is_object() {
                        spec["template"]["spec"]["domain"]["firmware"] = json!({});
                    }
                    spec["template"]["spec"]["domain"]["firmware"][key] = json!(v);
                }
            }
            updated.data["spec"] = spec;
            ctx.vm_api(&util::ns(vm))
                .replace(&name, &PostParams::default(), &updated)
                .await
                .with_context(|| format!("updating vm {name} in pool"))?;
            tracing::info!(namespace = %util::ns(vm), vm = %name, "Updated vm in pool");
            anyhow::Ok(())
        }
    }))
    .await;
    results
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()
        .map(|_| ())
}

fn max_unavailable(pool: &DynamicObject) -> anyhow::Result<i64> {
    let total = replicas(pool);
    let mu = &pool.data["spec"]["maxUnavailable"];
    let n = if let Some(i) = mu.as_i64() {
        i
    } else {
        let s = mu.as_str().unwrap_or("100%");
        let pct: i64 = s
            .trim_end_matches('%')
            .parse()
            .map_err(|e| anyhow!("invalid maxUnavailable percentage: {e}"))?;
        total * pct / 100
    };
    Ok(n.max(1))
}

async fn proactive_update(
    ctx: &Ctx,
    pool: &DynamicObject,
    mut current: Vec<Arc<DynamicObject>>,
) -> anyhow::Result<Option<Duration>> {
    // Unhealthy VMIs first (`handleUnhealthyVMIs`).
    for vm in current.iter().filter(|v| !util::condition_true(v, "Ready")) {
        if let Some(vmi) = vmi_of(ctx, vm)
            && !deleting(&vmi)
        {
            let what = is_outdated_vmi(ctx, vm, &vmi).await?;
            handle_resource_update(ctx, vm, &vmi, what).await?;
        }
    }
    let max = max_unavailable(pool)?;
    let unavailable = current
        .iter()
        .filter(|vm| vmi_of(ctx, vm).is_none_or(|v| !vmi_ready(&v)))
        .count() as i64;
    let proactive = &pool.data["spec"]["updateStrategy"]["proactive"];
    if proactive.is_object() {
        let policy = proactive["selectionPolicy"]["sortPolicy"]
            .as_str()
            .unwrap_or("Random");
        sort_vms(ctx, &mut current, policy);
    }
    let mut budget = max - unavailable;
    for vm in &current {
        if budget <= 0 {
            return Ok(Some(DEFAULT_RETRY_DELAY));
        }
        let Some(vmi) = vmi_of(ctx, vm) else { continue };
        let what = is_outdated_vmi(ctx, vm, &vmi).await?;
        if what == VmiUpdate::None {
            continue;
        }
        handle_resource_update(ctx, vm, &vmi, what).await?;
        budget -= 1;
    }
    Ok(None)
}

/// `pruneUnusedRevisions`, over the revisions this simulator created.
async fn prune_unused_revisions(
    ctx: &Ctx,
    pool: &DynamicObject,
    vms: &[Arc<DynamicObject>],
) -> anyhow::Result<()> {
    let ns = util::ns(pool);
    let known: HashSet<String> = ctx
        .state()
        .pool_revisions
        .get(&util::uid(pool))
        .cloned()
        .unwrap_or_default();
    if known.is_empty() {
        return Ok(());
    }
    let mut unused = known;
    for vm in vms {
        if let Some(r) = util::labels(vm).get(POOL_REVISION_LABEL) {
            unused.remove(r);
        }
        if let Some(vmi) = vmi_of(ctx, vm)
            && let Some(r) = util::labels(&vmi).get(POOL_REVISION_LABEL)
        {
            unused.remove(r);
        }
    }
    let api: Api<ControllerRevision> = Api::namespaced(ctx.client.clone(), &ns);
    for name in unused {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if util::is_not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
        let mut st = ctx.state();
        st.revisions.remove(&(ns.clone(), name.clone()));
        if let Some(set) = st.pool_revisions.get_mut(&util::uid(pool)) {
            set.remove(&name);
        }
    }
    Ok(())
}

/// `updateStatus`.
async fn update_status(
    ctx: &Ctx,
    pool: &DynamicObject,
    vms: &[Arc<DynamicObject>],
    selector: &Selector,
    sync_err: Option<&SyncError>,
) -> Result<()> {
    let old = &pool.data["status"];
    let mut conditions = old["conditions"].as_array().cloned().unwrap_or_default();
    let has = |cs: &[Value], t: &str| cs.iter().any(|c| c["type"] == t);
    match sync_err {
        Some(e) if !has(&conditions, "ReplicaFailure") => conditions.push(json!({
            "type": "ReplicaFailure", "status": "True", "reason": e.reason, "message": e.message,
            "lastProbeTime": null, "lastTransitionTime": util::now(),
        })),
        None => conditions.retain(|c| c["type"] != "ReplicaFailure"),
        _ => {}
    }
    let paused = pool.data["spec"]["paused"].as_bool() == Some(true);
    if paused && !has(&conditions, "ReplicaPaused") {
        conditions.push(json!({
            "type": "ReplicaPaused", "status": "True", "reason": "SuccessfulPaused",
            "message": "Pool controller is paused", "lastProbeTime": null, "lastTransitionTime": util::now(),
        }));
    } else if !paused {
        conditions.retain(|c| c["type"] != "ReplicaPaused");
    }
    let ready = vms
        .iter()
        .filter(|v| util::condition_true(v, "Ready"))
        .count();
    let label_selector = if selector.is_empty() {
        String::new()
    } else {
        selector.to_string()
    };
    let status = json!({
        "replicas": vms.len(),
        "readyReplicas": ready,
        "labelSelector": label_selector,
        "conditions": conditions,
    });
    let old_conditions = old["conditions"].as_array().cloned().unwrap_or_default();
    let changed = old["replicas"].as_u64().unwrap_or(0) != vms.len() as u64
        || old["readyReplicas"].as_u64().unwrap_or(0) != ready as u64
        || old["labelSelector"].as_str() != Some(label_selector.as_str())
        || old_conditions != conditions;
    if changed {
        util::patch_status(
            &ctx.pool_api(&util::ns(pool)),
            &util::name(pool),
            &json!({ "status": status }),
        )
        .await?;
    }
    Ok(())
}
