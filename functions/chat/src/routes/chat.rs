use axum::Json;
use axum::extract::State;
use axum::http::{Extensions, HeaderMap};
use axum::response::{IntoResponse, Response};
use shared::auth::Principal;
use shared::cache::bypass_requested;
use shared::chat::{ChatRequest, ChatResponse};
use shared::error::{ApiError, ErrorEnvelope};
use shared::http::{ApiJson, deadline};
use shared::services::Services;

/// One chat turn with conversation memory.
///
/// The upstream prompt is the system prompt, the last 20 stored messages and the new message.
/// Identical prompts are answered from the cache (`X-Cache: HIT`, no upstream call, no token
/// charge) unless the request says `Cache-Control: no-cache`.
#[utoipa::path(
    post,
    path = "/chat",
    tag = "chat",
    request_body = ChatRequest,
    security(("api_key" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The assistant's answer", body = ChatResponse,
         headers(("x-cache" = String, description = "HIT or MISS"),
                 ("x-ratelimit-limit" = u64), ("x-ratelimit-remaining" = u64), ("x-ratelimit-reset" = u64))),
        (status = 404, description = "Unknown conversation (or not yours)", body = ErrorEnvelope),
        (status = 429, description = "Rate limited (ours or upstream)", body = ErrorEnvelope),
        (status = 502, description = "Upstream failed", body = ErrorEnvelope),
        (status = 503, description = "A dependency is unavailable", body = ErrorEnvelope),
        (status = 504, description = "Upstream timed out", body = ErrorEnvelope)
    )
)]
pub async fn chat(
    State(services): State<Services>,
    principal: Principal,
    headers: HeaderMap,
    extensions: Extensions,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let chat = request.validate(services.chat.llm.registry())?;
    let (answer, limit) = services
        .chat
        .chat(
            &principal,
            chat,
            !bypass_requested(&headers),
            deadline(&extensions),
        )
        .await?;
    let hit = answer.cached;
    let mut response = Json(answer).into_response();
    limit.apply(response.headers_mut());
    shared::http::set_cache_header(response.headers_mut(), hit);
    Ok(response)
}
