use lambda_runtime::{LambdaEvent, service_fn};
use shared::Config;

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    shared::telemetry::init();
    let config = Config::from_env().inspect_err(|e| tracing::error!(error = %e, "cold start"))?;
    let router = batch::app(&config);
    // Not `lambda_http::run`: this function also receives EventBridge scheduled events.
    lambda_runtime::run(service_fn(move |event: LambdaEvent<serde_json::Value>| {
        batch::handle_event(router.clone(), event)
    }))
    .await
}
