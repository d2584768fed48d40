use axum::Json;
use axum::extract::State;
use serde::Serialize;
use shared::auth::Principal;
use shared::openai_compat::OpenAiModelList;
use shared::services::Services;
use utoipa::ToSchema;

/// One model of the registry.
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelEntry {
    pub id: String,
    pub aliases: Vec<String>,
    pub owned_by: String,
    pub context_window: u32,
    pub max_output_tokens: u32,
    /// USD per 1,000 prompt tokens.
    pub input_price_per_1k: f64,
    /// USD per 1,000 completion tokens.
    pub output_price_per_1k: f64,
    /// Tried once when this model keeps failing.
    pub fallback: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelCatalog {
    pub default_model: String,
    pub models: Vec<ModelEntry>,
}

/// The model registry: ids, aliases, limits, prices and fallbacks.
#[utoipa::path(get, path = "/models", tag = "models",
    security(("api_key" = []), ("bearer" = [])),
    responses((status = 200, description = "The registry", body = ModelCatalog)))]
pub async fn models(State(services): State<Services>, _caller: Principal) -> Json<ModelCatalog> {
    let registry = services.chat.llm.registry();
    Json(ModelCatalog {
        default_model: registry.default_model().id.clone(),
        models: registry
            .models()
            .iter()
            .map(|m| ModelEntry {
                id: m.id.clone(),
                aliases: m.aliases.clone(),
                owned_by: m.owned_by.clone(),
                context_window: m.context_window,
                max_output_tokens: m.max_output_tokens,
                input_price_per_1k: m.input_per_1k_usd,
                output_price_per_1k: m.output_per_1k_usd,
                fallback: m.fallback.clone(),
            })
            .collect(),
    })
}

/// OpenAI-compatible model list.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    security(("api_key" = []), ("bearer" = [])),
    responses((status = 200, description = "`list` of `model` objects", body = OpenAiModelList)))]
pub async fn openai_models(
    State(services): State<Services>,
    _caller: Principal,
) -> Json<OpenAiModelList> {
    Json(OpenAiModelList::from_registry(services.chat.llm.registry()))
}
