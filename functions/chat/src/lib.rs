//! The `chat` function: chat with conversation memory, OpenAI-compatible completions, the
//! model registry and conversation history.
//!
//! `app` builds the whole HTTP surface from [`Services`]; `main.rs` only wires it to Lambda.
//! Handlers parse, call `shared`'s chat service and map the result.

mod routes;

use axum::routing::{get, post};
use axum::{Extension, Router};
use shared::http::{FunctionInfo, SecuritySchemes, common_routes, serve};
use shared::services::Services;
use utoipa::OpenApi;

pub const FUNCTION_NAME: &str = "chat";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "chat",
        description = "Chat with conversation memory, OpenAI-compatible completions, models and history."
    ),
    paths(
        routes::chat::chat,
        routes::completions::completions,
        routes::models::models,
        routes::models::openai_models,
        routes::conversations::list,
        routes::conversations::get_one,
        routes::conversations::delete_one,
    ),
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
        .route("/chat", post(routes::chat::chat))
        .route(
            "/v1/chat/completions",
            post(routes::completions::completions),
        )
        .route("/models", get(routes::models::models))
        .route("/v1/models", get(routes::models::openai_models))
        .route("/conversations", get(routes::conversations::list))
        .route(
            "/conversations/{id}",
            get(routes::conversations::get_one).delete(routes::conversations::delete_one),
        )
        .with_state(services)
        .merge(common_routes(ApiDoc::openapi()))
        .layer(Extension(probes));
    serve(routes, info)
}
