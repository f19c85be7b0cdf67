//! Leader election over a `coordination.k8s.io/v1` Lease.
//!
//! No maintained crate supports kube 5 yet (kube-leader-election 0.44 needs
//! kube 4, kube-coordinate and kubert pin kube 1-2), so this is a small
//! elector in the style of client-go's: the decision is a pure function
//! ([`decide`]); the IO loop gets the Lease, decides, and writes it with
//! optimistic concurrency (`resourceVersion`), so two candidates can never
//! both win a round.
//!
//! Expiry is judged like client-go: by the candidate's own clock, from the
//! moment it last saw the Lease record change, never by comparing its clock
//! with the `renewTime` another machine wrote. So clock skew cannot make a
//! standby steal a live Lease.
//!
//! Losing the Lease (another holder, or no successful renewal within the
//! renew deadline) ends [`Leadership::hold`] with an error; the operator then
//! stops acting at once and exits, and Kubernetes restarts it as a standby.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Election timing and identity.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease namespace.
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This candidate (pod name, or hostname + pid).
    pub identity: String,
    /// How long a Lease is valid after its last renewal (client-go default 15 s).
    pub lease_duration: Duration,
    /// The leader gives up if it could not renew for this long (< lease duration).
    pub renew_deadline: Duration,
    /// How often the leader renews and a standby retries.
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// Defaults (client-go's): 15 s lease, 10 s renew deadline, 2 s retry period.
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
            identity: identity.to_string(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// Rejects timings that make two leaders possible.
    pub fn check(&self) -> Result<()> {
        if self.identity.is_empty() {
            return Err(Error::Runtime("leader election: empty identity".into()));
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(Error::Runtime(format!(
                "leader election: renew deadline {:?} must be shorter than the lease duration {:?}",
                self.renew_deadline, self.lease_duration
            )));
        }
        if self.retry_period >= self.renew_deadline || self.retry_period.is_zero() {
            return Err(Error::Runtime(format!(
                "leader election: retry period {:?} must be positive and shorter than the renew deadline {:?}",
                self.retry_period, self.renew_deadline
            )));
        }
        if self.lease_duration.as_secs() < 1 {
            return Err(Error::Runtime(
                "leader election: lease duration must be at least 1s".into(),
            ));
        }
        Ok(())
    }

    /// `<namespace>/<name>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The parts of a Lease the decision looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// `holderIdentity` (None or empty: free).
    pub holder: Option<String>,
    /// `renewTime`, as written by the holder (only compared for change).
    pub renew_time: Option<Timestamp>,
    /// `leaseDurationSeconds`.
    pub duration: Option<Duration>,
    /// `leaseTransitions`.
    pub transitions: i32,
}

impl LeaseRecord {
    /// From a Lease spec.
    pub fn from_spec(spec: Option<&LeaseSpec>) -> Self {
        let spec = spec.cloned().unwrap_or_default();
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.map(|t| t.0),
            duration: spec
                .lease_duration_seconds
                .map(|s| Duration::from_secs(s.max(0) as u64)),
            transitions: spec.lease_transitions.unwrap_or(0),
        }
    }
}

/// What a candidate should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write itself as holder. `transition`: the holder changes (count it).
    Acquire {
        /// Whether `leaseTransitions` must be incremented.
        transition: bool,
    },
    /// It holds the Lease: renew it.
    Renew,
    /// Someone else holds a live Lease.
    Follow {
        /// The holder.
        holder: String,
        /// Time until the Lease would expire if not renewed.
        expires_in: Duration,
    },
}

/// The decision. `unchanged_for` is how long (by this candidate's clock) the
/// record has looked exactly like `record`; `default_duration` applies when
/// the Lease does not say.
pub fn decide(
    record: Option<&LeaseRecord>,
    me: &str,
    unchanged_for: Duration,
    default_duration: Duration,
) -> Decision {
    let Some(r) = record else {
        return Decision::Acquire { transition: false };
    };
    match r.holder.as_deref() {
        None => Decision::Acquire {
            transition: r.transitions > 0 || r.renew_time.is_some(),
        },
        Some(h) if h == me => Decision::Renew,
        Some(h) => {
            let duration = r.duration.unwrap_or(default_duration);
            if unchanged_for >= duration {
                Decision::Acquire { transition: true }
            } else {
                Decision::Follow {
                    holder: h.to_string(),
                    expires_in: duration - unchanged_for,
                }
            }
        }
    }
}

/// A candidate.
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    observed: Option<(LeaseRecord, Instant)>,
}

/// Outcome of one round.
enum Round {
    Leader,
    Standby(String),
}

impl Elector {
    /// A candidate for `cfg` (checks the timings).
    pub fn new(client: kube::Client, cfg: LeaseConfig) -> Result<Self> {
        cfg.check()?;
        let api = Api::namespaced(client, &cfg.namespace);
        Ok(Self {
            api,
            cfg,
            observed: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// One get-decide-write round.
    async fn round(&mut self) -> Result<Round> {
        let now = Instant::now();
        let current = self.api.get_opt(&self.cfg.name).await?;
        let record = current
            .as_ref()
            .map(|l| LeaseRecord::from_spec(l.spec.as_ref()));
        let unchanged_for = match (&self.observed, &record) {
            (Some((seen, at)), Some(r)) if seen == r => now.duration_since(*at),
            (_, Some(r)) => {
                self.observed = Some((r.clone(), now));
                Duration::ZERO
            }
            (_, None) => {
                self.observed = None;
                Duration::ZERO
            }
        };
        let decision = decide(
            record.as_ref(),
            &self.cfg.identity,
            unchanged_for,
            self.cfg.lease_duration,
        );
        match decision {
            Decision::Follow { holder, .. } => Ok(Round::Standby(holder)),
            Decision::Renew | Decision::Acquire { .. } => {
                let stamp = MicroTime(Timestamp::now());
                let lease_secs = self.cfg.lease_duration.as_secs().min(i32::MAX as u64) as i32;
                let (transitions, acquire_time) = match (&decision, &current) {
                    (Decision::Renew, Some(l)) => {
                        let s = l.spec.clone().unwrap_or_default();
                        (
                            s.lease_transitions.unwrap_or(0),
                            s.acquire_time.unwrap_or_else(|| stamp.clone()),
                        )
                    }
                    (Decision::Acquire { transition }, _) => {
                        let t = record.as_ref().map(|r| r.transitions).unwrap_or(0);
                        (if *transition { t + 1 } else { t }, stamp.clone())
                    }
                    _ => (0, stamp.clone()),
                };
                let spec = LeaseSpec {
                    holder_identity: Some(self.cfg.identity.clone()),
                    lease_duration_seconds: Some(lease_secs),
                    acquire_time: Some(acquire_time),
                    renew_time: Some(stamp),
                    lease_transitions: Some(transitions),
                    ..Default::default()
                };
                let written = match current {
                    None => {
                        let lease = Lease {
                            metadata: ObjectMeta {
                                name: Some(self.cfg.name.clone()),
                                namespace: Some(self.cfg.namespace.clone()),
                                ..Default::default()
                            },
                            spec: Some(spec),
                        };
                        self.api.create(&PostParams::default(), &lease).await
                    }
                    Some(mut lease) => {
                        // resourceVersion from the get: a concurrent writer makes this 409
                        lease.spec = Some(spec);
                        self.api
                            .replace(&self.cfg.name, &PostParams::default(), &lease)
                            .await
                    }
                };
                match written {
                    Ok(l) => {
                        let r = LeaseRecord::from_spec(l.spec.as_ref());
                        self.observed = Some((r, Instant::now()));
                        Ok(Round::Leader)
                    }
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        // lost the race: someone else wrote first
                        Ok(Round::Standby(String::from("<contended>")))
                    }
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// Waits until this candidate holds the Lease. `on_contact` is called
    /// after each round that reached the API server (for readiness).
    pub async fn acquire(
        mut self,
        stop: &CancellationToken,
        mut on_contact: impl FnMut(bool) + Send,
    ) -> Result<Option<Leadership>> {
        let mut last_holder: Option<String> = None;
        loop {
            match self.round().await {
                Ok(Round::Leader) => {
                    on_contact(true);
                    tracing::info!(lease = %self.cfg.key(), identity = %self.cfg.identity, "acquired leadership");
                    return Ok(Some(Leadership {
                        elector: self,
                        last_renew: Instant::now(),
                    }));
                }
                Ok(Round::Standby(holder)) => {
                    on_contact(true);
                    if last_holder.as_deref() != Some(holder.as_str()) {
                        tracing::info!(lease = %self.cfg.key(), leader = %holder, "standing by");
                        last_holder = Some(holder);
                    }
                }
                Err(e) => {
                    on_contact(false);
                    tracing::warn!(lease = %self.cfg.key(), error = %e, "leader election round failed");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(None),
                _ = tokio::time::sleep(self.cfg.retry_period) => {}
            }
        }
    }
}

/// A held Lease.
pub struct Leadership {
    elector: Elector,
    last_renew: Instant,
}

impl Leadership {
    /// Renews until `stop` is cancelled (then releases the Lease so a standby
    /// takes over at once, and returns Ok) or the Lease is lost (returns
    /// [`Error::LostLeadership`]).
    pub async fn hold(mut self, stop: &CancellationToken) -> Result<()> {
        let period = self.elector.cfg.retry_period;
        let deadline = self.elector.cfg.renew_deadline;
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    self.release().await;
                    return Ok(());
                }
                _ = tokio::time::sleep(period) => {}
            }
            // Each renewal attempt must finish before the deadline.
            let left = deadline.saturating_sub(self.last_renew.elapsed());
            let attempt =
                tokio::time::timeout(left.max(Duration::from_millis(1)), self.elector.round())
                    .await;
            match attempt {
                Ok(Ok(Round::Leader)) => self.last_renew = Instant::now(),
                Ok(Ok(Round::Standby(holder))) => {
                    tracing::error!(lease = %self.elector.cfg.key(), holder = %holder, "leadership taken by another candidate");
                    return Err(Error::LostLeadership(self.elector.cfg.key()));
                }
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.elector.cfg.key(), error = %e, "lease renewal failed")
                }
                Err(_) => {
                    tracing::warn!(lease = %self.elector.cfg.key(), "lease renewal timed out")
                }
            }
            if self.last_renew.elapsed() >= deadline {
                tracing::error!(lease = %self.elector.cfg.key(), "could not renew the lease before the renew deadline");
                return Err(Error::LostLeadership(self.elector.cfg.key()));
            }
        }
    }

    /// Gives the Lease up (best effort): holder cleared, so standbys take over
    /// without waiting for expiry.
    pub async fn release(&mut self) {
        let cfg = &self.elector.cfg;
        let r = async {
            let Some(mut lease) = self.elector.api.get_opt(&cfg.name).await? else {
                return Ok(());
            };
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.elector
                .api
                .replace(&cfg.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
        .await;
        match r {
            Ok(()) => tracing::info!(lease = %cfg.key(), "released leadership"),
            Err(e) => tracing::warn!(lease = %cfg.key(), error = %e, "could not release the lease"),
        }
    }
}

/// A default identity: `$POD_NAME`, else `<hostname>-<pid>`.
pub fn default_identity() -> String {
    if let Ok(p) = std::env::var("POD_NAME")
        && !p.is_empty()
    {
        return p;
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "runner-provisioner".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Duration = Duration::from_secs(15);

    fn held_by(h: &str) -> LeaseRecord {
        LeaseRecord {
            holder: Some(h.into()),
            renew_time: Some(Timestamp::from_second(1_000).unwrap()),
            duration: Some(D),
            transitions: 2,
        }
    }

    #[test]
    fn missing_lease_is_acquired_without_transition() {
        assert_eq!(
            decide(None, "a", Duration::ZERO, D),
            Decision::Acquire { transition: false }
        );
    }

    #[test]
    fn own_lease_is_renewed() {
        assert_eq!(
            decide(Some(&held_by("a")), "a", Duration::from_secs(100), D),
            Decision::Renew
        );
    }

    #[test]
    fn live_foreign_lease_is_followed_until_it_expires() {
        let r = held_by("b");
        assert_eq!(
            decide(Some(&r), "a", Duration::from_secs(5), D),
            Decision::Follow {
                holder: "b".into(),
                expires_in: Duration::from_secs(10)
            }
        );
        assert_eq!(
            decide(Some(&r), "a", Duration::from_secs(15), D),
            Decision::Acquire { transition: true }
        );
    }

    #[test]
    fn lease_duration_from_record_wins_over_default() {
        let mut r = held_by("b");
        r.duration = Some(Duration::from_secs(1));
        assert_eq!(
            decide(Some(&r), "a", Duration::from_secs(2), D),
            Decision::Acquire { transition: true }
        );
        r.duration = None;
        assert!(matches!(
            decide(Some(&r), "a", Duration::from_secs(2), D),
            Decision::Follow { .. }
        ));
    }

    #[test]
    fn released_lease_is_taken_at_once() {
        let mut r = held_by("b");
        r.holder = None;
        assert_eq!(
            decide(Some(&r), "a", Duration::ZERO, D),
            Decision::Acquire { transition: true }
        );
        let empty = LeaseRecord::from_spec(Some(&LeaseSpec {
            holder_identity: Some(String::new()),
            ..Default::default()
        }));
        assert_eq!(empty.holder, None);
        assert_eq!(
            decide(Some(&empty), "a", Duration::ZERO, D),
            Decision::Acquire { transition: false }
        );
    }

    #[test]
    fn record_from_spec_reads_fields() {
        let spec = LeaseSpec {
            holder_identity: Some("x".into()),
            lease_duration_seconds: Some(7),
            lease_transitions: Some(3),
            renew_time: Some(MicroTime(Timestamp::from_second(5).unwrap())),
            ..Default::default()
        };
        let r = LeaseRecord::from_spec(Some(&spec));
        assert_eq!(r.holder.as_deref(), Some("x"));
        assert_eq!(r.duration, Some(Duration::from_secs(7)));
        assert_eq!(r.transitions, 3);
        assert_eq!(LeaseRecord::from_spec(None).holder, None);
    }

    #[test]
    fn unsafe_timings_are_rejected() {
        let mut c = LeaseConfig::new("ns", "l", "me");
        assert!(c.check().is_ok());
        c.renew_deadline = c.lease_duration;
        assert!(c.check().is_err());
        let mut c = LeaseConfig::new("ns", "l", "me");
        c.retry_period = c.renew_deadline;
        assert!(c.check().is_err());
        let c = LeaseConfig::new("ns", "l", "");
        assert!(c.check().is_err());
        assert_eq!(LeaseConfig::new("ns", "l", "me").key(), "ns/l");
    }

    #[test]
    fn identity_is_never_empty() {
        assert!(!default_identity().is_empty());
    }
}
