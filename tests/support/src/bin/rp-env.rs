//! `rp-env`: the local environment in one long-running process. It starts the
//! real control plane (etcd, kube-apiserver, kube-controller-manager) with the
//! KubeVirt CRDs, the CircleCI simulator and the KubeVirt simulator wired to
//! the simulated runner agents, prepares a demo namespace with the two
//! Secrets a RunnerPool needs, and writes, last and atomically:
//!
//! - `DIR/kubeconfig`: the admin kubeconfig;
//! - `DIR/control-plane.pids`: `name pid` of each control-plane process;
//! - `DIR/env`: shell-sourceable `export` lines (see [`env_file`]).
//!
//! It runs until SIGTERM or SIGINT (or until a control-plane process dies),
//! then removes `DIR/env`, `DIR/kubeconfig` and `DIR/control-plane.pids` and
//! stops everything. Logs go to stderr. Started by `tests/support/env-up.sh`
//! (`make env-up`), stopped by `tests/support/env-down.sh` (`make env-down`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use rp_testenv::ControlPlane;
use rp_testenv::circleci::{TEST_API_TOKEN, TEST_RESOURCE_CLASS, TEST_RUNNER_TOKEN};
use rp_testenv::kubevirt::BootLatency;
use rp_testenv::localenv::{
    DEMO_NAMESPACE, LocalEnv, LocalEnvOptions, parse_boot_latency, parse_time_scale,
};
use tokio::signal::unix::{SignalKind, signal};

const FIELD_MANAGER: &str = "rp-env";

/// The local environment: a real control plane, the KubeVirt simulator and
/// the CircleCI simulator, until SIGTERM/SIGINT.
#[derive(Debug, Parser)]
#[command(name = "rp-env", version)]
struct Args {
    /// Where to write `kubeconfig`, `control-plane.pids` and (last) `env`.
    #[arg(long)]
    dir: PathBuf,
    /// Simulated time runs this many times faster than wall-clock time, in
    /// both simulators (task durations, boot latency, registration delay).
    #[arg(long, default_value_t = 60.0, value_parser = parse_time_scale)]
    time_scale: f64,
    /// Simulated VM boot latency (VMI created to Running): `30s` (fixed) or
    /// `120s..300s` (uniform per VMI).
    #[arg(long, default_value = "120s..300s", value_parser = parse_boot_latency)]
    boot_latency: BootLatency,
    /// Seed of boot latencies and of the random scale-in order (default:
    /// random, logged at start).
    #[arg(long)]
    seed: Option<u64>,
}

/// A value as a POSIX shell word: bare when it is safe, else single-quoted.
fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./:@%+=,-".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The `DIR/env` file: one `export NAME=value` line per variable.
fn env_file(vars: &[(&str, String)]) -> String {
    let mut out = String::from("# Written by rp-env; removed when it stops. Source it.\n");
    for (k, v) in vars {
        out.push_str(&format!("export {k}={}\n", shell_quote(v)));
    }
    out
}

/// Writes `path` through a temporary file in the same directory and a rename.
fn write_atomically(path: &Path, body: &str, mode: u32) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(body.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

async fn start(args: &Args, dir: &Path, seed: u64) -> Result<LocalEnv> {
    let env = LocalEnv::start(&LocalEnvOptions {
        time_scale: args.time_scale,
        boot_latency: args.boot_latency.clone(),
        seed,
        extra_crds: Vec::new(),
        field_manager: FIELD_MANAGER,
    })
    .await?;
    let (cp, circleci) = (&env.cp, &env.circleci);

    let kubeconfig = dir.join("kubeconfig");
    let kc = std::fs::read_to_string(cp.kubeconfig()).context("reading the admin kubeconfig")?;
    write_atomically(&kubeconfig, &kc, 0o600)?;
    let pids: String = cp
        .pids()
        .iter()
        .map(|(n, p)| format!("{n} {p}\n"))
        .collect();
    write_atomically(&dir.join("control-plane.pids"), &pids, 0o644)?;

    let env_text = env_file(&[
        ("KUBECONFIG", kubeconfig.display().to_string()),
        ("CIRCLECI_SIM_URL", circleci.base_url()),
        ("CIRCLECI_SIM_CONTROL_URL", circleci.control_url()),
        ("CIRCLECI_API_TOKEN", TEST_API_TOKEN.to_string()),
        ("CIRCLECI_RUNNER_TOKEN", TEST_RUNNER_TOKEN.to_string()),
        ("CIRCLECI_RESOURCE_CLASS", TEST_RESOURCE_CLASS.to_string()),
        ("RP_TIME_SCALE", args.time_scale.to_string()),
        ("RP_DEMO_NAMESPACE", DEMO_NAMESPACE.to_string()),
        ("RP_CONTROL_PLANE_DIR", cp.dir().display().to_string()),
        ("RP_ENV_PID", std::process::id().to_string()),
    ]);
    write_atomically(&dir.join("env"), &env_text, 0o600)?;
    Ok(env)
}

fn remove_outputs(dir: &Path) {
    for f in [
        "env",
        "env.tmp",
        "kubeconfig",
        "kubeconfig.tmp",
        "control-plane.pids",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
}

/// Waits for SIGTERM or SIGINT, or for a control-plane process to die.
async fn wait_for_shutdown(cp: &mut ControlPlane) -> Result<&'static str> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = term.recv() => return Ok("SIGTERM"),
            _ = int.recv() => return Ok("SIGINT"),
            _ = tick.tick() => {
                let exited = cp.exited();
                if !exited.is_empty() {
                    bail!("control-plane process(es) exited: {exited:?}; see their logs in {}", cp.dir().display());
                }
            }
        }
    }
}

async fn run(args: Args) -> Result<()> {
    rp_testenv::init_crypto();
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let dir = std::fs::canonicalize(&args.dir)?;
    remove_outputs(&dir);
    let seed = args.seed.unwrap_or_else(rand::random);
    tracing::info!(
        dir = %dir.display(),
        time_scale = args.time_scale,
        boot_latency = ?args.boot_latency,
        seed,
        "starting the local environment"
    );

    // A signal during startup stops it too (the partly started parts drop).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let started = tokio::select! {
        r = start(&args, &dir, seed) => r,
        _ = term.recv() => Err(anyhow::anyhow!("SIGTERM during startup")),
        _ = int.recv() => Err(anyhow::anyhow!("SIGINT during startup")),
    };
    drop((term, int));
    let mut env = match started {
        Ok(env) => env,
        Err(e) => {
            remove_outputs(&dir);
            return Err(e);
        }
    };
    tracing::info!(
        env = %dir.join("env").display(),
        circleci = %env.circleci.base_url(),
        "environment up: source the env file; stop with SIGTERM (tests/support/env-down.sh)"
    );

    let result = wait_for_shutdown(&mut env.cp).await;
    match &result {
        Ok(why) => tracing::info!("{why}: shutting down"),
        Err(e) => tracing::error!("{e:#}: shutting down"),
    }
    remove_outputs(&dir);
    env.stop();
    result.map(|_| ())
}

#[tokio::main]
async fn main() -> ExitCode {
    use std::io::IsTerminal as _;
    // kube-client logs every failed request at ERROR, which includes the
    // readiness polls while the apiserver starts; callers report real errors.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,kube_client::client::builder=off")
            }),
        )
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("rp-env failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_file_quotes_only_what_needs_it() {
        let text = env_file(&[
            ("A", "http://127.0.0.1:1234/control".into()),
            ("B", "/tmp/my dir/it's".into()),
            ("C", String::new()),
        ]);
        assert!(
            text.contains("export A=http://127.0.0.1:1234/control\n"),
            "{text}"
        );
        assert!(text.contains(r"export B='/tmp/my dir/it'\''s'"), "{text}");
        assert!(text.contains("export C=''\n"), "{text}");
    }

    #[test]
    fn default_args() {
        let a = Args::try_parse_from(["rp-env", "--dir", "d"]).unwrap();
        assert_eq!(a.time_scale, 60.0);
        assert_eq!(
            a.boot_latency,
            BootLatency::Uniform {
                min: Duration::from_secs(120),
                max: Duration::from_secs(300)
            }
        );
        assert_eq!(a.seed, None);
        assert!(
            Args::try_parse_from(["rp-env"]).is_err(),
            "--dir is required"
        );
    }
}
