//! The cloud-init user-data that turns a booted VM into a single-task
//! CircleCI runner. Pure: plain data in, a `#cloud-config` document out.
//!
//! The document only *writes files* and runs one fixed script:
//!
//! - `write_files`:
//!   - [`RUNNER_CONFIG_PATH`]: the circleci-runner config (YAML, mode 0600),
//!   - [`SETTINGS_PATH`]: `key=value` settings for the script (install source,
//!     bundle disk serial and label, install timeout),
//!   - [`USER_DATA_PATH`]: the RunnerPool's `userData`, when there is one,
//!   - [`DROPIN_PATH`]: the systemd drop-in (no restart, power off on exit,
//!     output on the serial console, runner name = hostname),
//!   - [`SUDOERS_PATH`]: passwordless sudo for the runner's user, only with
//!     [`BootstrapConfig::grant_sudo`],
//!   - [`BOOTSTRAP_SCRIPT_PATH`]: the bootstrap script ([`bootstrap_script`]);
//! - `runcmd`: `sh <bootstrap script>`.
//!
//! No value is ever pasted into shell: the script is a constant and reads the
//! files above; every file is serialised with serde_norway. Every `content` is
//! made to end with a newline, so it is emitted as a YAML block (or quoted)
//! scalar: cloud-init's YAML 1.1 parser then reads it back as the same string
//! (a plain `yes` or `1:20` would become a boolean or a number there).

use std::time::Duration;

use serde::Serialize;

/// Path of the circleci-runner config file inside the VM.
pub const RUNNER_CONFIG_PATH: &str = "/etc/circleci-runner/circleci-runner-config.yaml";
/// The runner API used when [`BootstrapConfig::api_url`] is empty.
pub const DEFAULT_API_URL: &str = "https://runner.circleci.com";
/// Directory of the bootstrap's own files inside the VM.
pub const BOOTSTRAP_DIR: &str = "/var/lib/runner-provisioner";
/// The bootstrap script inside the VM.
pub const BOOTSTRAP_SCRIPT_PATH: &str = "/var/lib/runner-provisioner/bootstrap.sh";
/// The script's settings (`key=value` lines).
pub const SETTINGS_PATH: &str = "/var/lib/runner-provisioner/settings";
/// The user's `userData` script.
pub const USER_DATA_PATH: &str = "/var/lib/runner-provisioner/userdata";
/// The systemd drop-in for `circleci-runner.service`.
pub const DROPIN_PATH: &str =
    "/etc/systemd/system/circleci-runner.service.d/10-runner-provisioner.conf";
/// The sudoers drop-in written when [`BootstrapConfig::grant_sudo`] is set.
pub const SUDOERS_PATH: &str = "/etc/sudoers.d/90-circleci-runner";
/// Its content: the package runs the agent as user `circleci`.
pub const SUDOERS_LINE: &str = "circleci ALL=(ALL) NOPASSWD:ALL";
/// Disk serial the operator gives the runner-bundle disk; the guest finds it
/// as `/dev/disk/by-id/virtio-runner-bundle`.
pub const RUNNER_BUNDLE_SERIAL: &str = "runner-bundle";
/// Filesystem label of the runner-bundle disk (fallback lookup).
pub const RUNNER_BUNDLE_LABEL: &str = "RUNNERBNDL";
/// Total time the VM spends on installing from CircleCI's package repository
/// (all retries) before it gives up and powers off.
pub const DEFAULT_INSTALL_TIMEOUT: Duration = Duration::from_secs(900);
/// How long the VM waits for the runner-bundle disk to appear.
pub const BUNDLE_WAIT: Duration = Duration::from_secs(15);

const BOOTSTRAP_SH: &str = include_str!("cloudinit/bootstrap.sh");
const DROPIN: &str = include_str!("cloudinit/circleci-runner-dropin.conf");

/// Everything the VM needs to become a runner, already resolved (secrets read).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BootstrapConfig {
    /// The resource-class token (secret: only ever written into the Secret).
    pub runner_token: String,
    /// Runner API base URL (`api.url`); empty means [`DEFAULT_API_URL`].
    /// CircleCI Server: the server's own host.
    pub api_url: String,
    /// `runner.idle_timeout`, in the agent's duration syntax (e.g. `10m`).
    pub idle_timeout: Option<String>,
    /// `runner.working_directory`.
    pub working_directory: Option<String>,
    /// `runner.command_prefix`.
    pub command_prefix: Option<Vec<String>>,
    /// `runner.max_run_time`, in the agent's duration syntax.
    pub max_run_time: Option<String>,
    /// Give the runner's user (`circleci`) passwordless sudo ([`SUDOERS_PATH`]).
    pub grant_sudo: bool,
    /// The user's bash script (or any script with a `#!` line), run as root
    /// before the runner is installed. Empty or blank means none.
    pub user_script: Option<String>,
    /// Install from the runner-bundle disk (true; falls back to the package
    /// repository if the disk or its package is missing) or from CircleCI's
    /// package repository.
    pub bundle: bool,
    /// Bound on the package-repository install (all retries); `None` means
    /// [`DEFAULT_INSTALL_TIMEOUT`].
    pub install_timeout: Option<Duration>,
}

#[derive(Serialize)]
struct RunnerConfigFile<'a> {
    api: Api<'a>,
    runner: Runner<'a>,
}
#[derive(Serialize)]
struct Api<'a> {
    auth_token: &'a str,
    url: &'a str,
}
#[derive(Serialize)]
struct Runner<'a> {
    mode: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    idle_timeout: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    working_directory: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    command_prefix: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_run_time: Option<&'a str>,
}

/// The circleci-runner config file (YAML), serialised so that no value can
/// inject keys. The runner's name is not in it: the systemd drop-in sets
/// `CIRCLECI_RUNNER_NAME` to the VM's hostname.
pub fn runner_config_yaml(c: &BootstrapConfig) -> String {
    let url = if c.api_url.is_empty() {
        DEFAULT_API_URL
    } else {
        &c.api_url
    };
    let file = RunnerConfigFile {
        api: Api {
            auth_token: &c.runner_token,
            url,
        },
        runner: Runner {
            mode: "single-task",
            idle_timeout: c.idle_timeout.as_deref(),
            working_directory: c.working_directory.as_deref(),
            command_prefix: c.command_prefix.as_deref(),
            max_run_time: c.max_run_time.as_deref(),
        },
    };
    serde_norway::to_string(&file).expect("runner config serialises")
}

/// The bootstrap script (a constant: it reads its inputs from files).
pub fn bootstrap_script() -> &'static str {
    BOOTSTRAP_SH
}

/// The systemd drop-in for `circleci-runner.service` (a constant).
pub fn systemd_dropin() -> &'static str {
    DROPIN
}

/// The bootstrap's settings file. Every value is an enum choice, a constant
/// word or a number: nothing the script reads here is free text.
pub fn settings_file(c: &BootstrapConfig) -> String {
    let source = if c.bundle { "bundle" } else { "repository" };
    let timeout = c.install_timeout.unwrap_or(DEFAULT_INSTALL_TIMEOUT);
    // Whole seconds, rounded up, at least one.
    let timeout_secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
    format!(
        "# runner-provisioner bootstrap settings (generated)\n\
         install_source={source}\n\
         bundle_serial={RUNNER_BUNDLE_SERIAL}\n\
         bundle_label={RUNNER_BUNDLE_LABEL}\n\
         bundle_wait_seconds={}\n\
         install_timeout_seconds={}\n",
        BUNDLE_WAIT.as_secs(),
        timeout_secs.max(1),
    )
}

/// The user's script, if it has any content, ending with a newline.
fn user_script(c: &BootstrapConfig) -> Option<String> {
    let s = c.user_script.as_deref()?;
    if s.trim().is_empty() {
        return None;
    }
    Some(with_final_newline(s))
}

fn with_final_newline(s: &str) -> String {
    if s.ends_with('\n') {
        s.to_owned()
    } else {
        format!("{s}\n")
    }
}

#[derive(Serialize)]
struct CloudConfig {
    write_files: Vec<WriteFile>,
    runcmd: Vec<Vec<&'static str>>,
}

#[derive(Serialize)]
struct WriteFile {
    path: &'static str,
    owner: &'static str,
    permissions: &'static str,
    content: String,
}

impl WriteFile {
    fn new(path: &'static str, permissions: &'static str, content: String) -> Self {
        Self {
            path,
            owner: "root:root",
            permissions,
            // Multi-line: a block scalar, a string for any YAML parser.
            content: with_final_newline(&content),
        }
    }
}

/// The VM's user-data: a `#cloud-config` document (see the module docs).
/// It is meant for a Secret (`cloudInitNoCloud.secretRef`): it carries the
/// runner token and is larger than KubeVirt's 2048-byte inline limit.
pub fn render_user_data(c: &BootstrapConfig) -> String {
    let mut write_files = vec![
        WriteFile::new(RUNNER_CONFIG_PATH, "0600", runner_config_yaml(c)),
        WriteFile::new(SETTINGS_PATH, "0600", settings_file(c)),
    ];
    if let Some(script) = user_script(c) {
        write_files.push(WriteFile::new(USER_DATA_PATH, "0700", script));
    }
    write_files.push(WriteFile::new(DROPIN_PATH, "0644", DROPIN.to_owned()));
    if c.grant_sudo {
        write_files.push(WriteFile::new(SUDOERS_PATH, "0440", SUDOERS_LINE.into()));
    }
    write_files.push(WriteFile::new(
        BOOTSTRAP_SCRIPT_PATH,
        "0700",
        BOOTSTRAP_SH.to_owned(),
    ));
    let doc = CloudConfig {
        write_files,
        runcmd: vec![vec!["sh", BOOTSTRAP_SCRIPT_PATH]],
    };
    format!(
        "#cloud-config\n{}",
        serde_norway::to_string(&doc).expect("cloud-config serialises")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_files(user_data: &str) -> Vec<(String, String, String)> {
        let doc: serde_norway::Value =
            serde_norway::from_str(user_data.strip_prefix("#cloud-config\n").unwrap()).unwrap();
        doc["write_files"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["path"].as_str().unwrap().to_owned(),
                    f["permissions"].as_str().unwrap().to_owned(),
                    f["content"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn script_uses_the_paths_the_renderer_writes() {
        let script = bootstrap_script();
        for (var, path) in [
            ("RP_DIR", BOOTSTRAP_DIR),
            ("RUNNER_CONFIG", RUNNER_CONFIG_PATH),
            ("DROPIN", DROPIN_PATH),
        ] {
            assert!(
                script.contains(&format!("\n{var}={path}\n")),
                "bootstrap.sh must set {var}={path}"
            );
        }
        assert!(SETTINGS_PATH.starts_with(BOOTSTRAP_DIR));
        assert!(script.contains("settings=\"$RP_DIR/settings\""));
        assert!(script.contains("user_data=\"$RP_DIR/userdata\""));
        assert_eq!(SETTINGS_PATH, format!("{BOOTSTRAP_DIR}/settings"));
        assert_eq!(USER_DATA_PATH, format!("{BOOTSTRAP_DIR}/userdata"));
        assert_eq!(
            BOOTSTRAP_SCRIPT_PATH,
            format!("{BOOTSTRAP_DIR}/bootstrap.sh")
        );
    }

    #[test]
    fn dropin_never_restarts_and_powers_off() {
        let d = systemd_dropin();
        for line in [
            "Restart=no",
            "ExecStopPost=+/usr/bin/systemctl poweroff",
            "StandardOutput=journal+console",
            "StandardError=journal+console",
            "Environment=CIRCLECI_RUNNER_NAME=%H",
        ] {
            assert!(d.lines().any(|l| l == line), "drop-in lacks {line:?}");
        }
    }

    #[test]
    fn settings_follow_the_config() {
        let on = settings_file(&BootstrapConfig {
            bundle: true,
            ..Default::default()
        });
        assert!(on.contains("\ninstall_source=bundle\n"));
        assert!(on.contains("\ninstall_timeout_seconds=900\n"));
        assert!(on.contains("\nbundle_serial=runner-bundle\n"));
        assert!(on.contains("\nbundle_label=RUNNERBNDL\n"));
        let off = settings_file(&BootstrapConfig {
            install_timeout: Some(Duration::from_millis(2500)),
            ..Default::default()
        });
        assert!(off.contains("\ninstall_source=repository\n"));
        assert!(off.contains("\ninstall_timeout_seconds=3\n"));
        let tiny = settings_file(&BootstrapConfig {
            install_timeout: Some(Duration::ZERO),
            ..Default::default()
        });
        assert!(tiny.contains("\ninstall_timeout_seconds=1\n"));
    }

    #[test]
    fn empty_api_url_means_circleci_cloud() {
        let yaml = runner_config_yaml(&BootstrapConfig::default());
        let v: serde_norway::Value = serde_norway::from_str(&yaml).unwrap();
        assert_eq!(v["api"]["url"].as_str(), Some(DEFAULT_API_URL));
        assert_eq!(v["runner"]["mode"].as_str(), Some("single-task"));
        assert!(v["runner"].get("idle_timeout").is_none());
    }

    #[test]
    fn user_script_is_written_only_when_present() {
        let paths = |c: &BootstrapConfig| -> Vec<String> {
            write_files(&render_user_data(c))
                .into_iter()
                .map(|(p, _, _)| p)
                .collect()
        };
        for blank in [None, Some(""), Some("  \n\t\n")] {
            let c = BootstrapConfig {
                user_script: blank.map(str::to_owned),
                ..Default::default()
            };
            assert!(!paths(&c).iter().any(|p| p == USER_DATA_PATH), "{blank:?}");
        }
        let c = BootstrapConfig {
            user_script: Some("apt-get install -y jq".into()),
            ..Default::default()
        };
        let files = write_files(&render_user_data(&c));
        let (_, mode, content) = files.iter().find(|(p, _, _)| p == USER_DATA_PATH).unwrap();
        assert_eq!(mode, "0700");
        assert_eq!(content, "apt-get install -y jq\n");
    }

    #[test]
    fn hostile_values_round_trip_literally() {
        let nasty = "a'b\"c$(id)`id`${X}\\n\nkey: value\n- item\n# not a comment\n&anchor *alias !!tag yes on ~ 1:20 0x1F \u{2028}\r\n\t end ";
        let c = BootstrapConfig {
            runner_token: nasty.into(),
            api_url: nasty.into(),
            idle_timeout: Some(nasty.into()),
            working_directory: Some(nasty.into()),
            command_prefix: Some(vec![nasty.into(), "yes".into(), "".into()]),
            max_run_time: Some(nasty.into()),
            user_script: Some(nasty.into()),
            grant_sudo: true,
            bundle: true,
            install_timeout: None,
        };
        let files = write_files(&render_user_data(&c));
        let config = &files
            .iter()
            .find(|(p, _, _)| p == RUNNER_CONFIG_PATH)
            .unwrap()
            .2;
        assert_eq!(config, &runner_config_yaml(&c));
        let v: serde_norway::Value = serde_norway::from_str(config).unwrap();
        assert_eq!(v["api"]["auth_token"].as_str(), Some(nasty));
        assert_eq!(v["api"]["url"].as_str(), Some(nasty));
        assert_eq!(v["runner"]["idle_timeout"].as_str(), Some(nasty));
        assert_eq!(v["runner"]["working_directory"].as_str(), Some(nasty));
        assert_eq!(v["runner"]["max_run_time"].as_str(), Some(nasty));
        assert_eq!(v["runner"]["command_prefix"][0].as_str(), Some(nasty));
        assert_eq!(v["runner"]["command_prefix"][1].as_str(), Some("yes"));
        assert_eq!(v["runner"]["mode"].as_str(), Some("single-task"));
        let script = &files
            .iter()
            .find(|(p, _, _)| p == USER_DATA_PATH)
            .unwrap()
            .2;
        assert_eq!(script, &format!("{nasty}\n"));
        // Exactly the expected files, in order.
        let paths: Vec<&str> = files.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                RUNNER_CONFIG_PATH,
                SETTINGS_PATH,
                USER_DATA_PATH,
                DROPIN_PATH,
                SUDOERS_PATH,
                BOOTSTRAP_SCRIPT_PATH
            ]
        );
        let sudoers = files.iter().find(|(p, _, _)| p == SUDOERS_PATH).unwrap();
        assert_eq!(
            sudoers.1, "0440",
            "sudo ignores a group- or world-writable file"
        );
        assert_eq!(sudoers.2, format!("{SUDOERS_LINE}\n"));
    }
}
