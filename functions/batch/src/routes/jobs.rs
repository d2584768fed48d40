use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use shared::auth::{KeyKind, Principal};
use shared::error::{ApiError, ErrorEnvelope, FieldError};
use shared::http::{ApiJson, ApiQuery};
use shared::jobs::{ItemState, JobItem, JobStatus, MAX_JOB_ITEMS, NewJob};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::Batch;
use crate::fanout::{BatchRequest, ItemResult, ItemStatus, ValidItem};

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1_000;

/// `POST /batch/jobs` answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobAccepted {
    pub job_id: Uuid,
    pub status: JobStatus,
    pub total: u64,
    /// RFC 3339.
    pub created_at: String,
}

/// Submits up to 10000 prompts (the `POST /batch` body) to run in the background.
///
/// The job is stored and answered with 202 and its id; the scheduled drain runs it. Items are
/// admitted against your rate limits as they run, so a large job waits for your quota instead
/// of failing. Anonymous callers cannot submit jobs.
#[utoipa::path(
    post,
    path = "/batch/jobs",
    tag = "jobs",
    request_body = BatchRequest,
    security(("api_key" = []), ("bearer" = [])),
    responses(
        (status = 202, description = "Stored and queued", body = JobAccepted,
         headers(("location" = String, description = "Where to read the job"))),
        (status = 422, description = "Validation failed", body = ErrorEnvelope),
        (status = 503, description = "DynamoDB is unavailable", body = ErrorEnvelope)
    )
)]
pub async fn submit(
    State(batch): State<Batch>,
    principal: Principal,
    ApiJson(request): ApiJson<BatchRequest>,
) -> Result<Response, ApiError> {
    if principal.key_kind == KeyKind::Anonymous {
        return Err(ApiError::Unauthorized);
    }
    let valid = request.validate(batch.services.chat.llm.registry(), MAX_JOB_ITEMS)?;
    let inputs = valid
        .items
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()
        .map_err(ApiError::internal)?;
    let job = batch
        .jobs
        .create(NewJob {
            owner: principal.user_id,
            tier: principal.tier,
            spec: serde_json::to_value(valid.options).map_err(ApiError::internal)?,
            inputs,
        })
        .await?;
    let mut response = (
        StatusCode::ACCEPTED,
        Json(JobAccepted {
            job_id: job.id,
            status: job.status,
            total: job.total,
            created_at: job.created_at,
        }),
    )
        .into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/batch/jobs/{}", job.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ResultsPage {
    /// Results per page, 1..=1000 (default 100).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A job's progress and a page of its results.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub job_id: Uuid,
    pub status: JobStatus,
    pub total: u64,
    /// Items with a result.
    pub completed: u64,
    pub successful: u64,
    pub failed: u64,
    pub pending: u64,
    pub created_at: String,
    pub updated_at: String,
    /// In item order; items without a result yet show as `pending` or `running`.
    pub results: Vec<ItemResult>,
    pub next_cursor: Option<String>,
}

fn invalid_cursor() -> ApiError {
    ApiError::BadRequest {
        code: "invalid_cursor",
        message: "cursor is not valid for this job".to_owned(),
        param: Some("cursor".to_owned()),
    }
}

fn encode_cursor(job: Uuid, after: u32) -> String {
    URL_SAFE_NO_PAD.encode(format!("{job}:{after}"))
}

/// A cursor names the job it belongs to, so it cannot be replayed against another one.
fn decode_cursor(job: Uuid, cursor: &str) -> Result<u32, ApiError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(cursor.as_bytes())
        .map_err(|_| invalid_cursor())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid_cursor())?;
    let (id, after) = text.split_once(':').ok_or_else(invalid_cursor)?;
    if id != job.to_string() {
        return Err(invalid_cursor());
    }
    after.parse().map_err(|_| invalid_cursor())
}

/// What a stored item shows: its recorded result, or where it is.
fn view(item: JobItem) -> ItemResult {
    let index = usize::try_from(item.index).unwrap_or(usize::MAX);
    if let Some(result) = item
        .result
        .and_then(|r| serde_json::from_value::<ItemResult>(r).ok())
    {
        return result;
    }
    let input = serde_json::from_value::<ValidItem>(item.input).ok();
    ItemResult {
        index,
        id: input
            .as_ref()
            .map_or_else(|| index.to_string(), |i| i.id.clone()),
        status: match item.state {
            ItemState::Running => ItemStatus::Running,
            ItemState::Pending => ItemStatus::Pending,
            // Finished but unreadable: say so rather than pretend it is still to come.
            ItemState::Succeeded | ItemState::Failed => ItemStatus::Error,
        },
        output: None,
        model: input.map(|i| i.model).unwrap_or_default(),
        usage: None,
        cost_estimate: 0.0,
        latency_ms: 0,
        error: None,
    }
}

/// One of your jobs: status, progress counts and a page of results.
#[utoipa::path(
    get,
    path = "/batch/jobs/{id}",
    tag = "jobs",
    params(("id" = String, Path, description = "Job UUID"), ResultsPage),
    security(("api_key" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 400, description = "Invalid cursor", body = ErrorEnvelope),
        (status = 404, description = "Unknown, expired, or not yours", body = ErrorEnvelope),
        (status = 422, description = "Not a UUID, or a bad limit", body = ErrorEnvelope)
    )
)]
pub async fn status(
    State(batch): State<Batch>,
    principal: Principal,
    Path(id): Path<String>,
    ApiQuery(page): ApiQuery<ResultsPage>,
) -> Result<Json<JobView>, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| {
        ApiError::Validation(vec![FieldError::at(
            "path",
            "id",
            "uuid",
            "id must be a UUID",
        )])
    })?;
    let limit = page.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::Validation(vec![FieldError::at(
            "query",
            "limit",
            "range",
            format!("limit must be between 1 and {MAX_PAGE}"),
        )]));
    }
    let after = page.cursor.map(|c| decode_cursor(id, &c)).transpose()?;
    let not_found = || ApiError::NotFound("job");
    let owner = &principal.user_id;
    let job = batch.jobs.get(owner, id).await?.ok_or_else(not_found)?;
    let items = batch
        .jobs
        .items(owner, id, after, limit as usize)
        .await?
        .ok_or_else(not_found)?;
    let next_cursor = items
        .has_more
        .then(|| items.items.last().map(|last| encode_cursor(id, last.index)))
        .flatten();
    Ok(Json(JobView {
        job_id: job.id,
        status: job.status,
        total: job.total,
        completed: job.finished(),
        successful: job.succeeded,
        failed: job.failed,
        pending: job.total.saturating_sub(job.finished()),
        created_at: job.created_at,
        updated_at: job.updated_at,
        results: items.items.into_iter().map(view).collect(),
        next_cursor,
    }))
}
