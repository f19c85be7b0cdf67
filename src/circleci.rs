//! Client for the two CircleCI runner API calls the scaler needs:
//! `GET {apiUrl}/api/v3/runner/tasks?resource-class=..` (`unclaimed_task_count`)
//! and `GET {apiUrl}/api/v3/runner/tasks/running?resource-class=..`
//! (`running_runner_tasks`), authenticated with `Circle-Token`.
//!
//! Every call has a timeout; every failure is classified ([`CircleCiError`])
//! so the scaler can hold the pool, back off (honouring `Retry-After`) and
//! report what is wrong. No error message ever contains the token: it is
//! only sent as a sensitive header, never formatted, and any server message
//! that echoes it is redacted.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use serde_json::Value;

/// Default timeout of one API call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest response body read (the real answers are a few dozen bytes).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Counts above this are treated as garbage, not as demand: CircleCI plans
/// cap runner concurrency far below it, and a wild number must never scale a
/// pool to its maximum.
pub const MAX_PLAUSIBLE_COUNT: u64 = 100_000;
/// Longest `Retry-After` honoured (a server asking for more gets this).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// A CircleCI API token. `Debug` and `Display` never print it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(Arc<str>);

impl ApiToken {
    /// Wraps a token (surrounding whitespace, e.g. a trailing newline from
    /// `kubectl create secret --from-file`, is trimmed).
    pub fn new(token: &str) -> Self {
        Self(Arc::from(token.trim()))
    }

    /// The token itself. Only for building the request header.
    fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the token is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// Which count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `/api/v3/runner/tasks` -> `unclaimed_task_count`.
    Unclaimed,
    /// `/api/v3/runner/tasks/running` -> `running_runner_tasks`.
    Running,
}

impl Endpoint {
    /// Path below the API base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Unclaimed => "/api/v3/runner/tasks",
            Endpoint::Running => "/api/v3/runner/tasks/running",
        }
    }

    /// JSON key of the count in the answer.
    pub fn key(self) -> &'static str {
        match self {
            Endpoint::Unclaimed => "unclaimed_task_count",
            Endpoint::Running => "running_runner_tasks",
        }
    }

    /// Metric/log label.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Unclaimed => "unclaimed",
            Endpoint::Running => "running",
        }
    }

    /// The log message of a failure, as CircleCI's Runner Provisioner words it.
    pub fn failure_message(self) -> &'static str {
        match self {
            Endpoint::Unclaimed => "failed to get unclaimed tasks",
            Endpoint::Running => "failed to get running tasks",
        }
    }
}

/// Why a CircleCI call failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CircleCiError {
    /// No answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connection refused, DNS, TLS, reset...
    #[error("request failed: {0}")]
    Connect(String),
    /// HTTP 429.
    #[error("rate limited (HTTP 429){}", .retry_after.map(|d| format!(", retry after {}s", d.as_secs())).unwrap_or_default())]
    RateLimited {
        /// The server's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// HTTP 401 or 403.
    #[error("HTTP {status}: the API token was rejected (check apiTokenSecretRef)")]
    Unauthorized {
        /// The status code.
        status: u16,
    },
    /// HTTP 5xx.
    #[error("HTTP {status}: CircleCI server error{}", .retry_after.map(|d| format!(", retry after {}s", d.as_secs())).unwrap_or_default())]
    Server {
        /// The status code.
        status: u16,
        /// The server's `Retry-After` (503 may carry one).
        retry_after: Option<Duration>,
    },
    /// Any other non-2xx status.
    #[error("HTTP {status}: {message}")]
    Status {
        /// The status code.
        status: u16,
        /// CircleCI's `{"message": ..}`, truncated, or the status text.
        message: String,
    },
    /// A 2xx answer that is not the expected JSON.
    #[error("malformed answer: {0}")]
    Malformed(String),
    /// `apiUrl` is not a usable URL.
    #[error("invalid API URL: {0}")]
    InvalidUrl(String),
}

impl CircleCiError {
    /// Metric label / log field.
    pub fn kind(&self) -> &'static str {
        match self {
            CircleCiError::Timeout(_) => "timeout",
            CircleCiError::Connect(_) => "connect",
            CircleCiError::RateLimited { .. } => "rate_limited",
            CircleCiError::Unauthorized { .. } => "unauthorized",
            CircleCiError::Server { .. } => "server_error",
            CircleCiError::Status { .. } => "http_status",
            CircleCiError::Malformed(_) => "malformed",
            CircleCiError::InvalidUrl(_) => "invalid_url",
        }
    }

    /// The delay the server asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            CircleCiError::RateLimited { retry_after }
            | CircleCiError::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Both counts of one poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskCounts {
    /// `unclaimed_task_count`.
    pub unclaimed: u32,
    /// `running_runner_tasks`.
    pub running: u32,
}

/// One finished call, for metrics: which endpoint, how long, and the outcome.
#[derive(Clone, Debug)]
pub struct CallRecord {
    /// The endpoint called.
    pub endpoint: Endpoint,
    /// Wall time of the call.
    pub elapsed: Duration,
    /// The count, or why there is none.
    pub result: Result<u32, CircleCiError>,
}

/// The runner API client. Cheap to clone (one connection pool).
#[derive(Clone, Debug)]
pub struct CircleCiClient {
    http: reqwest::Client,
    timeout: Duration,
}

impl CircleCiClient {
    /// A client whose calls time out after `timeout`. Needs a rustls crypto
    /// provider installed as the process default.
    pub fn new(timeout: Duration) -> Result<Self, CircleCiError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("runner-provisioner/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CircleCiError::Connect(e.without_url().to_string()))?;
        Ok(Self { http, timeout })
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// One count of `resource_class`.
    pub async fn task_count(
        &self,
        api_url: &str,
        token: &ApiToken,
        resource_class: &str,
        endpoint: Endpoint,
    ) -> CallRecord {
        let start = Instant::now();
        let result = self.call(api_url, token, resource_class, endpoint).await;
        CallRecord {
            endpoint,
            elapsed: start.elapsed(),
            result,
        }
    }

    /// Both counts, fetched concurrently.
    pub async fn task_counts(
        &self,
        api_url: &str,
        token: &ApiToken,
        resource_class: &str,
    ) -> (CallRecord, CallRecord) {
        tokio::join!(
            self.task_count(api_url, token, resource_class, Endpoint::Unclaimed),
            self.task_count(api_url, token, resource_class, Endpoint::Running),
        )
    }

    async fn call(
        &self,
        api_url: &str,
        token: &ApiToken,
        resource_class: &str,
        endpoint: Endpoint,
    ) -> Result<u32, CircleCiError> {
        let url = endpoint_url(api_url, endpoint)?;
        let mut auth = HeaderValue::from_str(token.expose()).map_err(|_| {
            CircleCiError::InvalidUrl("the API token contains invalid characters".into())
        })?;
        auth.set_sensitive(true);
        let resp = self
            .http
            .get(url)
            .query(&[("resource-class", resource_class)])
            .header("Circle-Token", auth)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| self.transport_error(e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = read_limited(resp)
            .await
            .map_err(|e| self.transport_error(e))?;
        classify(status.as_u16(), &headers, &body, endpoint, token)
    }

    fn transport_error(&self, e: reqwest::Error) -> CircleCiError {
        if e.is_timeout() {
            CircleCiError::Timeout(self.timeout)
        } else {
            let e = e.without_url();
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            CircleCiError::Connect(truncate(&msg, 300))
        }
    }
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = MAX_BODY_BYTES + 1 - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() > MAX_BODY_BYTES {
            break;
        }
    }
    Ok(body)
}

/// `{api_url}{path}` with any trailing `/` of the base removed.
pub fn endpoint_url(api_url: &str, endpoint: Endpoint) -> Result<reqwest::Url, CircleCiError> {
    let base = api_url.trim().trim_end_matches('/');
    let url = reqwest::Url::parse(&format!("{base}{}", endpoint.path()))
        .map_err(|e| CircleCiError::InvalidUrl(format!("{base:?}: {e}")))?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        s => Err(CircleCiError::InvalidUrl(format!(
            "{base:?}: scheme {s:?} is not http(s)"
        ))),
    }
}

/// Turns an HTTP answer into a count or a classified error. Pure.
pub fn classify(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    endpoint: Endpoint,
    token: &ApiToken,
) -> Result<u32, CircleCiError> {
    match status {
        200..=299 => parse_count(body, endpoint),
        429 => Err(CircleCiError::RateLimited {
            retry_after: retry_after(headers),
        }),
        401 | 403 => Err(CircleCiError::Unauthorized { status }),
        500..=599 => Err(CircleCiError::Server {
            status,
            retry_after: retry_after(headers),
        }),
        _ => Err(CircleCiError::Status {
            status,
            message: server_message(body, token),
        }),
    }
}

/// Parses `{"<key>": N}`.
pub fn parse_count(body: &[u8], endpoint: Endpoint) -> Result<u32, CircleCiError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(CircleCiError::Malformed(format!(
            "body larger than {MAX_BODY_BYTES} bytes"
        )));
    }
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| CircleCiError::Malformed(format!("not JSON ({e})")))?;
    let key = endpoint.key();
    let n = v
        .get(key)
        .ok_or_else(|| CircleCiError::Malformed(format!("no {key:?} field")))?;
    let n = n.as_u64().ok_or_else(|| {
        CircleCiError::Malformed(format!("{key:?} is not a non-negative integer"))
    })?;
    if n > MAX_PLAUSIBLE_COUNT {
        return Err(CircleCiError::Malformed(format!(
            "{key:?} = {n} is implausible (more than {MAX_PLAUSIBLE_COUNT})"
        )));
    }
    Ok(n as u32)
}

/// `Retry-After` as delta-seconds or an HTTP date, capped at
/// [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let raw = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let d = if let Ok(secs) = raw.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let when = k8s_openapi::jiff::fmt::rfc2822::parse(raw)
            .ok()?
            .timestamp();
        let now = k8s_openapi::jiff::Timestamp::now();
        let secs = when.as_second() - now.as_second();
        Duration::from_secs(secs.max(0) as u64)
    };
    Some(d.min(MAX_RETRY_AFTER))
}

/// CircleCI's `{"message": ..}` (or the start of a non-JSON body), truncated,
/// with the token redacted should the server echo it.
fn server_message(body: &[u8], token: &ApiToken) -> String {
    let text = match serde_json::from_slice::<Value>(body) {
        Ok(v) => v
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    let text = if token.is_empty() {
        text
    } else {
        text.replace(token.expose(), "<redacted>")
    };
    let text: String = text.chars().filter(|c| !c.is_control()).collect();
    truncate(text.trim(), 200)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Query, State};
    use axum::http::{HeaderMap as AxHeaders, StatusCode};
    use axum::response::IntoResponse;
    use std::collections::HashMap;
    use std::sync::Mutex;

    const TOKEN: &str = "CCIPAT_secret_token_value_42";

    fn tok() -> ApiToken {
        ApiToken::new(TOKEN)
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                reqwest::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn token_is_never_formatted() {
        let t = tok();
        assert_eq!(format!("{t:?}"), "ApiToken(<redacted>)");
        assert!(ApiToken::new(" \n").is_empty());
        assert_eq!(ApiToken::new("abc\n").expose(), "abc");
    }

    #[test]
    fn counts_parse_from_their_own_keys() {
        assert_eq!(
            parse_count(br#"{"unclaimed_task_count": 42}"#, Endpoint::Unclaimed),
            Ok(42)
        );
        assert_eq!(
            parse_count(br#"{"running_runner_tasks":0}"#, Endpoint::Running),
            Ok(0)
        );
        // the other endpoint's key is not accepted
        assert!(matches!(
            parse_count(br#"{"running_runner_tasks": 3}"#, Endpoint::Unclaimed),
            Err(CircleCiError::Malformed(_))
        ));
    }

    #[test]
    fn garbage_is_malformed_not_demand() {
        for body in [
            &b"<html>oops</html>"[..],
            br#"{"unclaimed_task_count": -1}"#,
            br#"{"unclaimed_task_count": 1.5}"#,
            br#"{"unclaimed_task_count": "7"}"#,
            br#"{"unclaimed_task_count": null}"#,
            br#"{"unclaimed_task_count": 999999999999}"#,
            br#"[]"#,
            b"",
        ] {
            let r = parse_count(body, Endpoint::Unclaimed);
            assert!(
                matches!(r, Err(CircleCiError::Malformed(_))),
                "{:?} -> {r:?}",
                String::from_utf8_lossy(body)
            );
        }
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        assert!(matches!(
            parse_count(&big, Endpoint::Unclaimed),
            Err(CircleCiError::Malformed(_))
        ));
    }

    #[test]
    fn statuses_are_classified() {
        let none = HeaderMap::new();
        let t = tok();
        let r = classify(
            429,
            &headers(&[("retry-after", "7")]),
            b"Rate limited.",
            Endpoint::Running,
            &t,
        );
        assert_eq!(
            r,
            Err(CircleCiError::RateLimited {
                retry_after: Some(Duration::from_secs(7))
            })
        );
        assert_eq!(r.unwrap_err().retry_after(), Some(Duration::from_secs(7)));
        assert_eq!(
            classify(429, &none, b"{}", Endpoint::Running, &t),
            Err(CircleCiError::RateLimited { retry_after: None })
        );
        assert_eq!(
            classify(401, &none, b"", Endpoint::Running, &t),
            Err(CircleCiError::Unauthorized { status: 401 })
        );
        assert_eq!(
            classify(403, &none, b"", Endpoint::Running, &t)
                .unwrap_err()
                .kind(),
            "unauthorized"
        );
        assert_eq!(
            classify(
                503,
                &headers(&[("Retry-After", "2")]),
                b"",
                Endpoint::Running,
                &t
            ),
            Err(CircleCiError::Server {
                status: 503,
                retry_after: Some(Duration::from_secs(2))
            })
        );
        let e = classify(
            400,
            &none,
            br#"{"message":"must specify resource-class"}"#,
            Endpoint::Running,
            &t,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "HTTP 400: must specify resource-class");
        assert_eq!(
            classify(
                200,
                &none,
                br#"{"running_runner_tasks":5}"#,
                Endpoint::Running,
                &t
            ),
            Ok(5)
        );
    }

    #[test]
    fn echoed_token_is_redacted() {
        let body = format!(r#"{{"message":"token {TOKEN} is not valid for this org"}}"#);
        let e = classify(
            404,
            &HeaderMap::new(),
            body.as_bytes(),
            Endpoint::Unclaimed,
            &tok(),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(!msg.contains(TOKEN), "{msg}");
        assert!(msg.contains("<redacted>"), "{msg}");
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "0")])),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "100000")])),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        // an HTTP date in the past means "now"
        assert_eq!(
            retry_after(&headers(&[(
                "retry-after",
                "Sun, 06 Nov 1994 08:49:37 GMT"
            )])),
            Some(Duration::ZERO)
        );
        // an HTTP date ~30 s ahead
        let future =
            k8s_openapi::jiff::Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_secs(30);
        let s = k8s_openapi::jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&future)
            .unwrap();
        let d = retry_after(&headers(&[("retry-after", &s)])).expect("parsed");
        assert!(
            d >= Duration::from_secs(28) && d <= Duration::from_secs(30),
            "{d:?} from {s}"
        );
    }

    #[test]
    fn urls_are_joined_and_checked() {
        assert_eq!(
            endpoint_url("https://runner.circleci.com/", Endpoint::Running)
                .unwrap()
                .as_str(),
            "https://runner.circleci.com/api/v3/runner/tasks/running"
        );
        assert_eq!(
            endpoint_url("http://127.0.0.1:9/base", Endpoint::Unclaimed)
                .unwrap()
                .as_str(),
            "http://127.0.0.1:9/base/api/v3/runner/tasks"
        );
        assert!(matches!(
            endpoint_url("ftp://x", Endpoint::Running),
            Err(CircleCiError::InvalidUrl(_))
        ));
        assert!(matches!(
            endpoint_url("not a url", Endpoint::Running),
            Err(CircleCiError::InvalidUrl(_))
        ));
    }

    /// What the test server saw.
    #[derive(Default)]
    struct Seen {
        requests: Vec<(String, HashMap<String, String>, Option<String>)>,
    }

    async fn serve(seen: Arc<Mutex<Seen>>, mode: &'static str) -> std::net::SocketAddr {
        async fn handler(
            State((seen, mode)): State<(Arc<Mutex<Seen>>, &'static str)>,
            uri: axum::http::Uri,
            Query(q): Query<HashMap<String, String>>,
            h: AxHeaders,
        ) -> axum::response::Response {
            let token = h
                .get("circle-token")
                .map(|v| v.to_str().unwrap().to_string());
            seen.lock()
                .unwrap()
                .requests
                .push((uri.path().to_string(), q, token.clone()));
            if token.as_deref() != Some(TOKEN) {
                return (
                    StatusCode::UNAUTHORIZED,
                    r#"{"message":"Invalid token provided."}"#,
                )
                    .into_response();
            }
            match mode {
                "slow" => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    (StatusCode::OK, "{}").into_response()
                }
                _ if uri.path().ends_with("/running") => {
                    (StatusCode::OK, r#"{"running_runner_tasks": 2}"#).into_response()
                }
                _ => (StatusCode::OK, r#"{"unclaimed_task_count": 5}"#).into_response(),
            }
        }
        let app = axum::Router::new()
            .fallback(handler)
            .with_state((seen, mode));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
        addr
    }

    fn install_crypto() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }

    #[tokio::test]
    async fn real_http_round_trip_sends_token_header_and_class() {
        install_crypto();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let addr = serve(seen.clone(), "ok").await;
        let c = CircleCiClient::new(Duration::from_secs(5)).unwrap();
        let (u, r) = c
            .task_counts(&format!("http://{addr}/"), &tok(), "my-org/linux+x")
            .await;
        assert_eq!(u.result, Ok(5));
        assert_eq!(r.result, Ok(2));
        assert_eq!(u.endpoint, Endpoint::Unclaimed);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.requests.len(), 2);
        let mut paths: Vec<_> = seen.requests.iter().map(|r| r.0.clone()).collect();
        paths.sort();
        assert_eq!(
            paths,
            ["/api/v3/runner/tasks", "/api/v3/runner/tasks/running"]
        );
        for (_, q, t) in &seen.requests {
            assert_eq!(
                q.get("resource-class").map(String::as_str),
                Some("my-org/linux+x")
            );
            assert_eq!(t.as_deref(), Some(TOKEN));
        }
    }

    #[tokio::test]
    async fn wrong_token_is_unauthorized() {
        install_crypto();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let addr = serve(seen, "ok").await;
        let c = CircleCiClient::new(Duration::from_secs(5)).unwrap();
        let rec = c
            .task_count(
                &format!("http://{addr}"),
                &ApiToken::new("wrong"),
                "a/b",
                Endpoint::Unclaimed,
            )
            .await;
        assert_eq!(rec.result, Err(CircleCiError::Unauthorized { status: 401 }));
    }

    #[tokio::test]
    async fn slow_server_times_out() {
        install_crypto();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let addr = serve(seen, "slow").await;
        let c = CircleCiClient::new(Duration::from_millis(300)).unwrap();
        let rec = c
            .task_count(&format!("http://{addr}"), &tok(), "a/b", Endpoint::Running)
            .await;
        assert_eq!(
            rec.result,
            Err(CircleCiError::Timeout(Duration::from_millis(300)))
        );
        assert!(rec.elapsed < Duration::from_secs(3), "{:?}", rec.elapsed);
    }

    #[tokio::test]
    async fn refused_connection_is_connect_error_without_token() {
        install_crypto();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let c = CircleCiClient::new(Duration::from_secs(2)).unwrap();
        let rec = c
            .task_count(&format!("http://{addr}"), &tok(), "a/b", Endpoint::Running)
            .await;
        let e = rec.result.unwrap_err();
        assert_eq!(e.kind(), "connect", "{e}");
        assert!(!e.to_string().contains(TOKEN));
    }
}
