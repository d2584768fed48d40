//! The `analyze` function: Content analysis: sentiment, keywords, summary and entities.
//!
//! `app` builds the whole HTTP surface from a [`Config`]; `main.rs` only wires it to Lambda.

use axum::Router;
use shared::Config;
use shared::http::{FunctionInfo, common_routes, serve};
use utoipa::OpenApi;

pub const FUNCTION_NAME: &str = "analyze";

#[derive(OpenApi)]
#[openapi(info(
    title = "analyze",
    description = "Content analysis: sentiment, keywords, summary and entities."
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
