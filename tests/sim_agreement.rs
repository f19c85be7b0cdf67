//! The trace simulator agrees with the operator: the same 40-minute slice of
//! the bitcoin/bitcoin trace (51 jobs in 3 runs) replayed (1) end to end,
//! the real operator against the real control plane and the KubeVirt and
//! CircleCI simulators at 30x, and (2) through `runner_provisioner::sim` in
//! virtual time with the same policy, boot times and poll period (the
//! operator polls every 1 s wall = 30 s simulated).
//!
//! Stated tolerance, from what differs between the two on purpose: the
//! end-to-end run adds the runner's registration delay (5 s), API and watch
//! latencies (tenths of a wall second = several simulated seconds each) and
//! draws its own boot times. Mean wait: within 30% + 45 s of the simulator's;
//! VM-hours: within 35%; both: zero busy VMs killed, every job claimed.

mod operator_common;

use std::time::Duration;

use operator_common::*;
use rp_testenv::circleci::TEST_RESOURCE_CLASS;
use rp_testenv::replay::{self, VmHoursMeter};
use runner_provisioner::crd::{CONDITION_READY, RunnerPool, validate};
use runner_provisioner::sim::{self, PolicyChoice, SimOptions};

/// Simulated seconds per wall second.
const SCALE: f64 = 30.0;
const FROM: f64 = 600.0;
const TO: f64 = 3000.0;
const TRACE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/demo/traces/bitcoin-core-gha-3d.csv"
);

#[tokio::test]
async fn simulator_and_operator_agree_on_a_trace_slice() {
    let env = env_with(Duration::from_secs(120), Duration::from_secs(300), SCALE).await;
    let _op = env.operator("op", &["--leader-election", "false"]);
    let mut m = pool_manifest("agree", &env.circleci.base_url(), 0, 80);
    m["spec"]["scaling"]["burstPercent"] = serde_json::json!(50);
    let spec: RunnerPool = serde_json::from_value(m.clone()).unwrap();
    let spec = validate(&spec.spec).expect("valid");
    env.apply_pool(m).await;
    eventually("Ready", Duration::from_secs(60), || async {
        let p = env.pools().get("agree").await.map_err(|e| e.to_string())?;
        let ok = p
            .status
            .as_ref()
            .and_then(|s| s.condition(CONDITION_READY))
            .is_some_and(|c| c.status == "True");
        ok.then_some(()).ok_or("not ready".to_string())
    })
    .await;

    // (1) End to end.
    let meter = VmHoursMeter::start(env.client.clone(), Some(NS), SCALE);
    meter
        .wait_synced(Duration::from_secs(30))
        .await
        .expect("meter");
    let before = meter.snapshot();
    let jobs = replay::load_trace(std::path::Path::new(TRACE)).expect("trace");
    let report = replay::replay(&env.circleci, TEST_RESOURCE_CLASS, &jobs, SCALE, FROM, TO)
        .await
        .expect("replay");
    let window_end = report.start_sim_s + (TO - FROM);
    while env.circleci.now_simulated().as_secs_f64() < window_end {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e2e_hours = meter.snapshot().since(&before).vm_hours;
    let summary = eventually("every job claimed", Duration::from_secs(180), || async {
        let s = replay::summary(&env.circleci.ledger(), Some(TEST_RESOURCE_CLASS));
        (s.jobs == report.enqueued && s.queued == 0)
            .then_some(s.clone())
            .ok_or(format!("{s:?}"))
    })
    .await;
    assert_eq!(summary.killed, 0, "no job killed");
    let e2e_mean = summary.wait.as_ref().expect("waits").mean;

    // (2) The simulator, same slice (shifted to start at 0), same policy.
    let text = std::fs::read_to_string(TRACE).unwrap();
    let slice: Vec<sim::Job> = sim::parse_trace(&text)
        .unwrap()
        .into_iter()
        .filter(|j| (FROM..TO).contains(&j.arrival))
        .map(|j| sim::Job {
            arrival: j.arrival - FROM,
            duration: j.duration,
        })
        .collect();
    assert_eq!(slice.len(), report.enqueued);
    let r = sim::simulate(
        &slice,
        &spec,
        PolicyChoice::Operator,
        &SimOptions {
            poll: Duration::from_secs(SCALE as u64),
            boot_min: Duration::from_secs(120),
            boot_max: Duration::from_secs(300),
            horizon: Some(Duration::from_secs_f64(TO - FROM)),
            seed: 5,
            ..Default::default()
        },
    );
    assert_eq!(r.busy_vms_killed, 0);
    let sim_mean = r.wait_secs.mean;
    eprintln!(
        "mean wait: operator {e2e_mean:.1} s, simulator {sim_mean:.1} s; VM-hours: operator {e2e_hours:.2}, simulator {:.2}",
        r.vm_hours
    );
    assert!(
        (e2e_mean - sim_mean).abs() <= 0.3 * sim_mean + 45.0,
        "mean wait: operator {e2e_mean:.1} s vs simulator {sim_mean:.1} s"
    );
    assert!(
        (e2e_hours - r.vm_hours).abs() <= 0.35 * r.vm_hours,
        "VM-hours: operator {e2e_hours:.2} vs simulator {:.2}",
        r.vm_hours
    );
}
