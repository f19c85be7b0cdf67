//! Small helpers over `DynamicObject`s and their JSON.

use std::collections::BTreeMap;

use anyhow::Context as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};

/// A JSON object of strings as a map (labels, annotations); anything else is empty.
pub(crate) fn str_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn labels(o: &DynamicObject) -> BTreeMap<String, String> {
    o.metadata.labels.clone().unwrap_or_default()
}

pub(crate) fn controller_of(o: &DynamicObject) -> Option<&OwnerReference> {
    o.metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))
}

pub(crate) fn deleting(o: &DynamicObject) -> bool {
    o.metadata.deletion_timestamp.is_some()
}

pub(crate) fn finalizers(o: &DynamicObject) -> Vec<String> {
    o.metadata.finalizers.clone().unwrap_or_default()
}

pub(crate) fn has_finalizer(o: &DynamicObject, f: &str) -> bool {
    o.metadata
        .finalizers
        .as_ref()
        .is_some_and(|fs| fs.iter().any(|x| x == f))
}

pub(crate) fn uid(o: &DynamicObject) -> String {
    o.metadata.uid.clone().unwrap_or_default()
}

pub(crate) fn ns(o: &DynamicObject) -> String {
    o.metadata.namespace.clone().unwrap_or_default()
}

pub(crate) fn name(o: &DynamicObject) -> String {
    o.metadata.name.clone().unwrap_or_default()
}

pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

pub(crate) fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Replaces the finalizer list if the object did not change meanwhile
/// (`resourceVersion` precondition, as KubeVirt's JSON-patch `test` op does).
/// A missing object is fine.
pub(crate) async fn set_finalizers(
    api: &Api<DynamicObject>,
    o: &DynamicObject,
    new: Vec<String>,
) -> anyhow::Result<()> {
    let patch = json!({"metadata": {
        "finalizers": new,
        "resourceVersion": o.metadata.resource_version,
    }});
    match api
        .patch(&name(o), &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("updating finalizers of {}", name(o))),
    }
}

pub(crate) async fn remove_finalizers(
    api: &Api<DynamicObject>,
    o: &DynamicObject,
    remove: &[&str],
) -> anyhow::Result<()> {
    let fs = finalizers(o);
    if !fs.iter().any(|f| remove.contains(&f.as_str())) {
        return Ok(());
    }
    let kept = fs
        .into_iter()
        .filter(|f| !remove.contains(&f.as_str()))
        .collect();
    set_finalizers(api, o, kept).await
}

pub(crate) async fn add_finalizer(
    api: &Api<DynamicObject>,
    o: &DynamicObject,
    f: &str,
) -> anyhow::Result<()> {
    if has_finalizer(o, f) {
        return Ok(());
    }
    let mut fs = finalizers(o);
    fs.push(f.to_string());
    set_finalizers(api, o, fs).await
}

/// The condition of this type in `status.conditions`.
pub(crate) fn condition<'a>(o: &'a DynamicObject, type_: &str) -> Option<&'a Value> {
    o.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

pub(crate) fn condition_true(o: &DynamicObject, type_: &str) -> bool {
    condition(o, type_).is_some_and(|c| c["status"] == "True")
}

/// `status.phase` of a VMI ("" when unset).
pub(crate) fn phase(o: &DynamicObject) -> &str {
    o.data["status"]["phase"].as_str().unwrap_or("")
}

pub(crate) fn is_final(vmi: &DynamicObject) -> bool {
    matches!(phase(vmi), "Succeeded" | "Failed")
}

pub(crate) fn state_change_requests(vm: &DynamicObject) -> Vec<Value> {
    vm.data["status"]["stateChangeRequests"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// RFC 3339 "now" with seconds, as metav1.Time serializes.
pub(crate) fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// Replaces `cond` (by type) in a condition list, keeping the old
/// `lastTransitionTime` when the status did not change.
pub(crate) fn upsert_condition(list: &mut Vec<Value>, mut cond: Value) {
    let t = cond["type"].clone();
    if let Some(old) = list.iter_mut().find(|c| c["type"] == t) {
        if old["status"] == cond["status"] && !old["lastTransitionTime"].is_null() {
            cond["lastTransitionTime"] = old["lastTransitionTime"].clone();
        }
        *old = cond;
    } else {
        list.push(cond);
    }
}

/// `kubevirt.io/v1` owner reference with controller=true.
pub(crate) fn controller_ref(api_version: &str, kind: &str, o: &DynamicObject) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "name": name(o),
        "uid": uid(o),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// Merge-patches `status`; an object that is gone meanwhile is fine.
pub(crate) async fn patch_status(
    api: &Api<DynamicObject>,
    name: &str,
    status: &Value,
) -> anyhow::Result<()> {
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("updating status of {name}")),
    }
}
