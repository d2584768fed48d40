use axum::Json;
use axum::extract::State;
use axum::http::Extensions;
use axum::response::{IntoResponse, Response};
use shared::auth::Principal;
use shared::error::{ApiError, ErrorEnvelope};
use shared::http::{ApiJson, deadline};

use crate::Batch;
use crate::fanout::items_deadline;
use crate::long_text::{LongTextRequest, LongTextResponse, process};

/// Splits a long text (up to 200000 characters) at paragraph, then sentence boundaries and
/// runs one task over every chunk concurrently.
///
/// Chunks go to the `models` round-robin; each reports its own result, so some may fail while
/// the others succeed. With `combine: true` one final call merges the chunk outputs. Every
/// call, the final one included, is admitted up front.
#[utoipa::path(
    post,
    path = "/batch/long-text",
    tag = "batch",
    request_body = LongTextRequest,
    security(("api_key" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "Per-chunk results and the combined output", body = LongTextResponse,
         headers(("x-ratelimit-limit" = u64), ("x-ratelimit-remaining" = u64), ("x-ratelimit-reset" = u64))),
        (status = 422, description = "Validation failed (empty or oversize text, bad options)", body = ErrorEnvelope),
        (status = 429, description = "The calls do not fit the rate limits", body = ErrorEnvelope),
        (status = 503, description = "A dependency is unavailable", body = ErrorEnvelope)
    )
)]
pub async fn long_text(
    State(batch): State<Batch>,
    principal: Principal,
    extensions: Extensions,
    ApiJson(request): ApiJson<LongTextRequest>,
) -> Result<Response, ApiError> {
    let job = request.validate(batch.services.chat.llm.registry())?;
    let (body, limit) = process(
        &batch.services,
        &principal,
        job,
        items_deadline(deadline(&extensions)),
    )
    .await?;
    let mut response = Json(body).into_response();
    limit.apply(response.headers_mut());
    Ok(response)
}
