//! The RunnerPool reconciler: a thin shell around the pure builders.
//!
//! Per RunnerPool: check the spec, read the referenced Secrets, server-side
//! apply the cloud-init Secret and the VirtualMachinePool (only when they
//! differ from what is there), and start or update the pool's scaler task,
//! which is the only writer of the RunnerPool's status. A finalizer
//! (`runners.provisioner.dev/cleanup`) makes deletion deliberate: see
//! [`cleanup`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::circleci::{ApiToken, CircleCiClient};
use crate::crd::{
    CONDITION_READY, DeletionPolicy, REASON_INVALID_SPEC, REASON_SECRET_NOT_FOUND, RunnerPool,
    SecretKeyRef, validate,
};
use crate::error::{Error, Result};
use crate::http::Health;
use crate::kubevirt;
use crate::metrics::Metrics;
use crate::resources::{
    CondStatus, FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL, ResolvedSecrets, SCALER_FIELD_MANAGER,
    secret_name, set_condition, user_data_secret, virtual_machine_pool,
};
use crate::scaler::policy::{self, Bounds, Demand, Input, VmState};
use crate::scaler::report::Problem;
use crate::scaler::{self, PoolConfig, PoolKey, Scalers, Shared, VmIndex};

/// The RunnerPool finalizer.
pub const FINALIZER: &str = "runners.provisioner.dev/cleanup";
/// Name of the controller (events' reporting controller).
pub const CONTROLLER_NAME: &str = "runner-provisioner";
/// Periodic re-check of every RunnerPool.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How often a draining RunnerPool is looked at.
pub const DRAIN_RECHECK: Duration = Duration::from_secs(5);

/// Options of [`run`].
#[derive(Clone, Debug)]
pub struct Options {
    /// Watch only this namespace (`None`: all namespaces).
    pub namespace: Option<String>,
    /// Timeout of each CircleCI call.
    pub circleci_timeout: Duration,
    /// RunnerPools reconciled at once.
    pub concurrency: u16,
    /// This instance's identity (events' reporting instance).
    pub identity: String,
    /// CircleCI requests per second per API host, shared by all pools.
    pub circleci_max_rps: f64,
}

/// What reconcile needs.
pub struct Context {
    client: Client,
    scalers: Scalers,
    metrics: Arc<Metrics>,
    failures: Mutex<HashMap<PoolKey, u32>>,
    announced: Mutex<HashMap<PoolKey, String>>,
}

fn scoped<K>(client: &Client, ns: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

fn scoped_dyn(
    client: &Client,
    ns: Option<&str>,
    ar: &kube::core::ApiResource,
) -> Api<DynamicObject> {
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    }
}

/// Fails fast, with what to do, when the RunnerPool CRD or KubeVirt's APIs
/// are not served, or the operator may not read them.
pub async fn preflight(client: &Client, namespace: Option<&str>) -> Result<()> {
    let lp = ListParams::default().limit(1);
    let explain = |what: &str, hint: &str, e: kube::Error| match &e {
        kube::Error::Api(s) if s.code == 404 => {
            Error::MissingApi(format!("{what} is not served by the cluster: {hint}"))
        }
        kube::Error::Api(s) if s.code == 403 => Error::MissingApi(format!(
            "not allowed to list {what}: {} (check the operator's RBAC)",
            s.message
        )),
        _ => Error::Kube(e),
    };
    scoped::<RunnerPool>(client, namespace)
        .list_metadata(&lp)
        .await
        .map_err(|e| {
            explain(
                "the RunnerPool API (runnerpools.runners.provisioner.dev/v1alpha1)",
                "install the CRD: kubectl apply -f crds/runnerpool.yaml",
                e,
            )
        })?;
    scoped_dyn(client, namespace, &kubevirt::pool_resource())
        .list_metadata(&lp)
        .await
        .map_err(|e| {
            explain(
                "KubeVirt's VirtualMachinePool API (pool.kubevirt.io/v1beta1)",
                "install KubeVirt 1.7 or newer",
                e,
            )
        })?;
    scoped_dyn(client, namespace, &kubevirt::vm_resource())
        .list_metadata(&lp)
        .await
        .map_err(|e| {
            explain(
                "KubeVirt's VirtualMachine API (kubevirt.io/v1)",
                "install KubeVirt 1.7 or newer",
                e,
            )
        })?;
    Ok(())
}

/// Runs the controller and the scalers until `stop` is cancelled. `health`
/// is marked synced once the watch caches are filled.
pub async fn run(
    client: Client,
    opts: Options,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: CancellationToken,
) -> Result<()> {
    let ns = opts.namespace.as_deref();
    let circleci = CircleCiClient::new(opts.circleci_timeout)
        .map_err(|e| Error::Runtime(format!("cannot build the CircleCI client: {e}")))?;
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: CONTROLLER_NAME.into(),
            instance: Some(opts.identity.clone()),
        },
    );
    let managed = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));

    let vms = VmIndex::default();
    let vm_task = tokio::spawn(
        vms.clone()
            .run(scoped_dyn(&client, ns, &kubevirt::vm_resource())),
    );
    let pool_writer = reflector::store::Writer::<DynamicObject>::new(kubevirt::pool_resource());
    let pool_store: Store<DynamicObject> = pool_writer.as_reader();
    let pool_task = tokio::spawn(
        reflector::reflector(
            pool_writer,
            watcher(
                scoped_dyn(&client, ns, &kubevirt::pool_resource()),
                managed.clone(),
            )
            .modify(kubevirt::slim_pool),
        )
        .default_backoff()
        .for_each(|_| std::future::ready(())),
    );

    let shared = Arc::new(Shared {
        client: client.clone(),
        circleci,
        metrics: metrics.clone(),
        recorder,
        vms: vms.clone(),
        pools: pool_store.clone(),
        gate: crate::scaler::budget::HostGate::new(opts.circleci_max_rps, opts.circleci_max_rps),
    });
    let ctx = Arc::new(Context {
        client: client.clone(),
        scalers: Scalers::new(shared),
        metrics,
        failures: Mutex::new(HashMap::new()),
        announced: Mutex::new(HashMap::new()),
    });

    tokio::select! {
        _ = stop.cancelled() => { vm_task.abort(); pool_task.abort(); return Ok(()) }
        _ = async { vms.wait_synced().await; let _ = pool_store.wait_until_ready().await; } => {}
    }

    let (reader, writer) = reflector::store();
    let pools = watcher(
        scoped::<RunnerPool>(&client, ns),
        watcher::Config::default(),
    )
    .default_backoff()
    // Nothing reads managedFields; they are half of a cached RunnerPool.
    .modify(|p| p.managed_fields_mut().clear())
    .reflect(writer)
    .applied_objects()
    .predicate_filter(spec_or_lifecycle, Default::default());
    let ctrl = Controller::for_stream(pools, reader);
    let store = ctrl.store();
    let secrets = watcher(
        scoped::<PartialObjectMeta<Secret>>(&client, ns),
        watcher::Config::default(),
    )
    .default_backoff()
    .touched_objects();
    health.set_synced(true);
    tracing::info!(namespace = ns.unwrap_or("<all>"), "controller started");
    ctrl.owns_with(
        scoped_dyn(&client, ns, &kubevirt::pool_resource()),
        kubevirt::pool_resource(),
        managed,
    )
    .watches_stream(secrets, move |s| pools_using_secret(&store, &s))
    .with_config(ControllerConfig::default().concurrency(opts.concurrency))
    .graceful_shutdown_on(stop.clone().cancelled_owned())
    .run(reconcile, error_policy, ctx.clone())
    .for_each(|r| {
        if let Err(e) = r {
            tracing::debug!(error = %e, "reconcile trigger failed");
        }
        std::future::ready(())
    })
    .await;

    health.set_synced(false);
    ctx.scalers.stop_all().await;
    vm_task.abort();
    pool_task.abort();
    tracing::info!("controller stopped");
    Ok(())
}

/// Reconcile on spec changes, deletion and finalizer changes, not on status
/// writes (the scaler writes status every time something moves).
fn spec_or_lifecycle(p: &RunnerPool) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.metadata.generation.hash(&mut h);
    p.metadata.deletion_timestamp.is_some().hash(&mut h);
    p.metadata.finalizers.hash(&mut h);
    Some(h.finish())
}

/// The RunnerPools that reference Secret `s` or own it.
fn pools_using_secret(
    store: &Store<RunnerPool>,
    s: &PartialObjectMeta<Secret>,
) -> Vec<ObjectRef<RunnerPool>> {
    let (Some(ns), Some(name)) = (s.metadata.namespace.as_deref(), s.metadata.name.as_deref())
    else {
        return Vec::new();
    };
    store
        .state()
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns))
        .filter(|p| {
            let spec = &p.spec;
            spec.circleci.api_token_secret_ref.name == name
                || spec.circleci.runner_token_secret_ref.name == name
                || spec
                    .user_data_secret_ref
                    .as_ref()
                    .is_some_and(|r| r.name == name)
                || p.metadata.name.as_deref().map(secret_name).as_deref() == Some(name)
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

fn key_of(pool: &RunnerPool) -> Result<PoolKey> {
    Ok(PoolKey::new(
        pool.metadata
            .namespace
            .as_deref()
            .ok_or(crate::resources::BuildError::MissingNamespace)?,
        pool.metadata
            .name
            .as_deref()
            .ok_or(crate::resources::BuildError::MissingName)?,
    ))
}

/// Reconciles one RunnerPool.
pub async fn reconcile(pool: Arc<RunnerPool>, ctx: Arc<Context>) -> Result<Action> {
    let start = Instant::now();
    let key = key_of(&pool)?;
    let api: Api<RunnerPool> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let res = finalizer(&api, FINALIZER, pool, |ev| async {
        match ev {
            FinalizerEvent::Apply(p) => apply(p, &ctx).await,
            FinalizerEvent::Cleanup(p) => cleanup(p, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    let label = match &res {
        Err(e) if e.reason() != "Draining" => Some(e.metric_label()),
        _ => None,
    };
    ctx.metrics.observe_reconcile(start.elapsed(), label);
    if res.is_ok() {
        ctx.failures.lock().expect("lock").remove(&key);
    }
    res
}

/// Requeue policy: a draining pool is looked at again soon; permanent errors
/// wait for a change; transient ones back off exponentially (1 s .. 5 min).
pub fn error_policy(pool: Arc<RunnerPool>, err: &Error, ctx: Arc<Context>) -> Action {
    if err.reason() == "Draining" {
        return Action::requeue(DRAIN_RECHECK);
    }
    let Ok(key) = key_of(&pool) else {
        return Action::await_change();
    };
    tracing::warn!(namespace = %key.namespace, pool = %key.name, error = %err, "reconcile failed");
    if err.is_permanent() {
        return Action::await_change();
    }
    let n = {
        let mut f = ctx.failures.lock().expect("lock");
        let n = f.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let secs = 2u64.saturating_pow(n.saturating_sub(1).min(9)).min(300);
    Action::requeue(Duration::from_secs(secs).mul_f64(0.8 + 0.4 * rand::random::<f64>()))
}

/// Reads `r.key` of Secret `r.name`: trimmed, non-empty UTF-8.
async fn read_key(
    api: &Api<Secret>,
    ns: &str,
    name: &str,
    key: &str,
    field: &'static str,
) -> Result<String> {
    let secret = api
        .get_opt(name)
        .await?
        .ok_or_else(|| Error::SecretNotFound {
            namespace: ns.to_string(),
            name: name.to_string(),
            field,
        })?;
    let missing = || Error::SecretKeyMissing {
        namespace: ns.to_string(),
        name: name.to_string(),
        key: key.to_string(),
        field,
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.clone().into_bytes())
        })
        .ok_or_else(missing)?;
    let value = String::from_utf8(bytes).map_err(|_| missing())?;
    if value.trim().is_empty() {
        return Err(missing());
    }
    Ok(value)
}

async fn read_ref(
    api: &Api<Secret>,
    ns: &str,
    r: &SecretKeyRef,
    field: &'static str,
) -> Result<String> {
    read_key(api, ns, &r.name, &r.key, field).await
}

/// The reconcile of a live RunnerPool.
async fn apply(pool: Arc<RunnerPool>, ctx: &Context) -> Result<Action> {
    let key = key_of(&pool)?;
    let ns = key.namespace.clone();
    let mut cfg = PoolConfig {
        key: key.clone(),
        generation: pool.metadata.generation,
        object_ref: pool.object_ref(&()),
        spec: None,
        api_token: None,
        stalled: None,
        reconciling: None,
        conditions: pool
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default(),
        forecast: pool
            .status
            .as_ref()
            .and_then(|s| s.forecast_hourly_peaks.clone())
            .unwrap_or_default(),
    };

    let valid = match validate(&pool.spec) {
        Ok(v) => v,
        Err(errs) => {
            let msg = format!("invalid spec: {}", errs.join("; "));
            cfg.stalled = Some(Problem::new(REASON_INVALID_SPEC, msg));
            ctx.announce(&cfg).await;
            ctx.scalers.ensure(cfg);
            return Ok(Action::await_change());
        }
    };
    cfg.spec = Some(valid);

    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let spec = &pool.spec;
    let mut problems: Vec<Error> = Vec::new();
    let mut permanent = |r: Result<String>| -> Result<Option<String>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.is_permanent() => {
                problems.push(e);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    };
    let api_token = permanent(
        read_ref(
            &secrets,
            &ns,
            &spec.circleci.api_token_secret_ref,
            "spec.circleci.apiTokenSecretRef",
        )
        .await,
    )?;
    let runner_token = permanent(
        read_ref(
            &secrets,
            &ns,
            &spec.circleci.runner_token_secret_ref,
            "spec.circleci.runnerTokenSecretRef",
        )
        .await,
    )?;
    // Some(None): no userData Secret; None: it is missing.
    let user_data = match &spec.user_data_secret_ref {
        Some(r) => {
            permanent(read_key(&secrets, &ns, &r.name, &r.key, "spec.userDataSecretRef").await)?
                .map(Some)
        }
        None => Some(None),
    };
    cfg.api_token = api_token.as_deref().map(ApiToken::new);

    let mut apply_error = None;
    if let (Some(runner_token), Some(user_data)) = (runner_token, user_data) {
        let resolved = ResolvedSecrets {
            runner_token: runner_token.trim().to_string(),
            user_data,
        };
        match ensure_children(&pool, &resolved, ctx).await {
            Ok(()) => {}
            Err(e) if e.is_permanent() => problems.push(e),
            Err(e) => apply_error = Some(e),
        }
    }

    if !problems.is_empty() {
        let reason = problems
            .iter()
            .map(Error::reason)
            .find(|r| *r != REASON_SECRET_NOT_FOUND)
            .unwrap_or(REASON_SECRET_NOT_FOUND);
        let msg = problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        cfg.stalled = Some(Problem::new(reason, msg));
    }
    if let Some(e) = &apply_error {
        cfg.reconciling = Some(Problem::new(
            crate::crd::REASON_APPLY_FAILED,
            format!("applying the pool's objects failed: {e}"),
        ));
    }
    ctx.announce(&cfg).await;
    ctx.scalers.ensure(cfg);
    match apply_error {
        Some(e) => Err(e),
        None => Ok(Action::requeue(RESYNC)),
    }
}

impl Context {
    /// Publishes a Warning event when the pool's stall reason changes, and a
    /// Normal one when it clears.
    async fn announce(&self, cfg: &PoolConfig) {
        let now = cfg
            .stalled
            .as_ref()
            .map(|p| format!("{}: {}", p.reason, p.message));
        let before = {
            let mut a = self.announced.lock().expect("lock");
            match &now {
                Some(n) => a.insert(cfg.key.clone(), n.clone()),
                None => a.remove(&cfg.key),
            }
        };
        if before == now {
            return;
        }
        let shared = self.scalers.shared();
        match (&cfg.stalled, before) {
            (Some(p), _) => {
                shared
                    .event(
                        &cfg.object_ref,
                        EventType::Warning,
                        &p.reason,
                        p.message.clone(),
                    )
                    .await
            }
            (None, Some(_)) => {
                shared
                    .event(
                        &cfg.object_ref,
                        EventType::Normal,
                        "Resolved",
                        "the RunnerPool's spec and Secrets are usable again".into(),
                    )
                    .await
            }
            (None, None) => {}
        }
    }
}

/// Whether `have` contains everything in `want`: objects key by key
/// (extra keys in `have`, e.g. defaults filled in by the API server, are
/// fine), arrays element by element with the same length, scalars equal.
pub fn json_contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w.iter().all(|(k, wv)| {
            h.get(k).is_some_and(|hv| json_contains(hv, wv)) || (wv.is_null() && !h.contains_key(k))
        }),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(a, b)| json_contains(a, b))
        }
        (Value::Number(h), Value::Number(w)) => h.as_f64() == w.as_f64(),
        (h, w) => h == w,
    }
}

fn owned_by(meta: &kube::api::ObjectMeta, pool: &RunnerPool) -> bool {
    meta.owner_references.as_ref().is_some_and(|refs| {
        refs.iter()
            .any(|r| r.controller == Some(true) && Some(&r.uid) == pool.metadata.uid.as_ref())
    })
}

fn labels_contain(meta: &kube::api::ObjectMeta, want: &Value) -> bool {
    let have = serde_json::to_value(meta.labels.clone().unwrap_or_default()).unwrap_or_default();
    json_contains(&have, want)
}

/// Applies the cloud-init Secret and the VirtualMachinePool when they are
/// missing or differ from the desired state. Writes nothing when they match.
async fn ensure_children(
    pool: &RunnerPool,
    resolved: &ResolvedSecrets,
    ctx: &Context,
) -> Result<()> {
    let key = key_of(pool)?;
    let pp = PatchParams::apply(FIELD_MANAGER).force();

    let secret = user_data_secret(pool, resolved)?;
    let sname = secret_name(&key.name);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let write_secret = match secrets.get_opt(&sname).await? {
        Some(have) => {
            if !owned_by(&have.metadata, pool) {
                return Err(Error::NotOwned {
                    kind: "Secret",
                    namespace: key.namespace.clone(),
                    name: sname,
                });
            }
            have.data != secret.data
                || !labels_contain(
                    &have.metadata,
                    &serde_json::to_value(&secret.metadata.labels).unwrap_or_default(),
                )
        }
        None => true,
    };
    if write_secret {
        secrets.patch(&sname, &pp, &Patch::Apply(&secret)).await?;
        tracing::info!(namespace = %key.namespace, pool = %key.name, secret = %sname, "applied the cloud-init Secret");
    }

    let shared = ctx.scalers.shared();
    let pools: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &key.namespace,
        &kubevirt::pool_resource(),
    );
    match pools.get_opt(&key.name).await? {
        None => {
            // Created (not applied) by the scaler's field manager, so that
            // manager owns spec.replicas from the start; the controller's
            // applies never contain it and so can never remove it.
            let min = pool.spec.scaling.min_replicas.max(0);
            let initial: DynamicObject =
                serde_json::from_value(virtual_machine_pool(pool, &sname, Some(min))?)?;
            let pp_create = PostParams {
                field_manager: Some(SCALER_FIELD_MANAGER.into()),
                ..Default::default()
            };
            match pools.create(&pp_create, &initial).await {
                Ok(_) => {
                    tracing::info!(namespace = %key.namespace, pool = %key.name, replicas = min, "created the VirtualMachinePool");
                    shared
                        .event(
                            &pool.object_ref(&()),
                            EventType::Normal,
                            "Created",
                            format!(
                                "Created VirtualMachinePool {} with {min} replicas",
                                key.name
                            ),
                        )
                        .await;
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            let desired = virtual_machine_pool(pool, &sname, None)?;
            pools.patch(&key.name, &pp, &Patch::Apply(&desired)).await?;
        }
        Some(have) => {
            if !owned_by(&have.metadata, pool) {
                return Err(Error::NotOwned {
                    kind: "VirtualMachinePool",
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                });
            }
            // Never drop spec.replicas: should the controller's own applies
            // own it (a pool made otherwise), keep applying today's value.
            let keep = manager_owns_replicas(&have, FIELD_MANAGER)
                .then(|| kubevirt::pool_view(&have).spec_replicas as i32);
            let desired = virtual_machine_pool(pool, &sname, keep)?;
            if keep.is_some()
                || !json_contains(&have.data["spec"], &desired["spec"])
                || !labels_contain(&have.metadata, &desired["metadata"]["labels"])
            {
                pools.patch(&key.name, &pp, &Patch::Apply(&desired)).await?;
                tracing::info!(namespace = %key.namespace, pool = %key.name, "updated the VirtualMachinePool");
            }
        }
    }
    Ok(())
}

/// Whether `manager` (with a server-side apply) owns `spec.replicas`.
fn manager_owns_replicas(pool: &DynamicObject, manager: &str) -> bool {
    pool.metadata.managed_fields.as_ref().is_some_and(|mf| {
        mf.iter().any(|m| {
            m.manager.as_deref() == Some(manager)
                && m.operation.as_deref() == Some("Apply")
                && m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.pointer("/f:spec/f:replicas").is_some())
        })
    })
}

/// Deletion. The scaler stops first, so no new VM is asked for. Then, per
/// `spec.deletionPolicy`:
/// - `Drain`: `replicas` follows the VMs that may still run a job (never
///   below them), powered-off VMs are deleted as they stop; the finalizer
///   goes once no VM is left, so no job is killed.
/// - `Delete`: every VM is deleted at once.
///
/// The VirtualMachinePool and the cloud-init Secret are then removed by the
/// garbage collector (owner references).
async fn cleanup(pool: Arc<RunnerPool>, ctx: &Context) -> Result<Action> {
    let key = key_of(&pool)?;
    ctx.scalers.stop(&key).await;
    ctx.announced.lock().expect("lock").remove(&key);
    let shared = ctx.scalers.shared();
    let objects = shared.vms.objects(&key);
    let views: Vec<_> = objects.iter().map(|o| kubevirt::vm_view(o)).collect();

    match pool.spec.deletion_policy {
        DeletionPolicy::Delete => {
            let api: Api<DynamicObject> =
                Api::namespaced_with(ctx.client.clone(), &key.namespace, &kubevirt::vm_resource());
            for v in &views {
                if v.state != VmState::Terminating {
                    match api.delete(&v.name, &DeleteParams::background()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(s)) if s.code == 404 => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                scaler::release_vm(shared, &key, &v.name).await?;
            }
            if !views.is_empty() {
                tracing::info!(namespace = %key.namespace, pool = %key.name, vms = views.len(), "deletionPolicy Delete: deleted every VM");
            }
            Ok(Action::await_change())
        }
        DeletionPolicy::Drain => {
            let current = shared
                .pool_object(&key)
                .map(|p| kubevirt::pool_view(&p).spec_replicas);
            let plan = policy::plan(
                &mut policy::State::default(),
                &Input {
                    demand: Some(Demand {
                        unclaimed: 0,
                        running: 0,
                    }),
                    controls: Bounds { min: 0, max: 0 }.into(),
                    current_replicas: current.unwrap_or(0),
                    vms: &views,
                    now_secs: 0,
                },
            );
            if current.is_some() {
                let acted = scaler::act(shared, &key, current.unwrap_or(0), &plan).await;
                if let Some(e) = acted.error {
                    return Err(e.into());
                }
            } else {
                for name in &plan.release {
                    scaler::release_vm(shared, &key, name).await?;
                }
            }
            let left = plan.active + plan.retire.len() as u32;
            if left == 0 && plan.release.is_empty() {
                return Ok(Action::await_change());
            }
            draining_status(ctx, &pool, &key, plan.active).await;
            Err(Error::Draining(left))
        }
    }
}

async fn draining_status(ctx: &Context, pool: &RunnerPool, key: &PoolKey, active: u32) {
    let mut status = pool.status.clone().unwrap_or_default();
    let msg = format!(
        "the RunnerPool is being deleted: waiting for {active} VM(s) to finish (deletionPolicy Drain)"
    );
    let changed = set_condition(
        &mut status.conditions,
        CONDITION_READY,
        CondStatus::False,
        "Draining",
        &msg,
        pool.metadata.generation,
        Time(Timestamp::now()),
    );
    if changed {
        scaler::patch_status(&ctx.client, key, &status).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn contains_ignores_server_defaults_but_sees_drift() {
        let want = json!({"a": 1, "b": {"c": [1, {"d": "x"}]}, "e": null});
        let have = json!({"a": 1, "b": {"c": [1, {"d": "x", "dflt": true}], "z": 0}});
        assert!(json_contains(&have, &want));
        assert!(!json_contains(
            &json!({"a": 2, "b": {"c": [1, {"d": "x"}]}}),
            &want
        ));
        assert!(
            !json_contains(&json!({"a": 1, "b": {"c": [1]}}), &want),
            "array length"
        );
        assert!(
            !json_contains(&json!({"b": {"c": [1, {"d": "x"}]}}), &want),
            "missing key"
        );
        assert!(json_contains(&json!({"n": 1.0}), &json!({"n": 1})));
    }

    #[test]
    fn applied_pool_contains_its_own_desired_state() {
        let p = crate::resources::fixtures::pool();
        let desired = virtual_machine_pool(&p, "linux-large-cloudinit", None).unwrap();
        assert!(json_contains(&desired["spec"], &desired["spec"]));
        let mut drifted = desired.clone();
        drifted["spec"]["scaleInStrategy"] = json!({"proactive": {}});
        assert!(!json_contains(&drifted["spec"], &desired["spec"]));
    }

    #[test]
    fn lifecycle_predicate_ignores_status_but_not_spec_or_deletion() {
        let p = crate::resources::fixtures::pool();
        let h = spec_or_lifecycle(&p);
        let mut s = p.clone();
        s.status = Some(Default::default());
        s.metadata.resource_version = Some("99".into());
        assert_eq!(spec_or_lifecycle(&s), h);
        let mut g = p.clone();
        g.metadata.generation = Some(4);
        assert_ne!(spec_or_lifecycle(&g), h);
        let mut d = p.clone();
        d.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
        assert_ne!(spec_or_lifecycle(&d), h);
        let mut f = p;
        f.metadata.finalizers = Some(vec![FINALIZER.into()]);
        assert_ne!(spec_or_lifecycle(&f), h);
    }

    #[test]
    fn secret_changes_map_to_the_pools_that_use_them() {
        let (reader, mut writer) = reflector::store::<RunnerPool>();
        let p = crate::resources::fixtures::pool();
        writer.apply_watcher_event(&watcher::Event::Apply(p));
        let meta = |ns: &str, name: &str| PartialObjectMeta::<Secret> {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        for name in [
            "circleci-api",
            "linux-large-runner",
            "linux-large-cloudinit",
        ] {
            let refs = pools_using_secret(&reader, &meta("ci-runners", name));
            assert_eq!(refs.len(), 1, "{name}");
            assert_eq!(refs[0].name, "linux-large");
        }
        assert!(pools_using_secret(&reader, &meta("ci-runners", "unrelated")).is_empty());
        assert!(pools_using_secret(&reader, &meta("other-ns", "circleci-api")).is_empty());
    }
}
