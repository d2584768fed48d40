//! The `batch` function: bounded fan-out, long-text chunking and scheduled asynchronous jobs.
//!
//! `app` builds the HTTP surface from a [`Batch`] (the shared [`Services`] plus the job store);
//! `main.rs` only wires it to Lambda. The same binary also receives the EventBridge schedule,
//! which drains queued jobs ([`drain::drain`]); [`handle_event`] tells the two apart.
//!
//! Decisions this function makes where the design is silent:
//! - `/batch` and `/batch/long-text` items bypass the response cache: a batch is admitted in
//!   one rate-limit update for all its items before any upstream call, and batches often repeat
//!   a prompt on purpose (sampling).
//! - Jobs are not charged at submission: each item is admitted against the owner's quotas when
//!   a drain runs it. A job that hits a limit waits (its lease is released until the limit
//!   resets) instead of failing, so a job larger than an hour's quota still completes, over
//!   several hours. Anonymous callers cannot submit jobs (a job must have an owner to read it).
//! - A job is `done` when every item has a result and at least one succeeded, `failed` when none
//!   did. Jobs and their results expire `BATCH_JOB_TTL_DAYS` (default 7) after submission.

pub mod chunker;
pub mod drain;
pub mod fanout;
pub mod long_text;
mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::FromRef;
use axum::routing::{get, post};
use axum::{Extension, Router};
use shared::auth::Authenticator;
use shared::http::{FunctionInfo, SecuritySchemes, common_routes, serve};
use shared::jobs::{DynamoJobs, InMemoryJobs, JobStore};
use shared::services::Services;
use utoipa::OpenApi;

pub use drain::{DrainReport, drain};

pub const FUNCTION_NAME: &str = "batch";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "batch",
        description = "Batch inference: bounded fan-out, long-text chunking and scheduled asynchronous jobs."
    ),
    paths(
        routes::batch::run_batch,
        routes::long_text::long_text,
        routes::jobs::submit,
        routes::jobs::status,
    ),
    modifiers(&SecuritySchemes)
)]
pub struct ApiDoc;

/// What the batch function's handlers and drains share (cheap to clone).
#[derive(Clone)]
pub struct Batch {
    pub services: Services,
    pub jobs: Arc<dyn JobStore>,
}

impl FromRef<Batch> for Arc<Authenticator> {
    fn from_ref(batch: &Batch) -> Self {
        batch.services.auth.clone()
    }
}

impl Batch {
    /// The job store that goes with `services`: DynamoDB when they have a client, in memory
    /// for the in-memory variant used by handler tests.
    pub fn new(services: Services) -> Self {
        let ttl = services.config.batch.job_ttl;
        let jobs: Arc<dyn JobStore> = match &services.dynamo {
            Some(client) => Arc::new(DynamoJobs::new(
                client.clone(),
                services.config.tables.jobs.clone(),
                ttl,
            )),
            None => Arc::new(InMemoryJobs::new(ttl)),
        };
        Self { services, jobs }
    }
}

/// The function's router with every shared layer applied.
pub fn app(batch: Batch) -> Router {
    let info = FunctionInfo {
        name: FUNCTION_NAME,
        version: env!("CARGO_PKG_VERSION"),
        max_body_bytes: batch.services.config.max_body_bytes,
    };
    let probes = batch.services.probes.clone();
    let routes = Router::new()
        .route("/batch", post(routes::batch::run_batch))
        .route("/batch/long-text", post(routes::long_text::long_text))
        .route("/batch/jobs", post(routes::jobs::submit))
        .route("/batch/jobs/{id}", get(routes::jobs::status))
        .with_state(batch)
        .merge(common_routes(ApiDoc::openapi()))
        .layer(Extension(probes));
    serve(routes, info)
}

/// Epoch milliseconds in 2001: no real invocation deadline is earlier.
const EPOCH_FLOOR_MS: u64 = 1_000_000_000_000;

/// How long a drain may run: until the invocation's deadline (`deadline_ms` from the Lambda
/// context) less `margin`.
///
/// Lambda sends the deadline as epoch milliseconds. `cargo lambda watch` sends a fixed
/// `600000` instead (its 10-minute invocation timeout); a value too small to be an epoch is
/// therefore read as milliseconds from now. Zero, or a deadline already past, leaves no time.
pub fn drain_deadline(deadline_ms: u64, margin: Duration) -> Instant {
    let left_ms = if deadline_ms >= EPOCH_FLOOR_MS {
        deadline_ms.saturating_sub(shared::jobs::now_ms())
    } else {
        deadline_ms
    };
    Instant::now() + Duration::from_millis(left_ms).saturating_sub(margin)
}

/// Entry point for every invocation of the batch function.
///
/// One binary receives two kinds of events: function-URL HTTP requests and the EventBridge
/// schedule. Scheduled events are recognised by `source: "aws.events"` and run the drain under
/// the invocation's deadline; everything else must be a function-URL (HTTP API v2) payload and
/// goes through `lambda_http`'s adapter to the router, exactly as `lambda_http::run` would.
pub async fn handle_event(
    batch: Batch,
    router: Router,
    event: lambda_runtime::LambdaEvent<serde_json::Value>,
) -> Result<serde_json::Value, lambda_runtime::Error> {
    use lambda_http::tower::ServiceExt;

    let lambda_runtime::LambdaEvent { payload, context } = event;
    if payload.get("source").and_then(|s| s.as_str()) == Some("aws.events") {
        let deadline = drain_deadline(context.deadline, batch.services.config.batch.drain_margin);
        let budget_ms = deadline
            .saturating_duration_since(Instant::now())
            .as_millis();
        let report = drain(&batch, deadline).await;
        tracing::info!(request_id = %context.request_id, budget_ms, ?report, "scheduled drain finished");
        return Ok(serde_json::to_value(report)?);
    }
    let request: lambda_http::request::LambdaRequest = serde_json::from_value(payload)?;
    let adapter = lambda_http::Adapter::from(router);
    let response = adapter
        .oneshot(lambda_runtime::LambdaEvent::new(request, context))
        .await?;
    Ok(serde_json::to_value(response)?)
}
