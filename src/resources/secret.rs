//! The Secret that carries each VM's cloud-init user-data.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::ObjectMeta;

use super::{BuildError, identity, labels};
use crate::cloudinit::{BootstrapConfig, render_user_data};
use crate::crd::RunnerPool;

/// Key of the user-data in the Secret (what KubeVirt's
/// `cloudInitNoCloud.secretRef` reads).
pub const USERDATA_KEY: &str = "userdata";

/// Secret values the controller read for a pool. `Debug` never prints them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ResolvedSecrets {
    /// The resource class (runner) token, from `circleci.runnerTokenSecretRef`.
    pub runner_token: String,
    /// The script from `userDataSecretRef`, when the pool uses one.
    pub user_data: Option<String>,
}

impl fmt::Debug for ResolvedSecrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedSecrets")
            .field("runner_token", &"<redacted>")
            .field("user_data", &self.user_data.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Name of the cloud-init Secret of pool `pool_name`: `<pool>-cloudinit`.
pub fn secret_name(pool_name: &str) -> String {
    format!("{pool_name}-cloudinit")
}

/// What the VMs of `pool` need to become runners.
pub fn bootstrap_config(pool: &RunnerPool, resolved: &ResolvedSecrets) -> BootstrapConfig {
    let spec = &pool.spec;
    let idle = spec.scaling.idle_timeout.trim();
    // `0s` (any zero duration) means "never": leave the agent's default.
    let idle_is_zero = idle
        .parse::<kube::core::Duration>()
        .is_ok_and(|d| std::time::Duration::from(d).is_zero());
    BootstrapConfig {
        runner_token: resolved.runner_token.clone(),
        api_url: spec.circleci.api_url.clone(),
        idle_timeout: (!idle.is_empty() && !idle_is_zero).then(|| idle.to_string()),
        working_directory: spec.runner.working_directory.clone(),
        command_prefix: spec.runner.command_prefix.clone(),
        max_run_time: spec.runner.max_run_time.clone(),
        grant_sudo: spec.runner.grant_sudo,
        user_script: spec
            .user_data
            .clone()
            .or_else(|| resolved.user_data.clone()),
        bundle: spec.runner_bundle.enabled,
        ..Default::default()
    }
}

/// The Secret `<pool>-cloudinit` (key [`USERDATA_KEY`]) with the cloud-init
/// user-data of every VM of the pool, labelled and controller-owned by the
/// RunnerPool. It is the only place the runner token goes.
pub fn user_data_secret(
    pool: &RunnerPool,
    resolved: &ResolvedSecrets,
) -> Result<Secret, BuildError> {
    let (name, namespace, owner) = identity(pool)?;
    let user_data = render_user_data(&bootstrap_config(pool, resolved));
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&name)),
            namespace: Some(namespace),
            labels: Some(labels(&name)),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            USERDATA_KEY.to_string(),
            ByteString(user_data.into_bytes()),
        )])),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::fixtures::{TOKEN, pool};
    use crate::resources::{MANAGED_BY_LABEL, POOL_LABEL};

    fn resolved() -> ResolvedSecrets {
        ResolvedSecrets {
            runner_token: TOKEN.into(),
            user_data: None,
        }
    }

    fn userdata(s: &Secret) -> String {
        let data = s.data.as_ref().expect("data");
        String::from_utf8(data[USERDATA_KEY].0.clone()).expect("utf-8")
    }

    #[test]
    fn secret_carries_the_user_data_with_the_token() {
        let s = user_data_secret(&pool(), &resolved()).expect("builds");
        let ud = userdata(&s);
        assert!(ud.starts_with("#cloud-config\n"), "{ud}");
        assert!(ud.contains(TOKEN));
        assert!(ud.contains("https://runner.circleci.com"));
        assert_eq!(s.type_.as_deref(), Some("Opaque"));
        assert!(
            s.string_data.is_none(),
            "stringData would fight server-side apply"
        );
    }

    #[test]
    fn secret_name_labels_and_owner() {
        let s = user_data_secret(&pool(), &resolved()).expect("builds");
        assert_eq!(s.metadata.name.as_deref(), Some("linux-large-cloudinit"));
        assert_eq!(s.metadata.namespace.as_deref(), Some("ci-runners"));
        let l = s.metadata.labels.as_ref().expect("labels");
        assert_eq!(l[POOL_LABEL], "linux-large");
        assert_eq!(l[MANAGED_BY_LABEL], "runner-provisioner");
        let owners = s.metadata.owner_references.as_ref().expect("owners");
        assert_eq!(owners.len(), 1);
        let o = &owners[0];
        assert_eq!(o.kind, "RunnerPool");
        assert_eq!(o.api_version, "runners.provisioner.dev/v1alpha1");
        assert_eq!(o.name, "linux-large");
        assert_eq!(o.uid, "6f1c1a8e-4a3b-4c55-9d1e-2b7f0f3c9a10");
        assert_eq!(o.controller, Some(true));
    }

    #[test]
    fn bootstrap_config_maps_the_spec() {
        let c = bootstrap_config(&pool(), &resolved());
        assert_eq!(c.runner_token, TOKEN);
        assert_eq!(c.api_url, "https://runner.circleci.com");
        assert_eq!(c.idle_timeout.as_deref(), Some("10m"));
        assert_eq!(
            c.working_directory.as_deref(),
            Some("/var/lib/circleci-runner/workdir")
        );
        assert_eq!(
            c.command_prefix,
            Some(vec![
                "sudo".into(),
                "-niHu".into(),
                "circleci".into(),
                "--".into()
            ])
        );
        assert_eq!(c.max_run_time, None);
        assert_eq!(c.user_script, None);
        assert!(c.bundle);
        assert!(!c.grant_sudo);
    }

    #[test]
    fn grant_sudo_writes_the_sudoers_drop_in() {
        let mut p = pool();
        let off = userdata(&user_data_secret(&p, &resolved()).expect("builds"));
        assert!(!off.contains(crate::cloudinit::SUDOERS_PATH), "{off}");
        p.spec.runner.grant_sudo = true;
        assert!(bootstrap_config(&p, &resolved()).grant_sudo);
        let on = userdata(&user_data_secret(&p, &resolved()).expect("builds"));
        assert!(on.contains(crate::cloudinit::SUDOERS_PATH), "{on}");
        assert!(on.contains(crate::cloudinit::SUDOERS_LINE), "{on}");
    }

    #[test]
    fn zero_idle_timeout_is_left_out() {
        let mut p = pool();
        p.spec.scaling.idle_timeout = "0s".into();
        assert_eq!(bootstrap_config(&p, &resolved()).idle_timeout, None);
        p.spec.scaling.idle_timeout = "1h30m".into();
        assert_eq!(
            bootstrap_config(&p, &resolved()).idle_timeout.as_deref(),
            Some("1h30m")
        );
    }

    #[test]
    fn user_script_comes_from_spec_or_secret() {
        let mut p = pool();
        let from_secret = ResolvedSecrets {
            runner_token: TOKEN.into(),
            user_data: Some("echo from-secret".into()),
        };
        assert_eq!(
            bootstrap_config(&p, &from_secret).user_script.as_deref(),
            Some("echo from-secret")
        );
        p.spec.user_data = Some("echo inline".into());
        assert_eq!(
            bootstrap_config(&p, &resolved()).user_script.as_deref(),
            Some("echo inline")
        );
        let s = user_data_secret(&p, &resolved()).expect("builds");
        assert!(userdata(&s).contains("echo inline"));
    }

    #[test]
    fn debug_redacts_secrets() {
        let r = ResolvedSecrets {
            runner_token: TOKEN.into(),
            user_data: Some("pw=hunter2".into()),
        };
        let d = format!("{r:?}");
        assert!(!d.contains(TOKEN) && !d.contains("hunter2"), "{d}");
        assert!(d.contains("<redacted>"));
    }

    #[test]
    fn missing_uid_is_an_error() {
        let mut p = pool();
        p.metadata.uid = None;
        assert_eq!(
            user_data_secret(&p, &resolved()).unwrap_err(),
            BuildError::MissingUid
        );
    }
}
