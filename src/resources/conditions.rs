//! Status conditions (`metav1.Condition`) helpers.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::crd::RunnerPoolStatus;

/// The `status` of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CondStatus {
    /// `True`.
    True,
    /// `False`.
    False,
    /// `Unknown`.
    Unknown,
}

impl CondStatus {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl From<bool> for CondStatus {
    fn from(b: bool) -> Self {
        if b { Self::True } else { Self::False }
    }
}

/// Sets condition `type_` in `conditions` (adding it if absent). Its
/// `lastTransitionTime` becomes `now` only when the condition is new or its
/// status flips; reason, message and observedGeneration are always updated.
/// Returns whether anything changed.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: CondStatus,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
    now: Time,
) -> bool {
    let status = status.as_str();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let changed = c.status != status
                || c.reason != reason
                || c.message != message
                || c.observed_generation != observed_generation;
            if c.status != status {
                c.last_transition_time = now;
                c.status = status.to_string();
            }
            c.reason = reason.to_string();
            c.message = message.to_string();
            c.observed_generation = observed_generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_string(),
                status: status.to_string(),
                reason: reason.to_string(),
                message: message.to_string(),
                observed_generation,
                last_transition_time: now,
            });
            true
        }
    }
}

/// Whether two statuses are equal when every timestamp is ignored
/// (`lastPollTime` and the conditions' `lastTransitionTime`) and conditions
/// are compared by type, in any order. Use it to skip status writes that
/// would only move a clock: each write is a watch event.
pub fn status_equal_ignoring_time(a: &RunnerPoolStatus, b: &RunnerPoolStatus) -> bool {
    fn normalised(s: &RunnerPoolStatus) -> RunnerPoolStatus {
        let mut s = s.clone();
        s.last_poll_time = None;
        let epoch = Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH);
        for c in &mut s.conditions {
            c.last_transition_time = epoch.clone();
        }
        s.conditions.sort_by(|x, y| x.type_.cmp(&y.type_));
        s
    }
    normalised(a) == normalised(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{CONDITION_DEGRADED, CONDITION_READY};
    use k8s_openapi::jiff::Timestamp;

    fn t(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).expect("valid"))
    }

    #[test]
    fn new_condition_is_added() {
        let mut cs = vec![];
        assert!(set_condition(
            &mut cs,
            CONDITION_READY,
            CondStatus::True,
            "Reconciled",
            "ok",
            Some(2),
            t(10)
        ));
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].status, "True");
        assert_eq!(cs[0].last_transition_time, t(10));
        assert_eq!(cs[0].observed_generation, Some(2));
    }

    #[test]
    fn transition_time_kept_unless_status_flips() {
        let mut cs = vec![];
        set_condition(
            &mut cs,
            CONDITION_READY,
            CondStatus::True,
            "Reconciled",
            "ok",
            Some(1),
            t(10),
        );
        // same status, new message: time kept
        assert!(set_condition(
            &mut cs,
            CONDITION_READY,
            CondStatus::True,
            "Reconciled",
            "still ok",
            Some(2),
            t(20)
        ));
        assert_eq!(cs[0].last_transition_time, t(10));
        assert_eq!(cs[0].message, "still ok");
        // nothing new: no change reported, time kept
        assert!(!set_condition(
            &mut cs,
            CONDITION_READY,
            CondStatus::True,
            "Reconciled",
            "still ok",
            Some(2),
            t(30)
        ));
        assert_eq!(cs[0].last_transition_time, t(10));
        // flip: time moves
        assert!(set_condition(
            &mut cs,
            CONDITION_READY,
            CondStatus::False,
            "InvalidSpec",
            "bad",
            Some(3),
            t(40)
        ));
        assert_eq!(cs[0].last_transition_time, t(40));
        assert_eq!(cs[0].status, "False");
        assert_eq!(cs.len(), 1);
    }

    #[test]
    fn other_conditions_untouched() {
        let mut cs = vec![];
        set_condition(
            &mut cs,
            CONDITION_READY,
            CondStatus::True,
            "A",
            "",
            None,
            t(1),
        );
        set_condition(
            &mut cs,
            CONDITION_DEGRADED,
            CondStatus::False,
            "B",
            "",
            None,
            t(2),
        );
        set_condition(
            &mut cs,
            CONDITION_DEGRADED,
            CondStatus::True,
            "C",
            "",
            None,
            t(3),
        );
        assert_eq!(cs[0].reason, "A");
        assert_eq!(cs[0].last_transition_time, t(1));
        assert_eq!(cs[1].last_transition_time, t(3));
    }

    #[test]
    fn equality_ignores_timestamps_and_order() {
        let mut a = RunnerPoolStatus {
            desired_replicas: Some(3),
            last_poll_time: Some(t(1)),
            ..Default::default()
        };
        set_condition(
            &mut a.conditions,
            CONDITION_READY,
            CondStatus::True,
            "R",
            "m",
            Some(1),
            t(1),
        );
        set_condition(
            &mut a.conditions,
            CONDITION_DEGRADED,
            CondStatus::False,
            "R",
            "m",
            Some(1),
            t(1),
        );
        let mut b = a.clone();
        b.last_poll_time = Some(t(99));
        b.conditions.reverse();
        b.conditions[0].last_transition_time = t(50);
        assert!(status_equal_ignoring_time(&a, &b));
        b.desired_replicas = Some(4);
        assert!(!status_equal_ignoring_time(&a, &b));
        let mut c = a.clone();
        c.conditions[0].message = "other".into();
        assert!(!status_equal_ignoring_time(&a, &c));
        let mut d = a.clone();
        d.last_poll_time = None;
        assert!(status_equal_ignoring_time(&a, &d));
    }
}
