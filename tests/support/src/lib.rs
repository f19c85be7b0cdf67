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
