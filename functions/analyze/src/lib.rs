//! The `analyze` function: sentiment, keywords, summary and entities of a text, by the LLM or
//! by local methods, the requested tasks run concurrently.
//!
//! `app` builds the whole HTTP surface from [`Services`]; `main.rs` only wires it to Lambda.
//! The handler parses and validates, [`service::Analyzer`] runs the analysis, [`llm`] asks the
//! model and validates its JSON, [`local`] holds the local methods. Decisions the contract
//! leaves open (one LLM call per task, lazy per-language resources, how limits count an
//! analysis, what is cached) are documented on those modules and in the README.

pub mod llm;
pub mod local;
pub mod request;
pub mod response;
mod routes;
pub mod service;

use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::extract::FromRef;
use axum::routing::post;
use shared::auth::Authenticator;
use shared::http::{FunctionInfo, SecuritySchemes, common_routes, serve};
use shared::services::Services;
use utoipa::OpenApi;

use local::LocalAnalyzer;
use service::Analyzer;

pub const FUNCTION_NAME: &str = "analyze";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "analyze",
        description = "Content analysis: sentiment, keywords, summary and entities, by the LLM or by local methods."
    ),
    paths(routes::analyze),
    modifiers(&SecuritySchemes)
)]
pub struct ApiDoc;

/// State of the routes: the analyzer carries the services, whose authenticator the
/// [`shared::auth::Principal`] extractor needs.
impl FromRef<Analyzer> for Arc<Authenticator> {
    fn from_ref(analyzer: &Analyzer) -> Self {
        analyzer.services().auth.clone()
    }
}

/// The function's router with every shared layer applied.
pub fn app(services: Services) -> Router {
    app_with_local(services, Arc::new(LocalAnalyzer::new()))
}

/// [`app`] around a given local analyser, so tests and benchmarks can share loaded
/// dictionaries between routers.
pub fn app_with_local(services: Services, local: Arc<LocalAnalyzer>) -> Router {
    let info = FunctionInfo {
        name: FUNCTION_NAME,
        version: env!("CARGO_PKG_VERSION"),
        max_body_bytes: services.config.max_body_bytes,
    };
    let probes = services.probes.clone();
    let routes = Router::new()
        .route("/analyze", post(routes::analyze))
        .with_state(Analyzer::new(services, local))
        .merge(common_routes(ApiDoc::openapi()))
        .layer(Extension(probes));
    serve(routes, info)
}
