//! The contract between the KubeVirt simulator (which owns VM lifecycles) and
//! the CircleCI simulator (which plays the `circleci-runner` agent inside each
//! booted guest).
//!
//! The KubeVirt simulator calls [`GuestRuntime::boot`] when a VMI reaches
//! `Running`, handing over the VMI's resolved cloud-init user-data, and
//! [`GuestRuntime::vanish`] when that VMI disappears without the guest having
//! powered itself off (VM deleted, stopped, pool scale-in). The guest calls
//! [`PowerOff::power_off`] when it shuts itself down (the runner exited).

use std::sync::Arc;
use std::time::Duration;

/// One boot of one VM: a VMI reached `Running`.
#[derive(Clone, Debug)]
pub struct GuestBoot {
    pub namespace: String,
    /// The VirtualMachine's name (`<pool>-<index>`).
    pub vm_name: String,
    /// The VMI's UID: the identity of this run. A reboot of the same VM
    /// (runStrategy Always) is a new VMI with a new UID.
    pub vmi_uid: String,
    /// The resolved cloud-init user-data (from `cloudInitNoCloud.secretRef`,
    /// `userData` or `userDataBase64`), if the VMI has any.
    pub user_data: Option<String>,
}

/// Handed to the guest at boot: call it when the guest powers itself off.
/// The KubeVirt simulator then marks the VMI `Succeeded` and applies the VM's
/// runStrategy. Calling it after the VMI vanished is a no-op.
pub struct PowerOff(Box<dyn FnOnce() + Send + 'static>);

impl PowerOff {
    pub fn new(f: impl FnOnce() + Send + 'static) -> Self {
        Self(Box::new(f))
    }
    pub fn power_off(self) {
        (self.0)()
    }
}

impl std::fmt::Debug for PowerOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PowerOff")
    }
}

/// What runs inside simulated guests.
pub trait GuestRuntime: Send + Sync + 'static {
    /// A VMI reached `Running`.
    fn boot(&self, boot: GuestBoot, power_off: PowerOff);
    /// The VMI with this UID is gone (deleted or stopped from outside) while
    /// its guest had not powered itself off: anything it was running is lost.
    fn vanish(&self, vmi_uid: &str);
}

/// A guest that does nothing (VMs boot and run until stopped from outside).
#[derive(Debug, Default)]
pub struct IdleGuest;

impl GuestRuntime for IdleGuest {
    fn boot(&self, _boot: GuestBoot, _power_off: PowerOff) {}
    fn vanish(&self, _vmi_uid: &str) {}
}

/// Simulated time runs `factor` times faster than wall-clock time: a 15-minute
/// job runs in one second with a factor of 900. Both simulators take one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimeScale(pub f64);

impl Default for TimeScale {
    fn default() -> Self {
        Self(1.0)
    }
}

impl TimeScale {
    /// Wall-clock duration of a simulated duration.
    pub fn wall(&self, simulated: Duration) -> Duration {
        simulated.div_f64(self.0.max(1e-9))
    }
    /// Simulated duration of a wall-clock duration.
    pub fn simulated(&self, wall: Duration) -> Duration {
        wall.mul_f64(self.0.max(1e-9))
    }
}

pub type SharedGuest = Arc<dyn GuestRuntime>;
