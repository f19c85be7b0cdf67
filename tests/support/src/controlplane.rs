//! Placeholder: filled in by the harness work.
pub struct ControlPlane;
#[derive(Default)]
pub struct ControlPlaneOptions;
