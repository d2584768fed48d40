//! Bounded fan-out: a batch's items, their validation, and running them with at most
//! `max_concurrency` upstream calls in flight, each under its own timeout.
//!
//! The same [`run_item`] serves `POST /batch`, the chunks of `POST /batch/long-text` and the
//! scheduled drain of asynchronous jobs, so an item fails, times out and is priced the same way
//! whichever path ran it.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use shared::auth::Principal;
use shared::chat::{TokenUsage, check_max_tokens, check_model, check_temperature};
use shared::config::TierQuotas;
use shared::error::{ApiError, FieldError};
use shared::llm::{ChatMessage, CompletionRequest, LlmClient, ModelRegistry, Role};
use shared::ratelimit::{Admitted, LimitStatus, RateLimiter};
use shared::services::Services;
use utoipa::ToSchema;

/// Items of one synchronous batch.
pub const MAX_BATCH_ITEMS: usize = 100;
pub const MAX_CONCURRENCY: i64 = 32;
pub const DEFAULT_CONCURRENCY: usize = 8;
pub const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// Below this an attempt cannot start once the LLM client's own safety margins are taken off.
pub const MIN_TIMEOUT_MS: i64 = 500;
pub const MAX_TIMEOUT_MS: i64 = 120_000;
/// Characters of one item's text (the prompt, or all its messages together).
pub const MAX_ITEM_CHARS: usize = 20_000;
pub const MAX_ITEM_MESSAGES: usize = 50;
const MAX_ID_CHARS: usize = 128;
const MAX_MODELS: usize = 16;
/// A 422 for a huge batch lists this many problems, not one per item.
const MAX_REPORTED_ERRORS: usize = 100;

/// One message of an item given as a conversation.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ItemMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    pub content: String,
}

/// One prompt of a batch: `prompt` (one user message) or `messages`, not both.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    /// Echoed in the item's result; defaults to the item's position (`"0"`, `"1"`, ...).
    pub id: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<ItemMessage>>,
    /// A model id or alias; wins over `models`.
    pub model: Option<String>,
}

/// `POST /batch` and `POST /batch/jobs` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// 1..=100 items (`/batch`) or 1..=10000 (`/batch/jobs`).
    pub items: Vec<BatchItem>,
    /// Upstream calls in flight at once, 1..=32 (default 8).
    pub max_concurrency: Option<i64>,
    /// Per-item limit in milliseconds, retries and fallback included, 500..=120000
    /// (default 10000).
    pub timeout_ms: Option<i64>,
    /// Models assigned round-robin to the items that name none.
    pub models: Option<Vec<String>>,
    /// 0..=2, default 0.7.
    pub temperature: Option<f64>,
    /// Completion limit of each item, 1..=4000 (default 1000).
    pub max_tokens: Option<i64>,
}

/// An item that passed validation: what is sent upstream (and stored for a job).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidItem {
    pub id: String,
    /// Registry id (aliases resolved).
    pub model: String,
    pub messages: Vec<ChatMessage>,
}

/// How the items of one batch run (stored with a job as its spec).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RunOptions {
    pub max_concurrency: usize,
    pub timeout_ms: u64,
    pub temperature: f32,
    pub max_tokens: u32,
}

impl RunOptions {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// A validated batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidBatch {
    pub items: Vec<ValidItem>,
    pub options: RunOptions,
}

/// Collects field errors, keeping the first [`MAX_REPORTED_ERRORS`].
#[derive(Default)]
pub struct Problems(Vec<FieldError>);

impl Problems {
    pub fn push(&mut self, error: FieldError) {
        if self.0.len() < MAX_REPORTED_ERRORS {
            self.0.push(error);
        }
    }

    pub fn body(&mut self, field: &str, kind: &str, msg: impl Into<String>) {
        self.push(FieldError::body(field, kind, msg));
    }

    pub fn extend(&mut self, errors: Vec<FieldError>) {
        for error in errors {
            self.push(error);
        }
    }

    pub fn into_result<T>(self, value: T) -> Result<T, ApiError> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(ApiError::Validation(self.0))
        }
    }
}

fn forbidden_control(text: &str) -> bool {
    text.chars()
        .any(|c| c.is_control() && !matches!(c, '\n' | '\t' | '\r'))
}

/// Checks one text field: not blank, no control characters but line breaks and tabs.
pub fn check_item_text(problems: &mut Problems, field: &str, text: &str) {
    if text.trim().is_empty() {
        problems.body(
            field,
            "string_too_short",
            format!("{field} must not be empty"),
        );
    }
    if forbidden_control(text) {
        problems.body(
            field,
            "control_character",
            format!("{field} must not contain control characters other than line breaks and tabs"),
        );
    }
}

/// Checks an integer option against its range, returning the effective value.
pub fn check_range(
    problems: &mut Problems,
    field: &str,
    value: Option<i64>,
    range: std::ops::RangeInclusive<i64>,
    default: u64,
) -> u64 {
    match value {
        None => default,
        Some(v) if range.contains(&v) => v.unsigned_abs(),
        Some(_) => {
            problems.body(
                field,
                "range",
                format!(
                    "{field} must be between {} and {}",
                    range.start(),
                    range.end()
                ),
            );
            default
        }
    }
}

/// Resolves the optional round-robin `models` list.
pub fn check_models(
    problems: &mut Problems,
    registry: &ModelRegistry,
    models: Option<&[String]>,
) -> Vec<String> {
    let Some(models) = models else {
        return Vec::new();
    };
    if models.is_empty() || models.len() > MAX_MODELS {
        problems.body(
            "models",
            "length",
            format!("models must list 1 to {MAX_MODELS} models"),
        );
        return Vec::new();
    }
    models
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut errors = Vec::new();
            let id = check_model(&mut errors, registry, Some(name));
            for mut error in errors {
                error.loc = vec!["body".into(), "models".into(), i.to_string()];
                problems.push(error);
            }
            id
        })
        .collect()
}

/// Shared options of `/batch`, `/batch/jobs` and `/batch/long-text`.
pub fn check_options(
    problems: &mut Problems,
    max_concurrency: Option<i64>,
    timeout_ms: Option<i64>,
    temperature: Option<f64>,
    max_tokens: Option<i64>,
) -> RunOptions {
    let max_concurrency = check_range(
        problems,
        "max_concurrency",
        max_concurrency,
        1..=MAX_CONCURRENCY,
        DEFAULT_CONCURRENCY as u64,
    );
    let timeout_ms = check_range(
        problems,
        "timeout_ms",
        timeout_ms,
        MIN_TIMEOUT_MS..=MAX_TIMEOUT_MS,
        DEFAULT_TIMEOUT_MS,
    );
    let mut errors = Vec::new();
    let temperature = check_temperature(&mut errors, temperature);
    let max_tokens = check_max_tokens(&mut errors, "max_tokens", max_tokens);
    problems.extend(errors);
    RunOptions {
        max_concurrency: usize::try_from(max_concurrency).unwrap_or(DEFAULT_CONCURRENCY),
        timeout_ms,
        temperature,
        max_tokens,
    }
}

fn parse_role(role: &str) -> Option<Role> {
    match role {
        "system" => Some(Role::System),
        "user" => Some(Role::User),
        "assistant" => Some(Role::Assistant),
        _ => None,
    }
}

fn check_item(
    problems: &mut Problems,
    registry: &ModelRegistry,
    index: usize,
    item: BatchItem,
    round_robin: &[String],
) -> ValidItem {
    let at = |field: &str| format!("items.{index}.{field}");
    let id = match item.id {
        Some(id) if id.chars().count() > MAX_ID_CHARS || forbidden_control(&id) => {
            problems.body(
                &at("id"),
                "invalid_id",
                format!("id must be at most {MAX_ID_CHARS} printable characters"),
            );
            id
        }
        Some(id) => id,
        None => index.to_string(),
    };
    let messages = match (item.prompt, item.messages) {
        (Some(prompt), None) => {
            check_item_text(problems, &at("prompt"), &prompt);
            vec![ChatMessage::user(prompt)]
        }
        (None, Some(messages)) => {
            if messages.is_empty() || messages.len() > MAX_ITEM_MESSAGES {
                problems.body(
                    &at("messages"),
                    "length",
                    format!("messages must hold 1 to {MAX_ITEM_MESSAGES} messages"),
                );
            }
            messages
                .into_iter()
                .enumerate()
                .map(|(m, message)| {
                    check_item_text(
                        problems,
                        &at(&format!("messages.{m}.content")),
                        &message.content,
                    );
                    let role = parse_role(&message.role).unwrap_or_else(|| {
                        problems.body(
                            &at(&format!("messages.{m}.role")),
                            "enum",
                            "role must be system, user or assistant",
                        );
                        Role::User
                    });
                    ChatMessage {
                        role,
                        content: message.content,
                    }
                })
                .collect()
        }
        (Some(_), Some(_)) | (None, None) => {
            problems.body(
                &format!("items.{index}"),
                "prompt_or_messages",
                "each item needs exactly one of prompt and messages",
            );
            Vec::new()
        }
    };
    let chars: usize = messages.iter().map(|m| m.content.chars().count()).sum();
    if chars > MAX_ITEM_CHARS {
        problems.body(
            &format!("items.{index}"),
            "string_too_long",
            format!("an item's text must be at most {MAX_ITEM_CHARS} characters (got {chars})"),
        );
    }
    let model = match item.model {
        Some(name) => {
            let mut errors = Vec::new();
            let id = check_model(&mut errors, registry, Some(&name));
            for mut error in errors {
                error.loc = vec![
                    "body".into(),
                    "items".into(),
                    index.to_string(),
                    "model".into(),
                ];
                problems.push(error);
            }
            id
        }
        None if !round_robin.is_empty() => round_robin[index % round_robin.len()].clone(),
        None => registry.default_model().id.clone(),
    };
    ValidItem {
        id,
        model,
        messages,
    }
}

impl BatchRequest {
    /// Every rule, all failures reported at once (up to a bound). `max_items` is 100 for
    /// `/batch` and 10000 for `/batch/jobs`.
    pub fn validate(
        self,
        registry: &ModelRegistry,
        max_items: usize,
    ) -> Result<ValidBatch, ApiError> {
        let mut problems = Problems::default();
        if self.items.is_empty() {
            problems.body("items", "too_short", "items must hold at least one item");
        } else if self.items.len() > max_items {
            problems.body(
                "items",
                "too_long",
                format!(
                    "items must hold at most {max_items} items (got {})",
                    self.items.len()
                ),
            );
        }
        let options = check_options(
            &mut problems,
            self.max_concurrency,
            self.timeout_ms,
            self.temperature,
            self.max_tokens,
        );
        let round_robin = check_models(&mut problems, registry, self.models.as_deref());
        let items = if self.items.len() > max_items {
            Vec::new()
        } else {
            self.items
                .into_iter()
                .enumerate()
                .map(|(i, item)| check_item(&mut problems, registry, i, item, &round_robin))
                .collect()
        };
        problems.into_result(ValidBatch { items, options })
    }
}

/// `ok`, `error`; job results also show items not finished yet as `pending` or `running`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ItemStatus {
    Ok,
    Error,
    Pending,
    Running,
}

/// Why an item failed: the status and code the same failure gets as a whole response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ItemError {
    /// The HTTP status this error maps to (502 upstream failure, 504 timeout, ...).
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl From<&ApiError> for ItemError {
    fn from(err: &ApiError) -> Self {
        if let ApiError::Internal { detail } = err {
            tracing::error!(%detail, "batch item failed internally");
        }
        Self {
            status: err.status().as_u16(),
            code: err.code().to_owned(),
            message: err.to_string(),
        }
    }
}

/// The outcome of one item.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ItemResult {
    /// Position in the request.
    pub index: usize,
    pub id: String,
    pub status: ItemStatus,
    pub output: Option<String>,
    /// The model that answered (a fallback when the requested one kept failing), or the one
    /// that was asked when the item failed.
    pub model: String,
    pub usage: Option<TokenUsage>,
    /// USD spent upstream for this item.
    pub cost_estimate: f64,
    pub latency_ms: u64,
    pub error: Option<ItemError>,
}

impl ItemResult {
    pub fn failed(index: usize, item: &ValidItem, error: &ApiError, latency_ms: u64) -> Self {
        Self {
            index,
            id: item.id.clone(),
            status: ItemStatus::Error,
            output: None,
            model: item.model.clone(),
            usage: None,
            cost_estimate: 0.0,
            latency_ms,
            error: Some(error.into()),
        }
    }

    pub fn is_ok(&self) -> bool {
        self.status == ItemStatus::Ok
    }

    pub fn total_tokens(&self) -> u64 {
        self.usage.map_or(0, |u| u.total_tokens)
    }
}

/// The request sent upstream for an item.
pub fn completion_request(item: &ValidItem, options: &RunOptions) -> CompletionRequest {
    let mut request = CompletionRequest::new(item.model.clone(), item.messages.clone());
    request.temperature = options.temperature;
    request.max_tokens = options.max_tokens;
    request
}

/// Tokens held for an item before its call: the prompt estimate plus its completion limit.
pub fn token_estimate(item: &ValidItem, options: &RunOptions) -> u64 {
    completion_request(item, options).estimated_prompt_tokens() + u64::from(options.max_tokens)
}

/// Runs one item under its own timeout: `timeout` from now, cut short by `deadline` (the
/// Lambda invocation's) when that comes first. Retries and the fallback happen inside.
pub async fn run_item(
    llm: &dyn LlmClient,
    index: usize,
    item: &ValidItem,
    options: &RunOptions,
    deadline: Option<Instant>,
) -> ItemResult {
    let started = Instant::now();
    let own = started + options.timeout();
    let until = deadline.map_or(own, |d| d.min(own));
    let request = completion_request(item, options);
    // The client stops retrying when `until` nears; the outer timeout is the hard bound.
    let outcome = tokio::time::timeout_at(until.into(), llm.complete(&request, Some(until))).await;
    let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match outcome {
        Ok(Ok(completion)) => ItemResult {
            index,
            id: item.id.clone(),
            status: ItemStatus::Ok,
            output: Some(completion.content),
            model: completion.model,
            usage: Some(completion.usage.into()),
            cost_estimate: completion.cost_usd,
            latency_ms,
            error: None,
        },
        Ok(Err(err)) => ItemResult::failed(index, item, &err, latency_ms),
        Err(_elapsed) => ItemResult::failed(index, item, &ApiError::UpstreamTimeout, latency_ms),
    }
}

/// Runs every item with at most `options.max_concurrency` in flight; results in input order.
pub async fn run_all(
    llm: &dyn LlmClient,
    items: &[ValidItem],
    options: &RunOptions,
    deadline: Option<Instant>,
) -> Vec<ItemResult> {
    // Unordered, so a slow item never holds a slot after it finished; order is restored below.
    let mut results: Vec<ItemResult> = futures::stream::iter(0..items.len())
        .map(|index| run_item(llm, index, &items[index], options, deadline))
        .buffer_unordered(options.max_concurrency.max(1))
        .collect()
        .await;
    results.sort_by_key(|r| r.index);
    results
}

/// Admits a whole batch at once, before any upstream call: every item counts as a request and
/// holds its token estimate. A batch larger than a whole quota is refused with a message
/// saying so, since waiting would never help.
pub async fn admit_all(
    limiter: &RateLimiter,
    quotas: &TierQuotas,
    principal: &Principal,
    requests: u64,
    tokens: u64,
) -> Result<Admitted, ApiError> {
    let quota = principal.quota(quotas);
    if requests > quota.requests_per_hour {
        return Err(ApiError::RateLimited {
            message: format!(
                "this batch makes {requests} requests, more than your {} per hour; split it or submit it as a job",
                quota.requests_per_hour
            ),
            limit: quota.requests_per_hour,
            retry_after_secs: 3_600,
        });
    }
    if tokens > quota.tokens_per_minute {
        return Err(ApiError::RateLimited {
            message: format!(
                "this batch may use up to {tokens} tokens, more than your {} per minute; lower max_tokens or split it",
                quota.tokens_per_minute
            ),
            limit: quota.tokens_per_minute,
            retry_after_secs: 60,
        });
    }
    limiter.admit(principal, requests, tokens).await
}

/// Totals of a set of results.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
pub struct Totals {
    pub successful: usize,
    pub failed: usize,
    pub usage: TokenUsage,
    /// USD, all items together.
    pub cost: f64,
}

pub fn totals<'a>(results: impl IntoIterator<Item = &'a ItemResult>) -> Totals {
    let mut totals = Totals {
        successful: 0,
        failed: 0,
        usage: TokenUsage {
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
        },
        cost: 0.0,
    };
    for result in results {
        if result.is_ok() {
            totals.successful += 1;
        } else {
            totals.failed += 1;
        }
        if let Some(usage) = result.usage {
            totals.usage.prompt_tokens += usage.prompt_tokens;
            totals.usage.completion_tokens += usage.completion_tokens;
            totals.usage.total_tokens += usage.total_tokens;
        }
        totals.cost += result.cost_estimate;
    }
    totals
}

/// Kept free before a synchronous request's Lambda deadline to settle the rate limit and
/// send the response.
const RESPONSE_MARGIN: Duration = Duration::from_secs(1);

/// The deadline the items of a synchronous request must finish by: the invocation's, less
/// [`RESPONSE_MARGIN`].
pub fn items_deadline(invocation: Option<Instant>) -> Option<Instant> {
    invocation.map(|d| d.checked_sub(RESPONSE_MARGIN).unwrap_or_else(Instant::now))
}

/// Milliseconds since `started`.
pub fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// `POST /batch` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BatchResponse {
    /// One per item, in input order.
    pub results: Vec<ItemResult>,
    pub total: usize,
    pub successful: usize,
    pub failed: usize,
    /// Tokens of every item together.
    pub usage: TokenUsage,
    /// USD, every item together.
    pub total_cost: f64,
    pub processing_time_ms: u64,
}

/// A whole synchronous batch: one admission for every item, the fan-out, one settlement.
pub async fn run_batch(
    services: &Services,
    principal: &Principal,
    batch: ValidBatch,
    deadline: Option<Instant>,
) -> Result<(BatchResponse, LimitStatus), ApiError> {
    let started = Instant::now();
    let options = batch.options;
    let tokens = batch
        .items
        .iter()
        .map(|item| token_estimate(item, &options))
        .sum();
    let requests = u64::try_from(batch.items.len()).unwrap_or(u64::MAX);
    let chat = &services.chat;
    let admitted = admit_all(
        &chat.limiter,
        &services.config.quotas,
        principal,
        requests,
        tokens,
    )
    .await?;
    let results = run_all(chat.llm.as_ref(), &batch.items, &options, deadline).await;
    let sums = totals(&results);
    if let Err(err) = chat
        .limiter
        .settle(admitted.reservation, sums.usage.total_tokens)
        .await
    {
        tracing::warn!(error = %err, "settling a token reservation failed");
    }
    let response = BatchResponse {
        total: results.len(),
        successful: sums.successful,
        failed: sums.failed,
        usage: sums.usage,
        total_cost: sums.cost,
        processing_time_ms: elapsed_ms(started),
        results,
    };
    Ok((response, admitted.status))
}
