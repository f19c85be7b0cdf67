//! Smoke runs of the benchmarks (so they cannot rot): the policy benchmark
//! on one day of the demo's trace copy, and `simulate` end to end.

use std::process::Command;

use runner_provisioner::sim::{self, bench};

fn demo_trace() -> Vec<sim::Job> {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/demo/traces/bitcoin-core-gha-3d.csv"
    );
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    sim::parse_trace(&text).expect("the demo trace parses")
}

#[test]
fn policy_benchmark_smoke() {
    let jobs = demo_trace();
    let r = bench::run(&jobs, 1.0, false, 1);
    assert_eq!(r.reference.len(), 10);
    assert!(!r.any_busy_killed, "no policy kills a busy VM");
    let def = r
        .reference
        .iter()
        .find(|p| p.label == r.reference_default)
        .unwrap();
    assert!(def.result.jobs > 100, "{}", def.result.jobs);
    assert!(
        def.result.wait_secs.mean > 60.0,
        "the reference waits for boots"
    );
    // More warm VMs: less waiting, more VM-hours.
    let min0 = &r.reference[0].result;
    let min40 = &r.reference[8].result;
    assert!(min40.wait_secs.mean < min0.wait_secs.mean);
    assert!(min40.vm_hours > min0.vm_hours);
    // burstPercent 0 is the reference at min 0, exactly.
    let b0 = r
        .operator
        .iter()
        .find(|p| p.label.starts_with("burst=0% idle=10m"))
        .unwrap();
    assert_eq!(b0.result.wait_secs, min0.wait_secs);
    let text = bench::table(&r);
    assert!(
        text.contains("dominated by") && text.contains("Busy VMs killed: 0"),
        "{text}"
    );
}

#[test]
fn simulate_subcommand_writes_json_and_a_png() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool.yaml");
    std::fs::write(
        &pool,
        "apiVersion: runners.provisioner.dev/v1alpha1\nkind: RunnerPool\nmetadata: {name: p}\nspec:\n  resourceClass: a/b\n  circleci: {apiTokenSecretRef: {name: a}, runnerTokenSecretRef: {name: b}}\n  scaling: {maxReplicas: 100, burstPercent: 100}\n",
    )
    .unwrap();
    let out = dir.path().join("r.json");
    let png = dir.path().join("r.png");
    let o = Command::new(env!("CARGO_BIN_EXE_runner-provisioner"))
        .args(["simulate", "--trace"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/demo/traces/bitcoin-core-gha-3d.csv"
        ))
        .arg("-f")
        .arg(&pool)
        .args([
            "--days",
            "0.5",
            "--boot-time",
            "120s..300s",
            "--seed",
            "3",
            "--output",
        ])
        .arg(&out)
        .arg("--plot")
        .arg(&png)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("p95 s") && table.contains("operator"),
        "{table}"
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    assert_eq!(r["busy_vms_killed"], 0);
    assert!(r["jobs"].as_u64().unwrap() > 0);
    assert!(!r["timeline"].as_array().unwrap().is_empty());
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[1..4], b"PNG");
}
