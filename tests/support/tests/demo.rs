//! `rp-demo --short` end to end: the real control plane, both simulators, the
//! operator binary and two simulated hours of the bitcoin/bitcoin trace with a
//! burst. Checks the summary it writes: every job finished, none killed, and
//! the measurements are there. About a minute of wall time.
//!
//! Needs the operator binary next to rp-demo (`target/debug/runner-provisioner`);
//! it is built here when missing.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
/// rp-demo gives up by itself well before this.
const TIMEOUT: Duration = Duration::from_secs(180);

fn operator_bin() -> PathBuf {
    rp_testenv::operator_bin::operator_binary_next_to(
        Path::new(env!("CARGO_BIN_EXE_rp-demo")),
        Path::new(REPO),
    )
}

#[test]
fn short_demo_runs_every_job_and_kills_none() {
    let operator = operator_bin();
    let dir = tempfile::tempdir().expect("temp dir");
    let summary_path = dir.path().join("summary.json");
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rp-demo"))
        .arg("--short")
        .arg("--summary-json")
        .arg(&summary_path)
        .arg("--operator-bin")
        .arg(&operator)
        .arg("--log-dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rp-demo starts");
    // Drain the pipes in threads so a full pipe never blocks rp-demo.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if t.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let wall = t.elapsed();
    let (stdout, stderr) = (out_t.join().unwrap(), err_t.join().unwrap());
    let log = std::fs::read_to_string(dir.path().join("operator.log")).unwrap_or_default();
    let log_tail: Vec<&str> = log.lines().rev().take(20).collect();
    let context = format!(
        "rp-demo {status:?} after {wall:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- operator log (last lines, newest first)\n{}",
        log_tail.join("\n")
    );
    let status =
        status.unwrap_or_else(|| panic!("rp-demo did not finish within {TIMEOUT:?}\n{context}"));
    assert!(status.success(), "rp-demo failed\n{context}");
    eprintln!("{stdout}");

    let text = std::fs::read_to_string(&summary_path)
        .unwrap_or_else(|e| panic!("reading the summary: {e}\n{context}"));
    let s: Value = serde_json::from_str(&text).expect("summary is JSON");
    let jobs = &s["jobs"];
    let n = jobs["jobs"].as_u64().unwrap();
    assert!(n > 0, "{text}");
    assert_eq!(
        s["slice"]["jobs"].as_u64(),
        Some(n),
        "every job of the slice arrived: {text}"
    );
    assert_eq!(
        jobs["finished"].as_u64(),
        Some(n),
        "every job finished: {text}"
    );
    assert_eq!(jobs["killed"].as_u64(), Some(0), "no task killed: {text}");
    assert_eq!(s["ok"], true, "{text}");
    assert_eq!(s["all_finished"], true, "{text}");
    let p95 = jobs["wait"]["p95"].as_f64().expect("a p95 wait");
    assert!(p95.is_finite() && p95 >= 0.0, "{text}");
    let vm_hours = s["vm"]["vm_hours"].as_f64().unwrap();
    assert!(vm_hours > 0.0, "{text}");
    // The VMs ran the jobs: at least the busy time, and not absurdly more.
    let busy = jobs["busy_hours"].as_f64().unwrap();
    assert!(
        vm_hours >= busy * 0.99,
        "VM-hours {vm_hours} < busy {busy}: {text}"
    );
    assert!(s["operator"]["polls"].as_u64().unwrap() > 0, "{text}");
    assert_eq!(s["drain"]["pool_deleted"], true, "{text}");
    assert_eq!(s["drain"]["vms_left"].as_u64(), Some(0), "{text}");
}
