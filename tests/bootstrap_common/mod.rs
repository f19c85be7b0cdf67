//! Shared by the `bootstrap_*` integration tests: the user-data variants,
//! cloud-init's own YAML parser (PyYAML, as cloud-init uses it), tool checks
//! and temporary directories.
#![allow(dead_code)] // each test crate uses a part of this module

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use base64::Engine;
use runner_provisioner::cloudinit::{BootstrapConfig, DEFAULT_API_URL};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Setup commands to print when something is missing.
pub const SETUP_HINT: &str = "apt-get install -y shellcheck debootstrap e2fsprogs python3-yaml \
     && scripts/bootstrap-test/build-rootfs.sh";

/// Fails the test, with an install hint, when `tool` is not on PATH (or in
/// the sbin directories).
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(tool);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "`{tool}` not found: apt-get install -y {package}  (all bootstrap test prerequisites: {SETUP_HINT})"
    );
}

/// Values that break naive quoting in shell, YAML 1.1 and YAML 1.2.
pub const HOSTILE: &str = "it's \"quoted\" $(touch /pwned) `touch /pwned` ${HOME} $HOME \\ \\n\n\
key: value\n- item\n# comment\n&anchor *alias !!python/object:os.system [yes, on, ~, null]\n\
{a: b} | > % @ 1:20 0x1F 0o17 1_000 2001-12-14 .inf <<: *x \u{2028} \u{85} \r\n\ttab  trailing  ";

/// Scalars that a YAML 1.1 parser (cloud-init's PyYAML) reads as non-strings.
pub const YAML11_SPECIALS: &[&str] = &[
    "yes",
    "no",
    "on",
    "off",
    "y",
    "n",
    "~",
    "null",
    "true",
    "1:20",
    "0x1F",
    "0o17",
    "017",
    "1_000",
    ".inf",
    "2001-12-14",
    "<<",
    "=",
    "",
];

/// The variants of user-data the golden and shellcheck tests cover.
pub fn variants() -> Vec<(&'static str, BootstrapConfig)> {
    let base = BootstrapConfig {
        runner_token: "0123456789abcdef0123456789abcdef".into(),
        api_url: DEFAULT_API_URL.into(),
        bundle: true,
        ..Default::default()
    };
    vec![
        ("bundle-default", base.clone()),
        (
            "repository",
            BootstrapConfig {
                bundle: false,
                ..base.clone()
            },
        ),
        (
            "server-idle-timeout",
            BootstrapConfig {
                api_url: "https://circleci.example.com".into(),
                idle_timeout: Some("10m".into()),
                ..base.clone()
            },
        ),
        (
            "user-data",
            BootstrapConfig {
                user_script: Some(
                    "set -euo pipefail\napt-get update\napt-get install -y jq\n".into(),
                ),
                ..base.clone()
            },
        ),
        (
            "runner-options",
            BootstrapConfig {
                working_directory: Some("/var/lib/circleci-runner/workdir".into()),
                command_prefix: Some(
                    ["sudo", "-niHu", "circleci", "--"]
                        .map(String::from)
                        .to_vec(),
                ),
                max_run_time: Some("2h".into()),
                grant_sudo: true,
                install_timeout: Some(Duration::from_secs(300)),
                ..base.clone()
            },
        ),
        (
            "hostile",
            BootstrapConfig {
                runner_token: HOSTILE.into(),
                api_url: HOSTILE.into(),
                idle_timeout: Some(HOSTILE.into()),
                working_directory: Some(HOSTILE.into()),
                command_prefix: Some(vec![HOSTILE.into(), "yes".into(), "1:20".into()]),
                max_run_time: Some(HOSTILE.into()),
                user_script: Some(HOSTILE.into()),
                grant_sudo: false,
                bundle: true,
                install_timeout: None,
            },
        ),
    ]
}

fn python_yaml_available() -> bool {
    Command::new("python3")
        .args(["-c", "import yaml"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Parses user-data the way cloud-init does (PyYAML `safe_load`, YAML 1.1),
/// into JSON.
pub fn cloud_init_parse(user_data: &str) -> serde_json::Value {
    assert!(
        user_data.starts_with("#cloud-config\n"),
        "user-data must start with #cloud-config"
    );
    if !python_yaml_available() {
        panic!(
            "python3 with PyYAML (cloud-init's YAML parser) not found: apt-get install -y python3-yaml  (all: {SETUP_HINT})"
        );
    }
    let out = run_with_stdin(
        Command::new("python3").args([
            "-c",
            "import json, sys, yaml\njson.dump(yaml.safe_load(sys.stdin.read()), sys.stdout, default=repr)",
        ]),
        user_data.as_bytes(),
    );
    assert!(
        out.status.success(),
        "PyYAML rejected the user-data: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("PyYAML output is JSON")
}

/// One `write_files` entry as cloud-init would write it.
#[derive(Debug, Clone, PartialEq)]
pub struct FileToWrite {
    pub path: String,
    pub mode: u32,
    pub owner: String,
    pub content: Vec<u8>,
}

impl FileToWrite {
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.content).expect("utf-8 content")
    }
}

/// The `write_files` entries of a parsed cloud-config (plain or base64
/// content, like cloud-init's write_files module).
pub fn write_files(doc: &serde_json::Value) -> Vec<FileToWrite> {
    let entries = doc["write_files"]
        .as_array()
        .expect("write_files is a list");
    entries
        .iter()
        .map(|e| {
            let path = e["path"].as_str().expect("path is a string").to_owned();
            let content = e["content"].as_str().unwrap_or_else(|| {
                panic!(
                    "cloud-init reads the content of {path} as {}, not a string",
                    e["content"]
                )
            });
            let content = match e.get("encoding").and_then(|v| v.as_str()) {
                None | Some("text/plain") => content.as_bytes().to_vec(),
                Some("b64" | "base64") => base64::engine::general_purpose::STANDARD
                    .decode(content)
                    .expect("base64 content"),
                Some(other) => panic!("unexpected encoding {other} for {path}"),
            };
            let mode = match &e["permissions"] {
                serde_json::Value::String(s) => {
                    u32::from_str_radix(s.trim_start_matches("0o"), 8).expect("octal permissions")
                }
                other => panic!("permissions of {path} must be a quoted octal string, got {other}"),
            };
            let owner = e["owner"].as_str().unwrap_or("root:root").to_owned();
            FileToWrite {
                path,
                mode,
                owner,
                content,
            }
        })
        .collect()
}

/// The `runcmd` entries (each a list of arguments).
pub fn runcmd(doc: &serde_json::Value) -> Vec<Vec<String>> {
    doc["runcmd"]
        .as_array()
        .expect("runcmd is a list")
        .iter()
        .map(|cmd| {
            cmd.as_array()
                .expect("runcmd entries are argument lists")
                .iter()
                .map(|a| a.as_str().expect("string argument").to_owned())
                .collect()
        })
        .collect()
}

pub fn run_with_stdin(cmd: &mut Command, stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait");
    writer.join().unwrap();
    out
}

/// Runs a command, panicking with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let dir = base.join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds the stand-in circleci-runner .deb into `dir`; returns its path.
pub fn fake_runner_deb(dir: &Path) -> PathBuf {
    require_tool("dpkg-deb", "dpkg");
    let out = run_ok(
        Command::new(repo().join("scripts/bootstrap-test/make-fake-runner-deb.sh")).arg(dir),
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// A stand-in .rpm: the rpm lead magic and a little padding (the Debian
/// rootfs never installs it; the bundle recipe only checks its format).
pub fn fake_runner_rpm(dir: &Path) -> PathBuf {
    let path = dir.join("circleci-runner-3.0.0-fake1.x86_64.rpm");
    let mut bytes = vec![0xed, 0xab, 0xee, 0xdb];
    bytes.extend_from_slice(&[0u8; 92]);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Builds a runner-bundle disk image with `runner-bundle/build-disk.sh`.
pub fn build_bundle_disk(pkgdir: &Path, out: &Path) -> Output {
    require_tool("mkfs.ext4", "e2fsprogs");
    require_tool("debugfs", "e2fsprogs");
    Command::new(repo().join("runner-bundle/build-disk.sh"))
        .arg(pkgdir)
        .arg(out)
        .output()
        .expect("run build-disk.sh")
}
