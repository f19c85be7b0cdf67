//! runner-provisioner: keeps CircleCI self-hosted machine runners available as
//! KubeVirt VMs, sized to the CircleCI task queue.
pub mod circleci;
pub mod cli;
pub mod cloudinit;
pub mod controller;
pub mod crd;
pub mod error;
pub mod http;
pub mod kubevirt;
pub mod leader;
pub mod metrics;
pub mod resources;
pub mod scaler;
pub mod sim;
pub mod telemetry;
