use shared::services::Services;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    shared::telemetry::init();
    let services = Services::from_env()
        .await
        .inspect_err(|e| tracing::error!(error = %e, "cold start failed"))?;
    // Streaming mode: response bodies are sent to the client as they are produced.
    lambda_http::run_with_streaming_response(stream::app(services)).await
}
