//! Plain data the simulator exposes, both from Rust and as JSON on the
//! control API.
//!
//! Times named `*_at` are simulated seconds since the simulator started (see
//! [`super::CircleCiSim::now_simulated`]); durations are simulated seconds.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::userdata::RunnerMode;

/// Identifies a task across its attempts (a killed task is re-queued under
/// the same id with the next `attempt` number).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub String);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for TaskId {
    fn from(s: &str) -> Self {
        TaskId(s.to_string())
    }
}

/// Where one attempt of a task is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting in its resource class's queue (unclaimed).
    Queued,
    /// Claimed by a runner and not finished.
    Running,
    /// Ran to completion.
    Finished,
    /// Its VM vanished while it ran; a new attempt was queued.
    Killed,
}

/// The runner (VM) that claimed a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunnerRef {
    pub namespace: String,
    pub vm_name: String,
    pub vmi_uid: String,
    /// The runner name shown in the runner list.
    pub name: String,
}

/// One attempt of one task: the ledger has one record per attempt, in the
/// order attempts were queued.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: TaskId,
    /// 1 for the first attempt; +1 each time the task is re-queued.
    pub attempt: u32,
    pub resource_class: String,
    pub label: Option<String>,
    pub duration_secs: f64,
    pub state: TaskState,
    /// When the first attempt of this task was queued.
    pub first_enqueued_at: f64,
    /// When this attempt was queued (the kill time for a re-queued attempt).
    pub enqueued_at: f64,
    pub claimed_at: Option<f64>,
    pub finished_at: Option<f64>,
    /// The runner's VM vanished while this attempt ran.
    pub killed: bool,
    pub killed_at: Option<f64>,
    pub runner: Option<RunnerRef>,
}

impl TaskRecord {
    /// The task's simulated run time.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration_secs)
    }
    /// Simulated seconds this attempt waited in the queue, once claimed.
    pub fn wait_secs(&self) -> Option<f64> {
        self.claimed_at.map(|c| c - self.enqueued_at)
    }
    /// Simulated seconds from the task's first enqueue to this attempt's claim.
    pub fn total_wait_secs(&self) -> Option<f64> {
        self.claimed_at.map(|c| c - self.first_enqueued_at)
    }
}

/// What to put in a resource class's queue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EnqueueRequest {
    pub resource_class: String,
    /// Simulated run time of each task.
    pub duration_secs: f64,
    /// How many identical tasks (default 1).
    #[serde(default = "one")]
    pub count: usize,
    /// Task id; with `count > 1`, `-<n>` (1-based) is appended. Generated
    /// (`task-<n>`) when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Free text kept in the ledger (e.g. the job name from a trace).
    #[serde(default)]
    pub label: Option<String>,
}

fn one() -> usize {
    1
}

impl EnqueueRequest {
    pub fn new(resource_class: &str, duration: Duration) -> Self {
        EnqueueRequest {
            resource_class: resource_class.to_string(),
            duration_secs: duration.as_secs_f64(),
            count: 1,
            id: None,
            label: None,
        }
    }
    pub fn count(mut self, count: usize) -> Self {
        self.count = count;
        self
    }
    pub fn id(mut self, id: &str) -> Self {
        self.id = Some(id.to_string());
        self
    }
    pub fn label(mut self, label: &str) -> Self {
        self.label = Some(label.to_string());
        self
    }
}

/// A runner API endpoint (v3 paths and their v2 aliases count as one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `GET /api/v3/runner` (alias `/api/v2/runner`).
    RunnerList,
    /// `GET /api/v3/runner/tasks` (aliases `/api/v2/runner/tasks`, `/api/v2/tasks`).
    UnclaimedTasks,
    /// `GET /api/v3/runner/tasks/running` (aliases `/api/v2/runner/tasks/running`,
    /// `/api/v2/tasks/running`).
    RunningTasks,
}

/// Request counters for the runner API (control routes are not counted).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestStats {
    pub total: u64,
    pub by_endpoint: BTreeMap<Endpoint, u64>,
    /// Requests that named a `resource-class`, by class.
    pub by_class: BTreeMap<String, u64>,
    pub by_class_endpoint: BTreeMap<String, BTreeMap<Endpoint, u64>>,
    /// Responses by HTTP status (connection-level failures have none).
    pub by_status: BTreeMap<u16, u64>,
    /// Requests a fault acted on (latency included).
    pub faulted: u64,
    /// Requests answered by dropping or hanging the connection.
    pub connection_failures: u64,
}

impl RequestStats {
    /// Requests for `class` on `endpoint`.
    pub fn count(&self, class: &str, endpoint: Endpoint) -> u64 {
        self.by_class_endpoint
            .get(class)
            .and_then(|m| m.get(&endpoint))
            .copied()
            .unwrap_or(0)
    }
    /// Requests naming `class`, all endpoints.
    pub fn for_class(&self, class: &str) -> u64 {
        self.by_class.get(class).copied().unwrap_or(0)
    }
    pub fn for_endpoint(&self, endpoint: Endpoint) -> u64 {
        self.by_endpoint.get(&endpoint).copied().unwrap_or(0)
    }
    pub fn with_status(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }
}

/// One runner API request, in arrival order (the last 100,000 are kept).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestEvent {
    /// Wall-clock seconds since the simulator started.
    pub wall_secs: f64,
    /// Simulated seconds since the simulator started.
    pub sim_secs: f64,
    pub endpoint: Endpoint,
    pub path: String,
    pub resource_class: Option<String>,
    /// `None` when the connection was dropped or hung.
    pub status: Option<u16>,
    /// The fault kind that shaped the answer, if any.
    pub fault: Option<String>,
}

/// One entry of `GET /api/v3/runner` (`{"items": [...]}`). Times are
/// wall-clock RFC 3339.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunnerInfo {
    pub resource_class: String,
    pub hostname: String,
    pub name: String,
    pub first_connected: String,
    pub last_connected: String,
    /// When the runner last claimed a task; `null` if it never did.
    pub last_used: Option<String>,
    pub version: String,
    pub ip: String,
}

/// Lifecycle of a simulated agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Booted; cloud-init and the agent are starting (registration delay).
    Starting,
    /// Connected and waiting for a task.
    Idle,
    /// Running a task.
    Busy,
    /// Running but unable to ever claim (see [`AgentInfo::problem`]).
    Stalled,
    /// Gone (see [`AgentInfo::exit_reason`]).
    Exited,
}

/// Why an agent can never claim a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentProblem {
    /// No usable user-data / no runner config file: the agent never starts,
    /// the VM never powers itself off.
    BrokenUserData,
    /// The config file exists but the agent rejects it: it exits at start
    /// and the VM powers off.
    InvalidRunnerConfig,
    /// `api.url` is not this simulator: the agent cannot connect.
    WrongUrl,
    /// `api.auth_token` is not the runner token of any resource class.
    UnknownToken,
}

/// Why an agent exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// Single-task mode: ran its task, exited, VM powered off.
    Completed,
    /// `runner.idle_timeout` passed without a claim; VM powered off.
    IdleTimeout,
    /// The agent rejected its config file; VM powered off.
    ConfigError,
    /// The VMI vanished (deleted or stopped from outside).
    Vanished,
}

/// A simulated agent (one per guest boot), for tests and the control API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub namespace: String,
    pub vm_name: String,
    pub vmi_uid: String,
    /// Runner name (config `runner.name`, else the VM name).
    pub name: String,
    /// The class its token belongs to, if any.
    pub resource_class: Option<String>,
    pub mode: Option<RunnerMode>,
    pub state: AgentState,
    pub problem: Option<AgentProblem>,
    pub exit_reason: Option<ExitReason>,
    pub booted_at: f64,
    pub registered_at: Option<f64>,
    pub exited_at: Option<f64>,
    pub current_task: Option<TaskId>,
    pub tasks_run: u32,
    /// The guest called `PowerOff::power_off`.
    pub powered_off: bool,
}

/// Current counts for one resource class, as the runner API reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub unclaimed: usize,
    pub running: usize,
}
