//! runner-provisioner: keeps CircleCI self-hosted machine runners available as
//! KubeVirt VMs, sized to the CircleCI task queue.
pub mod cloudinit;
pub mod crd;
pub mod resources;
pub mod circleci;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod scaler;
pub mod telemetry;
