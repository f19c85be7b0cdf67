//! OS family detection of the bootstrap script (`bootstrap.sh detect-os`),
//! run by the shells the script meets on real images (dash for /bin/sh on
//! Debian/Ubuntu, bash on the RHEL family) against the os-release files of
//! the supported and some unsupported distributions.

mod bootstrap_common;

use std::process::Command;

use bootstrap_common::*;
use runner_provisioner::cloudinit::bootstrap_script;

const CASES: &[(&str, &str, Option<&str>)] = &[
    (
        "debian-12",
        "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\n",
        Some("debian"),
    ),
    (
        "ubuntu-24.04",
        "PRETTY_NAME=\"Ubuntu 24.04.1 LTS\"\nNAME=\"Ubuntu\"\nVERSION_ID=\"24.04\"\nID=ubuntu\nID_LIKE=debian\n",
        Some("debian"),
    ),
    (
        "linuxmint",
        "NAME=\"Linux Mint\"\nID=linuxmint\nID_LIKE=\"ubuntu debian\"\n",
        Some("debian"),
    ),
    (
        "rhel-9",
        "NAME=\"Red Hat Enterprise Linux\"\nVERSION=\"9.4 (Plow)\"\nID=\"rhel\"\nID_LIKE=\"fedora\"\n",
        Some("rhel"),
    ),
    (
        "almalinux-9",
        "NAME=\"AlmaLinux\"\nVERSION=\"9.4 (Seafoam Ocelot)\"\nID=\"almalinux\"\nID_LIKE=\"rhel centos fedora\"\nPRETTY_NAME=\"AlmaLinux 9.4 (Seafoam Ocelot)\"\n",
        Some("rhel"),
    ),
    (
        "rocky-9",
        "NAME=\"Rocky Linux\"\nID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=\"9.4\"\n",
        Some("rhel"),
    ),
    (
        "centos-stream-9",
        "NAME=\"CentOS Stream\"\nVERSION=\"9\"\nID=\"centos\"\nID_LIKE=\"rhel fedora\"\n",
        Some("rhel"),
    ),
    (
        "fedora-40",
        "NAME=\"Fedora Linux\"\nVERSION=\"40 (Cloud Edition)\"\nID=fedora\nVERSION_ID=40\n",
        Some("rhel"),
    ),
    (
        "oracle-9",
        "NAME=\"Oracle Linux Server\"\nID=\"ol\"\nID_LIKE=\"fedora\"\n",
        Some("rhel"),
    ),
    ("uppercase-quoted", "ID='AlmaLinux'\n", Some("rhel")),
    (
        "alpine",
        "NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.20.3\nPRETTY_NAME=\"Alpine Linux v3.20\"\n",
        None,
    ),
    (
        "opensuse",
        "NAME=\"openSUSE Leap\"\nID=\"opensuse-leap\"\nID_LIKE=\"suse opensuse\"\n",
        None,
    ),
    ("arch", "NAME=\"Arch Linux\"\nID=arch\n", None),
    ("empty", "", None),
    (
        "hostile",
        "ID=\"$(touch /tmp/rp-pwned)\"\nID_LIKE=\"* `touch /tmp/rp-pwned` ;debian\"\n",
        None,
    ),
];

#[test]
fn detects_the_os_family_from_os_release() {
    let dir = TempDir::new("os-detect");
    let script = dir.path().join("bootstrap.sh");
    std::fs::write(&script, bootstrap_script()).unwrap();
    // A file a glob in ID_LIKE could match: the family must not come from it.
    std::fs::write(dir.path().join("debian"), "").unwrap();
    let mut shells = vec![require_tool("dash", "dash"), require_tool("bash", "bash")];
    shells.dedup();
    let mut failures = Vec::new();
    for shell in &shells {
        for (name, content, expected) in CASES {
            let file = dir.path().join(format!("{name}.os-release"));
            std::fs::write(&file, content).unwrap();
            let out = Command::new(shell)
                .arg(&script)
                .arg("detect-os")
                .arg(&file)
                .current_dir(dir.path())
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let got = out.status.success().then_some(stdout.as_str());
            if got != *expected || (expected.is_none() && stdout != "unsupported") {
                failures.push(format!(
                    "{} {name}: expected {expected:?}, got {got:?} (stdout {stdout:?}, stderr {})",
                    shell.display(),
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }
    assert!(
        !std::path::Path::new("/tmp/rp-pwned").exists(),
        "os-release content was executed"
    );
    assert!(failures.is_empty(), "{failures:#?}");
}
