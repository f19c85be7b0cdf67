//! The command line: `run` (the operator), `crd` (print the CRD), `render`
//! (print, offline, what the operator would apply for a RunnerPool).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::crd::{RunnerPool, validate};
use crate::http::{self, Health, HttpConfig};
use crate::leader::{self, Elector, LeaseConfig};
use crate::metrics::Metrics;
use crate::resources::{
    ResolvedSecrets, USERDATA_KEY, secret_name, user_data_secret, virtual_machine_pool,
};
use crate::telemetry::{self, LogFormat};
use crate::{controller, crd};

/// runner-provisioner: keeps CircleCI self-hosted machine runners available
/// as KubeVirt VMs, sized to the CircleCI task queue.
#[derive(Debug, Parser)]
#[command(name = "runner-provisioner", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator (reads KUBECONFIG or the in-cluster config).
    Run(RunArgs),
    /// Print the RunnerPool CustomResourceDefinition as YAML.
    Crd,
    /// Print, without a cluster, the Secret and the VirtualMachinePool the
    /// operator would apply for a RunnerPool manifest.
    Render(RenderArgs),
    /// Replay a CI job trace in virtual time through the scaling policy the
    /// operator runs, and report job waits and VM-hours.
    Simulate(SimulateArgs),
}

/// `simulate` options.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The trace: CSV lines `arrival_s,duration_s[,group]` sorted by arrival.
    #[arg(long)]
    pub trace: PathBuf,
    /// The RunnerPool whose `spec.scaling` to replay.
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// `operator`: the RunnerPool's scaling spec; `reference`: CircleCI's
    /// clamp(unclaimed + running, min, max).
    #[arg(long, value_enum, default_value = "operator")]
    pub policy: crate::sim::PolicyChoice,
    /// VM boot time: a duration or a uniform range `MIN..MAX`.
    #[arg(long, default_value = "120s..300s")]
    pub boot_time: String,
    /// Poll interval.
    #[arg(long, default_value = "5s", value_parser = duration)]
    pub poll: Duration,
    /// Seed of the boot times.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Replay only the first DAYS days of the trace.
    #[arg(long)]
    pub days: Option<f64>,
    /// Write the result (and the timeline) as JSON here.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Write a PNG plot of queue, running, VMs and replicas over time here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// Parses `120s..300s` or `200s`.
pub fn boot_range(s: &str) -> Result<(Duration, Duration), String> {
    match s.split_once("..") {
        Some((a, b)) => {
            let (a, b) = (duration(a.trim())?, duration(b.trim())?);
            if a > b {
                return Err(format!(
                    "boot time range {s:?}: the minimum is above the maximum"
                ));
            }
            Ok((a, b))
        }
        None => {
            let d = duration(s.trim())?;
            Ok((d, d))
        }
    }
}

/// The `simulate` subcommand: prints a summary table; optionally writes JSON
/// and a plot.
pub fn simulate(a: &SimulateArgs) -> Result<String, String> {
    let text = std::fs::read_to_string(&a.trace)
        .map_err(|e| format!("cannot read {}: {e}", a.trace.display()))?;
    let jobs = crate::sim::parse_trace(&text)?;
    let pool_text = std::fs::read_to_string(&a.file)
        .map_err(|e| format!("cannot read {}: {e}", a.file.display()))?;
    let pool = parse_runner_pool(&pool_text)?;
    let spec = validate(&pool.spec)
        .map_err(|errs| format!("invalid RunnerPool:\n  {}", errs.join("\n  ")))?;
    let (boot_min, boot_max) = boot_range(&a.boot_time)?;
    let opts = crate::sim::SimOptions {
        poll: a.poll,
        boot_min,
        boot_max,
        seed: a.seed,
        horizon: a.days.map(|d| Duration::from_secs_f64(d * 86400.0)),
        sample_every: (a.output.is_some() || a.plot.is_some()).then(|| Duration::from_secs(60)),
        ..Default::default()
    };
    let r = crate::sim::simulate(&jobs, &spec, a.policy, &opts);
    if let Some(p) = &a.output {
        let json = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
        std::fs::write(p, json).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    if let Some(p) = &a.plot {
        crate::sim::plot::write_png(&r, p)?;
    }
    Ok(crate::sim::table(&[(
        &format!("{:?}", a.policy).to_lowercase(),
        &r,
    )]))
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

/// `run` options. Every option can also be set by an environment variable.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Watch RunnerPools in this namespace only (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Log format on stderr.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Address of `/ready` (and `/metrics` unless --metrics-addr is set).
    #[arg(long, env = "READY_ADDR", default_value = "0.0.0.0:8000")]
    pub ready_addr: SocketAddr,
    /// Address of `/live`.
    #[arg(long, env = "LIVE_ADDR", default_value = "0.0.0.0:8001")]
    pub live_addr: SocketAddr,
    /// A separate address for `/metrics`.
    #[arg(long, env = "METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Timeout of each CircleCI API call.
    #[arg(long, env = "CIRCLECI_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub circleci_timeout: Duration,
    /// RunnerPools reconciled at once.
    #[arg(long, env = "CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
    /// CircleCI API requests per second per API host, shared by every pool
    /// (each poll is 2 requests; 1,000 pools polling every 5 s need 400/s).
    /// A 429 with Retry-After pauses all pools of that host.
    #[arg(long, env = "CIRCLECI_MAX_RPS", default_value_t = 500.0)]
    pub circleci_max_rps: f64,
    /// Elect a leader through a Lease (needed with more than one replica).
    #[arg(long, env = "LEADER_ELECTION", default_value_t = true, action = ArgAction::Set)]
    pub leader_election: bool,
    /// Namespace of the Lease (default: $POD_NAMESPACE, else the watched
    /// namespace, else `default`).
    #[arg(long, env = "LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Name of the Lease.
    #[arg(long, env = "LEASE_NAME", default_value = "runner-provisioner")]
    pub lease_name: String,
    /// This instance's identity in the Lease (default: $POD_NAME, else
    /// hostname-pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long the Lease is valid after a renewal.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = duration)]
    pub lease_duration: Duration,
    /// The leader gives up when it could not renew for this long.
    #[arg(long, env = "LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = duration)]
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby retries.
    #[arg(long, env = "LEASE_RETRY_PERIOD", default_value = "2s", value_parser = duration)]
    pub retry_period: Duration,
}

/// `render` options.
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// The RunnerPool manifest (YAML; the first RunnerPool document is used).
    #[arg(short = 'f', long)]
    pub file: PathBuf,
    /// A file with the resource class token to put in the user-data (default:
    /// a placeholder).
    #[arg(long)]
    pub runner_token_file: Option<PathBuf>,
    /// A file with the userData script when the pool reads it from a Secret.
    #[arg(long)]
    pub user_data_file: Option<PathBuf>,
    /// Print only the decoded cloud-init user-data.
    #[arg(long)]
    pub user_data: bool,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => {
            print!("{}", crd::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Simulate(a) => match simulate(&a) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("runner-provisioner simulate: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Render(a) => match render(&a) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("runner-provisioner render: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(a) => {
            telemetry::init(a.log_format);
            let _ = rustls::crypto::ring::default_provider().install_default();
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(run(a)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "runner-provisioner stopped");
                    eprintln!("runner-provisioner: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn signal_stop() -> CancellationToken {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut t) => {
                    t.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        tracing::info!("signal received: shutting down");
        s.cancel();
    });
    stop
}

/// The operator.
pub async fn run(a: RunArgs) -> Result<(), String> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| format!("no Kubernetes configuration (KUBECONFIG or in-cluster): {e}"))?;
    controller::preflight(&client, a.namespace.as_deref())
        .await
        .map_err(|e| e.to_string())?;

    let metrics = Metrics::shared();
    let health = Health::shared();
    let stop = signal_stop();
    let servers = http::serve(
        &HttpConfig {
            ready_addr: a.ready_addr,
            live_addr: a.live_addr,
            metrics_addr: a.metrics_addr,
        },
        health.clone(),
        metrics.clone(),
        stop.clone(),
    )
    .await
    .map_err(|e| e.to_string())?;
    tracing::info!(ready = %servers.ready_addr, live = %servers.live_addr, metrics = %servers.metrics_addr, "serving probes and metrics");

    let identity = a.identity.clone().unwrap_or_else(leader::default_identity);
    let opts = controller::Options {
        namespace: a.namespace.clone(),
        circleci_timeout: a.circleci_timeout,
        concurrency: a.concurrency.max(1),
        identity: identity.clone(),
        circleci_max_rps: a.circleci_max_rps,
    };

    if !a.leader_election {
        health.set_leader(true);
        metrics.leader.set(1);
        return controller::run(client, opts, metrics, health, stop)
            .await
            .map_err(|e| e.to_string());
    }

    let lease_ns = a
        .lease_namespace
        .clone()
        .or_else(|| {
            std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|s| !s.is_empty())
        })
        .or_else(|| a.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let cfg = LeaseConfig {
        lease_duration: a.lease_duration,
        renew_deadline: a.renew_deadline,
        retry_period: a.retry_period,
        ..LeaseConfig::new(&lease_ns, &a.lease_name, &identity)
    };
    let elector = Elector::new(client.clone(), cfg).map_err(|e| e.to_string())?;
    let h = health.clone();
    let Some(leadership) = elector
        .acquire(&stop, move |ok| h.set_standby_ok(ok))
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    health.set_leader(true);
    metrics.leader.set(1);

    let release = CancellationToken::new();
    let ctrl_stop = CancellationToken::new();
    let mut hold = tokio::spawn({
        let release = release.clone();
        async move { leadership.hold(&release).await }
    });
    let mut ctrl = tokio::spawn(controller::run(
        client,
        opts,
        metrics.clone(),
        health.clone(),
        ctrl_stop.clone(),
    ));
    let stopping = stop.clone();
    tokio::select! {
        _ = stopping.cancelled() => {
            // Stop acting first, then give the Lease up for a standby.
            ctrl_stop.cancel();
            let r = (&mut ctrl).await;
            release.cancel();
            let _ = hold.await;
            flatten(r)
        }
        r = &mut hold => {
            // Lost the Lease: stop acting at once and exit; Kubernetes
            // restarts the pod as a standby.
            ctrl.abort();
            health.set_leader(false);
            metrics.leader.set(0);
            match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("lease task failed: {e}")),
            }
        }
        r = &mut ctrl => {
            release.cancel();
            let _ = hold.await;
            flatten(r)
        }
    }
}

fn flatten(r: Result<crate::error::Result<()>, tokio::task::JoinError>) -> Result<(), String> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => Err(format!("controller task failed: {e}")),
    }
}

/// Placeholder for the runner token when `render` is not given one.
pub const RENDER_TOKEN_PLACEHOLDER: &str = "<resource-class-token>";

/// What `render` prints: the cloud-init Secret and the VirtualMachinePool
/// (or only the decoded user-data).
pub fn render(a: &RenderArgs) -> Result<String, String> {
    let text = std::fs::read_to_string(&a.file)
        .map_err(|e| format!("cannot read {}: {e}", a.file.display()))?;
    let mut pool = parse_runner_pool(&text)?;
    if let Err(errs) = validate(&pool.spec) {
        return Err(format!("invalid RunnerPool:\n  {}", errs.join("\n  ")));
    }
    let meta = &mut pool.metadata;
    meta.namespace.get_or_insert_with(|| "default".into());
    meta.uid
        .get_or_insert_with(|| "00000000-0000-0000-0000-000000000000".into());
    let name = meta
        .name
        .clone()
        .ok_or_else(|| "the RunnerPool has no metadata.name".to_string())?;
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
    };
    let runner_token = match &a.runner_token_file {
        Some(p) => read(p)?.trim().to_string(),
        None => RENDER_TOKEN_PLACEHOLDER.to_string(),
    };
    let user_data = match &a.user_data_file {
        Some(p) => Some(read(p)?),
        None => pool
            .spec
            .user_data_secret_ref
            .as_ref()
            .map(|r| format!("# userData from Secret {} key {}\n", r.name, r.key)),
    };
    let resolved = ResolvedSecrets {
        runner_token,
        user_data,
    };
    let secret = user_data_secret(&pool, &resolved).map_err(|e| e.to_string())?;
    if a.user_data {
        let data = secret.data.as_ref().and_then(|d| d.get(USERDATA_KEY));
        return Ok(data
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default());
    }
    let vmp = virtual_machine_pool(
        &pool,
        &secret_name(&name),
        Some(pool.spec.scaling.min_replicas.max(0)),
    )
    .map_err(|e| e.to_string())?;
    let secret = serde_norway::to_string(&secret).map_err(|e| e.to_string())?;
    let vmp = serde_norway::to_string(&vmp).map_err(|e| e.to_string())?;
    Ok(format!("---\n{secret}---\n{vmp}"))
}

/// The first `RunnerPool` document of a (multi-document) YAML file.
pub fn parse_runner_pool(text: &str) -> Result<RunnerPool, String> {
    let mut last_err = None;
    for doc in serde_norway::Deserializer::from_str(text) {
        let v: serde_json::Value = match serde::Deserialize::deserialize(doc) {
            Ok(v) => v,
            Err(e) => return Err(format!("not YAML: {e}")),
        };
        if v["kind"] != "RunnerPool" {
            continue;
        }
        match serde_json::from_value::<RunnerPool>(v) {
            Ok(p) => return Ok(p),
            Err(e) => last_err = Some(e.to_string()),
        }
    }
    Err(last_err.map_or_else(
        || "no RunnerPool document in the file".to_string(),
        |e| format!("not a valid RunnerPool: {e}"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_parses_run_defaults_and_overrides() {
        let c = Cli::try_parse_from(["runner-provisioner", "run"]).unwrap();
        let Command::Run(r) = c.command else {
            panic!("run")
        };
        assert!(r.leader_election);
        assert_eq!(r.ready_addr.port(), 8000);
        assert_eq!(r.live_addr.port(), 8001);
        assert_eq!(r.lease_duration, Duration::from_secs(15));
        let c = Cli::try_parse_from([
            "runner-provisioner",
            "run",
            "--namespace",
            "ci",
            "--leader-election",
            "false",
            "--lease-duration",
            "4s",
        ])
        .unwrap();
        let Command::Run(r) = c.command else {
            panic!("run")
        };
        assert_eq!(r.namespace.as_deref(), Some("ci"));
        assert!(!r.leader_election);
        assert_eq!(r.lease_duration, Duration::from_secs(4));
    }

    fn write(dir: &std::path::Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn render_prints_the_secret_and_the_pool_offline() {
        let dir = std::env::temp_dir().join(format!("rp-render-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = write(
            &dir,
            "p.yaml",
            include_str!("../examples/runnerpool-minimal.yaml"),
        );
        let out = render(&RenderArgs {
            file: f.clone(),
            runner_token_file: None,
            user_data_file: None,
            user_data: false,
        })
        .unwrap();
        assert!(out.contains("kind: Secret"), "{out}");
        assert!(out.contains("kind: VirtualMachinePool"), "{out}");
        assert!(out.contains("unmanaged"), "{out}");
        let tok = write(&dir, "tok", "rct_RENDERED_TOKEN\n");
        let ud = render(&RenderArgs {
            file: f,
            runner_token_file: Some(tok),
            user_data_file: None,
            user_data: true,
        })
        .unwrap();
        assert!(ud.starts_with("#cloud-config"), "{ud}");
        let bad = write(
            &dir,
            "bad.yaml",
            "apiVersion: runners.provisioner.dev/v1alpha1\nkind: RunnerPool\nmetadata: {name: x}\nspec:\n  resourceClass: NOPE\n  circleci: {apiTokenSecretRef: {name: a}, runnerTokenSecretRef: {name: b}}\n  scaling: {minReplicas: 3, maxReplicas: 1}\n",
        );
        let e = render(&RenderArgs {
            file: bad,
            runner_token_file: None,
            user_data_file: None,
            user_data: false,
        })
        .unwrap_err();
        assert!(
            e.contains("spec.resourceClass") && e.contains("minReplicas"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
