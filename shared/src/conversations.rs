//! Conversation history.
//!
//! Layout (table `CONVERSATIONS_TABLE`): pk `CONV#<uuid>`; sk `META` holds the owner and the
//! counters, sk `MSG#<seq, 10 digits>` one message each (also carrying `owner`, so the hot-path
//! history query proves ownership without a second read). Sequence numbers start at 0 and are
//! contiguous, so the newest message's seq + 1 is the conversation's `message_count`.
//!
//! A turn's transaction can also carry one unrelated, best-effort write (the response cache's
//! fill, [`BundledWrite`]) to save its round trip. It is never allowed to cost the turn: when
//! DynamoDB refuses the transaction because of that item (its cancellation reason is not
//! `None`: a conflict with a concurrent write of the same cache entry, throttling of its
//! partition) or refuses the request as a whole (a validation error, a missing table, a denied
//! permission), the turn is written again at once without it, and the caller learns that it was
//! not carried. The token settlement is deliberately *not* carried: it updates the principal's
//! rate-limit item, which every admission of that principal writes, and a transaction holding it
//! would fail those admissions with `TransactionConflict` and conflict with the principal's
//! other turns (see `ChatService::finish_turn`).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, DeleteRequest, Put, TransactWriteItem, Update, WriteRequest,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::dynamo::{BundledWrite, now_epoch, now_rfc3339, unavailable};
use crate::error::ApiError;

/// Counters and metadata of one conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConversationMeta {
    pub id: Uuid,
    #[serde(skip)]
    pub owner: String,
    pub title: String,
    pub model: String,
    pub message_count: u64,
    pub total_tokens: u64,
    pub total_cost: f64,
    pub created_at: String,
    pub updated_at: String,
}

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StoredMessage {
    pub seq: u64,
    /// `user` or `assistant`.
    pub role: String,
    pub content: String,
    pub tokens: u64,
    pub created_at: String,
}

/// The recent part of a conversation that a new turn builds on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    /// Oldest first.
    pub messages: Vec<StoredMessage>,
    /// Messages stored so far; the next turn's user message gets this sequence number.
    pub message_count: u64,
}

/// One completed exchange to append.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTurn {
    pub user_message: String,
    pub assistant_message: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub model: String,
    pub cost_usd: f64,
}

/// A page of a principal's conversations, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationPage {
    pub conversations: Vec<ConversationMeta>,
    /// Opaque; pass back to get the next page. `None` on the last page.
    pub next_cursor: Option<String>,
}

/// Storage for conversations.
///
/// Contract:
/// - A conversation belongs to the owner that created it; for any other owner every method
///   behaves exactly as for a missing conversation (`Ok(None)` / `Ok(false)` /
///   `ApiError::NotFound`).
/// - `recent` returns at most `limit` newest messages, oldest first, from one query.
/// - `append_turn` stores the user and assistant messages and updates the counters atomically
///   (all or nothing). Concurrent appends to one conversation never overwrite or lose a message:
///   a conflicting append retries with fresh sequence numbers. A new conversation (`expected`
///   `None`) is created by the first append and fails with `NotFound` if the id already exists
///   for someone else.
/// - Items past their retention (`expires_at`) are ignored by reads even before DynamoDB's TTL
///   deletes them.
#[async_trait]
pub trait ConversationStore: Send + Sync {
    async fn recent(
        &self,
        owner: &str,
        id: Uuid,
        limit: usize,
    ) -> Result<Option<History>, ApiError>;
    /// Returns the sequence number of the turn's user message.
    async fn append_turn(
        &self,
        owner: &str,
        id: Uuid,
        expected_count: Option<u64>,
        turn: &ChatTurn,
    ) -> Result<u64, ApiError>;
    /// `append_turn`, carrying `bundled` in the turn's own write when the store can. Returns the
    /// user message's sequence number and whether `bundled` was committed with the turn.
    /// `bundled` never makes the append fail: a write that cannot commit with it commits
    /// without it (`false`). The default carries nothing.
    async fn append_turn_carrying(
        &self,
        owner: &str,
        id: Uuid,
        expected_count: Option<u64>,
        turn: &ChatTurn,
        bundled: Option<BundledWrite>,
    ) -> Result<(u64, bool), ApiError> {
        drop(bundled);
        let seq = self.append_turn(owner, id, expected_count, turn).await?;
        Ok((seq, false))
    }
    async fn get(
        &self,
        owner: &str,
        id: Uuid,
    ) -> Result<Option<(ConversationMeta, Vec<StoredMessage>)>, ApiError>;
    async fn list(
        &self,
        owner: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<ConversationPage, ApiError>;
    async fn delete(&self, owner: &str, id: Uuid) -> Result<bool, ApiError>;
}

/// Conversation titles are the start of the first user message.
fn title_from(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default().trim();
    let mut title: String = line.chars().take(80).collect();
    if line.chars().count() > 80 {
        title.push('…');
    }
    title
}

const MAX_APPEND_ATTEMPTS: u32 = 40;

fn pk(id: Uuid) -> String {
    format!("CONV#{id}")
}

fn msg_sk(seq: u64) -> String {
    format!("MSG#{seq:010}")
}

struct NewMessage<'a> {
    seq: u64,
    role: &'a str,
    content: &'a str,
    tokens: u64,
}

/// What one transaction attempt of a turn came to.
enum Attempt {
    Committed,
    /// Cancelled by a condition or a conflict on the turn's own items.
    Conflict,
    /// Refused because of the bundled write (or possibly so): retry without it.
    BundledRefused(String),
}

/// When a turn is written, and when its items expire.
struct Stamp {
    now: String,
    expires_at: u64,
    /// Identifies one logical turn across retries, so a turn whose transaction committed but
    /// whose answer was lost (an attempt timed out, then the retry conflicted with itself) is
    /// recognised as written instead of being appended a second time.
    turn_id: String,
}

/// DynamoDB implementation.
pub struct DynamoConversations {
    client: Client,
    table: String,
    retention_secs: u64,
}

impl DynamoConversations {
    pub fn new(client: Client, table: impl Into<String>, retention_days: u32) -> Self {
        Self {
            client,
            table: table.into(),
            retention_secs: u64::from(retention_days) * 86_400,
        }
    }

    /// The conditional put of one message slot of a turn.
    fn message_put(
        &self,
        id: Uuid,
        owner: &str,
        message: &NewMessage<'_>,
        stamp: &Stamp,
    ) -> Result<TransactWriteItem, ApiError> {
        let put = Put::builder()
            .table_name(&self.table)
            .item("pk", s(pk(id)))
            .item("sk", s(msg_sk(message.seq)))
            .item("owner", s(owner))
            .item("role", s(message.role))
            .item("content", s(message.content))
            .item("tokens", n(message.tokens))
            .item("created_at", s(&stamp.now))
            .item("expires_at", n(stamp.expires_at))
            .item("turn_id", s(&stamp.turn_id))
            // A message slot is written once: a concurrent turn that took it makes us retry.
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(ApiError::internal)?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// The newest message's seq and owner, read consistently, after a conflict.
    async fn head(&self, id: Uuid) -> Result<Option<(String, u64)>, ApiError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(pk(id)))
            .key("sk", s("META"))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        Ok(out
            .item()
            .and_then(|item| Some((get_s(item, "owner")?, get_n(item, "message_count")?))))
    }

    /// Whether the message slot `seq` holds the user message of turn `turn_id`.
    async fn slot_holds_turn(&self, id: Uuid, seq: u64, turn_id: &str) -> Result<bool, ApiError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(pk(id)))
            .key("sk", s(msg_sk(seq)))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        Ok(out
            .item()
            .and_then(|item| get_s(item, "turn_id"))
            .is_some_and(|stored| stored == turn_id))
    }

    async fn write_turn(
        &self,
        owner: &str,
        id: Uuid,
        expected: Option<u64>,
        turn: &ChatTurn,
        turn_id: &str,
        bundled: Option<&BundledWrite>,
    ) -> Result<Attempt, ApiError> {
        let now = now_rfc3339();
        let expires_at = now_epoch() + self.retention_secs;
        let base = expected.unwrap_or(0);
        let tokens = turn.prompt_tokens + turn.completion_tokens;
        let meta = match expected {
            None => {
                let put = Put::builder()
                    .table_name(&self.table)
                    .item("pk", s(pk(id)))
                    .item("sk", s("META"))
                    .item("owner", s(owner))
                    .item("title", s(title_from(&turn.user_message)))
                    .item("model", s(&turn.model))
                    .item("message_count", n(2))
                    .item("total_tokens", n(tokens))
                    .item("total_cost", AttributeValue::N(format_cost(turn.cost_usd)))
                    .item("created_at", s(&now))
                    .item("updated_at", s(&now))
                    .item("expires_at", n(expires_at))
                    .condition_expression("attribute_not_exists(pk)")
                    .build()
                    .map_err(ApiError::internal)?;
                TransactWriteItem::builder().put(put).build()
            }
            Some(count) => {
                let update = Update::builder()
                    .table_name(&self.table)
                    .key("pk", s(pk(id)))
                    .key("sk", s("META"))
                    .update_expression(
                        "SET message_count = :next, updated_at = :now, model = :model, \
                         expires_at = :exp ADD total_tokens :tokens, total_cost :cost",
                    )
                    // The guard that serialises turns: only the writer that saw the current
                    // count may advance it.
                    .condition_expression("message_count = :expected AND #owner = :owner")
                    .expression_attribute_names("#owner", "owner")
                    .expression_attribute_values(":next", n(count + 2))
                    .expression_attribute_values(":expected", n(count))
                    .expression_attribute_values(":owner", s(owner))
                    .expression_attribute_values(":now", s(&now))
                    .expression_attribute_values(":model", s(&turn.model))
                    .expression_attribute_values(":exp", n(expires_at))
                    .expression_attribute_values(":tokens", n(tokens))
                    .expression_attribute_values(
                        ":cost",
                        AttributeValue::N(format_cost(turn.cost_usd)),
                    )
                    .build()
                    .map_err(ApiError::internal)?;
                TransactWriteItem::builder().update(update).build()
            }
        };
        let stamp = Stamp {
            now,
            expires_at,
            turn_id: turn_id.to_owned(),
        };
        let mut items = vec![
            self.message_put(
                id,
                owner,
                &NewMessage {
                    seq: base,
                    role: "user",
                    content: &turn.user_message,
                    tokens: turn.prompt_tokens,
                },
                &stamp,
            )?,
            self.message_put(
                id,
                owner,
                &NewMessage {
                    seq: base + 1,
                    role: "assistant",
                    content: &turn.assistant_message,
                    tokens: turn.completion_tokens,
                },
                &stamp,
            )?,
            meta,
        ];
        let bundled_at = items.len();
        items.extend(bundled.cloned().map(BundledWrite::into_item));
        let result = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            // DynamoDB's own idempotency for the SDK's retries of this very attempt.
            .client_request_token(Uuid::new_v4().to_string())
            .send()
            .await;
        let Err(err) = result else {
            return Ok(Attempt::Committed);
        };
        match (err.as_service_error(), bundled.is_some()) {
            (Some(TransactWriteItemsError::TransactionCanceledException(cancelled)), true) => {
                // Reasons come in item order. One that is missing counts as the bundled
                // write's fault: keeping it could fail every retry of the turn.
                let reason = cancelled
                    .cancellation_reasons()
                    .get(bundled_at)
                    .and_then(|r| r.code())
                    .unwrap_or("unknown");
                Ok(if reason == "None" {
                    Attempt::Conflict
                } else {
                    Attempt::BundledRefused(reason.to_owned())
                })
            }
            (Some(e), false) if e.is_transaction_canceled_exception() => Ok(Attempt::Conflict),
            // DynamoDB answered and refused the request (nothing was written): with a bundled
            // item in it, that item may be the cause.
            (Some(e), true) => Ok(Attempt::BundledRefused(
                e.meta().code().unwrap_or("unknown").to_owned(),
            )),
            _ => Err(unavailable(err)),
        }
    }

    async fn all_items(&self, id: Uuid) -> Result<Vec<HashMap<String, AttributeValue>>, ApiError> {
        let mut items = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(pk(id)))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(unavailable)?;
            items.extend(out.items().iter().cloned());
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        Ok(items)
    }
}

/// DynamoDB numbers are decimal strings; a fixed 10-digit fraction keeps sums of
/// sub-cent costs exact enough and avoids float formatting like `1e-7`.
fn format_cost(cost: f64) -> String {
    let cost = if cost.is_finite() && cost >= 0.0 {
        cost
    } else {
        0.0
    };
    format!("{cost:.10}")
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn get_s(item: &HashMap<String, AttributeValue>, name: &str) -> Option<String> {
    item.get(name)?.as_s().ok().cloned()
}

fn get_n(item: &HashMap<String, AttributeValue>, name: &str) -> Option<u64> {
    item.get(name)?.as_n().ok()?.parse().ok()
}

fn get_f(item: &HashMap<String, AttributeValue>, name: &str) -> Option<f64> {
    item.get(name)?.as_n().ok()?.parse().ok()
}

fn expired(item: &HashMap<String, AttributeValue>, now: u64) -> bool {
    get_n(item, "expires_at").is_some_and(|exp| exp <= now)
}

fn message_from(item: &HashMap<String, AttributeValue>) -> Option<StoredMessage> {
    let seq = get_s(item, "sk")?.strip_prefix("MSG#")?.parse().ok()?;
    Some(StoredMessage {
        seq,
        role: get_s(item, "role")?,
        content: get_s(item, "content")?,
        tokens: get_n(item, "tokens").unwrap_or(0),
        created_at: get_s(item, "created_at").unwrap_or_default(),
    })
}

fn meta_from(item: &HashMap<String, AttributeValue>) -> Option<ConversationMeta> {
    let id = get_s(item, "pk")?.strip_prefix("CONV#")?.parse().ok()?;
    Some(ConversationMeta {
        id,
        owner: get_s(item, "owner")?,
        title: get_s(item, "title").unwrap_or_default(),
        model: get_s(item, "model").unwrap_or_default(),
        message_count: get_n(item, "message_count").unwrap_or(0),
        total_tokens: get_n(item, "total_tokens").unwrap_or(0),
        total_cost: get_f(item, "total_cost").unwrap_or(0.0),
        created_at: get_s(item, "created_at").unwrap_or_default(),
        updated_at: get_s(item, "updated_at").unwrap_or_default(),
    })
}

/// Cursor of the `byOwner` listing: the last evaluated key, bound to its owner so a cursor
/// cannot be replayed by someone else to page through another principal's index.
#[derive(Serialize, Deserialize)]
struct ListCursor {
    pk: String,
    updated_at: String,
    owner: String,
}

fn invalid_cursor() -> ApiError {
    ApiError::BadRequest {
        code: "invalid_cursor",
        message: "cursor is not valid for this listing".to_owned(),
        param: Some("cursor".to_owned()),
    }
}

fn decode_cursor(cursor: &str, owner: &str) -> Result<ListCursor, ApiError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(cursor.as_bytes())
        .map_err(|_| invalid_cursor())?;
    let decoded: ListCursor = serde_json::from_slice(&bytes).map_err(|_| invalid_cursor())?;
    if decoded.owner != owner {
        return Err(invalid_cursor());
    }
    Ok(decoded)
}

fn encode_cursor(cursor: &ListCursor) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(cursor).unwrap_or_default())
}

#[async_trait]
impl ConversationStore for DynamoConversations {
    async fn recent(
        &self,
        owner: &str,
        id: Uuid,
        limit: usize,
    ) -> Result<Option<History>, ApiError> {
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :msg)")
            .expression_attribute_values(":pk", s(pk(id)))
            .expression_attribute_values(":msg", s("MSG#"))
            .scan_index_forward(false)
            .limit(i32::try_from(limit.max(1)).unwrap_or(i32::MAX))
            .send()
            .await
            .map_err(unavailable)?;
        let now = now_epoch();
        let items = out.items();
        let Some(newest) = items.first() else {
            return Ok(None);
        };
        if get_s(newest, "owner").as_deref() != Some(owner) || expired(newest, now) {
            return Ok(None);
        }
        let mut messages: Vec<StoredMessage> = items
            .iter()
            .filter(|item| !expired(item, now))
            .filter_map(message_from)
            .collect();
        messages.reverse();
        let message_count = messages.last().map_or(0, |m| m.seq + 1);
        if limit == 0 {
            messages.clear();
        }
        Ok(Some(History {
            messages,
            message_count,
        }))
    }

    async fn append_turn(
        &self,
        owner: &str,
        id: Uuid,
        expected_count: Option<u64>,
        turn: &ChatTurn,
    ) -> Result<u64, ApiError> {
        let (seq, _) = self
            .append_turn_carrying(owner, id, expected_count, turn, None)
            .await?;
        Ok(seq)
    }

    async fn append_turn_carrying(
        &self,
        owner: &str,
        id: Uuid,
        expected_count: Option<u64>,
        turn: &ChatTurn,
        mut bundled: Option<BundledWrite>,
    ) -> Result<(u64, bool), ApiError> {
        let mut expected = expected_count;
        let turn_id = Uuid::new_v4().to_string();
        for attempt in 0..MAX_APPEND_ATTEMPTS {
            let base = expected.unwrap_or(0);
            let mut outcome = self
                .write_turn(owner, id, expected, turn, &turn_id, bundled.as_ref())
                .await?;
            if let Attempt::BundledRefused(reason) = &outcome {
                tracing::warn!(
                    reason = %reason,
                    "the turn's transaction refused its bundled write; storing the turn without it"
                );
                bundled = None;
                outcome = self
                    .write_turn(owner, id, expected, turn, &turn_id, None)
                    .await?;
            }
            if let Attempt::Committed = outcome {
                return Ok((base, bundled.is_some()));
            }
            // The conflict may be with ourselves: an attempt that committed although its
            // answer was lost to a timeout, then retried by the SDK.
            if self.slot_holds_turn(id, base, &turn_id).await? {
                return Ok((base, bundled.is_some()));
            }
            // Lost a race (or the id is taken): re-read the head and try the next free slots.
            match self.head(id).await? {
                Some((stored_owner, count)) if stored_owner == owner => expected = Some(count),
                Some(_) => return Err(ApiError::NotFound("conversation")),
                // A brand-new conversation that conflicted on a message slot is another
                // principal racing with the same id, or a half-deleted conversation.
                None if expected.is_none() && attempt > 0 => {
                    return Err(ApiError::NotFound("conversation"));
                }
                None if expected.is_some() => return Err(ApiError::NotFound("conversation")),
                None => {}
            }
            let backoff = rand::random_range(0..=(5u64 << attempt.min(4)));
            tokio::time::sleep(std::time::Duration::from_millis(backoff)).await;
        }
        Err(ApiError::Unavailable {
            dependency: "DynamoDB",
            detail: format!("conversation {id}: append kept conflicting"),
        })
    }

    async fn get(
        &self,
        owner: &str,
        id: Uuid,
    ) -> Result<Option<(ConversationMeta, Vec<StoredMessage>)>, ApiError> {
        let items = self.all_items(id).await?;
        let now = now_epoch();
        let Some(meta) = items
            .iter()
            .find(|i| get_s(i, "sk").as_deref() == Some("META"))
            .filter(|i| !expired(i, now))
            .and_then(meta_from)
        else {
            return Ok(None);
        };
        if meta.owner != owner {
            return Ok(None);
        }
        let messages = items
            .iter()
            .filter(|i| !expired(i, now))
            .filter_map(message_from)
            .collect();
        Ok(Some((meta, messages)))
    }

    async fn list(
        &self,
        owner: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<ConversationPage, ApiError> {
        let start = match cursor {
            Some(c) => {
                let c = decode_cursor(c, owner)?;
                Some(HashMap::from([
                    ("pk".to_owned(), s(c.pk)),
                    ("sk".to_owned(), s("META")),
                    ("owner".to_owned(), s(c.owner)),
                    ("updated_at".to_owned(), s(c.updated_at)),
                ]))
            }
            None => None,
        };
        let out = self
            .client
            .query()
            .table_name(&self.table)
            .index_name("byOwner")
            .key_condition_expression("#owner = :owner")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", s(owner))
            .scan_index_forward(false)
            .limit(i32::try_from(limit.clamp(1, 100)).unwrap_or(100))
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(unavailable)?;
        let now = now_epoch();
        let conversations = out
            .items()
            .iter()
            .filter(|i| !expired(i, now))
            .filter_map(meta_from)
            .filter(|m| m.owner == owner)
            .collect();
        let next_cursor = out.last_evaluated_key().and_then(|key| {
            Some(encode_cursor(&ListCursor {
                pk: get_s(key, "pk")?,
                updated_at: get_s(key, "updated_at")?,
                owner: owner.to_owned(),
            }))
        });
        Ok(ConversationPage {
            conversations,
            next_cursor,
        })
    }

    async fn delete(&self, owner: &str, id: Uuid) -> Result<bool, ApiError> {
        // META goes first, guarded by the owner, so the conversation disappears at once and a
        // stranger can never delete it; the messages follow in batches.
        let deleted = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(pk(id)))
            .key("sk", s("META"))
            .condition_expression("#owner = :owner")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", s(owner))
            .send()
            .await;
        match deleted {
            Ok(_) => {}
            Err(err) => {
                return match err.as_service_error() {
                    Some(e) if e.is_conditional_check_failed_exception() => Ok(false),
                    _ => Err(unavailable(err)),
                };
            }
        }
        let keys: Vec<WriteRequest> = self
            .all_items(id)
            .await?
            .into_iter()
            .filter_map(|item| {
                let key = HashMap::from([
                    ("pk".to_owned(), item.get("pk")?.clone()),
                    ("sk".to_owned(), item.get("sk")?.clone()),
                ]);
                let request = DeleteRequest::builder().set_key(Some(key)).build().ok()?;
                Some(WriteRequest::builder().delete_request(request).build())
            })
            .collect();
        for chunk in keys.chunks(25) {
            let mut pending = HashMap::from([(self.table.clone(), chunk.to_vec())]);
            for _ in 0..8 {
                let out = self
                    .client
                    .batch_write_item()
                    .set_request_items(Some(pending))
                    .send()
                    .await
                    .map_err(unavailable)?;
                match out.unprocessed_items() {
                    Some(rest) if rest.values().any(|v| !v.is_empty()) => pending = rest.clone(),
                    _ => break,
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        Ok(true)
    }
}

/// In-memory fake with the same contract.
#[derive(Default)]
pub struct InMemoryConversations {
    inner: Mutex<HashMap<Uuid, (ConversationMeta, Vec<StoredMessage>)>>,
}

impl InMemoryConversations {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut HashMap<Uuid, (ConversationMeta, Vec<StoredMessage>)>) -> T,
    ) -> Result<T, ApiError> {
        let mut guard = self
            .inner
            .lock()
            .map_err(|_| ApiError::internal("conversation fake poisoned"))?;
        Ok(f(&mut guard))
    }
}

#[async_trait]
impl ConversationStore for InMemoryConversations {
    async fn recent(
        &self,
        owner: &str,
        id: Uuid,
        limit: usize,
    ) -> Result<Option<History>, ApiError> {
        self.with(|all| {
            let (meta, messages) = all.get(&id).filter(|(m, _)| m.owner == owner)?;
            let skip = messages.len().saturating_sub(limit);
            Some(History {
                messages: messages[skip..].to_vec(),
                message_count: meta.message_count,
            })
        })
    }

    async fn append_turn(
        &self,
        owner: &str,
        id: Uuid,
        expected_count: Option<u64>,
        turn: &ChatTurn,
    ) -> Result<u64, ApiError> {
        self.with(|all| {
            let now = now_rfc3339();
            let entry = match (all.get_mut(&id), expected_count) {
                (Some((meta, _)), _) if meta.owner != owner => {
                    return Err(ApiError::NotFound("conversation"));
                }
                (None, Some(_)) => return Err(ApiError::NotFound("conversation")),
                (Some(entry), _) => entry,
                (None, None) => all.entry(id).or_insert_with(|| {
                    (
                        ConversationMeta {
                            id,
                            owner: owner.to_owned(),
                            title: title_from(&turn.user_message),
                            model: turn.model.clone(),
                            message_count: 0,
                            total_tokens: 0,
                            total_cost: 0.0,
                            created_at: now.clone(),
                            updated_at: now.clone(),
                        },
                        Vec::new(),
                    )
                }),
            };
            let (meta, messages) = entry;
            let seq = meta.message_count;
            for (offset, role, content, tokens) in [
                (0, "user", &turn.user_message, turn.prompt_tokens),
                (
                    1,
                    "assistant",
                    &turn.assistant_message,
                    turn.completion_tokens,
                ),
            ] {
                messages.push(StoredMessage {
                    seq: seq + offset,
                    role: role.to_owned(),
                    content: content.clone(),
                    tokens,
                    created_at: now.clone(),
                });
            }
            meta.message_count += 2;
            meta.total_tokens += turn.prompt_tokens + turn.completion_tokens;
            meta.total_cost += turn.cost_usd;
            meta.model = turn.model.clone();
            meta.updated_at = now;
            Ok(seq)
        })?
    }

    async fn get(
        &self,
        owner: &str,
        id: Uuid,
    ) -> Result<Option<(ConversationMeta, Vec<StoredMessage>)>, ApiError> {
        self.with(|all| all.get(&id).filter(|(m, _)| m.owner == owner).cloned())
    }

    async fn list(
        &self,
        owner: &str,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<ConversationPage, ApiError> {
        let start = cursor.map(|c| decode_cursor(c, owner)).transpose()?;
        self.with(|all| {
            let mut mine: Vec<ConversationMeta> = all
                .values()
                .filter(|(m, _)| m.owner == owner)
                .map(|(m, _)| m.clone())
                .collect();
            mine.sort_by(|a, b| {
                (&b.updated_at, b.id.to_string()).cmp(&(&a.updated_at, a.id.to_string()))
            });
            if let Some(start) = &start {
                mine.retain(|m| (&m.updated_at, pk(m.id)) < (&start.updated_at, start.pk.clone()));
            }
            let limit = limit.clamp(1, 100);
            let next_cursor = (mine.len() > limit).then(|| {
                let last = &mine[limit - 1];
                encode_cursor(&ListCursor {
                    pk: pk(last.id),
                    updated_at: last.updated_at.clone(),
                    owner: owner.to_owned(),
                })
            });
            mine.truncate(limit);
            ConversationPage {
                conversations: mine,
                next_cursor,
            }
        })
    }

    async fn delete(&self, owner: &str, id: Uuid) -> Result<bool, ApiError> {
        self.with(|all| {
            if all.get(&id).is_some_and(|(m, _)| m.owner == owner) {
                all.remove(&id);
                true
            } else {
                false
            }
        })
    }
}
