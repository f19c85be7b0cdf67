//! The local environment in one process, shared by `rp-env` (which keeps it
//! up for other processes) and `rp-demo` (which runs the operator and a
//! trace against it): the real control plane with the KubeVirt CRDs (plus
//! any extra CRDs), the CircleCI simulator (`CircleCiSimConfig::for_tests()`
//! with the chosen time scale) and the KubeVirt simulator wired to the
//! CircleCI agents with the same time scale, and the namespace
//! [`DEMO_NAMESPACE`] with the two token Secrets a RunnerPool of class
//! `sim-org/linux` refers to.
//!
//! Also the command-line parsers both binaries use for the time scale and
//! the boot latency.

use std::time::Duration;

use anyhow::{Context as _, Result};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use crate::circleci::{CircleCiSim, CircleCiSimConfig, TEST_API_TOKEN, TEST_RUNNER_TOKEN};
use crate::kubevirt::{self, BootLatency, KubeVirtSim, KubeVirtSimConfig};
use crate::{ControlPlane, ControlPlaneOptions, TimeScale};

/// The namespace prepared for an example RunnerPool.
pub const DEMO_NAMESPACE: &str = "ci-runners";
/// Secret (key `token`) with the CircleCI API token.
pub const API_TOKEN_SECRET: &str = "circleci-api";
/// Secret (key `token`) with the runner token of `sim-org/linux`.
pub const RUNNER_TOKEN_SECRET: &str = "sim-linux-runner";

/// How to start a [`LocalEnv`].
#[derive(Clone, Debug)]
pub struct LocalEnvOptions {
    /// Simulated seconds per wall-clock second, in both simulators.
    pub time_scale: f64,
    /// Simulated VMI creation to `Running`.
    pub boot_latency: BootLatency,
    /// Boot latencies and the random scale-in order.
    pub seed: u64,
    /// More CRDs (multi-document YAML) to install with the KubeVirt CRDs,
    /// e.g. the RunnerPool CRD.
    pub extra_crds: Vec<String>,
    /// Field manager of the namespace and Secrets.
    pub field_manager: &'static str,
}

impl Default for LocalEnvOptions {
    fn default() -> Self {
        Self {
            time_scale: 60.0,
            boot_latency: BootLatency::Uniform {
                min: Duration::from_secs(120),
                max: Duration::from_secs(300),
            },
            seed: 0,
            extra_crds: Vec::new(),
            field_manager: "rp-testenv",
        }
    }
}

/// Everything that runs; dropped in field order: simulators, then the
/// control plane (whose `Drop` stops its processes).
pub struct LocalEnv {
    pub kubevirt: KubeVirtSim,
    pub circleci: CircleCiSim,
    pub cp: ControlPlane,
}

impl LocalEnv {
    /// Starts the control plane (with the KubeVirt CRDs and
    /// `opts.extra_crds`), prepares [`DEMO_NAMESPACE`], then starts the
    /// CircleCI and KubeVirt simulators. Needs `init_crypto()` first and the
    /// control-plane binaries (`make tools`).
    pub async fn start(opts: &LocalEnvOptions) -> Result<LocalEnv> {
        let mut crds = vec![kubevirt::crds_yaml().to_string()];
        crds.extend(opts.extra_crds.iter().cloned());
        let cp = ControlPlane::start(ControlPlaneOptions { crds })
            .await
            .context("starting the control plane")?;
        tracing::info!(
            server = cp.server(),
            dir = %cp.dir().display(),
            startup_ms = cp.startup.as_millis() as u64,
            "control plane up (CRDs installed); its logs are in that dir"
        );
        let client = cp.client();
        prepare_demo_namespace(&client, opts.field_manager).await?;

        let circleci =
            CircleCiSim::start(CircleCiSimConfig::for_tests().with_time_scale(opts.time_scale))
                .await
                .context("starting the CircleCI simulator")?;
        let kv_config = KubeVirtSimConfig {
            time_scale: TimeScale(opts.time_scale),
            boot_latency: opts.boot_latency.clone(),
            seed: opts.seed,
            ..KubeVirtSimConfig::default()
        };
        let kubevirt = KubeVirtSim::start(client, kv_config, circleci.guest())
            .await
            .context("starting the KubeVirt simulator")?;
        tracing::info!(config = ?kubevirt.config(), "KubeVirt simulator up");
        Ok(LocalEnv {
            kubevirt,
            circleci,
            cp,
        })
    }

    /// An admin client of the control plane.
    pub fn client(&self) -> Client {
        self.cp.client()
    }

    /// Stops everything in order, logging what the guests did.
    pub fn stop(self) {
        let guests = self.kubevirt.guest_stats();
        tracing::info!(
            ?guests,
            incidents = self.kubevirt.incidents().len(),
            "stopping simulators"
        );
        drop(self.kubevirt);
        drop(self.circleci);
        tracing::info!("stopping the control plane");
        drop(self.cp);
        tracing::info!("stopped");
    }
}

/// The demo namespace and the Secrets an example RunnerPool refers to
/// (`circleci-api` and `sim-linux-runner`, key `token`).
pub async fn prepare_demo_namespace(client: &Client, field_manager: &str) -> Result<()> {
    let pp = PatchParams::apply(field_manager).force();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .patch(
            DEMO_NAMESPACE,
            &pp,
            &Patch::Apply(json!({
                "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": DEMO_NAMESPACE},
            })),
        )
        .await
        .with_context(|| format!("creating namespace {DEMO_NAMESPACE}"))?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), DEMO_NAMESPACE);
    for (name, token, what) in [
        (API_TOKEN_SECRET, TEST_API_TOKEN, "CircleCI API token"),
        (
            RUNNER_TOKEN_SECRET,
            TEST_RUNNER_TOKEN,
            "runner token of sim-org/linux",
        ),
    ] {
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {
                "name": name, "namespace": DEMO_NAMESPACE,
                "annotations": {"rp-env/description": what},
            },
            "type": "Opaque",
            "stringData": {"token": token},
        });
        secrets
            .patch(name, &pp, &Patch::Apply(secret))
            .await
            .with_context(|| format!("creating Secret {DEMO_NAMESPACE}/{name}"))?;
    }
    Ok(())
}

/// `--time-scale`: a positive, finite number.
pub fn parse_time_scale(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if f.is_finite() && f > 0.0 {
        Ok(f)
    } else {
        Err("must be a positive number".into())
    }
}

/// A humantime duration (`30s`, `2m`, `1h30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e}"))
}

/// `--boot-latency`: `30s` (fixed) or `120s..300s` (uniform per VMI).
pub fn parse_boot_latency(s: &str) -> Result<BootLatency, String> {
    match s.split_once("..") {
        None => Ok(BootLatency::Fixed(parse_duration(s)?)),
        Some((lo, hi)) => {
            let (min, max) = (parse_duration(lo)?, parse_duration(hi)?);
            if min > max {
                return Err(format!("{s:?}: the minimum is larger than the maximum"));
            }
            Ok(BootLatency::Uniform { min, max })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_latency_fixed_or_range() {
        assert_eq!(
            parse_boot_latency("30s"),
            Ok(BootLatency::Fixed(Duration::from_secs(30)))
        );
        assert_eq!(
            parse_boot_latency("120s..300s"),
            Ok(BootLatency::Uniform {
                min: Duration::from_secs(120),
                max: Duration::from_secs(300)
            })
        );
        assert_eq!(
            parse_boot_latency("2m .. 5m"),
            Ok(BootLatency::Uniform {
                min: Duration::from_secs(120),
                max: Duration::from_secs(300)
            })
        );
        assert!(parse_boot_latency("300s..120s").is_err());
        assert!(parse_boot_latency("soon").is_err());
    }

    #[test]
    fn time_scale_must_be_positive() {
        assert_eq!(parse_time_scale("60"), Ok(60.0));
        assert!(parse_time_scale("0").is_err());
        assert!(parse_time_scale("-1").is_err());
        assert!(parse_time_scale("inf").is_err());
    }
}
