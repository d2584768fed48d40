//! The `batch` function: Batch inference: bounded fan-out, long-text chunking and scheduled asynchronous jobs.
//!
//! `app` builds the whole HTTP surface from a [`Config`]; `main.rs` only wires it to Lambda.

use axum::Router;
use shared::Config;
use shared::http::{FunctionInfo, common_routes, serve};
use utoipa::OpenApi;

pub const FUNCTION_NAME: &str = "batch";

#[derive(OpenApi)]
#[openapi(info(
    title = "batch",
    description = "Batch inference: bounded fan-out, long-text chunking and scheduled asynchronous jobs."
))]
pub struct ApiDoc;

/// The function's router with every shared layer applied.
pub fn app(config: &Config) -> Router {
    let info = FunctionInfo {
        name: FUNCTION_NAME,
        version: env!("CARGO_PKG_VERSION"),
        max_body_bytes: config.max_body_bytes,
    };
    serve(common_routes(ApiDoc::openapi()), info)
}

/// What the scheduled (EventBridge) invocation did.
#[derive(Debug, serde::Serialize)]
pub struct DrainReport {
    pub jobs_claimed: u32,
    pub items_processed: u32,
}

/// Entry point for every invocation of the batch function.
///
/// One binary receives two kinds of events: function-URL HTTP requests and the EventBridge
/// schedule. Scheduled events are recognised by `source: "aws.events"`; everything else must be
/// a function-URL (HTTP API v2) payload and goes through `lambda_http`'s adapter to the router,
/// exactly as `lambda_http::run` would do it.
pub async fn handle_event(
    router: Router,
    event: lambda_runtime::LambdaEvent<serde_json::Value>,
) -> Result<serde_json::Value, lambda_runtime::Error> {
    use lambda_http::tower::ServiceExt;

    let lambda_runtime::LambdaEvent { payload, context } = event;
    if payload.get("source").and_then(|s| s.as_str()) == Some("aws.events") {
        let report = drain_jobs().await;
        tracing::info!(?report, "scheduled drain finished");
        return Ok(serde_json::to_value(report)?);
    }
    let request: lambda_http::request::LambdaRequest = serde_json::from_value(payload)?;
    let adapter = lambda_http::Adapter::from(router);
    let response = adapter
        .oneshot(lambda_runtime::LambdaEvent::new(request, context))
        .await?;
    Ok(serde_json::to_value(response)?)
}

/// Claims and processes queued batch jobs. The job store arrives with the batch issue; until
/// then there is nothing to claim and the report says so.
async fn drain_jobs() -> DrainReport {
    DrainReport {
        jobs_claimed: 0,
        items_processed: 0,
    }
}
