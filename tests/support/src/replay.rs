//! Replaying a CI job trace into the CircleCI simulator, and measuring the
//! result: job waits from the simulator's ledger, and VM-hours from the
//! VirtualMachines the operator creates.
//!
//! - [`parse_trace`] / [`load_trace`]: CSV lines `arrival_s,duration_s[,group]`
//!   (the format of `/work/shared/traces` and `demo/traces`; a header line is
//!   skipped).
//! - [`replay`]: enqueues each job of a slice of the trace when its arrival
//!   time comes, scaled to wall-clock time, with its (simulated) duration.
//! - [`summary`]: jobs, finished, killed and wait percentiles of a ledger.
//! - [`VmHoursMeter`]: watches the operator's VirtualMachines and integrates
//!   their lifetimes in simulated hours.
//!
//! Times are simulated seconds unless named `wall`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use futures::StreamExt as _;
use kube::Client;
use kube::ResourceExt as _;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher::{self, Event, watcher};
use serde::{Deserialize, Serialize};

use crate::circleci::{CircleCiSim, EnqueueRequest, TaskId, TaskRecord, TaskState};

/// The label every object the operator creates carries.
pub const MANAGED_BY_SELECTOR: &str = "app.kubernetes.io/managed-by=runner-provisioner";

/// One job of a trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraceJob {
    /// Seconds since the trace's origin when the job became runnable.
    pub arrival_s: f64,
    /// How long it holds a runner, in seconds.
    pub duration_s: f64,
    /// The pipeline (workflow run) it belongs to, if the trace says.
    pub group: Option<String>,
    /// 1-based line number in the file (a stable job identity).
    pub line: usize,
}

fn parse_seconds(field: &str, what: &str, line: usize) -> Result<f64> {
    let v: f64 = field
        .trim()
        .parse()
        .with_context(|| format!("line {line}: {what} {:?} is not a number", field.trim()))?;
    if !(v.is_finite() && v >= 0.0) {
        bail!("line {line}: {what} must be a finite number >= 0, not {v}");
    }
    Ok(v)
}

/// Parses `arrival_s,duration_s[,group]` lines. The first line is skipped
/// when its first field is not a number (a header); blank lines and lines
/// starting with `#` are skipped. Jobs are returned sorted by arrival (stable,
/// so file order breaks ties).
pub fn parse_trace(text: &str) -> Result<Vec<TraceJob>> {
    let mut jobs = Vec::new();
    let mut first = true;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = l.split(',').collect();
        if std::mem::take(&mut first) && fields[0].trim().parse::<f64>().is_err() {
            continue; // header
        }
        if !(2..=3).contains(&fields.len()) {
            bail!(
                "line {line}: expected arrival_s,duration_s[,group], got {} fields",
                fields.len()
            );
        }
        let arrival_s = parse_seconds(fields[0], "arrival_s", line)?;
        let duration_s = parse_seconds(fields[1], "duration_s", line)?;
        let group = fields
            .get(2)
            .map(|g| g.trim().to_string())
            .filter(|g| !g.is_empty());
        jobs.push(TraceJob {
            arrival_s,
            duration_s,
            group,
            line,
        });
    }
    jobs.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    Ok(jobs)
}

/// Reads and parses a trace file.
pub fn load_trace(path: &Path) -> Result<Vec<TraceJob>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_trace(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The jobs arriving in `[from_s, to_s)`.
pub fn slice(jobs: &[TraceJob], from_s: f64, to_s: f64) -> Vec<&TraceJob> {
    jobs.iter()
        .filter(|j| j.arrival_s >= from_s && j.arrival_s < to_s)
        .collect()
}

/// Statistics of a slice of a trace (what the demo announces before it
/// starts).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SliceInfo {
    pub jobs: usize,
    /// Distinct groups (pipelines).
    pub groups: usize,
    /// Sum of durations, in hours.
    pub runner_hours: f64,
    /// The most jobs that would run at once if each started on arrival.
    pub peak_if_started_on_arrival: usize,
    /// The last `arrival + duration`, relative to `from_s`.
    pub last_end_s: f64,
}

/// [`SliceInfo`] of the jobs arriving in `[from_s, to_s)`.
pub fn slice_info(jobs: &[TraceJob], from_s: f64, to_s: f64) -> SliceInfo {
    let s = slice(jobs, from_s, to_s);
    let groups: HashSet<&str> = s.iter().filter_map(|j| j.group.as_deref()).collect();
    let intervals: Vec<(f64, f64)> = s
        .iter()
        .map(|j| (j.arrival_s, j.arrival_s + j.duration_s))
        .collect();
    SliceInfo {
        jobs: s.len(),
        groups: groups.len(),
        runner_hours: s.iter().map(|j| j.duration_s).sum::<f64>() / 3600.0,
        peak_if_started_on_arrival: peak_overlap(&intervals),
        last_end_s: s
            .iter()
            .map(|j| j.arrival_s + j.duration_s - from_s)
            .fold(0.0, f64::max),
    }
}

/// The most intervals `[start, end)` that overlap at one instant.
pub fn peak_overlap(intervals: &[(f64, f64)]) -> usize {
    let mut events: Vec<(f64, i32)> = Vec::with_capacity(intervals.len() * 2);
    for &(a, b) in intervals {
        if b > a {
            events.push((a, 1));
            events.push((b, -1));
        }
    }
    // Ends sort before starts at the same instant: [a, b) then [b, c) is 1.
    events.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
    let (mut now, mut peak) = (0i64, 0i64);
    for (_, d) in events {
        now += i64::from(d);
        peak = peak.max(now);
    }
    peak as usize
}

/// What [`replay`] did.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    /// Jobs enqueued (those arriving in `[from_s, to_s)`).
    pub enqueued: usize,
    /// Their task ids, in enqueue order (`job-<line>`).
    pub ids: Vec<TaskId>,
    /// The simulator's clock when the replay started: trace time `from_s`.
    pub start_sim_s: f64,
    /// The latest an enqueue happened after its scheduled wall time.
    pub max_lateness_wall_s: f64,
}

/// Enqueues each job of `jobs` arriving in `[from_s, to_s)` into `sim`'s
/// queue of `class` when its arrival comes: job `j` at wall time
/// `(j.arrival_s - from_s) / time_scale` after the call, with its duration
/// (simulated by `sim`). Task ids are `job-<line>`, labels the job's group.
/// Returns once every job of the slice is enqueued (not finished). Pass the
/// simulator's own time scale for arrivals to match its clock.
pub async fn replay(
    sim: &CircleCiSim,
    class: &str,
    jobs: &[TraceJob],
    time_scale: f64,
    from_s: f64,
    to_s: f64,
) -> Result<ReplayReport> {
    if !(time_scale.is_finite() && time_scale > 0.0) {
        bail!("time_scale must be a positive number");
    }
    if (sim.time_scale().0 - time_scale).abs() > 1e-9 * time_scale {
        tracing::warn!(
            replay = time_scale,
            simulator = sim.time_scale().0,
            "the replay's time scale differs from the simulator's: arrivals and durations run at different speeds"
        );
    }
    let mut slice = slice(jobs, from_s, to_s);
    slice.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    let start = tokio::time::Instant::now();
    let start_sim_s = sim.now_simulated().as_secs_f64();
    let mut ids = Vec::with_capacity(slice.len());
    let mut max_lateness = Duration::ZERO;
    for job in slice {
        let at = start + Duration::from_secs_f64((job.arrival_s - from_s) / time_scale);
        tokio::time::sleep_until(at).await;
        max_lateness = max_lateness.max(tokio::time::Instant::now().saturating_duration_since(at));
        let mut req = EnqueueRequest::new(class, Duration::from_secs_f64(job.duration_s))
            .id(&format!("job-{}", job.line));
        if let Some(g) = &job.group {
            req = req.label(g);
        }
        ids.extend(sim.enqueue_many(req)?);
    }
    Ok(ReplayReport {
        enqueued: ids.len(),
        ids,
        start_sim_s,
        max_lateness_wall_s: max_lateness.as_secs_f64(),
    })
}

/// The `p`-th percentile (0 < p <= 100) of ascending `sorted` by the
/// nearest-rank method: the smallest value with at least `p`% of the values
/// at or below it. `None` when empty.
pub fn percentile_nearest_rank(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Wait statistics, in simulated seconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WaitStats {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// p50/p95/p99 (nearest rank), max and mean of `waits`; `None` when empty.
pub fn wait_stats(waits: &[f64]) -> Option<WaitStats> {
    let mut v: Vec<f64> = waits.to_vec();
    v.sort_by(f64::total_cmp);
    Some(WaitStats {
        count: v.len(),
        p50: percentile_nearest_rank(&v, 50.0)?,
        p95: percentile_nearest_rank(&v, 95.0)?,
        p99: percentile_nearest_rank(&v, 99.0)?,
        max: *v.last()?,
        mean: v.iter().sum::<f64>() / v.len() as f64,
    })
}

/// What a ledger says about the jobs, in simulated time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    /// Distinct tasks (a re-queued task counts once).
    pub jobs: usize,
    /// Tasks with a finished attempt.
    pub finished: usize,
    /// Tasks running now.
    pub running: usize,
    /// Tasks waiting now.
    pub queued: usize,
    /// Attempts killed because their VM vanished (must be 0).
    pub killed: usize,
    /// Per claimed task: its last claim minus its first enqueue.
    pub wait: Option<WaitStats>,
    /// Claimed tasks that waited longer than 10 minutes.
    pub waited_over_10m: usize,
    /// Run time of finished attempts, in hours (what runners were busy for).
    pub busy_hours: f64,
    /// The most tasks running at once.
    pub peak_running: usize,
}

/// Summarizes `ledger`, only tasks of `class` when given. Waits are
/// `claimed_at - first_enqueued_at` of each task's last claimed attempt
/// (with no kills, its only attempt); unclaimed tasks have no wait yet.
pub fn summary(ledger: &[TaskRecord], class: Option<&str>) -> JobSummary {
    let records: Vec<&TaskRecord> = ledger
        .iter()
        .filter(|r| class.is_none_or(|c| r.resource_class == c))
        .collect();
    let mut by_id: BTreeMap<&TaskId, Vec<&TaskRecord>> = BTreeMap::new();
    for r in &records {
        by_id.entry(&r.id).or_default().push(r);
    }
    let mut waits = Vec::new();
    let (mut finished, mut running, mut queued) = (0, 0, 0);
    for attempts in by_id.values() {
        if attempts.iter().any(|r| r.state == TaskState::Finished) {
            finished += 1;
        }
        if attempts.iter().any(|r| r.state == TaskState::Running) {
            running += 1;
        }
        if attempts.iter().any(|r| r.state == TaskState::Queued) {
            queued += 1;
        }
        if let Some(w) = attempts
            .iter()
            .filter(|r| r.claimed_at.is_some())
            .max_by_key(|r| r.attempt)
            .and_then(|r| r.total_wait_secs())
        {
            waits.push(w.max(0.0));
        }
    }
    let now = records
        .iter()
        .flat_map(|r| {
            [
                Some(r.enqueued_at),
                r.claimed_at,
                r.finished_at,
                r.killed_at,
            ]
        })
        .flatten()
        .fold(0.0, f64::max);
    let intervals: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| {
            let start = r.claimed_at?;
            let end = r
                .finished_at
                .or(r.killed_at)
                .unwrap_or(now.max(start) + 1e-9);
            Some((start, end))
        })
        .collect();
    JobSummary {
        jobs: by_id.len(),
        finished,
        running,
        queued,
        killed: records.iter().filter(|r| r.killed).count(),
        waited_over_10m: waits.iter().filter(|&&w| w > 600.0).count(),
        wait: wait_stats(&waits),
        busy_hours: records
            .iter()
            .filter(|r| r.state == TaskState::Finished)
            .map(|r| r.duration_secs)
            .sum::<f64>()
            / 3600.0,
        peak_running: peak_overlap(&intervals),
    }
}

/// VM lifetimes, integrated. Times are seconds on any one clock.
#[derive(Debug, Default)]
pub struct Lifetimes {
    live: HashMap<String, Life>,
    closed_total: f64,
    closed_booting: f64,
    closed_running: f64,
    closed: usize,
    peak: usize,
}

#[derive(Debug)]
struct Life {
    created: f64,
    first_running: Option<f64>,
    running_since: Option<f64>,
    running: f64,
}

impl Life {
    /// (booting, running) up to `t`: creation to first `Running` (or `t`),
    /// and the time spent `Running`.
    fn split(&self, t: f64) -> (f64, f64) {
        let booting = (self.first_running.unwrap_or(t) - self.created).max(0.0);
        let running = self.running + self.running_since.map_or(0.0, |s| (t - s).max(0.0));
        (booting, running)
    }
}

/// Totals of [`Lifetimes`], in the same unit as the times given.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LifetimeTotals {
    /// Sum of (deletion or now) minus creation over all VMs.
    pub total: f64,
    /// Of that, creation to first `Running` (booting).
    pub booting: f64,
    /// Of that, the time VMs were `Running` (booted). The rest of `total` is
    /// after the guest stopped (powered off, not yet deleted).
    pub running: f64,
    /// VMs seen.
    pub vms_seen: usize,
    /// VMs existing now.
    pub vms_now: usize,
    /// Of those, not yet `Running` / `Running` / stopped after running.
    pub vms_booting: usize,
    pub vms_up: usize,
    pub vms_off: usize,
    /// The most VMs that existed at once.
    pub peak_vms: usize,
}

impl Lifetimes {
    /// The VM `uid` exists at time `t` (first sight starts its life), in
    /// state Running or not.
    pub fn observe(&mut self, uid: &str, t: f64, running: bool) {
        let life = self.live.entry(uid.to_string()).or_insert_with(|| Life {
            created: t,
            first_running: None,
            running_since: None,
            running: 0.0,
        });
        match (life.running_since, running) {
            (None, true) => {
                life.running_since = Some(t);
                life.first_running.get_or_insert(t);
            }
            (Some(since), false) => {
                life.running += (t - since).max(0.0);
                life.running_since = None;
            }
            _ => {}
        }
        self.peak = self.peak.max(self.live.len());
    }

    /// The VM `uid` is gone at time `t`. Unknown UIDs are ignored.
    pub fn delete(&mut self, uid: &str, t: f64) {
        if let Some(life) = self.live.remove(uid) {
            let (booting, running) = life.split(t);
            self.closed_total += (t - life.created).max(0.0);
            self.closed_booting += booting;
            self.closed_running += running;
            self.closed += 1;
        }
    }

    /// UIDs that exist.
    pub fn live_uids(&self) -> Vec<String> {
        self.live.keys().cloned().collect()
    }

    /// Totals with live VMs counted up to `t`.
    pub fn totals(&self, t: f64) -> LifetimeTotals {
        let mut total = self.closed_total;
        let mut booting_time = self.closed_booting;
        let mut running = self.closed_running;
        for life in self.live.values() {
            let (b, r) = life.split(t);
            total += (t - life.created).max(0.0);
            booting_time += b;
            running += r;
        }
        let up = self
            .live
            .values()
            .filter(|l| l.running_since.is_some())
            .count();
        let booting = self
            .live
            .values()
            .filter(|l| l.first_running.is_none())
            .count();
        LifetimeTotals {
            total,
            booting: booting_time,
            running,
            vms_seen: self.closed + self.live.len(),
            vms_now: self.live.len(),
            vms_booting: booting,
            vms_up: up,
            vms_off: self.live.len() - up - booting,
            peak_vms: self.peak,
        }
    }
}

/// VM-hours so far, in simulated hours.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VmHours {
    /// Sum over VMs of creation to deletion (or now).
    pub vm_hours: f64,
    /// Of that, creation to first `Running`.
    pub booting_hours: f64,
    /// Of that, hours VMs were `Running` (booted, runner up, idle or busy).
    /// The rest is after the guest stopped, until the VM was deleted.
    pub running_hours: f64,
    pub vms_seen: usize,
    pub vms_now: usize,
    /// Of `vms_now`: not yet `Running`, `Running`, stopped (powered off,
    /// waiting to be deleted).
    pub vms_booting: usize,
    pub vms_up: usize,
    pub vms_off: usize,
    pub peak_vms: usize,
}

impl VmHours {
    /// What accrued between `earlier` and `self` (the hour fields are
    /// cumulative); `vms_seen` is the VMs first seen in between, `vms_now`
    /// and `peak_vms` are `self`'s.
    pub fn since(&self, earlier: &VmHours) -> VmHours {
        VmHours {
            vm_hours: self.vm_hours - earlier.vm_hours,
            booting_hours: self.booting_hours - earlier.booting_hours,
            running_hours: self.running_hours - earlier.running_hours,
            vms_seen: self.vms_seen.saturating_sub(earlier.vms_seen),
            ..self.clone()
        }
    }
}

/// Watches VirtualMachines (kubevirt.io/v1) labelled
/// [`MANAGED_BY_SELECTOR`] and integrates their lifetimes: from when the
/// watch first sees a VM to when it sees it gone, and the part of that with
/// `status.printableStatus: Running`. Wall-clock lifetimes times the time
/// scale are simulated time. VMs that exist when the meter starts count from
/// then. Dropping the meter stops the watch.
pub struct VmHoursMeter {
    state: Arc<Mutex<Lifetimes>>,
    synced: Arc<tokio::sync::Notify>,
    synced_flag: Arc<std::sync::atomic::AtomicBool>,
    start: Instant,
    time_scale: f64,
    task: tokio::task::JoinHandle<()>,
}

impl VmHoursMeter {
    /// Starts watching VMs in `namespace` (all namespaces when `None`).
    pub fn start(client: Client, namespace: Option<&str>, time_scale: f64) -> VmHoursMeter {
        let ar = crate::kubevirt::vm_resource();
        let api: Api<DynamicObject> = match namespace {
            Some(ns) => Api::namespaced_with(client, ns, &ar),
            None => Api::all_with(client, &ar),
        };
        let state = Arc::new(Mutex::new(Lifetimes::default()));
        let synced = Arc::new(tokio::sync::Notify::new());
        let synced_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let start = Instant::now();
        let task = {
            let (state, synced, synced_flag) = (state.clone(), synced.clone(), synced_flag.clone());
            tokio::spawn(async move {
                let cfg = watcher::Config::default().labels(MANAGED_BY_SELECTOR);
                let mut stream = std::pin::pin!(watcher(api, cfg));
                let mut listed: HashSet<String> = HashSet::new();
                let now = || start.elapsed().as_secs_f64();
                let running = |o: &DynamicObject| {
                    o.data["status"]["printableStatus"].as_str() == Some("Running")
                };
                while let Some(ev) = stream.next().await {
                    match ev {
                        Ok(Event::Init) => listed.clear(),
                        Ok(Event::InitApply(o)) => {
                            let uid = o.uid().unwrap_or_default();
                            state.lock().unwrap().observe(&uid, now(), running(&o));
                            listed.insert(uid);
                        }
                        Ok(Event::InitDone) => {
                            let mut st = state.lock().unwrap();
                            let t = now();
                            for uid in st.live_uids() {
                                if !listed.contains(&uid) {
                                    st.delete(&uid, t);
                                }
                            }
                            drop(st);
                            synced_flag.store(true, std::sync::atomic::Ordering::SeqCst);
                            synced.notify_waiters();
                        }
                        Ok(Event::Apply(o)) => {
                            let uid = o.uid().unwrap_or_default();
                            state.lock().unwrap().observe(&uid, now(), running(&o));
                        }
                        Ok(Event::Delete(o)) => {
                            let uid = o.uid().unwrap_or_default();
                            state.lock().unwrap().delete(&uid, now());
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "VM-hours meter: watch error (retrying)");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            })
        };
        VmHoursMeter {
            state,
            synced,
            synced_flag,
            start,
            time_scale,
            task,
        }
    }

    /// Waits until the first list of VMs is in (or `timeout`).
    pub async fn wait_synced(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.synced_flag.load(std::sync::atomic::Ordering::SeqCst) {
            let notified = self.synced.notified();
            if self.synced_flag.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!("the VM watch did not list VMs within {timeout:?}");
            }
        }
        Ok(())
    }

    /// VM-hours (simulated) up to now.
    pub fn snapshot(&self) -> VmHours {
        let t = self.start.elapsed().as_secs_f64();
        let tot = self.state.lock().unwrap().totals(t);
        let h = self.time_scale / 3600.0;
        VmHours {
            vm_hours: tot.total * h,
            booting_hours: tot.booting * h,
            running_hours: tot.running * h,
            vms_seen: tot.vms_seen,
            vms_now: tot.vms_now,
            vms_booting: tot.vms_booting,
            vms_up: tot.vms_up,
            vms_off: tot.vms_off,
            peak_vms: tot.peak_vms,
        }
    }
}

impl Drop for VmHoursMeter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_and_without_header_and_group() {
        let t = parse_trace("arrival_s,duration_s,group\n0,144,17\n\n5,10,18\n2,3,17\n").unwrap();
        assert_eq!(t.len(), 3);
        // sorted by arrival; `line` keeps the file position
        assert_eq!(
            t.iter().map(|j| j.arrival_s).collect::<Vec<_>>(),
            [0.0, 2.0, 5.0]
        );
        assert_eq!(t[1].line, 5);
        assert_eq!(t[1].group.as_deref(), Some("17"));
        assert_eq!(t[0].duration_s, 144.0);

        let t = parse_trace("# comment\n10,20\n11.5, 7\n").unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].group, None);
        assert_eq!(t[1].arrival_s, 11.5);
        assert_eq!(t[1].duration_s, 7.0);
        assert!(parse_trace("").unwrap().is_empty());
        assert!(parse_trace("arrival_s,duration_s\n").unwrap().is_empty());
    }

    #[test]
    fn stable_sort_keeps_file_order_on_ties() {
        let t = parse_trace("3,1,a\n1,1,b\n1,2,c\n").unwrap();
        assert_eq!(
            t.iter()
                .map(|j| j.group.as_deref().unwrap())
                .collect::<Vec<_>>(),
            ["b", "c", "a"]
        );
    }

    #[test]
    fn rejects_bad_lines_with_their_number() {
        let e = parse_trace("arrival_s,duration_s\n1,2\nx,3\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 3"), "{e:#}");
        let e = parse_trace("1,2\n1\n").unwrap_err();
        assert!(format!("{e:#}").contains("line 2"), "{e:#}");
        assert!(parse_trace("1,2,3,4\n").is_err());
        assert!(parse_trace("1,-2\n").is_err());
        assert!(parse_trace("1,inf\n").is_err());
        // Only the first line may be a header.
        assert!(parse_trace("1,2\narrival_s,duration_s\n").is_err());
    }

    #[test]
    fn the_shipped_trace_parses() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../demo/traces/bitcoin-core-gha-3d.csv");
        let t = load_trace(&path).unwrap();
        assert!(t.len() > 500, "{}", t.len());
        assert!(t.iter().all(|j| j.arrival_s < 3.0 * 86400.0));
        assert!(t.iter().all(|j| j.duration_s > 0.0 && j.group.is_some()));
    }

    #[test]
    fn slices_are_half_open() {
        let t = parse_trace("0,10,a\n100,10,a\n200,50,b\n300,10,c\n").unwrap();
        let s = slice(&t, 100.0, 300.0);
        assert_eq!(s.len(), 2);
        let info = slice_info(&t, 100.0, 300.0);
        assert_eq!(info.jobs, 2);
        assert_eq!(info.groups, 2);
        assert_eq!(info.last_end_s, 150.0);
        assert!((info.runner_hours - 60.0 / 3600.0).abs() < 1e-12);
        assert_eq!(info.peak_if_started_on_arrival, 1);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile_nearest_rank(&v, 50.0), Some(50.0));
        assert_eq!(percentile_nearest_rank(&v, 95.0), Some(95.0));
        assert_eq!(percentile_nearest_rank(&v, 99.0), Some(99.0));
        assert_eq!(percentile_nearest_rank(&v, 100.0), Some(100.0));
        // Wikipedia's example: 15, 20, 35, 40, 50.
        let w = [15.0, 20.0, 35.0, 40.0, 50.0];
        assert_eq!(percentile_nearest_rank(&w, 5.0), Some(15.0));
        assert_eq!(percentile_nearest_rank(&w, 30.0), Some(20.0));
        assert_eq!(percentile_nearest_rank(&w, 40.0), Some(20.0));
        assert_eq!(percentile_nearest_rank(&w, 50.0), Some(35.0));
        assert_eq!(percentile_nearest_rank(&w, 100.0), Some(50.0));
        assert_eq!(percentile_nearest_rank(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile_nearest_rank(&[], 50.0), None);
    }

    #[test]
    fn wait_stats_sort_their_input() {
        let s = wait_stats(&[30.0, 10.0, 20.0, 40.0]).unwrap();
        assert_eq!(s.count, 4);
        assert_eq!(s.p50, 20.0);
        assert_eq!(s.p95, 40.0);
        assert_eq!(s.p99, 40.0);
        assert_eq!(s.max, 40.0);
        assert_eq!(s.mean, 25.0);
        assert_eq!(wait_stats(&[]), None);
    }

    #[test]
    fn peak_overlap_counts_touching_intervals_once() {
        assert_eq!(peak_overlap(&[]), 0);
        assert_eq!(peak_overlap(&[(0.0, 10.0), (10.0, 20.0)]), 1);
        assert_eq!(peak_overlap(&[(0.0, 10.0), (5.0, 20.0), (6.0, 7.0)]), 3);
        assert_eq!(peak_overlap(&[(0.0, 0.0)]), 0);
    }

    fn rec(
        id: &str,
        attempt: u32,
        state: TaskState,
        times: (f64, f64, Option<f64>, Option<f64>),
    ) -> TaskRecord {
        let (first, enq, claimed, finished) = times;
        TaskRecord {
            id: TaskId(id.into()),
            attempt,
            resource_class: "sim-org/linux".into(),
            label: None,
            duration_secs: 100.0,
            state,
            first_enqueued_at: first,
            enqueued_at: enq,
            claimed_at: claimed,
            finished_at: finished,
            killed: state == TaskState::Killed,
            killed_at: (state == TaskState::Killed).then_some(enq + 50.0),
            runner: None,
        }
    }

    #[test]
    fn summary_of_a_ledger() {
        use TaskState::*;
        let mut other = rec("x", 1, Queued, (0.0, 0.0, None, None));
        other.resource_class = "other/class".into();
        let ledger = vec![
            rec("a", 1, Finished, (0.0, 0.0, Some(10.0), Some(110.0))),
            rec("b", 1, Finished, (0.0, 0.0, Some(30.0), Some(130.0))),
            // c: killed after its first claim at 20, re-queued at 70, claimed at 700
            rec("c", 1, Killed, (0.0, 0.0, Some(20.0), None)),
            rec("c", 2, Running, (0.0, 70.0, Some(700.0), None)),
            rec("d", 1, Queued, (500.0, 500.0, None, None)),
            other,
        ];
        let s = summary(&ledger, Some("sim-org/linux"));
        assert_eq!(s.jobs, 4);
        assert_eq!(s.finished, 2);
        assert_eq!(s.running, 1);
        assert_eq!(s.queued, 1);
        assert_eq!(s.killed, 1);
        let w = s.wait.unwrap();
        // a: 10, b: 30, c: 700 (its last claim, from its first enqueue)
        assert_eq!(w.count, 3);
        assert_eq!(w.p50, 30.0);
        assert_eq!(w.p95, 700.0);
        assert_eq!(w.max, 700.0);
        assert!((w.mean - 740.0 / 3.0).abs() < 1e-9);
        assert_eq!(s.waited_over_10m, 1);
        assert!((s.busy_hours - 200.0 / 3600.0).abs() < 1e-12);
        // a [10,110), b [30,130), c#1 [20,50): 3 at t=30..50
        assert_eq!(s.peak_running, 3);

        let all = summary(&ledger, None);
        assert_eq!(all.jobs, 5);
        assert_eq!(all.queued, 2);
        let empty = summary(&[], None);
        assert_eq!(empty.jobs, 0);
        assert_eq!(empty.wait, None);
    }

    #[test]
    fn lifetimes_integrate_existence_and_running() {
        let mut l = Lifetimes::default();
        l.observe("a", 0.0, false);
        l.observe("b", 1.0, false);
        l.observe("a", 2.0, true); // a boots at 2
        l.observe("a", 3.0, true); // no change
        assert_eq!(l.totals(4.0).total, 4.0 + 3.0);
        assert_eq!(l.totals(4.0).booting, 2.0 + 3.0);
        assert_eq!(l.totals(4.0).running, 2.0);
        l.observe("a", 6.0, false); // a powers off at 6
        l.delete("a", 7.0);
        l.delete("a", 8.0); // twice: ignored
        l.delete("zz", 8.0); // unknown: ignored
        l.observe("b", 8.0, true);
        let t = l.totals(10.0);
        assert_eq!(t.total, 7.0 + 9.0);
        assert_eq!(t.booting, 2.0 + 7.0);
        assert_eq!(t.running, 4.0 + 2.0);
        assert_eq!(t.vms_seen, 2);
        assert_eq!(t.vms_now, 1);
        assert_eq!((t.vms_booting, t.vms_up, t.vms_off), (0, 1, 0));
        assert_eq!(t.peak_vms, 2);
        l.observe("d", 9.0, false);
        l.observe("d", 9.5, true);
        l.observe("d", 9.75, false);
        l.observe("e", 9.9, false);
        let t = l.totals(10.0);
        assert_eq!((t.vms_booting, t.vms_up, t.vms_off), (1, 1, 1));
        assert_eq!(t.peak_vms, 3);
        l.delete("d", 10.0);
        l.delete("e", 10.0);
        l.delete("b", 10.0); // deleted while Running: counts up to deletion
        l.observe("c", 11.0, true);
        let t = l.totals(12.0);
        // a 7, b 9, c 1, d 1, e 0.1
        assert!((t.total - (7.0 + 9.0 + 1.0 + 1.0 + 0.1)).abs() < 1e-9);
        assert!((t.booting - (2.0 + 7.0 + 0.5 + 0.1)).abs() < 1e-9);
        assert!((t.running - (4.0 + 2.0 + 1.0 + 0.25)).abs() < 1e-9);
        assert_eq!(t.vms_seen, 5);
        assert_eq!(t.vms_now, 1);
        assert_eq!(t.peak_vms, 3);
    }

    #[test]
    fn vm_hours_since_subtracts_the_cumulative_fields() {
        let a = VmHours {
            vm_hours: 1.0,
            booting_hours: 0.5,
            running_hours: 0.25,
            vms_seen: 3,
            vms_now: 3,
            vms_booting: 0,
            vms_up: 3,
            vms_off: 0,
            peak_vms: 3,
        };
        let b = VmHours {
            vm_hours: 11.0,
            booting_hours: 2.5,
            running_hours: 6.25,
            vms_seen: 13,
            vms_now: 4,
            vms_booting: 1,
            vms_up: 2,
            vms_off: 1,
            peak_vms: 9,
        };
        let d = b.since(&a);
        assert_eq!(d.vm_hours, 10.0);
        assert_eq!(d.booting_hours, 2.0);
        assert_eq!(d.running_hours, 6.0);
        assert_eq!(d.vms_seen, 10);
        assert_eq!((d.vms_now, d.vms_off, d.peak_vms), (4, 1, 9));
    }
}
