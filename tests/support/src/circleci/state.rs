//! The simulator's shared state: task queues, the ledger, agents, faults and
//! request counters. Everything here is synchronous and runs under one mutex
//! that is never held across an `.await`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::faults::ActiveFault;
use super::model::{
    AgentInfo, AgentState, Counts, Endpoint, EnqueueRequest, ExitReason, RequestEvent,
    RequestStats, RunnerInfo, RunnerRef, TaskId, TaskRecord, TaskState,
};
use crate::guest::TimeScale;

/// The version the simulated agents report in the runner list.
pub const AGENT_VERSION: &str = "3.0.0-sim";

/// How many request events are kept.
const REQUEST_LOG_CAP: usize = 100_000;

/// Simulated clock: simulated time runs `scale` times faster than wall time,
/// from the moment the simulator started.
#[derive(Debug)]
pub(crate) struct Clock {
    start: Instant,
    start_wall: SystemTime,
    pub scale: TimeScale,
}

impl Clock {
    pub fn new(scale: TimeScale) -> Self {
        Clock {
            start: Instant::now(),
            start_wall: SystemTime::now(),
            scale,
        }
    }
    pub fn now_simulated(&self) -> Duration {
        self.scale.simulated(self.start.elapsed())
    }
    pub fn sim_secs(&self) -> f64 {
        self.now_simulated().as_secs_f64()
    }
    pub fn wall_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
    pub fn started_at(&self) -> SystemTime {
        self.start_wall
    }
}

/// Settings that can change while the simulator runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Org-wide cap on concurrently running tasks across all classes
    /// (`None`: unlimited). Queued tasks beyond it stay unclaimed.
    pub concurrency_limit: Option<usize>,
    /// Simulated seconds from guest boot until its agent is connected.
    pub registration_delay_secs: f64,
    /// Simulated seconds an exited runner stays in the runner list.
    pub runner_retention_secs: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            concurrency_limit: None,
            registration_delay_secs: 5.0,
            runner_retention_secs: 3600.0,
        }
    }
}

/// A simulated agent's bookkeeping.
#[derive(Debug)]
pub(crate) struct Agent {
    pub info: AgentInfo,
    pub cancel: CancellationToken,
    running_serial: Option<u64>,
    first_connected_wall: Option<SystemTime>,
    last_used_wall: Option<SystemTime>,
    exited_wall: Option<SystemTime>,
    ip: String,
}

/// What the runner list is filtered by.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RunnerFilter {
    Class(String),
    Namespace(String),
    All,
}

/// Result of an agent's claim attempt.
#[derive(Debug, PartialEq)]
pub(crate) enum Claim {
    Got {
        task: TaskId,
        serial: u64,
        duration: Duration,
    },
    Wait,
    Gone,
}

#[derive(Debug, Default)]
pub(crate) struct SimState {
    pub api_tokens: HashSet<String>,
    /// Resource class -> runner token.
    pub classes: BTreeMap<String, String>,
    pub settings: Settings,
    next_serial: u64,
    next_task: u64,
    next_agent: u64,
    /// One record per attempt, keyed by a serial in queue order.
    ledger: BTreeMap<u64, TaskRecord>,
    queues: HashMap<String, VecDeque<u64>>,
    running_by_class: HashMap<String, usize>,
    running_total: usize,
    agents: BTreeMap<u64, Agent>,
    by_vmi: HashMap<String, u64>,
    pub faults: Vec<ActiveFault>,
    pub stats: RequestStats,
    pub log: VecDeque<RequestEvent>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl SimState {
    pub fn new(settings: Settings) -> Self {
        SimState {
            settings,
            ..Default::default()
        }
    }

    /// The class whose runner token this is (first registered wins).
    pub fn class_for_runner_token(&self, token: &str) -> Option<String> {
        self.classes
            .iter()
            .find(|(_, t)| t.as_str() == token)
            .map(|(c, _)| c.clone())
    }

    pub fn enqueue(&mut self, req: &EnqueueRequest, now: f64) -> Result<Vec<TaskId>, String> {
        if req.resource_class.trim().is_empty() {
            return Err("resource_class must not be empty".into());
        }
        if !(req.duration_secs.is_finite() && req.duration_secs >= 0.0) {
            return Err("duration_secs must be a finite number >= 0".into());
        }
        if req.count > 1_000_000 {
            return Err("count must be at most 1000000".into());
        }
        let mut ids = Vec::with_capacity(req.count);
        for n in 1..=req.count {
            self.next_task += 1;
            let id = match &req.id {
                Some(id) if req.count == 1 => id.clone(),
                Some(id) => format!("{id}-{n}"),
                None => format!("task-{:06}", self.next_task),
            };
            let id = TaskId(id);
            self.next_serial += 1;
            let serial = self.next_serial;
            self.ledger.insert(
                serial,
                TaskRecord {
                    id: id.clone(),
                    attempt: 1,
                    resource_class: req.resource_class.clone(),
                    label: req.label.clone(),
                    duration_secs: req.duration_secs,
                    state: TaskState::Queued,
                    first_enqueued_at: now,
                    enqueued_at: now,
                    claimed_at: None,
                    finished_at: None,
                    killed: false,
                    killed_at: None,
                    runner: None,
                },
            );
            self.queues
                .entry(req.resource_class.clone())
                .or_default()
                .push_back(serial);
            ids.push(id);
        }
        Ok(ids)
    }

    pub fn counts(&self, class: &str) -> Counts {
        Counts {
            unclaimed: self.queues.get(class).map_or(0, VecDeque::len),
            running: self.running_by_class.get(class).copied().unwrap_or(0),
        }
    }

    pub fn ledger(&self) -> Vec<TaskRecord> {
        self.ledger.values().cloned().collect()
    }

    pub fn add_agent(&mut self, info: AgentInfo, cancel: CancellationToken) -> u64 {
        self.next_agent += 1;
        let id = self.next_agent;
        let ip = format!("10.0.{}.{}", (id / 250) % 256, id % 250 + 2);
        self.by_vmi.insert(info.vmi_uid.clone(), id);
        self.agents.insert(
            id,
            Agent {
                info,
                cancel,
                running_serial: None,
                first_connected_wall: None,
                last_used_wall: None,
                exited_wall: None,
                ip,
            },
        );
        id
    }

    pub fn agents(&self) -> Vec<AgentInfo> {
        self.agents.values().map(|a| a.info.clone()).collect()
    }

    fn live_agent(&mut self, id: u64) -> Option<&mut Agent> {
        self.agents
            .get_mut(&id)
            .filter(|a| a.info.state != AgentState::Exited && !a.cancel.is_cancelled())
    }

    /// The agent connected (registration delay over). False if it is gone.
    pub fn register(&mut self, id: u64, now: f64, wall: SystemTime) -> bool {
        let Some(agent) = self.live_agent(id) else {
            return false;
        };
        agent.info.state = AgentState::Idle;
        agent.info.registered_at = Some(now);
        agent.first_connected_wall = Some(wall);
        true
    }

    /// Claims the oldest unclaimed task of the agent's class, if the org
    /// concurrency limit allows.
    pub fn try_claim(&mut self, id: u64, now: f64, wall: SystemTime) -> Claim {
        let limit = self.settings.concurrency_limit;
        let running_total = self.running_total;
        let Some(agent) = self.agents.get(&id) else {
            return Claim::Gone;
        };
        if agent.info.state != AgentState::Idle || agent.cancel.is_cancelled() {
            return Claim::Gone;
        }
        let Some(class) = agent.info.resource_class.clone() else {
            return Claim::Gone;
        };
        if limit.is_some_and(|l| running_total >= l) {
            return Claim::Wait;
        }
        let Some(serial) = self.queues.get_mut(&class).and_then(VecDeque::pop_front) else {
            return Claim::Wait;
        };
        let agent = self.agents.get_mut(&id).expect("checked above");
        let rec = self
            .ledger
            .get_mut(&serial)
            .expect("queued serials are in the ledger");
        rec.state = TaskState::Running;
        rec.claimed_at = Some(now);
        rec.runner = Some(RunnerRef {
            namespace: agent.info.namespace.clone(),
            vm_name: agent.info.vm_name.clone(),
            vmi_uid: agent.info.vmi_uid.clone(),
            name: agent.info.name.clone(),
        });
        let task = rec.id.clone();
        let duration = rec.duration();
        *self.running_by_class.entry(class).or_default() += 1;
        self.running_total += 1;
        agent.info.state = AgentState::Busy;
        agent.info.current_task = Some(task.clone());
        agent.info.tasks_run += 1;
        agent.running_serial = Some(serial);
        agent.last_used_wall = Some(wall);
        Claim::Got {
            task,
            serial,
            duration,
        }
    }

    fn stop_running(&mut self, class: &str) {
        if let Some(n) = self.running_by_class.get_mut(class) {
            *n = n.saturating_sub(1);
        }
        self.running_total = self.running_total.saturating_sub(1);
    }

    /// The agent's task ran to completion. Returns false if the agent is gone
    /// (vanished meanwhile): then nothing changes.
    pub fn finish(
        &mut self,
        id: u64,
        serial: u64,
        exit_after: bool,
        now: f64,
        wall: SystemTime,
    ) -> bool {
        let Some(agent) = self.live_agent(id) else {
            return false;
        };
        let owned = agent.running_serial == Some(serial);
        agent.running_serial = None;
        agent.info.current_task = None;
        agent.info.state = AgentState::Idle;
        if owned
            && let Some(rec) = self.ledger.get_mut(&serial)
            && rec.state == TaskState::Running
        {
            rec.state = TaskState::Finished;
            rec.finished_at = Some(now);
            let class = rec.resource_class.clone();
            self.stop_running(&class);
        }
        if exit_after {
            self.exit(id, ExitReason::Completed, now, wall);
        }
        true
    }

    /// The agent exits on its own (not vanished). Returns false if it was
    /// already gone.
    pub fn exit(&mut self, id: u64, reason: ExitReason, now: f64, wall: SystemTime) -> bool {
        let Some(agent) = self.live_agent(id) else {
            return false;
        };
        agent.info.state = AgentState::Exited;
        agent.info.exit_reason = Some(reason);
        agent.info.exited_at = Some(now);
        agent.info.current_task = None;
        agent.exited_wall = Some(wall);
        if reason != ExitReason::Vanished {
            agent.info.powered_off = true;
        }
        true
    }

    /// The VMI is gone: a task it ran is killed and re-queued at the front of
    /// its class's queue. Returns the killed task's id, if any.
    pub fn vanish(&mut self, vmi_uid: &str, now: f64, wall: SystemTime) -> Option<TaskId> {
        let id = *self.by_vmi.get(vmi_uid)?;
        let agent = self.live_agent(id)?;
        let serial = agent.running_serial.take();
        agent.cancel.cancel();
        let mut killed = None;
        if let Some(serial) = serial
            && let Some(rec) = self.ledger.get_mut(&serial)
            && rec.state == TaskState::Running
        {
            rec.state = TaskState::Killed;
            rec.killed = true;
            rec.killed_at = Some(now);
            let mut retry = rec.clone();
            let class = rec.resource_class.clone();
            killed = Some(rec.id.clone());
            retry.attempt += 1;
            retry.state = TaskState::Queued;
            retry.enqueued_at = now;
            retry.claimed_at = None;
            retry.finished_at = None;
            retry.killed = false;
            retry.killed_at = None;
            retry.runner = None;
            self.next_serial += 1;
            let new_serial = self.next_serial;
            self.ledger.insert(new_serial, retry);
            self.queues
                .entry(class.clone())
                .or_default()
                .push_front(new_serial);
            self.stop_running(&class);
        }
        // Re-borrow: the ledger and queues were borrowed above.
        if let Some(agent) = self.agents.get_mut(&id) {
            agent.info.state = AgentState::Exited;
            agent.info.exit_reason = Some(ExitReason::Vanished);
            agent.info.exited_at = Some(now);
            agent.info.current_task = None;
            agent.exited_wall = Some(wall);
        }
        killed
    }

    /// The runner list, as `GET /api/v3/runner` reports it.
    pub fn runners(&self, filter: &RunnerFilter, now: f64, wall: SystemTime) -> Vec<RunnerInfo> {
        let retention = self.settings.runner_retention_secs;
        self.agents
            .values()
            .filter_map(|a| {
                let first = a.first_connected_wall?;
                let class = a.info.resource_class.as_deref()?;
                let wanted = match filter {
                    RunnerFilter::Class(c) => c == class,
                    RunnerFilter::Namespace(ns) => class.split('/').next() == Some(ns.as_str()),
                    RunnerFilter::All => true,
                };
                if !wanted || a.info.exited_at.is_some_and(|t| now - t > retention) {
                    return None;
                }
                Some(RunnerInfo {
                    resource_class: class.to_string(),
                    hostname: a.info.vm_name.clone(),
                    name: a.info.name.clone(),
                    first_connected: rfc3339(first),
                    last_connected: rfc3339(a.exited_wall.unwrap_or(wall)),
                    last_used: a.last_used_wall.map(rfc3339),
                    version: AGENT_VERSION.to_string(),
                    ip: a.ip.clone(),
                })
            })
            .collect()
    }

    /// Counts a runner API request as it arrives.
    pub fn count_request(&mut self, endpoint: Endpoint, class: Option<&str>) {
        let s = &mut self.stats;
        s.total += 1;
        *s.by_endpoint.entry(endpoint).or_default() += 1;
        if let Some(class) = class {
            *s.by_class.entry(class.to_string()).or_default() += 1;
            *s.by_class_endpoint
                .entry(class.to_string())
                .or_default()
                .entry(endpoint)
                .or_default() += 1;
        }
    }

    /// Records how a runner API request was answered.
    pub fn record_outcome(&mut self, event: RequestEvent) {
        match event.status {
            Some(status) => *self.stats.by_status.entry(status).or_default() += 1,
            None => self.stats.connection_failures += 1,
        }
        if event.fault.is_some() {
            self.stats.faulted += 1;
        }
        if self.log.len() >= REQUEST_LOG_CAP {
            self.log.pop_front();
        }
        self.log.push_back(event);
    }

    pub fn reset_requests(&mut self) {
        self.stats = RequestStats::default();
        self.log.clear();
    }

    /// Forgets tasks, faults, request counters and exited agents. Tokens,
    /// classes, settings and live agents stay.
    pub fn reset(&mut self) {
        self.ledger.clear();
        self.queues.clear();
        self.running_by_class.clear();
        self.running_total = 0;
        self.faults.clear();
        self.reset_requests();
        self.agents
            .retain(|_, a| a.info.state != AgentState::Exited);
        for a in self.agents.values_mut() {
            a.running_serial = None;
        }
        let live: HashSet<u64> = self.agents.keys().copied().collect();
        self.by_vmi.retain(|_, id| live.contains(id));
    }
}

/// Locks the state; a poisoned lock (a panic while holding it) is still
/// usable because every mutation above leaves the state consistent.
pub(crate) fn lock(m: &Mutex<SimState>) -> MutexGuard<'_, SimState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Everything the server, the agents and the handle share.
pub(crate) struct Inner {
    pub clock: Clock,
    pub base_url: String,
    pub state: Mutex<SimState>,
    /// Woken when tasks are queued or runners free up.
    pub changed: Notify,
    pub shutdown: CancellationToken,
    pub runtime: tokio::runtime::Handle,
}

impl Inner {
    pub fn lock(&self) -> MutexGuard<'_, SimState> {
        lock(&self.state)
    }
    pub fn wall_now(&self) -> SystemTime {
        SystemTime::now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::circleci::userdata::RunnerMode;

    fn settings() -> Settings {
        Settings {
            concurrency_limit: None,
            registration_delay_secs: 0.0,
            runner_retention_secs: 60.0,
        }
    }

    fn agent(state: &mut SimState, vm: &str, class: &str) -> u64 {
        let info = AgentInfo {
            namespace: "ns".into(),
            vm_name: vm.into(),
            vmi_uid: format!("uid-{vm}"),
            name: vm.into(),
            resource_class: Some(class.into()),
            mode: Some(RunnerMode::SingleTask),
            state: AgentState::Starting,
            problem: None,
            exit_reason: None,
            booted_at: 0.0,
            registered_at: None,
            exited_at: None,
            current_task: None,
            tasks_run: 0,
            powered_off: false,
        };
        let id = state.add_agent(info, CancellationToken::new());
        assert!(state.register(id, 0.0, SystemTime::now()));
        id
    }

    #[test]
    fn concurrency_limit_holds_tasks_unclaimed() {
        let mut s = SimState::new(Settings {
            concurrency_limit: Some(1),
            ..settings()
        });
        let now = SystemTime::now();
        s.enqueue(
            &EnqueueRequest::new("a/x", Duration::from_secs(5)).count(2),
            0.0,
        )
        .unwrap();
        let a = agent(&mut s, "vm-0", "a/x");
        let b = agent(&mut s, "vm-1", "a/x");
        assert!(matches!(s.try_claim(a, 1.0, now), Claim::Got { .. }));
        assert_eq!(s.try_claim(b, 1.0, now), Claim::Wait);
        assert_eq!(
            s.counts("a/x"),
            Counts {
                unclaimed: 1,
                running: 1
            }
        );
        let serial = s.agents[&a].running_serial.unwrap();
        assert!(s.finish(a, serial, true, 6.0, now));
        assert!(matches!(s.try_claim(b, 6.0, now), Claim::Got { .. }));
        assert_eq!(
            s.counts("a/x"),
            Counts {
                unclaimed: 0,
                running: 1
            }
        );
    }

    #[test]
    fn runner_list_filters_and_retention() {
        let mut s = SimState::new(settings());
        let now = SystemTime::now();
        let a = agent(&mut s, "vm-0", "acme/linux");
        agent(&mut s, "vm-1", "other/linux");
        assert_eq!(
            s.runners(&RunnerFilter::Class("acme/linux".into()), 1.0, now)
                .len(),
            1
        );
        assert_eq!(
            s.runners(&RunnerFilter::Namespace("acme".into()), 1.0, now)
                .len(),
            1
        );
        assert_eq!(s.runners(&RunnerFilter::All, 1.0, now).len(), 2);
        assert!(s.exit(a, ExitReason::IdleTimeout, 10.0, now));
        let listed = s.runners(&RunnerFilter::Namespace("acme".into()), 69.0, now);
        assert_eq!(listed.len(), 1, "kept for the retention period");
        assert_eq!(listed[0].last_used, None);
        assert!(
            s.runners(&RunnerFilter::Namespace("acme".into()), 71.0, now)
                .is_empty()
        );
    }

    #[test]
    fn reset_keeps_live_agents_and_config() {
        let mut s = SimState::new(settings());
        s.classes.insert("a/x".into(), "rt".into());
        let now = SystemTime::now();
        s.enqueue(&EnqueueRequest::new("a/x", Duration::from_secs(5)), 0.0)
            .unwrap();
        let a = agent(&mut s, "vm-0", "a/x");
        let b = agent(&mut s, "vm-1", "a/x");
        let Claim::Got { serial, .. } = s.try_claim(a, 1.0, now) else {
            panic!("claim expected");
        };
        assert!(s.exit(b, ExitReason::IdleTimeout, 1.0, now));
        s.reset();
        assert!(s.ledger().is_empty());
        assert_eq!(s.counts("a/x"), Counts::default());
        assert_eq!(s.agents().len(), 1);
        assert_eq!(s.class_for_runner_token("rt").as_deref(), Some("a/x"));
        // The busy agent still finishes (and exits) normally.
        assert!(s.finish(a, serial, true, 6.0, now));
        assert_eq!(s.counts("a/x"), Counts::default());
    }
}
