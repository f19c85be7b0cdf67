//! Pure builders of the objects the operator owns for a RunnerPool: the
//! KubeVirt VirtualMachinePool, the Secret with each VM's cloud-init, and the
//! status conditions. Plain data in, plain data out; no IO.
//!
//! Field ownership (server-side apply):
//! - the controller applies [`virtual_machine_pool`] and [`user_data_secret`]
//!   with field manager [`FIELD_MANAGER`];
//! - `spec.replicas` of the VirtualMachinePool belongs to the scaler, field
//!   manager [`SCALER_FIELD_MANAGER`], written through the scale subresource.
//!   The controller's applied object contains `replicas` only when it creates
//!   the pool (see [`virtual_machine_pool`]).

use std::collections::BTreeMap;

use kube::core::{ApiResource, GroupVersionKind};

pub mod conditions;
pub mod secret;
pub mod vmpool;

pub use conditions::{CondStatus, set_condition, status_equal_ignoring_time};
pub use secret::{ResolvedSecrets, USERDATA_KEY, bootstrap_config, secret_name, user_data_secret};
pub use vmpool::{runner_vmi_spec, template_hash, virtual_machine_pool};

/// Field manager of the controller's server-side applies (children, status).
pub const FIELD_MANAGER: &str = "runner-provisioner";
/// Field manager of the scaler's writes of `spec.replicas`.
pub const SCALER_FIELD_MANAGER: &str = "runner-provisioner-scaler";

/// `app.kubernetes.io/managed-by` on every object the operator creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY: &str = "runner-provisioner";
/// Label carrying the RunnerPool's name, on the pool, its VMs, VMIs and the
/// Secret. The VirtualMachinePool's selector uses only this label (the
/// selector is immutable in KubeVirt, and the name never changes).
pub const POOL_LABEL: &str = "runners.provisioner.dev/pool";
/// Annotation with a hash of the VM template, on each VM and VMI: a VM whose
/// VMI carries an older hash was booted from an older spec.
pub const TEMPLATE_HASH_ANNOTATION: &str = "runners.provisioner.dev/template-hash";

/// Name of the disk and volume with the cloud-init Secret.
pub const CLOUDINIT_VOLUME: &str = "rp-cloudinit";
/// Name of the disk and volume with the runner-bundle containerDisk.
pub const BUNDLE_VOLUME: &str = "rp-runner-bundle";

/// KubeVirt's VirtualMachinePool group.
pub const VMP_GROUP: &str = "pool.kubevirt.io";
/// The VirtualMachinePool version the operator writes (stored from KubeVirt 1.7).
pub const VMP_VERSION: &str = "v1beta1";
/// The VirtualMachinePool kind.
pub const VMP_KIND: &str = "VirtualMachinePool";
/// `runStrategy` of every VM (see [`virtual_machine_pool`] for why).
pub const RUN_STRATEGY: &str = "RerunOnFailure";

/// The [`ApiResource`] of `pool.kubevirt.io/v1beta1` VirtualMachinePool, for
/// `Api::<DynamicObject>::namespaced_with`.
pub fn vmp_api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(VMP_GROUP, VMP_VERSION, VMP_KIND),
        "virtualmachinepools",
    )
}

/// Labels the operator puts on everything it creates for pool `pool_name`.
pub fn labels(pool_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (POOL_LABEL.to_string(), pool_name.to_string()),
    ])
}

/// The label selector of a pool's VMs as a string
/// (`runners.provisioner.dev/pool=<name>`), e.g. for `status.selector`.
pub fn selector(pool_name: &str) -> String {
    format!("{POOL_LABEL}={pool_name}")
}

/// A RunnerPool that cannot be turned into objects (it lacks what the API
/// server always sets).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BuildError {
    /// No `metadata.name`.
    #[error("the RunnerPool has no name")]
    MissingName,
    /// No `metadata.namespace`.
    #[error("the RunnerPool has no namespace")]
    MissingNamespace,
    /// No `metadata.uid`, so no owner reference can point at it.
    #[error("the RunnerPool has no uid (was it read from the API server?)")]
    MissingUid,
}

/// Name, namespace and controller owner reference of a RunnerPool.
fn identity(
    pool: &crate::crd::RunnerPool,
) -> Result<
    (
        String,
        String,
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    ),
    BuildError,
> {
    use kube::Resource;
    let name = pool.metadata.name.clone().ok_or(BuildError::MissingName)?;
    let ns = pool
        .metadata
        .namespace
        .clone()
        .ok_or(BuildError::MissingNamespace)?;
    let owner = pool
        .controller_owner_ref(&())
        .ok_or(BuildError::MissingUid)?;
    Ok((name, ns, owner))
}

#[cfg(test)]
pub(crate) mod fixtures {
    use crate::crd::RunnerPool;

    /// A RunnerPool as read back from the API server (defaults applied).
    pub const POOL_YAML: &str = r#"
apiVersion: runners.provisioner.dev/v1alpha1
kind: RunnerPool
metadata:
  name: linux-large
  namespace: ci-runners
  uid: 6f1c1a8e-4a3b-4c55-9d1e-2b7f0f3c9a10
  generation: 3
spec:
  resourceClass: my-org/linux-large
  circleci:
    apiUrl: https://runner.circleci.com
    apiTokenSecretRef: {name: circleci-api, key: token}
    runnerTokenSecretRef: {name: linux-large-runner, key: token}
  scaling: {minReplicas: 1, maxReplicas: 10, idleTimeout: 10m, pollInterval: 5s}
  runner:
    workingDirectory: /var/lib/circleci-runner/workdir
    commandPrefix: [sudo, -niHu, circleci, --]
  runnerBundle: {enabled: true, image: docker.io/circleci/runner-bundle, tag: "1.2.3"}
  template:
    metadata:
      labels: {team: ci}
      annotations: {note: hello}
    spec:
      domain:
        cpu: {cores: 4}
        resources: {requests: {memory: 8Gi}}
        devices:
          disks: [{name: rootdisk, disk: {bus: virtio}}]
        firmware: {bootloader: {efi: {secureBoot: false}}}
      volumes: [{name: rootdisk, containerDisk: {image: "quay.io/containerdisks/ubuntu:24.04"}}]
      evictionStrategy: None
      futureKubevirtField: {nested: [1, 2, {deep: true}]}
"#;

    pub fn pool() -> RunnerPool {
        serde_norway::from_str(POOL_YAML).expect("fixture parses")
    }

    /// A runner token that must never leave the Secret.
    pub const TOKEN: &str = "rct_SUPERSECRET_0123456789abcdef";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_selector_name_the_pool() {
        let l = labels("p1");
        assert_eq!(l[POOL_LABEL], "p1");
        assert_eq!(l[MANAGED_BY_LABEL], "runner-provisioner");
        assert_eq!(selector("p1"), "runners.provisioner.dev/pool=p1");
    }

    #[test]
    fn vmp_api_resource_is_v1beta1() {
        let ar = vmp_api_resource();
        assert_eq!(ar.api_version, "pool.kubevirt.io/v1beta1");
        assert_eq!(ar.plural, "virtualmachinepools");
        assert_eq!(ar.kind, "VirtualMachinePool");
    }

    #[test]
    fn identity_requires_server_fields() {
        let mut p = fixtures::pool();
        assert!(identity(&p).is_ok());
        p.metadata.uid = None;
        assert_eq!(identity(&p).unwrap_err(), BuildError::MissingUid);
        p.metadata.namespace = None;
        assert_eq!(identity(&p).unwrap_err(), BuildError::MissingNamespace);
    }
}
