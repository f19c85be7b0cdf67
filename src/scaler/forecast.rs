//! The learned warm pool (`scaling.forecast`): how many VMs this pool needed
//! in each hour of the week (UTC), learned from its own polls, so that the
//! operator can keep VMs ready before such an hour comes round again.
//!
//! Bounded state: 168 numbers. Each hour's value is an exponentially
//! weighted average (weight 1/2 for the newest week) of the peak of
//! `unclaimed + running` seen in that hour. Pure: the caller passes the time.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// Hours in a week.
pub const HOURS: usize = 168;

/// What was learned, plus the hour being observed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forecast {
    /// Learned peak demand per hour of the week (Monday 00:00 UTC first),
    /// in sixteenths of a VM (fixed point, so it round-trips through JSON).
    pub peaks: Vec<u32>,
    /// The hour (since the Unix epoch) being observed, and its peak so far.
    current: Option<(i64, u32)>,
}

impl Default for Forecast {
    fn default() -> Self {
        Self {
            peaks: vec![0; HOURS],
            current: None,
        }
    }
}

/// Hours since the Unix epoch, and the hour of the week (Monday 00 = 0).
fn hours(t: Timestamp) -> (i64, usize) {
    let h = t.as_second().div_euclid(3600);
    // 1970-01-01 was a Thursday: Monday-based hour of week.
    let how = (h + 3 * 24).rem_euclid(HOURS as i64) as usize;
    (h, how)
}

impl Forecast {
    /// A forecast from stored peaks (other lengths are ignored: start over).
    pub fn from_peaks(peaks: &[u32]) -> Self {
        if peaks.len() == HOURS {
            Self {
                peaks: peaks.to_vec(),
                current: None,
            }
        } else {
            Self::default()
        }
    }

    /// Records the demand seen at `t`. Returns true when an hour was folded
    /// into the learned peaks (worth persisting).
    pub fn observe(&mut self, t: Timestamp, demand: u32) -> bool {
        let (h, _) = hours(t);
        match self.current {
            Some((cur, peak)) if cur == h => {
                self.current = Some((cur, peak.max(demand)));
                false
            }
            Some((cur, peak)) => {
                let how = hours(Timestamp::from_second(cur * 3600).unwrap_or(t)).1;
                let old = self.peaks[how];
                self.peaks[how] = (old + peak.saturating_mul(16)).div_ceil(2);
                self.current = Some((h, demand));
                true
            }
            None => {
                self.current = Some((h, demand));
                false
            }
        }
    }

    /// VMs to keep at `t`: `percent`% of the larger learned peak of this
    /// hour and the next one (VMs take minutes to boot, so the pool warms up
    /// ahead of a busy hour).
    pub fn warm(&self, t: Timestamp, percent: u32) -> u32 {
        let (_, how) = hours(t);
        let next = (how + 1) % HOURS;
        let peak = self.peaks[how].max(self.peaks[next]);
        (u64::from(peak) * u64::from(percent)).div_ceil(1600) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn hour_of_week_is_monday_based_utc() {
        assert_eq!(hours(at("2026-11-30T00:00:00Z")).1, 0, "a Monday");
        assert_eq!(
            hours(at("2026-12-04T17:30:00Z")).1,
            4 * 24 + 17,
            "Friday 17h"
        );
        assert_eq!(hours(at("2026-12-06T23:59:59Z")).1, HOURS - 1);
    }

    #[test]
    fn learns_the_hourly_peak_and_warms_ahead_of_it() {
        let mut f = Forecast::default();
        // Friday 17:00-18:00: demand peaks at 10.
        for (m, d) in [(0, 2), (20, 10), (40, 4)] {
            assert!(!f.observe(at(&format!("2026-12-04T17:{m:02}:00Z")), d));
        }
        assert!(f.observe(at("2026-12-04T18:00:00Z"), 0), "the hour folds");
        assert_eq!(
            f.warm(at("2026-12-11T17:10:00Z"), 100),
            5,
            "half weight after one week"
        );
        assert_eq!(
            f.warm(at("2026-12-11T16:10:00Z"), 100),
            5,
            "warms the hour before"
        );
        assert_eq!(f.warm(at("2026-12-11T16:10:00Z"), 50), 3);
        assert_eq!(f.warm(at("2026-12-11T12:00:00Z"), 100), 0);
        // A second week with the same peak: 7.5 -> 8.
        f.observe(at("2026-12-11T17:30:00Z"), 10);
        f.observe(at("2026-12-11T18:00:00Z"), 0);
        assert_eq!(f.warm(at("2026-12-18T17:00:00Z"), 100), 8);
        // Stored and restored.
        let g = Forecast::from_peaks(&f.peaks);
        assert_eq!(g.warm(at("2026-12-18T17:00:00Z"), 100), 8);
        assert_eq!(Forecast::from_peaks(&[1, 2]).peaks, vec![0; HOURS]);
    }
}
