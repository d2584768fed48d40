use shared::services::Services;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    shared::telemetry::init();
    // Clients are built once here, outside the handler, and reused by every invocation. The
    // local methods' dictionaries are not: they load on the first request that needs them.
    let services = Services::from_env()
        .await
        .inspect_err(|e| tracing::error!(error = %e, "cold start failed"))?;
    lambda_http::run(analyze::app(services)).await
}
