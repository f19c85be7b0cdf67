//! Fault injection for the runner API endpoints.
//!
//! A [`Fault`] applies to runner API requests (never to `/control`) that match
//! its scope (a resource class and/or an endpoint; unset means all), for a
//! limited number of requests, a wall-clock period, or until cleared. Faults
//! are checked in the order they were injected: every matching latency fault
//! adds its delay, then the first matching non-latency fault decides the
//! answer. A fault only uses up its request budget on requests it acted on.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::model::Endpoint;

/// Body of an injected 429 answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateLimitBody {
    /// `{}` with `Content-Type: application/json`.
    #[default]
    EmptyJson,
    /// `Rate limited.` with `Content-Type: text/plain`.
    PlainText,
}

/// How an outage fails a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutageMode {
    /// Abort the connection with a TCP reset, no response.
    #[default]
    Reset,
    /// Close the connection (FIN), no response.
    Close,
    /// Never answer: the client times out. The connection is reset after
    /// five minutes (or when the simulator stops).
    Hang,
}

/// What a fault does to a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FaultKind {
    /// Answer normally after `ms` milliseconds (wall-clock).
    Latency { ms: u64 },
    /// 429 with `Retry-After: <secs>` (omitted when `None`, as CircleCI does
    /// "in most cases") and `RateLimit-*` / `X-RateLimit-*` headers.
    RateLimited {
        #[serde(default)]
        retry_after_secs: Option<u64>,
        #[serde(default)]
        body: RateLimitBody,
    },
    /// Answer with this status (e.g. 500, 502, 503) and a `{"message"}` body.
    ServerError { status: u16 },
    /// 200 with `Content-Type: application/json` and a body that is not the
    /// endpoint's JSON shape (default: truncated JSON).
    MalformedBody {
        #[serde(default)]
        body: Option<String>,
    },
    /// Connection-level failure.
    Outage {
        #[serde(default)]
        mode: OutageMode,
    },
}

impl FaultKind {
    /// Short name used in the request log.
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Latency { .. } => "latency",
            FaultKind::RateLimited { .. } => "rate_limited",
            FaultKind::ServerError { .. } => "server_error",
            FaultKind::MalformedBody { .. } => "malformed_body",
            FaultKind::Outage { .. } => "outage",
        }
    }
}

/// How long a fault lasts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultLimit {
    /// The next N matching requests.
    Requests(u64),
    /// N wall-clock seconds from injection.
    Seconds(f64),
    #[default]
    UntilCleared,
}

/// A fault to inject. JSON (control API), e.g.
/// `{"resource_class":"acme/linux","kind":{"type":"rate_limited","retry_after_secs":5},"limit":{"requests":3}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// Only requests with this `resource-class`; `None` means every request.
    #[serde(default)]
    pub resource_class: Option<String>,
    /// Only this endpoint; `None` means all runner API endpoints.
    #[serde(default)]
    pub endpoint: Option<Endpoint>,
    pub kind: FaultKind,
    #[serde(default)]
    pub limit: FaultLimit,
}

impl Fault {
    /// A fault on every runner API request until cleared.
    pub fn new(kind: FaultKind) -> Self {
        Fault {
            resource_class: None,
            endpoint: None,
            kind,
            limit: FaultLimit::UntilCleared,
        }
    }
    pub fn latency(ms: u64) -> Self {
        Self::new(FaultKind::Latency { ms })
    }
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::new(FaultKind::RateLimited {
            retry_after_secs: Some(retry_after_secs),
            body: RateLimitBody::EmptyJson,
        })
    }
    pub fn server_error(status: u16) -> Self {
        Self::new(FaultKind::ServerError { status })
    }
    pub fn malformed() -> Self {
        Self::new(FaultKind::MalformedBody { body: None })
    }
    pub fn outage(mode: OutageMode) -> Self {
        Self::new(FaultKind::Outage { mode })
    }
    pub fn for_class(mut self, class: &str) -> Self {
        self.resource_class = Some(class.to_string());
        self
    }
    pub fn on_endpoint(mut self, endpoint: Endpoint) -> Self {
        self.endpoint = Some(endpoint);
        self
    }
    pub fn for_requests(mut self, n: u64) -> Self {
        self.limit = FaultLimit::Requests(n);
        self
    }
    pub fn for_duration(mut self, d: Duration) -> Self {
        self.limit = FaultLimit::Seconds(d.as_secs_f64());
        self
    }

    /// Checks what the simulator cannot serve.
    pub fn validate(&self) -> Result<(), String> {
        if let FaultKind::ServerError { status } = self.kind
            && !(400..=599).contains(&status)
        {
            return Err(format!("server_error status {status} is not 400..=599"));
        }
        if let FaultLimit::Seconds(s) = self.limit
            && !(s.is_finite() && s >= 0.0)
        {
            return Err("limit seconds must be a finite number >= 0".into());
        }
        Ok(())
    }
}

/// An injected fault and what is left of it.
#[derive(Debug)]
pub(crate) struct ActiveFault {
    pub fault: Fault,
    remaining: Option<u64>,
    until: Option<Instant>,
}

impl ActiveFault {
    pub fn new(fault: Fault, now: Instant) -> Self {
        let (remaining, until) = match fault.limit {
            FaultLimit::Requests(n) => (Some(n), None),
            FaultLimit::Seconds(s) => (None, Some(now + Duration::from_secs_f64(s))),
            FaultLimit::UntilCleared => (None, None),
        };
        ActiveFault {
            fault,
            remaining,
            until,
        }
    }
    pub fn expired(&self, now: Instant) -> bool {
        self.remaining == Some(0) || self.until.is_some_and(|u| now >= u)
    }
    fn matches(&self, class: Option<&str>, endpoint: Endpoint) -> bool {
        self.fault
            .resource_class
            .as_deref()
            .is_none_or(|c| Some(c) == class)
            && self.fault.endpoint.is_none_or(|e| e == endpoint)
    }
    fn consume(&mut self) {
        if let Some(r) = &mut self.remaining {
            *r = r.saturating_sub(1);
        }
    }
}

/// What the active faults do to one request.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct FaultDecision {
    pub latency: Duration,
    /// The non-latency fault that answers the request.
    pub action: Option<FaultKind>,
    /// Kind names of faults that acted.
    pub applied: Vec<&'static str>,
}

/// Drops expired faults, then decides (and uses up budgets) for one request.
pub(crate) fn decide(
    faults: &mut Vec<ActiveFault>,
    class: Option<&str>,
    endpoint: Endpoint,
    now: Instant,
) -> FaultDecision {
    faults.retain(|f| !f.expired(now));
    let mut decision = FaultDecision::default();
    for f in faults.iter_mut() {
        if !f.matches(class, endpoint) {
            continue;
        }
        match &f.fault.kind {
            FaultKind::Latency { ms } => {
                decision.latency += Duration::from_millis(*ms);
                decision.applied.push("latency");
                f.consume();
            }
            kind if decision.action.is_none() => {
                decision.action = Some(kind.clone());
                decision.applied.push(kind.name());
                f.consume();
            }
            _ => {}
        }
    }
    faults.retain(|f| !f.expired(now));
    decision
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_json_shape() {
        let f: Fault = serde_json::from_str(
            r#"{"resource_class":"acme/linux","kind":{"type":"rate_limited","retry_after_secs":5,"body":"plain_text"},"limit":{"requests":3}}"#,
        )
        .unwrap();
        assert_eq!(f.resource_class.as_deref(), Some("acme/linux"));
        assert_eq!(
            f.kind,
            FaultKind::RateLimited {
                retry_after_secs: Some(5),
                body: RateLimitBody::PlainText
            }
        );
        assert_eq!(f.limit, FaultLimit::Requests(3));
        let g: Fault = serde_json::from_str(r#"{"kind":{"type":"outage"}}"#).unwrap();
        assert_eq!(g, Fault::outage(OutageMode::Reset));
        let h: Fault =
            serde_json::from_str(r#"{"kind":{"type":"latency","ms":5},"limit":{"seconds":1.5}}"#)
                .unwrap();
        assert_eq!(
            h,
            Fault::latency(5).for_duration(Duration::from_millis(1500))
        );
        assert!(Fault::server_error(200).validate().is_err());
        assert!(Fault::server_error(503).validate().is_ok());
    }

    #[test]
    fn scope_order_and_budgets() {
        let now = Instant::now();
        let mut faults = vec![
            ActiveFault::new(Fault::latency(100).for_requests(1), now),
            ActiveFault::new(
                Fault::server_error(500).for_class("a/x").for_requests(2),
                now,
            ),
            ActiveFault::new(
                Fault::server_error(502).on_endpoint(Endpoint::RunningTasks),
                now,
            ),
        ];
        // Other class, unclaimed endpoint: only the global latency applies.
        let d = decide(&mut faults, Some("b/y"), Endpoint::UnclaimedTasks, now);
        assert_eq!(d.latency, Duration::from_millis(100));
        assert_eq!(d.action, None);
        assert_eq!(faults.len(), 2, "the one-request latency fault is used up");
        // Class a/x on running: the class fault comes first and wins; the 502
        // keeps its (unlimited) budget.
        let d = decide(&mut faults, Some("a/x"), Endpoint::RunningTasks, now);
        assert_eq!(d.action, Some(FaultKind::ServerError { status: 500 }));
        let d = decide(&mut faults, Some("a/x"), Endpoint::UnclaimedTasks, now);
        assert_eq!(d.action, Some(FaultKind::ServerError { status: 500 }));
        let d = decide(&mut faults, Some("a/x"), Endpoint::UnclaimedTasks, now);
        assert_eq!(d.action, None, "class fault expired after 2 requests");
        let d = decide(&mut faults, None, Endpoint::RunningTasks, now);
        assert_eq!(d.action, Some(FaultKind::ServerError { status: 502 }));
    }

    #[test]
    fn time_limited_faults_expire() {
        let now = Instant::now();
        let mut faults = vec![ActiveFault::new(
            Fault::malformed().for_duration(Duration::from_secs(2)),
            now,
        )];
        let d = decide(
            &mut faults,
            None,
            Endpoint::RunnerList,
            now + Duration::from_secs(1),
        );
        assert!(d.action.is_some());
        let d = decide(
            &mut faults,
            None,
            Endpoint::RunnerList,
            now + Duration::from_secs(3),
        );
        assert!(d.action.is_none());
        assert!(faults.is_empty());
    }
}
