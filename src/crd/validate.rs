//! The operator-side check of a [`RunnerPoolSpec`]: everything the schema
//! checks (in case an object predates the current CRD) plus what it cannot
//! express (the free-form VMI template). Pure; the controller reports the
//! errors in status.

use std::time::Duration;

use serde_json::Value;

use super::{MIN_POLL_INTERVAL, RunnerPoolSpec};
use crate::resources::{BUNDLE_VOLUME, CLOUDINIT_VOLUME, POOL_LABEL};
use crate::scaler::policy::Controls;
use crate::scaler::schedule::{self, Schedule};

/// A spec that passed [`validate`], with its durations parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidSpec {
    /// `spec.resourceClass`.
    pub resource_class: String,
    /// `spec.circleci.apiUrl`, without a trailing `/`.
    pub api_url: String,
    /// `spec.scaling.minReplicas`.
    pub min_replicas: i32,
    /// `spec.scaling.maxReplicas`.
    pub max_replicas: i32,
    /// `spec.scaling.idleTimeout`; `None` when it is zero (never time out).
    pub idle_timeout: Option<Duration>,
    /// `spec.scaling.pollInterval` (at least 1s).
    pub poll_interval: Duration,
    /// `spec.runner.maxRunTime`.
    pub max_run_time: Option<Duration>,
    /// `spec.scaling.idlePollInterval` (zero: off).
    pub idle_poll_interval: Duration,
    /// `spec.scaling.headroom`.
    pub headroom: u32,
    /// `spec.scaling.idleBuffer`.
    pub idle_buffer: u32,
    /// `spec.scaling.maxSurge`.
    pub max_surge: Option<u32>,
    /// `spec.scaling.burstPercent`.
    pub burst_percent: u32,
    /// `spec.scaling.retireSurplusBooting`.
    pub retire_booting: bool,
    /// `spec.scaling.scaleDownDelay`.
    pub scale_down_delay: Duration,
    /// `spec.scaling.schedules`, parsed.
    pub schedules: Vec<Schedule>,
    /// `spec.scaling.forecast.percent` when forecasting is on.
    pub forecast_percent: Option<u32>,
}

impl ValidSpec {
    /// The controls in force at `t`: the spec's numbers, overridden by the
    /// first active schedule (whose name is returned), with `warm` (the
    /// forecast's warm pool) as an extra floor.
    pub fn controls_at(&self, t: jiff::Timestamp, warm: u32) -> (Controls, Option<&str>) {
        let mut c = Controls {
            min: self.min_replicas.max(0) as u32,
            max: self.max_replicas.max(0) as u32,
            headroom: self.headroom,
            idle_buffer: self.idle_buffer,
            max_surge: self.max_surge,
            scale_down_delay_secs: self.scale_down_delay.as_secs(),
            warm,
            burst_percent: self.burst_percent,
            retire_booting: self.retire_booting,
        };
        let active = schedule::active(&self.schedules, t);
        if let Some(s) = active {
            let o = &s.overrides;
            c.min = o.min.unwrap_or(c.min);
            c.max = o.max.unwrap_or(c.max);
            c.headroom = o.headroom.unwrap_or(c.headroom);
            c.idle_buffer = o.idle_buffer.unwrap_or(c.idle_buffer);
            c.max_surge = o.max_surge.or(c.max_surge);
            c.scale_down_delay_secs = o
                .scale_down_delay
                .map_or(c.scale_down_delay_secs, |d| d.as_secs());
        }
        (c, active.map(|s| s.name.as_str()))
    }
}

/// Checks a spec. On failure, returns every problem found, each prefixed with
/// the field path (`spec.scaling.minReplicas: ...`), suitable for a status
/// condition message.
pub fn validate(spec: &RunnerPoolSpec) -> Result<ValidSpec, Vec<String>> {
    let mut errs = Vec::new();

    if !is_resource_class(&spec.resource_class) {
        errs.push(format!(
            "spec.resourceClass: {:?} is not a CircleCI resource class: expected namespace/name, \
             namespace of [a-z0-9_-], name of [A-Za-z0-9:_+-]",
            spec.resource_class
        ));
    }

    let api_url = check_api_url(&spec.circleci.api_url, &mut errs);

    let scaling = &spec.scaling;
    if scaling.min_replicas < 0 {
        errs.push("spec.scaling.minReplicas: must be at least 0".into());
    }
    if scaling.max_replicas < 0 {
        errs.push("spec.scaling.maxReplicas: must be at least 0".into());
    }
    if scaling.min_replicas > scaling.max_replicas {
        errs.push(format!(
            "spec.scaling.minReplicas: must not be greater than maxReplicas ({} > {})",
            scaling.min_replicas, scaling.max_replicas
        ));
    }
    let idle_timeout = duration("spec.scaling.idleTimeout", &scaling.idle_timeout, &mut errs)
        .filter(|d| !d.is_zero());
    let poll_interval = duration(
        "spec.scaling.pollInterval",
        &scaling.poll_interval,
        &mut errs,
    );
    if let Some(p) = poll_interval
        && p < MIN_POLL_INTERVAL
    {
        errs.push(format!(
            "spec.scaling.pollInterval: must be at least 1s (got {})",
            scaling.poll_interval
        ));
    }

    let scale_down_delay = duration(
        "spec.scaling.scaleDownDelay",
        &scaling.scale_down_delay,
        &mut errs,
    );
    if let (Some(idle), Some(delay)) = (idle_timeout, scale_down_delay)
        && idle < delay
    {
        errs.push(format!(
            "spec.scaling.idleTimeout: must be at least scaleDownDelay ({} < {})",
            scaling.idle_timeout, scaling.scale_down_delay
        ));
    }
    let nonneg = |field: &str, v: i32, errs: &mut Vec<String>| {
        if v < 0 {
            errs.push(format!("spec.scaling.{field}: must be at least 0"));
        }
        v.max(0) as u32
    };
    let idle_poll_interval = duration(
        "spec.scaling.idlePollInterval",
        &scaling.idle_poll_interval,
        &mut errs,
    )
    .unwrap_or_default();
    let headroom = nonneg("headroom", scaling.headroom, &mut errs);
    let idle_buffer = nonneg("idleBuffer", scaling.idle_buffer, &mut errs);
    let burst_percent = nonneg("burstPercent", scaling.burst_percent, &mut errs);
    let max_surge = match scaling.max_surge {
        Some(v) if v < 1 => {
            errs.push("spec.scaling.maxSurge: must be at least 1".into());
            None
        }
        v => v.map(|v| v as u32),
    };
    let mut schedules = Vec::new();
    for (i, sch) in scaling.schedules.iter().enumerate() {
        if scaling.schedules[..i].iter().any(|o| o.name == sch.name) {
            errs.push(format!(
                "spec.scaling.schedules[{i}].name: {:?} is used twice",
                sch.name
            ));
        }
        match schedule::parse(i, sch) {
            Ok(s) => schedules.push(s),
            Err(e) => errs.extend(e),
        }
    }
    let forecast = &scaling.forecast;
    if !(0..=100).contains(&forecast.percent) {
        errs.push("spec.scaling.forecast.percent: must be between 0 and 100".into());
    }
    let forecast_percent = forecast
        .enabled
        .then_some(forecast.percent.clamp(0, 100) as u32);

    let max_run_time = spec
        .runner
        .max_run_time
        .as_deref()
        .and_then(|s| duration("spec.runner.maxRunTime", s, &mut errs));
    if let Some(dir) = &spec.runner.working_directory
        && !dir.starts_with('/')
    {
        errs.push("spec.runner.workingDirectory: must be an absolute path".into());
    }

    if spec.user_data.is_some() && spec.user_data_secret_ref.is_some() {
        errs.push("spec: set at most one of userData and userDataSecretRef".into());
    }

    let bundle = &spec.runner_bundle;
    if bundle.tag.is_some() && bundle.digest.is_some() {
        errs.push("spec.runnerBundle: set either tag or digest, not both".into());
    }
    if bundle.enabled && (bundle.image.is_empty() || bundle.image.contains('@')) {
        errs.push(
            "spec.runnerBundle.image: must be an image repository without tag or digest".into(),
        );
    }

    for key in spec.template.metadata.labels.keys() {
        if key.starts_with("runners.provisioner.dev/") || key == POOL_LABEL {
            errs.push(format!(
                "spec.template.metadata.labels: {key:?} is reserved for the operator"
            ));
        }
    }
    check_vmi_spec(&spec.template.spec, &mut errs);

    if errs.is_empty() {
        Ok(ValidSpec {
            resource_class: spec.resource_class.clone(),
            api_url: api_url.unwrap_or_default(),
            min_replicas: scaling.min_replicas,
            max_replicas: scaling.max_replicas,
            idle_timeout,
            poll_interval: poll_interval.unwrap_or(MIN_POLL_INTERVAL),
            max_run_time,
            idle_poll_interval,
            headroom,
            idle_buffer,
            max_surge,
            burst_percent,
            retire_booting: scaling.retire_surplus_booting,
            scale_down_delay: scale_down_delay.unwrap_or_default(),
            schedules,
            forecast_percent,
        })
    } else {
        Err(errs)
    }
}

/// `namespace/name` in CircleCI's charset.
pub fn is_resource_class(s: &str) -> bool {
    let Some((ns, name)) = s.split_once('/') else {
        return false;
    };
    !ns.is_empty()
        && !name.is_empty()
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_:+-".contains(&b))
}

fn check_api_url(s: &str, errs: &mut Vec<String>) -> Option<String> {
    match reqwest::Url::parse(s) {
        Ok(u)
            if matches!(u.scheme(), "http" | "https")
                && u.host_str().is_some_and(|h| !h.is_empty()) =>
        {
            Some(s.trim_end_matches('/').to_string())
        }
        Ok(_) => {
            errs.push(format!(
                "spec.circleci.apiUrl: {s:?} must be an http or https URL"
            ));
            None
        }
        Err(e) => {
            errs.push(format!("spec.circleci.apiUrl: {s:?} is not a URL: {e}"));
            None
        }
    }
}

/// Parses a Go duration (the syntax of CEL's `duration()` and of the runner
/// agent's config).
fn duration(field: &str, s: &str, errs: &mut Vec<String>) -> Option<Duration> {
    if s.trim().is_empty() {
        errs.push(format!(
            "{field}: must be a duration such as 30s, 10m or 1h30m (got an empty string)"
        ));
        return None;
    }
    match s.parse::<kube::core::Duration>() {
        Ok(d) if d.is_negative() => {
            errs.push(format!("{field}: must not be negative (got {s})"));
            None
        }
        Ok(d) => Some(d.into()),
        Err(e) => {
            errs.push(format!(
                "{field}: {s:?} is not a duration such as 30s, 10m or 1h30m: {e}"
            ));
            None
        }
    }
}

/// What the schema cannot check in the free-form VMI spec.
fn check_vmi_spec(spec: &Value, errs: &mut Vec<String>) {
    const AT: &str = "spec.template.spec";
    let Some(obj) = spec.as_object() else {
        errs.push(format!(
            "{AT}: must be an object (a KubeVirt VirtualMachineInstanceSpec)"
        ));
        return;
    };
    if let Some(vols) = obj.get("volumes") {
        match vols.as_array() {
            None => errs.push(format!("{AT}.volumes: must be a list")),
            Some(vols) => {
                for (i, v) in vols.iter().enumerate() {
                    let name = v.get("name").and_then(Value::as_str);
                    if name.is_none() {
                        errs.push(format!("{AT}.volumes[{i}]: must be an object with a name"));
                    }
                    if let Some(n) = name
                        && (n == CLOUDINIT_VOLUME || n == BUNDLE_VOLUME)
                    {
                        errs.push(format!(
                            "{AT}.volumes[{i}]: the name {n:?} is reserved for the operator"
                        ));
                    }
                    if v.get("cloudInitNoCloud").is_some()
                        || v.get("cloudInitConfigDrive").is_some()
                    {
                        errs.push(format!(
                            "{AT}.volumes[{i}]: the operator provides the cloud-init volume; \
                             put your script in spec.userData instead"
                        ));
                    }
                }
            }
        }
    }
    let devices = obj.get("domain").and_then(|d| d.get("devices"));
    for list in ["disks", "interfaces"] {
        if let Some(l) = devices.and_then(|d| d.get(list)) {
            match l.as_array() {
                None => errs.push(format!("{AT}.domain.devices.{list}: must be a list")),
                Some(items) if list == "disks" => {
                    for (i, d) in items.iter().enumerate() {
                        if let Some(n) = d.get("name").and_then(Value::as_str)
                            && (n == CLOUDINIT_VOLUME || n == BUNDLE_VOLUME)
                        {
                            errs.push(format!(
                                "{AT}.domain.devices.disks[{i}]: the name {n:?} is reserved for the operator"
                            ));
                        }
                    }
                }
                Some(_) => {}
            }
        }
    }
    if let Some(n) = obj.get("networks")
        && !n.is_array()
    {
        errs.push(format!("{AT}.networks: must be a list"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::RunnerPool;

    fn spec(yaml: &str) -> RunnerPoolSpec {
        let pool: RunnerPool = serde_norway::from_str(yaml).expect("test YAML parses");
        pool.spec
    }

    const MINIMAL: &str = r#"
apiVersion: runners.provisioner.dev/v1alpha1
kind: RunnerPool
metadata: {name: p, namespace: ci}
spec:
  resourceClass: my-org/linux-large
  circleci:
    apiTokenSecretRef: {name: circleci-api}
    runnerTokenSecretRef: {name: linux-large-runner}
  scaling: {maxReplicas: 10}
"#;

    #[test]
    fn minimal_spec_is_valid_with_defaults() {
        let v = validate(&spec(MINIMAL)).expect("valid");
        assert_eq!(v.resource_class, "my-org/linux-large");
        assert_eq!(v.api_url, "https://runner.circleci.com");
        assert_eq!(v.min_replicas, 0);
        assert_eq!(v.max_replicas, 10);
        assert_eq!(v.poll_interval, Duration::from_secs(5));
        assert_eq!(v.idle_timeout, Some(Duration::from_secs(600)));
        assert_eq!(v.max_run_time, None);
    }

    #[test]
    fn go_durations_are_parsed() {
        let mut s = spec(MINIMAL);
        s.scaling.idle_timeout = "1h30m".into();
        s.scaling.poll_interval = "1.5s".into();
        s.runner.max_run_time = Some("5h".into());
        let v = validate(&s).expect("valid");
        assert_eq!(v.idle_timeout, Some(Duration::from_secs(5400)));
        assert_eq!(v.poll_interval, Duration::from_millis(1500));
        assert_eq!(v.max_run_time, Some(Duration::from_secs(5 * 3600)));
    }

    #[test]
    fn zero_idle_timeout_means_never() {
        let mut s = spec(MINIMAL);
        s.scaling.idle_timeout = "0s".into();
        assert_eq!(validate(&s).expect("valid").idle_timeout, None);
    }

    fn errors(s: &RunnerPoolSpec) -> Vec<String> {
        validate(s).expect_err("invalid")
    }

    #[test]
    fn min_greater_than_max_is_rejected() {
        let mut s = spec(MINIMAL);
        s.scaling.min_replicas = 11;
        let e = errors(&s);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("spec.scaling.minReplicas: must not be greater"),
            "{e:?}"
        );
    }

    #[test]
    fn negative_replicas_are_rejected() {
        let mut s = spec(MINIMAL);
        s.scaling.min_replicas = -1;
        assert!(
            errors(&s)
                .iter()
                .any(|e| e.contains("minReplicas: must be at least 0"))
        );
    }

    #[test]
    fn bad_resource_classes_are_rejected() {
        for bad in [
            "linux",
            "My-Org/linux",
            "org/",
            "/x",
            "org/a b",
            "org/x/y",
            "org/é",
        ] {
            let mut s = spec(MINIMAL);
            s.resource_class = bad.into();
            assert!(
                errors(&s)[0].starts_with("spec.resourceClass:"),
                "{bad} should be rejected"
            );
        }
        for good in [
            "my-org/medium",
            "acme_corp/large-gpu",
            "dev-team/custom:arm64",
            "a/B+c",
        ] {
            let mut s = spec(MINIMAL);
            s.resource_class = good.into();
            assert!(validate(&s).is_ok(), "{good} should be accepted");
        }
    }

    #[test]
    fn bad_durations_are_rejected() {
        for bad in ["10", "ten minutes", "10 m", "1d", "-5s", ""] {
            let mut s = spec(MINIMAL);
            s.scaling.idle_timeout = bad.into();
            let e = errors(&s);
            assert!(
                e.iter().any(|e| e.starts_with("spec.scaling.idleTimeout:")),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn poll_interval_below_one_second_is_rejected() {
        let mut s = spec(MINIMAL);
        s.scaling.poll_interval = "500ms".into();
        assert!(
            errors(&s)
                .iter()
                .any(|e| e.contains("pollInterval: must be at least 1s"))
        );
        s.scaling.poll_interval = "1s".into();
        assert!(validate(&s).is_ok());
    }

    #[test]
    fn api_url_must_be_http() {
        for bad in [
            "runner.circleci.com",
            "ftp://x.example",
            "https://",
            "not a url",
        ] {
            let mut s = spec(MINIMAL);
            s.circleci.api_url = bad.into();
            assert!(
                errors(&s)
                    .iter()
                    .any(|e| e.starts_with("spec.circleci.apiUrl:")),
                "{bad} should be rejected"
            );
        }
        let mut s = spec(MINIMAL);
        s.circleci.api_url = "http://127.0.0.1:8080/".into();
        assert_eq!(
            validate(&s).expect("valid").api_url,
            "http://127.0.0.1:8080"
        );
    }

    #[test]
    fn user_data_and_secret_ref_are_exclusive() {
        let mut s = spec(MINIMAL);
        s.user_data = Some("apt-get install -y jq".into());
        assert!(validate(&s).is_ok());
        s.user_data_secret_ref = Some(crate::crd::UserDataSecretRef {
            name: "x".into(),
            key: "userData".into(),
        });
        assert!(
            errors(&s)
                .iter()
                .any(|e| e.contains("at most one of userData"))
        );
    }

    #[test]
    fn tag_and_digest_are_exclusive() {
        let mut s = spec(MINIMAL);
        s.runner_bundle.tag = Some("1.0".into());
        assert!(validate(&s).is_ok());
        s.runner_bundle.digest = Some(format!("sha256:{}", "a".repeat(64)));
        assert!(
            errors(&s)
                .iter()
                .any(|e| e.contains("either tag or digest"))
        );
    }

    #[test]
    fn relative_working_directory_is_rejected() {
        let mut s = spec(MINIMAL);
        s.runner.working_directory = Some("work".into());
        assert!(errors(&s).iter().any(|e| e.contains("workingDirectory")));
    }

    #[test]
    fn user_cloud_init_and_reserved_names_are_rejected() {
        let mut s = spec(MINIMAL);
        s.template.spec = serde_json::json!({
            "domain": {"devices": {"disks": [{"name": "rp-cloudinit"}]}},
            "volumes": [
                {"name": "rootdisk", "containerDisk": {"image": "x"}},
                {"name": "mine", "cloudInitNoCloud": {"userData": "#cloud-config"}},
                {"name": "rp-runner-bundle", "containerDisk": {"image": "y"}},
            ],
        });
        let e = errors(&s);
        assert!(
            e.iter()
                .any(|e| e.starts_with("spec.template.spec.volumes[1]: the operator provides")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|e| e.starts_with("spec.template.spec.volumes[2]: the name")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|e| e.starts_with("spec.template.spec.domain.devices.disks[0]: the name")),
            "{e:?}"
        );
        assert_eq!(e.len(), 3, "{e:?}");
    }

    #[test]
    fn malformed_template_shapes_are_rejected() {
        let mut s = spec(MINIMAL);
        s.template.spec = serde_json::json!("not an object");
        assert!(errors(&s)[0].contains("must be an object"));
        s.template.spec = serde_json::json!({"volumes": {}, "networks": "pod"});
        let e = errors(&s);
        assert!(
            e.iter().any(|e| e.contains("volumes: must be a list")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|e| e.contains("networks: must be a list")),
            "{e:?}"
        );
    }

    #[test]
    fn reserved_label_keys_are_rejected() {
        let mut s = spec(MINIMAL);
        s.template
            .metadata
            .labels
            .insert("runners.provisioner.dev/pool".into(), "x".into());
        assert!(errors(&s)[0].contains("reserved for the operator"));
    }

    #[test]
    fn examples_are_valid() {
        for (name, yaml) in [
            (
                "runnerpool-ubuntu.yaml",
                include_str!("../../examples/runnerpool-ubuntu.yaml"),
            ),
            (
                "runnerpool-minimal.yaml",
                include_str!("../../examples/runnerpool-minimal.yaml"),
            ),
        ] {
            let v = validate(&spec(yaml)).unwrap_or_else(|e| panic!("examples/{name}: {e:?}"));
            assert!(v.max_replicas > 0, "{name}");
        }
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut s = spec(MINIMAL);
        s.resource_class = "bad".into();
        s.scaling.min_replicas = 20;
        s.scaling.poll_interval = "0.1s".into();
        assert_eq!(errors(&s).len(), 3);
    }
}
