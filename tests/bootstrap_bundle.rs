//! The runner-bundle recipe (runner-bundle/build-disk.sh): a disk image built
//! from stand-in packages has the label, filesystem and layout the VM
//! bootstrap looks for, holds the packages byte for byte, is reproducible, and
//! the recipe refuses packages that are not circleci-runner.

mod bootstrap_common;

use std::path::Path;
use std::process::Command;

use bootstrap_common::*;
use runner_provisioner::cloudinit::RUNNER_BUNDLE_LABEL;

fn blkid_value(img: &Path, tag: &str) -> String {
    let out = run_ok(
        Command::new(require_tool("blkid", "util-linux"))
            .args(["-p", "-o", "value", "-s", tag])
            .arg(img),
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn debugfs(img: &Path, request: &str) -> Vec<u8> {
    let out = run_ok(
        Command::new(require_tool("debugfs", "e2fsprogs"))
            .args(["-R", request])
            .arg(img),
    );
    out.stdout
}

#[test]
fn builds_the_disk_layout_the_bootstrap_expects() {
    let dir = TempDir::new("bundle");
    let pkgs = dir.path().join("pkgs");
    std::fs::create_dir_all(&pkgs).unwrap();
    let deb = fake_runner_deb(&pkgs);
    let rpm = fake_runner_rpm(&pkgs);
    let img = dir.path().join("disk.img");
    let out = build_bundle_disk(&pkgs, &img);
    assert!(
        out.status.success(),
        "build-disk.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(blkid_value(&img, "LABEL"), RUNNER_BUNDLE_LABEL);
    assert_eq!(blkid_value(&img, "TYPE"), "ext4");

    let arch = String::from_utf8(run_ok(Command::new("dpkg").arg("--print-architecture")).stdout)
        .unwrap()
        .trim()
        .to_owned();
    let deb_in_disk = format!("/deb/circleci-runner_3.0.0-fake1_{arch}.deb");
    let rpm_in_disk = "/rpm/circleci-runner-3.0.0-fake1.x86_64.rpm";
    // The bootstrap's globs: deb/circleci-runner_*_<arch>.deb, rpm/circleci-runner-*.<arch>.rpm.
    assert_eq!(
        debugfs(&img, &format!("cat {deb_in_disk}")),
        std::fs::read(&deb).unwrap()
    );
    assert_eq!(
        debugfs(&img, &format!("cat {rpm_in_disk}")),
        std::fs::read(&rpm).unwrap()
    );
    let manifest = String::from_utf8(debugfs(&img, "cat /MANIFEST")).unwrap();
    assert!(manifest.contains(&deb_in_disk[1..]), "{manifest}");
    assert!(manifest.contains(&rpm_in_disk[1..]), "{manifest}");
    assert_eq!(manifest.lines().count(), 2, "{manifest}");
    // Readable by anyone once mounted (the VM mounts it read-only as root).
    let stat = String::from_utf8(debugfs(&img, &format!("stat {deb_in_disk}"))).unwrap();
    assert!(stat.contains("Mode:  0644"), "{stat}");

    // Reproducible: the same packages give the same bytes.
    let img2 = dir.path().join("disk2.img");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert!(build_bundle_disk(&pkgs, &img2).status.success());
    assert!(
        std::fs::read(&img).unwrap() == std::fs::read(&img2).unwrap(),
        "two builds of the runner bundle differ"
    );

    // e2fsck agrees the filesystem is clean.
    run_ok(
        Command::new(require_tool("e2fsck", "e2fsprogs"))
            .arg("-fn")
            .arg(&img),
    );
}

#[test]
fn refuses_packages_that_are_not_circleci_runner() {
    let dir = TempDir::new("bundle-bad");
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = build_bundle_disk(&empty, &dir.path().join("a.img"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no circleci-runner"));

    let bad_deb = dir.path().join("bad-deb");
    std::fs::create_dir_all(&bad_deb).unwrap();
    std::fs::write(bad_deb.join("circleci-runner_1_amd64.deb"), "not a deb").unwrap();
    let out = build_bundle_disk(&bad_deb, &dir.path().join("b.img"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a .deb"));

    let bad_rpm = dir.path().join("bad-rpm");
    std::fs::create_dir_all(&bad_rpm).unwrap();
    std::fs::write(bad_rpm.join("circleci-runner-1.x86_64.rpm"), "not an rpm").unwrap();
    let out = build_bundle_disk(&bad_rpm, &dir.path().join("c.img"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not an .rpm"));
}

#[test]
fn containerfile_is_a_containerdisk() {
    let text = std::fs::read_to_string(repo().join("runner-bundle/Containerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        lines,
        ["FROM scratch", "ADD --chown=107:107 disk.img /disk/"]
    );
}
