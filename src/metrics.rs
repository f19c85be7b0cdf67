//! Prometheus metrics (prometheus-client), served as text on `/metrics`.
//!
//! Per-pool gauges are labelled `namespace` and `pool` and removed when the
//! pool's scaler stops, so deleted RunnerPools leave no stale series.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a per-pool series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// RunnerPool namespace.
    pub namespace: String,
    /// RunnerPool name.
    pub pool: String,
}

impl PoolLabels {
    /// Labels of pool `namespace/pool`.
    pub fn new(namespace: &str, pool: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            pool: pool.to_string(),
        }
    }
}

/// Labels of a CircleCI error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CircleCiErrorLabels {
    /// RunnerPool namespace.
    pub namespace: String,
    /// RunnerPool name.
    pub pool: String,
    /// `unclaimed` or `running`.
    pub endpoint: String,
    /// Error kind (`timeout`, `rate_limited`, `server_error`, ...).
    pub kind: String,
}

/// Labels of a CircleCI call latency observation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    /// `unclaimed` or `running`.
    pub endpoint: String,
}

/// Labels of a reconcile error.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileErrorLabels {
    /// Error label (see `Error::metric_label`).
    pub error: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 5 ms .. ~20 s
    Histogram::new(exponential_buckets(0.005, 2.0, 13))
}

/// All metrics of the operator.
pub struct Metrics {
    registry: Registry,
    /// Unclaimed tasks per pool (last successful poll).
    pub unclaimed_tasks: Family<PoolLabels, Gauge>,
    /// Running tasks per pool (last successful poll).
    pub running_tasks: Family<PoolLabels, Gauge>,
    /// Desired VMs per pool.
    pub desired_replicas: Family<PoolLabels, Gauge>,
    /// `spec.replicas` of each pool's VirtualMachinePool.
    pub replicas: Family<PoolLabels, Gauge>,
    /// Ready VMs per pool.
    pub ready_replicas: Family<PoolLabels, Gauge>,
    /// Unix time of the last successful poll per pool.
    pub last_poll_timestamp: Family<PoolLabels, Gauge>,
    /// Poll cycles per pool.
    pub polls: Family<PoolLabels, Counter>,
    /// CircleCI call failures.
    pub circleci_errors: Family<CircleCiErrorLabels, Counter>,
    /// Writes of `spec.replicas`.
    pub replica_writes: Family<PoolLabels, Counter>,
    /// VMs retired (deleted after their guest powered off).
    pub vms_retired: Family<PoolLabels, Counter>,
    /// CircleCI call latency.
    pub circleci_latency: HistogramFamily<EndpointLabels>,
    /// Reconcile duration.
    pub reconcile_duration: Histogram,
    /// Reconciles.
    pub reconciles: Counter,
    /// Reconcile failures.
    pub reconcile_errors: Family<ReconcileErrorLabels, Counter>,
    /// 1 while this instance holds the leader Lease.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers everything under the `runner_provisioner` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("runner_provisioner");
        let unclaimed_tasks = Family::<PoolLabels, Gauge>::default();
        let running_tasks = Family::<PoolLabels, Gauge>::default();
        let desired_replicas = Family::<PoolLabels, Gauge>::default();
        let replicas = Family::<PoolLabels, Gauge>::default();
        let ready_replicas = Family::<PoolLabels, Gauge>::default();
        let last_poll_timestamp = Family::<PoolLabels, Gauge>::default();
        let polls = Family::<PoolLabels, Counter>::default();
        let circleci_errors = Family::<CircleCiErrorLabels, Counter>::default();
        let replica_writes = Family::<PoolLabels, Counter>::default();
        let vms_retired = Family::<PoolLabels, Counter>::default();
        let circleci_latency: HistogramFamily<EndpointLabels> =
            Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let reconcile_duration = latency_histogram();
        let reconciles = Counter::default();
        let reconcile_errors = Family::<ReconcileErrorLabels, Counter>::default();
        let leader = Gauge::default();

        registry.register(
            "unclaimed_tasks",
            "Unclaimed CircleCI tasks of the pool's resource class",
            unclaimed_tasks.clone(),
        );
        registry.register(
            "running_tasks",
            "Running CircleCI tasks of the pool's resource class",
            running_tasks.clone(),
        );
        registry.register(
            "desired_replicas",
            "VMs the pool should have",
            desired_replicas.clone(),
        );
        registry.register(
            "replicas",
            "spec.replicas of the pool's VirtualMachinePool",
            replicas.clone(),
        );
        registry.register(
            "ready_replicas",
            "Ready VMs of the pool",
            ready_replicas.clone(),
        );
        registry.register(
            "last_poll_timestamp_seconds",
            "Unix time of the last successful CircleCI poll",
            last_poll_timestamp.clone(),
        );
        registry.register("polls", "Scaler poll cycles", polls.clone());
        registry.register(
            "circleci_errors",
            "Failed CircleCI API calls",
            circleci_errors.clone(),
        );
        registry.register(
            "replica_writes",
            "Writes of the pool's spec.replicas",
            replica_writes.clone(),
        );
        registry.register(
            "vms_retired",
            "VMs deleted after their guest powered off",
            vms_retired.clone(),
        );
        registry.register(
            "circleci_request_duration_seconds",
            "CircleCI API call latency",
            circleci_latency.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "RunnerPool reconcile duration",
            reconcile_duration.clone(),
        );
        registry.register("reconciles", "RunnerPool reconciles", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Failed RunnerPool reconciles",
            reconcile_errors.clone(),
        );
        registry.register(
            "leader",
            "1 while this instance holds the leader Lease",
            leader.clone(),
        );

        Self {
            registry,
            unclaimed_tasks,
            running_tasks,
            desired_replicas,
            replicas,
            ready_replicas,
            last_poll_timestamp,
            polls,
            circleci_errors,
            replica_writes,
            vms_retired,
            circleci_latency,
            reconcile_duration,
            reconciles,
            reconcile_errors,
            leader,
        }
    }

    /// Shared handle.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::new())
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Records one CircleCI call.
    pub fn observe_call(&self, endpoint: &str, elapsed: Duration) {
        self.circleci_latency
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a CircleCI failure.
    pub fn count_error(&self, pool: &PoolLabels, endpoint: &str, kind: &str) {
        self.circleci_errors
            .get_or_create(&CircleCiErrorLabels {
                namespace: pool.namespace.clone(),
                pool: pool.pool.clone(),
                endpoint: endpoint.to_string(),
                kind: kind.to_string(),
            })
            .inc();
    }

    /// Records a reconcile.
    pub fn observe_reconcile(&self, elapsed: Duration, error: Option<&str>) {
        self.reconciles.inc();
        self.reconcile_duration.observe(elapsed.as_secs_f64());
        if let Some(e) = error {
            self.reconcile_errors
                .get_or_create(&ReconcileErrorLabels {
                    error: e.to_string(),
                })
                .inc();
        }
    }

    /// Removes every per-pool gauge of `pool` (its counters stay: they are
    /// monotonic by contract).
    pub fn forget_pool(&self, pool: &PoolLabels) {
        for g in [
            &self.unclaimed_tasks,
            &self.running_tasks,
            &self.desired_replicas,
            &self.replicas,
            &self.ready_replicas,
            &self.last_poll_timestamp,
        ] {
            g.remove(pool);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_exposition_has_pool_series_and_histograms() {
        let m = Metrics::new();
        let p = PoolLabels::new("ci", "linux");
        m.unclaimed_tasks.get_or_create(&p).set(4);
        m.desired_replicas.get_or_create(&p).set(6);
        m.polls.get_or_create(&p).inc();
        m.count_error(&p, "running", "rate_limited");
        m.observe_call("unclaimed", Duration::from_millis(20));
        m.observe_reconcile(Duration::from_millis(3), Some("kube"));
        m.leader.set(1);
        let text = m.encode();
        assert!(
            text.contains(r#"runner_provisioner_unclaimed_tasks{namespace="ci",pool="linux"} 4"#),
            "{text}"
        );
        assert!(
            text.contains(r#"runner_provisioner_desired_replicas{namespace="ci",pool="linux"} 6"#),
            "{text}"
        );
        assert!(
            text.contains(r#"runner_provisioner_polls_total{namespace="ci",pool="linux"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"runner_provisioner_circleci_errors_total{namespace="ci",pool="linux",endpoint="running",kind="rate_limited"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"runner_provisioner_circleci_request_duration_seconds_count{endpoint="unclaimed"} 1"#), "{text}");
        assert!(
            text.contains("runner_provisioner_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"runner_provisioner_reconcile_errors_total{error="kube"} 1"#),
            "{text}"
        );
        assert!(text.contains("runner_provisioner_leader 1"), "{text}");
    }

    #[test]
    fn forgetting_a_pool_removes_its_gauges() {
        let m = Metrics::new();
        let p = PoolLabels::new("ci", "gone");
        let q = PoolLabels::new("ci", "kept");
        m.replicas.get_or_create(&p).set(3);
        m.replicas.get_or_create(&q).set(2);
        m.forget_pool(&p);
        let text = m.encode();
        assert!(!text.contains(r#"pool="gone""#), "{text}");
        assert!(
            text.contains(r#"runner_provisioner_replicas{namespace="ci",pool="kept"} 2"#),
            "{text}"
        );
    }
}
