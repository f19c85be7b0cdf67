//! The operator binary for tests that run it as a process.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `runner-provisioner` in the same directory as `sibling` (a test's
/// `env!("CARGO_BIN_EXE_...")`, so the profile and target directory match),
/// built with `cargo build -p runner-provisioner --bin runner-provisioner`
/// in `repo` when it is missing. Panics with the command to run otherwise.
pub fn operator_binary_next_to(sibling: &Path, repo: &Path) -> PathBuf {
    let bin = sibling
        .parent()
        .expect("a binary has a directory")
        .join("runner-provisioner");
    if bin.is_file() {
        return bin;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("{} is missing; building it", bin.display());
    let status = Command::new(&cargo)
        .args([
            "build",
            "-p",
            "runner-provisioner",
            "--bin",
            "runner-provisioner",
        ])
        .current_dir(repo)
        .status()
        .unwrap_or_else(|e| panic!("running {cargo:?} build: {e}"));
    assert!(
        status.success() && bin.is_file(),
        "the operator binary {} is missing and `cargo build -p runner-provisioner \
         --bin runner-provisioner` (in {}) did not produce it ({status}); build it first",
        bin.display(),
        repo.display(),
    );
    bin
}

/// SIGTERM `child`, wait up to `grace` for it to exit (a graceful shutdown),
/// then SIGKILL it. Returns how it exited, `None` if waiting failed.
pub fn terminate(
    mut child: std::process::Child,
    grace: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().ok()
}
