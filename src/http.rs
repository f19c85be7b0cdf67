//! Probe and metrics endpoints (axum): `GET /ready` and `GET /metrics` on the
//! ready address (default `:8000`), `GET /live` on the live address (default
//! `:8001`); optionally `/metrics` on an address of its own.
//!
//! Readiness: a standby (not the leader) is ready as soon as it has talked to
//! the API server about the Lease, so rolling updates of a 2-replica
//! deployment proceed; the leader is ready once its caches (RunnerPools,
//! Secrets, pools, VMs) have synced and the controller runs. Liveness only
//! says the process serves HTTP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What `/ready` reports.
#[derive(Debug, Default)]
pub struct Health {
    standby_ok: AtomicBool,
    leader: AtomicBool,
    synced: AtomicBool,
}

impl Health {
    /// Shared handle.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The elector has reached the API server (as standby or leader).
    pub fn set_standby_ok(&self, ok: bool) {
        self.standby_ok.store(ok, Ordering::SeqCst);
    }

    /// This instance holds (or lost) the Lease.
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::SeqCst);
        if !leader {
            self.synced.store(false, Ordering::SeqCst);
        }
    }

    /// The controller's caches synced (or were torn down).
    pub fn set_synced(&self, synced: bool) {
        self.synced.store(synced, Ordering::SeqCst);
    }

    /// Whether this instance leads.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::SeqCst)
    }

    /// The readiness decision.
    pub fn is_ready(&self) -> bool {
        if self.leader.load(Ordering::SeqCst) {
            self.synced.load(Ordering::SeqCst)
        } else {
            self.standby_ok.load(Ordering::SeqCst)
        }
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

async fn ready(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn live() -> impl IntoResponse {
    (StatusCode::OK, "alive\n")
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// Where to listen. Port 0 picks a free port.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// `/ready` (and `/metrics` unless `metrics_addr` is set).
    pub ready_addr: SocketAddr,
    /// `/live`.
    pub live_addr: SocketAddr,
    /// A separate `/metrics` listener.
    pub metrics_addr: Option<SocketAddr>,
}

/// The running servers.
pub struct HttpServers {
    /// Bound address of `/ready`.
    pub ready_addr: SocketAddr,
    /// Bound address of `/live`.
    pub live_addr: SocketAddr,
    /// Bound address of `/metrics`.
    pub metrics_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl HttpServers {
    /// Stops serving.
    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for HttpServers {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Binds every listener (failing fast if an address is taken) and serves
/// until `stop` is cancelled or the returned handle is dropped.
pub async fn serve(
    cfg: &HttpConfig,
    health: Arc<Health>,
    metrics_reg: Arc<Metrics>,
    stop: CancellationToken,
) -> std::io::Result<HttpServers> {
    let state = AppState {
        health,
        metrics: metrics_reg,
    };
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
    };
    let ready_l = bind(cfg.ready_addr).await?;
    let live_l = bind(cfg.live_addr).await?;
    let metrics_l = match cfg.metrics_addr {
        Some(a) => Some(bind(a).await?),
        None => None,
    };
    let ready_addr = ready_l.local_addr()?;
    let live_addr = live_l.local_addr()?;
    let metrics_addr = match &metrics_l {
        Some(l) => l.local_addr()?,
        None => ready_addr,
    };

    let mut ready_router = Router::new()
        .route("/ready", get(ready))
        .route("/readyz", get(ready));
    if metrics_l.is_none() {
        ready_router = ready_router.route("/metrics", get(metrics));
    }
    let live_router = Router::new()
        .route("/live", get(live))
        .route("/livez", get(live));

    let mut tasks = vec![
        spawn_server(
            ready_l,
            ready_router.with_state(state.clone()),
            stop.clone(),
        ),
        spawn_server(live_l, live_router, stop.clone()),
    ];
    if let Some(l) = metrics_l {
        let r = Router::new()
            .route("/metrics", get(metrics))
            .with_state(state);
        tasks.push(spawn_server(l, r, stop));
    }
    Ok(HttpServers {
        ready_addr,
        live_addr,
        metrics_addr,
        tasks,
    })
}

fn spawn_server(l: TcpListener, app: Router, stop: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let r = axum::serve(l, app)
            .with_graceful_shutdown(async move { stop.cancelled_owned().await })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "http server failed");
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_semantics() {
        let h = Health::default();
        assert!(!h.is_ready(), "nothing known yet");
        h.set_standby_ok(true);
        assert!(h.is_ready(), "a healthy standby is ready");
        h.set_leader(true);
        assert!(!h.is_ready(), "a leader is ready only once synced");
        h.set_synced(true);
        assert!(h.is_ready());
        h.set_leader(false);
        h.set_standby_ok(false);
        assert!(!h.is_ready());
    }

    async fn get_status(addr: SocketAddr, path: &str) -> (u16, String) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let r = reqwest::get(format!("http://{addr}{path}"))
            .await
            .expect("request");
        (r.status().as_u16(), r.text().await.expect("body"))
    }

    #[tokio::test]
    async fn endpoints_answer_on_their_ports() {
        let health = Health::shared();
        let m = Metrics::shared();
        m.leader.set(1);
        let stop = CancellationToken::new();
        let cfg = HttpConfig {
            ready_addr: "127.0.0.1:0".parse().unwrap(),
            live_addr: "127.0.0.1:0".parse().unwrap(),
            metrics_addr: None,
        };
        let s = serve(&cfg, health.clone(), m, stop.clone()).await.unwrap();
        assert_ne!(s.ready_addr, s.live_addr);
        assert_eq!(get_status(s.ready_addr, "/ready").await.0, 503);
        health.set_standby_ok(true);
        assert_eq!(get_status(s.ready_addr, "/ready").await.0, 200);
        assert_eq!(get_status(s.live_addr, "/live").await.0, 200);
        assert_eq!(
            get_status(s.live_addr, "/ready").await.0,
            404,
            "/ready is not on the live port"
        );
        let (code, body) = get_status(s.metrics_addr, "/metrics").await;
        assert_eq!(code, 200);
        assert!(body.contains("runner_provisioner_leader 1"), "{body}");
        stop.cancel();
    }

    #[tokio::test]
    async fn separate_metrics_listener_and_taken_port_fails() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = HttpConfig {
            ready_addr: "127.0.0.1:0".parse().unwrap(),
            live_addr: taken.local_addr().unwrap(),
            metrics_addr: None,
        };
        let err = serve(
            &cfg,
            Health::shared(),
            Metrics::shared(),
            CancellationToken::new(),
        )
        .await
        .err()
        .expect("port in use");
        assert!(err.to_string().contains("cannot listen on"), "{err}");

        let cfg = HttpConfig {
            ready_addr: "127.0.0.1:0".parse().unwrap(),
            live_addr: "127.0.0.1:0".parse().unwrap(),
            metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        };
        let s = serve(
            &cfg,
            Health::shared(),
            Metrics::shared(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_ne!(s.metrics_addr, s.ready_addr);
        assert_eq!(get_status(s.metrics_addr, "/metrics").await.0, 200);
        assert_eq!(get_status(s.ready_addr, "/metrics").await.0, 404);
    }
}
