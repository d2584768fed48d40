use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use shared::auth::Principal;
use shared::conversations::{ConversationMeta, StoredMessage};
use shared::error::{ApiError, ErrorEnvelope, FieldError};
use shared::http::ApiQuery;
use shared::services::Services;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// 1..=100, default 20.
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationList {
    /// Newest first.
    pub conversations: Vec<ConversationMeta>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ConversationDetail {
    #[serde(flatten)]
    pub meta: ConversationMeta,
    /// Oldest first.
    pub messages: Vec<StoredMessage>,
}

/// A conversation id from the path: anything but a UUID names no conversation.
fn conversation_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| {
        ApiError::Validation(vec![FieldError::at(
            "path",
            "id",
            "uuid",
            "id must be a UUID",
        )])
    })
}

/// Your conversations, newest first, with cursor pagination.
#[utoipa::path(get, path = "/conversations", tag = "conversations", params(ListParams),
    security(("api_key" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "A page of conversations", body = ConversationList),
        (status = 400, description = "Invalid cursor", body = ErrorEnvelope),
        (status = 422, description = "Invalid parameters", body = ErrorEnvelope)
    ))]
pub async fn list(
    State(services): State<Services>,
    principal: Principal,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<ConversationList>, ApiError> {
    let limit = params.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::Validation(vec![FieldError::at(
            "query",
            "limit",
            "range",
            "limit must be between 1 and 100",
        )]));
    }
    let page = services
        .chat
        .conversations
        .list(&principal.user_id, limit as usize, params.cursor.as_deref())
        .await?;
    Ok(Json(ConversationList {
        conversations: page.conversations,
        next_cursor: page.next_cursor,
    }))
}

/// One of your conversations with all its messages and counters.
#[utoipa::path(get, path = "/conversations/{id}", tag = "conversations",
    params(("id" = Uuid, Path, description = "Conversation UUID")),
    security(("api_key" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "The conversation", body = ConversationDetail),
        (status = 404, description = "Unknown, or not yours", body = ErrorEnvelope),
        (status = 422, description = "Not a UUID", body = ErrorEnvelope)
    ))]
pub async fn get_one(
    State(services): State<Services>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<Json<ConversationDetail>, ApiError> {
    let id = conversation_id(&id)?;
    let (meta, messages) = services
        .chat
        .conversations
        .get(&principal.user_id, id)
        .await?
        .ok_or(ApiError::NotFound("conversation"))?;
    Ok(Json(ConversationDetail { meta, messages }))
}

/// Deletes one of your conversations and all its messages.
#[utoipa::path(delete, path = "/conversations/{id}", tag = "conversations",
    params(("id" = Uuid, Path, description = "Conversation UUID")),
    security(("api_key" = []), ("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 404, description = "Unknown, or not yours", body = ErrorEnvelope),
        (status = 422, description = "Not a UUID", body = ErrorEnvelope)
    ))]
pub async fn delete_one(
    State(services): State<Services>,
    principal: Principal,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = conversation_id(&id)?;
    if services
        .chat
        .conversations
        .delete(&principal.user_id, id)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::NotFound("conversation"))
    }
}
