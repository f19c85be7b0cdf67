//! Replays a CI job trace in virtual time through the shipped scaling policy
//! ([`crate::scaler::policy::plan`], with the controls a [`ValidSpec`]
//! resolves to at each moment, schedules and forecast included).
//!
//! The model of the world, as the operator meets it:
//! - a job becomes an unclaimed task at its arrival;
//! - each poll (every `poll`) the scaler reads `unclaimed` and `running`,
//!   plans, writes `replicas`, and deletes powered-off VMs (the plan's
//!   `retire`); a VirtualMachinePool with `scaleInStrategy: unmanaged`
//!   creates VMs up to `replicas` at once and never deletes any;
//! - a VM boots in a time drawn uniformly from `[boot_min, boot_max]`, then
//!   its runner claims the oldest unclaimed task (or waits, idle, for one:
//!   an idle runner claims a new task the moment it arrives); after
//!   `idleTimeout` without a task, or after its one task, the VM powers off;
//! - a retired VM that was not powered off would be a killed job: counted,
//!   and its task re-queued (the policy never does it; the count proves it).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::crd::ValidSpec;
use crate::scaler::forecast::Forecast;
use crate::scaler::policy::{self, Demand, Input, VmState, VmView};

/// One job of a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// Seconds since the trace's start.
    pub arrival: f64,
    /// Run time in seconds.
    pub duration: f64,
}

/// Parses `arrival_s,duration_s[,group...]` lines (a header line is
/// skipped); rows must be sorted by arrival.
pub fn parse_trace(text: &str) -> Result<Vec<Job>, String> {
    let mut jobs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut f = line.split(',');
        let (a, d) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
        let (Ok(arrival), Ok(duration)) = (a.trim().parse::<f64>(), d.trim().parse::<f64>()) else {
            if i == 0 {
                continue; // header
            }
            return Err(format!(
                "line {}: expected arrival_s,duration_s: {line:?}",
                i + 1
            ));
        };
        if !(arrival >= 0.0 && duration >= 0.0) {
            return Err(format!("line {}: negative or NaN values", i + 1));
        }
        if jobs.last().is_some_and(|j: &Job| j.arrival > arrival) {
            return Err(format!("line {}: rows are not sorted by arrival", i + 1));
        }
        jobs.push(Job { arrival, duration });
    }
    Ok(jobs)
}

/// Which policy to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyChoice {
    /// The RunnerPool's own scaling spec (everything the operator does).
    Operator,
    /// CircleCI's Runner Provisioner: `clamp(unclaimed + running, min, max)`;
    /// only min, max and idleTimeout of the spec are used.
    Reference,
}

/// Simulation options.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Poll interval (the reference's is 5 s).
    pub poll: Duration,
    /// Shortest VM boot (creation to runner ready).
    pub boot_min: Duration,
    /// Longest VM boot.
    pub boot_max: Duration,
    /// Seeds the boot times.
    pub seed: u64,
    /// Replay only jobs arriving before this; VM-hours are counted up to it.
    /// `None`: the whole trace, VM-hours up to the last arrival.
    pub horizon: Option<Duration>,
    /// Wall-clock time of the trace's second 0 (schedules and the forecast
    /// read the time of day and week from it).
    pub start: jiff::Timestamp,
    /// Record a timeline sample this often (`None`: no timeline).
    pub sample_every: Option<Duration>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(5),
            boot_min: Duration::from_secs(120),
            boot_max: Duration::from_secs(300),
            seed: 1,
            horizon: None,
            // bitcoin-core-gha.csv's first arrival.
            start: "2025-09-04T17:25:47Z".parse().expect("valid timestamp"),
            sample_every: None,
        }
    }
}

/// Wait statistics in seconds (nearest-rank percentiles).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WaitStats {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl WaitStats {
    /// The statistics of `waits`.
    pub fn of(waits: &mut [f64]) -> Self {
        if waits.is_empty() {
            return Self::default();
        }
        waits.sort_by(f64::total_cmp);
        let rank = |q: f64| {
            let i = ((q * waits.len() as f64).ceil() as usize).clamp(1, waits.len()) - 1;
            waits[i]
        };
        Self {
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            max: waits[waits.len() - 1],
            mean: waits.iter().sum::<f64>() / waits.len() as f64,
        }
    }
}

/// One timeline sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds since the trace's start.
    pub t: f64,
    /// Unclaimed tasks.
    pub queued: u32,
    /// Running tasks.
    pub running: u32,
    /// VMs that exist.
    pub vms: u32,
    /// `spec.replicas`.
    pub replicas: u32,
}

/// What a replay measured.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SimResult {
    /// Which policy.
    pub policy: PolicyChoice,
    /// Jobs replayed.
    pub jobs: usize,
    /// Job wait (arrival to claim).
    pub wait_secs: WaitStats,
    /// VM-hours (creation to deletion), within the horizon.
    pub vm_hours: f64,
    /// Hours VMs sat ready without a job.
    pub idle_vm_hours: f64,
    /// Hours VMs spent booting.
    pub boot_vm_hours: f64,
    /// VMs created.
    pub vms_booted: u64,
    /// VMs deleted while their runner could have been running a job (must
    /// be 0).
    pub busy_vms_killed: u64,
    /// VMs deleted while still booting (surplus, no runner yet).
    pub boots_cancelled: u64,
    /// CircleCI API calls (two per poll).
    pub circleci_calls: u64,
    /// Writes of `replicas`.
    pub replica_writes: u64,
    /// Timeline samples (when asked for).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<Sample>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Vm {
    Booting { ready_at: u64 },
    Idle { since: u64, generation: u32 },
    Busy { job: usize, since: u64 },
    Stopped,
}

struct VmRec {
    created: u64,
    ready_at: u64,
    deleted: Option<u64>,
    state: Vm,
    generation: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    // Order within one millisecond: finishing work first frees VMs, then
    // boots, then arrivals, then the poll sees the result.
    JobDone(usize),
    IdleTimeout(usize, u32),
    BootDone(usize),
    Arrival(usize),
    Tick,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// `spec` reduced to what the reference uses.
pub fn reference_spec(spec: &ValidSpec) -> ValidSpec {
    ValidSpec {
        headroom: 0,
        idle_buffer: 0,
        max_surge: None,
        scale_down_delay: Duration::ZERO,
        schedules: Vec::new(),
        forecast_percent: None,
        burst_percent: 0,
        retire_booting: false,
        idle_poll_interval: Duration::ZERO,
        ..spec.clone()
    }
}

/// Replays `jobs` under `spec` (see the module doc).
pub fn simulate(jobs: &[Job], spec: &ValidSpec, choice: PolicyChoice, o: &SimOptions) -> SimResult {
    let spec = match choice {
        PolicyChoice::Operator => spec.clone(),
        PolicyChoice::Reference => reference_spec(spec),
    };
    let horizon_ms = o.horizon.map(ms);
    let jobs: Vec<&Job> = jobs
        .iter()
        .filter(|j| horizon_ms.is_none_or(|h| ((j.arrival * 1000.0) as u64) < h))
        .collect();
    let end_ms =
        horizon_ms.unwrap_or_else(|| jobs.last().map_or(0, |j| (j.arrival * 1000.0) as u64));
    let idle_ms = spec.idle_timeout.map(ms);
    let (bmin, bmax) = (ms(o.boot_min), ms(o.boot_max).max(ms(o.boot_min)));
    let mut rng = StdRng::seed_from_u64(o.seed);

    let mut heap: BinaryHeap<Reverse<(u64, Ev)>> = BinaryHeap::new();
    for (i, j) in jobs.iter().enumerate() {
        heap.push(Reverse(((j.arrival * 1000.0) as u64, Ev::Arrival(i))));
    }
    heap.push(Reverse((0, Ev::Tick)));

    let mut vms: Vec<VmRec> = Vec::new();
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut claimed_at: Vec<Option<u64>> = vec![None; jobs.len()];
    let mut replicas: u32 = spec.min_replicas.max(0) as u32;
    let mut state = policy::State::default();
    let mut forecast = Forecast::default();
    let mut r = SimResult {
        policy: choice,
        jobs: jobs.len(),
        wait_secs: WaitStats::default(),
        vm_hours: 0.0,
        idle_vm_hours: 0.0,
        boot_vm_hours: 0.0,
        vms_booted: 0,
        busy_vms_killed: 0,
        boots_cancelled: 0,
        circleci_calls: 0,
        replica_writes: 0,
        timeline: Vec::new(),
    };
    let clip = |a: u64, b: u64| (b.min(end_ms).saturating_sub(a.min(end_ms))) as f64 / 3.6e6;
    let mut unclaimed_jobs = jobs.len();
    let mut next_sample = 0u64;
    let mut busy_at = 0u64;

    // Starts the next queued job on VM `v` at `now`, or leaves it idle.
    macro_rules! take_or_idle {
        ($v:expr, $now:expr) => {{
            let v = $v;
            if let Some(job) = queue.pop_front() {
                claimed_at[job] = Some($now);
                unclaimed_jobs -= 1;
                vms[v].state = Vm::Busy { job, since: $now };
                let dur = (jobs[job].duration * 1000.0) as u64;
                heap.push(Reverse(($now + dur, Ev::JobDone(v))));
            } else {
                vms[v].generation += 1;
                let generation = vms[v].generation;
                vms[v].state = Vm::Idle {
                    since: $now,
                    generation,
                };
                if let Some(t) = idle_ms {
                    heap.push(Reverse(($now + t, Ev::IdleTimeout(v, generation))));
                }
            }
        }};
    }

    while let Some(Reverse((now, ev))) = heap.pop() {
        match ev {
            Ev::Arrival(i) => {
                queue.push_back(i);
                // An idle runner claims it at once (the one idle longest).
                let idle = vms
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.deleted.is_none())
                    .filter_map(|(k, v)| match v.state {
                        Vm::Idle { since, .. } => Some((since, k)),
                        _ => None,
                    })
                    .min();
                if let Some((since, k)) = idle {
                    r.idle_vm_hours += clip(since, now);
                    take_or_idle!(k, now);
                }
            }
            Ev::BootDone(v) => {
                if vms[v].deleted.is_none() && matches!(vms[v].state, Vm::Booting { .. }) {
                    take_or_idle!(v, now);
                }
            }
            Ev::JobDone(v) => {
                if let Vm::Busy { .. } = vms[v].state {
                    vms[v].state = Vm::Stopped;
                }
            }
            Ev::IdleTimeout(v, g) => {
                if let Vm::Idle { since, generation } = vms[v].state
                    && generation == g
                    && vms[v].deleted.is_none()
                {
                    r.idle_vm_hours += clip(since, now);
                    vms[v].state = Vm::Stopped;
                }
            }
            Ev::Tick => {
                r.circleci_calls += 2;
                let running = vms
                    .iter()
                    .filter(|v| v.deleted.is_none() && matches!(v.state, Vm::Busy { .. }))
                    .count() as u32;
                let demand = Demand {
                    unclaimed: queue.len() as u32,
                    running,
                };
                if demand.unclaimed + demand.running > 0 {
                    busy_at = now;
                }
                let wall = o
                    .start
                    .checked_add(jiff::SignedDuration::from_millis(now as i64))
                    .unwrap_or(o.start);
                let warm = match spec.forecast_percent {
                    Some(p) => {
                        forecast.observe(wall, demand.unclaimed + demand.running);
                        forecast.warm(wall, p)
                    }
                    None => 0,
                };
                let views: Vec<VmView> = vms
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.deleted.is_none())
                    .map(|(k, v)| VmView {
                        name: k.to_string(),
                        state: match v.state {
                            Vm::Stopped => VmState::Stopped,
                            Vm::Booting { .. } => VmState::Booting,
                            _ => VmState::Active,
                        },
                        ready: matches!(v.state, Vm::Idle { .. } | Vm::Busy { .. }),
                        has_pool_finalizer: true,
                        created_secs: (v.created / 1000) as i64,
                    })
                    .collect();
                let (controls, _) = spec.controls_at(wall, warm);
                let plan = policy::plan(
                    &mut state,
                    &Input {
                        demand: Some(demand),
                        controls,
                        current_replicas: replicas,
                        vms: &views,
                        now_secs: now / 1000,
                    },
                );
                if plan.replicas != replicas {
                    r.replica_writes += 1;
                    replicas = plan.replicas;
                }
                for name in plan.retire.iter().chain(&plan.cancel) {
                    let k: usize = name.parse().expect("VM names are indices");
                    match vms[k].state {
                        Vm::Stopped => {}
                        Vm::Busy { job, .. } => {
                            r.busy_vms_killed += 1;
                            claimed_at[job] = None;
                            unclaimed_jobs += 1;
                            queue.push_front(job);
                        }
                        Vm::Idle { since, .. } => {
                            r.busy_vms_killed += 1; // a runner that could have claimed a job
                            r.idle_vm_hours += clip(since, now);
                        }
                        Vm::Booting { .. } => {
                            r.boots_cancelled += 1;
                            vms[k].ready_at = now;
                        }
                    }
                    vms[k].deleted = Some(now);
                }
                // The pool (unmanaged scale-in) creates VMs up to replicas.
                let live = vms.iter().filter(|v| v.deleted.is_none()).count() as u32;
                for _ in live..replicas {
                    let boot = if bmax > bmin {
                        rng.random_range(bmin..=bmax)
                    } else {
                        bmin
                    };
                    let k = vms.len();
                    vms.push(VmRec {
                        created: now,
                        ready_at: now + boot,
                        deleted: None,
                        state: Vm::Booting {
                            ready_at: now + boot,
                        },
                        generation: 0,
                    });
                    r.vms_booted += 1;
                    heap.push(Reverse((now + boot, Ev::BootDone(k))));
                }
                if let Some(every) = o.sample_every
                    && now >= next_sample
                {
                    next_sample = now + ms(every);
                    r.timeline.push(Sample {
                        t: now as f64 / 1000.0,
                        queued: demand.unclaimed,
                        running,
                        vms: replicas.max(live),
                        replicas,
                    });
                }
                // Stop once every job is claimed and the horizon is passed.
                if unclaimed_jobs > 0 || now < end_ms {
                    let quiet = Duration::from_millis(now - busy_at);
                    let delay = crate::scaler::budget::poll_interval(
                        o.poll,
                        spec.idle_poll_interval,
                        quiet,
                    );
                    heap.push(Reverse((now + ms(delay).max(1), Ev::Tick)));
                }
            }
        }
        if heap.iter().all(|Reverse((_, e))| *e != Ev::Tick) && unclaimed_jobs == 0 && now >= end_ms
        {
            break;
        }
    }

    // Accounting up to the horizon.
    for v in &vms {
        let end = v.deleted.unwrap_or(end_ms);
        r.vm_hours += clip(v.created, end);
        r.boot_vm_hours += clip(v.created, v.ready_at.min(end));
        if let Vm::Idle { since, .. } = v.state
            && v.deleted.is_none()
        {
            r.idle_vm_hours += clip(since, end);
        }
    }
    let mut waits: Vec<f64> = claimed_at
        .iter()
        .zip(&jobs)
        .filter_map(|(c, j)| c.map(|c| c as f64 / 1000.0 - j.arrival))
        .collect();
    r.wait_secs = WaitStats::of(&mut waits);
    r
}

/// A text table of results, one row per `(label, result)`.
pub fn table(rows: &[(&str, &SimResult)]) -> String {
    let mut out = format!(
        "{:<28} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>8} {:>7} {:>6} {:>9}\n",
        "policy",
        "jobs",
        "p50 s",
        "p95 s",
        "p99 s",
        "max s",
        "mean s",
        "VM-h",
        "idle VM-h",
        "booted",
        "killed",
        "API calls"
    );
    for (label, r) in rows {
        let w = &r.wait_secs;
        out.push_str(&format!(
            "{:<28} {:>6} {:>7.0} {:>7.0} {:>7.0} {:>7.0} {:>7.1} {:>9.1} {:>8.1} {:>7} {:>6} {:>9}\n",
            label, r.jobs, w.p50, w.p95, w.p99, w.max, w.mean, r.vm_hours, r.idle_vm_hours, r.vms_booted, r.busy_vms_killed, r.circleci_calls
        ));
    }
    out
}

pub mod bench;
pub mod plot;
