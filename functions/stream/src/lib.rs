//! The `stream` function: token streaming over a RESPONSE_STREAM function URL.
//!
//! `app` builds the whole HTTP surface from [`Services`]; `main.rs` hands it to
//! `lambda_http::run_with_streaming_response`, which sends each SSE event as it is produced.

mod formats;
mod pump;
mod routes;

use axum::routing::post;
use axum::{Extension, Router};
use shared::http::{FunctionInfo, SecuritySchemes, common_routes, serve};
use shared::services::Services;
use utoipa::OpenApi;

pub use formats::{ChatStreamEvent, SseEvent, replay_pieces};

pub const FUNCTION_NAME: &str = "stream";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "stream",
        description = "Token streaming over Server-Sent Events on a RESPONSE_STREAM function URL."
    ),
    paths(routes::chat_stream, routes::completions),
    components(schemas(ChatStreamEvent, SseEvent)),
    modifiers(&SecuritySchemes)
)]
pub struct ApiDoc;

/// The function's router with every shared layer applied.
pub fn app(services: Services) -> Router {
    let info = FunctionInfo {
        name: FUNCTION_NAME,
        version: env!("CARGO_PKG_VERSION"),
        max_body_bytes: services.config.max_body_bytes,
    };
    let probes = services.probes.clone();
    let routes = Router::new()
        .route("/chat/stream", post(routes::chat_stream))
        .route("/v1/chat/completions", post(routes::completions))
        .with_state(services)
        .merge(common_routes(ApiDoc::openapi()))
        .layer(Extension(probes));
    serve(routes, info)
}
