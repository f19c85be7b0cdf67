//! Test environment for runner-provisioner: a real Kubernetes control plane
//! (etcd, kube-apiserver, kube-controller-manager built from their Go modules)
//! plus simulators for what cannot run here: KubeVirt and CircleCI.
//!
//! Dev-only: never a dependency of the operator binary.

pub mod circleci;
pub mod controlplane;
pub mod guest;
pub mod kubevirt;
pub mod localenv;
pub mod operator_bin;
pub mod replay;

pub use controlplane::{ControlPlane, ControlPlaneOptions, init_crypto};
pub use guest::{GuestBoot, GuestRuntime, PowerOff, TimeScale};

/// Polls `check` every `every` until it returns true; panics with `what`
/// when `timeout` passes first.
pub async fn wait_until<F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    every: std::time::Duration,
    mut check: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    while !check().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(every).await;
    }
}
