//! KubeVirt objects as the operator sees them: the API resources it reads and
//! writes, and pure views from a `VirtualMachine` / `VirtualMachinePool` JSON
//! object to the plain data the scaling policy takes.
//!
//! The operator keeps KubeVirt's objects as `DynamicObject`s (their schemas
//! are huge and only a handful of fields matter here).

use kube::api::DynamicObject;
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::Value;

use crate::resources::POOL_LABEL;
use crate::scaler::policy::{VmState, VmView};

/// The finalizer KubeVirt's pool controller puts on each VM (1.7+). With
/// `scaleInStrategy.unmanaged` nothing removes it but the operator.
pub const POOL_FINALIZER: &str = "pool.kubevirt.io/finalizer";

pub use crate::resources::vmp_api_resource as pool_resource;

/// `kubevirt.io/v1` VirtualMachine.
pub fn vm_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kubevirt.io", "v1", "VirtualMachine"),
        "virtualmachines",
    )
}

/// The RunnerPool a VM belongs to (its [`POOL_LABEL`]).
pub fn vm_pool_name(vm: &DynamicObject) -> Option<&str> {
    vm.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(POOL_LABEL))
        .map(String::as_str)
}

/// printableStatus values of a VM whose guest has not started: no VMI yet,
/// or a VMI that is Pending, Scheduling or Scheduled (not Running).
pub const GUEST_NOT_STARTED: &[&str] = &["Provisioning", "Starting", "WaitingForVolumeBinding"];

/// What the scale-in rules need to know about one VM.
///
/// A VM is [`VmState::Stopped`] only when KubeVirt says `printableStatus:
/// Stopped` and the VM is not ready: then no VMI runs, so no runner can be
/// running a job. Everything else that is not being deleted (no status yet,
/// Provisioning, Starting, Running, Stopping, errors, unknown values) is
/// [`VmState::Active`]: it may be running a job, and is never retired;
/// except [`VmState::Booting`]: not ready and Provisioning, Starting or
/// WaitingForVolumeBinding, i.e. its guest has not started, so no runner.
pub fn vm_view(vm: &DynamicObject) -> VmView {
    let status = &vm.data["status"];
    let ready = status["ready"].as_bool() == Some(true);
    let printable = status["printableStatus"].as_str().unwrap_or("");
    let state = if vm.metadata.deletion_timestamp.is_some() {
        VmState::Terminating
    } else if printable == "Stopped" && !ready {
        VmState::Stopped
    } else if !ready && GUEST_NOT_STARTED.contains(&printable) {
        VmState::Booting
    } else {
        VmState::Active
    };
    VmView {
        name: vm.metadata.name.clone().unwrap_or_default(),
        state,
        ready,
        has_pool_finalizer: vm
            .metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|x| x == POOL_FINALIZER)),
        created_secs: vm
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second()),
    }
}

/// What the scaler reads from the pool object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolView {
    /// `spec.replicas` (KubeVirt reads a missing value as 1).
    pub spec_replicas: u32,
    /// `status.readyReplicas`.
    pub ready_replicas: u32,
    /// `status.replicas`.
    pub status_replicas: u32,
}

/// Reads a VirtualMachinePool object.
pub fn pool_view(pool: &DynamicObject) -> PoolView {
    let n = |v: &Value| v.as_u64().map(|x| x.min(u32::MAX as u64) as u32);
    PoolView {
        spec_replicas: n(&pool.data["spec"]["replicas"]).unwrap_or(1),
        ready_replicas: n(&pool.data["status"]["readyReplicas"]).unwrap_or(0),
        status_replicas: n(&pool.data["status"]["replicas"]).unwrap_or(0),
    }
}

/// Trims a cached VirtualMachinePool to what [`pool_view`] and the
/// controller's lookups read: metadata without `managedFields`,
/// `spec.replicas` and the replica counts of `status`. The VM template and
/// the managed fields are most of the object; with a thousand pools they
/// would be most of the operator's memory.
pub fn slim_pool(pool: &mut DynamicObject) {
    pool.metadata.managed_fields = None;
    let keep = |v: &Value, keys: &[&str]| -> serde_json::Map<String, Value> {
        keys.iter()
            .filter_map(|k| v.get(*k).map(|x| ((*k).to_owned(), x.clone())))
            .collect()
    };
    let spec = keep(&pool.data["spec"], &["replicas"]);
    let status = keep(&pool.data["status"], &["replicas", "readyReplicas"]);
    pool.data = serde_json::json!({ "spec": spec, "status": status });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vm(status: Value, deleting: bool, finalizers: &[&str]) -> DynamicObject {
        let mut meta = json!({
            "name": "p-0",
            "namespace": "ns",
            "labels": {POOL_LABEL: "p"},
            "finalizers": finalizers,
        });
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": meta,
            "spec": {},
            "status": status,
        }))
        .expect("valid object")
    }

    #[test]
    fn only_a_stopped_not_ready_vm_is_stopped() {
        let s = |status: Value| vm_view(&vm(status, false, &[])).state;
        assert_eq!(
            s(json!({"printableStatus": "Stopped", "ready": false})),
            VmState::Stopped
        );
        assert_eq!(s(json!({"printableStatus": "Stopped"})), VmState::Stopped);
        // inconsistent: claims Stopped but Ready; treat as possibly busy
        assert_eq!(
            s(json!({"printableStatus": "Stopped", "ready": true})),
            VmState::Active
        );
        assert_eq!(s(json!({"printableStatus": "Starting"})), VmState::Booting);
        assert_eq!(
            s(json!({"printableStatus": "Provisioning", "ready": false})),
            VmState::Booting
        );
        assert_eq!(
            s(json!({"printableStatus": "Starting", "ready": true})),
            VmState::Active,
            "inconsistent: Starting but Ready"
        );
        for p in [
            "Running",
            "Stopping",
            "Unknown",
            "CrashLoopBackOff",
            "Migrating",
            "SomethingNew",
        ] {
            assert_eq!(s(json!({"printableStatus": p})), VmState::Active, "{p}");
        }
        assert_eq!(s(json!({})), VmState::Active, "no status yet");
        assert_eq!(s(Value::Null), VmState::Active);
    }

    #[test]
    fn deleting_vms_are_terminating_and_report_the_pool_finalizer() {
        let v = vm_view(&vm(
            json!({"printableStatus": "Running", "ready": true}),
            true,
            &[POOL_FINALIZER, "other"],
        ));
        assert_eq!(v.state, VmState::Terminating);
        assert!(v.has_pool_finalizer);
        assert!(v.ready);
        let v = vm_view(&vm(json!({}), true, &["other"]));
        assert!(!v.has_pool_finalizer);
        assert_eq!(vm_pool_name(&vm(json!({}), false, &[])), Some("p"));
    }

    #[test]
    fn slim_pool_keeps_what_pool_view_reads() {
        let mut p: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "pool.kubevirt.io/v1beta1",
            "kind": "VirtualMachinePool",
            "metadata": {
                "name": "p", "namespace": "ns", "uid": "u",
                "managedFields": [{"manager": "m", "operation": "Apply",
                                   "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}],
            },
            "spec": {"replicas": 4, "virtualMachineTemplate": {"spec": {"runStrategy": "Once"}}},
            "status": {"replicas": 3, "readyReplicas": 2, "labelSelector": "x=y"},
        }))
        .unwrap();
        let before = pool_view(&p);
        slim_pool(&mut p);
        assert_eq!(pool_view(&p), before);
        assert_eq!(before.spec_replicas, 4);
        assert!(p.metadata.managed_fields.is_none());
        assert_eq!(p.metadata.uid.as_deref(), Some("u"));
        assert!(p.data["spec"].get("virtualMachineTemplate").is_none());
        assert!(p.data["status"].get("labelSelector").is_none());

        // A missing spec.replicas stays missing (KubeVirt reads it as 1).
        let mut q: DynamicObject =
            serde_json::from_value(json!({"metadata": {"name": "q"}, "spec": {}})).unwrap();
        slim_pool(&mut q);
        assert_eq!(pool_view(&q).spec_replicas, 1);
    }

    #[test]
    fn pool_view_defaults_like_kubevirt() {
        let p: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "pool.kubevirt.io/v1beta1", "kind": "VirtualMachinePool",
            "metadata": {"name": "p"}, "spec": {}
        }))
        .unwrap();
        assert_eq!(pool_view(&p).spec_replicas, 1, "nil replicas means 1");
        let p: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "pool.kubevirt.io/v1beta1", "kind": "VirtualMachinePool",
            "metadata": {"name": "p"}, "spec": {"replicas": 4},
            "status": {"replicas": 3, "readyReplicas": 2}
        }))
        .unwrap();
        assert_eq!(
            pool_view(&p),
            PoolView {
                spec_replicas: 4,
                ready_replicas: 2,
                status_replicas: 3
            }
        );
    }
}
