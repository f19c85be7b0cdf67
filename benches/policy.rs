//! `make bench` part 1: policy quality on the real bitcoin/bitcoin trace.
//! Prints a table and writes `target/bench/policy.json`.
//!
//! Environment: `RP_TRACE` (default ../shared/traces/bitcoin-core-gha.csv,
//! else the demo's copy), `RP_BENCH_DAYS` (default 7), `RP_BENCH_SEED`.

use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let trace = std::env::var_os("RP_TRACE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let shared = root.join("../shared/traces/bitcoin-core-gha.csv");
            if shared.exists() {
                shared
            } else {
                root.join("demo/traces/bitcoin-core-gha-3d.csv")
            }
        });
    let days: f64 = std::env::var("RP_BENCH_DAYS")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(7.0);
    let seed: u64 = std::env::var("RP_BENCH_SEED")
        .ok()
        .and_then(|d| d.parse().ok())
        .unwrap_or(1);
    let text = std::fs::read_to_string(&trace).unwrap_or_else(|e| {
        panic!(
            "cannot read the trace {}: {e} (set RP_TRACE)",
            trace.display()
        )
    });
    let jobs = runner_provisioner::sim::parse_trace(&text).expect("the trace parses");
    let t = std::time::Instant::now();
    let report = runner_provisioner::sim::bench::run(&jobs, days, true, seed);
    println!(
        "trace: {} ({} jobs), boot 120s..300s, poll 5s, seed {seed}",
        trace.display(),
        jobs.len()
    );
    print!("{}", runner_provisioner::sim::bench::table(&report));
    println!(
        "({} replays in {:.1} s)",
        report.reference.len() + report.operator.len(),
        t.elapsed().as_secs_f64()
    );
    let out = root.join("target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    let path = out.join("policy.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report).expect("json")).expect("write");
    println!("wrote {}", path.display());
    assert!(!report.any_busy_killed, "a policy killed a busy VM");
}
