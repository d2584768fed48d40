use shared::Config;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    shared::telemetry::init();
    let config = Config::from_env().inspect_err(|e| tracing::error!(error = %e, "cold start"))?;
    // Streaming mode: response bodies are sent to the client as they are produced.
    lambda_http::run_with_streaming_response(stream::app(&config)).await
}
