//! `rp-demo`: the whole demo in one process (`make demo`).
//!
//! 1. Starts the local environment in-process (the real control plane with
//!    the KubeVirt CRDs and the RunnerPool CRD from `crds/runnerpool.yaml`,
//!    the CircleCI and KubeVirt simulators, namespace `ci-runners` with the
//!    token Secrets), exactly as `rp-env` does.
//! 2. Spawns the operator binary (`--operator-bin`) against it, logging to
//!    `--log-dir`/operator.log.
//! 3. Applies `demo/runnerpool.yaml` (with the simulator's URL substituted),
//!    waits for its warm pool, then replays a slice of a CI trace into the
//!    CircleCI simulator at `--time-scale`, printing progress every 2 s.
//! 4. Prints a summary (job waits from the simulator's ledger, VM-hours from
//!    a watch on the operator's VirtualMachines), deletes the RunnerPool and
//!    waits for the drain, stops the operator and everything else.
//!
//! Exits non-zero when a task was killed, when not every job finished, or
//! when something failed. Progress and summary go to stdout; rp-demo's own
//! log (warnings and errors; `RUST_LOG` for more) to stderr.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams};
use rp_testenv::circleci::{CircleCiSim, TEST_RESOURCE_CLASS};
use rp_testenv::controlplane::apply_yaml;
use rp_testenv::kubevirt::{self, BootLatency};
use rp_testenv::localenv::{
    DEMO_NAMESPACE, LocalEnv, LocalEnvOptions, parse_boot_latency, parse_time_scale,
};
use rp_testenv::replay::{self, JobSummary, SliceInfo, TraceJob, VmHours, VmHoursMeter};
use serde::Serialize;
use serde_json::Value;
use tokio::io::AsyncBufReadExt as _;
use tokio::signal::unix::{SignalKind, signal};

/// The repository root (this crate is `tests/support`).
fn repo_root() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::canonicalize(&p).unwrap_or(p)
}

/// `--short`: two simulated hours of the trace starting 30 minutes in, with
/// a burst of five pipelines (85 jobs) within 20 minutes.
const SHORT_FROM_HOURS: f64 = 0.5;
const SHORT_HOURS: f64 = 2.0;
/// Default: the busiest 12 hours of the 3-day trace (292 jobs, 18 pipelines,
/// 90 runner-hours; 44 would run at once if every job started on arrival).
const DEFAULT_FROM_HOURS: f64 = 18.0;
const DEFAULT_HOURS: f64 = 12.0;
const DEFAULT_TIME_SCALE: f64 = 240.0;

/// The one-command demo: the operator against the local environment, fed a
/// replayed CI trace.
#[derive(Debug, Parser)]
#[command(name = "rp-demo", version)]
struct Args {
    /// The trace: CSV `arrival_s,duration_s[,group]` (default:
    /// demo/traces/bitcoin-core-gha-3d.csv).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Start of the slice, in hours from the trace's start (default 18; 0.5
    /// with --short).
    #[arg(long)]
    from_hours: Option<f64>,
    /// Length of the slice in simulated hours (default 12; 2 with --short).
    #[arg(long)]
    hours: Option<f64>,
    /// Simulated seconds per wall-clock second (default 240: one wall second
    /// is four simulated minutes, 12 simulated hours take 3 wall minutes).
    #[arg(long, value_parser = parse_time_scale)]
    time_scale: Option<f64>,
    /// CI mode: 2 simulated hours with a burst (about 1 minute wall).
    #[arg(long)]
    short: bool,
    /// Also write the summary as JSON here.
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// The operator binary (default: target/debug/runner-provisioner, under
    /// $CARGO_TARGET_DIR if set).
    #[arg(long)]
    operator_bin: Option<PathBuf>,
    /// The RunnerPool manifest; `${CIRCLECI_SIM_URL}` is replaced by the
    /// simulator's URL (default: demo/runnerpool.yaml).
    #[arg(long)]
    pool: Option<PathBuf>,
    /// The RunnerPool CRD (default: crds/runnerpool.yaml).
    #[arg(long)]
    crd: Option<PathBuf>,
    /// Where operator.log goes (default: target/rp-demo).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Simulated VM boot latency: `30s` or `120s..300s` (uniform per VMI).
    #[arg(long, default_value = "120s..300s", value_parser = parse_boot_latency)]
    boot_latency: BootLatency,
    /// Seed of boot latencies and of KubeVirt's random scale-in order.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Wall seconds between progress lines.
    #[arg(long, default_value_t = 2.0)]
    progress_every: f64,
}

/// What the demo runs with, after defaults.
#[derive(Clone, Debug, Serialize)]
struct Plan {
    mode: &'static str,
    trace: PathBuf,
    from_hours: f64,
    hours: f64,
    time_scale: f64,
    #[serde(skip)]
    operator_bin: PathBuf,
    #[serde(skip)]
    pool: PathBuf,
    #[serde(skip)]
    crd: PathBuf,
    #[serde(skip)]
    log_dir: PathBuf,
    boot_latency: String,
    seed: u64,
    #[serde(skip)]
    progress_every: f64,
}

impl Plan {
    fn from_args(a: &Args) -> Result<Plan> {
        let root = repo_root();
        let (from, hours) = if a.short {
            (SHORT_FROM_HOURS, SHORT_HOURS)
        } else {
            (DEFAULT_FROM_HOURS, DEFAULT_HOURS)
        };
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .map(|p| if p.is_absolute() { p } else { root.join(p) })
            .unwrap_or_else(|| root.join("target"));
        let plan = Plan {
            mode: if a.short { "short" } else { "default" },
            trace: a
                .trace
                .clone()
                .unwrap_or_else(|| root.join("demo/traces/bitcoin-core-gha-3d.csv")),
            from_hours: a.from_hours.unwrap_or(from),
            hours: a.hours.unwrap_or(hours),
            time_scale: a.time_scale.unwrap_or(DEFAULT_TIME_SCALE),
            operator_bin: a
                .operator_bin
                .clone()
                .unwrap_or_else(|| target.join("debug/runner-provisioner")),
            pool: a
                .pool
                .clone()
                .unwrap_or_else(|| root.join("demo/runnerpool.yaml")),
            crd: a
                .crd
                .clone()
                .unwrap_or_else(|| root.join("crds/runnerpool.yaml")),
            log_dir: a.log_dir.clone().unwrap_or_else(|| target.join("rp-demo")),
            boot_latency: match &a.boot_latency {
                BootLatency::Fixed(d) => format!("{}s", d.as_secs_f64()),
                BootLatency::Uniform { min, max } => {
                    format!("{}s..{}s", min.as_secs_f64(), max.as_secs_f64())
                }
            },
            seed: a.seed,
            progress_every: a.progress_every,
        };
        if !(plan.from_hours.is_finite() && plan.from_hours >= 0.0) {
            bail!("--from-hours must be a number >= 0");
        }
        if !(plan.hours.is_finite() && plan.hours > 0.0) {
            bail!("--hours must be a positive number");
        }
        Ok(plan)
    }
    fn start_s(&self) -> f64 {
        self.from_hours * 3600.0
    }
    fn end_s(&self) -> f64 {
        (self.from_hours + self.hours) * 3600.0
    }
}

/// The pool manifest's name and `spec.scaling.minReplicas`.
struct PoolManifest {
    yaml: String,
    name: String,
    min_replicas: usize,
    max_replicas: usize,
}

fn load_pool(path: &Path, api_url: &str) -> Result<PoolManifest> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let yaml = text.replace("${CIRCLECI_SIM_URL}", api_url);
    let v: Value = serde_norway::from_str(&yaml)
        .with_context(|| format!("parsing {} (one RunnerPool document)", path.display()))?;
    if v["kind"] != "RunnerPool" {
        bail!("{} is not a RunnerPool", path.display());
    }
    if v["metadata"]["namespace"]
        .as_str()
        .unwrap_or(DEMO_NAMESPACE)
        != DEMO_NAMESPACE
    {
        bail!(
            "{}: the RunnerPool must be in namespace {DEMO_NAMESPACE}",
            path.display()
        );
    }
    if v["spec"]["resourceClass"] != TEST_RESOURCE_CLASS {
        bail!(
            "{}: spec.resourceClass must be {TEST_RESOURCE_CLASS} (the class the simulator has a runner token for)",
            path.display()
        );
    }
    let name = v["metadata"]["name"]
        .as_str()
        .context("metadata.name missing")?
        .to_string();
    let scaling = &v["spec"]["scaling"];
    Ok(PoolManifest {
        yaml: if v["metadata"]["namespace"].is_null() {
            // apply_yaml would put it in `default`.
            let mut v = v.clone();
            v["metadata"]["namespace"] = DEMO_NAMESPACE.into();
            serde_json::to_string(&v)?
        } else {
            yaml
        },
        name,
        min_replicas: scaling["minReplicas"].as_u64().unwrap_or(0) as usize,
        max_replicas: scaling["maxReplicas"].as_u64().unwrap_or(0) as usize,
    })
}

fn runnerpool_resource() -> ApiResource {
    ApiResource {
        group: "runners.provisioner.dev".into(),
        version: "v1alpha1".into(),
        api_version: "runners.provisioner.dev/v1alpha1".into(),
        kind: "RunnerPool".into(),
        plural: "runnerpools".into(),
    }
}

/// What the operator's log says, as it runs.
#[derive(Debug, Default)]
struct OperatorView {
    /// `loop_name: scaler` poll records.
    polls: u64,
    unclaimed: Option<u64>,
    running: Option<u64>,
    desired: Option<u64>,
    replicas: Option<u64>,
    errors: u64,
    warnings: u64,
    first_errors: Vec<String>,
    /// When each poll record arrived.
    poll_times: Vec<Instant>,
}

impl OperatorView {
    fn take_line(&mut self, line: &str) {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return;
        };
        match v["level"].as_str() {
            Some("ERROR") => {
                self.errors += 1;
                if self.first_errors.len() < 5 {
                    self.first_errors.push(one_line(&v));
                }
            }
            Some("WARN") => self.warnings += 1,
            _ => {}
        }
        if v["loop_name"] == "scaler" && v.get("desired_vms").is_some() {
            self.polls += 1;
            self.poll_times.push(Instant::now());
            self.unclaimed = v["unclaimed_tasks"].as_u64();
            self.running = v["running_tasks"].as_u64();
            self.desired = v["desired_vms"].as_u64();
            self.replicas = v["replicas"].as_u64();
        }
    }
}

fn one_line(v: &Value) -> String {
    let msg = v["message"].as_str().unwrap_or("");
    let err = v["error"].as_str().unwrap_or("");
    if err.is_empty() {
        msg.to_string()
    } else {
        format!("{msg}: {err}")
    }
}

/// The operator as a child process: its own process group (Ctrl-C reaches
/// only rp-demo, which stops it in order), killed if rp-demo dies.
struct Operator {
    child: tokio::process::Child,
    view: Arc<Mutex<OperatorView>>,
    log: PathBuf,
    reader: tokio::task::JoinHandle<()>,
}

impl Operator {
    fn spawn(bin: &Path, kubeconfig: &Path, log: PathBuf) -> Result<Operator> {
        let mut cmd = tokio::process::Command::new(bin);
        cmd.args([
            "run",
            "--namespace",
            DEMO_NAMESPACE,
            "--leader-election",
            "false",
            "--ready-addr",
            "127.0.0.1:0",
            "--live-addr",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("WATCH_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the operator {}", bin.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let view = Arc::new(Mutex::new(OperatorView::default()));
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?,
        );
        let reader = {
            let view = view.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let _ = writeln!(file, "{line}");
                    view.lock().unwrap().take_line(&line);
                }
                let _ = file.flush();
            })
        };
        Ok(Operator {
            child,
            view,
            log,
            reader,
        })
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    async fn stop(mut self, grace: Duration) -> Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(s) => s?,
            Err(_) => {
                eprintln!("rp-demo: the operator did not stop within {grace:?}; killing it");
                self.child.kill().await?;
                self.child.wait().await?
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.reader).await;
        Ok(status)
    }
}

/// Simulated seconds as `HH:MM`.
fn hhmm(sim_s: f64) -> String {
    let m = (sim_s.max(0.0) / 60.0).floor() as u64;
    format!("{:02}:{:02}", m / 60, m % 60)
}

/// Simulated seconds for the table: `42 s`, `3m 05s`, `1h 02m`.
fn human_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.0} s")
    } else if s < 3600.0 {
        let t = s.round() as u64;
        format!("{}m {:02}s", t / 60, t % 60)
    } else {
        let m = (s / 60.0).round() as u64;
        format!("{}h {:02}m", m / 60, m % 60)
    }
}

/// One progress line.
struct Progress<'a> {
    sim: &'a CircleCiSim,
    meter: &'a VmHoursMeter,
    view: &'a Mutex<OperatorView>,
    start_sim_s: f64,
    total_jobs: usize,
}

impl Progress<'_> {
    fn line(&self, enqueued: usize) -> String {
        let now = self.sim.now_simulated().as_secs_f64() - self.start_sim_s;
        let (queued, running) = self.sim.counts(TEST_RESOURCE_CLASS);
        let s = replay::summary(&self.sim.ledger(), Some(TEST_RESOURCE_CLASS));
        let vms = self.meter.snapshot();
        let v = self.view.lock().unwrap();
        let opt = |x: Option<u64>| x.map_or("-".to_string(), |x| x.to_string());
        format!(
            "  sim {}  arrived {:>3}/{}  queued {:>3}  running {:>3}  VMs {:>3} (boot {:>2}, up {:>2}, off {:>2})  replicas {:>3}  finished {:>3}  killed {}",
            hhmm(now),
            enqueued,
            self.total_jobs,
            queued,
            running,
            vms.vms_now,
            vms.vms_booting,
            vms.vms_up,
            vms.vms_off,
            opt(v.replicas),
            s.finished,
            s.killed
        )
    }
}

/// Wall seconds between successive scaler polls during the replay.
#[derive(Debug, Serialize)]
struct PollPeriods {
    p50_wall_s: f64,
    p90_wall_s: f64,
    max_wall_s: f64,
}

fn poll_periods(times: &[Instant], from: Instant, to: Instant) -> Option<PollPeriods> {
    let t: Vec<Instant> = times
        .iter()
        .copied()
        .filter(|&t| t >= from && t <= to)
        .collect();
    let mut d: Vec<f64> = t.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    d.sort_by(f64::total_cmp);
    Some(PollPeriods {
        p50_wall_s: replay::percentile_nearest_rank(&d, 50.0)?,
        p90_wall_s: replay::percentile_nearest_rank(&d, 90.0)?,
        max_wall_s: *d.last()?,
    })
}

#[derive(Debug, Serialize)]
struct OperatorSummary {
    polls: u64,
    /// During the replay.
    poll_period: Option<PollPeriods>,
    errors_logged: u64,
    warnings_logged: u64,
    first_errors: Vec<String>,
    circleci_requests: u64,
    log: PathBuf,
}

#[derive(Debug, Serialize)]
struct DrainSummary {
    pool_deleted: bool,
    wall_s: f64,
    vms_left: usize,
}

#[derive(Debug, Serialize)]
struct WallSummary {
    startup_s: f64,
    replay_s: f64,
    total_s: f64,
}

/// The summary; `--summary-json` writes it.
#[derive(Debug, Serialize)]
struct DemoSummary {
    ok: bool,
    problems: Vec<String>,
    plan: Plan,
    pool: String,
    min_replicas: usize,
    max_replicas: usize,
    slice: SliceInfo,
    /// From the CircleCI simulator's ledger.
    jobs: JobSummary,
    /// From the first enqueue until the last job finished (or the replay
    /// gave up), simulated hours.
    vm: VmHours,
    /// `vm.running_hours - jobs.busy_hours`: booted VMs without a job.
    idle_vm_hours: f64,
    /// `jobs.busy_hours / vm.vm_hours`.
    utilization: f64,
    all_enqueued: bool,
    all_finished: bool,
    max_enqueue_lateness_wall_s: f64,
    operator: OperatorSummary,
    drain: Option<DrainSummary>,
    wall: WallSummary,
}

fn print_summary(s: &DemoSummary) {
    let p = &s.plan;
    let j = &s.jobs;
    println!();
    println!(
        "Summary: {} jobs of {} (hours {}..{} of the trace) at {}x, RunnerPool {} (min {}, max {})",
        s.slice.jobs,
        p.trace.file_name().unwrap_or_default().to_string_lossy(),
        p.from_hours,
        p.from_hours + p.hours,
        p.time_scale,
        s.pool,
        s.min_replicas,
        s.max_replicas,
    );
    println!("  (all times below are simulated)");
    let row = |k: &str, v: String| println!("  {k:<34} {v}");
    row("jobs", j.jobs.to_string());
    row(
        "finished",
        format!(
            "{}{}",
            j.finished,
            if j.finished == j.jobs {
                " (all)".to_string()
            } else {
                format!(" ({} queued, {} running)", j.queued, j.running)
            }
        ),
    );
    row(
        "killed (busy VM deleted)",
        format!(
            "{}{}",
            j.killed,
            if j.killed == 0 { "" } else { "  <-- must be 0" }
        ),
    );
    match &j.wait {
        Some(w) => {
            row(
                "wait p50 / p95 / p99",
                format!(
                    "{} / {} / {}",
                    human_secs(w.p50),
                    human_secs(w.p95),
                    human_secs(w.p99)
                ),
            );
            row(
                "wait max / mean",
                format!("{} / {}", human_secs(w.max), human_secs(w.mean)),
            );
        }
        None => row("wait", "no job was claimed".into()),
    }
    row(
        "jobs that waited over 10 min",
        j.waited_over_10m.to_string(),
    );
    row(
        "peak jobs running at once",
        format!(
            "{} (trace: {} if every job started on arrival)",
            j.peak_running, s.slice.peak_if_started_on_arrival
        ),
    );
    row(
        "runner-hours of jobs (busy)",
        format!("{:.1} h", j.busy_hours),
    );
    row(
        "VM-hours (created to deleted)",
        format!("{:.1} h", s.vm.vm_hours),
    );
    row("  of which booting", format!("{:.1} h", s.vm.booting_hours));
    row(
        "  of which booted, no job (idle)",
        format!("{:.1} h", s.idle_vm_hours),
    );
    row(
        "  of which powered off, not deleted",
        format!(
            "{:.1} h",
            (s.vm.vm_hours - s.vm.booting_hours - s.vm.running_hours).max(0.0)
        ),
    );
    row("busy / VM-hours", format!("{:.0} %", 100.0 * s.utilization));
    row(
        "VMs created / peak at once",
        format!("{} / {}", s.vm.vms_seen, s.vm.peak_vms),
    );
    row(
        "operator polls / CircleCI calls",
        format!("{} / {}", s.operator.polls, s.operator.circleci_requests),
    );
    if let Some(pp) = &s.operator.poll_period {
        let both = |w: f64| format!("{w:.1} s ({})", human_secs(w * p.time_scale));
        row(
            "poll period p50 / p90 / max (wall)",
            format!(
                "{} / {} / {}",
                both(pp.p50_wall_s),
                both(pp.p90_wall_s),
                both(pp.max_wall_s)
            ),
        );
    }
    row(
        "operator errors / warnings logged",
        format!(
            "{} / {}",
            s.operator.errors_logged, s.operator.warnings_logged
        ),
    );
    if let Some(d) = &s.drain {
        row(
            "RunnerPool deleted, drained",
            format!(
                "{} in {:.1} s wall, {} VMs left",
                if d.pool_deleted { "yes" } else { "NO" },
                d.wall_s,
                d.vms_left
            ),
        );
    }
    row(
        "wall time (startup / replay / total)",
        format!(
            "{:.0} s / {:.0} s / {:.0} s",
            s.wall.startup_s, s.wall.replay_s, s.wall.total_s
        ),
    );
    row("operator log", s.operator.log.display().to_string());
    println!(
        "\n  The operator's own latencies (poll period, API calls) are wall-clock, so against the\n  \
         simulated job durations and boot times they count {} times over: a powered-off VM waits\n  \
         about one poll period (above) to be deleted, holding a pool slot until then. A lower\n  \
         --time-scale gives more faithful waits and VM-hours, at the cost of wall time.",
        p.time_scale
    );
    if s.ok {
        println!("\nOK: every job ran, none was killed.");
    } else {
        println!("\nFAILED:");
        for p in &s.problems {
            println!("  - {p}");
        }
    }
}

/// SIGINT or SIGTERM.
async fn interrupted() -> &'static str {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

async fn count_running_vms(vms: &Api<DynamicObject>) -> Result<usize> {
    let list = vms
        .list(&ListParams::default().labels(replay::MANAGED_BY_SELECTOR))
        .await?;
    Ok(list
        .items
        .iter()
        .filter(|v| v.data["status"]["printableStatus"] == "Running")
        .count())
}

async fn run(plan: Plan, args: &Args) -> Result<DemoSummary> {
    let t0 = Instant::now();
    if !plan.operator_bin.is_file() {
        bail!(
            "the operator binary {} does not exist: build it with `cargo build --bin runner-provisioner` \
             (`make demo` does), or pass --operator-bin",
            plan.operator_bin.display()
        );
    }
    let jobs: Vec<TraceJob> = replay::load_trace(&plan.trace)?;
    let info = replay::slice_info(&jobs, plan.start_s(), plan.end_s());
    if info.jobs == 0 {
        bail!(
            "no job of {} arrives in hours {}..{}",
            plan.trace.display(),
            plan.from_hours,
            plan.from_hours + plan.hours
        );
    }
    let crd = std::fs::read_to_string(&plan.crd)
        .with_context(|| format!("reading the RunnerPool CRD {}", plan.crd.display()))?;
    std::fs::create_dir_all(&plan.log_dir)
        .with_context(|| format!("creating {}", plan.log_dir.display()))?;
    let scale = plan.time_scale;

    println!(
        "rp-demo: the runner-provisioner operator against a real Kubernetes control plane, with\n\
         simulated KubeVirt (VM boot {}) and simulated CircleCI, fed a real CI trace.",
        plan.boot_latency
    );
    println!(
        "Trace {}: hours {}..{}: {} jobs in {} pipelines, {:.1} runner-hours.",
        plan.trace.display(),
        plan.from_hours,
        plan.from_hours + plan.hours,
        info.jobs,
        info.groups,
        info.runner_hours
    );
    println!(
        "Time scale {scale}: 1 s wall = {} simulated; the {} h slice takes about {:.0} s wall.\n\
         Job durations, VM boots and the runner's idle timeout run in simulated time. The operator\n\
         polls CircleCI every 1 s of wall time (its minimum) = every {} simulated, so waits include\n\
         up to that much polling delay (a real deployment polls every 5 s).",
        human_secs(scale),
        plan.hours,
        plan.hours * 3600.0 / scale,
        human_secs(scale)
    );
    println!("Starting the control plane and the simulators...");

    rp_testenv::init_crypto();
    let env = LocalEnv::start(&LocalEnvOptions {
        time_scale: scale,
        boot_latency: args.boot_latency.clone(),
        seed: plan.seed,
        extra_crds: vec![crd],
        field_manager: "rp-demo",
    })
    .await?;
    let result = run_in(&plan, &env, &info, &jobs, t0).await;
    env.stop();
    result
}

async fn run_in(
    plan: &Plan,
    env: &LocalEnv,
    info: &SliceInfo,
    jobs: &[TraceJob],
    t0: Instant,
) -> Result<DemoSummary> {
    let scale = plan.time_scale;
    let client = env.client();
    let sim = &env.circleci;
    let pool = load_pool(&plan.pool, &sim.base_url())?;
    let meter = VmHoursMeter::start(client.clone(), Some(DEMO_NAMESPACE), scale);
    meter.wait_synced(Duration::from_secs(30)).await?;

    let log = plan.log_dir.join("operator.log");
    let mut op = Operator::spawn(&plan.operator_bin, env.cp.kubeconfig(), log.clone())?;
    println!(
        "Environment up in {:.1} s; operator started (log: {}).",
        t0.elapsed().as_secs_f64(),
        log.display()
    );
    apply_yaml(&client, &pool.yaml)
        .await
        .with_context(|| format!("applying {}", plan.pool.display()))?;
    println!(
        "Applied RunnerPool {DEMO_NAMESPACE}/{} (minReplicas {}, maxReplicas {}); waiting for its warm VMs...",
        pool.name, pool.min_replicas, pool.max_replicas
    );
    let vms: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), DEMO_NAMESPACE, &kubevirt::vm_resource());
    let warm_deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(st) = op.exited() {
            bail!("the operator exited ({st}); see {}", op.log.display());
        }
        let n = count_running_vms(&vms).await.unwrap_or(0);
        if n >= pool.min_replicas.max(1).min(pool.max_replicas) || pool.min_replicas == 0 {
            break;
        }
        if Instant::now() > warm_deadline {
            bail!(
                "the pool did not get {} VMs Running within 90 s ({n} are); see {}",
                pool.min_replicas,
                op.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let startup_s = t0.elapsed().as_secs_f64();
    println!(
        "{} warm VMs Running after {startup_s:.1} s. Replaying (sim = simulated time since the slice started):",
        pool.min_replicas
    );

    let start_sim_s = sim.now_simulated().as_secs_f64();
    let vm_at_start = meter.snapshot();
    let op_view = op.view.clone();
    let progress = Progress {
        sim,
        meter: &meter,
        view: &op_view,
        start_sim_s,
        total_jobs: info.jobs,
    };
    let replay_t0 = Instant::now();
    // Give up when the last job should have finished long ago: its end plus
    // 2 simulated hours, plus 60 s wall.
    let deadline = replay_t0
        + Duration::from_secs_f64((info.last_end_s + 7200.0) / scale)
        + Duration::from_secs(60);
    let every = Duration::from_secs_f64(plan.progress_every.max(0.1));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tick.tick().await;
    let replaying = replay::replay(
        sim,
        TEST_RESOURCE_CLASS,
        jobs,
        scale,
        plan.start_s(),
        plan.end_s(),
    );
    let mut replaying = std::pin::pin!(replaying);
    let mut report = None;
    let mut problems = Vec::new();
    let mut interrupt = std::pin::pin!(interrupted());
    let mut vm_at_end = None;
    loop {
        tokio::select! {
            r = &mut replaying, if report.is_none() => {
                let r = r.context("replaying the trace")?;
                println!(
                    "  sim {}  all {} jobs have arrived; waiting for the last ones to finish",
                    hhmm(sim.now_simulated().as_secs_f64() - start_sim_s),
                    r.enqueued
                );
                report = Some(r);
            }
            _ = tick.tick() => {
                // Jobs of the replay are `job-<line>`; a re-queued one has attempt > 1.
                let enqueued = match &report {
                    Some(r) => r.enqueued,
                    None => sim
                        .ledger()
                        .iter()
                        .filter(|r| r.attempt == 1 && r.id.0.starts_with("job-"))
                        .count(),
                };
                println!("{}", progress.line(enqueued));
                if report.is_some() {
                    let s = replay::summary(&sim.ledger(), Some(TEST_RESOURCE_CLASS));
                    if s.finished == s.jobs {
                        vm_at_end = Some(meter.snapshot());
                        break;
                    }
                }
                if Instant::now() > deadline {
                    problems.push(format!(
                        "gave up after {:.0} s wall: not every job finished",
                        replay_t0.elapsed().as_secs_f64()
                    ));
                    break;
                }
                if let Some(st) = op.exited() {
                    problems.push(format!("the operator exited during the replay ({st})"));
                    break;
                }
            }
            why = &mut interrupt => {
                problems.push(format!("{why}: interrupted"));
                break;
            }
        }
    }
    let replay_s = replay_t0.elapsed().as_secs_f64();
    let replay_end = Instant::now();
    let vm_end = vm_at_end.unwrap_or_else(|| meter.snapshot());
    let vm = vm_end.since(&vm_at_start);
    let jobs_summary = replay::summary(&sim.ledger(), Some(TEST_RESOURCE_CLASS));
    let all_enqueued = report.is_some();
    let all_finished = all_enqueued && jobs_summary.finished == jobs_summary.jobs;
    if !all_enqueued {
        problems.push(format!(
            "the replay did not finish: {} of {} jobs arrived",
            jobs_summary.jobs, info.jobs
        ));
    } else if !all_finished {
        problems.push(format!(
            "{} of {} jobs did not finish ({} queued, {} running)",
            jobs_summary.jobs - jobs_summary.finished,
            jobs_summary.jobs,
            jobs_summary.queued,
            jobs_summary.running
        ));
    }
    if jobs_summary.killed > 0 {
        problems.push(format!(
            "{} task(s) were killed: a VM was deleted while its job ran",
            jobs_summary.killed
        ));
    }

    // Clean up: delete the RunnerPool and wait for the drain.
    let drain = if problems.iter().any(|p| p.contains("interrupted")) {
        None
    } else {
        println!(
            "Deleting the RunnerPool (deletionPolicy Drain: idle VMs leave after idleTimeout)..."
        );
        let pools: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), DEMO_NAMESPACE, &runnerpool_resource());
        let t = Instant::now();
        let mut deleted = false;
        if let Err(e) = pools.delete(&pool.name, &DeleteParams::default()).await {
            problems.push(format!("deleting the RunnerPool failed: {e}"));
        } else {
            let limit = Duration::from_secs(60);
            while t.elapsed() < limit {
                match pools.get_opt(&pool.name).await {
                    Ok(None) => {
                        deleted = true;
                        break;
                    }
                    Ok(Some(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
                }
            }
            if !deleted {
                problems.push(format!(
                    "the RunnerPool was not gone {}s after its deletion",
                    limit.as_secs()
                ));
            }
        }
        // The VMs' deletion reaches the watch a moment later.
        let gone = Instant::now() + Duration::from_secs(10);
        while deleted && meter.snapshot().vms_now > 0 && Instant::now() < gone {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Some(DrainSummary {
            pool_deleted: deleted,
            wall_s: t.elapsed().as_secs_f64(),
            vms_left: meter.snapshot().vms_now,
        })
    };
    let circleci_requests = sim.requests().total;
    let view = op.view.clone();
    let log = op.log.clone();
    let status = op.stop(Duration::from_secs(15)).await?;
    if !status.success() && status.code().is_some() {
        problems.push(format!("the operator exited with {status} when stopped"));
    }
    let view = std::mem::take(&mut *view.lock().unwrap());
    if view.polls == 0 {
        problems.push("the operator logged no scaler poll".into());
    }
    let utilization = if vm.vm_hours > 0.0 {
        jobs_summary.busy_hours / vm.vm_hours
    } else {
        0.0
    };
    Ok(DemoSummary {
        ok: problems.is_empty(),
        problems,
        plan: plan.clone(),
        pool: format!("{DEMO_NAMESPACE}/{}", pool.name),
        min_replicas: pool.min_replicas,
        max_replicas: pool.max_replicas,
        slice: info.clone(),
        idle_vm_hours: (vm.running_hours - jobs_summary.busy_hours).max(0.0),
        utilization,
        vm,
        jobs: jobs_summary,
        all_enqueued,
        all_finished,
        max_enqueue_lateness_wall_s: report.as_ref().map_or(0.0, |r| r.max_lateness_wall_s),
        operator: OperatorSummary {
            polls: view.polls,
            poll_period: poll_periods(&view.poll_times, replay_t0, replay_end),
            errors_logged: view.errors,
            warnings_logged: view.warnings,
            first_errors: view.first_errors,
            circleci_requests,
            log,
        },
        drain,
        wall: WallSummary {
            startup_s,
            replay_s,
            total_s: t0.elapsed().as_secs_f64(),
        },
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,kube_client=off")),
        )
        .init();
    let args = Args::parse();
    let plan = match Plan::from_args(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("rp-demo: {e:#}");
            return ExitCode::from(2);
        }
    };
    let summary_json = args.summary_json.clone();
    match run(plan, &args).await {
        Ok(summary) => {
            print_summary(&summary);
            if let Some(path) = summary_json {
                let text = serde_json::to_string_pretty(&summary).expect("serializable");
                if let Err(e) = std::fs::write(&path, text + "\n") {
                    eprintln!("rp-demo: writing {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            if summary.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("rp-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_overrides() {
        let p = Plan::from_args(&Args::try_parse_from(["rp-demo"]).unwrap()).unwrap();
        assert_eq!(
            (p.mode, p.from_hours, p.hours, p.time_scale),
            ("default", 18.0, 12.0, 240.0)
        );
        assert!(p.trace.ends_with("demo/traces/bitcoin-core-gha-3d.csv"));
        assert!(p.trace.is_file(), "{}", p.trace.display());
        assert!(p.pool.is_file() && p.crd.is_file());
        let p = Plan::from_args(&Args::try_parse_from(["rp-demo", "--short"]).unwrap()).unwrap();
        assert_eq!((p.mode, p.from_hours, p.hours), ("short", 0.5, 2.0));
        let p = Plan::from_args(
            &Args::try_parse_from(["rp-demo", "--short", "--hours", "1", "--time-scale", "60"])
                .unwrap(),
        )
        .unwrap();
        assert_eq!((p.from_hours, p.hours, p.time_scale), (0.5, 1.0, 60.0));
        assert_eq!((p.start_s(), p.end_s()), (1800.0, 5400.0));
        assert!(Args::try_parse_from(["rp-demo", "--time-scale", "0"]).is_err());
        let bad = Args::try_parse_from(["rp-demo", "--hours", "0"]).unwrap();
        assert!(Plan::from_args(&bad).is_err());
    }

    #[test]
    fn the_default_slices_have_jobs() {
        let p = Plan::from_args(&Args::try_parse_from(["rp-demo"]).unwrap()).unwrap();
        let jobs = replay::load_trace(&p.trace).unwrap();
        let d = replay::slice_info(&jobs, p.start_s(), p.end_s());
        assert_eq!((d.jobs, d.groups), (292, 18));
        let s = replay::slice_info(&jobs, SHORT_FROM_HOURS * 3600.0, 2.5 * 3600.0);
        assert_eq!((s.jobs, s.groups), (161, 10));
    }

    #[test]
    fn the_demo_pool_gets_the_url() {
        let p = Plan::from_args(&Args::try_parse_from(["rp-demo"]).unwrap()).unwrap();
        let pool = load_pool(&p.pool, "http://127.0.0.1:4242").unwrap();
        assert_eq!(pool.name, "sim-linux");
        assert_eq!((pool.min_replicas, pool.max_replicas), (3, 40));
        assert!(
            pool.yaml.contains("apiUrl: http://127.0.0.1:4242"),
            "{}",
            pool.yaml
        );
        assert!(!pool.yaml.contains("${"));
    }

    #[test]
    fn formats() {
        assert_eq!(hhmm(0.0), "00:00");
        assert_eq!(hhmm(3599.0), "00:59");
        assert_eq!(hhmm(14.0 * 3600.0 + 24.0 * 60.0 + 5.0), "14:24");
        assert_eq!(human_secs(42.4), "42 s");
        assert_eq!(human_secs(185.0), "3m 05s");
        assert_eq!(human_secs(3720.0), "1h 02m");
    }

    #[test]
    fn operator_log_lines() {
        let mut v = OperatorView::default();
        v.take_line("not json");
        v.take_line(r#"{"level":"INFO","message":"controller started"}"#);
        v.take_line(
            r#"{"level":"INFO","message":"scaler poll","loop_name":"scaler","unclaimed_tasks":4,"running_tasks":2,"desired_vms":6,"replicas":5}"#,
        );
        v.take_line(
            r#"{"level":"ERROR","message":"poll failed","error":"boom","loop_name":"scaler"}"#,
        );
        v.take_line(r#"{"level":"WARN","message":"hm"}"#);
        assert_eq!(v.polls, 1);
        assert_eq!(v.poll_times.len(), 1);
        assert_eq!(
            (v.unclaimed, v.running, v.desired, v.replicas),
            (Some(4), Some(2), Some(6), Some(5))
        );
        assert_eq!((v.errors, v.warnings), (1, 1));
        assert_eq!(v.first_errors, ["poll failed: boom"]);
    }

    #[test]
    fn poll_periods_within_a_window() {
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let times = [at(0.0), at(1.0), at(2.0), at(5.0), at(6.0), at(100.0)];
        let p = poll_periods(&times, at(0.5), at(50.0)).unwrap();
        // 1 -> 2 -> 5 -> 6: periods 1, 3, 1
        assert_eq!((p.p50_wall_s, p.p90_wall_s, p.max_wall_s), (1.0, 3.0, 3.0));
        assert!(poll_periods(&times, at(90.0), at(110.0)).is_none());
    }
}
