//! `scaling.schedules`: named periods, each from a `start` cron occurrence to
//! the next `end` occurrence in an IANA time zone, that override the scaling
//! numbers while active. Pure: the caller passes the time.
//!
//! Cron expressions are parsed by `croner`; times are `jiff` zoned times, so
//! daylight-saving changes follow the zone's rules (a start at a skipped
//! local time fires at the first valid instant after it; a repeated local
//! time fires once).

use std::str::FromStr;
use std::time::Duration;

use croner::Cron;
use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::crd::ScheduleSpec;

/// What an active period overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overrides {
    /// minReplicas.
    pub min: Option<u32>,
    /// maxReplicas.
    pub max: Option<u32>,
    /// headroom.
    pub headroom: Option<u32>,
    /// idleBuffer.
    pub idle_buffer: Option<u32>,
    /// maxSurge.
    pub max_surge: Option<u32>,
    /// scaleDownDelay.
    pub scale_down_delay: Option<Duration>,
}

/// A parsed schedule entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Its name.
    pub name: String,
    start: Cron,
    end: Cron,
    tz: TimeZone,
    /// The numbers it sets.
    pub overrides: Overrides,
}

fn nonneg(v: Option<i32>) -> Option<u32> {
    v.map(|v| v.max(0) as u32)
}

/// Parses a schedule entry; the error names the field and says what is wrong.
pub fn parse(i: usize, s: &ScheduleSpec) -> Result<Schedule, Vec<String>> {
    let at = format!("spec.scaling.schedules[{i}]");
    let mut errs = Vec::new();
    let cron = |field: &str, expr: &str, errs: &mut Vec<String>| match Cron::from_str(expr.trim()) {
        Ok(c) => Some(c),
        Err(e) => {
            errs.push(format!(
                "{at}.{field}: {expr:?} is not a cron expression such as \"0 8 * * 1-5\": {e}"
            ));
            None
        }
    };
    let start = cron("start", &s.start, &mut errs);
    let end = cron("end", &s.end, &mut errs);
    let tz = match TimeZone::get(&s.time_zone) {
        Ok(tz) => Some(tz),
        Err(_) => {
            errs.push(format!(
                "{at}.timeZone: {:?} is not an IANA time zone such as Europe/Berlin or UTC",
                s.time_zone
            ));
            None
        }
    };
    let scale_down_delay = match s.scale_down_delay.as_deref() {
        None => None,
        Some(d) => match d.parse::<kube::core::Duration>() {
            Ok(v) if !v.is_negative() && !d.trim().is_empty() => Some(Duration::from(v)),
            _ => {
                errs.push(format!(
                    "{at}.scaleDownDelay: {d:?} is not a duration such as 5m"
                ));
                None
            }
        },
    };
    if let (Some(min), Some(max)) = (s.min_replicas, s.max_replicas)
        && min > max
    {
        errs.push(format!(
            "{at}.minReplicas: must not be greater than maxReplicas ({min} > {max})"
        ));
    }
    match (start, end, tz) {
        (Some(start), Some(end), Some(tz)) if errs.is_empty() => Ok(Schedule {
            name: s.name.clone(),
            start,
            end,
            tz,
            overrides: Overrides {
                min: nonneg(s.min_replicas),
                max: nonneg(s.max_replicas),
                headroom: nonneg(s.headroom),
                idle_buffer: nonneg(s.idle_buffer),
                max_surge: nonneg(s.max_surge),
                scale_down_delay,
            },
        }),
        _ => Err(errs),
    }
}

impl Schedule {
    /// Whether the period is active at `t`: its latest `start` occurrence at
    /// or before `t` is later than its latest `end` occurrence (a period
    /// includes its start instant and excludes its end instant).
    pub fn is_active(&self, t: Timestamp) -> bool {
        let now = t.to_zoned(self.tz.clone());
        let Ok(start) = self.start.find_previous_occurrence(&now, true) else {
            return false;
        };
        match self.end.find_previous_occurrence(&now, true) {
            Ok(end) => start.timestamp() > end.timestamp(),
            Err(_) => true,
        }
    }
}

/// The first active schedule at `t`.
pub fn active(schedules: &[Schedule], t: Timestamp) -> Option<&Schedule> {
    schedules.iter().find(|s| s.is_active(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, start: &str, end: &str, tz: &str) -> ScheduleSpec {
        ScheduleSpec {
            name: name.into(),
            start: start.into(),
            end: end.into(),
            time_zone: tz.into(),
            min_replicas: Some(5),
            max_replicas: None,
            headroom: None,
            idle_buffer: Some(2),
            max_surge: None,
            scale_down_delay: Some("5m".into()),
        }
    }

    fn at(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    #[test]
    fn working_hours_in_utc() {
        let s = parse(0, &spec("day", "0 8 * * 1-5", "0 18 * * 1-5", "UTC")).unwrap();
        // 2026-12-04 is a Friday.
        assert!(!s.is_active(at("2026-12-04T07:59:59Z")));
        assert!(
            s.is_active(at("2026-12-04T08:00:00Z")),
            "start is inclusive"
        );
        assert!(s.is_active(at("2026-12-04T17:59:59Z")));
        assert!(!s.is_active(at("2026-12-04T18:00:00Z")), "end is exclusive");
        assert!(!s.is_active(at("2026-12-05T12:00:00Z")), "Saturday");
        assert_eq!(s.overrides.min, Some(5));
        assert_eq!(s.overrides.scale_down_delay, Some(Duration::from_secs(300)));
    }

    #[test]
    fn periods_follow_local_time_across_dst_changes() {
        let s = parse(0, &spec("day", "0 8 * * *", "0 18 * * *", "Europe/Berlin")).unwrap();
        // Winter (CET, UTC+1): 08:00 local is 07:00 UTC.
        assert!(s.is_active(at("2026-03-28T07:00:00Z")));
        assert!(!s.is_active(at("2026-03-28T06:59:00Z")));
        // Clocks go forward on 2026-03-29 at 02:00: from then on CEST, UTC+2.
        assert!(s.is_active(at("2026-03-29T06:00:00Z")), "08:00 CEST");
        assert!(!s.is_active(at("2026-03-29T05:59:00Z")));
        assert!(!s.is_active(at("2026-03-29T16:00:00Z")), "18:00 CEST");
        // Back on 2026-10-25 at 03:00 CEST -> 02:00 CET.
        assert!(s.is_active(at("2026-10-25T07:00:00Z")), "08:00 CET");
        assert!(!s.is_active(at("2026-10-25T06:30:00Z")), "07:30 CET");
    }

    #[test]
    fn a_start_in_the_skipped_hour_still_starts_the_period() {
        // 02:30 does not exist in Berlin on 2026-03-29.
        let s = parse(
            0,
            &spec("night", "30 2 * * *", "0 5 * * *", "Europe/Berlin"),
        )
        .unwrap();
        assert!(s.is_active(at("2026-03-29T01:30:00Z")), "03:30 CEST");
        assert!(!s.is_active(at("2026-03-29T03:00:00Z")), "05:00 CEST");
    }

    #[test]
    fn periods_over_midnight_and_overlaps_first_wins() {
        let night = parse(0, &spec("night", "0 22 * * *", "0 6 * * *", "UTC")).unwrap();
        let late = parse(1, &spec("late", "0 20 * * *", "0 23 * * *", "UTC")).unwrap();
        assert!(night.is_active(at("2026-12-04T23:30:00Z")));
        assert!(night.is_active(at("2026-12-05T05:59:00Z")));
        assert!(!night.is_active(at("2026-12-05T06:00:00Z")));
        let both = [night.clone(), late.clone()];
        assert_eq!(
            active(&both, at("2026-12-04T22:30:00Z")).unwrap().name,
            "night"
        );
        assert_eq!(
            active(&both, at("2026-12-04T21:00:00Z")).unwrap().name,
            "late"
        );
        assert!(active(&both, at("2026-12-04T12:00:00Z")).is_none());
        let reversed = [late, night];
        assert_eq!(
            active(&reversed, at("2026-12-04T22:30:00Z")).unwrap().name,
            "late"
        );
    }

    #[test]
    fn bad_entries_are_reported_with_their_field() {
        let mut s = spec("x", "not cron", "0 18 * * *", "Mars/Olympus");
        s.min_replicas = Some(9);
        s.max_replicas = Some(2);
        let e = parse(3, &s).unwrap_err().join("\n");
        assert!(e.contains("schedules[3].start"), "{e}");
        assert!(e.contains("schedules[3].timeZone"), "{e}");
        assert!(e.contains("schedules[3].minReplicas"), "{e}");
    }
}
