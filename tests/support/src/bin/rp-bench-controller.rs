//! `rp-bench-controller`: the operator's cost and scale with many RunnerPools
//! (design.md §5 "Controller cost and scale").
//!
//! It starts the real control plane (etcd, kube-apiserver,
//! kube-controller-manager), the CircleCI simulator (time scale 1, one
//! resource class `bench/cNNNN` per pool, one shared runner token) and the
//! KubeVirt simulator, creates `--pools N` RunnerPools with `minReplicas: 0`
//! (so no VM exists until tasks are queued), then runs the release operator
//! binary as a child process and measures:
//!
//! 1. **startup**: time from spawning the operator until every pool has its
//!    VirtualMachinePool and is `Ready`, and the reconcile latency from the
//!    operator's `runner_provisioner_reconcile_duration_seconds` histogram;
//! 2. **steady** (`--duration`): the operator's RSS (`VmRSS`) and CPU
//!    (`utime + stime`, as cores) every second, CircleCI requests per second
//!    and calls per pool per poll interval (the simulator's request
//!    counters), and the Kubernetes requests made meanwhile (the
//!    apiserver's `apiserver_request_total`; only the operator writes then);
//! 3. **reaction**: for a random sample of pools (all when N <= 100, else
//!    20), tasks are queued at a known instant and the time until the pool's
//!    VirtualMachinePool `spec.replicas` reaches the new value is taken from
//!    a watch (p50/p99).
//!
//! Prints a table (with the targets for 1,000 pools: RSS < 100 MiB, < 0.25
//! core steady, reaction p99 <= poll interval + 1 s, <= 2 CircleCI calls per
//! pool per interval) and writes the result as JSON (`--output`).
//!
//! Nothing is raised in the apiserver and the operator runs with its
//! defaults, so a bottleneck shows up in the numbers (APF rejections and 429s
//! are reported) instead of being hidden. The admin kubeconfig the operator
//! gets is in `system:masters`, which API Priority and Fairness exempts, so
//! the apiserver's inflight limits cannot throttle it here.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use rand::SeedableRng;
use rp_testenv::circleci::{CircleCiSim, CircleCiSimConfig, RequestStats, ResourceClassConfig};
use rp_testenv::kubevirt::{self, BootLatency, KubeVirtSim, KubeVirtSimConfig};
use rp_testenv::{ControlPlane, ControlPlaneOptions, TimeScale};
use serde_json::{Value, json};
use tokio::sync::Notify;

const API_TOKEN: &str = "bench-api-token";
const RUNNER_TOKEN: &str = "bench-runner-token";
const API_SECRET: &str = "circleci-api";
const RUNNER_SECRET: &str = "bench-runner";
const MAX_REPLICAS: u32 = 5;
const MIB: f64 = 1024.0 * 1024.0;

/// Targets of design.md §5 for 1,000 pools.
const TARGET_RSS_MIB: f64 = 100.0;
const TARGET_CPU_CORES: f64 = 0.25;
const TARGET_CALLS_PER_INTERVAL: f64 = 2.0;

#[derive(Debug, Parser)]
#[command(
    name = "rp-bench-controller",
    about = "Operator cost and scale with N RunnerPools against the real control plane and the simulators"
)]
struct Args {
    /// Number of RunnerPools (one CircleCI resource class each).
    #[arg(long)]
    pools: usize,
    /// The operator binary (default: <target dir>/release/runner-provisioner;
    /// build it with `cargo build --release -p runner-provisioner --bin runner-provisioner`).
    #[arg(long)]
    operator_bin: Option<PathBuf>,
    /// Length of the steady phase.
    #[arg(long, default_value = "60s", value_parser = duration)]
    duration: Duration,
    /// Write the result as JSON here.
    #[arg(long)]
    output: Option<PathBuf>,
    /// `spec.scaling.pollInterval` of every pool.
    #[arg(long, default_value = "5s", value_parser = duration)]
    poll_interval: Duration,
    /// Pools that get tasks in the reaction phase (default: all when
    /// N <= 100, else 20).
    #[arg(long)]
    sample: Option<usize>,
    /// Tasks queued per sampled pool (the wanted replicas; at most 5).
    #[arg(long, default_value_t = 1)]
    tasks_per_pool: u32,
    /// The sampled pools' tasks are queued one by one, evenly spread over
    /// this long (default: one poll interval), each pool's latency measured
    /// from its own enqueue, so the result covers every poll phase instead
    /// of one; `0s` queues them all at one instant.
    #[arg(long, value_parser = duration)]
    enqueue_spread: Option<Duration>,
    /// RunnerPools created at once.
    #[arg(long, default_value_t = 32)]
    create_concurrency: usize,
    /// Wait after all pools are Ready before the steady phase starts.
    #[arg(long, default_value = "5s", value_parser = duration)]
    settle: Duration,
    /// Give up waiting for all pools to be Ready after this long (the
    /// benchmark then continues and reports how many were).
    #[arg(long, default_value = "600s", value_parser = duration)]
    ready_timeout: Duration,
    /// Seed of the reaction sample and the simulators.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the operator's JSON log goes (default: next to --output, else a
    /// temporary file that is kept).
    #[arg(long)]
    operator_log: Option<PathBuf>,
    /// The repository root (for crds/runnerpool.yaml and the default
    /// operator path).
    #[arg(long)]
    repo_root: Option<PathBuf>,
    /// Namespace of the RunnerPools.
    #[arg(long, default_value = "bench")]
    namespace: String,
    /// An extra argument for `runner-provisioner run` (repeatable), e.g.
    /// `--operator-arg=--concurrency=32`.
    #[arg(long = "operator-arg", allow_hyphen_values = true)]
    operator_args: Vec<String>,
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kube_client=off")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rp-bench-controller: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rp-bench-controller: {e:#}");
            ExitCode::FAILURE
        }
    }
}

macro_rules! say {
    ($($t:tt)*) => { eprintln!("[bench {:>7.1}s] {}", elapsed(), format!($($t)*)) };
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
fn elapsed() -> f64 {
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------
// /proc sampling.
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, Default)]
struct ProcStat {
    rss_bytes: u64,
    cpu_secs: f64,
    threads: u64,
    fds: u64,
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|v| *v > 0.0)
        .unwrap_or(100.0)
}

fn proc_stat(pid: u32, tck: f64) -> Option<ProcStat> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let rss_kib = field("VmRSS:")?;
    let threads = field("Threads:").unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces): state is
    // field 3, utime field 14, stime field 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    Some(ProcStat {
        rss_bytes: rss_kib * 1024,
        cpu_secs: (utime + stime) / tck,
        threads,
        fds,
    })
}

#[derive(Clone, Debug)]
struct Sample {
    /// Seconds since the operator was spawned.
    t: f64,
    rss_mib: f64,
    cpu_cores: f64,
    threads: u64,
    fds: u64,
    circleci_total: u64,
    circleci_rps: f64,
    apiserver_cores: f64,
    etcd_cores: f64,
    bench_cores: f64,
}

/// Samples the operator (and, for context, the apiserver, etcd and this
/// process) every second until dropped.
struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(
        op_pid: u32,
        others: Vec<(&'static str, u32)>,
        circleci: Arc<CircleCiSim>,
        t0: Instant,
    ) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let out = samples.clone();
        let tck = clk_tck();
        let pid_of = |name: &str| others.iter().find(|(n, _)| *n == name).map(|(_, p)| *p);
        let api_pid = pid_of("kube-apiserver");
        let etcd_pid = pid_of("etcd");
        let self_pid = std::process::id();
        let task = tokio::spawn(async move {
            let cpu = |pid: Option<u32>| {
                pid.and_then(|p| proc_stat(p, tck))
                    .map(|s| s.cpu_secs)
                    .unwrap_or(0.0)
            };
            let mut last_t = Instant::now();
            let mut last_op = proc_stat(op_pid, tck).unwrap_or_default();
            let mut last_api = cpu(api_pid);
            let mut last_etcd = cpu(etcd_pid);
            let mut last_self = cpu(Some(self_pid));
            let mut last_req = circleci.requests().total;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = Instant::now();
                let Some(op) = proc_stat(op_pid, tck) else {
                    return;
                };
                let wall = now.duration_since(last_t).as_secs_f64().max(1e-3);
                let (api, etcd, me) = (cpu(api_pid), cpu(etcd_pid), cpu(Some(self_pid)));
                let req = circleci.requests().total;
                out.lock().expect("samples").push(Sample {
                    t: now.duration_since(t0).as_secs_f64(),
                    rss_mib: op.rss_bytes as f64 / MIB,
                    cpu_cores: (op.cpu_secs - last_op.cpu_secs) / wall,
                    threads: op.threads,
                    fds: op.fds,
                    circleci_total: req,
                    circleci_rps: (req - last_req) as f64 / wall,
                    apiserver_cores: (api - last_api) / wall,
                    etcd_cores: (etcd - last_etcd) / wall,
                    bench_cores: (me - last_self) / wall,
                });
                (last_t, last_op, last_api, last_etcd, last_self, last_req) =
                    (now, op, api, etcd, me, req);
            }
        });
        Sampler { samples, task }
    }

    fn between(&self, from: f64, to: f64) -> Vec<Sample> {
        self.samples
            .lock()
            .expect("samples")
            .iter()
            .filter(|s| s.t > from && s.t <= to + 0.05)
            .cloned()
            .collect()
    }

    fn all(&self) -> Vec<Sample> {
        self.samples.lock().expect("samples").clone()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------
// Prometheus text.
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Series {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_prom(text: &str) -> Vec<Series> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => (&line[..i], &line[i..]),
            None => continue,
        };
        let mut labels = BTreeMap::new();
        let rest = if let Some(body) = rest.strip_prefix('{') {
            // k="v",k2="v2"} value
            let mut chars = body.char_indices().peekable();
            let mut end = body.len();
            loop {
                // key
                let mut key = String::new();
                while let Some(&(_, c)) = chars.peek() {
                    if c == '=' || c == '}' {
                        break;
                    }
                    chars.next();
                    if c != ',' && !c.is_whitespace() {
                        key.push(c);
                    }
                }
                match chars.next() {
                    Some((i, '}')) => {
                        end = i + 1;
                        break;
                    }
                    Some((_, '=')) => {}
                    _ => break,
                }
                if !matches!(chars.next(), Some((_, '"'))) {
                    break;
                }
                let mut val = String::new();
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some((_, n)) = chars.next() {
                                val.push(match n {
                                    'n' => '\n',
                                    o => o,
                                });
                            }
                        }
                        '"' => break,
                        o => val.push(o),
                    }
                }
                labels.insert(key, val);
            }
            &body[end.min(body.len())..]
        } else {
            rest
        };
        let Some(v) = rest.split_whitespace().next() else {
            continue;
        };
        let value = match v {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => match v.parse::<f64>() {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        out.push(Series {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

fn prom_sum(series: &[Series], name: &str) -> f64 {
    series
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.value)
        .sum::<f64>()
        + 0.0
}

/// Cumulative buckets `(le, count)` of histogram `name`, summed over its
/// other labels, sorted by `le`.
fn prom_buckets(series: &[Series], name: &str) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for s in series.iter().filter(|s| s.name == bucket) {
        let Some(le) = s.labels.get("le") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse::<f64>() {
                Ok(v) => v,
                Err(_) => continue,
            }
        };
        let e = by_le.entry(le.to_bits()).or_insert((le, 0.0));
        e.1 += s.value;
    }
    let mut v: Vec<_> = by_le.into_values().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// `histogram_quantile` as Prometheus computes it: linear interpolation
/// inside the bucket that holds the rank; the +Inf bucket gives the highest
/// finite bound.
fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut prev_le, mut prev_c) = (0.0, 0.0);
    for &(le, c) in buckets {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev_le);
            }
            if c <= prev_c {
                return Some(le);
            }
            return Some(prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c));
        }
        (prev_le, prev_c) = (le, c);
    }
    Some(prev_le)
}

fn bucket_delta(after: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, c)| {
            let b = before
                .iter()
                .find(|(l, _)| l.to_bits() == le.to_bits())
                .map_or(0.0, |(_, c)| *c);
            (le, (c - b).max(0.0))
        })
        .collect()
}

async fn scrape(http: &reqwest::Client, url: &str) -> Result<(Vec<Series>, usize, Duration)> {
    let t = Instant::now();
    let body = http
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?
        .error_for_status()?
        .text()
        .await?;
    Ok((parse_prom(&body), body.len(), t.elapsed()))
}

async fn apiserver_metrics(client: &Client) -> Result<Vec<Series>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await?;
    Ok(parse_prom(&text))
}

/// `apiserver_request_total` by `VERB resource[/subresource]`.
fn apiserver_requests(series: &[Series]) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for s in series
        .iter()
        .filter(|s| s.name == "apiserver_request_total")
    {
        let get = |k: &str| s.labels.get(k).map(String::as_str).unwrap_or("");
        let mut key = format!("{} {}", get("verb"), get("resource"));
        if !get("subresource").is_empty() {
            key.push('/');
            key.push_str(get("subresource"));
        }
        *m.entry(key).or_insert(0.0) += s.value;
    }
    m
}

fn apiserver_code(series: &[Series], code: &str) -> f64 {
    series
        .iter()
        .filter(|s| {
            s.name == "apiserver_request_total"
                && s.labels.get("code").map(String::as_str) == Some(code)
        })
        .map(|s| s.value)
        .sum::<f64>()
        + 0.0
}

// ---------------------------------------------------------------------------
// What the watches saw.
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct PoolTrack {
    ready_at: Option<Instant>,
    ready_now: bool,
    /// Ready True -> not True transitions after the first Ready.
    unready_flips: u32,
    vmp_at: Option<Instant>,
    replicas: Option<i64>,
    want: Option<i64>,
    enqueued_at: Option<Instant>,
    reacted_at: Option<Instant>,
}

#[derive(Default)]
struct Tracker {
    pools: Mutex<HashMap<String, PoolTrack>>,
    changed: Notify,
    /// Watch events (modifications) of RunnerPools and VirtualMachinePools.
    rp_events: AtomicU64,
    vmp_events: AtomicU64,
}

impl Tracker {
    fn on_runner_pool(&self, obj: &DynamicObject) {
        self.rp_events.fetch_add(1, Ordering::Relaxed);
        let ready = obj.data["status"]["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .is_some_and(|c| c["status"] == "True");
        let mut pools = self.pools.lock().expect("tracker");
        let p = pools.entry(obj.name_any()).or_default();
        if ready && p.ready_at.is_none() {
            p.ready_at = Some(Instant::now());
        }
        if p.ready_now && !ready {
            p.unready_flips += 1;
        }
        p.ready_now = ready;
        drop(pools);
        self.changed.notify_waiters();
    }

    fn on_vmp(&self, obj: &DynamicObject) {
        self.vmp_events.fetch_add(1, Ordering::Relaxed);
        let replicas = obj.data["spec"]["replicas"].as_i64();
        let mut pools = self.pools.lock().expect("tracker");
        let p = pools.entry(obj.name_any()).or_default();
        p.vmp_at.get_or_insert_with(Instant::now);
        p.replicas = replicas;
        if let (Some(w), Some(r)) = (p.want, replicas)
            && r >= w
            && p.reacted_at.is_none()
        {
            p.reacted_at = Some(Instant::now());
        }
        drop(pools);
        self.changed.notify_waiters();
    }

    /// Waits until `done` holds, `deadline` passes, or `check` fails.
    async fn wait(
        &self,
        deadline: Instant,
        mut done: impl FnMut(&HashMap<String, PoolTrack>) -> bool,
        mut check: impl FnMut() -> Result<()>,
    ) -> Result<bool> {
        loop {
            let notified = self.changed.notified();
            if done(&self.pools.lock().expect("tracker")) {
                return Ok(true);
            }
            check()?;
            if Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }
}

fn spawn_watch(
    api: Api<DynamicObject>,
    tracker: Arc<Tracker>,
    f: fn(&Tracker, &DynamicObject),
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut s = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = s.next().await {
            match ev {
                Ok(Event::Apply(o)) | Ok(Event::InitApply(o)) => f(&tracker, &o),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "bench watch failed; retrying"),
            }
        }
    })
}

// ---------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------

fn runnerpool_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("runners.provisioner.dev", "v1alpha1", "RunnerPool"),
        "runnerpools",
    )
}

fn pool_name(i: usize) -> String {
    format!("p{i:04}")
}

fn class_name(i: usize) -> String {
    format!("bench/c{i:04}")
}

fn pool_manifest(ns: &str, i: usize, api_url: &str, poll: Duration) -> Value {
    json!({
        "apiVersion": "runners.provisioner.dev/v1alpha1",
        "kind": "RunnerPool",
        "metadata": {"name": pool_name(i), "namespace": ns},
        "spec": {
            "resourceClass": class_name(i),
            "circleci": {
                "apiUrl": api_url,
                "apiTokenSecretRef": {"name": API_SECRET},
                "runnerTokenSecretRef": {"name": RUNNER_SECRET},
            },
            "scaling": {
                "minReplicas": 0,
                "maxReplicas": MAX_REPLICAS,
                "idleTimeout": "10m",
                "pollInterval": humantime::format_duration(poll).to_string(),
            },
        },
    })
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Nearest-rank percentile of `v` (sorted in place).
fn percentile(v: &mut [f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
}

fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

fn min(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::min)
}

fn repo_root(arg: Option<&Path>) -> PathBuf {
    match arg {
        Some(p) => p.to_path_buf(),
        None => {
            let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            here.canonicalize().unwrap_or(here)
        }
    }
}

fn default_operator_bin(root: &Path) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"));
    target.join("release").join("runner-provisioner")
}

/// The operator child process; killed when dropped.
struct Operator {
    child: Option<Child>,
    log: PathBuf,
}

impl Operator {
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            self.child = None;
            bail!(
                "the operator exited ({status}); last lines of {}:\n{}",
                self.log.display(),
                log_tail(&self.log, 40)
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 20 s.
    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        rp_testenv::operator_bin::terminate(self.child.take()?, Duration::from_secs(20))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Counts of the operator's JSON log records by level and by
/// `level: message`, and how many lines.
fn log_summary(path: &Path) -> (u64, BTreeMap<String, u64>, Vec<(String, u64)>) {
    let mut lines = 0;
    let mut by_level = BTreeMap::new();
    let mut by_msg: HashMap<String, u64> = HashMap::new();
    if let Ok(f) = File::open(path) {
        for line in BufReader::new(f).lines().map_while(Result::ok) {
            lines += 1;
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                *by_level.entry("non-json".to_string()).or_insert(0) += 1;
                continue;
            };
            let level = v["level"].as_str().unwrap_or("?").to_string();
            let msg = v["fields"]["message"]
                .as_str()
                .or_else(|| v["message"].as_str())
                .unwrap_or("?");
            *by_msg.entry(format!("{level}: {msg}")).or_insert(0) += 1;
            *by_level.entry(level).or_insert(0) += 1;
        }
    }
    let mut top: Vec<_> = by_msg.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(12);
    (lines, by_level, top)
}

fn class_deltas(after: &RequestStats, before: &RequestStats, n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let c = class_name(i);
            after.for_class(&c).saturating_sub(before.for_class(&c)) as f64
        })
        .collect()
}

fn r3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn opt(v: Option<f64>) -> Value {
    match v {
        Some(x) if x.is_finite() => json!(r3(x)),
        _ => Value::Null,
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.prec$}"),
        _ => "-".into(),
    }
}

// ---------------------------------------------------------------------------
// The benchmark.
// ---------------------------------------------------------------------------

async fn run(a: Args) -> Result<()> {
    elapsed();
    if a.pools == 0 {
        bail!("--pools must be at least 1");
    }
    let n = a.pools;
    let root = repo_root(a.repo_root.as_deref());
    let crd_path = root.join("crds/runnerpool.yaml");
    let crd = std::fs::read_to_string(&crd_path).with_context(|| {
        format!(
            "reading the RunnerPool CRD {} (pass --repo-root)",
            crd_path.display()
        )
    })?;
    let op_bin = a
        .operator_bin
        .clone()
        .unwrap_or_else(|| default_operator_bin(&root));
    if !op_bin.is_file() {
        bail!(
            "no operator binary at {}: build it with `cargo build --release -p runner-provisioner --bin runner-provisioner` or pass --operator-bin",
            op_bin.display()
        );
    }
    let tasks_per_pool = a.tasks_per_pool.clamp(1, MAX_REPLICAS);
    let sample_n = a
        .sample
        .unwrap_or(if n <= 100 { n } else { 20 })
        .clamp(1, n);
    let poll = a.poll_interval;
    let ns = a.namespace.clone();

    // 1. Control plane and simulators.
    rp_testenv::init_crypto();
    say!("starting the control plane");
    let cp = ControlPlane::start(ControlPlaneOptions {
        crds: vec![kubevirt::crds_yaml().to_string(), crd],
    })
    .await
    .context("starting the control plane (build it with `make tools`)")?;
    let client = cp.client();
    say!(
        "control plane up in {:.1}s ({}; logs in {})",
        cp.startup.as_secs_f64(),
        cp.server(),
        cp.dir().display()
    );
    let circleci = Arc::new(
        CircleCiSim::start(CircleCiSimConfig {
            time_scale: TimeScale(1.0),
            api_tokens: vec![API_TOKEN.into()],
            resource_classes: (0..n)
                .map(|i| ResourceClassConfig {
                    resource_class: class_name(i),
                    runner_token: RUNNER_TOKEN.into(),
                })
                .collect(),
            ..Default::default()
        })
        .await
        .context("starting the CircleCI simulator")?,
    );
    let kv = KubeVirtSim::start(
        client.clone(),
        KubeVirtSimConfig {
            time_scale: TimeScale(1.0),
            boot_latency: BootLatency::Fixed(Duration::from_secs(10)),
            seed: a.seed,
            ..Default::default()
        },
        circleci.guest(),
    )
    .await
    .context("starting the KubeVirt simulator")?;

    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
    )
    .await
    .context("creating the namespace")?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for (name, token) in [(API_SECRET, API_TOKEN), (RUNNER_SECRET, RUNNER_TOKEN)] {
        secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": ns},
                    "stringData": {"token": token},
                }))?,
            )
            .await
            .with_context(|| format!("creating Secret {name}"))?;
    }

    let tracker = Arc::new(Tracker::default());
    let rp_api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &runnerpool_resource());
    let vmp_api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &kubevirt::pool_resource());
    let watches = [
        spawn_watch(rp_api.clone(), tracker.clone(), Tracker::on_runner_pool),
        spawn_watch(vmp_api.clone(), tracker.clone(), Tracker::on_vmp),
    ];

    // 2. The RunnerPools, then the operator.
    say!(
        "creating {n} RunnerPools ({} at a time)",
        a.create_concurrency
    );
    let t_create = Instant::now();
    let base_url = circleci.base_url();
    let results: Vec<Result<()>> = futures::stream::iter(0..n)
        .map(|i| {
            let api = rp_api.clone();
            let m = pool_manifest(&ns, i, &base_url, poll);
            async move {
                let obj: DynamicObject = serde_json::from_value(m)?;
                api.create(&PostParams::default(), &obj)
                    .await
                    .with_context(|| format!("creating RunnerPool {}", pool_name(i)))?;
                Ok(())
            }
        })
        .buffer_unordered(a.create_concurrency.max(1))
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    let create_secs = t_create.elapsed().as_secs_f64();
    say!("created {n} RunnerPools in {create_secs:.1}s");

    let log_path = a.operator_log.clone().unwrap_or_else(|| match &a.output {
        Some(o) => o.with_extension("operator.log"),
        None => std::env::temp_dir().join(format!(
            "rp-bench-controller-{}-{n}.operator.log",
            std::process::id()
        )),
    });
    if let Some(d) = log_path.parent() {
        std::fs::create_dir_all(d).ok();
    }
    let log_file = File::create(&log_path)
        .with_context(|| format!("creating the operator log {}", log_path.display()))?;
    let ready_addr = format!("127.0.0.1:{}", free_port()?);
    let live_addr = format!("127.0.0.1:{}", free_port()?);
    let mut cmd = Command::new(&op_bin);
    cmd.args([
        "run",
        "--namespace",
        &ns,
        "--leader-election",
        "false",
        "--ready-addr",
        &ready_addr,
        "--live-addr",
        &live_addr,
        "--log-format",
        "json",
    ])
    .args(&a.operator_args)
    .env("KUBECONFIG", cp.kubeconfig())
    .env_remove("RUST_LOG")
    .stdin(Stdio::null())
    .stdout(log_file.try_clone()?)
    .stderr(log_file);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let api_base = apiserver_metrics(&client).await.unwrap_or_default();
    let t_spawn = Instant::now();
    let mut op = Operator {
        child: Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", op_bin.display()))?,
        ),
        log: log_path.clone(),
    };
    let op_pid = op.pid();
    let sampler = Sampler::start(op_pid, cp.pids(), circleci.clone(), t_spawn);
    let since = |t: Instant| t.duration_since(t_spawn).as_secs_f64();
    say!(
        "operator started (pid {op_pid}, metrics http://{ready_addr}/metrics, log {})",
        log_path.display()
    );

    let all_ready = tracker
        .wait(
            t_spawn + a.ready_timeout,
            |m| {
                (0..n).all(|i| {
                    m.get(&pool_name(i))
                        .is_some_and(|p| p.ready_at.is_some() && p.vmp_at.is_some())
                })
            },
            || op.check_alive(),
        )
        .await?;
    let t_ready = Instant::now();
    let (ready_times, ready_count, vmp_count) = {
        let m = tracker.pools.lock().expect("tracker");
        let mut times = Vec::new();
        let (mut r, mut v) = (0, 0);
        for i in 0..n {
            if let Some(p) = m.get(&pool_name(i)) {
                r += usize::from(p.ready_at.is_some());
                v += usize::from(p.vmp_at.is_some());
                if let (Some(a), Some(b)) = (p.ready_at, p.vmp_at) {
                    times.push(since(a.max(b)));
                }
            }
        }
        (times, r, v)
    };
    let time_to_all_ready = all_ready.then(|| max(&ready_times).unwrap_or(0.0));
    let init_cpu = proc_stat(op_pid, clk_tck()).map(|s| s.cpu_secs);
    if all_ready {
        say!(
            "all {n} pools Ready with a VirtualMachinePool {:.1}s after the operator started",
            time_to_all_ready.unwrap_or_default()
        );
    } else {
        say!(
            "NOT all pools Ready after {:?}: {ready_count} Ready, {vmp_count} VirtualMachinePools; continuing",
            a.ready_timeout
        );
    }
    let object_sizes = object_sizes(&client, &ns).await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let metrics_url = format!("http://{ready_addr}/metrics");
    let (m_init, metrics_bytes, metrics_scrape) = scrape(&http, &metrics_url)
        .await
        .context("scraping the operator's /metrics")?;
    let reconcile_init = prom_buckets(&m_init, "runner_provisioner_reconcile_duration_seconds");

    // 3. Steady phase.
    tokio::time::sleep(a.settle).await;
    op.check_alive()?;
    let api_a = apiserver_metrics(&client).await.unwrap_or_default();
    let (m_a, _, _) = scrape(&http, &metrics_url).await?;
    let req_a = circleci.requests();
    let (rp_ev_a, vmp_ev_a) = (
        tracker.rp_events.load(Ordering::Relaxed),
        tracker.vmp_events.load(Ordering::Relaxed),
    );
    let t_steady0 = Instant::now();
    say!("steady phase: {:?}", a.duration);
    let steady_deadline = t_steady0 + a.duration;
    while Instant::now() < steady_deadline {
        op.check_alive()?;
        tokio::time::sleep(
            steady_deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(500)),
        )
        .await;
    }
    let t_steady1 = Instant::now();
    let req_b = circleci.requests();
    let (rp_ev_b, vmp_ev_b) = (
        tracker.rp_events.load(Ordering::Relaxed),
        tracker.vmp_events.load(Ordering::Relaxed),
    );
    let (m_b, _, _) = scrape(&http, &metrics_url).await?;
    let api_b = apiserver_metrics(&client).await.unwrap_or_default();
    let steady_secs = t_steady1.duration_since(t_steady0).as_secs_f64();
    let steady_samples = sampler.between(since(t_steady0), since(t_steady1));
    let intervals = steady_secs / poll.as_secs_f64();
    let per_pool = class_deltas(&req_b, &req_a, n);
    let per_pool_per_interval: Vec<f64> = per_pool.iter().map(|c| c / intervals).collect();
    let steady_requests = req_b.total.saturating_sub(req_a.total);
    // Poll periods seen by the simulator (unclaimed-count calls per class).
    let poll_periods = {
        let log = circleci.request_log();
        let (lo, hi) = (
            circleci_wall(&circleci, t_steady0),
            circleci_wall(&circleci, t_steady1),
        );
        let mut by_class: HashMap<String, Vec<f64>> = HashMap::new();
        for e in log.iter().filter(|e| {
            e.wall_secs >= lo
                && e.wall_secs <= hi
                && matches!(e.endpoint, rp_testenv::circleci::Endpoint::UnclaimedTasks)
        }) {
            if let Some(c) = &e.resource_class {
                by_class.entry(c.clone()).or_default().push(e.wall_secs);
            }
        }
        let mut gaps = Vec::new();
        for ts in by_class.values_mut() {
            ts.sort_by(f64::total_cmp);
            gaps.extend(ts.windows(2).map(|w| w[1] - w[0]));
        }
        // Requests per 100 ms bin: how bunched the polls are.
        let mut bins: HashMap<i64, u64> = HashMap::new();
        for e in log
            .iter()
            .filter(|e| e.wall_secs >= lo && e.wall_secs <= hi)
        {
            *bins.entry((e.wall_secs * 10.0).floor() as i64).or_insert(0) += 1;
        }
        let peak = bins.values().copied().max().unwrap_or(0) as f64 * 10.0;
        (gaps, peak)
    };
    let (poll_periods, peak_100ms_rps) = poll_periods;
    let api_req_delta: BTreeMap<String, f64> = {
        let (a0, b0) = (apiserver_requests(&api_a), apiserver_requests(&api_b));
        b0.iter()
            .map(|(k, v)| (k.clone(), v - a0.get(k).copied().unwrap_or(0.0)))
            .filter(|(k, v)| *v > 0.0 && !k.starts_with("WATCH"))
            .collect()
    };
    let rejected = prom_sum(&api_b, "apiserver_flowcontrol_rejected_requests_total")
        - prom_sum(&api_a, "apiserver_flowcontrol_rejected_requests_total");
    let code429 = apiserver_code(&api_b, "429") - apiserver_code(&api_a, "429");
    let startup_rejected = prom_sum(&api_a, "apiserver_flowcontrol_rejected_requests_total")
        - prom_sum(&api_base, "apiserver_flowcontrol_rejected_requests_total");
    let startup_429 = apiserver_code(&api_a, "429") - apiserver_code(&api_base, "429");
    let startup_api_by_kind: BTreeMap<String, f64> = {
        let (a0, b0) = (apiserver_requests(&api_base), apiserver_requests(&api_a));
        b0.iter()
            .map(|(k, v)| (k.clone(), v - a0.get(k).copied().unwrap_or(0.0)))
            .filter(|(k, v)| *v > 0.0 && !k.starts_with("WATCH"))
            .collect()
    };
    let startup_api_requests: f64 = startup_api_by_kind.values().sum();
    let steady_replica_writes = prom_delta(&m_b, &m_a, "runner_provisioner_replica_writes_total");
    let steady_reconciles = prom_delta(&m_b, &m_a, "runner_provisioner_reconciles_total");
    let steady_polls = prom_delta(&m_b, &m_a, "runner_provisioner_polls_total");
    let call_buckets = bucket_delta(
        &prom_buckets(&m_b, "runner_provisioner_circleci_request_duration_seconds"),
        &prom_buckets(&m_a, "runner_provisioner_circleci_request_duration_seconds"),
    );
    say!(
        "steady phase done: {:.0} CircleCI requests/s",
        steady_requests as f64 / steady_secs
    );

    // 4. Reaction phase.
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
    let mut chosen = rand::seq::index::sample(&mut rng, n, sample_n).into_vec();
    chosen.sort();
    let boots_before = kv.guest_stats().boots;
    let req_c = circleci.requests();
    say!("reaction phase: {tasks_per_pool} task(s) each for {sample_n} pool(s)");
    let spread = a.enqueue_spread.unwrap_or(poll);
    let mut order = chosen.clone();
    {
        use rand::seq::SliceRandom;
        order.shuffle(&mut rng);
    }
    let t_react0 = Instant::now();
    for (k, &i) in order.iter().enumerate() {
        let at = t_react0 + spread.mul_f64(k as f64 / order.len() as f64);
        tokio::time::sleep_until(at.into()).await;
        {
            let mut m = tracker.pools.lock().expect("tracker");
            let p = m.entry(pool_name(i)).or_default();
            p.want = Some(i64::from(tasks_per_pool));
            p.reacted_at = None;
            p.enqueued_at = Some(Instant::now());
        }
        for _ in 0..tasks_per_pool {
            circleci.enqueue(&class_name(i), Duration::from_secs(3600));
        }
    }
    let react_timeout = spread + poll * 3 + Duration::from_secs(30);
    let all_reacted = tracker
        .wait(
            t_react0 + react_timeout,
            |m| {
                chosen
                    .iter()
                    .all(|&i| m.get(&pool_name(i)).is_some_and(|p| p.reacted_at.is_some()))
            },
            || op.check_alive(),
        )
        .await?;
    // Keep the sampled pools active for a few intervals to count their calls.
    let active_window = spread + (poll * 4).max(Duration::from_secs(20));
    let active_end = t_react0 + active_window;
    while Instant::now() < active_end {
        op.check_alive()?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let t_react1 = Instant::now();
    let req_d = circleci.requests();
    let mut reactions = Vec::new();
    let mut unreacted = Vec::new();
    {
        let m = tracker.pools.lock().expect("tracker");
        for &i in &chosen {
            let p = m.get(&pool_name(i));
            match p.and_then(|p| Some(p.reacted_at?.duration_since(p.enqueued_at?))) {
                Some(d) => reactions.push(d.as_secs_f64()),
                None => unreacted.push(pool_name(i)),
            }
        }
    }
    let active_secs = t_react1.duration_since(t_react0).as_secs_f64();
    let active_calls: Vec<f64> = chosen
        .iter()
        .map(|&i| {
            let c = class_name(i);
            req_d.for_class(&c).saturating_sub(req_c.for_class(&c)) as f64
                / (active_secs / poll.as_secs_f64())
        })
        .collect();
    let vms_booted = kv.guest_stats().boots - boots_before;
    let react_samples = sampler.between(since(t_react0), since(t_react1));
    say!(
        "reaction phase done: {}/{} pools reached the wanted replicas",
        reactions.len(),
        chosen.len()
    );

    // 5. Wrap up.
    let (m_end, _, _) = scrape(&http, &metrics_url).await?;
    let flips: u32 = tracker
        .pools
        .lock()
        .expect("tracker")
        .values()
        .map(|p| p.unready_flips)
        .sum();
    let all_samples = sampler.all();
    drop(sampler);
    let exit = op.terminate();
    for w in watches {
        w.abort();
    }
    let incidents = kv.incidents();
    let (log_lines, log_levels, log_top) = log_summary(&log_path);

    // Numbers.
    let rss: Vec<f64> = steady_samples.iter().map(|s| s.rss_mib).collect();
    let cpu: Vec<f64> = steady_samples.iter().map(|s| s.cpu_cores).collect();
    let rps: Vec<f64> = steady_samples.iter().map(|s| s.circleci_rps).collect();
    let api_cpu: Vec<f64> = steady_samples.iter().map(|s| s.apiserver_cores).collect();
    let etcd_cpu: Vec<f64> = steady_samples.iter().map(|s| s.etcd_cores).collect();
    let bench_cpu: Vec<f64> = steady_samples.iter().map(|s| s.bench_cores).collect();
    let all_rss: Vec<f64> = all_samples.iter().map(|s| s.rss_mib).collect();
    let all_cpu: Vec<f64> = all_samples
        .iter()
        .filter(|s| s.t <= since(t_ready))
        .map(|s| s.cpu_cores)
        .collect();
    let rss_slope = slope(
        &steady_samples
            .iter()
            .map(|s| (s.t, s.rss_mib))
            .collect::<Vec<_>>(),
    )
    .map(|per_sec| per_sec * 60.0);
    let mut ready_sorted = ready_times.clone();
    let mut react_sorted = reactions.clone();
    let mut periods = poll_periods.clone();
    let calls_mean = mean(&per_pool_per_interval);
    let calls_max = max(&per_pool_per_interval);
    let active_mean = mean(&active_calls);
    let react_p50 = percentile(&mut react_sorted, 50.0);
    let react_p99 = if unreacted.is_empty() {
        percentile(&mut react_sorted, 99.0)
    } else {
        Some(f64::INFINITY)
    };
    let react_target = poll.as_secs_f64() + 1.0;
    let rss_max = max(&rss);
    let cpu_mean = mean(&cpu);
    let pass = |ok: bool| if ok { "PASS" } else { "MISS" };
    let targets = [
        (
            "rss_max_mib",
            format!("< {TARGET_RSS_MIB} MiB"),
            rss_max,
            pass(rss_max.is_some_and(|v| v < TARGET_RSS_MIB)),
        ),
        (
            "cpu_mean_cores_steady",
            format!("< {TARGET_CPU_CORES} core"),
            cpu_mean,
            pass(cpu_mean.is_some_and(|v| v < TARGET_CPU_CORES)),
        ),
        (
            "reaction_p99_secs",
            format!("<= {react_target:.1} s"),
            react_p99,
            pass(react_p99.is_some_and(|v| v <= react_target)),
        ),
        (
            "circleci_calls_per_pool_per_interval_steady",
            format!("<= {TARGET_CALLS_PER_INTERVAL}"),
            calls_mean,
            pass(calls_mean.is_some_and(|v| v <= TARGET_CALLS_PER_INTERVAL + 0.05)),
        ),
        (
            "circleci_calls_per_pool_per_interval_active",
            format!("<= {TARGET_CALLS_PER_INTERVAL}"),
            active_mean,
            pass(active_mean.is_some_and(|v| v <= TARGET_CALLS_PER_INTERVAL + 0.05)),
        ),
    ];

    let result = json!({
        "benchmark": "controller",
        "pools": n,
        "poll_interval_secs": poll.as_secs_f64(),
        "steady_secs": r3(steady_secs),
        "operator_bin": op_bin.display().to_string(),
        "operator_log": log_path.display().to_string(),
        "operator_args": a.operator_args,
        "operator_exit": exit.map(|s| s.to_string()),
        "nproc": std::thread::available_parallelism().map(|p| p.get()).unwrap_or(0),
        "control_plane_startup_secs": r3(cp.startup.as_secs_f64()),
        "create_pools_secs": r3(create_secs),
        "startup": {
            "all_ready": all_ready,
            "ready": ready_count,
            "virtual_machine_pools": vmp_count,
            "time_to_all_ready_secs": opt(time_to_all_ready),
            "pool_ready_p50_secs": opt(percentile(&mut ready_sorted, 50.0)),
            "pool_ready_p99_secs": opt(percentile(&mut ready_sorted, 99.0)),
            "operator_cpu_secs": opt(init_cpu),
            "operator_cpu_max_cores": opt(max(&all_cpu)),
            "reconciles": prom_sum(&m_init, "runner_provisioner_reconciles_total"),
            "reconcile_errors": prom_sum(&m_init, "runner_provisioner_reconcile_errors_total"),
            "reconcile_latency_p50_secs": opt(histogram_quantile(0.5, &reconcile_init)),
            "reconcile_latency_p99_secs": opt(histogram_quantile(0.99, &reconcile_init)),
            "reconcile_latency_mean_secs": opt(ratio(
                prom_sum(&m_init, "runner_provisioner_reconcile_duration_seconds_sum"),
                prom_sum(&m_init, "runner_provisioner_reconcile_duration_seconds_count"),
            )),
            "metrics_bytes": metrics_bytes,
            "apiserver_requests": startup_api_requests,
            "apiserver_requests_by_kind": startup_api_by_kind.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "object_bytes": object_sizes,
            "apiserver_flowcontrol_rejected": startup_rejected,
            "apiserver_429": startup_429,
            "metrics_scrape_secs": r3(metrics_scrape.as_secs_f64()),
        },
        "steady": {
            "rss_mib": {"max": opt(rss_max), "mean": opt(mean(&rss)), "min": opt(min(&rss)),
                        "slope_mib_per_min": opt(rss_slope)},
            "rss_max_mib_whole_run": opt(max(&all_rss)),
            "cpu_cores": {"mean": opt(cpu_mean), "max": opt(max(&cpu))},
            "threads_max": steady_samples.iter().map(|s| s.threads).max(),
            "fds_max": steady_samples.iter().map(|s| s.fds).max(),
            "circleci_requests": steady_requests,
            "circleci_requests_per_sec": r3(steady_requests as f64 / steady_secs),
            "circleci_requests_per_sec_max_1s": opt(max(&rps)),
            "circleci_calls_per_pool_per_interval": {
                "mean": opt(calls_mean), "min": opt(min(&per_pool_per_interval)), "max": opt(calls_max),
            },
            "poll_period_secs": {
                "p50": opt(percentile(&mut periods, 50.0)),
                "p1": opt(percentile(&mut periods, 1.0)),
                "p99": opt(percentile(&mut periods, 99.0)),
            },
            "circleci_client_latency_p99_secs": opt(histogram_quantile(0.99, &call_buckets)),
            "polls": steady_polls,
            "replica_writes": steady_replica_writes,
            "reconciles": steady_reconciles,
            "watch_events": {
                "runnerpools": rp_ev_b - rp_ev_a,
                "virtualmachinepools": vmp_ev_b - vmp_ev_a,
            },
            "apiserver_requests": api_req_delta.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "apiserver_requests_per_sec": r3(api_req_delta.values().sum::<f64>() / steady_secs),
            "apiserver_flowcontrol_rejected": rejected,
            "apiserver_429": code429,
            "circleci_peak_rps_100ms": peak_100ms_rps,
            "apiserver_cpu_cores_mean": opt(mean(&api_cpu)),
            "etcd_cpu_cores_mean": opt(mean(&etcd_cpu)),
            "bench_process_cpu_cores_mean": opt(mean(&bench_cpu)),
        },
        "reaction": {
            "sampled": chosen.len(),
            "tasks_per_pool": tasks_per_pool,
            "enqueue_spread_secs": spread.as_secs_f64(),
            "reacted": reactions.len(),
            "unreacted": unreacted,
            "p50_secs": opt(react_p50),
            "p99_secs": opt(react_p99),
            "max_secs": opt(max(&reactions)),
            "min_secs": opt(min(&reactions)),
            "all_reacted": all_reacted,
            "active_window_secs": r3(active_secs),
            "circleci_calls_per_pool_per_interval_active": {
                "mean": opt(active_mean), "max": opt(max(&active_calls)),
            },
            "vms_booted": vms_booted,
            "rss_max_mib": opt(max(&react_samples.iter().map(|s| s.rss_mib).collect::<Vec<_>>())),
            "cpu_mean_cores": opt(mean(&react_samples.iter().map(|s| s.cpu_cores).collect::<Vec<_>>())),
        },
        "operator": {
            "log_lines": log_lines,
            "log_levels": log_levels,
            "log_top_messages": log_top.iter().map(|(k, v)| json!({"message": k, "count": v})).collect::<Vec<_>>(),
            "replica_writes_total": prom_sum(&m_end, "runner_provisioner_replica_writes_total"),
            "reconciles_total": prom_sum(&m_end, "runner_provisioner_reconciles_total"),
            "ready_flips": flips,
        },
        "kubevirt_incidents": incidents.len(),
        "targets": targets.iter().map(|(k, t, v, p)| json!({"name": k, "target": t, "measured": opt(*v), "result": p})).collect::<Vec<_>>(),
        "samples": all_samples.iter().map(|s| json!({
            "t": r3(s.t), "rss_mib": r3(s.rss_mib), "cpu_cores": r3(s.cpu_cores),
            "threads": s.threads, "fds": s.fds, "circleci_rps": r3(s.circleci_rps),
            "circleci_total": s.circleci_total,
            "apiserver_cores": r3(s.apiserver_cores), "etcd_cores": r3(s.etcd_cores),
            "bench_cores": r3(s.bench_cores),
        })).collect::<Vec<_>>(),
    });

    // The table.
    let mut t = String::new();
    let row = |t: &mut String, k: &str, v: String, target: &str, res: &str| {
        t.push_str(&format!("  {k:<46} {v:>22}  {target:<14} {res}\n"));
    };
    t.push_str(&format!(
        "rp-bench-controller: {n} RunnerPools, poll {}, steady {:.0}s, reaction sample {} x {} task(s) queued over {}\n",
        humantime::format_duration(poll),
        steady_secs,
        chosen.len(),
        tasks_per_pool,
        humantime::format_duration(spread)
    ));
    t.push_str(&format!(
        "  {:<46} {:>22}  {:<14} {}\n",
        "metric", "measured", "target", "result"
    ));
    row(
        &mut t,
        "time to all pools Ready (from operator start)",
        match time_to_all_ready {
            Some(v) => format!("{v:.1} s"),
            None => format!("{ready_count}/{n} Ready"),
        },
        "-",
        "",
    );
    row(
        &mut t,
        "pool Ready p50 / p99",
        format!(
            "{} / {} s",
            fmt_opt(result["startup"]["pool_ready_p50_secs"].as_f64(), 1),
            fmt_opt(result["startup"]["pool_ready_p99_secs"].as_f64(), 1)
        ),
        "-",
        "",
    );
    row(
        &mut t,
        "reconcile latency p50 / p99 (histogram)",
        format!(
            "{} / {} s",
            fmt_opt(histogram_quantile(0.5, &reconcile_init), 3),
            fmt_opt(histogram_quantile(0.99, &reconcile_init), 3)
        ),
        "-",
        "",
    );
    row(
        &mut t,
        "reconciles until all Ready (errors)",
        format!(
            "{} ({})",
            prom_sum(&m_init, "runner_provisioner_reconciles_total"),
            prom_sum(&m_init, "runner_provisioner_reconcile_errors_total")
        ),
        "-",
        "",
    );
    row(
        &mut t,
        "operator CPU until all Ready",
        format!("{} cpu-s", fmt_opt(init_cpu, 1)),
        "-",
        "",
    );
    row(
        &mut t,
        "operator RSS max / mean (steady)",
        format!("{} / {} MiB", fmt_opt(rss_max, 1), fmt_opt(mean(&rss), 1)),
        &format!("< {TARGET_RSS_MIB} MiB"),
        targets[0].3,
    );
    row(
        &mut t,
        "operator RSS growth (steady)",
        format!("{} MiB/min", fmt_opt(rss_slope, 2)),
        "-",
        "",
    );
    row(
        &mut t,
        "operator CPU mean / max (steady)",
        format!("{} / {} cores", fmt_opt(cpu_mean, 3), fmt_opt(max(&cpu), 3)),
        &format!("< {TARGET_CPU_CORES} core"),
        targets[1].3,
    );
    row(
        &mut t,
        "CircleCI requests/s mean (peak 1 s; 100 ms)",
        format!(
            "{:.1} ({}; {:.0})",
            steady_requests as f64 / steady_secs,
            fmt_opt(max(&rps), 0),
            peak_100ms_rps
        ),
        "-",
        "",
    );
    row(
        &mut t,
        "CircleCI calls/pool/interval mean (max)",
        format!("{} ({})", fmt_opt(calls_mean, 2), fmt_opt(calls_max, 2)),
        "<= 2",
        targets[3].3,
    );
    row(
        &mut t,
        "  ... while active (reaction pools)",
        fmt_opt(active_mean, 2),
        "<= 2",
        targets[4].3,
    );
    row(
        &mut t,
        "poll period p50 (seen by CircleCI)",
        format!(
            "{} s",
            fmt_opt(result["steady"]["poll_period_secs"]["p50"].as_f64(), 2)
        ),
        "-",
        "",
    );
    row(
        &mut t,
        "reaction p50 / p99",
        format!(
            "{} / {} s",
            fmt_opt(react_p50, 2),
            match react_p99 {
                Some(v) if v.is_infinite() => format!("{} missed", unreacted.len()),
                v => fmt_opt(v, 2),
            }
        ),
        &format!("<= {react_target:.1} s"),
        targets[2].3,
    );
    row(
        &mut t,
        "k8s requests/s during steady (non-watch)",
        format!("{:.1}", api_req_delta.values().sum::<f64>() / steady_secs),
        "-",
        "",
    );
    row(
        &mut t,
        "APF rejections / 429s (startup; steady)",
        format!("{startup_rejected} / {startup_429}; {rejected} / {code429}"),
        "-",
        "",
    );
    row(
        &mut t,
        "CPU mean apiserver / etcd / bench (steady)",
        format!(
            "{} / {} / {}",
            fmt_opt(mean(&api_cpu), 2),
            fmt_opt(mean(&etcd_cpu), 2),
            fmt_opt(mean(&bench_cpu), 2)
        ),
        "-",
        "",
    );
    let mut top_api: Vec<_> = api_req_delta.iter().collect();
    top_api.sort_by(|a, b| b.1.total_cmp(a.1));
    let top_api: Vec<String> = top_api
        .iter()
        .take(5)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    t.push_str(&format!(
        "  k8s requests during steady: {}\n",
        if top_api.is_empty() {
            "none".into()
        } else {
            top_api.join(", ")
        }
    ));
    t.push_str(&format!(
        "  (targets are those for 1,000 pools; {} KubeVirt incidents; {} VMs booted)\n",
        incidents.len(),
        vms_booted
    ));
    print!("{t}");

    if let Some(p) = &a.output {
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).ok();
        }
        std::fs::write(p, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("writing {}", p.display()))?;
        say!("wrote {}", p.display());
    }
    drop(kv);
    drop(circleci);
    drop(cp);
    Ok(())
}

/// JSON sizes of one pool's objects as the operator's watches receive them,
/// with and without `metadata.managedFields` (what its caches hold per pool).
async fn object_sizes(client: &Client, ns: &str) -> Value {
    let name = pool_name(0);
    let mut out = serde_json::Map::new();
    let apis = [
        ("runnerpool", runnerpool_resource(), name.clone()),
        (
            "virtualmachinepool",
            kubevirt::pool_resource(),
            name.clone(),
        ),
        (
            "cloudinit_secret",
            ApiResource::erase::<Secret>(&()),
            format!("{name}-cloudinit"),
        ),
    ];
    for (what, ar, obj) in apis {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
        if let Ok(mut o) = api.get(&obj).await {
            let full = serde_json::to_vec(&o).map_or(0, |v| v.len());
            o.metadata.managed_fields = None;
            let bare = serde_json::to_vec(&o).map_or(0, |v| v.len());
            out.insert(
                what.into(),
                json!({"bytes": full, "without_managed_fields": bare}),
            );
        }
    }
    Value::Object(out)
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0).then(|| a / b)
}

fn prom_delta(after: &[Series], before: &[Series], name: &str) -> f64 {
    prom_sum(after, name) - prom_sum(before, name)
}

/// The CircleCI simulator's wall seconds at `t`.
fn circleci_wall(sim: &CircleCiSim, t: Instant) -> f64 {
    let now = Instant::now();
    let sim_now = sim.now_simulated().as_secs_f64() / sim.time_scale().0;
    if t <= now {
        sim_now - now.duration_since(t).as_secs_f64()
    } else {
        sim_now + t.duration_since(now).as_secs_f64()
    }
}

/// Least-squares slope of `(x, y)`.
fn slope(pts: &[(f64, f64)]) -> Option<f64> {
    if pts.len() < 2 {
        return None;
    }
    let n = pts.len() as f64;
    let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
    let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text_and_quantiles() {
        let text = r#"# HELP x
# TYPE runner_provisioner_reconcile_duration_seconds histogram
runner_provisioner_reconcile_duration_seconds_sum 1.5
runner_provisioner_reconcile_duration_seconds_count 10
runner_provisioner_reconcile_duration_seconds_bucket{le="0.01"} 5
runner_provisioner_reconcile_duration_seconds_bucket{le="0.02"} 9
runner_provisioner_reconcile_duration_seconds_bucket{le="+Inf"} 10
runner_provisioner_polls_total{namespace="a",pool="p \"x\""} 3
runner_provisioner_polls_total{namespace="a",pool="q"} 4
# EOF
"#;
        let s = parse_prom(text);
        assert_eq!(prom_sum(&s, "runner_provisioner_polls_total"), 7.0);
        assert!(
            s.iter()
                .any(|x| x.labels.get("pool").map(String::as_str) == Some("p \"x\""))
        );
        let b = prom_buckets(&s, "runner_provisioner_reconcile_duration_seconds");
        assert_eq!(b.len(), 3);
        assert!((histogram_quantile(0.5, &b).unwrap() - 0.01).abs() < 1e-9);
        assert!((histogram_quantile(0.7, &b).unwrap() - 0.015).abs() < 1e-9);
        assert_eq!(histogram_quantile(0.99, &b), Some(0.02));
    }

    #[test]
    fn percentiles_and_slope() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&mut v, 50.0), Some(3.0));
        assert_eq!(percentile(&mut v, 99.0), Some(5.0));
        assert_eq!(percentile(&mut [], 50.0), None);
        let s = slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]).unwrap();
        assert!((s - 2.0).abs() < 1e-9);
    }

    #[test]
    fn args_parse() {
        let a = Args::try_parse_from([
            "rp-bench-controller",
            "--pools",
            "5",
            "--duration",
            "5s",
            "--operator-arg=--concurrency=32",
        ])
        .unwrap();
        assert_eq!(a.pools, 5);
        assert_eq!(a.duration, Duration::from_secs(5));
        assert_eq!(a.operator_args, ["--concurrency=32"]);
    }
}
