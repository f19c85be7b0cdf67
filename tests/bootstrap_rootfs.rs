//! The VM bootstrap really runs: in a Debian root filesystem (debootstrap
//! minbase, built once by scripts/bootstrap-test/build-rootfs.sh and cached
//! outside the repository), this test
//!
//! 1. applies the rendered user-data the way cloud-init would: parsed with
//!    cloud-init's YAML parser (PyYAML), each `write_files` entry written with
//!    its mode and owner, then each `runcmd` entry run as root;
//! 2. runs it in chroot, in private mount/PID/network namespaces (no network),
//!    with `systemctl`, `poweroff` and `shutdown` replaced by recorders, a file
//!    standing in for /dev/console, and a stand-in circleci-runner package
//!    (scripts/bootstrap-test/make-fake-runner-deb.sh) on a runner-bundle disk
//!    image built by runner-bundle/build-disk.sh;
//! 3. checks the real files written, the recorded systemctl/poweroff calls and
//!    the console.
//!
//! The runner bundle is either the disk image itself, attached read-only to a
//! loop device and shown in the chroot as /dev/disk/by-id/virtio-runner-bundle
//! (the script finds and mounts it as in a VM), or a directory extracted from
//! it, given to the script with its test hook `RP_BUNDLE_DIR`.
//! There is no systemd in the chroot: that the runner's exit powers the VM off
//! is the drop-in's job; its content is checked here, the unit is not run.

mod bootstrap_common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use bootstrap_common::*;
use runner_provisioner::cloudinit::*;

const ROOTFS_HINT: &str = "build it with: scripts/bootstrap-test/build-rootfs.sh (as root; apt-get install -y debootstrap)";

fn require_root() {
    let out = run_ok(Command::new("id").arg("-u"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "the bootstrap rootfs test needs root (chroot, namespaces, loop devices)"
    );
}

/// The cached rootfs (path from the build script, so both agree on the key).
fn cached_rootfs() -> PathBuf {
    let script = repo().join("scripts/bootstrap-test/build-rootfs.sh");
    let out = run_ok(Command::new(&script).arg("--print-path"));
    let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let built = Command::new(&script).arg("--check").status().unwrap();
    assert!(
        built.success(),
        "the Debian rootfs for the bootstrap test is missing at {}: {ROOTFS_HINT}",
        path.display()
    );
    path
}

/// A read-only loop device over a disk image, detached on drop.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(img: &Path) -> Self {
        let losetup = require_tool("losetup", "mount");
        let out = Command::new(losetup)
            .args(["--find", "--show", "--read-only"])
            .arg(img)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot attach a loop device (needs root and /dev/loop*): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// Packages and bundle disk built from them.
struct Bundle {
    _dir: TempDir,
    disk: PathBuf,
    deb: PathBuf,
}

fn bundle() -> Bundle {
    let dir = TempDir::new("rootfs-bundle");
    let pkgs = dir.path().join("pkgs");
    std::fs::create_dir_all(&pkgs).unwrap();
    let deb = fake_runner_deb(&pkgs);
    fake_runner_rpm(&pkgs);
    let disk = dir.path().join("disk.img");
    let out = build_bundle_disk(&pkgs, &disk);
    assert!(
        out.status.success(),
        "build-disk.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Bundle {
        _dir: dir,
        disk,
        deb,
    }
}

enum BundleSource<'a> {
    /// The disk image on a loop device, as /dev/disk/by-id/virtio-runner-bundle.
    Disk(&'a Path),
    /// A directory inside the rootfs (path as seen in the chroot), via RP_BUNDLE_DIR.
    Dir(&'a str),
    None,
}

struct Rootfs {
    _dir: TempDir,
    root: PathBuf,
    console: PathBuf,
}

struct Run {
    output: Output,
    elapsed: Duration,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }
}

impl Rootfs {
    fn new(name: &str) -> Self {
        require_root();
        require_tool("unshare", "util-linux");
        require_tool("chroot", "coreutils");
        let cached = cached_rootfs();
        let dir = TempDir::new(&format!("rootfs-{name}"));
        let root = dir.path().join("root");
        run_ok(Command::new("cp").arg("-a").arg(&cached).arg(&root));
        let recorder = repo().join("scripts/bootstrap-test/recorder.sh");
        for bin in [
            "usr/bin/systemctl",
            "usr/sbin/poweroff",
            "usr/sbin/shutdown",
        ] {
            let dest = root.join(bin);
            let _ = std::fs::remove_file(&dest);
            std::fs::copy(&recorder, &dest).unwrap();
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let console = dir.path().join("console");
        std::fs::write(&console, "").unwrap();
        Self {
            _dir: dir,
            root,
            console,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// cloud-init's write_files, then the runcmd entries to run.
    fn apply_cloud_init(&self, user_data: &str) -> Vec<Vec<String>> {
        let doc = cloud_init_parse(user_data);
        for f in write_files(&doc) {
            assert!(f.path.starts_with('/'), "relative path {}", f.path);
            assert!(!f.path.contains(".."), "path escapes: {}", f.path);
            let dest = self.path(&f.path);
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::write(&dest, &f.content).unwrap();
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(f.mode)).unwrap();
            assert_eq!(f.owner, "root:root");
            std::os::unix::fs::chown(&dest, Some(0), Some(0)).unwrap();
        }
        runcmd(&doc)
    }

    /// Runs a command in the chroot (see run-in-rootfs.sh).
    fn run(&self, argv: &[String], bundle: &BundleSource) -> Run {
        let _loop;
        let mut cmd = Command::new("timeout");
        cmd.args(["--kill-after=10", "300"])
            .arg(repo().join("scripts/bootstrap-test/run-in-rootfs.sh"))
            .arg(&self.root)
            .arg(&self.console);
        match bundle {
            BundleSource::Disk(img) => {
                _loop = LoopDevice::attach(img);
                cmd.arg(&_loop.0);
            }
            BundleSource::Dir(dir) => {
                cmd.env("RP_BUNDLE_DIR", dir);
            }
            BundleSource::None => {}
        }
        cmd.arg("--").args(argv);
        let start = Instant::now();
        let output = cmd.output().unwrap();
        Run {
            output,
            elapsed: start.elapsed(),
        }
    }

    fn boot(&self, config: &BootstrapConfig, bundle: &BundleSource) -> Run {
        let runcmd = self.apply_cloud_init(&render_user_data(config));
        assert_eq!(runcmd.len(), 1, "one runcmd entry expected");
        let run = self.run(&runcmd[0], bundle);
        eprintln!(
            "--- bootstrap ({:?}, {}) stdout:\n{}--- stderr:\n{}--- console:\n{}",
            run.elapsed,
            run.output.status,
            run.stdout(),
            run.stderr(),
            self.console()
        );
        run
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap()
    }

    fn recorded(&self) -> Vec<String> {
        std::fs::read_to_string(self.path("/var/log/rp-recorder.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn read(&self, p: &str) -> String {
        std::fs::read_to_string(self.path(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
    }

    /// uid and gid of a user of the rootfs.
    fn user(&self, name: &str) -> Option<(u32, u32)> {
        self.read("/etc/passwd").lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == name).then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
        })
    }

    fn package_installed(&self, name: &str) -> bool {
        self.read("/var/lib/dpkg/status")
            .split("\n\n")
            .any(|stanza| {
                stanza.lines().any(|l| l == format!("Package: {name}"))
                    && stanza.lines().any(|l| l == "Status: install ok installed")
            })
    }

    /// Extracts the bundle disk's packages into a directory of the rootfs.
    fn extract_bundle(&self, disk: &Path, dir_in_root: &str) {
        let dest = self.path(dir_in_root);
        std::fs::create_dir_all(&dest).unwrap();
        for sub in ["/deb", "/rpm"] {
            run_ok(
                Command::new(require_tool("debugfs", "e2fsprogs"))
                    .arg("-R")
                    .arg(format!("rdump {sub} {}", dest.display()))
                    .arg(disk),
            );
        }
    }
}

const STARTED: [&str; 3] = [
    "systemctl daemon-reload",
    "systemctl enable circleci-runner.service",
    "systemctl start --no-block circleci-runner.service",
];

fn assert_powered_off_without_runner(rootfs: &Rootfs, run: &Run) {
    assert!(!run.output.status.success(), "bootstrap should fail");
    let recorded = rootfs.recorded();
    assert_eq!(recorded, ["systemctl poweroff"], "recorded calls");
    assert!(
        !recorded.iter().any(|l| l.contains("start")),
        "the runner must not start"
    );
    assert!(
        rootfs.user("circleci").is_none(),
        "the runner's user exists"
    );
    // The config cloud-init wrote stays root's (or was moved aside, to /run).
    if let Ok(meta) = std::fs::metadata(rootfs.path(RUNNER_CONFIG_PATH)) {
        assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o600));
    }
}

#[test]
fn installs_from_the_bundle_disk_and_starts_the_runner() {
    let bundle = bundle();
    let rootfs = Rootfs::new("disk");
    // The user's script records that it ran, with hostile text inside.
    let user_script = format!(
        "#!/bin/sh\nset -eu\nmkdir /opt/user-tool\ncat >/root/userdata-ran <<'RP_END'\n{HOSTILE}\nRP_END\n"
    );
    let config = BootstrapConfig {
        runner_token: HOSTILE.into(),
        api_url: format!("https://circleci.example.com/{HOSTILE}"),
        idle_timeout: Some(HOSTILE.into()),
        working_directory: Some(HOSTILE.into()),
        command_prefix: Some(vec![HOSTILE.into(), "--".into()]),
        max_run_time: Some("5h".into()),
        user_script: Some(user_script.clone()),
        grant_sudo: true,
        bundle: true,
        install_timeout: None,
    };
    let run = rootfs.boot(&config, &BundleSource::Disk(&bundle.disk));
    assert!(run.output.status.success(), "bootstrap failed");
    assert!(
        run.stdout()
            .contains("mounted the runner bundle disk /dev/disk/by-id/virtio-runner-bundle")
    );
    assert!(
        run.stdout()
            .contains("OS: Debian GNU/Linux 12 (bookworm) (family debian)")
    );

    // userData ran, verbatim.
    assert_eq!(rootfs.read("/root/userdata-ran"), format!("{HOSTILE}\n"));
    assert_eq!(rootfs.read(USER_DATA_PATH), user_script);
    // ... with an ordinary umask: what it creates is usable by jobs.
    let tool = std::fs::metadata(rootfs.path("/opt/user-tool")).unwrap();
    assert_eq!(tool.mode() & 0o777, 0o755);
    // Nothing in the values was executed.
    assert!(
        !rootfs.path("/pwned").exists(),
        "a value was executed as shell"
    );

    // The package from the disk is installed (its postinst created the user).
    assert!(rootfs.package_installed("circleci-runner"));
    assert_eq!(
        rootfs.read("/var/lib/fake-circleci-runner/postinst"),
        "installed\n"
    );

    // The exact config, 0600, owned by circleci: not the package's template.
    let (uid, gid) = rootfs.user("circleci").expect("user circleci");
    let config_path = rootfs.path(RUNNER_CONFIG_PATH);
    assert_eq!(rootfs.read(RUNNER_CONFIG_PATH), runner_config_yaml(&config));
    let meta = std::fs::metadata(&config_path).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!((meta.uid(), meta.gid()), (uid, gid));
    let parsed: serde_norway::Value =
        serde_norway::from_str(&rootfs.read(RUNNER_CONFIG_PATH)).unwrap();
    assert_eq!(parsed["api"]["auth_token"].as_str(), Some(HOSTILE));
    assert_eq!(parsed["runner"]["mode"].as_str(), Some("single-task"));
    assert_eq!(parsed["runner"]["idle_timeout"].as_str(), Some(HOSTILE));

    // The drop-in, and the unit started through systemctl (recorded); no poweroff.
    assert_eq!(rootfs.read(DROPIN_PATH), systemd_dropin());
    assert_eq!(rootfs.read(SUDOERS_PATH), format!("{SUDOERS_LINE}\n"));
    let sudoers = std::fs::metadata(rootfs.path(SUDOERS_PATH)).unwrap();
    assert_eq!(sudoers.mode() & 0o7777, 0o440);
    assert_eq!(rootfs.recorded(), STARTED);
    assert_eq!(rootfs.console(), "", "nothing fatal on the console");

    // The runner, started as its user with the drop-in's name variable, can
    // read its config (what systemd would do with the unit and drop-in).
    let runner = rootfs.run(
        &[
            "setpriv",
            "--reuid=circleci",
            "--regid=circleci",
            "--init-groups",
            "env",
            "CIRCLECI_RUNNER_NAME=runner-pool-0",
            "/usr/bin/circleci-runner",
            "machine",
            "--config",
            RUNNER_CONFIG_PATH,
        ]
        .map(String::from),
        &BundleSource::None,
    );
    assert!(
        runner.output.status.success(),
        "runner: {}",
        runner.stderr()
    );
    assert_eq!(
        rootfs.read("/var/lib/fake-circleci-runner/user"),
        "circleci\n"
    );
    assert_eq!(
        rootfs.read("/var/lib/fake-circleci-runner/name"),
        "runner-pool-0\n"
    );
    assert_eq!(
        rootfs.read("/var/lib/fake-circleci-runner/config.yaml"),
        runner_config_yaml(&config)
    );
    // Another user cannot read the token.
    let nobody = rootfs.run(
        &[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "cat",
            RUNNER_CONFIG_PATH,
        ]
        .map(String::from),
        &BundleSource::None,
    );
    assert!(
        !nobody.output.status.success(),
        "nobody could read the runner config"
    );
    drop(bundle.deb);
}

#[test]
fn installs_from_a_bundle_directory_with_defaults() {
    let bundle = bundle();
    let rootfs = Rootfs::new("dir");
    rootfs.extract_bundle(&bundle.disk, "/mnt/bundle");
    let config = BootstrapConfig {
        runner_token: "0123456789abcdef".into(),
        bundle: true,
        ..Default::default()
    };
    let run = rootfs.boot(&config, &BundleSource::Dir("/mnt/bundle"));
    assert!(run.output.status.success(), "bootstrap failed");
    assert!(run.stdout().contains("no userData"));
    assert!(rootfs.package_installed("circleci-runner"));
    let text = rootfs.read(RUNNER_CONFIG_PATH);
    assert_eq!(text, runner_config_yaml(&config));
    assert!(
        text.contains("url: https://runner.circleci.com\n"),
        "{text}"
    );
    assert!(
        !text.contains("AUTH TOKEN"),
        "the package's template won: {text}"
    );
    assert_eq!(rootfs.recorded(), STARTED);
    assert!(!rootfs.path(USER_DATA_PATH).exists());
}

#[test]
fn failing_user_data_powers_off_without_starting_the_runner() {
    let bundle = bundle();
    let rootfs = Rootfs::new("userdata-fails");
    rootfs.extract_bundle(&bundle.disk, "/mnt/bundle");
    let config = BootstrapConfig {
        runner_token: "secret-token".into(),
        user_script: Some("echo user script running\nfalse\necho not reached\nexit 0\n".into()),
        bundle: true,
        ..Default::default()
    };
    let mut config_exit = config.clone();
    config_exit.user_script = Some("#!/bin/bash\nexit 7\n".into());
    let run = rootfs.boot(&config, &BundleSource::Dir("/mnt/bundle"));
    // bash without -e runs on after `false`: the script's own exit status counts.
    assert!(
        run.output.status.success(),
        "a script that exits 0 succeeds"
    );
    assert_eq!(rootfs.recorded(), STARTED);

    let rootfs = Rootfs::new("userdata-exit-7");
    rootfs.extract_bundle(&bundle.disk, "/mnt/bundle");
    let run = rootfs.boot(&config_exit, &BundleSource::Dir("/mnt/bundle"));
    assert_powered_off_without_runner(&rootfs, &run);
    assert!(
        rootfs.console().contains(
            "runner-provisioner: FATAL: userData failed (exit status 7); not starting the runner"
        ),
        "console: {}",
        rootfs.console()
    );
    assert!(
        !rootfs.package_installed("circleci-runner"),
        "installed after a failed userData"
    );
    // The token is not in the console output.
    assert!(!rootfs.console().contains("secret-token"));
    assert!(!run.stdout().contains("secret-token") && !run.stderr().contains("secret-token"));
}

#[test]
fn unsupported_os_powers_off_before_user_data() {
    let bundle = bundle();
    let rootfs = Rootfs::new("alpine");
    rootfs.extract_bundle(&bundle.disk, "/mnt/bundle");
    let os_release = rootfs.path("/etc/os-release");
    std::fs::remove_file(&os_release).unwrap();
    std::fs::write(
        &os_release,
        "NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.20.3\nPRETTY_NAME=\"Alpine Linux v3.20\"\n",
    )
    .unwrap();
    let config = BootstrapConfig {
        runner_token: "t".into(),
        user_script: Some("touch /root/userdata-ran\n".into()),
        bundle: true,
        ..Default::default()
    };
    let run = rootfs.boot(&config, &BundleSource::Dir("/mnt/bundle"));
    assert_powered_off_without_runner(&rootfs, &run);
    assert!(
        rootfs
            .console()
            .contains("FATAL: unsupported OS 'Alpine Linux v3.20'"),
        "console: {}",
        rootfs.console()
    );
    assert!(
        !rootfs.path("/root/userdata-ran").exists(),
        "userData ran on an unsupported OS"
    );
    assert!(!rootfs.package_installed("circleci-runner"));
}

#[test]
fn missing_bundle_falls_back_to_the_repository_and_gives_up_in_time() {
    let rootfs = Rootfs::new("no-bundle");
    std::fs::create_dir_all(rootfs.path("/mnt/empty-bundle")).unwrap();
    let config = BootstrapConfig {
        runner_token: "t".into(),
        bundle: true,
        install_timeout: Some(Duration::from_secs(20)),
        ..Default::default()
    };
    let run = rootfs.boot(&config, &BundleSource::Dir("/mnt/empty-bundle"));
    assert_powered_off_without_runner(&rootfs, &run);
    let stdout = run.stdout();
    assert!(
        stdout.contains("the runner bundle has no deb/circleci-runner_*_"),
        "{stdout}"
    );
    assert!(
        stdout.contains("trying CircleCI's package repository"),
        "{stdout}"
    );
    assert!(stdout.contains("(attempt 1, "), "{stdout}");
    assert!(stdout.contains("(attempt 2, "), "retries: {stdout}");
    assert!(
        rootfs
            .console()
            .contains("FATAL: could not install circleci-runner (gave up after 20s)"),
        "console: {}",
        rootfs.console()
    );
    // Bounded: the 20 s budget plus process start-up, not minutes.
    assert!(
        run.elapsed < Duration::from_secs(60),
        "took {:?}",
        run.elapsed
    );
    assert!(
        run.elapsed >= Duration::from_secs(7),
        "gave up early: {:?}",
        run.elapsed
    );
}
