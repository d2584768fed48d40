use axum::extract::State;
use axum::http::{Extensions, HeaderMap};
use axum::response::Response;
use shared::auth::Principal;
use shared::cache::bypass_requested;
use shared::error::{ApiError, ErrorEnvelope};
use shared::http::{ApiJson, deadline};
use shared::openai_compat::{OpenAiChatRequest, OpenAiChatResponse};
use shared::services::Services;

/// OpenAI-compatible chat completion (non-streaming; no conversation memory).
///
/// Point any OpenAI SDK's base URL at `<function URL>/v1`. `stream: true` is answered with a 400
/// naming the stream function's URL, which serves the streaming variant.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = OpenAiChatRequest,
    security(("api_key" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "A `chat.completion` object", body = OpenAiChatResponse),
        (status = 400, description = "Malformed JSON, or `stream: true`", body = ErrorEnvelope),
        (status = 422, description = "Validation failed", body = ErrorEnvelope),
        (status = 429, description = "Rate limited (ours or upstream)", body = ErrorEnvelope),
        (status = 502, description = "Upstream failed", body = ErrorEnvelope),
        (status = 503, description = "A dependency is unavailable", body = ErrorEnvelope),
        (status = 504, description = "Upstream timed out", body = ErrorEnvelope)
    )
)]
pub async fn completions(
    State(services): State<Services>,
    principal: Principal,
    headers: HeaderMap,
    extensions: Extensions,
    ApiJson(request): ApiJson<OpenAiChatRequest>,
) -> Result<Response, ApiError> {
    if request.wants_stream() {
        let target = services.config.stream_function_url.as_deref().map_or_else(
            || "the stream function's URL".to_owned(),
            |url| format!("{}/v1/chat/completions", url.trim_end_matches('/')),
        );
        return Err(ApiError::BadRequest {
            code: "stream_not_supported",
            message: format!(
                "this endpoint does not stream; send `stream: true` requests to {target}"
            ),
            param: Some("stream".to_owned()),
        });
    }
    let request = request.validate(services.chat.llm.registry())?;
    let (answer, limit) = services
        .chat
        .complete(
            &principal,
            &request,
            !bypass_requested(&headers),
            deadline(&extensions),
        )
        .await?;
    Ok(OpenAiChatResponse::into_response(answer, limit))
}
