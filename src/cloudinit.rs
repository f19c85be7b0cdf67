//! The cloud-init user-data that turns a booted VM into a single-task
//! CircleCI runner. Pure: plain data in, a `#cloud-config` document out.

use serde::Serialize;

/// Path of the circleci-runner config file inside the VM.
pub const RUNNER_CONFIG_PATH: &str = "/etc/circleci-runner/circleci-runner-config.yaml";

/// Everything the VM needs to become a runner, already resolved (secrets read).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BootstrapConfig {
    /// The resource-class token (secret: only ever written into the Secret).
    pub runner_token: String,
    /// Runner API base URL (`api.url`).
    pub api_url: String,
    /// `runner.idle_timeout`, in the agent's duration syntax (e.g. `10m`).
    pub idle_timeout: Option<String>,
    /// `runner.working_directory`.
    pub working_directory: Option<String>,
    /// `runner.command_prefix`.
    pub command_prefix: Option<Vec<String>>,
    /// `runner.max_run_time`, in the agent's duration syntax.
    pub max_run_time: Option<String>,
    /// The user's bash script, run before the runner is installed.
    pub user_script: Option<String>,
    /// Install from the runner-bundle disk (true) or CircleCI's package repository.
    pub bundle: bool,
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
/// inject keys.
pub fn runner_config_yaml(c: &BootstrapConfig) -> String {
    let file = RunnerConfigFile {
        api: Api { auth_token: &c.runner_token, url: &c.api_url },
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

/// Minimal valid user-data: a `#cloud-config` that writes the runner config.
/// (The full bootstrap is built by the bootstrap work.)
pub fn render_user_data(c: &BootstrapConfig) -> String {
    let doc = serde_json::json!({
        "write_files": [{
            "path": RUNNER_CONFIG_PATH,
            "permissions": "0600",
            "content": runner_config_yaml(c),
        }],
    });
    format!("#cloud-config\n{}", serde_norway::to_string(&doc).expect("cloud-config serialises"))
}
