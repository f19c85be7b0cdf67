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

/// The scaling controls in force at one moment: `spec.scaling`, with the
/// active schedule's overrides and the forecast's warm-pool target applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Controls {
    /// `minReplicas`: a floor.
    pub min: u32,
    /// `maxReplicas`: a ceiling, whatever else says.
    pub max: u32,
    /// `headroom`: spare VMs above demand while there is demand (CircleCI's
    /// reference semantics: none when the queue is empty).
    pub headroom: u32,
    /// `idleBuffer`: spare VMs above demand at all times (ARC `minRunners` /
    /// GitLab `idle_count` semantics: additive, it does not vanish under load).
    pub idle_buffer: u32,
    /// `maxSurge`: at most this many VMs above the Ready ones (VMs still
    /// booting count against it). `None`: no cap.
    pub max_surge: Option<u32>,
    /// `scaleDownDelay` in seconds: the desired size only goes down after
    /// demand has stayed lower for this long.
    pub scale_down_delay_secs: u64,
    /// A floor from the forecast (VMs expected to be needed soon); 0 when
    /// forecasting is off.
    pub warm: u32,
    /// `burstPercent`: while tasks wait, boot this percentage of the waiting
    /// tasks on top (boot times vary, so the fastest boots take the tasks).
    pub burst_percent: u32,
    /// `retireSurplusBooting`: delete VMs above the wanted size that have
    /// not started their guest yet (provably no job).
    pub retire_booting: bool,
}

/// `spec.scaling` bounds (the controls of the reference policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// `minReplicas`.
    pub min: u32,
    /// `maxReplicas`.
    pub max: u32,
}

impl From<Bounds> for Controls {
    fn from(b: Bounds) -> Self {
        Controls {
            min: b.min,
            max: b.max,
            ..Default::default()
        }
    }
}

/// What a VM is doing, as far as scale-in is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmState {
    /// Running, idle, migrating, erroring...: may be running a job. Never
    /// retired.
    Active,
    /// Created but its guest has not started (no VMI yet, or the VMI has
    /// not reached Running): no runner exists, so no job. Counts like
    /// Active, and may be retired as surplus when `retire_booting` is on.
    Booting,
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
    /// Creation time in seconds (any epoch; only the order matters).
    pub created_secs: i64,
}

/// Everything the policy looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input<'a> {
    /// Fresh counts, or `None` when the last poll failed.
    pub demand: Option<Demand>,
    /// The controls in force.
    pub controls: Controls,
    /// The pool's current `spec.replicas`.
    pub current_replicas: u32,
    /// The pool's VMs.
    pub vms: &'a [VmView],
    /// Seconds on a monotonic clock (for `scaleDownDelay`).
    pub now_secs: u64,
}

/// What a pool's policy remembers between ticks (bounded).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Recent (time, wanted size) pairs, kept for `scaleDownDelay`; wanted
    /// sizes are kept decreasing, so the front is the window's maximum.
    recent: std::collections::VecDeque<(u64, u32)>,
}

/// What to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// The size the pool should have now, when demand is known.
    pub desired: Option<u32>,
    /// The pool's new `spec.replicas` (equal to the current one: no write).
    pub replicas: u32,
    /// Stopped VMs to delete, after `replicas` is written.
    pub retire: Vec<String>,
    /// Surplus VMs whose guest has not started, to delete after `replicas`
    /// is written (only with `retire_booting`).
    pub cancel: Vec<String>,
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

/// `clamp(unclaimed + running, min, max)`: the reference's formula. A `min`
/// above `max` (rejected by validation) yields `max`, the safer bound.
pub fn desired(demand: Demand, bounds: Bounds) -> u32 {
    wanted(demand, &bounds.into())
}

/// The size demand asks for under `c`, before `scaleDownDelay` and
/// `maxSurge`: `unclaimed + running`, plus `headroom` while that is above
/// zero, plus `idleBuffer`, at least the forecast's `warm` floor, clamped to
/// `[min, max]` (`max` wins).
pub fn wanted(demand: Demand, c: &Controls) -> u32 {
    let base = demand.unclaimed.saturating_add(demand.running);
    let mut want = base.saturating_add(c.idle_buffer);
    if base > 0 {
        want = want.saturating_add(c.headroom);
    }
    let burst = (u64::from(demand.unclaimed) * u64::from(c.burst_percent)).div_ceil(100);
    want = want.saturating_add(burst.min(u64::from(u32::MAX)) as u32);
    want.max(c.warm).max(c.min).min(c.max)
}

/// The plan for one tick. `state` carries what `scaleDownDelay` needs.
pub fn plan(state: &mut State, input: &Input<'_>) -> Plan {
    let mut active = 0u32;
    let mut ready = 0u32;
    let mut retire = Vec::new();
    let mut release = Vec::new();
    let mut booting: Vec<&VmView> = Vec::new();
    for vm in input.vms {
        match vm.state {
            VmState::Active => {
                active += 1;
                if vm.ready {
                    ready += 1;
                }
            }
            VmState::Booting => {
                active += 1;
                booting.push(vm);
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

    let c = &input.controls;
    let desired = input.demand.map(|d| {
        let want = wanted(d, c);
        // scaleDownDelay: the largest wanted size within the window.
        let now = input.now_secs;
        let q = &mut state.recent;
        while q.back().is_some_and(|&(_, w)| w <= want) {
            q.pop_back();
        }
        q.push_back((now, want));
        while q
            .front()
            .is_some_and(|&(t, _)| now.saturating_sub(t) > c.scale_down_delay_secs)
        {
            q.pop_front();
        }
        let held = q.front().map_or(want, |&(_, w)| w.max(want));
        // maxSurge: no more than `max_surge` VMs beyond the Ready ones.
        match c.max_surge {
            Some(s) => held.min(ready.saturating_add(s)).max(c.min.min(c.max)),
            None => held,
        }
    });
    // Surplus VMs that have not started a guest can go (newest first: they
    // are the furthest from ready).
    let mut cancel = Vec::new();
    if let Some(want) = desired
        && c.retire_booting
        && want < active
    {
        booting.sort_by(|a, b| {
            b.created_secs
                .cmp(&a.created_secs)
                .then(b.name.cmp(&a.name))
        });
        let n = ((active - want) as usize).min(booting.len());
        cancel = booting[..n].iter().map(|v| v.name.clone()).collect();
        cancel.sort();
    }
    let keep = active - cancel.len() as u32;
    let replicas = match desired {
        // Retiring the stopped VMs and writing max(desired, active) is the
        // recipe's "first lower replicas by the number retired": the pool then
        // holds the active VMs plus fresh ones up to `desired`.
        Some(want) => want.max(keep),
        // Hold: no new information, no change. Stopped VMs are still
        // retired; the pool replaces them, keeping its last decided size.
        None => input.current_replicas,
    };
    Plan {
        desired,
        replicas,
        retire,
        cancel,
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
            created_secs: 0,
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
        let p = plan(
            &mut State::default(),
            &Input {
                demand: d(4, 1),
                controls: b(1, 10).into(),
                now_secs: 0,
                current_replicas: 1,
                vms: &vms,
            },
        );
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
        let p = plan(
            &mut State::default(),
            &Input {
                demand: d(0, 0),
                controls: b(1, 10).into(),
                now_secs: 0,
                current_replicas: 6,
                vms: &vms,
            },
        );
        assert_eq!(p.desired, Some(1));
        assert_eq!(p.replicas, 4);
        assert_eq!(p.active, 4);
        // even above max (max lowered while VMs run)
        let p = plan(
            &mut State::default(),
            &Input {
                demand: d(9, 9),
                controls: b(0, 2).into(),
                now_secs: 0,
                current_replicas: 4,
                vms: &vms,
            },
        );
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
        let p = plan(
            &mut State::default(),
            &Input {
                demand: d(0, 1),
                controls: b(1, 10).into(),
                now_secs: 0,
                current_replicas: 4,
                vms: &vms,
            },
        );
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
        let p = plan(
            &mut State::default(),
            &Input {
                demand: d(3, 0),
                controls: b(0, 10).into(),
                now_secs: 0,
                current_replicas: 2,
                vms: &vms,
            },
        );
        assert_eq!(p.retire, ["p-0", "p-1"]);
        assert_eq!(p.replicas, 3);
    }

    #[test]
    fn unknown_demand_holds_replicas() {
        let vms = [vm("p-0", VmState::Active), vm("p-1", VmState::Stopped)];
        for current in [0, 2, 9] {
            let p = plan(
                &mut State::default(),
                &Input {
                    demand: None,
                    controls: b(1, 10).into(),
                    now_secs: 0,
                    current_replicas: current,
                    vms: &vms,
                },
            );
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
        let p = plan(
            &mut State::default(),
            &Input {
                demand: d(0, 0),
                controls: b(0, 10).into(),
                now_secs: 0,
                current_replicas: 3,
                vms: &vms,
            },
        );
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
        let p = plan(
            &mut State::default(),
            &Input {
                demand: d(1, 1),
                controls: b(0, 10).into(),
                now_secs: 0,
                current_replicas: 3,
                vms: &vms,
            },
        );
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
                            let p = plan(
                                &mut State::default(),
                                &Input {
                                    demand,
                                    controls: b(min, max).into(),
                                    now_secs: 0,
                                    current_replicas: current,
                                    vms: &vms,
                                },
                            );
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

    fn c(min: u32, max: u32) -> Controls {
        b(min, max).into()
    }

    fn run(state: &mut State, controls: Controls, d: (u32, u32), vms: &[VmView], now: u64) -> Plan {
        plan(
            state,
            &Input {
                demand: Some(Demand {
                    unclaimed: d.0,
                    running: d.1,
                }),
                controls,
                current_replicas: 0,
                vms,
                now_secs: now,
            },
        )
    }

    #[test]
    fn headroom_only_while_there_is_demand_and_idle_buffer_always() {
        let hr = Controls {
            headroom: 2,
            ..c(0, 20)
        };
        assert_eq!(
            wanted(
                Demand {
                    unclaimed: 0,
                    running: 0
                },
                &hr
            ),
            0
        );
        assert_eq!(
            wanted(
                Demand {
                    unclaimed: 3,
                    running: 1
                },
                &hr
            ),
            6
        );
        let ib = Controls {
            idle_buffer: 2,
            ..c(1, 20)
        };
        assert_eq!(
            wanted(
                Demand {
                    unclaimed: 0,
                    running: 0
                },
                &ib
            ),
            2
        );
        assert_eq!(
            wanted(
                Demand {
                    unclaimed: 3,
                    running: 1
                },
                &ib
            ),
            6,
            "additive, unlike min"
        );
        let floor = c(3, 20);
        assert_eq!(
            wanted(
                Demand {
                    unclaimed: 3,
                    running: 1
                },
                &floor
            ),
            4,
            "min is a floor"
        );
        let capped = Controls {
            headroom: 5,
            idle_buffer: 5,
            warm: 30,
            ..c(0, 7)
        };
        assert_eq!(
            wanted(
                Demand {
                    unclaimed: 9,
                    running: 9
                },
                &capped
            ),
            7,
            "max wins"
        );
        let warm = Controls {
            warm: 4,
            ..c(1, 10)
        };
        assert_eq!(
            wanted(
                Demand {
                    unclaimed: 1,
                    running: 0
                },
                &warm
            ),
            4
        );
    }

    #[test]
    fn scale_down_delay_holds_the_window_maximum() {
        let ctl = Controls {
            scale_down_delay_secs: 60,
            ..c(0, 20)
        };
        let mut st = State::default();
        assert_eq!(run(&mut st, ctl, (5, 0), &[], 0).desired, Some(5));
        assert_eq!(run(&mut st, ctl, (1, 0), &[], 30).desired, Some(5), "held");
        assert_eq!(
            run(&mut st, ctl, (2, 0), &[], 60).desired,
            Some(5),
            "still in the window"
        );
        assert_eq!(
            run(&mut st, ctl, (2, 0), &[], 61).desired,
            Some(2),
            "the 5 left the window"
        );
        assert_eq!(
            run(&mut st, ctl, (8, 0), &[], 62).desired,
            Some(8),
            "growth is immediate"
        );
        assert!(st.recent.len() <= 3, "bounded: {:?}", st.recent);
        let mut st = State::default();
        let now0 = c(0, 20);
        assert_eq!(run(&mut st, now0, (5, 0), &[], 0).desired, Some(5));
        assert_eq!(
            run(&mut st, now0, (1, 0), &[], 1).desired,
            Some(1),
            "no delay"
        );
    }

    #[test]
    fn burst_boots_extra_vms_and_surplus_boots_are_cancelled_newest_first() {
        let ctl = Controls {
            burst_percent: 100,
            ..c(0, 100)
        };
        assert_eq!(
            wanted(
                Demand {
                    unclaimed: 18,
                    running: 0
                },
                &ctl
            ),
            36,
            "twice the waiting tasks"
        );
        assert_eq!(
            wanted(
                Demand {
                    unclaimed: 0,
                    running: 18
                },
                &ctl
            ),
            18
        );
        let mut vms: Vec<_> = (0..4)
            .map(|i| {
                let mut v = vm(&format!("p-{i}"), VmState::Booting);
                v.ready = false;
                v.created_secs = i;
                v
            })
            .collect();
        vms.push(vm("p-9", VmState::Active));
        let keep = run(&mut State::default(), ctl, (1, 1), &vms, 0);
        assert!(keep.cancel.is_empty(), "retire_booting off");
        let on = Controls {
            retire_booting: true,
            ..ctl
        };
        let p = run(&mut State::default(), on, (1, 1), &vms, 0);
        assert_eq!(p.desired, Some(3));
        assert_eq!(p.cancel, ["p-2", "p-3"], "the two newest boots");
        assert_eq!(p.replicas, 3);
    }

    #[test]
    fn max_surge_caps_vms_beyond_ready_ones() {
        let ctl = Controls {
            max_surge: Some(2),
            ..c(0, 50)
        };
        let mut ready = vm("p-0", VmState::Active);
        ready.ready = true;
        let mut booting = vm("p-1", VmState::Active);
        booting.ready = false;
        let vms = [ready, booting];
        let p = run(&mut State::default(), ctl, (10, 0), &vms, 0);
        assert_eq!(p.desired, Some(3), "1 ready + 2 surge");
        assert_eq!(p.replicas, 3);
    }

    /// Randomized check of the safety invariant under every control: the
    /// plan never sets replicas below the VMs that may be running a job
    /// (unless holding without demand), never retires one, and only retires
    /// powered-off VMs.
    #[test]
    fn no_control_ever_implies_losing_a_busy_vm() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let states = [
            VmState::Active,
            VmState::Booting,
            VmState::Stopped,
            VmState::Terminating,
        ];
        for _ in 0..20_000 {
            let n = rng.random_range(0..12);
            let vms: Vec<_> = (0..n)
                .map(|i| {
                    let mut v = vm(&format!("p-{i}"), states[rng.random_range(0..4)]);
                    v.ready = v.state == VmState::Active && rng.random_bool(0.5);
                    v.created_secs = rng.random_range(0..100);
                    v
                })
                .collect();
            let min = rng.random_range(0..6);
            let ctl = Controls {
                min,
                max: rng.random_range(min..min + 10),
                headroom: rng.random_range(0..4),
                idle_buffer: rng.random_range(0..4),
                max_surge: rng.random_bool(0.3).then(|| rng.random_range(1..4)),
                scale_down_delay_secs: rng.random_range(0..3) * 30,
                warm: rng.random_range(0..8),
                burst_percent: rng.random_range(0..4) * 50,
                retire_booting: rng.random_bool(0.5),
            };
            let demand = rng.random_bool(0.9).then(|| Demand {
                unclaimed: rng.random_range(0..30),
                running: rng.random_range(0..30),
            });
            let current = rng.random_range(0..15);
            let mut st = State::default();
            for t in 0..3u64 {
                let p = plan(
                    &mut st,
                    &Input {
                        demand,
                        controls: ctl,
                        current_replicas: current,
                        vms: &vms,
                        now_secs: t * 20,
                    },
                );
                // VMs that may hold a job: Active ones. Booting ones have no
                // runner yet; they count for the size but may be cancelled.
                let busy = vms.iter().filter(|v| v.state == VmState::Active).count() as u32;
                let live = vms
                    .iter()
                    .filter(|v| matches!(v.state, VmState::Active | VmState::Booting))
                    .count() as u32;
                if demand.is_some() {
                    assert!(p.replicas >= busy, "{ctl:?} {vms:?} -> {p:?}");
                    assert!(
                        p.replicas + p.cancel.len() as u32 >= live,
                        "{ctl:?} {vms:?} -> {p:?}"
                    );
                    assert!(p.replicas <= ctl.max.max(live));
                } else {
                    assert_eq!(p.replicas, current);
                    assert!(p.cancel.is_empty(), "no cancelling without demand");
                }
                if !ctl.retire_booting {
                    assert!(p.cancel.is_empty());
                }
                for r in &p.cancel {
                    let v = vms
                        .iter()
                        .find(|v| &v.name == r)
                        .expect("cancelled VM exists");
                    assert_eq!(
                        v.state,
                        VmState::Booting,
                        "only VMs without a guest are cancelled"
                    );
                }
                for r in &p.retire {
                    let v = vms
                        .iter()
                        .find(|v| &v.name == r)
                        .expect("retired VM exists");
                    assert_eq!(
                        v.state,
                        VmState::Stopped,
                        "only powered-off VMs are retired"
                    );
                }
            }
        }
    }
}
