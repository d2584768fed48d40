//! Routes, introspection endpoints and the serving loop.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::chat::chat_completions;
use crate::openai::ApiError;
use crate::state::{MAX_RECORDED_REQUESTS, MockState, RecordedRequest, Stats};

/// Load tests send long conversations; axum's 2 MiB default would reject some of them.
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

const DEFAULT_REQUESTS_LIMIT: usize = 20;

/// After SIGTERM/SIGINT, in-flight requests get this long to finish. A `hang` fault or a slow
/// stream would otherwise hold graceful shutdown open for minutes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Model ids advertised by `GET /v1/models`; any other id is accepted as well.
const LISTED_MODELS: &[&str] = &[
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "mock-fault-429",
    "mock-fault-500",
    "mock-fault-502",
    "mock-fault-503",
    "mock-fault-hang",
    "mock-fault-cut",
    "mock-fault-malformed",
    "mock-fault-context",
];

pub fn app(state: Arc<MockState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(list_models))
        .route("/health", get(|| async { "ok" }))
        .route("/mock/stats", get(stats))
        .route("/mock/requests", get(recent_requests))
        .route("/mock/reset", post(reset))
        .fallback(|| async { ApiError::NotFound })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serves `app(state)` on `listener` until `shutdown` resolves, then drains connections.
pub async fn serve(
    listener: TcpListener,
    state: Arc<MockState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    // Without TCP_NODELAY, Nagle's algorithm holds back small writes such as SSE events and
    // response tails for up to ~40 ms, which would dominate every latency measurement.
    let listener = listener.tap_io(|stream| {
        // A socket without the option still works, only slower.
        let _ = stream.set_nodelay(true);
    });
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves until SIGTERM or SIGINT, then allows in-flight requests [`SHUTDOWN_GRACE`] to finish.
pub async fn run(listener: TcpListener, state: Arc<MockState>) -> io::Result<()> {
    let stop = Arc::new(Notify::new());
    let stop_signal = Arc::clone(&stop);
    let server = serve(listener, state, async move { stop_signal.notified().await });
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        () = termination_signal() => stop.notify_one(),
    }
    tokio::time::timeout(SHUTDOWN_GRACE, server)
        .await
        .unwrap_or(Ok(()))
}

async fn termination_signal() {
    let interrupt = async {
        // If the handler cannot be installed, wait forever rather than stop at once.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}

#[derive(Serialize)]
struct ModelList {
    object: &'static str,
    data: Vec<ModelEntry>,
}

#[derive(Serialize)]
struct ModelEntry {
    id: &'static str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

async fn list_models() -> Json<ModelList> {
    let data = LISTED_MODELS
        .iter()
        .map(|id| ModelEntry {
            id,
            object: "model",
            // A fixed date keeps the listing byte-for-byte reproducible.
            created: 1_700_000_000,
            owned_by: "mock",
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}

async fn stats(State(state): State<Arc<MockState>>) -> Json<Stats> {
    Json(state.stats())
}

/// `?limit=N`, read leniently: a missing or unparsable limit means the default.
async fn recent_requests(
    State(state): State<Arc<MockState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Json<Vec<RecordedRequest>> {
    let limit = query
        .get("limit")
        .and_then(|limit| limit.trim().parse::<usize>().ok())
        .unwrap_or(DEFAULT_REQUESTS_LIMIT)
        .min(MAX_RECORDED_REQUESTS);
    Json(state.recent_requests(limit))
}

async fn reset(State(state): State<Arc<MockState>>) -> StatusCode {
    state.reset();
    StatusCode::NO_CONTENT
}
