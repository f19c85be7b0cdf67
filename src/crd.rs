//! The `RunnerPool` API (`runners.provisioner.dev/v1alpha1`).
//!
//! Types only, no IO. Defaults and every rule that can be written as OpenAPI or
//! CEL live in the schema, so the apiserver rejects bad objects before the
//! operator sees them; [`validate`] re-checks them and adds what the schema
//! cannot express (it is what the controller reports in status).
//!
//! Doc comments on the spec and status types are user documentation: they
//! become the CRD's descriptions (`kubectl explain runnerpool.spec...`).

use std::collections::BTreeMap;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod validate;
pub use validate::{ValidSpec, validate};

/// API group of the RunnerPool resource.
pub const GROUP: &str = "runners.provisioner.dev";
/// API version of the RunnerPool resource.
pub const VERSION: &str = "v1alpha1";
/// Name of the CustomResourceDefinition.
pub const CRD_NAME: &str = "runnerpools.runners.provisioner.dev";

/// Default CircleCI runner API (CircleCI cloud).
pub const DEFAULT_API_URL: &str = "https://runner.circleci.com";
/// Default key read from the token Secrets.
pub const DEFAULT_TOKEN_KEY: &str = "token";
/// Default key read from the `userDataSecretRef` Secret.
pub const DEFAULT_USER_DATA_KEY: &str = "userData";
/// Default `scaling.pollInterval`.
pub const DEFAULT_POLL_INTERVAL: &str = "5s";
/// Default `scaling.idleTimeout`.
pub const DEFAULT_IDLE_TIMEOUT: &str = "10m";
/// Smallest allowed `scaling.pollInterval`.
pub const MIN_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// Default runner-bundle image repository.
pub const DEFAULT_BUNDLE_IMAGE: &str = "docker.io/circleci/runner-bundle";
/// Default VM root disk (containerDisk) when `template.spec` is not set.
pub const DEFAULT_VM_IMAGE: &str = "quay.io/containerdisks/ubuntu:24.04";
/// Longest RunnerPool name: VMs are named `<pool>-<index>` and carry the pool
/// name as a label value (at most 63 characters), so the name leaves room for
/// the index.
pub const MAX_POOL_NAME_LEN: usize = 52;

/// CircleCI's resource class charset: `namespace/name`, namespace
/// `[a-z0-9_-]+`, name `[A-Za-z0-9:_+-]+`.
pub const RESOURCE_CLASS_PATTERN: &str = r"^[a-z0-9_-]+/[A-Za-z0-9:_+-]+$";
/// A Go duration (what CircleCI's agent and CEL's `duration()` accept),
/// without sign: one or more `<number><unit>`, units ns, us, µs, ms, s, m, h.
pub const GO_DURATION_PATTERN: &str = r"^(([0-9]+([.][0-9]*)?|[.][0-9]+)(ns|us|µs|μs|ms|s|m|h))+$";

// ---------------------------------------------------------------------------
// Condition types and reasons.
// ---------------------------------------------------------------------------

/// Condition `Ready`: True when the operator manages the pool as specified:
/// the spec is valid, the Secrets were read, the VirtualMachinePool and its
/// cloud-init Secret are applied, and the last CircleCI poll succeeded. It
/// says nothing about how many VMs are up (see `readyReplicas`): a pool that
/// is scaling out is still Ready. This is the condition Flux, Argo CD (custom
/// health check) and people read.
pub const CONDITION_READY: &str = "Ready";
/// Condition `Reconciling` (kstatus "abnormal-true"): True while the operator
/// is bringing the children in line with a new generation of the spec.
/// kstatus (Flux, `kubectl wait`, cli-utils) reports such an object as
/// InProgress.
pub const CONDITION_RECONCILING: &str = "Reconciling";
/// Condition `Stalled` (kstatus "abnormal-true"): True when the operator cannot
/// make progress without a change by the user: an invalid spec, a missing
/// Secret or key, a name clash with an object it does not own. kstatus
/// reports such an object as Failed.
pub const CONDITION_STALLED: &str = "Stalled";
/// Condition `Degraded`: True when the pool works in a reduced mode, e.g. the
/// CircleCI API failed or rate-limited the last polls and the pool keeps its
/// last known size. It clears by itself when the cause goes away.
pub const CONDITION_DEGRADED: &str = "Degraded";

/// Reason: everything applied and polled.
pub const REASON_RECONCILED: &str = "Reconciled";
/// Reason: the spec failed [`validate`].
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
/// Reason: a referenced Secret or key does not exist.
pub const REASON_SECRET_NOT_FOUND: &str = "SecretNotFound";
/// Reason: applying the children is in progress.
pub const REASON_PROGRESSING: &str = "Progressing";
/// Reason: the CircleCI API answered with an error or not at all.
pub const REASON_CIRCLECI_UNAVAILABLE: &str = "CircleCIUnavailable";
/// Reason: the CircleCI API rate-limited the operator (HTTP 429).
pub const REASON_RATE_LIMITED: &str = "RateLimited";
/// Reason: the Kubernetes API rejected or failed a write.
pub const REASON_APPLY_FAILED: &str = "ApplyFailed";
/// Reason: no problem (used with status False on Degraded/Stalled).
pub const REASON_AS_EXPECTED: &str = "AsExpected";

// ---------------------------------------------------------------------------
// Spec.
// ---------------------------------------------------------------------------

/// Desired state of a RunnerPool: the CircleCI resource class and how to reach
/// CircleCI, how many VMs to run, and what each VM looks like.
///
/// The operator creates and owns a VirtualMachinePool (same name as the
/// RunnerPool) and a Secret `<name>-cloudinit` with each VM's cloud-init. Each
/// VM boots, installs `circleci-runner` in single-task mode, runs exactly one
/// job and powers off; the operator then deletes it. It never deletes or stops
/// a VM that may be running a job.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "runners.provisioner.dev",
    version = "v1alpha1",
    kind = "RunnerPool",
    namespaced,
    status = "RunnerPoolStatus",
    shortname = "rp",
    category = "runners",
    derive = "PartialEq",
    doc = "A RunnerPool keeps CircleCI self-hosted machine runners of one resource class available as KubeVirt virtual machines, sized to the resource class's task queue. The operator owns a VirtualMachinePool of the same name and a Secret `<name>-cloudinit`; each VM runs one job and powers off.",
    selectable = ".spec.resourceClass",
    validation = Rule::new("size(self.metadata.name) <= 52").message("metadata.name must be at most 52 characters: VMs are named <name>-<index> and labelled with the name"),
    printcolumn(name = "Class", type_ = "string", json_path = ".spec.resourceClass", description = "CircleCI resource class"),
    printcolumn(name = "Min", type_ = "integer", json_path = ".spec.scaling.minReplicas", description = "Minimum number of VMs"),
    printcolumn(name = "Max", type_ = "integer", json_path = ".spec.scaling.maxReplicas", description = "Maximum number of VMs"),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".status.desiredReplicas", description = "VMs the pool should have now"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas", description = "VMs that are up"),
    printcolumn(name = "Unclaimed", type_ = "integer", json_path = ".status.unclaimedTasks", description = "Tasks waiting for a runner"),
    printcolumn(name = "Running", type_ = "integer", json_path = ".status.runningTasks", description = "Tasks running on runners"),
    printcolumn(name = "Status", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].reason", description = "Reason of the Ready condition", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("!has(self.userData) || !has(self.userDataSecretRef)").message("set at most one of userData and userDataSecretRef"))]
#[serde(rename_all = "camelCase")]
pub struct RunnerPoolSpec {
    /// The CircleCI resource class the VMs serve, `namespace/name` (e.g.
    /// `my-org/linux-large`). Namespace: lowercase letters, digits, `_`, `-`;
    /// name: letters, digits, `:`, `_`, `-`, `+`. Use one RunnerPool per
    /// resource class.
    #[schemars(length(min = 3, max = 256), pattern(r"^[a-z0-9_-]+/[A-Za-z0-9:_+-]+$"))]
    pub resource_class: String,

    /// How to reach CircleCI: the runner API and the tokens.
    pub circleci: CircleCiSpec,

    /// How many VMs to run and how the operator polls the task queue.
    pub scaling: ScalingSpec,

    /// Options written into each VM's `circleci-runner` configuration.
    #[serde(default)]
    pub runner: RunnerSpec,

    /// A bash script run as root in each VM before the runner is installed
    /// (install packages, configure Docker, ...). A script with its own `#!`
    /// line runs with that interpreter. It is delivered through the VM's
    /// cloud-init Secret, never inline in the VM spec. Set at most one of
    /// userData and userDataSecretRef.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub user_data: Option<String>,

    /// Like userData, but read from a key of a Secret in the RunnerPool's
    /// namespace (for scripts that contain credentials). Changes to the Secret
    /// reach VMs created afterwards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_secret_ref: Option<UserDataSecretRef>,

    /// A containerDisk with the runner packages, attached to each VM so that it
    /// installs `circleci-runner` without downloading it. When it is disabled
    /// or the disk is missing, the VM installs from CircleCI's package
    /// repository.
    #[serde(default)]
    pub runner_bundle: RunnerBundleSpec,

    /// What happens to the VMs when this RunnerPool is deleted. `Drain`
    /// (default): no new VM is created, VMs leave as their runners finish
    /// (after their one job, or after idleTimeout when idle), and the
    /// RunnerPool is removed once no VM is left, so no running job is killed.
    /// With `idleTimeout: 0s` idle VMs never leave by themselves: delete them
    /// by hand or switch to `Delete`. `Delete`: every VM is deleted at once,
    /// killing the jobs they run.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// The KubeVirt VirtualMachineInstance template for each VM. When absent,
    /// VMs boot Ubuntu 24.04 (`quay.io/containerdisks/ubuntu:24.04`) with 1 CPU
    /// and 2Gi of memory.
    #[serde(default)]
    pub template: VmiTemplate,
}

/// How to reach CircleCI.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CircleCiSpec {
    /// Base URL of the CircleCI runner API, used by the operator (queue depth)
    /// and by the runners (`api.url`). CircleCI cloud:
    /// `https://runner.circleci.com`; CircleCI Server: your server's URL.
    #[serde(default = "default_api_url")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new("isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''").message("must be an http or https URL, e.g. https://runner.circleci.com"))]
    pub api_url: String,

    /// Secret key holding a CircleCI personal or project API token. The
    /// operator uses it to read the task queue (`Circle-Token` header); it
    /// never reaches the VMs.
    pub api_token_secret_ref: SecretKeyRef,

    /// Secret key holding the resource class token (created with `circleci
    /// runner token create`). It reaches the VMs only through their cloud-init
    /// Secret, so runners can claim tasks.
    pub runner_token_secret_ref: SecretKeyRef,
}

fn default_api_url() -> String {
    DEFAULT_API_URL.to_string()
}

/// A key of a Secret in the RunnerPool's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// Key within the Secret.
    #[serde(default = "default_token_key")]
    #[schemars(length(min = 1, max = 253), pattern(r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

fn default_token_key() -> String {
    DEFAULT_TOKEN_KEY.to_string()
}

/// A key of a Secret in the RunnerPool's namespace holding a userData script.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UserDataSecretRef {
    /// Name of the Secret.
    #[schemars(
        length(min = 1, max = 253),
        pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// Key within the Secret.
    #[serde(default = "default_user_data_key")]
    #[schemars(length(min = 1, max = 253), pattern(r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

fn default_user_data_key() -> String {
    DEFAULT_USER_DATA_KEY.to_string()
}

/// How many VMs to run and how often to poll CircleCI. The operator keeps
/// `unclaimed + running` tasks' worth of VMs, plus `headroom` while tasks
/// wait or run, plus `idleBuffer` at all times, at least the forecast's warm
/// pool when forecasting is on, clamped to `[minReplicas, maxReplicas]`;
/// `scaleDownDelay` delays shrinking and `maxSurge` caps VMs booting at once.
/// An active entry of `schedules` overrides these numbers.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not be greater than maxReplicas").field_path(".minReplicas"))]
#[x_kube(validation = Rule::new(format!("!self.idleTimeout.matches('{GO_DURATION_PATTERN}') || !self.scaleDownDelay.matches('{GO_DURATION_PATTERN}') || duration(self.idleTimeout) == duration('0s') || duration(self.idleTimeout) >= duration(self.scaleDownDelay)")).message("idleTimeout must be at least scaleDownDelay (or 0s: never)").field_path(".idleTimeout"))]
#[serde(rename_all = "camelCase")]
pub struct ScalingSpec {
    /// VMs kept running even when no task waits (a warm pool: jobs start
    /// without waiting for a VM to boot). Idle VMs still leave after
    /// idleTimeout and are replaced by fresh ones.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub min_replicas: i32,

    /// Upper bound on the number of VMs, whatever the queue says. Keep it at
    /// or below your CircleCI plan's runner concurrency. 0 pauses the pool
    /// (no new VMs).
    #[schemars(range(min = 0))]
    pub max_replicas: i32,

    /// How long a VM's runner waits for a task before it exits and the VM
    /// powers off (`runner.idle_timeout`), as a duration such as `10m` or
    /// `1h30m`. `0s` means never. Applies to VMs created after a change.
    #[serde(default = "default_idle_timeout")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new(format!("self.matches('{GO_DURATION_PATTERN}')")).message("must be a duration such as 30s, 10m or 1h30m (units: ns, us, ms, s, m, h)"))]
    pub idle_timeout: String,

    /// How often the operator asks CircleCI for the task queue of this
    /// resource class, as a duration (at least `1s`). Each poll makes two API
    /// calls.
    #[serde(default = "default_poll_interval")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new(format!("self.matches('{GO_DURATION_PATTERN}')")).message("must be a duration such as 5s or 1m (units: ns, us, ms, s, m, h)"))]
    #[x_kube(validation = Rule::new(format!("!self.matches('{GO_DURATION_PATTERN}') || duration(self) >= duration('1s')")).message("must be at least 1s"))]
    pub poll_interval: String,

    /// How often to poll once the resource class has had no task for 15
    /// minutes (adaptive polling: saves API calls in quiet hours, at the
    /// cost of up to this long before the first job after a quiet spell is
    /// seen). `0s` or anything not above pollInterval: always pollInterval.
    #[serde(default = "default_idle_poll_interval")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new(format!("self.matches('{GO_DURATION_PATTERN}')")).message("must be a duration such as 0s or 30s (units: ns, us, ms, s, m, h)"))]
    pub idle_poll_interval: String,

    /// Spare VMs kept above the task count while tasks wait or run
    /// (CircleCI's `headroom`): a burst finds VMs already booting. None are
    /// kept while the queue is empty; use idleBuffer or minReplicas for that.
    #[serde(default)]
    #[schemars(range(min = 0, max = 10000))]
    pub headroom: i32,

    /// Spare idle VMs kept above the task count at all times (the additive
    /// buffer of GitHub ARC's `minRunners` and GitLab's `idle_count`):
    /// unlike minReplicas, a floor that busy VMs fill up, it stays spare
    /// under load, so the next job starts at once.
    #[serde(default)]
    #[schemars(range(min = 0, max = 10000))]
    pub idle_buffer: i32,

    /// While tasks wait, boot this many extra VMs per hundred waiting tasks
    /// (e.g. 50: 9 more for 18 waiting). Boot times vary, so the tasks go to
    /// the fastest boots and the rest serve the next tasks (or are retired
    /// early, see retireSurplusBooting).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub burst_percent: i32,

    /// Delete VMs above the wanted size while they have not started their
    /// guest yet (no VMI, or a VMI that has not reached Running): such a VM
    /// has no runner, so no job can be lost. Cuts the cost of burstPercent.
    #[serde(default)]
    pub retire_surplus_booting: bool,

    /// At most this many VMs beyond the Ready ones, i.e. booting at once
    /// (protects a cluster that cannot boot many VMs together). Unset: no
    /// cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_surge: Option<i32>,

    /// How long the wanted size must stay lower before the pool shrinks, as
    /// a duration (`0s`: at once). Smooths out gaps between the jobs of one
    /// pipeline. Must not exceed idleTimeout.
    #[serde(default = "default_scale_down_delay")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new(format!("self.matches('{GO_DURATION_PATTERN}')")).message("must be a duration such as 0s, 30s or 5m (units: ns, us, ms, s, m, h)"))]
    pub scale_down_delay: String,

    /// Named periods that override minReplicas, maxReplicas, headroom,
    /// idleBuffer, maxSurge and scaleDownDelay while active, e.g. a larger
    /// warm pool during working hours. A period is active from a `start`
    /// occurrence until the next `end` occurrence; the first active entry
    /// wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.all(a, self.exists_one(b, b.name == a.name))").message("schedule names must be unique"))]
    pub schedules: Vec<ScheduleSpec>,

    /// A warm pool learned from this pool's own history: the operator
    /// records how many VMs were needed in each hour of the week (kept in
    /// the RunnerPool's status, 168 numbers) and keeps that many ready
    /// shortly before such an hour comes round again.
    #[serde(default)]
    pub forecast: ForecastSpec,
}

/// A period with other scaling numbers (see `scaling.schedules`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSpec {
    /// Name of the period (shown in status and events).
    #[schemars(length(min = 1, max = 63), pattern(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// When the period starts: a cron expression (`minute hour day-of-month
    /// month day-of-week`, e.g. `0 8 * * 1-5`), in timeZone.
    #[schemars(length(min = 9, max = 256))]
    pub start: String,
    /// When it ends: a cron expression, e.g. `0 18 * * 1-5`.
    #[schemars(length(min = 9, max = 256))]
    pub end: String,
    /// IANA time zone of start and end, e.g. `Europe/Berlin`. Default UTC.
    /// Daylight-saving changes follow the zone's rules.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,
    /// minReplicas while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub min_replicas: Option<i32>,
    /// maxReplicas while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_replicas: Option<i32>,
    /// headroom while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub headroom: Option<i32>,
    /// idleBuffer while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 10000))]
    pub idle_buffer: Option<i32>,
    /// maxSurge while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_surge: Option<i32>,
    /// scaleDownDelay while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new(format!("self.matches('{GO_DURATION_PATTERN}')")).message("must be a duration such as 0s or 5m"))]
    pub scale_down_delay: Option<String>,
}

/// The learned warm pool (see `scaling.forecast`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ForecastSpec {
    /// Keep a warm pool sized by what this pool needed in the same hour of
    /// past weeks.
    #[serde(default)]
    pub enabled: bool,
    /// Fraction (0-100, percent) of the learned need to keep warm. 100 keeps
    /// the whole learned peak; lower trades job wait for VM-hours.
    #[serde(default = "default_forecast_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub percent: i32,
}

fn default_forecast_percent() -> i32 {
    50
}

fn default_time_zone() -> String {
    "UTC".to_string()
}

fn default_idle_poll_interval() -> String {
    "0s".to_string()
}

fn default_scale_down_delay() -> String {
    "0s".to_string()
}

fn default_idle_timeout() -> String {
    DEFAULT_IDLE_TIMEOUT.to_string()
}

fn default_poll_interval() -> String {
    DEFAULT_POLL_INTERVAL.to_string()
}

/// Options written into each VM's `circleci-runner` configuration
/// (`/etc/circleci-runner/circleci-runner-config.yaml`). The runner always
/// runs in single-task mode.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RunnerSpec {
    /// Directory where tasks run (`runner.working_directory`); an absolute
    /// path. Default: the agent's own default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    #[x_kube(validation = Rule::new("self.startsWith('/')").message("must be an absolute path"))]
    pub working_directory: Option<String>,

    /// Command that prefixes each task's command (`runner.command_prefix`),
    /// e.g. `["sudo", "-niHu", "circleci", "--"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    pub command_prefix: Option<Vec<String>>,

    /// Longest time a task may run before the runner cancels it
    /// (`runner.max_run_time`), as a duration such as `5h`. Default: the
    /// agent's default (5h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new(format!("self.matches('{GO_DURATION_PATTERN}')")).message("must be a duration such as 30m or 5h (units: ns, us, ms, s, m, h)"))]
    pub max_run_time: Option<String>,

    /// Give the runner's user (`circleci`) passwordless sudo inside the VM
    /// (`/etc/sudoers.d/90-circleci-runner`), so jobs can install packages.
    /// The VM runs one task and is then deleted, so this does not outlive the
    /// job. Default: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub grant_sudo: bool,
}

/// The runner-bundle containerDisk.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.tag) || !has(self.digest)").message("set either tag or digest, not both"))]
#[serde(rename_all = "camelCase")]
pub struct RunnerBundleSpec {
    /// Attach the runner-bundle disk to each VM.
    #[serde(default = "default_true")]
    pub enabled: bool,

    /// Image repository, without tag or digest (set those in tag or digest).
    #[serde(default = "default_bundle_image")]
    #[schemars(length(min = 1, max = 512))]
    #[x_kube(validation = Rule::new(r"self.matches('^[^\\s@:]+(:[0-9]+)?(/[^\\s@:]+)+$') || self.matches('^[^\\s@:/]+$')").message("must be an image repository without tag or digest, e.g. docker.io/circleci/runner-bundle; set tag or digest separately"))]
    pub image: String,

    /// Image tag. When neither tag nor digest is set, `latest` is used: pin one
    /// in production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"))]
    pub tag: Option<String>,

    /// Image digest, e.g. `sha256:<64 hex digits>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(max = 256),
        pattern(r"^[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}$")
    )]
    pub digest: Option<String>,

    // no doc: it is on the type (the schema takes the type's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,

    /// Name of a Secret (type `kubernetes.io/dockerconfigjson`) in the
    /// RunnerPool's namespace used to pull the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub image_pull_secret: Option<String>,
}

impl Default for RunnerBundleSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            image: DEFAULT_BUNDLE_IMAGE.to_string(),
            tag: None,
            digest: None,
            image_pull_policy: None,
            image_pull_secret: None,
        }
    }
}

impl RunnerBundleSpec {
    /// The full image reference: `image@digest`, `image:tag` or `image`.
    pub fn image_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => format!("{}@{d}", self.image),
            (None, Some(t)) => format!("{}:{t}", self.image),
            (None, None) => self.image.clone(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_bundle_image() -> String {
    DEFAULT_BUNDLE_IMAGE.to_string()
}

/// What deleting a RunnerPool does to its VMs: `Drain` (wait for every VM
/// to finish, default) or `Delete` (delete them at once).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeletionPolicy {
    /// Create no new VM; wait until every VM has powered off.
    #[default]
    Drain,
    /// Delete every VM at once (running jobs are killed).
    Delete,
}

/// When to pull the runner-bundle image: `Always`, `IfNotPresent` or `Never`.
/// Default: `Always` for the `latest` tag, otherwise `IfNotPresent`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImagePullPolicy {
    /// Pull on every VM start.
    Always,
    /// Pull when the node does not have the image.
    IfNotPresent,
    /// Never pull; the image must be on the node.
    Never,
}

impl ImagePullPolicy {
    /// The Kubernetes spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// The VirtualMachineInstance template of each VM.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmiTemplate {
    /// Labels and annotations put on each VirtualMachineInstance (and so on its
    /// virt-launcher pod).
    #[serde(default)]
    pub metadata: TemplateMetadata,

    /// A KubeVirt VirtualMachineInstanceSpec (`domain`, `volumes`,
    /// `networks`, `nodeSelector`, ...), passed to KubeVirt as written. The
    /// operator only adds its own disks and volumes (`rp-cloudinit` with the
    /// cloud-init Secret and, when the runner bundle is enabled,
    /// `rp-runner-bundle`) and, when the spec sets neither
    /// `domain.devices.interfaces` nor `networks`, a masquerade interface on
    /// the pod network. Do not add a cloud-init volume of your own: use
    /// userData. Changes apply to VMs created afterwards; running VMs are not
    /// restarted.
    #[serde(default = "default_vmi_spec")]
    #[schemars(schema_with = "preserved_object")]
    pub spec: serde_json::Value,
}

impl Default for VmiTemplate {
    fn default() -> Self {
        Self {
            metadata: TemplateMetadata::default(),
            spec: default_vmi_spec(),
        }
    }
}

/// Labels and annotations for each VirtualMachineInstance.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMetadata {
    /// Labels. Keys under `runners.provisioner.dev/` are reserved for the
    /// operator.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('runners.provisioner.dev/'))").message("label keys under runners.provisioner.dev/ are reserved for the operator"))]
    pub labels: BTreeMap<String, String>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The VMI spec used when `template.spec` is absent: Ubuntu 24.04 from a
/// containerDisk, 1 CPU, 2Gi of memory.
pub fn default_vmi_spec() -> serde_json::Value {
    serde_json::json!({
        "domain": {
            "cpu": {"cores": 1},
            "resources": {"requests": {"memory": "2Gi"}},
            "devices": {
                "disks": [{"name": "rootdisk", "disk": {"bus": "virtio"}}]
            }
        },
        "volumes": [{"name": "rootdisk", "containerDisk": {"image": DEFAULT_VM_IMAGE}}]
    })
}

fn preserved_object(_: &mut schemars::generate::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

// ---------------------------------------------------------------------------
// Status.
// ---------------------------------------------------------------------------

/// What the operator last observed and did.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RunnerPoolStatus {
    /// The `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Tasks of this resource class waiting for a runner (CircleCI
    /// `unclaimed_task_count`), as of lastPollTime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unclaimed_tasks: Option<i32>,

    /// Tasks of this resource class running on runners (CircleCI
    /// `running_runner_tasks`), as of lastPollTime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_tasks: Option<i32>,

    /// The number of VMs the pool should have now, from the queue and the
    /// scaling bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_replicas: Option<i32>,

    /// VMs that exist (including booting and stopped ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,

    /// VMs that are up (KubeVirt `Ready`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,

    /// When the operator last read the task queue from CircleCI successfully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll_time: Option<Time>,

    /// Label selector of the pool's VMs, for
    /// `kubectl get vm -l <selector>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,

    /// What `scaling.forecast` learned: the peak VMs needed in each hour of
    /// the week (168 values, Monday 00:00 UTC first, in sixteenths of a VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 168))]
    pub forecast_hourly_peaks: Option<Vec<u32>>,

    /// The `scaling.schedules` entry in force, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_schedule: Option<String>,

    /// Ready, Reconciling, Stalled and Degraded (see the operator's
    /// documentation). `Ready` summarises the others.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

impl RunnerPoolStatus {
    /// The condition of the given type, if present.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

// ---------------------------------------------------------------------------
// CRD.
// ---------------------------------------------------------------------------

/// The CustomResourceDefinition of RunnerPool.
pub fn crd() -> CustomResourceDefinition {
    RunnerPool::crd()
}

/// The CRD as YAML: what `crds/runnerpool.yaml` holds and `runner-provisioner
/// crd` prints. Deterministic (maps are ordered).
pub fn crd_yaml() -> String {
    let yaml = serde_norway::to_string(&crd()).expect("the CRD serialises to YAML");
    format!(
        "# Generated from src/crd.rs by `cargo run -- crd > crds/runnerpool.yaml`. Do not edit.\n---\n{yaml}"
    )
}
