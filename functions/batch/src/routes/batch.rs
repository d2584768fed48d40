use axum::Json;
use axum::extract::State;
use axum::http::Extensions;
use axum::response::{IntoResponse, Response};
use shared::auth::Principal;
use shared::error::{ApiError, ErrorEnvelope};
use shared::http::{ApiJson, deadline};

use crate::Batch;
use crate::fanout::{
    BatchRequest, BatchResponse, MAX_BATCH_ITEMS, items_deadline, run_batch as run,
};

/// Runs up to 100 prompts with at most `max_concurrency` upstream calls in flight.
///
/// The whole batch is admitted up front (every item counts as a request and holds its token
/// estimate), so a batch that cannot fit is a 429 before any upstream call. Each item has its
/// own timeout, retries and fallback; a failing item is reported in its result with the status
/// and code it would have had alone, and never fails the batch. Results keep input order.
/// Items are not served from the response cache.
#[utoipa::path(
    post,
    path = "/batch",
    tag = "batch",
    request_body = BatchRequest,
    security(("api_key" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "Every item's result, in input order", body = BatchResponse,
         headers(("x-ratelimit-limit" = u64), ("x-ratelimit-remaining" = u64), ("x-ratelimit-reset" = u64))),
        (status = 422, description = "Validation failed (0 or more than 100 items, bad options, unknown model)", body = ErrorEnvelope),
        (status = 429, description = "The batch does not fit the rate limits", body = ErrorEnvelope),
        (status = 503, description = "A dependency is unavailable", body = ErrorEnvelope)
    )
)]
pub async fn run_batch(
    State(batch): State<Batch>,
    principal: Principal,
    extensions: Extensions,
    ApiJson(request): ApiJson<BatchRequest>,
) -> Result<Response, ApiError> {
    let valid = request.validate(batch.services.chat.llm.registry(), MAX_BATCH_ITEMS)?;
    let (body, limit) = run(
        &batch.services,
        &principal,
        valid,
        items_deadline(deadline(&extensions)),
    )
    .await?;
    let mut response = Json(body).into_response();
    limit.apply(response.headers_mut());
    Ok(response)
}
