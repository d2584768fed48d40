use axum::Json;
use axum::extract::State;
use axum::http::{Extensions, HeaderMap};
use axum::response::{IntoResponse, Response};
use shared::auth::Principal;
use shared::cache::bypass_requested;
use shared::error::{ApiError, ErrorEnvelope};
use shared::http::{ApiJson, deadline};

use crate::request::AnalyzeRequest;
use crate::response::AnalyzeResponse;
use crate::service::Analyzer;

/// Sentiment, keywords, summary and entities of a text, the requested tasks run concurrently.
///
/// With `mode=auto` (the default) each task asks the LLM for strict JSON and falls back to the
/// local method when that fails; `mode=llm` never falls back, `mode=local` never calls out.
/// Every result names its `method`. A task that fails fills `errors.<task>` while the others
/// are still returned; only when every task fails is the answer an error (502, or the common
/// error when they all failed alike). An analysis counts as one request against the rate limit
/// and reserves the estimated tokens of its LLM calls. Identical analyses are answered from the
/// cache for an hour (`X-Cache: HIT`) unless the request says `Cache-Control: no-cache`.
#[utoipa::path(
    post,
    path = "/analyze",
    tag = "analyze",
    request_body = AnalyzeRequest,
    security(("api_key" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "Results of the tasks that succeeded, errors of the others", body = AnalyzeResponse,
         headers(("x-cache" = String, description = "HIT or MISS"),
                 ("x-ratelimit-limit" = u64), ("x-ratelimit-remaining" = u64), ("x-ratelimit-reset" = u64))),
        (status = 429, description = "Rate limited (ours or upstream)", body = ErrorEnvelope),
        (status = 502, description = "Every task failed upstream", body = ErrorEnvelope),
        (status = 503, description = "mode=llm without an LLM provider, or a dependency is down", body = ErrorEnvelope),
        (status = 504, description = "Every task timed out upstream", body = ErrorEnvelope)
    )
)]
pub async fn analyze(
    State(analyzer): State<Analyzer>,
    principal: Principal,
    headers: HeaderMap,
    extensions: Extensions,
    ApiJson(request): ApiJson<AnalyzeRequest>,
) -> Result<Response, ApiError> {
    let job = request.validate()?;
    let (body, limit) = analyzer
        .analyze(
            &principal,
            job,
            !bypass_requested(&headers),
            deadline(&extensions),
        )
        .await?;
    let hit = body.cached;
    let mut response = Json(body).into_response();
    limit.apply(response.headers_mut());
    shared::http::set_cache_header(response.headers_mut(), hit);
    Ok(response)
}
