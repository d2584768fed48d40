//! The `stream` function: Token streaming over Server-Sent Events on a RESPONSE_STREAM function URL.
//!
//! `app` builds the whole HTTP surface from a [`Config`]; `main.rs` only wires it to Lambda.

use axum::Router;
use shared::Config;
use shared::http::{FunctionInfo, common_routes, serve};
use utoipa::OpenApi;

pub const FUNCTION_NAME: &str = "stream";

#[derive(OpenApi)]
#[openapi(info(
    title = "stream",
    description = "Token streaming over Server-Sent Events on a RESPONSE_STREAM function URL."
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
