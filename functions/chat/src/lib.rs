//! The `chat` function: Chat with conversation memory, OpenAI-compatible completions, models and history.
//!
//! `app` builds the whole HTTP surface from a [`Config`]; `main.rs` only wires it to Lambda.

use axum::Router;
use shared::Config;
use shared::http::{FunctionInfo, common_routes, serve};
use utoipa::OpenApi;

pub const FUNCTION_NAME: &str = "chat";

#[derive(OpenApi)]
#[openapi(info(
    title = "chat",
    description = "Chat with conversation memory, OpenAI-compatible completions, models and history."
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
