//! What a simulated guest reads at boot: the `#cloud-config` user-data the
//! operator wrote, and inside it the `circleci-runner` configuration file.
//!
//! Two layers, as on a real VM:
//! - cloud-init ([`runner_config_file`]): the user-data must be a
//!   `#cloud-config` document whose `write_files` has an entry for
//!   [`RUNNER_CONFIG_PATH`]. If that fails, the file is never written and the
//!   agent never starts.
//! - the agent ([`RunnerConfig::parse`]): the file must be YAML with
//!   `api.auth_token`; if not, the agent exits as soon as it starts.
//!
//! Error messages never contain field values (the file holds a token).

use std::fmt;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_norway::Value;

/// Where `circleci-runner` (machine runner 3) reads its configuration.
pub const RUNNER_CONFIG_PATH: &str = "/etc/circleci-runner/circleci-runner-config.yaml";

/// `runner.mode` of `circleci-runner`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunnerMode {
    /// Claim one task, run it, exit (the VM then powers off).
    SingleTask,
    /// Claim tasks one after another (the agent's default).
    #[default]
    Continuous,
}

impl RunnerMode {
    /// The spelling used in the configuration file.
    pub fn as_str(&self) -> &'static str {
        match self {
            RunnerMode::SingleTask => "single-task",
            RunnerMode::Continuous => "continuous",
        }
    }
}

/// Why cloud-init did not deliver the runner configuration file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UserDataError {
    #[error("the VMI has no user-data")]
    Missing,
    #[error("user-data does not start with #cloud-config")]
    NotCloudConfig,
    #[error("#cloud-config is not a valid YAML mapping{0}")]
    InvalidYaml(String),
    #[error("#cloud-config write_files has no entry for {RUNNER_CONFIG_PATH}")]
    NoRunnerConfig,
    #[error("write_files entry for the runner config has unsupported encoding {0:?}")]
    UnsupportedEncoding(String),
    #[error("write_files entry for the runner config is not valid base64 or UTF-8")]
    BadContent,
}

/// Why the agent refused its configuration file (it exits at start).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RunnerConfigError {
    #[error("runner config is not a valid YAML mapping{0}")]
    InvalidYaml(String),
    #[error("runner config field {0} has the wrong type")]
    WrongType(&'static str),
    #[error("runner config has no api.auth_token")]
    MissingToken,
    #[error("runner config runner.mode is neither single-task nor continuous")]
    BadMode,
    #[error("runner config runner.idle_timeout is not a duration")]
    BadIdleTimeout,
}

/// The parts of `circleci-runner-config.yaml` the simulated agent uses.
#[derive(Clone, PartialEq)]
pub struct RunnerConfig {
    /// `api.auth_token`: the resource-class (runner) token.
    pub auth_token: String,
    /// `api.url`; the agent's default is `https://runner.circleci.com`.
    pub url: String,
    /// `runner.name`, if set (otherwise the host name is used).
    pub name: Option<String>,
    pub mode: RunnerMode,
    /// `runner.idle_timeout`; `None` (or zero) means never.
    pub idle_timeout: Option<Duration>,
}

impl fmt::Debug for RunnerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunnerConfig")
            .field("auth_token", &"<redacted>")
            .field("url", &self.url)
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field("idle_timeout", &self.idle_timeout)
            .finish()
    }
}

/// The agent's default `api.url`.
pub const DEFAULT_RUNNER_API_URL: &str = "https://runner.circleci.com";

fn yaml_error_location(e: &serde_norway::Error) -> String {
    // serde_norway messages can quote the offending input; keep only where.
    match e.location() {
        Some(l) => format!(" (line {}, column {})", l.line(), l.column()),
        None => String::new(),
    }
}

/// Cloud-init's part: extract the runner configuration file's content from
/// the user-data (decoding `encoding: b64`/`base64`).
pub fn runner_config_file(user_data: Option<&str>) -> Result<String, UserDataError> {
    let user_data = user_data.ok_or(UserDataError::Missing)?;
    if !user_data.trim_start().starts_with("#cloud-config") {
        return Err(UserDataError::NotCloudConfig);
    }
    let doc: Value = serde_norway::from_str(user_data)
        .map_err(|e| UserDataError::InvalidYaml(yaml_error_location(&e)))?;
    if !doc.is_mapping() {
        return Err(UserDataError::InvalidYaml(String::new()));
    }
    let entry = doc
        .get("write_files")
        .and_then(Value::as_sequence)
        .into_iter()
        .flatten()
        .find(|f| f.get("path").and_then(Value::as_str) == Some(RUNNER_CONFIG_PATH))
        .ok_or(UserDataError::NoRunnerConfig)?;
    let content = match entry.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(UserDataError::BadContent),
    };
    let encoding = entry
        .get("encoding")
        .and_then(Value::as_str)
        .unwrap_or("text/plain")
        .to_ascii_lowercase();
    match encoding.as_str() {
        "text/plain" => Ok(content),
        "b64" | "base64" => {
            let compact: String = content.split_whitespace().collect();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(compact.as_bytes())
                .map_err(|_| UserDataError::BadContent)?;
            String::from_utf8(bytes).map_err(|_| UserDataError::BadContent)
        }
        other => Err(UserDataError::UnsupportedEncoding(other.to_string())),
    }
}

fn opt_str<'a>(
    doc: &'a Value,
    section: &str,
    key: &'static str,
) -> Result<Option<&'a str>, RunnerConfigError> {
    match doc.get(section).and_then(|s| s.get(key)) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(RunnerConfigError::WrongType(key)),
    }
}

/// Parses a Go-style duration (`10m`, `1h30m`, `90s`); zero means none.
fn parse_idle_timeout(s: &str) -> Result<Option<Duration>, RunnerConfigError> {
    let s = s.trim();
    if s == "0" {
        return Ok(None);
    }
    let d = humantime::parse_duration(s).map_err(|_| RunnerConfigError::BadIdleTimeout)?;
    Ok((!d.is_zero()).then_some(d))
}

impl RunnerConfig {
    /// The agent's part: parse `circleci-runner-config.yaml`.
    pub fn parse(content: &str) -> Result<RunnerConfig, RunnerConfigError> {
        let doc: Value = serde_norway::from_str(content)
            .map_err(|e| RunnerConfigError::InvalidYaml(yaml_error_location(&e)))?;
        if !doc.is_mapping() {
            return Err(RunnerConfigError::InvalidYaml(String::new()));
        }
        let auth_token = opt_str(&doc, "api", "auth_token")?
            .filter(|t| !t.trim().is_empty())
            .ok_or(RunnerConfigError::MissingToken)?
            .trim()
            .to_string();
        let url = opt_str(&doc, "api", "url")?
            .unwrap_or(DEFAULT_RUNNER_API_URL)
            .to_string();
        let name = opt_str(&doc, "runner", "name")?.map(str::to_string);
        let mode = match opt_str(&doc, "runner", "mode")? {
            None => RunnerMode::Continuous,
            Some("single-task") => RunnerMode::SingleTask,
            Some("continuous") => RunnerMode::Continuous,
            Some(_) => return Err(RunnerConfigError::BadMode),
        };
        let idle_timeout = match opt_str(&doc, "runner", "idle_timeout")? {
            None => None,
            Some(s) => parse_idle_timeout(s)?,
        };
        Ok(RunnerConfig {
            auth_token,
            url,
            name,
            mode,
            idle_timeout,
        })
    }
}

/// Formats a duration the way Go's `time.ParseDuration` reads it.
pub fn go_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if d.subsec_nanos() != 0 {
        format!("{}ms", d.as_millis())
    } else if secs != 0 && secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs != 0 && secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

/// Renders a `#cloud-config` user-data document that writes a runner
/// configuration file the way the operator does (for tests and demos).
pub fn render_user_data(
    api_url: &str,
    runner_token: &str,
    mode: RunnerMode,
    idle_timeout: Option<Duration>,
) -> String {
    let mut runner = serde_json::json!({
        "mode": mode.as_str(),
        "working_directory": "/var/lib/circleci-runner/workdir",
        "cleanup_working_directory": true,
    });
    if let Some(d) = idle_timeout {
        runner["idle_timeout"] = go_duration(d).into();
    }
    let config = serde_json::json!({
        "api": {"auth_token": runner_token, "url": api_url},
        "runner": runner,
    });
    let content = serde_norway::to_string(&config).expect("a JSON value serializes as YAML");
    let cloud_config = serde_json::json!({
        "write_files": [{
            "path": RUNNER_CONFIG_PATH,
            "owner": "root:root",
            "permissions": "0600",
            "content": content,
        }],
        "runcmd": [["systemctl", "enable", "--now", "circleci-runner"]],
    });
    let body = serde_norway::to_string(&cloud_config).expect("a JSON value serializes as YAML");
    format!("#cloud-config\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_user_data_round_trips() {
        let ud = render_user_data(
            "http://127.0.0.1:1234",
            "tok: with 'quotes'",
            RunnerMode::SingleTask,
            Some(Duration::from_secs(600)),
        );
        let content = runner_config_file(Some(&ud)).unwrap();
        let cfg = RunnerConfig::parse(&content).unwrap();
        assert_eq!(cfg.auth_token, "tok: with 'quotes'");
        assert_eq!(cfg.url, "http://127.0.0.1:1234");
        assert_eq!(cfg.mode, RunnerMode::SingleTask);
        assert_eq!(cfg.idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(cfg.name, None);
    }

    #[test]
    fn base64_content_is_decoded() {
        let content = "api:\n  auth_token: secret\n  url: http://x\nrunner:\n  mode: continuous\n  idle_timeout: 1h30m\n";
        let b64 = base64::engine::general_purpose::STANDARD.encode(content);
        let ud = format!(
            "#cloud-config\nwrite_files:\n- path: /etc/other\n  content: hi\n- path: {RUNNER_CONFIG_PATH}\n  encoding: b64\n  content: {b64}\n"
        );
        let cfg = RunnerConfig::parse(&runner_config_file(Some(&ud)).unwrap()).unwrap();
        assert_eq!(cfg.mode, RunnerMode::Continuous);
        assert_eq!(cfg.idle_timeout, Some(Duration::from_secs(5400)));
    }

    #[test]
    fn broken_user_data_is_classified() {
        assert_eq!(runner_config_file(None), Err(UserDataError::Missing));
        assert_eq!(
            runner_config_file(Some("#!/bin/sh\necho hi\n")),
            Err(UserDataError::NotCloudConfig)
        );
        assert!(matches!(
            runner_config_file(Some("#cloud-config\n: : [\n")),
            Err(UserDataError::InvalidYaml(_))
        ));
        assert_eq!(
            runner_config_file(Some("#cloud-config\npackages: [jq]\n")),
            Err(UserDataError::NoRunnerConfig)
        );
        let gz = format!(
            "#cloud-config\nwrite_files:\n- path: {RUNNER_CONFIG_PATH}\n  encoding: gz+b64\n  content: abc\n"
        );
        assert_eq!(
            runner_config_file(Some(&gz)),
            Err(UserDataError::UnsupportedEncoding("gz+b64".into()))
        );
    }

    #[test]
    fn invalid_runner_config_errors_do_not_quote_the_token() {
        let err = RunnerConfig::parse("api:\n  auth_token: 123456789\n").unwrap_err();
        assert_eq!(err, RunnerConfigError::WrongType("auth_token"));
        assert!(!err.to_string().contains("123456789"));
        assert_eq!(
            RunnerConfig::parse("api: {url: http://x}\n").unwrap_err(),
            RunnerConfigError::MissingToken
        );
        assert_eq!(
            RunnerConfig::parse("api: {auth_token: t}\nrunner: {mode: once}\n").unwrap_err(),
            RunnerConfigError::BadMode
        );
        let cfg =
            RunnerConfig::parse("api: {auth_token: t}\nrunner: {idle_timeout: 0s}\n").unwrap();
        assert_eq!(cfg.idle_timeout, None);
        assert_eq!(cfg.url, DEFAULT_RUNNER_API_URL);
        assert!(!format!("{cfg:?}").contains("auth_token: \"t\""));
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration(Duration::from_secs(600)), "10m");
        assert_eq!(go_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(go_duration(Duration::from_secs(90)), "90s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
    }
}
