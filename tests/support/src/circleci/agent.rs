//! Simulated `circleci-runner` agents: one per guest boot.
//!
//! What a booted guest does, by what its user-data holds:
//!
//! | user-data | agent | VM |
//! |---|---|---|
//! | missing, not `#cloud-config`, no runner config entry, undecodable | never starts (state `stalled`, problem `broken_user_data`) | never powers itself off |
//! | runner config present but rejected (not YAML, no `api.auth_token`, bad `mode`/`idle_timeout`) | exits when it starts (after the registration delay; `invalid_runner_config`) | powers off |
//! | `api.url` is not this simulator | cannot connect, never claims (`wrong_url`) | powers off after `idle_timeout` if set, else never |
//! | `api.auth_token` is no class's runner token | rejected, never claims (`unknown_token`) | powers off after `idle_timeout` if set, else never |
//! | valid | after the registration delay it is listed and claims the oldest task of its class as soon as one exists (and the org concurrency limit allows), runs it for its duration, then exits (`single-task`) or claims again (`continuous`) | powers off when the agent exits (single-task, or `idle_timeout` without a claim) |
//!
//! The idle timer starts when the agent starts (after the registration
//! delay) and restarts after each task, as `runner.idle_timeout` does.
//! Durations are simulated: they run `TimeScale` times faster.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::model::{AgentInfo, AgentProblem, AgentState, ExitReason};
use super::state::{Claim, Inner};
use super::userdata::{RunnerConfig, RunnerMode, runner_config_file};
use crate::guest::{GuestBoot, GuestRuntime, PowerOff};

/// True when `candidate` names the same server as `base`: same scheme, host
/// and port (default ports filled in), and no path beyond a trailing slash.
pub(crate) fn same_base_url(candidate: &str, base: &str) -> bool {
    let (Ok(c), Ok(b)) = (Url::parse(candidate.trim()), Url::parse(base)) else {
        return false;
    };
    c.scheme() == b.scheme()
        && c.host() == b.host()
        && c.port_or_known_default() == b.port_or_known_default()
        && c.path().trim_end_matches('/') == b.path().trim_end_matches('/')
        && c.query().is_none()
}

/// What an agent will do, decided at boot.
#[derive(Debug)]
enum Plan {
    /// Cloud-init never wrote the config: nothing runs.
    NeverStarts,
    /// The agent starts and exits at once.
    ConfigError,
    /// Runs, never claims; exits after the idle timeout if one is set.
    Stalled { idle_timeout: Option<Duration> },
    /// Claims tasks of its class.
    Claims {
        mode: RunnerMode,
        idle_timeout: Option<Duration>,
    },
}

/// The [`GuestRuntime`] the KubeVirt simulator drives: every boot starts a
/// simulated agent in the simulator's task queues.
pub(crate) struct SimGuest(pub Arc<Inner>);

impl GuestRuntime for SimGuest {
    fn boot(&self, boot: GuestBoot, power_off: PowerOff) {
        let inner = &self.0;
        if inner.shutdown.is_cancelled() {
            tracing::debug!(vm = %boot.vm_name, "circleci sim stopped; guest boot ignored");
            return;
        }
        let now = inner.clock.sim_secs();
        let mut name = boot.vm_name.clone();
        let mut mode = None;
        let mut class = None;
        let (plan, problem) = match runner_config_file(boot.user_data.as_deref()) {
            Err(e) => {
                tracing::warn!(
                    namespace = %boot.namespace, vm = %boot.vm_name,
                    "guest cloud-init did not write the runner config ({e}); the runner never starts"
                );
                (Plan::NeverStarts, Some(AgentProblem::BrokenUserData))
            }
            Ok(content) => match RunnerConfig::parse(&content) {
                Err(e) => {
                    tracing::warn!(
                        namespace = %boot.namespace, vm = %boot.vm_name,
                        "guest runner rejects its config ({e}); it exits at start"
                    );
                    (Plan::ConfigError, Some(AgentProblem::InvalidRunnerConfig))
                }
                Ok(cfg) => {
                    if let Some(n) = &cfg.name {
                        name = n.clone();
                    }
                    mode = Some(cfg.mode);
                    if !same_base_url(&cfg.url, &inner.base_url) {
                        tracing::warn!(
                            namespace = %boot.namespace, vm = %boot.vm_name,
                            "guest runner api.url is not this simulator; it can never connect or claim"
                        );
                        (
                            Plan::Stalled {
                                idle_timeout: cfg.idle_timeout,
                            },
                            Some(AgentProblem::WrongUrl),
                        )
                    } else {
                        class = inner.lock().class_for_runner_token(&cfg.auth_token);
                        match &class {
                            None => {
                                tracing::warn!(
                                    namespace = %boot.namespace, vm = %boot.vm_name,
                                    "guest runner token is not registered for any resource class; it never claims"
                                );
                                (
                                    Plan::Stalled {
                                        idle_timeout: cfg.idle_timeout,
                                    },
                                    Some(AgentProblem::UnknownToken),
                                )
                            }
                            Some(c) => {
                                tracing::info!(
                                    namespace = %boot.namespace, vm = %boot.vm_name, resource_class = %c,
                                    mode = cfg.mode.as_str(), "guest runner starting"
                                );
                                (
                                    Plan::Claims {
                                        mode: cfg.mode,
                                        idle_timeout: cfg.idle_timeout,
                                    },
                                    None,
                                )
                            }
                        }
                    }
                }
            },
        };
        let cancel = inner.shutdown.child_token();
        let info = AgentInfo {
            namespace: boot.namespace,
            vm_name: boot.vm_name,
            vmi_uid: boot.vmi_uid,
            name,
            resource_class: class,
            mode,
            state: if problem.is_some() {
                AgentState::Stalled
            } else {
                AgentState::Starting
            },
            problem,
            exit_reason: None,
            booted_at: now,
            registered_at: None,
            exited_at: None,
            current_task: None,
            tasks_run: 0,
            powered_off: false,
        };
        let id = inner.lock().add_agent(info, cancel.clone());
        if matches!(plan, Plan::NeverStarts) {
            return;
        }
        let inner = inner.clone();
        inner
            .runtime
            .clone()
            .spawn(run_agent(inner, id, plan, cancel, power_off));
    }

    fn vanish(&self, vmi_uid: &str) {
        let inner = &self.0;
        let now = inner.clock.sim_secs();
        let killed = inner.lock().vanish(vmi_uid, now, inner.wall_now());
        if let Some(task) = killed {
            tracing::info!(vmi_uid, task = %task, "guest vanished while running a task; task killed and re-queued");
            inner.changed.notify_waiters();
        }
    }
}

/// Sleeps `d`; false if cancelled first.
async fn sleep_or_cancel(cancel: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Marks the agent exited and powers the guest off (unless it vanished).
fn exit_and_power_off(inner: &Inner, id: u64, reason: ExitReason, power_off: PowerOff) {
    let exited = inner
        .lock()
        .exit(id, reason, inner.clock.sim_secs(), inner.wall_now());
    if exited {
        tracing::debug!(agent = id, ?reason, "guest runner exited; powering off");
        power_off.power_off();
    }
}

async fn run_agent(
    inner: Arc<Inner>,
    id: u64,
    plan: Plan,
    cancel: CancellationToken,
    power_off: PowerOff,
) {
    let scale = inner.clock.scale;
    let delay = Duration::from_secs_f64(inner.lock().settings.registration_delay_secs);
    if !sleep_or_cancel(&cancel, scale.wall(delay)).await {
        return;
    }
    let (mode, idle_timeout) = match plan {
        Plan::NeverStarts => return,
        Plan::ConfigError => {
            exit_and_power_off(&inner, id, ExitReason::ConfigError, power_off);
            return;
        }
        Plan::Stalled {
            idle_timeout: Some(idle),
        } => {
            if sleep_or_cancel(&cancel, scale.wall(idle)).await {
                exit_and_power_off(&inner, id, ExitReason::IdleTimeout, power_off);
            }
            return;
        }
        Plan::Stalled { idle_timeout: None } => return,
        Plan::Claims { mode, idle_timeout } => (mode, idle_timeout),
    };
    let registered = inner
        .lock()
        .register(id, inner.clock.sim_secs(), inner.wall_now());
    if !registered {
        return;
    }
    loop {
        let deadline = idle_timeout.map(|d| Instant::now() + scale.wall(d));
        let (task, serial, duration) = loop {
            let notified = inner.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let claim = inner
                .lock()
                .try_claim(id, inner.clock.sim_secs(), inner.wall_now());
            match claim {
                Claim::Got {
                    task,
                    serial,
                    duration,
                } => break (task, serial, duration),
                Claim::Gone => return,
                Claim::Wait => {}
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = cancel.cancelled() => return,
                _ = sleep_until_opt(deadline) => {
                    exit_and_power_off(&inner, id, ExitReason::IdleTimeout, power_off);
                    return;
                }
            }
        };
        tracing::debug!(agent = id, task = %task, "guest runner claimed a task");
        if !sleep_or_cancel(&cancel, scale.wall(duration)).await {
            return;
        }
        let single = mode == RunnerMode::SingleTask;
        // Exit (and power off) separately so the lock is not held meanwhile.
        let finished =
            inner
                .lock()
                .finish(id, serial, false, inner.clock.sim_secs(), inner.wall_now());
        inner.changed.notify_waiters();
        if !finished {
            return;
        }
        tracing::debug!(agent = id, task = %task, "guest runner finished a task");
        if single {
            exit_and_power_off(&inner, id, ExitReason::Completed, power_off);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_comparison() {
        let base = "http://127.0.0.1:8080";
        assert!(same_base_url("http://127.0.0.1:8080", base));
        assert!(same_base_url("http://127.0.0.1:8080/", base));
        assert!(same_base_url(" HTTP://127.0.0.1:8080/ ", base));
        assert!(!same_base_url("http://127.0.0.1:8081", base));
        assert!(!same_base_url("https://127.0.0.1:8080", base));
        assert!(!same_base_url("http://localhost:8080", base));
        assert!(!same_base_url("http://127.0.0.1:8080/api", base));
        assert!(!same_base_url("https://runner.circleci.com", base));
        assert!(!same_base_url("not a url", base));
        assert!(same_base_url(
            "https://runner.example.com:443/",
            "https://runner.example.com"
        ));
    }
}
