use lambda_runtime::{LambdaEvent, service_fn};
use shared::services::Services;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    shared::telemetry::init();
    // Clients are built once here, outside the handler, and reused by every invocation.
    // (`from_env` reads the Config, secrets included, then calls `Services::from_config`.)
    let services = Services::from_env()
        .await
        .inspect_err(|e| tracing::error!(error = %e, "cold start failed"))?;
    let batch = batch::Batch::new(services);
    let router = batch::app(batch.clone());
    // Not `lambda_http::run`: this function also receives EventBridge scheduled events.
    lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| {
        batch::handle_event(batch.clone(), router.clone(), event)
    }))
    .await
}
