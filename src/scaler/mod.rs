//! The scaler: one task per RunnerPool. Each tick it reads demand (CircleCI)
//! and inventory (the pool's VMs, from a shared watch), asks the pure
//! [`policy`] for a plan, acts on it (scale subresource, retire stopped VMs,
//! release deleted ones), and reports (status, events, metrics, one log line).
//!
//! The task is the only writer of the RunnerPool's status while it runs; the
//! controller hands it what it learned (validity, Secrets, apply errors)
//! through [`PoolConfig`].

pub mod budget;
pub mod forecast;
pub mod policy;
pub mod report;
pub mod schedule;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::circleci::{ApiToken, CallRecord, CircleCiClient, CircleCiError, TaskCounts};
use crate::crd::{RunnerPool, RunnerPoolStatus, ValidSpec};
use crate::kubevirt::{self, POOL_FINALIZER, pool_view, vm_view};
use crate::metrics::{Metrics, PoolLabels};
use crate::resources::{
    FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL, SCALER_FIELD_MANAGER, status_equal_ignoring_time,
};
use policy::{Demand, Input, Plan, VmView};
use report::{PollState, Problem, Situation, build_status};

/// A status whose only change is `lastPollTime` is written at most this often.
pub const STATUS_REFRESH: Duration = Duration::from_secs(60);
/// VMs deleted at once by one pool's scaler.
pub const RETIRE_CONCURRENCY: usize = 16;
/// Longest delay between polls while CircleCI fails.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// A RunnerPool's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl PoolKey {
    /// The key of `namespace/name`.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for PoolKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// What the controller tells a pool's scaler.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolConfig {
    /// Which pool.
    pub key: PoolKey,
    /// `metadata.generation` this config describes.
    pub generation: Option<i64>,
    /// The RunnerPool, for events.
    pub object_ref: ObjectReference,
    /// The checked spec, `None` when it is invalid.
    pub spec: Option<ValidSpec>,
    /// The CircleCI API token, when it could be read.
    pub api_token: Option<ApiToken>,
    /// Why the operator cannot act (the scaler then holds the pool).
    pub stalled: Option<Problem>,
    /// Why the pool's objects are not in place (transient).
    pub reconciling: Option<Problem>,
    /// The RunnerPool's status conditions when the controller read it (to
    /// keep transition times across restarts).
    pub conditions: Vec<Condition>,
    /// The forecast learned so far (from status), to resume from.
    pub forecast: Vec<u32>,
}

impl PoolConfig {
    /// Whether `other` asks for anything different. The initial `conditions`
    /// and `forecast` (read back from the status this scaler writes) do not
    /// count: otherwise every status write would wake the scaler.
    pub fn same_as(&self, other: &PoolConfig) -> bool {
        self.key == other.key
            && self.generation == other.generation
            && self.object_ref.uid == other.object_ref.uid
            && self.spec == other.spec
            && self.api_token == other.api_token
            && self.stalled == other.stalled
            && self.reconciling == other.reconciling
    }

    /// Whether the scaler may poll CircleCI and change the pool's size.
    fn can_poll(&self) -> Option<(&ValidSpec, &ApiToken)> {
        match (&self.spec, &self.api_token, &self.stalled) {
            (Some(s), Some(t), None) => Some((s, t)),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------
// The shared VM index.
// ---------------------------------------------------------------------------

type VmMap = HashMap<PoolKey, BTreeMap<String, Arc<DynamicObject>>>;

/// Every VM the operator manages, indexed by pool, fed by one watch.
#[derive(Clone, Default)]
pub struct VmIndex {
    inner: Arc<RwLock<VmMap>>,
    ready: Arc<tokio::sync::Notify>,
    synced: Arc<std::sync::atomic::AtomicBool>,
}

impl VmIndex {
    /// The views of pool `key`'s VMs, sorted by name.
    pub fn views(&self, key: &PoolKey) -> Vec<VmView> {
        let map = self.inner.read().expect("vm index lock");
        map.get(key)
            .map(|vms| vms.values().map(|v| vm_view(v)).collect())
            .unwrap_or_default()
    }

    /// The objects of pool `key`'s VMs.
    pub fn objects(&self, key: &PoolKey) -> Vec<Arc<DynamicObject>> {
        let map = self.inner.read().expect("vm index lock");
        map.get(key)
            .map(|vms| vms.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether the first list has been received.
    pub fn is_synced(&self) -> bool {
        self.synced.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits for the first complete list.
    pub async fn wait_synced(&self) {
        while !self.is_synced() {
            let n = self.ready.notified();
            if self.is_synced() {
                break;
            }
            n.await;
        }
    }

    fn key_of(vm: &DynamicObject) -> Option<PoolKey> {
        Some(PoolKey::new(
            vm.metadata.namespace.as_deref()?,
            kubevirt::vm_pool_name(vm)?,
        ))
    }

    fn apply(map: &mut VmMap, vm: DynamicObject) {
        if let (Some(key), Some(name)) = (Self::key_of(&vm), vm.metadata.name.clone()) {
            map.entry(key).or_default().insert(name, Arc::new(vm));
        }
    }

    fn delete(map: &mut VmMap, vm: &DynamicObject) {
        if let (Some(key), Some(name)) = (Self::key_of(vm), vm.metadata.name.as_deref())
            && let Some(vms) = map.get_mut(&key)
        {
            vms.remove(name);
            if vms.is_empty() {
                map.remove(&key);
            }
        }
    }

    /// Keeps the index current until the stream ends (never, with backoff).
    pub async fn run(self, api: Api<DynamicObject>) {
        let cfg = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let mut stream = kube::runtime::watcher(api, cfg).default_backoff().boxed();
        let mut buffer: Option<VmMap> = None;
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(Event::Init) => buffer = Some(VmMap::new()),
                Ok(Event::InitApply(vm)) => {
                    if let Some(b) = buffer.as_mut() {
                        Self::apply(b, vm);
                    }
                }
                Ok(Event::InitDone) => {
                    if let Some(b) = buffer.take() {
                        *self.inner.write().expect("vm index lock") = b;
                    }
                    self.synced.store(true, std::sync::atomic::Ordering::SeqCst);
                    self.ready.notify_waiters();
                }
                Ok(Event::Apply(vm)) => Self::apply(&mut self.inner.write().expect("lock"), vm),
                Ok(Event::Delete(vm)) => Self::delete(&mut self.inner.write().expect("lock"), &vm),
                Err(e) => tracing::warn!(error = %e, "VirtualMachine watch failed; retrying"),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Shared context and the registry of scaler tasks.
// ---------------------------------------------------------------------------

/// What every scaler task uses.
pub struct Shared {
    /// Kubernetes client.
    pub client: Client,
    /// CircleCI client.
    pub circleci: CircleCiClient,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Events.
    pub recorder: Recorder,
    /// The pools' VMs.
    pub vms: VmIndex,
    /// The VirtualMachinePools the operator owns.
    pub pools: Store<DynamicObject>,
    /// The per-host CircleCI request gate.
    pub gate: budget::HostGate,
}

impl Shared {
    fn vm_api(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, &kubevirt::vm_resource())
    }

    fn pool_api(&self, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, &kubevirt::pool_resource())
    }

    /// The VirtualMachinePool of `key`, from the watch cache.
    pub fn pool_object(&self, key: &PoolKey) -> Option<Arc<DynamicObject>> {
        self.pools
            .get(&ObjectRef::new_with(&key.name, kubevirt::pool_resource()).within(&key.namespace))
    }

    /// Publishes an event; failures are logged, never fatal.
    pub async fn event(&self, on: &ObjectReference, type_: EventType, reason: &str, note: String) {
        let ev = KubeEvent {
            type_,
            reason: reason.to_string(),
            note: Some(note),
            action: reason.to_string(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, on).await {
            tracing::debug!(error = %e, reason, "could not publish event");
        }
    }
}

struct Handle {
    config: watch::Sender<PoolConfig>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The running scaler tasks, one per RunnerPool.
pub struct Scalers {
    shared: Arc<Shared>,
    tasks: Mutex<HashMap<PoolKey, Handle>>,
}

impl Scalers {
    /// An empty registry.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            tasks: Mutex::new(HashMap::new()),
        }
    }

    /// The shared context.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Starts the scaler of `cfg.key`, or hands it the new config (it wakes
    /// up at once only when the config changed).
    pub fn ensure(&self, cfg: PoolConfig) {
        let mut tasks = self.tasks.lock().expect("scalers lock");
        if let Some(h) = tasks.get(&cfg.key)
            && !h.task.is_finished()
        {
            h.config.send_if_modified(|old| {
                if old.same_as(&cfg) {
                    false
                } else {
                    *old = cfg;
                    true
                }
            });
            return;
        }
        let key = cfg.key.clone();
        let (tx, rx) = watch::channel(cfg);
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_pool(self.shared.clone(), rx, stop.clone()));
        tasks.insert(
            key,
            Handle {
                config: tx,
                stop,
                task,
            },
        );
    }

    /// Stops the scaler of `key` and waits for it.
    pub async fn stop(&self, key: &PoolKey) {
        let h = self.tasks.lock().expect("scalers lock").remove(key);
        if let Some(h) = h {
            h.stop.cancel();
            let _ = h.task.await;
            self.shared
                .metrics
                .forget_pool(&PoolLabels::new(&key.namespace, &key.name));
        }
    }

    /// Stops every scaler.
    pub async fn stop_all(&self) {
        let keys: Vec<_> = self
            .tasks
            .lock()
            .expect("scalers lock")
            .keys()
            .cloned()
            .collect();
        for k in keys {
            self.stop(&k).await;
        }
    }

    /// How many scalers run.
    pub fn len(&self) -> usize {
        self.tasks.lock().expect("scalers lock").len()
    }

    /// Whether no scaler runs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

// ---------------------------------------------------------------------------
// Pure helpers.
// ---------------------------------------------------------------------------

/// Delay before the next poll: the poll interval while CircleCI answers;
/// after `failures` consecutive failed polls, the interval doubled per
/// failure (capped at [`MAX_BACKOFF`]), scaled by `jitter` (0.8..1.2), and
/// never shorter than the server's `Retry-After`.
pub fn next_delay(
    poll: Duration,
    failures: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    if failures == 0 {
        return poll;
    }
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    let base = poll.saturating_mul(factor).min(MAX_BACKOFF.max(poll));
    let jittered = base.mul_f64(jitter.clamp(0.8, 1.2));
    jittered.max(retry_after.unwrap_or_default()).max(poll)
}

/// Both calls' outcome as demand, or the first error.
fn demand_of(u: &CallRecord, r: &CallRecord) -> Result<TaskCounts, CircleCiError> {
    match (&u.result, &r.result) {
        (Ok(unclaimed), Ok(running)) => Ok(TaskCounts {
            unclaimed: *unclaimed,
            running: *running,
        }),
        (Err(e), _) | (_, Err(e)) => Err(e.clone()),
    }
}

// ---------------------------------------------------------------------------
// Acting on a plan (also used by the controller's drain on deletion).
// ---------------------------------------------------------------------------

/// Writes `spec.replicas` through the scale subresource (a merge patch, field
/// manager [`SCALER_FIELD_MANAGER`]; server-side apply of `/scale` is not
/// supported for custom resources).
pub async fn write_replicas(
    shared: &Shared,
    key: &PoolKey,
    replicas: u32,
) -> Result<(), kube::Error> {
    let pp = PatchParams {
        field_manager: Some(SCALER_FIELD_MANAGER.into()),
        ..Default::default()
    };
    shared
        .pool_api(&key.namespace)
        .patch_scale(
            &key.name,
            &pp,
            &Patch::Merge(&json!({"spec": {"replicas": replicas}})),
        )
        .await
        .map(|_| ())
}

/// Deletes VM `name` only if it is still the object we judged (same
/// `resourceVersion`), then removes its pool finalizer. Returns whether it
/// was deleted.
pub async fn retire_vm(
    shared: &Shared,
    key: &PoolKey,
    vm: &DynamicObject,
) -> Result<bool, kube::Error> {
    let api = shared.vm_api(&key.namespace);
    let name = vm.metadata.name.as_deref().unwrap_or_default();
    let dp = DeleteParams {
        preconditions: Some(Preconditions {
            resource_version: vm.metadata.resource_version.clone(),
            uid: vm.metadata.uid.clone(),
        }),
        ..DeleteParams::background()
    };
    let left = match api.delete(name, &dp).await {
        Ok(either) => either.left(),
        // Changed since we looked (e.g. restarted) or already gone: leave it.
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => return Ok(false),
        Err(e) => return Err(e),
    };
    // The delete answered with the object as it is now: remove the pool
    // finalizer by its index, guarded by a JSON Patch `test` (no read, no
    // resourceVersion race with KubeVirt's status writes).
    if let Some(vm) = left
        && let Some(i) = vm
            .metadata
            .finalizers
            .as_ref()
            .and_then(|f| f.iter().position(|x| x == POOL_FINALIZER))
    {
        let path = format!("/metadata/finalizers/{i}");
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "test", "path": path, "value": POOL_FINALIZER},
            {"op": "remove", "path": path},
        ]))
        .expect("a valid JSON patch");
        match api
            .patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(true),
            Err(_) => {} // the list changed: fall back to read-modify-write
        }
    }
    release_vm(shared, key, name).await?;
    Ok(true)
}

/// Removes `pool.kubevirt.io/finalizer` from VM `name` (which is being
/// deleted), with optimistic concurrency.
pub async fn release_vm(shared: &Shared, key: &PoolKey, name: &str) -> Result<(), kube::Error> {
    let api = shared.vm_api(&key.namespace);
    for _ in 0..3 {
        let Some(vm) = api.get_opt(name).await? else {
            return Ok(());
        };
        let finalizers = vm.metadata.finalizers.clone().unwrap_or_default();
        if !finalizers.iter().any(|f| f == POOL_FINALIZER) {
            return Ok(());
        }
        let kept: Vec<_> = finalizers
            .into_iter()
            .filter(|f| f != POOL_FINALIZER)
            .collect();
        let patch = json!({"metadata": {
            "finalizers": kept,
            "resourceVersion": vm.metadata.resource_version,
        }});
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// What acting on a plan did.
#[derive(Debug, Default)]
pub struct Acted {
    /// The replicas written (when they changed).
    pub scaled: Option<(u32, u32)>,
    /// VMs deleted.
    pub retired: u32,
    /// The first error.
    pub error: Option<kube::Error>,
}

/// Carries out `plan` on pool `key` whose `spec.replicas` is `current`:
/// first the replica count, then the retirements (the recipe's order), then
/// the releases. A failed replica write skips the retirements.
pub async fn act(shared: &Shared, key: &PoolKey, current: u32, plan: &Plan) -> Acted {
    let mut acted = Acted::default();
    if plan.changes_replicas(current) {
        match write_replicas(shared, key, plan.replicas).await {
            Ok(()) => acted.scaled = Some((current, plan.replicas)),
            Err(e) => {
                acted.error = Some(e);
                return acted;
            }
        }
    }
    let objects = shared.vms.objects(key);
    // Re-check each VM right before deleting it: a retired VM must still be
    // powered off, a cancelled one must still not have started its guest; the
    // delete's resourceVersion precondition fails if it moved on since then.
    let todo = plan
        .retire
        .iter()
        .map(|n| (n, policy::VmState::Stopped))
        .chain(plan.cancel.iter().map(|n| (n, policy::VmState::Booting)));
    let jobs: Vec<_> = todo
        .filter_map(|(name, expected)| {
            objects
                .iter()
                .find(|o| o.metadata.name.as_deref() == Some(name))
                .filter(|vm| vm_view(vm).state == expected)
        })
        .collect();
    let mut results = Vec::with_capacity(jobs.len());
    for chunk in jobs.chunks(RETIRE_CONCURRENCY) {
        results.extend(
            futures::future::join_all(chunk.iter().map(|vm| retire_vm(shared, key, vm))).await,
        );
    }
    for r in results {
        match r {
            Ok(true) => acted.retired += 1,
            Ok(false) => {}
            Err(e) => {
                acted.error.get_or_insert(e);
            }
        }
    }
    for name in &plan.release {
        if let Err(e) = release_vm(shared, key, name).await {
            acted.error.get_or_insert(e);
        }
    }
    acted
}

// ---------------------------------------------------------------------------
// The per-pool task.
// ---------------------------------------------------------------------------

struct PoolTask {
    shared: Arc<Shared>,
    labels: PoolLabels,
    poll: PollState,
    counts: Option<TaskCounts>,
    desired: Option<u32>,
    last_poll: Option<Time>,
    failures: u32,
    retry_after: Option<Duration>,
    conditions: Vec<Condition>,
    written: Option<(RunnerPoolStatus, Instant)>,
    degraded_announced: bool,
    policy: policy::State,
    started: Instant,
    schedule: Option<String>,
    forecast: forecast::Forecast,
    busy_at: Instant,
}

async fn run_pool(
    shared: Arc<Shared>,
    mut rx: watch::Receiver<PoolConfig>,
    stop: CancellationToken,
) {
    let first = rx.borrow().clone();
    let mut task = PoolTask {
        labels: PoolLabels::new(&first.key.namespace, &first.key.name),
        shared,
        poll: PollState::NotYet,
        counts: None,
        desired: None,
        last_poll: None,
        failures: 0,
        retry_after: None,
        conditions: first.conditions.clone(),
        written: None,
        degraded_announced: false,
        policy: policy::State::default(),
        started: Instant::now(),
        schedule: None,
        forecast: forecast::Forecast::from_peaks(&first.forecast),
        busy_at: Instant::now(),
    };
    tokio::select! {
        _ = stop.cancelled() => return,
        _ = task.shared.vms.wait_synced() => {}
    }
    loop {
        let cfg = rx.borrow_and_update().clone();
        let started = Instant::now();
        // The period runs from tick start to tick start: a slow tick (many
        // VMs to retire, a slow API) does not stretch it.
        let delay = task.tick(&cfg).await.saturating_sub(started.elapsed());
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

impl PoolTask {
    /// One poll-plan-act-report cycle; returns the delay until the next.
    async fn tick(&mut self, cfg: &PoolConfig) -> Duration {
        let key = &cfg.key;
        let m = &self.shared.metrics;
        let poll_interval = cfg.spec.as_ref().map_or(Duration::from_secs(30), |s| {
            budget::poll_interval(
                s.poll_interval,
                s.idle_poll_interval,
                self.busy_at.elapsed(),
            )
        });

        // Demand.
        let demand = match cfg.can_poll() {
            Some((spec, token)) => {
                let host = budget::host_of(&spec.api_url);
                self.shared.gate.acquire(&host, 2.0).await;
                m.polls.get_or_create(&self.labels).inc();
                let (u, r) = self
                    .shared
                    .circleci
                    .task_counts(&spec.api_url, token, &spec.resource_class)
                    .await;
                for rec in [&u, &r] {
                    m.observe_call(rec.endpoint.label(), rec.elapsed);
                    if let Err(e) = &rec.result {
                        m.count_error(&self.labels, rec.endpoint.label(), e.kind());
                        tracing::error!(
                            loop_name = "scaler",
                            namespace = %key.namespace,
                            pool = %key.name,
                            resource_class = %spec.resource_class,
                            endpoint = rec.endpoint.label(),
                            kind = e.kind(),
                            error = %e,
                            "{}",
                            rec.endpoint.failure_message()
                        );
                    }
                }
                match demand_of(&u, &r) {
                    Ok(c) => {
                        if c.unclaimed > 0 || c.running > 0 {
                            self.busy_at = Instant::now();
                        }
                        self.failures = 0;
                        self.retry_after = None;
                        self.counts = Some(c);
                        self.poll = PollState::Ok;
                        let now = Timestamp::now();
                        self.last_poll = Some(Time(now));
                        m.last_poll_timestamp
                            .get_or_create(&self.labels)
                            .set(now.as_second());
                        Some(Demand {
                            unclaimed: c.unclaimed,
                            running: c.running,
                        })
                    }
                    Err(e) => {
                        self.failures += 1;
                        self.retry_after = [u.result.as_ref().err(), r.result.as_ref().err()]
                            .into_iter()
                            .flatten()
                            .filter_map(CircleCiError::retry_after)
                            .max();
                        let rate_limited = matches!(e, CircleCiError::RateLimited { .. });
                        if rate_limited {
                            // Every pool of this host waits, not only this one.
                            let d = self.retry_after.unwrap_or(spec.poll_interval);
                            self.shared.gate.block(&host, d);
                        }
                        self.poll = PollState::Failed {
                            message: e.to_string(),
                            rate_limited,
                            consecutive: self.failures,
                        };
                        None
                    }
                }
            }
            None => None,
        };

        // Inventory and plan.
        let pool_obj = self.shared.pool_object(key);
        let vms = self.shared.vms.views(key);
        let mut scaled = None;
        let mut act_error = None;
        let mut plan_opt = None;
        if let (Some(pool), Some(spec)) = (&pool_obj, &cfg.spec) {
            let current = pool_view(pool).spec_replicas;
            let now = Timestamp::now();
            let warm = match (spec.forecast_percent, demand) {
                (Some(p), Some(d)) => {
                    self.forecast
                        .observe(now, d.unclaimed.saturating_add(d.running));
                    self.forecast.warm(now, p)
                }
                (Some(p), None) => self.forecast.warm(now, p),
                (None, _) => 0,
            };
            let (controls, schedule) = spec.controls_at(now, warm);
            self.schedule = schedule.map(str::to_string);
            // While stalled (e.g. the API token Secret vanished) the pool is
            // held exactly like during a CircleCI outage.
            let plan = policy::plan(
                &mut self.policy,
                &Input {
                    demand,
                    controls,
                    current_replicas: current,
                    vms: &vms,
                    now_secs: self.started.elapsed().as_secs(),
                },
            );
            let acted = act(&self.shared, key, current, &plan).await;
            if let Some((from, to)) = acted.scaled {
                m.replica_writes.get_or_create(&self.labels).inc();
                self.shared
                    .event(
                        &cfg.object_ref,
                        EventType::Normal,
                        "Scaled",
                        format!(
                            "Scaled VirtualMachinePool {} from {from} to {to} replicas",
                            key.name
                        ),
                    )
                    .await;
                scaled = Some(to);
            }
            if acted.retired > 0 {
                m.vms_retired
                    .get_or_create(&self.labels)
                    .inc_by(u64::from(acted.retired));
            }
            if let Some(e) = acted.error {
                tracing::warn!(namespace = %key.namespace, pool = %key.name, error = %e, "acting on the scaling plan failed");
                act_error = Some(e);
            }
            if plan.desired.is_some() {
                self.desired = plan.desired;
            }
            plan_opt = Some((plan, scaled.unwrap_or(current)));
        }

        // Report.
        let active = plan_opt.as_ref().map(|(p, _)| p.active);
        let ready = plan_opt.as_ref().map(|(p, _)| p.ready);
        let replicas_now = plan_opt.as_ref().map(|(_, r)| *r);
        if let Some(c) = self.counts {
            m.unclaimed_tasks
                .get_or_create(&self.labels)
                .set(i64::from(c.unclaimed));
            m.running_tasks
                .get_or_create(&self.labels)
                .set(i64::from(c.running));
        }
        if let Some(d) = self.desired {
            m.desired_replicas
                .get_or_create(&self.labels)
                .set(i64::from(d));
        }
        if let Some(r) = replicas_now {
            m.replicas.get_or_create(&self.labels).set(i64::from(r));
        }
        if let Some(r) = ready {
            m.ready_replicas
                .get_or_create(&self.labels)
                .set(i64::from(r));
        }
        if demand.is_some() {
            tracing::info!(
                loop_name = "scaler",
                namespace = %key.namespace,
                pool = %key.name,
                unclaimed_tasks = self.counts.map(|c| c.unclaimed),
                running_tasks = self.counts.map(|c| c.running),
                desired_vms = self.desired,
                replicas = replicas_now,
                active_vms = active,
                ready_vms = ready,
                "scaler poll"
            );
        }
        self.announce_degraded(cfg).await;

        let reconciling = cfg.reconciling.clone().or_else(|| {
            if pool_obj.is_none() && cfg.stalled.is_none() {
                Some(Problem::new(
                    crate::crd::REASON_PROGRESSING,
                    "waiting for the VirtualMachinePool to be created",
                ))
            } else {
                act_error.as_ref().map(|e| {
                    Problem::new(
                        crate::crd::REASON_APPLY_FAILED,
                        format!("scaling the VirtualMachinePool failed: {e}"),
                    )
                })
            }
        });
        let situation = Situation {
            generation: cfg.generation,
            stalled: cfg.stalled.clone(),
            reconciling,
            poll: if cfg.can_poll().is_some() {
                self.poll.clone()
            } else {
                PollState::NotYet
            },
            unclaimed: self.counts.map(|c| c.unclaimed),
            running: self.counts.map(|c| c.running),
            desired: self.desired,
            replicas: Some(
                vms.iter()
                    .filter(|v| v.state != policy::VmState::Terminating)
                    .count() as u32,
            ),
            ready,
            last_poll: self.last_poll.clone(),
            selector: Some(crate::resources::selector(&key.name)),
            active_schedule: self.schedule.clone(),
            forecast: cfg
                .spec
                .as_ref()
                .and_then(|s| s.forecast_percent)
                .map(|_| self.forecast.peaks.clone()),
        };
        self.write_status(cfg, &situation).await;

        let jitter = 0.8 + 0.4 * rand::random::<f64>();
        next_delay(poll_interval, self.failures, self.retry_after, jitter)
    }

    async fn announce_degraded(&mut self, cfg: &PoolConfig) {
        match (&self.poll, self.degraded_announced) {
            (PollState::Failed { message, .. }, false) => {
                self.degraded_announced = true;
                self.shared
                    .event(
                        &cfg.object_ref,
                        EventType::Warning,
                        "CircleCIUnavailable",
                        format!("CircleCI API calls fail ({message}); the pool keeps its size"),
                    )
                    .await;
            }
            (PollState::Ok, true) => {
                self.degraded_announced = false;
                self.shared
                    .event(
                        &cfg.object_ref,
                        EventType::Normal,
                        "CircleCIRecovered",
                        "CircleCI API calls succeed again".into(),
                    )
                    .await;
            }
            _ => {}
        }
    }

    async fn write_status(&mut self, cfg: &PoolConfig, situation: &Situation) {
        let status = build_status(situation, &self.conditions, Time(Timestamp::now()));
        if let Some((last, at)) = &self.written
            && status_equal_ignoring_time(last, &status)
            && (at.elapsed() < STATUS_REFRESH || status.last_poll_time == last.last_poll_time)
        {
            return;
        }
        if patch_status(&self.shared.client, &cfg.key, &status).await {
            self.conditions = status.conditions.clone();
            self.written = Some((status, Instant::now()));
        }
    }
}

/// Server-side applies the whole status of RunnerPool `key`. Returns whether
/// it was written.
pub async fn patch_status(client: &Client, key: &PoolKey, status: &RunnerPoolStatus) -> bool {
    let api: Api<RunnerPool> = Api::namespaced(client.clone(), &key.namespace);
    let body = json!({
        "apiVersion": format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION),
        "kind": "RunnerPool",
        "status": status,
    });
    match api
        .patch_status(
            &key.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
    {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(e) => {
            tracing::warn!(namespace = %key.namespace, pool = %key.name, error = %e, "status write failed");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_is_the_poll_interval_while_healthy() {
        let p = Duration::from_secs(5);
        assert_eq!(next_delay(p, 0, None, 1.0), p);
        assert_eq!(
            next_delay(p, 0, Some(Duration::from_secs(60)), 1.0),
            p,
            "no failure, no wait"
        );
    }

    #[test]
    fn delay_backs_off_exponentially_with_a_cap_and_honours_retry_after() {
        let p = Duration::from_secs(5);
        assert_eq!(next_delay(p, 1, None, 1.0), p);
        assert_eq!(next_delay(p, 2, None, 1.0), Duration::from_secs(10));
        assert_eq!(next_delay(p, 4, None, 1.0), Duration::from_secs(40));
        assert_eq!(next_delay(p, 30, None, 1.0), MAX_BACKOFF);
        assert_eq!(next_delay(p, u32::MAX, None, 1.2), MAX_BACKOFF.mul_f64(1.2));
        assert_eq!(
            next_delay(p, 1, Some(Duration::from_secs(42)), 1.0),
            Duration::from_secs(42)
        );
        // jitter stays within bounds and never below the poll interval
        for j in [0.0, 0.8, 1.0, 1.2, 5.0] {
            let d = next_delay(p, 3, None, j);
            assert!(
                d >= Duration::from_secs(16) && d <= Duration::from_secs(24),
                "{d:?}"
            );
            assert!(next_delay(p, 1, None, j) >= p);
        }
        // a poll interval above the cap is never shortened
        let slow = Duration::from_secs(600);
        assert_eq!(next_delay(slow, 5, None, 1.0), slow);
    }

    fn rec(result: Result<u32, CircleCiError>) -> CallRecord {
        CallRecord {
            endpoint: crate::circleci::Endpoint::Unclaimed,
            elapsed: Duration::ZERO,
            result,
        }
    }

    #[test]
    fn demand_needs_both_counts() {
        assert_eq!(
            demand_of(&rec(Ok(3)), &rec(Ok(4))),
            Ok(TaskCounts {
                unclaimed: 3,
                running: 4
            })
        );
        let e = CircleCiError::Malformed("x".into());
        assert_eq!(demand_of(&rec(Ok(3)), &rec(Err(e.clone()))), Err(e.clone()));
        assert_eq!(demand_of(&rec(Err(e.clone())), &rec(Ok(1))), Err(e));
    }

    #[test]
    fn index_groups_vms_by_pool_and_forgets_deleted_ones() {
        let vm = |ns: &str, pool: &str, name: &str| -> DynamicObject {
            serde_json::from_value(json!({
                "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
                "metadata": {"name": name, "namespace": ns,
                             "labels": {crate::resources::POOL_LABEL: pool}},
            }))
            .unwrap()
        };
        let mut map = VmMap::new();
        VmIndex::apply(&mut map, vm("a", "p", "p-1"));
        VmIndex::apply(&mut map, vm("a", "p", "p-0"));
        VmIndex::apply(&mut map, vm("b", "p", "p-0"));
        VmIndex::apply(&mut map, vm("a", "q", "q-0"));
        let idx = VmIndex {
            inner: Arc::new(RwLock::new(map)),
            ..Default::default()
        };
        let names =
            |k: &PoolKey| -> Vec<String> { idx.views(k).into_iter().map(|v| v.name).collect() };
        assert_eq!(names(&PoolKey::new("a", "p")), ["p-0", "p-1"]);
        assert_eq!(names(&PoolKey::new("b", "p")), ["p-0"]);
        VmIndex::delete(&mut idx.inner.write().unwrap(), &vm("a", "p", "p-0"));
        assert_eq!(names(&PoolKey::new("a", "p")), ["p-1"]);
        VmIndex::delete(&mut idx.inner.write().unwrap(), &vm("a", "p", "p-1"));
        assert!(
            idx.inner
                .read()
                .unwrap()
                .get(&PoolKey::new("a", "p"))
                .is_none()
        );
    }
}
