//! Smoke test of `rp-bench-controller`: 5 RunnerPools, a 5 s steady phase,
//! against the debug operator binary (`cargo test --workspace` builds it; built
//! here when it is missing). Checks that the JSON result is sane, not that
//! targets are met: the numbers come from `make bench-controller` (release).
//! About 40 s.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn repo_root() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    p.canonicalize().unwrap_or(p)
}

/// The debug operator (next to rp-bench-controller), built when missing.
fn operator_binary(root: &Path) -> PathBuf {
    rp_testenv::operator_bin::operator_binary_next_to(
        Path::new(env!("CARGO_BIN_EXE_rp-bench-controller")),
        root,
    )
}

fn num(v: &Value, path: &str) -> f64 {
    v.pointer(path)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("{path} missing or not a number in the result"))
}

#[test]
fn five_pools_give_a_sane_result() {
    let root = repo_root();
    let operator = operator_binary(&root);
    let dir = tempfile::tempdir().expect("temp dir");
    let output = dir.path().join("result.json");
    let log = dir.path().join("bench.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rp-bench-controller"))
        .args(["--pools", "5", "--duration", "5s", "--settle", "1s"])
        .arg("--operator-bin")
        .arg(&operator)
        .arg("--output")
        .arg(&output)
        .arg("--repo-root")
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("rp-bench-controller starts");
    let deadline = Instant::now() + Duration::from_secs(150);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "rp-bench-controller did not finish in 150 s; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut table = String::new();
    if let Some(mut out) = child.stdout.take() {
        use std::io::Read;
        out.read_to_string(&mut table).ok();
    }
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.success(),
        "rp-bench-controller failed ({status})\nstdout:\n{table}\nstderr:\n{stderr}"
    );
    eprintln!("{table}");
    assert!(table.contains("reaction p50 / p99"), "{table}");
    assert!(table.contains("PASS") || table.contains("MISS"), "{table}");

    let r: Value = serde_json::from_str(&std::fs::read_to_string(&output).expect("result file"))
        .expect("result is JSON");
    let ctx = || {
        format!(
            "result:\n{}\ntable:\n{table}",
            serde_json::to_string_pretty(&r).unwrap()
        )
    };
    assert_eq!(r["pools"], 5, "{}", ctx());
    assert_eq!(r["startup"]["all_ready"], true, "{}", ctx());
    assert_eq!(num(&r, "/startup/ready"), 5.0, "{}", ctx());
    assert_eq!(num(&r, "/startup/virtual_machine_pools"), 5.0, "{}", ctx());
    let t = num(&r, "/startup/time_to_all_ready_secs");
    assert!(t > 0.0 && t < 60.0, "time to all ready {t}; {}", ctx());
    assert!(num(&r, "/startup/reconciles") >= 5.0, "{}", ctx());
    let p99 = num(&r, "/startup/reconcile_latency_p99_secs");
    assert!(p99 > 0.0 && p99 < 30.0, "{}", ctx());

    let rss = num(&r, "/steady/rss_mib/max");
    assert!(rss > 1.0 && rss < 1024.0, "RSS {rss} MiB; {}", ctx());
    let cpu = num(&r, "/steady/cpu_cores/mean");
    assert!((0.0..2.5).contains(&cpu), "CPU {cpu}; {}", ctx());
    assert!(
        num(&r, "/steady/circleci_requests_per_sec") > 0.0,
        "{}",
        ctx()
    );
    let calls = num(&r, "/steady/circleci_calls_per_pool_per_interval/mean");
    assert!(
        (1.0..=2.5).contains(&calls),
        "calls per pool per interval {calls}; {}",
        ctx()
    );

    assert_eq!(num(&r, "/reaction/sampled"), 5.0, "{}", ctx());
    assert_eq!(num(&r, "/reaction/reacted"), 5.0, "{}", ctx());
    let p50 = num(&r, "/reaction/p50_secs");
    let p99 = num(&r, "/reaction/p99_secs");
    assert!(
        p50 >= 0.0 && p50 <= p99 && p99 < 30.0,
        "reaction {p50}/{p99}; {}",
        ctx()
    );
    assert_eq!(num(&r, "/kubevirt_incidents"), 0.0, "{}", ctx());
    assert!(
        r["targets"].as_array().is_some_and(|t| t.len() == 5),
        "{}",
        ctx()
    );
    assert!(!r["samples"].as_array().unwrap().is_empty(), "{}", ctx());
}
