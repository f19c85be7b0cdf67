//! The RunnerPool status, built from what the scaler knows. Pure: the caller
//! passes the clock.
//!
//! Conditions (kstatus-compatible):
//! - `Stalled` True when the operator cannot act without a change by the user
//!   (invalid spec, missing Secret or key, name clash): kstatus `Failed`.
//! - `Reconciling` True while the pool's objects are not (yet) in place for
//!   the current generation: kstatus `InProgress`.
//! - `Degraded` True while CircleCI calls fail: the pool holds its size.
//! - `Ready` True when the objects are in place and the last poll succeeded.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::{
    CONDITION_DEGRADED, CONDITION_READY, CONDITION_RECONCILING, CONDITION_STALLED,
    REASON_AS_EXPECTED, REASON_CIRCLECI_UNAVAILABLE, REASON_PROGRESSING, REASON_RATE_LIMITED,
    REASON_RECONCILED, RunnerPoolStatus,
};
use crate::resources::{CondStatus, set_condition};

/// A reason and a message for a condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// PascalCase reason.
    pub reason: String,
    /// Human-readable message (never a secret).
    pub message: String,
}

impl Problem {
    /// A problem.
    pub fn new(reason: &str, message: impl Into<String>) -> Self {
        Self {
            reason: reason.to_string(),
            message: message.into(),
        }
    }
}

/// The last CircleCI poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PollState {
    /// Not polled yet (or polling is not possible: see `stalled`).
    NotYet,
    /// The last poll succeeded.
    Ok,
    /// The last poll failed; `rate_limited` for HTTP 429.
    Failed {
        /// What failed, without secrets.
        message: String,
        /// HTTP 429.
        rate_limited: bool,
        /// Consecutive failed polls.
        consecutive: u32,
    },
}

/// Everything the status says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Situation {
    /// `metadata.generation` this describes.
    pub generation: Option<i64>,
    /// Why the operator cannot act (Stalled).
    pub stalled: Option<Problem>,
    /// Why the objects are not in place yet (Reconciling), e.g. a failed apply.
    pub reconciling: Option<Problem>,
    /// The last poll.
    pub poll: PollState,
    /// Last known counts.
    pub unclaimed: Option<u32>,
    /// Last known counts.
    pub running: Option<u32>,
    /// Last computed desired size.
    pub desired: Option<u32>,
    /// VMs that exist and are not being deleted.
    pub replicas: Option<u32>,
    /// Ready VMs.
    pub ready: Option<u32>,
    /// Last successful poll.
    pub last_poll: Option<Time>,
    /// `status.selector`.
    pub selector: Option<String>,
    /// The active schedule entry.
    pub active_schedule: Option<String>,
    /// The forecast's learned peaks, when forecasting is on.
    pub forecast: Option<Vec<u32>>,
}

fn as_i32(n: Option<u32>) -> Option<i32> {
    n.map(|n| n.min(i32::MAX as u32) as i32)
}

/// The status for `s`, keeping `previous` conditions' transition times.
pub fn build_status(s: &Situation, previous: &[Condition], now: Time) -> RunnerPoolStatus {
    let mut conditions = previous.to_vec();
    let g = s.generation;
    let mut set = |t: &str, st: CondStatus, reason: &str, msg: &str| {
        set_condition(&mut conditions, t, st, reason, msg, g, now.clone());
    };

    match &s.stalled {
        Some(p) => set(CONDITION_STALLED, CondStatus::True, &p.reason, &p.message),
        None => set(CONDITION_STALLED, CondStatus::False, REASON_AS_EXPECTED, ""),
    }
    match (&s.stalled, &s.reconciling) {
        (None, Some(p)) => set(
            CONDITION_RECONCILING,
            CondStatus::True,
            &p.reason,
            &p.message,
        ),
        _ => set(
            CONDITION_RECONCILING,
            CondStatus::False,
            REASON_RECONCILED,
            "",
        ),
    }
    let degraded = match &s.poll {
        PollState::Failed {
            message,
            rate_limited,
            consecutive,
        } if s.stalled.is_none() => {
            let reason = if *rate_limited {
                REASON_RATE_LIMITED
            } else {
                REASON_CIRCLECI_UNAVAILABLE
            };
            let msg = format!(
                "CircleCI API: {message} ({consecutive} failed poll{}); the pool keeps its size",
                if *consecutive == 1 { "" } else { "s" }
            );
            set(CONDITION_DEGRADED, CondStatus::True, reason, &msg);
            Some((reason, msg))
        }
        _ => {
            set(
                CONDITION_DEGRADED,
                CondStatus::False,
                REASON_AS_EXPECTED,
                "",
            );
            None
        }
    };
    if let Some(p) = &s.stalled {
        set(CONDITION_READY, CondStatus::False, &p.reason, &p.message);
    } else if let Some(p) = &s.reconciling {
        set(CONDITION_READY, CondStatus::False, &p.reason, &p.message);
    } else if let Some((reason, msg)) = &degraded {
        set(CONDITION_READY, CondStatus::False, reason, msg);
    } else if s.poll == PollState::NotYet {
        set(
            CONDITION_READY,
            CondStatus::False,
            REASON_PROGRESSING,
            "waiting for the first CircleCI poll",
        );
    } else {
        set(
            CONDITION_READY,
            CondStatus::True,
            REASON_RECONCILED,
            "the pool is sized to the CircleCI task queue",
        );
    }
    conditions.sort_by_key(|c| condition_rank(&c.type_));

    RunnerPoolStatus {
        observed_generation: g,
        unclaimed_tasks: as_i32(s.unclaimed),
        running_tasks: as_i32(s.running),
        desired_replicas: as_i32(s.desired),
        replicas: as_i32(s.replicas),
        ready_replicas: as_i32(s.ready),
        last_poll_time: s.last_poll.clone(),
        selector: s.selector.clone(),
        active_schedule: s.active_schedule.clone(),
        forecast_hourly_peaks: s.forecast.clone(),
        conditions,
    }
}

fn condition_rank(t: &str) -> usize {
    [
        CONDITION_READY,
        CONDITION_RECONCILING,
        CONDITION_STALLED,
        CONDITION_DEGRADED,
    ]
    .iter()
    .position(|x| *x == t)
    .unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid"))
    }

    fn ok() -> Situation {
        Situation {
            generation: Some(2),
            stalled: None,
            reconciling: None,
            poll: PollState::Ok,
            unclaimed: Some(1),
            running: Some(2),
            desired: Some(3),
            replicas: Some(3),
            ready: Some(2),
            last_poll: Some(t(100)),
            selector: Some("runners.provisioner.dev/pool=p".into()),
            active_schedule: None,
            forecast: None,
        }
    }

    fn cond<'a>(s: &'a RunnerPoolStatus, t: &str) -> &'a Condition {
        s.condition(t).unwrap_or_else(|| panic!("{t} missing"))
    }

    #[test]
    fn healthy_pool_is_ready_and_nothing_else() {
        let s = build_status(&ok(), &[], t(100));
        assert_eq!(cond(&s, CONDITION_READY).status, "True");
        assert_eq!(cond(&s, CONDITION_STALLED).status, "False");
        assert_eq!(cond(&s, CONDITION_RECONCILING).status, "False");
        assert_eq!(cond(&s, CONDITION_DEGRADED).status, "False");
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.desired_replicas, Some(3));
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(2))
        );
        assert_eq!(s.conditions[0].type_, CONDITION_READY, "Ready first");
    }

    #[test]
    fn circleci_failure_degrades_and_unreadies_then_recovers_keeping_times() {
        let mut sit = ok();
        sit.poll = PollState::Failed {
            message: "HTTP 503: CircleCI server error".into(),
            rate_limited: false,
            consecutive: 3,
        };
        let s1 = build_status(&sit, &[], t(10));
        let d = cond(&s1, CONDITION_DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", REASON_CIRCLECI_UNAVAILABLE)
        );
        assert!(d.message.contains("503") && d.message.contains("3 failed polls"));
        assert_eq!(cond(&s1, CONDITION_READY).status, "False");
        assert_eq!(
            cond(&s1, CONDITION_STALLED).status,
            "False",
            "not the user's fault"
        );

        sit.poll = PollState::Failed {
            message: "rate limited".into(),
            rate_limited: true,
            consecutive: 4,
        };
        let s2 = build_status(&sit, &s1.conditions, t(20));
        let d = cond(&s2, CONDITION_DEGRADED);
        assert_eq!(d.reason, REASON_RATE_LIMITED);
        assert_eq!(
            d.last_transition_time,
            t(10),
            "still True: transition time kept"
        );

        let s3 = build_status(&ok(), &s2.conditions, t(30));
        assert_eq!(cond(&s3, CONDITION_DEGRADED).status, "False");
        assert_eq!(cond(&s3, CONDITION_DEGRADED).last_transition_time, t(30));
        assert_eq!(cond(&s3, CONDITION_READY).status, "True");
    }

    #[test]
    fn stalled_wins_over_everything() {
        let mut sit = ok();
        sit.stalled = Some(Problem::new(
            "SecretNotFound",
            "Secret ns/api (referenced by spec.circleci.apiTokenSecretRef) not found",
        ));
        sit.reconciling = Some(Problem::new("ApplyFailed", "x"));
        sit.poll = PollState::Failed {
            message: "x".into(),
            rate_limited: false,
            consecutive: 1,
        };
        let s = build_status(&sit, &[], t(1));
        assert_eq!(cond(&s, CONDITION_STALLED).status, "True");
        assert_eq!(cond(&s, CONDITION_READY).reason, "SecretNotFound");
        assert_eq!(cond(&s, CONDITION_RECONCILING).status, "False");
        assert_eq!(
            cond(&s, CONDITION_DEGRADED).status,
            "False",
            "no polling while stalled"
        );
    }

    #[test]
    fn not_ready_before_the_first_poll_or_while_reconciling() {
        let mut sit = ok();
        sit.poll = PollState::NotYet;
        let s = build_status(&sit, &[], t(1));
        assert_eq!(cond(&s, CONDITION_READY).status, "False");
        assert_eq!(cond(&s, CONDITION_READY).reason, REASON_PROGRESSING);
        let mut sit = ok();
        sit.reconciling = Some(Problem::new(REASON_PROGRESSING, "creating"));
        let s = build_status(&sit, &[], t(1));
        assert_eq!(cond(&s, CONDITION_RECONCILING).status, "True");
        assert_eq!(cond(&s, CONDITION_READY).status, "False");
    }
}
