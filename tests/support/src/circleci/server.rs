//! HTTP: the runner API (with faults) and the `/control` API, served by our
//! own accept loop so an outage fault can drop or reset the connection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::faults::{self, Fault, FaultKind, OutageMode, RateLimitBody};
use super::model::{Endpoint, EnqueueRequest, RequestEvent};
use super::state::{Inner, RunnerFilter, Settings};

/// How long a `hang` outage holds a request before resetting it.
const HANG_FOR: Duration = Duration::from_secs(300);

/// Per-connection handle that lets a handler kill its own connection.
#[derive(Clone, Debug)]
struct ConnCtl {
    kill: CancellationToken,
    reset: Arc<AtomicBool>,
}

/// Accepts connections until `shutdown`; each connection is served by hyper
/// and dropped (FIN, or RST with SO_LINGER 0) when its handler asks.
pub(crate) async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!("circleci sim accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        // Keep a duplicate of the socket so SO_LINGER can be set after hyper
        // took the stream.
        let (stream, dup) = match stream.into_std().and_then(|s| {
            let dup = s.try_clone()?;
            Ok((tokio::net::TcpStream::from_std(s)?, dup))
        }) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!("circleci sim socket setup failed: {e}");
                continue;
            }
        };
        let ctl = ConnCtl {
            kill: CancellationToken::new(),
            reset: Arc::new(AtomicBool::new(false)),
        };
        let service = TowerToHyperService::new(router.clone().layer(axum::Extension(ctl.clone())));
        let shutdown = shutdown.clone();
        conns.spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = ctl.kill.cancelled() => {
                    if ctl.reset.load(Ordering::SeqCst) {
                        let _ = socket2::SockRef::from(&dup).set_linger(Some(Duration::ZERO));
                    }
                }
                _ = shutdown.cancelled() => {}
            }
            drop(dup);
        });
    }
    conns.abort_all();
}

pub(crate) fn router(inner: Arc<Inner>) -> Router {
    let control = Router::new()
        .route("/api-tokens", post(control_add_api_token))
        .route("/api-tokens/revoke", post(control_revoke_api_token))
        .route(
            "/resource-classes",
            post(control_add_class).get(control_list_classes),
        )
        .route("/tasks", post(control_enqueue))
        .route("/counts", get(control_counts))
        .route("/ledger", get(control_ledger))
        .route("/agents", get(control_agents))
        .route(
            "/faults",
            post(control_add_fault)
                .get(control_list_faults)
                .delete(control_clear_faults),
        )
        .route(
            "/requests",
            get(control_requests).delete(control_reset_requests),
        )
        .route("/requests/log", get(control_request_log))
        .route("/settings", get(control_settings).put(control_put_settings))
        .route("/clock", get(control_clock))
        .route("/reset", post(control_reset));
    Router::new()
        .route("/api/v3/runner", get(runner_list))
        .route("/api/v2/runner", get(runner_list))
        .route("/api/v3/runner/tasks", get(unclaimed_tasks))
        .route("/api/v2/runner/tasks", get(unclaimed_tasks))
        .route("/api/v2/tasks", get(unclaimed_tasks))
        .route("/api/v3/runner/tasks/running", get(running_tasks))
        .route("/api/v2/runner/tasks/running", get(running_tasks))
        .route("/api/v2/tasks/running", get(running_tasks))
        .nest("/control", control)
        .fallback(|| async { message(StatusCode::NOT_FOUND, "Not found") })
        .with_state(inner)
}

fn message(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "message": msg }))).into_response()
}

async fn runner_list(State(inner): State<Arc<Inner>>, parts: Parts) -> Response {
    runner_api(inner, Endpoint::RunnerList, parts).await
}

async fn unclaimed_tasks(State(inner): State<Arc<Inner>>, parts: Parts) -> Response {
    runner_api(inner, Endpoint::UnclaimedTasks, parts).await
}

async fn running_tasks(State(inner): State<Arc<Inner>>, parts: Parts) -> Response {
    runner_api(inner, Endpoint::RunningTasks, parts).await
}

/// First non-empty value of each query parameter (percent-decoded).
fn query_params(query: Option<&str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if !v.trim().is_empty() {
            out.entry(k.into_owned())
                .or_insert_with(|| v.trim().to_string());
        }
    }
    out
}

#[derive(Debug, PartialEq)]
enum Auth {
    Ok,
    Missing,
    Invalid,
}

/// `Circle-Token: <api token>`, `Authorization: Basic base64(<token>:)` (the
/// password is ignored) or `Authorization: Bearer <api token>`. Runner
/// (resource-class) tokens are not API tokens, so they are rejected.
fn authenticate(headers: &HeaderMap, inner: &Inner) -> Auth {
    let token = if let Some(v) = headers.get("circle-token") {
        v.to_str().ok().map(|s| s.trim().to_string())
    } else if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().unwrap_or("").trim();
        let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            Some(rest.to_string())
        } else if scheme.eq_ignore_ascii_case("basic") {
            base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .map(|s| s.split(':').next().unwrap_or("").to_string())
        } else {
            None
        }
    } else {
        return Auth::Missing;
    };
    match token {
        None => Auth::Invalid,
        Some(t) if t.is_empty() => Auth::Missing,
        Some(t) if inner.lock().api_tokens.contains(&t) => Auth::Ok,
        Some(_) => Auth::Invalid,
    }
}

const MISSING_FILTER: &str = "must specify one of org-id, resource-class, or namespace";

fn answer(
    inner: &Inner,
    endpoint: Endpoint,
    headers: &HeaderMap,
    q: &HashMap<String, String>,
) -> Response {
    match authenticate(headers, inner) {
        Auth::Ok => {}
        Auth::Missing => return message(StatusCode::UNAUTHORIZED, "You must log in first."),
        Auth::Invalid => return message(StatusCode::UNAUTHORIZED, "Invalid token provided."),
    }
    let class = q.get("resource-class");
    match endpoint {
        Endpoint::RunnerList => {
            let filter = if let Some(c) = class {
                RunnerFilter::Class(c.clone())
            } else if let Some(ns) = q.get("namespace") {
                RunnerFilter::Namespace(ns.clone())
            } else if q.contains_key("org-id") {
                RunnerFilter::All
            } else {
                return message(StatusCode::BAD_REQUEST, MISSING_FILTER);
            };
            let items = inner
                .lock()
                .runners(&filter, inner.clock.sim_secs(), inner.wall_now());
            Json(json!({ "items": items })).into_response()
        }
        Endpoint::UnclaimedTasks | Endpoint::RunningTasks => {
            let Some(class) = class else {
                return message(StatusCode::BAD_REQUEST, MISSING_FILTER);
            };
            let counts = inner.lock().counts(class);
            if endpoint == Endpoint::UnclaimedTasks {
                Json(json!({ "unclaimed_task_count": counts.unclaimed })).into_response()
            } else {
                Json(json!({ "running_runner_tasks": counts.running })).into_response()
            }
        }
    }
}

fn fault_response(kind: &FaultKind, endpoint: Endpoint) -> Response {
    match kind {
        FaultKind::RateLimited {
            retry_after_secs,
            body,
        } => {
            let mut resp = match body {
                RateLimitBody::EmptyJson => {
                    (StatusCode::TOO_MANY_REQUESTS, Json(json!({}))).into_response()
                }
                RateLimitBody::PlainText => {
                    (StatusCode::TOO_MANY_REQUESTS, "Rate limited.").into_response()
                }
            };
            let reset = retry_after_secs.unwrap_or(60).to_string();
            let h = resp.headers_mut();
            if let Some(s) = retry_after_secs {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*s));
            }
            for (name, value) in [
                ("ratelimit-limit", "60"),
                ("ratelimit-remaining", "0"),
                ("ratelimit-reset", reset.as_str()),
                ("x-ratelimit-limit-minute", "60"),
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", reset.as_str()),
            ] {
                if let Ok(v) = HeaderValue::from_str(value) {
                    h.insert(name, v);
                }
            }
            resp
        }
        FaultKind::ServerError { status } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            message(status, status.canonical_reason().unwrap_or("Server error"))
        }
        FaultKind::MalformedBody { body } => {
            let body = body.clone().unwrap_or_else(|| {
                match endpoint {
                    Endpoint::RunnerList => r#"{"items": [{"resource_class": "#,
                    Endpoint::UnclaimedTasks => r#"{"unclaimed_task_count": 1"#,
                    Endpoint::RunningTasks => r#"{"running_runner_tasks": 1"#,
                }
                .to_string()
            });
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                body,
            )
                .into_response()
        }
        // Latency and outages never produce a response here.
        FaultKind::Latency { .. } | FaultKind::Outage { .. } => {
            message(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
        }
    }
}

/// Fails the connection the request came on; never returns a response.
async fn outage(ctl: Option<ConnCtl>, mode: OutageMode) -> Response {
    let Some(ctl) = ctl else {
        return std::future::pending().await;
    };
    if mode == OutageMode::Hang {
        tokio::time::sleep(HANG_FOR).await;
    }
    ctl.reset.store(mode != OutageMode::Close, Ordering::SeqCst);
    ctl.kill.cancel();
    std::future::pending().await
}

async fn runner_api(inner: Arc<Inner>, endpoint: Endpoint, parts: Parts) -> Response {
    let q = query_params(parts.uri.query());
    let class = q.get("resource-class").cloned();
    let decision = {
        let mut st = inner.lock();
        st.count_request(endpoint, class.as_deref());
        faults::decide(&mut st.faults, class.as_deref(), endpoint, Instant::now())
    };
    let mut event = RequestEvent {
        wall_secs: inner.clock.wall_secs(),
        sim_secs: inner.clock.sim_secs(),
        endpoint,
        path: parts.uri.path().to_string(),
        resource_class: class,
        status: None,
        fault: (!decision.applied.is_empty()).then(|| decision.applied.join("+")),
    };
    if !decision.latency.is_zero() {
        tokio::time::sleep(decision.latency).await;
    }
    let response = match &decision.action {
        Some(FaultKind::Outage { mode }) => {
            inner.lock().record_outcome(event);
            return outage(parts.extensions.get::<ConnCtl>().cloned(), *mode).await;
        }
        Some(kind) => fault_response(kind, endpoint),
        None => answer(&inner, endpoint, &parts.headers, &q),
    };
    event.status = Some(response.status().as_u16());
    inner.lock().record_outcome(event);
    response
}

// ---- control API ----

type ControlResult<T> = Result<T, Response>;

fn bad_request(msg: impl AsRef<str>) -> Response {
    message(StatusCode::BAD_REQUEST, msg.as_ref())
}

#[derive(Deserialize)]
struct TokenBody {
    token: String,
}

async fn control_add_api_token(
    State(inner): State<Arc<Inner>>,
    Json(b): Json<TokenBody>,
) -> ControlResult<StatusCode> {
    inner.add_api_token(&b.token).map_err(bad_request)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn control_revoke_api_token(
    State(inner): State<Arc<Inner>>,
    Json(b): Json<TokenBody>,
) -> StatusCode {
    inner.lock().api_tokens.remove(b.token.trim());
    StatusCode::NO_CONTENT
}

#[derive(Deserialize)]
struct ClassBody {
    resource_class: String,
    runner_token: String,
}

async fn control_add_class(
    State(inner): State<Arc<Inner>>,
    Json(b): Json<ClassBody>,
) -> ControlResult<StatusCode> {
    inner
        .add_resource_class(&b.resource_class, &b.runner_token)
        .map_err(bad_request)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn control_list_classes(State(inner): State<Arc<Inner>>) -> Json<Vec<String>> {
    Json(inner.lock().classes.keys().cloned().collect())
}

#[derive(Serialize)]
struct EnqueueResponse {
    ids: Vec<super::model::TaskId>,
}

async fn control_enqueue(
    State(inner): State<Arc<Inner>>,
    Json(req): Json<EnqueueRequest>,
) -> ControlResult<Json<EnqueueResponse>> {
    let ids = inner.enqueue(&req).map_err(bad_request)?;
    Ok(Json(EnqueueResponse { ids }))
}

async fn control_counts(
    State(inner): State<Arc<Inner>>,
    Query(q): Query<HashMap<String, String>>,
) -> ControlResult<Json<super::model::Counts>> {
    let class = q
        .get("resource-class")
        .ok_or_else(|| bad_request("resource-class is required"))?;
    Ok(Json(inner.lock().counts(class)))
}

async fn control_ledger(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    Json(inner.lock().ledger())
}

async fn control_agents(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    Json(inner.lock().agents())
}

async fn control_add_fault(
    State(inner): State<Arc<Inner>>,
    Json(f): Json<Fault>,
) -> ControlResult<StatusCode> {
    inner.inject_fault(f).map_err(bad_request)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn control_list_faults(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    Json(inner.active_faults())
}

async fn control_clear_faults(State(inner): State<Arc<Inner>>) -> StatusCode {
    inner.lock().faults.clear();
    StatusCode::NO_CONTENT
}

async fn control_requests(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    Json(inner.lock().stats.clone())
}

async fn control_request_log(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    let log: Vec<RequestEvent> = inner.lock().log.iter().cloned().collect();
    Json(log)
}

async fn control_reset_requests(State(inner): State<Arc<Inner>>) -> StatusCode {
    inner.lock().reset_requests();
    StatusCode::NO_CONTENT
}

async fn control_settings(State(inner): State<Arc<Inner>>) -> Json<Settings> {
    Json(inner.lock().settings.clone())
}

async fn control_put_settings(
    State(inner): State<Arc<Inner>>,
    Json(s): Json<Settings>,
) -> ControlResult<StatusCode> {
    inner.update_settings(s).map_err(bad_request)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn control_clock(State(inner): State<Arc<Inner>>) -> impl IntoResponse {
    Json(json!({
        "simulated_secs": inner.clock.sim_secs(),
        "wall_secs": inner.clock.wall_secs(),
        "time_scale": inner.clock.scale.0,
        "started_at": humantime::format_rfc3339_millis(inner.clock.started_at()).to_string(),
    }))
}

async fn control_reset(State(inner): State<Arc<Inner>>) -> StatusCode {
    inner.reset();
    StatusCode::NO_CONTENT
}
