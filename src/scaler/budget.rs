//! The CircleCI API budget: adaptive polling per pool and a request gate per
//! API host shared by every pool (a token bucket, closed for all pools of a
//! host while that host asks to wait with 429 + `Retry-After`). The
//! decisions are pure functions; [`HostGate`] is the thin shared state.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Quiet time after which a pool polls at `idlePollInterval`.
pub const QUIET_AFTER: Duration = Duration::from_secs(15 * 60);

/// The poll interval of a pool that has seen no task for `quiet`: `poll`,
/// or `idle_poll` (when longer) once the pool has been quiet for
/// [`QUIET_AFTER`].
pub fn poll_interval(poll: Duration, idle_poll: Duration, quiet: Duration) -> Duration {
    if quiet >= QUIET_AFTER && idle_poll > poll {
        idle_poll
    } else {
        poll
    }
}

/// One host's bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
    blocked_until: Option<Instant>,
}

impl Bucket {
    /// A full bucket.
    pub fn new(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            at: now,
            blocked_until: None,
        }
    }

    /// How long to wait before `n` requests may go at `now` (zero: take them
    /// now; the tokens are then spent).
    pub fn wait(&mut self, now: Instant, rate: f64, burst: f64, n: f64) -> Duration {
        if let Some(until) = self.blocked_until {
            if until > now {
                return until - now;
            }
            self.blocked_until = None;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= n {
            self.tokens -= n;
            Duration::ZERO
        } else {
            Duration::from_secs_f64((n - self.tokens) / rate.max(1e-9))
        }
    }

    /// Closes the bucket until `until` (the later of two closings wins).
    pub fn block(&mut self, until: Instant) {
        self.blocked_until = Some(self.blocked_until.map_or(until, |u| u.max(until)));
    }
}

/// The per-host gate shared by every pool's scaler.
#[derive(Debug)]
pub struct HostGate {
    rate: f64,
    burst: f64,
    hosts: Mutex<HashMap<String, Bucket>>,
}

impl HostGate {
    /// At most `rate` requests per second per host (bursts of `burst`).
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate: rate.max(0.1),
            burst: burst.max(2.0),
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until `n` requests to `host` may go.
    pub async fn acquire(&self, host: &str, n: f64) {
        loop {
            let wait = {
                let mut hosts = self.hosts.lock().expect("gate lock");
                let now = Instant::now();
                let b = hosts
                    .entry(host.to_string())
                    .or_insert_with(|| Bucket::new(self.burst, now));
                b.wait(now, self.rate, self.burst, n)
            };
            if wait.is_zero() {
                return;
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Closes `host` for every pool for `d` (a 429's `Retry-After`).
    pub fn block(&self, host: &str, d: Duration) {
        let now = Instant::now();
        let mut hosts = self.hosts.lock().expect("gate lock");
        hosts
            .entry(host.to_string())
            .or_insert_with(|| Bucket::new(self.burst, now))
            .block(now + d);
    }
}

/// The host part of an API URL (the gate's key).
pub fn host_of(api_url: &str) -> String {
    reqwest::Url::parse(api_url)
        .ok()
        .and_then(|u| {
            u.host_str()
                .map(|h| format!("{h}:{}", u.port_or_known_default().unwrap_or(0)))
        })
        .unwrap_or_else(|| api_url.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_slow_down_only_after_a_quiet_quarter_hour() {
        let (p, ip) = (Duration::from_secs(5), Duration::from_secs(30));
        assert_eq!(poll_interval(p, ip, Duration::ZERO), p);
        assert_eq!(poll_interval(p, ip, Duration::from_secs(899)), p);
        assert_eq!(poll_interval(p, ip, QUIET_AFTER), ip);
        assert_eq!(
            poll_interval(p, Duration::from_secs(1), QUIET_AFTER),
            p,
            "never faster"
        );
    }

    #[test]
    fn bucket_limits_the_rate_and_honours_blocks() {
        let t0 = Instant::now();
        let mut b = Bucket::new(4.0, t0);
        assert_eq!(b.wait(t0, 2.0, 4.0, 2.0), Duration::ZERO);
        assert_eq!(b.wait(t0, 2.0, 4.0, 2.0), Duration::ZERO);
        assert_eq!(
            b.wait(t0, 2.0, 4.0, 2.0),
            Duration::from_secs(1),
            "empty: 2 tokens at 2/s"
        );
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.wait(t1, 2.0, 4.0, 2.0), Duration::ZERO, "refilled");
        b.block(t1 + Duration::from_secs(30));
        b.block(t1 + Duration::from_secs(10));
        assert_eq!(
            b.wait(t1, 2.0, 4.0, 2.0),
            Duration::from_secs(30),
            "the later block wins"
        );
        let t2 = t1 + Duration::from_secs(31);
        assert_eq!(b.wait(t2, 2.0, 4.0, 2.0), Duration::ZERO);
        // never more than the burst after a long pause
        let t3 = t2 + Duration::from_secs(3600);
        for _ in 0..2 {
            assert_eq!(b.wait(t3, 2.0, 4.0, 2.0), Duration::ZERO);
        }
        assert!(b.wait(t3, 2.0, 4.0, 2.0) > Duration::ZERO);
    }

    #[test]
    fn hosts_are_keyed_by_name_and_port() {
        assert_eq!(
            host_of("https://runner.circleci.com"),
            "runner.circleci.com:443"
        );
        assert_eq!(host_of("http://127.0.0.1:8080/x"), "127.0.0.1:8080");
    }

    #[tokio::test]
    async fn a_block_holds_every_caller_of_the_host() {
        let g = HostGate::new(1000.0, 1000.0);
        g.block("h:1", Duration::from_millis(200));
        let t = Instant::now();
        g.acquire("h:1", 2.0).await;
        assert!(t.elapsed() >= Duration::from_millis(190));
        let t = Instant::now();
        g.acquire("other:1", 2.0).await;
        assert!(
            t.elapsed() < Duration::from_millis(50),
            "other hosts are not held"
        );
    }
}
