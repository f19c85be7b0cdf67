//! `crds/runnerpool.yaml` must be exactly what `crd_yaml()` renders.
//!
//! Regenerate with `cargo run -- crd > crds/runnerpool.yaml`, or with
//! `RP_UPDATE_CRDS=1 cargo test -p runner-provisioner --test crd_up_to_date`.

use std::path::Path;

#[test]
fn checked_in_crd_is_up_to_date() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/runnerpool.yaml");
    let rendered = runner_provisioner::crd::crd_yaml();
    if std::env::var_os("RP_UPDATE_CRDS").is_some() {
        std::fs::write(&path, &rendered).expect("write crds/runnerpool.yaml");
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "crds/runnerpool.yaml is stale (or missing): regenerate it with\n\n    \
         cargo run -- crd > crds/runnerpool.yaml\n\nor\n\n    \
         RP_UPDATE_CRDS=1 cargo test -p runner-provisioner --test crd_up_to_date\n"
    );
}

#[test]
fn rendering_is_deterministic() {
    assert_eq!(
        runner_provisioner::crd::crd_yaml(),
        runner_provisioner::crd::crd_yaml()
    );
}
