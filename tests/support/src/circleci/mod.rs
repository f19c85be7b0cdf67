//! CircleCI simulator: the runner API the operator polls, and the
//! `circleci-runner` agents inside simulated VMs.
//!
//! - An HTTP server on loopback ([`CircleCiSim::base_url`]) serving the
//!   runner API (`/api/v3/runner`, `/api/v3/runner/tasks`,
//!   `/api/v3/runner/tasks/running` and their v2 aliases) with CircleCI's
//!   auth rules, per-class task queues and injectable [`Fault`]s.
//! - A control API under [`CircleCiSim::control_url`] (`/control/...`) to
//!   configure it from another process; every operation is also a method on
//!   [`CircleCiSim`].
//! - A [`GuestRuntime`] ([`CircleCiSim::guest`]) for the KubeVirt simulator:
//!   each booted VM runs a simulated agent that reads the runner config from
//!   the VM's `#cloud-config`, claims a task of its class, runs it for its
//!   (simulated) duration and powers the VM off. See [`agent`] for the exact
//!   rules, including misconfigured guests.
//! - A ledger of every task attempt: enqueue, claim, finish, and whether it
//!   was killed because its VM vanished (a killed task is re-queued at the
//!   front of its queue as a new attempt).
//!
//! All simulated durations (task durations, registration delay, idle
//! timeouts, runner retention) run [`TimeScale`] times faster than wall
//! time. Fault durations and latencies are wall-clock. Tokens are never
//! logged.
//!
//! See `tests/support/README.md` ("CircleCI simulator") for the control API.

pub mod agent;
pub mod faults;
pub mod model;
mod server;
pub mod state;
pub mod userdata;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use faults::{Fault, FaultKind, FaultLimit, OutageMode, RateLimitBody};
pub use model::{
    AgentInfo, AgentProblem, AgentState, Counts, Endpoint, EnqueueRequest, ExitReason,
    RequestEvent, RequestStats, RunnerInfo, RunnerRef, TaskId, TaskRecord, TaskState,
};
pub use state::{AGENT_VERSION, Settings};
pub use userdata::{RUNNER_CONFIG_PATH, RunnerConfig, RunnerMode, render_user_data};

use crate::guest::{GuestRuntime, TimeScale};
use faults::ActiveFault;
use state::{Clock, Inner, SimState};

/// API token registered by [`CircleCiSimConfig::for_tests`].
pub const TEST_API_TOKEN: &str = "sim-api-token";
/// Resource class registered by [`CircleCiSimConfig::for_tests`].
pub const TEST_RESOURCE_CLASS: &str = "sim-org/linux";
/// Runner token of [`TEST_RESOURCE_CLASS`] in [`CircleCiSimConfig::for_tests`].
pub const TEST_RUNNER_TOKEN: &str = "sim-runner-token";

/// A resource class and its runner (resource-class) token.
#[derive(Clone, PartialEq, Eq)]
pub struct ResourceClassConfig {
    pub resource_class: String,
    pub runner_token: String,
}

impl fmt::Debug for ResourceClassConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResourceClassConfig")
            .field("resource_class", &self.resource_class)
            .field("runner_token", &"<redacted>")
            .finish()
    }
}

/// How to start a [`CircleCiSim`].
#[derive(Clone)]
pub struct CircleCiSimConfig {
    pub time_scale: TimeScale,
    /// Simulated time from guest boot until its agent is connected and can
    /// claim (cloud-init, package install, agent start). Default 5 s.
    pub registration_delay: Duration,
    /// Org-wide cap on concurrently running tasks (default unlimited).
    pub concurrency_limit: Option<usize>,
    /// Simulated time an exited runner stays in the runner list. Default 1 h.
    pub runner_retention: Duration,
    /// Listen address; default `127.0.0.1:0` (random port).
    pub bind: SocketAddr,
    pub api_tokens: Vec<String>,
    pub resource_classes: Vec<ResourceClassConfig>,
}

impl Default for CircleCiSimConfig {
    fn default() -> Self {
        let settings = Settings::default();
        CircleCiSimConfig {
            time_scale: TimeScale::default(),
            registration_delay: Duration::from_secs_f64(settings.registration_delay_secs),
            concurrency_limit: settings.concurrency_limit,
            runner_retention: Duration::from_secs_f64(settings.runner_retention_secs),
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            api_tokens: Vec::new(),
            resource_classes: Vec::new(),
        }
    }
}

impl fmt::Debug for CircleCiSimConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircleCiSimConfig")
            .field("time_scale", &self.time_scale)
            .field("registration_delay", &self.registration_delay)
            .field("concurrency_limit", &self.concurrency_limit)
            .field("runner_retention", &self.runner_retention)
            .field("bind", &self.bind)
            .field(
                "api_tokens",
                &format!("<{} redacted>", self.api_tokens.len()),
            )
            .field("resource_classes", &self.resource_classes)
            .finish()
    }
}

impl CircleCiSimConfig {
    /// Defaults plus [`TEST_API_TOKEN`] and [`TEST_RESOURCE_CLASS`] (runner
    /// token [`TEST_RUNNER_TOKEN`]), with time running 100 times faster (the
    /// 5 s registration delay takes 50 ms).
    pub fn for_tests() -> Self {
        CircleCiSimConfig {
            time_scale: TimeScale(100.0),
            api_tokens: vec![TEST_API_TOKEN.to_string()],
            resource_classes: vec![ResourceClassConfig {
                resource_class: TEST_RESOURCE_CLASS.to_string(),
                runner_token: TEST_RUNNER_TOKEN.to_string(),
            }],
            ..Self::default()
        }
    }
    pub fn with_time_scale(mut self, factor: f64) -> Self {
        self.time_scale = TimeScale(factor);
        self
    }
    pub fn with_registration_delay(mut self, d: Duration) -> Self {
        self.registration_delay = d;
        self
    }
    pub fn with_concurrency_limit(mut self, limit: Option<usize>) -> Self {
        self.concurrency_limit = limit;
        self
    }
}

/// Checks a resource class against CircleCI's documented character sets:
/// `namespace/name`, namespace `[a-z0-9_-]+`, name `[A-Za-z0-9:_+-]+`.
pub fn validate_resource_class(class: &str) -> Result<(), String> {
    let Some((ns, name)) = class.split_once('/') else {
        return Err(format!("resource class {class:?} is not namespace/name"));
    };
    let ns_ok = !ns.is_empty()
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'+' | b'-'));
    if ns_ok && name_ok {
        Ok(())
    } else {
        Err(format!(
            "resource class {class:?} has characters CircleCI does not allow"
        ))
    }
}

impl Inner {
    pub(crate) fn add_api_token(&self, token: &str) -> Result<(), String> {
        let token = token.trim();
        if token.is_empty() {
            return Err("token must not be empty".into());
        }
        self.lock().api_tokens.insert(token.to_string());
        Ok(())
    }

    pub(crate) fn add_resource_class(&self, class: &str, runner_token: &str) -> Result<(), String> {
        validate_resource_class(class)?;
        let runner_token = runner_token.trim();
        if runner_token.is_empty() {
            return Err("runner_token must not be empty".into());
        }
        self.lock()
            .classes
            .insert(class.to_string(), runner_token.to_string());
        Ok(())
    }

    pub(crate) fn enqueue(&self, req: &EnqueueRequest) -> Result<Vec<TaskId>, String> {
        let ids = self.lock().enqueue(req, self.clock.sim_secs())?;
        self.changed.notify_waiters();
        Ok(ids)
    }

    pub(crate) fn inject_fault(&self, fault: Fault) -> Result<(), String> {
        fault.validate()?;
        self.lock()
            .faults
            .push(ActiveFault::new(fault, Instant::now()));
        Ok(())
    }

    pub(crate) fn active_faults(&self) -> Vec<Fault> {
        let now = Instant::now();
        let mut st = self.lock();
        st.faults.retain(|f| !f.expired(now));
        st.faults.iter().map(|f| f.fault.clone()).collect()
    }

    pub(crate) fn update_settings(&self, s: Settings) -> Result<(), String> {
        for (name, v) in [
            ("registration_delay_secs", s.registration_delay_secs),
            ("runner_retention_secs", s.runner_retention_secs),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("{name} must be a finite number >= 0"));
            }
        }
        self.lock().settings = s;
        self.changed.notify_waiters();
        Ok(())
    }

    pub(crate) fn reset(&self) {
        self.lock().reset();
        self.changed.notify_waiters();
    }
}

/// A running CircleCI simulator. Dropping it stops the server and all
/// simulated agents (without powering their VMs off).
pub struct CircleCiSim {
    inner: Arc<Inner>,
    addr: SocketAddr,
}

impl fmt::Debug for CircleCiSim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircleCiSim")
            .field("base_url", &self.inner.base_url)
            .finish()
    }
}

impl CircleCiSim {
    /// Binds the server and starts serving. Must run inside a Tokio runtime;
    /// agents run on that runtime.
    pub async fn start(config: CircleCiSimConfig) -> anyhow::Result<CircleCiSim> {
        let factor = config.time_scale.0;
        anyhow::ensure!(
            factor.is_finite() && factor > 0.0,
            "time_scale must be a positive number"
        );
        let listener = tokio::net::TcpListener::bind(config.bind)
            .await
            .with_context(|| format!("binding the CircleCI simulator to {}", config.bind))?;
        let mut addr = listener.local_addr()?;
        if addr.ip().is_unspecified() {
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        let settings = Settings {
            concurrency_limit: config.concurrency_limit,
            registration_delay_secs: config.registration_delay.as_secs_f64(),
            runner_retention_secs: config.runner_retention.as_secs_f64(),
        };
        let inner = Arc::new(Inner {
            clock: Clock::new(config.time_scale),
            base_url: format!("http://{addr}"),
            state: Mutex::new(SimState::new(settings)),
            changed: Notify::new(),
            shutdown: CancellationToken::new(),
            runtime: tokio::runtime::Handle::current(),
        });
        for t in &config.api_tokens {
            inner
                .add_api_token(t)
                .map_err(|e| anyhow::anyhow!("api_tokens: {e}"))?;
        }
        for c in &config.resource_classes {
            inner
                .add_resource_class(&c.resource_class, &c.runner_token)
                .map_err(|e| anyhow::anyhow!("resource_classes: {e}"))?;
        }
        let router = server::router(inner.clone());
        tokio::spawn(server::serve(listener, router, inner.shutdown.clone()));
        tracing::info!(base_url = %inner.base_url, time_scale = factor, "CircleCI simulator started");
        Ok(CircleCiSim { inner, addr })
    }

    /// Runner API base URL, e.g. `http://127.0.0.1:PORT` (no trailing
    /// slash): `RunnerPool.spec.circleci.apiUrl` and the agents' `api.url`.
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    /// Control API base URL: `<base_url>/control`.
    pub fn control_url(&self) -> String {
        format!("{}/control", self.inner.base_url)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The guest side, for the KubeVirt simulator.
    pub fn guest(&self) -> Arc<dyn GuestRuntime> {
        Arc::new(agent::SimGuest(self.inner.clone()))
    }

    pub fn time_scale(&self) -> TimeScale {
        self.inner.clock.scale
    }

    /// Simulated time since the simulator started.
    pub fn now_simulated(&self) -> Duration {
        self.inner.clock.now_simulated()
    }

    /// Accepts `token` as an API token (Circle-Token, Basic or Bearer).
    /// Panics on an empty token.
    pub fn add_api_token(&self, token: &str) {
        if let Err(e) = self.inner.add_api_token(token) {
            panic!("add_api_token: {e}");
        }
    }

    /// Stops accepting `token` (requests with it get 401).
    pub fn revoke_api_token(&self, token: &str) {
        self.inner.lock().api_tokens.remove(token.trim());
    }

    /// Registers (or re-keys) a resource class and its runner token. Panics
    /// on a class name CircleCI would refuse or an empty token.
    pub fn add_resource_class(&self, class: &str, runner_token: &str) {
        if let Err(e) = self.inner.add_resource_class(class, runner_token) {
            panic!("add_resource_class: {e}");
        }
    }

    /// Registered resource classes (names only).
    pub fn resource_classes(&self) -> Vec<String> {
        self.inner.lock().classes.keys().cloned().collect()
    }

    /// Queues one task of `class` that runs for `duration` (simulated).
    /// Any class can be queued, registered or not (like a job waiting for
    /// runners that never come).
    pub fn enqueue(&self, class: &str, duration: Duration) -> TaskId {
        self.enqueue_many(EnqueueRequest::new(class, duration))
            .expect("a single task with a valid duration is always accepted")
            .remove(0)
    }

    /// Queues `req.count` tasks.
    pub fn enqueue_many(&self, req: EnqueueRequest) -> anyhow::Result<Vec<TaskId>> {
        self.inner.enqueue(&req).map_err(anyhow::Error::msg)
    }

    pub fn inject_fault(&self, fault: Fault) -> anyhow::Result<()> {
        self.inner.inject_fault(fault).map_err(anyhow::Error::msg)
    }

    pub fn clear_faults(&self) {
        self.inner.lock().faults.clear();
    }

    /// Faults still active.
    pub fn faults(&self) -> Vec<Fault> {
        self.inner.active_faults()
    }

    /// Every task attempt, in the order attempts were queued.
    pub fn ledger(&self) -> Vec<TaskRecord> {
        self.inner.lock().ledger()
    }

    /// Runner API request counters since start (or the last reset).
    pub fn requests(&self) -> RequestStats {
        self.inner.lock().stats.clone()
    }

    /// The most recent runner API requests (up to 100,000), oldest first.
    pub fn request_log(&self) -> Vec<RequestEvent> {
        self.inner.lock().log.iter().cloned().collect()
    }

    pub fn reset_requests(&self) {
        self.inner.lock().reset_requests();
    }

    /// `(unclaimed, running)` for `class`, as the runner API reports them.
    pub fn counts(&self, class: &str) -> (usize, usize) {
        let c = self.inner.lock().counts(class);
        (c.unclaimed, c.running)
    }

    /// Every agent booted so far (exited ones until the next reset).
    pub fn agents(&self) -> Vec<AgentInfo> {
        self.inner.lock().agents()
    }

    pub fn settings(&self) -> Settings {
        self.inner.lock().settings.clone()
    }

    pub fn update_settings(&self, settings: Settings) -> anyhow::Result<()> {
        self.inner
            .update_settings(settings)
            .map_err(anyhow::Error::msg)
    }

    pub fn set_concurrency_limit(&self, limit: Option<usize>) {
        self.inner.lock().settings.concurrency_limit = limit;
        self.inner.changed.notify_waiters();
    }

    /// Forgets tasks (queued and recorded), faults, request counters and
    /// exited agents. Keeps tokens, classes, settings and live agents (a busy
    /// agent still finishes its task and powers off). Meant for between
    /// test cases.
    pub fn reset(&self) {
        self.inner.reset();
    }

    /// Polls `f` every 10 ms until it returns `Some`, or fails after
    /// `timeout` (wall-clock).
    pub async fn wait_until<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&CircleCiSim) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(v) = f(self) {
                return Ok(v);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "condition not met within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for CircleCiSim {
    fn drop(&mut self) {
        self.inner.shutdown.cancel();
    }
}
