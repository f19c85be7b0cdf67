//! The KubeVirt VirtualMachinePool of a RunnerPool.
//!
//! Decisions (see also the doc of [`virtual_machine_pool`]):
//! - `runStrategy: RerunOnFailure`: a guest power-off (the runner finished its
//!   one job, or timed out idle) leaves the VM `Stopped`, and the operator
//!   deletes it. A crash, a killed virt-launcher pod or a lost node makes the
//!   VMI `Failed`, and KubeVirt boots a fresh VMI (fresh containerDisk) in the
//!   same slot without the operator's help. `Always` would reboot finished
//!   VMs in place (racing the operator's delete and the Secret); `Once` would
//!   leave crashed VMs stopped until the operator notices.
//! - `scaleInStrategy: unmanaged`: KubeVirt's default scale-in deletes random
//!   VMs, which kills running jobs. With `unmanaged`, lowering `replicas`
//!   deletes nothing; the operator picks which (stopped or idle) VMs leave.
//! - `updateStrategy: opportunistic`: a spec change is written to the VM
//!   objects but running VMIs are not restarted (a restart would kill a job);
//!   it takes effect when a VM next boots. New VMs use the new template.
//! - `replicas`: owned by the scaler (see the module doc of `resources`).

use serde_json::{Map, Value, json};

use super::{
    BUNDLE_VOLUME, BuildError, CLOUDINIT_VOLUME, POOL_LABEL, RUN_STRATEGY,
    TEMPLATE_HASH_ANNOTATION, VMP_GROUP, VMP_KIND, VMP_VERSION, identity, labels,
};
use crate::cloudinit::RUNNER_BUNDLE_SERIAL;
use crate::crd::{RunnerBundleSpec, RunnerPool};

/// The VirtualMachinePool (`pool.kubevirt.io/v1beta1`) of `pool`, as the object
/// to server-side apply. It is named and namespaced like the RunnerPool,
/// labelled, and controller-owned by it.
///
/// - `spec.selector` matches only [`POOL_LABEL`]`=<name>` (KubeVirt makes the
///   selector immutable; the name never changes).
/// - The VM template carries the pool's labels, `runStrategy`
///   [`RUN_STRATEGY`], and the VMI template: the user's `template.metadata`
///   and `template.spec` untouched, extended by [`runner_vmi_spec`], with the
///   pool's labels and a [`TEMPLATE_HASH_ANNOTATION`] added.
/// - `replicas`: pass `Some(n)` only when creating the pool (KubeVirt reads a
///   missing `replicas` as 1, which would boot a VM nobody asked for), and
///   `None` on every later apply, so the controller never fights the scaler
///   over it. Right after creating, the scaler should take ownership of
///   `spec.replicas` (an apply of the scale subresource with
///   [`super::SCALER_FIELD_MANAGER`]): otherwise the controller's next apply
///   without `replicas` removes the field it alone owned.
pub fn virtual_machine_pool(
    pool: &RunnerPool,
    secret_name: &str,
    replicas: Option<i32>,
) -> Result<Value, BuildError> {
    let (name, namespace, owner) = identity(pool)?;
    let ours = labels(&name);

    let vmi_spec = runner_vmi_spec(
        &pool.spec.template.spec,
        secret_name,
        &pool.spec.runner_bundle,
    );

    let user_meta = &pool.spec.template.metadata;
    let mut vmi_labels = user_meta.labels.clone();
    vmi_labels.extend(ours.clone());
    let mut vmi_annotations = user_meta.annotations.clone();

    let mut vm_spec = json!({
        "runStrategy": RUN_STRATEGY,
        "template": {
            "metadata": {"labels": vmi_labels, "annotations": vmi_annotations},
            "spec": vmi_spec,
        },
    });
    let hash = template_hash(&vm_spec);
    vmi_annotations.insert(TEMPLATE_HASH_ANNOTATION.to_string(), hash.clone());
    vm_spec["template"]["metadata"]["annotations"] = json!(vmi_annotations);

    let mut spec = json!({
        "selector": {"matchLabels": {POOL_LABEL: name}},
        "virtualMachineTemplate": {
            "metadata": {
                "labels": ours,
                "annotations": {TEMPLATE_HASH_ANNOTATION: hash},
            },
            "spec": vm_spec,
        },
        "scaleInStrategy": {"unmanaged": {}},
        "updateStrategy": {"opportunistic": {}},
    });
    if let Some(r) = replicas {
        spec["replicas"] = json!(r);
    }
    Ok(json!({
        "apiVersion": format!("{VMP_GROUP}/{VMP_VERSION}"),
        "kind": VMP_KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": ours,
            "ownerReferences": [owner],
        },
        "spec": spec,
    }))
}

/// The user's VMI spec with what every runner VM needs, added without
/// duplicating anything (entries with our names are replaced in place, so
/// applying it to its own output changes nothing):
/// - disk + volume [`CLOUDINIT_VOLUME`]: `cloudInitNoCloud.secretRef` to
///   `secret_name`;
/// - when the bundle is enabled, disk [`BUNDLE_VOLUME`] with serial
///   [`RUNNER_BUNDLE_SERIAL`] (the guest finds it as
///   `/dev/disk/by-id/virtio-runner-bundle`) + its containerDisk volume;
/// - when the spec sets neither `domain.devices.interfaces` nor `networks`
///   (and does not turn off `autoattachPodInterface`), a masquerade interface
///   `default` on the pod network.
///
/// Every other field, known to us or not, is kept as written.
pub fn runner_vmi_spec(user: &Value, secret_name: &str, bundle: &RunnerBundleSpec) -> Value {
    let mut spec = match user {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };

    let wants_default_network = {
        let devices = spec.get("domain").and_then(|d| d.get("devices"));
        let has_interfaces = devices
            .and_then(|d| d.get("interfaces"))
            .is_some_and(|v| !v.is_null());
        let has_networks = spec.get("networks").is_some_and(|v| !v.is_null());
        let autoattach_off = devices
            .and_then(|d| d.get("autoattachPodInterface"))
            .and_then(Value::as_bool)
            == Some(false);
        !has_interfaces && !has_networks && !autoattach_off
    };

    let mut disks = vec![json!({"name": CLOUDINIT_VOLUME, "disk": {"bus": "virtio"}})];
    let mut volumes = vec![json!({
        "name": CLOUDINIT_VOLUME,
        "cloudInitNoCloud": {"secretRef": {"name": secret_name}},
    })];
    if bundle.enabled {
        disks.push(json!({
            "name": BUNDLE_VOLUME,
            "serial": RUNNER_BUNDLE_SERIAL,
            "disk": {"bus": "virtio"},
        }));
        let mut cd = Map::new();
        cd.insert("image".into(), json!(bundle.image_ref()));
        if let Some(p) = bundle.image_pull_policy {
            cd.insert("imagePullPolicy".into(), json!(p.as_str()));
        }
        if let Some(s) = &bundle.image_pull_secret {
            cd.insert("imagePullSecret".into(), json!(s));
        }
        volumes.push(json!({"name": BUNDLE_VOLUME, "containerDisk": cd}));
    }

    let devices = object_at(object_at(&mut spec, "domain"), "devices");
    for d in disks {
        upsert_named(list_at(devices, "disks"), d);
    }
    if wants_default_network {
        devices.insert(
            "interfaces".into(),
            json!([{"name": "default", "masquerade": {}}]),
        );
    }
    for v in volumes {
        upsert_named(list_at(&mut spec, "volumes"), v);
    }
    if wants_default_network {
        spec.insert("networks".into(), json!([{"name": "default", "pod": {}}]));
    }
    Value::Object(spec)
}

/// A short, stable hash of a VM template (SHA-256 of its JSON with sorted
/// keys, first 16 hex digits). Contains no secret: the template only names
/// the Secret.
pub fn template_hash(template: &Value) -> String {
    // serde_json's Map is a BTreeMap here (no `preserve_order`), so the
    // encoding is canonical; the test `hash_ignores_key_order` guards that.
    let bytes = serde_json::to_vec(template).expect("JSON values serialise");
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The object at `key` of `m`, created (or replacing a non-object) if needed.
fn object_at<'a>(m: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let v = m.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    v.as_object_mut().expect("just made an object")
}

/// The list at `key` of `m`, created (or replacing a non-list) if needed.
fn list_at<'a>(m: &'a mut Map<String, Value>, key: &str) -> &'a mut Vec<Value> {
    let v = m.entry(key).or_insert_with(|| Value::Array(Vec::new()));
    if !v.is_array() {
        *v = Value::Array(Vec::new());
    }
    v.as_array_mut().expect("just made a list")
}

/// Puts `item` in `list` in place of the first entry with the same `name`
/// (dropping any further ones), or appends it.
fn upsert_named(list: &mut Vec<Value>, item: Value) {
    let name = item.get("name").cloned();
    let mut placed = false;
    list.retain_mut(|e| {
        if e.get("name") != name.as_ref() {
            return true;
        }
        if placed {
            return false;
        }
        *e = item.clone();
        placed = true;
        true
    });
    if !placed {
        list.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ImagePullPolicy;
    use crate::resources::fixtures::{TOKEN, pool};
    use crate::resources::{MANAGED_BY_LABEL, ResolvedSecrets, user_data_secret};

    fn vmp() -> Value {
        virtual_machine_pool(&pool(), "linux-large-cloudinit", None).expect("builds")
    }

    fn vmi_spec(v: &Value) -> &Value {
        &v["spec"]["virtualMachineTemplate"]["spec"]["template"]["spec"]
    }

    fn names(list: &Value) -> Vec<&str> {
        list.as_array()
            .expect("a list")
            .iter()
            .map(|e| e["name"].as_str().expect("named"))
            .collect()
    }

    #[test]
    fn pool_identity_labels_owner_and_strategies() {
        let v = vmp();
        assert_eq!(v["apiVersion"], "pool.kubevirt.io/v1beta1");
        assert_eq!(v["kind"], "VirtualMachinePool");
        assert_eq!(v["metadata"]["name"], "linux-large");
        assert_eq!(v["metadata"]["namespace"], "ci-runners");
        assert_eq!(v["metadata"]["labels"][POOL_LABEL], "linux-large");
        assert_eq!(
            v["metadata"]["labels"][MANAGED_BY_LABEL],
            "runner-provisioner"
        );
        let owner = &v["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "RunnerPool");
        assert_eq!(owner["uid"], "6f1c1a8e-4a3b-4c55-9d1e-2b7f0f3c9a10");
        assert_eq!(owner["controller"], true);
        assert_eq!(
            v["spec"]["selector"],
            json!({"matchLabels": {POOL_LABEL: "linux-large"}})
        );
        assert_eq!(v["spec"]["scaleInStrategy"], json!({"unmanaged": {}}));
        assert_eq!(v["spec"]["updateStrategy"], json!({"opportunistic": {}}));
        assert_eq!(
            v["spec"]["virtualMachineTemplate"]["spec"]["runStrategy"],
            "RerunOnFailure"
        );
    }

    #[test]
    fn selector_matches_vm_template_labels() {
        let v = vmp();
        let vm_labels = &v["spec"]["virtualMachineTemplate"]["metadata"]["labels"];
        for (k, val) in v["spec"]["selector"]["matchLabels"]
            .as_object()
            .expect("map")
        {
            assert_eq!(
                &vm_labels[k], val,
                "selector label {k} not on the VM template"
            );
        }
    }

    #[test]
    fn replicas_only_when_asked() {
        assert!(vmp()["spec"].get("replicas").is_none());
        let v = virtual_machine_pool(&pool(), "s", Some(3)).expect("builds");
        assert_eq!(v["spec"]["replicas"], 3);
    }

    #[test]
    fn user_template_passes_through_with_unknown_fields() {
        let v = vmp();
        let s = vmi_spec(&v);
        assert_eq!(
            s["futureKubevirtField"],
            json!({"nested": [1, 2, {"deep": true}]})
        );
        assert_eq!(s["evictionStrategy"], "None");
        assert_eq!(
            s["domain"]["firmware"],
            json!({"bootloader": {"efi": {"secureBoot": false}}})
        );
        assert_eq!(s["domain"]["cpu"]["cores"], 4);
        assert_eq!(s["domain"]["resources"]["requests"]["memory"], "8Gi");
        let meta = &v["spec"]["virtualMachineTemplate"]["spec"]["template"]["metadata"];
        assert_eq!(meta["labels"]["team"], "ci");
        assert_eq!(meta["labels"][POOL_LABEL], "linux-large");
        assert_eq!(meta["annotations"]["note"], "hello");
        assert!(meta["annotations"][TEMPLATE_HASH_ANNOTATION].is_string());
    }

    #[test]
    fn cloudinit_and_bundle_are_appended() {
        let v = vmp();
        let s = vmi_spec(&v);
        assert_eq!(
            names(&s["domain"]["devices"]["disks"]),
            ["rootdisk", CLOUDINIT_VOLUME, BUNDLE_VOLUME]
        );
        assert_eq!(
            names(&s["volumes"]),
            ["rootdisk", CLOUDINIT_VOLUME, BUNDLE_VOLUME]
        );
        let vols = s["volumes"].as_array().expect("list");
        assert_eq!(
            vols[1]["cloudInitNoCloud"],
            json!({"secretRef": {"name": "linux-large-cloudinit"}})
        );
        assert_eq!(
            vols[2]["containerDisk"],
            json!({"image": "docker.io/circleci/runner-bundle:1.2.3"})
        );
        let bundle_disk = &s["domain"]["devices"]["disks"][2];
        assert_eq!(bundle_disk["serial"], "runner-bundle");
    }

    #[test]
    fn bundle_options_and_disabled_bundle() {
        let mut p = pool();
        p.spec.runner_bundle.tag = None;
        p.spec.runner_bundle.digest = Some(format!("sha256:{}", "ab".repeat(32)));
        p.spec.runner_bundle.image_pull_policy = Some(ImagePullPolicy::Always);
        p.spec.runner_bundle.image_pull_secret = Some("regcred".into());
        let v = virtual_machine_pool(&p, "s", None).expect("builds");
        let cd = &vmi_spec(&v)["volumes"][2]["containerDisk"];
        assert_eq!(
            cd["image"],
            format!(
                "docker.io/circleci/runner-bundle@sha256:{}",
                "ab".repeat(32)
            )
        );
        assert_eq!(cd["imagePullPolicy"], "Always");
        assert_eq!(cd["imagePullSecret"], "regcred");

        p.spec.runner_bundle.enabled = false;
        let v = virtual_machine_pool(&p, "s", None).expect("builds");
        assert_eq!(
            names(&vmi_spec(&v)["volumes"]),
            ["rootdisk", CLOUDINIT_VOLUME]
        );
        assert_eq!(
            names(&vmi_spec(&v)["domain"]["devices"]["disks"]),
            ["rootdisk", CLOUDINIT_VOLUME]
        );
    }

    #[test]
    fn extending_twice_changes_nothing() {
        let p = pool();
        let once = runner_vmi_spec(&p.spec.template.spec, "s", &p.spec.runner_bundle);
        let twice = runner_vmi_spec(&once, "s", &p.spec.runner_bundle);
        assert_eq!(once, twice);
    }

    #[test]
    fn user_entries_with_our_names_are_replaced_not_duplicated() {
        let p = pool();
        let user = json!({
            "domain": {"devices": {"disks": [
                {"name": CLOUDINIT_VOLUME, "cdrom": {}},
                {"name": "rootdisk", "disk": {}},
                {"name": CLOUDINIT_VOLUME, "disk": {}},
            ]}},
            "volumes": [
                {"name": CLOUDINIT_VOLUME, "cloudInitNoCloud": {"userData": "#cloud-config"}},
                {"name": "rootdisk", "containerDisk": {"image": "x"}},
            ],
        });
        let s = runner_vmi_spec(&user, "s", &p.spec.runner_bundle);
        assert_eq!(
            names(&s["domain"]["devices"]["disks"]),
            [CLOUDINIT_VOLUME, "rootdisk", BUNDLE_VOLUME]
        );
        assert_eq!(
            names(&s["volumes"]),
            [CLOUDINIT_VOLUME, "rootdisk", BUNDLE_VOLUME]
        );
        assert_eq!(
            s["volumes"][0]["cloudInitNoCloud"],
            json!({"secretRef": {"name": "s"}})
        );
        assert_eq!(
            s["domain"]["devices"]["disks"][0],
            json!({"name": CLOUDINIT_VOLUME, "disk": {"bus": "virtio"}})
        );
    }

    #[test]
    fn default_network_only_when_user_set_neither() {
        let b = pool().spec.runner_bundle;
        let s = runner_vmi_spec(&json!({}), "s", &b);
        assert_eq!(
            s["domain"]["devices"]["interfaces"],
            json!([{"name": "default", "masquerade": {}}])
        );
        assert_eq!(s["networks"], json!([{"name": "default", "pod": {}}]));

        let only_ifaces =
            json!({"domain": {"devices": {"interfaces": [{"name": "n", "bridge": {}}]}}});
        let s = runner_vmi_spec(&only_ifaces, "s", &b);
        assert_eq!(
            s["domain"]["devices"]["interfaces"],
            json!([{"name": "n", "bridge": {}}])
        );
        assert!(s.get("networks").is_none());

        let only_nets = json!({"networks": [{"name": "m", "multus": {"networkName": "x"}}]});
        let s = runner_vmi_spec(&only_nets, "s", &b);
        assert!(s["domain"]["devices"].get("interfaces").is_none());
        assert_eq!(
            s["networks"],
            json!([{"name": "m", "multus": {"networkName": "x"}}])
        );

        let no_autoattach = json!({"domain": {"devices": {"autoattachPodInterface": false}}});
        let s = runner_vmi_spec(&no_autoattach, "s", &b);
        assert!(s["domain"]["devices"].get("interfaces").is_none());
        assert!(s.get("networks").is_none());
    }

    #[test]
    fn default_template_gets_ubuntu_root_disk() {
        let mut p = pool();
        p.spec.template = Default::default();
        let v = virtual_machine_pool(&p, "s", None).expect("builds");
        let s = vmi_spec(&v);
        assert_eq!(
            s["volumes"][0]["containerDisk"]["image"],
            "quay.io/containerdisks/ubuntu:24.04"
        );
        assert_eq!(s["domain"]["resources"]["requests"]["memory"], "2Gi");
        assert_eq!(s["domain"]["cpu"]["cores"], 1);
        assert_eq!(s["networks"], json!([{"name": "default", "pod": {}}]));
    }

    #[test]
    fn token_never_appears_in_the_pool() {
        let p = pool();
        // The Secret built from the same pool does carry it ...
        let secret = user_data_secret(
            &p,
            &ResolvedSecrets {
                runner_token: TOKEN.into(),
                user_data: Some("pw".into()),
            },
        )
        .expect("builds");
        assert!(
            serde_json::to_string(&secret)
                .expect("json")
                .contains(&base64_of(TOKEN)[..16])
        );
        // ... the VirtualMachinePool never does.
        let text = serde_json::to_string(&vmp()).expect("json");
        assert!(!text.contains(TOKEN));
        assert!(!text.contains("SUPERSECRET"));
    }

    fn base64_of(s: &str) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn template_hash_follows_the_template() {
        let a = vmp();
        let hash = |v: &Value| {
            v["spec"]["virtualMachineTemplate"]["metadata"]["annotations"][TEMPLATE_HASH_ANNOTATION]
                .clone()
        };
        assert_eq!(hash(&a), hash(&vmp()), "deterministic");
        assert_eq!(hash(&a).as_str().map(str::len), Some(16));
        let vmi_hash = &a["spec"]["virtualMachineTemplate"]["spec"]["template"]["metadata"]["annotations"]
            [TEMPLATE_HASH_ANNOTATION];
        assert_eq!(&hash(&a), vmi_hash);
        let mut p = pool();
        p.spec.template.spec["domain"]["cpu"]["cores"] = json!(8);
        let b = virtual_machine_pool(&p, "linux-large-cloudinit", None).expect("builds");
        assert_ne!(hash(&a), hash(&b));
        // replicas are not part of the template
        let c = virtual_machine_pool(&pool(), "linux-large-cloudinit", Some(7)).expect("builds");
        assert_eq!(hash(&a), hash(&c));
    }

    #[test]
    fn hash_ignores_key_order() {
        let a: Value = serde_json::from_str(r#"{"a":1,"b":{"c":2,"d":3}}"#).expect("json");
        let b: Value = serde_json::from_str(r#"{"b":{"d":3,"c":2},"a":1}"#).expect("json");
        assert_eq!(template_hash(&a), template_hash(&b));
    }
}
