use shared::services::Services;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    shared::telemetry::init();
    let services = Services::from_env()
        .await
        .inspect_err(|e| tracing::error!(error = %e, "cold start failed"))?;
    // Streaming mode: response bodies are sent to the client as they are produced. A transient
    // failure of the runtime API does not end the instance (see shared::lambda).
    let app = stream::app(services);
    shared::lambda::run_with_restarts(|| lambda_http::run_with_streaming_response(app.clone()))
        .await
}
