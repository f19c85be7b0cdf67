//! The scaling policy: plain data in, a plan out. No IO, no clock.
//!
//! Baseline (CircleCI's Runner Provisioner): `desired = clamp(unclaimed +
//! running, min, max)`. What the plan guarantees, whatever the input:
//!
//! - `replicas` is never below the number of VMs that may be running a job
//!   (every VM that is not stopped and not already being deleted), so
//!   lowering it can never make KubeVirt remove a busy VM;
//! - only VMs whose guest has powered off (`Stopped`) are retired;
//! - without fresh demand (CircleCI errors) `replicas` is held exactly where
//!   it is: never grown on garbage, never shrunk.

/// The CircleCI task counts of one poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Demand {
    /// `unclaimed_task_count`.
    pub unclaimed: u32,
    /// `running_runner_tasks`.
    pub running: u32,
}

/// `spec.scaling` bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// `minReplicas`.
    pub min: u32,
    /// `maxReplicas`.
    pub max: u32,
}

/// What a VM is doing, as far as scale-in is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmState {
    /// Booting, running, idle, migrating, erroring...: may be running a job.
    /// Never retired.
    Active,
    /// The guest powered off (job done or idle timeout): no runner runs. To
    /// be retired.
    Stopped,
    /// Already being deleted.
    Terminating,
}

/// One VM of the pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmView {
    /// VM name.
    pub name: String,
    /// Its state.
    pub state: VmState,
    /// KubeVirt `Ready`.
    pub ready: bool,
    /// Still carries `pool.kubevirt.io/finalizer`.
    pub has_pool_finalizer: bool,
}

/// Everything the policy looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input<'a> {
    /// Fresh counts, or `None` when the last poll failed.
    pub demand: Option<Demand>,
    /// Scaling bounds.
    pub bounds: Bounds,
    /// The pool's current `spec.replicas`.
    pub current_replicas: u32,
    /// The pool's VMs.
    pub vms: &'a [VmView],
}

/// What to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// `clamp(unclaimed + running, min, max)`, when demand is known.
    pub desired: Option<u32>,
    /// The pool's new `spec.replicas` (equal to the current one: no write).
    pub replicas: u32,
    /// Stopped VMs to delete, after `replicas` is written.
    pub retire: Vec<String>,
    /// VMs already being deleted whose pool finalizer must be removed
    /// (KubeVirt's unmanaged scale-in never removes it).
    pub release: Vec<String>,
    /// VMs that may be running a job.
    pub active: u32,
    /// Active VMs that are Ready.
    pub ready: u32,
}

impl Plan {
    /// Whether `replicas` must be written.
    pub fn changes_replicas(&self, current: u32) -> bool {
        self.replicas != current
    }
}

/// `clamp(unclaimed + running, min, max)`; a `min` above `max` (rejected by
/// validation) yields `max`, the safer bound.
pub fn desired(demand: Demand, bounds: Bounds) -> u32 {
    let want = demand.unclaimed.saturating_add(demand.running);
    want.max(bounds.min).min(bounds.max)
}

/// The plan for one tick.
pub fn plan(input: &Input<'_>) -> Plan {
    let mut active = 0u32;
    let mut ready = 0u32;
    let mut retire = Vec::new();
    let mut release = Vec::new();
    for vm in input.vms {
        match vm.state {
            VmState::Active => {
                active += 1;
                if vm.ready {
                    ready += 1;
                }
            }
            VmState::Stopped => retire.push(vm.name.clone()),
            VmState::Terminating => {
                if vm.has_pool_finalizer {
                    release.push(vm.name.clone());
                }
            }
        }
    }
    retire.sort();
    release.sort();

    let desired = input.demand.map(|d| desired(d, input.bounds));
    let replicas = match desired {
        // Retiring the stopped VMs and writing max(desired, active) is the
        // recipe's "first lower replicas by the number retired": the pool then
        // holds the active VMs plus fresh ones up to `desired`.
        Some(want) => want.max(active),
        // Hold: no new information, no change. Stopped VMs are still
        // retired; the pool replaces them, keeping its last decided size.
        None => input.current_replicas,
    };
    Plan {
        desired,
        replicas,
        retire,
        release,
        active,
        ready,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, state: VmState) -> VmView {
        VmView {
            name: name.into(),
            state,
            ready: state == VmState::Active,
            has_pool_finalizer: true,
        }
    }

    fn b(min: u32, max: u32) -> Bounds {
        Bounds { min, max }
    }

    fn d(unclaimed: u32, running: u32) -> Option<Demand> {
        Some(Demand { unclaimed, running })
    }

    #[test]
    fn desired_is_the_clamped_sum() {
        assert_eq!(
            desired(
                Demand {
                    unclaimed: 0,
                    running: 0
                },
                b(3, 10)
            ),
            3
        );
        assert_eq!(
            desired(
                Demand {
                    unclaimed: 4,
                    running: 2
                },
                b(3, 10)
            ),
            6
        );
        assert_eq!(
            desired(
                Demand {
                    unclaimed: 40,
                    running: 2
                },
                b(3, 10)
            ),
            10
        );
        assert_eq!(
            desired(
                Demand {
                    unclaimed: u32::MAX,
                    running: u32::MAX
                },
                b(0, 7)
            ),
            7
        );
        assert_eq!(
            desired(
                Demand {
                    unclaimed: 1,
                    running: 0
                },
                b(0, 0)
            ),
            0
        );
        // inconsistent bounds: the upper one wins
        assert_eq!(
            desired(
                Demand {
                    unclaimed: 0,
                    running: 0
                },
                b(5, 2)
            ),
            2
        );
    }

    #[test]
    fn scale_out_to_demand() {
        let vms = [vm("p-0", VmState::Active)];
        let p = plan(&Input {
            demand: d(4, 1),
            bounds: b(1, 10),
            current_replicas: 1,
            vms: &vms,
        });
        assert_eq!(p.desired, Some(5));
        assert_eq!(p.replicas, 5);
        assert!(p.changes_replicas(1));
        assert!(p.retire.is_empty());
    }

    #[test]
    fn never_below_active_vms() {
        // demand fell to 0 but four VMs may be running jobs
        let vms: Vec<_> = (0..4)
            .map(|i| vm(&format!("p-{i}"), VmState::Active))
            .collect();
        let p = plan(&Input {
            demand: d(0, 0),
            bounds: b(1, 10),
            current_replicas: 6,
            vms: &vms,
        });
        assert_eq!(p.desired, Some(1));
        assert_eq!(p.replicas, 4);
        assert_eq!(p.active, 4);
        // even above max (max lowered while VMs run)
        let p = plan(&Input {
            demand: d(9, 9),
            bounds: b(0, 2),
            current_replicas: 4,
            vms: &vms,
        });
        assert_eq!(p.replicas, 4);
    }

    #[test]
    fn stopped_vms_are_retired_and_replicas_lowered() {
        let vms = [
            vm("p-0", VmState::Active),
            vm("p-1", VmState::Stopped),
            vm("p-2", VmState::Active),
            vm("p-3", VmState::Stopped),
        ];
        let p = plan(&Input {
            demand: d(0, 1),
            bounds: b(1, 10),
            current_replicas: 4,
            vms: &vms,
        });
        assert_eq!(p.retire, ["p-1", "p-3"]);
        assert_eq!(
            p.replicas, 2,
            "lowered by the two retired VMs, not below the active ones"
        );
        assert!(p.release.is_empty());
    }

    #[test]
    fn retired_vms_are_replaced_when_demand_remains() {
        let vms = [vm("p-0", VmState::Stopped), vm("p-1", VmState::Stopped)];
        let p = plan(&Input {
            demand: d(3, 0),
            bounds: b(0, 10),
            current_replicas: 2,
            vms: &vms,
        });
        assert_eq!(p.retire, ["p-0", "p-1"]);
        assert_eq!(p.replicas, 3);
    }

    #[test]
    fn unknown_demand_holds_replicas() {
        let vms = [vm("p-0", VmState::Active), vm("p-1", VmState::Stopped)];
        for current in [0, 2, 9] {
            let p = plan(&Input {
                demand: None,
                bounds: b(1, 10),
                current_replicas: current,
                vms: &vms,
            });
            assert_eq!(p.replicas, current, "hold at {current}");
            assert_eq!(p.desired, None);
            assert!(!p.changes_replicas(current));
            assert_eq!(
                p.retire,
                ["p-1"],
                "a powered-off VM runs nothing: safe to retire"
            );
        }
    }

    #[test]
    fn terminating_vms_are_released_and_not_counted() {
        let mut gone = vm("p-1", VmState::Terminating);
        let mut done = vm("p-2", VmState::Terminating);
        done.has_pool_finalizer = false;
        gone.ready = false;
        let vms = [vm("p-0", VmState::Active), gone, done];
        let p = plan(&Input {
            demand: d(0, 0),
            bounds: b(0, 10),
            current_replicas: 3,
            vms: &vms,
        });
        assert_eq!(p.release, ["p-1"]);
        assert_eq!(p.active, 1);
        assert_eq!(p.replicas, 1);
    }

    #[test]
    fn ready_counts_only_active_ready_vms() {
        let mut booting = vm("p-1", VmState::Active);
        booting.ready = false;
        let vms = [
            vm("p-0", VmState::Active),
            booting,
            vm("p-2", VmState::Stopped),
        ];
        let p = plan(&Input {
            demand: d(1, 1),
            bounds: b(0, 10),
            current_replicas: 3,
            vms: &vms,
        });
        assert_eq!(p.ready, 1);
        assert_eq!(p.active, 2);
    }

    /// Exhaustive small-world check of the safety invariant: for every mix of
    /// VM states, demand and bounds, the plan never asks for fewer replicas
    /// than active VMs, never retires an active VM, and holds without demand.
    #[test]
    fn invariant_holds_exhaustively() {
        let states = [VmState::Active, VmState::Stopped, VmState::Terminating];
        for n in 0..5u32 {
            for combo in 0..3u32.pow(n) {
                let mut c = combo;
                let vms: Vec<_> = (0..n)
                    .map(|i| {
                        let s = states[(c % 3) as usize];
                        c /= 3;
                        vm(&format!("p-{i}"), s)
                    })
                    .collect();
                let active: Vec<_> = vms
                    .iter()
                    .filter(|v| v.state == VmState::Active)
                    .map(|v| &v.name)
                    .collect();
                for demand in [None, d(0, 0), d(2, 1), d(50, 50)] {
                    for (min, max) in [(0, 0), (0, 3), (2, 4), (5, 10)] {
                        for current in [0, 2, 7] {
                            let p = plan(&Input {
                                demand,
                                bounds: b(min, max),
                                current_replicas: current,
                                vms: &vms,
                            });
                            assert!(p.replicas >= active.len() as u32 || demand.is_none());
                            assert!(p.retire.iter().all(|r| !active.contains(&r)));
                            if demand.is_none() {
                                assert_eq!(p.replicas, current);
                            } else {
                                assert!(p.replicas <= max.max(active.len() as u32));
                                assert!(p.replicas >= min.min(max));
                            }
                        }
                    }
                }
            }
        }
    }
}
