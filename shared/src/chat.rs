//! The chat turn: one implementation used by the buffered `chat` function and the streaming
//! `stream` function.
//!
//! A turn is: load the last messages of the conversation (one query) → look the prompt up in the
//! response cache (one read) → admit the request, reserving its tokens on a miss (one
//! conditional update) → call the model → store the turn with the cache fill in the same
//! transaction, and settle the token reservation (one update), concurrently. DynamoDB round
//! trips per turn of a continued conversation: 5 on a cache miss, 4 with the cache bypassed, 4
//! on a hit; one fewer each for a new conversation (no history to read). Why the
//! settlement is not in the transaction too: [`ChatService::finish_turn`]. Handlers only parse,
//! call these functions and map the result.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Principal;
use crate::cache::{CacheKey, ResponseCache};
use crate::conversations::{ChatTurn, ConversationStore};
use crate::error::{ApiError, FieldError};
use crate::llm::{ChatMessage, Completion, CompletionRequest, LlmClient, ModelRegistry, Usage};
use crate::ratelimit::{LimitStatus, RateLimiter, TokenReservation};

/// Stored messages sent upstream with each new message.
pub const HISTORY_MESSAGES: usize = 20;
const MAX_MESSAGE_CHARS: usize = 5_000;
const MAX_SYSTEM_PROMPT_CHARS: usize = 1_000;
const DEFAULT_TEMPERATURE: f32 = 0.7;
const DEFAULT_MAX_TOKENS: u32 = 1_000;
const MAX_TOKENS_LIMIT: i64 = 4_000;

/// `POST /chat` and `POST /chat/stream` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    /// 1..=5000 characters after trimming; no control characters but newline and tab.
    pub message: String,
    /// Continue this conversation (must be yours); omit to start a new one.
    #[schema(format = "uuid")]
    pub conversation_id: Option<String>,
    /// At most 1000 characters.
    pub system_prompt: Option<String>,
    /// A model id or alias from `GET /models`; the registry default when omitted.
    pub model: Option<String>,
    /// 0..=2, default 0.7.
    pub temperature: Option<f64>,
    /// 1..=4000, default 1000.
    pub max_tokens: Option<i64>,
}

/// A [`ChatRequest`] that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidChat {
    pub message: String,
    pub conversation_id: Option<Uuid>,
    pub system_prompt: Option<String>,
    /// Registry id (aliases resolved).
    pub model: String,
    pub temperature: f32,
    pub max_tokens: u32,
}

/// Rejects control characters other than newline and tab. The text is never rewritten.
fn has_forbidden_control(text: &str) -> bool {
    text.chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
}

/// Validates the fields shared by every route that takes text from a client.
pub fn check_text(errors: &mut Vec<FieldError>, field: &str, text: &str, min: usize, max: usize) {
    let len = text.trim().chars().count();
    if len < min {
        errors.push(FieldError::body(
            field,
            "string_too_short",
            format!("{field} must not be empty"),
        ));
    } else if len > max {
        errors.push(FieldError::body(
            field,
            "string_too_long",
            format!("{field} must be at most {max} characters (got {len})"),
        ));
    }
    if has_forbidden_control(text) {
        errors.push(FieldError::body(
            field,
            "control_character",
            format!("{field} must not contain control characters other than newline and tab"),
        ));
    }
}

/// Checks `temperature`, returning the effective value.
pub fn check_temperature(errors: &mut Vec<FieldError>, value: Option<f64>) -> f32 {
    match value {
        None => DEFAULT_TEMPERATURE,
        Some(t) if t.is_finite() && (0.0..=2.0).contains(&t) => t as f32,
        Some(_) => {
            errors.push(FieldError::body(
                "temperature",
                "range",
                "temperature must be between 0 and 2",
            ));
            DEFAULT_TEMPERATURE
        }
    }
}

/// Checks `max_tokens`, returning the effective value.
pub fn check_max_tokens(errors: &mut Vec<FieldError>, field: &str, value: Option<i64>) -> u32 {
    match value {
        None => DEFAULT_MAX_TOKENS,
        Some(n) if (1..=MAX_TOKENS_LIMIT).contains(&n) => {
            u32::try_from(n).unwrap_or(DEFAULT_MAX_TOKENS)
        }
        Some(_) => {
            errors.push(FieldError::body(
                field,
                "range",
                format!("{field} must be between 1 and {MAX_TOKENS_LIMIT}"),
            ));
            DEFAULT_MAX_TOKENS
        }
    }
}

/// Resolves a requested model name (or the default) to its registry id.
pub fn check_model(
    errors: &mut Vec<FieldError>,
    registry: &ModelRegistry,
    model: Option<&str>,
) -> String {
    match model {
        None => registry.default_model().id.clone(),
        Some(name) => match registry.resolve(name) {
            Some(info) => info.id.clone(),
            None => {
                let shown: String = name.chars().take(100).collect();
                errors.push(FieldError::body(
                    "model",
                    "unknown_model",
                    format!("unknown model '{shown}'; see GET /models"),
                ));
                String::new()
            }
        },
    }
}

impl ChatRequest {
    /// Every rule of the contract, all failures reported at once.
    pub fn validate(self, registry: &ModelRegistry) -> Result<ValidChat, ApiError> {
        let mut errors = Vec::new();
        check_text(&mut errors, "message", &self.message, 1, MAX_MESSAGE_CHARS);
        if let Some(system) = &self.system_prompt {
            check_text(
                &mut errors,
                "system_prompt",
                system,
                0,
                MAX_SYSTEM_PROMPT_CHARS,
            );
        }
        let conversation_id = match self.conversation_id.as_deref() {
            None => None,
            Some(raw) => match Uuid::parse_str(raw) {
                Ok(id) => Some(id),
                Err(_) => {
                    errors.push(FieldError::body(
                        "conversation_id",
                        "uuid",
                        "conversation_id must be a UUID",
                    ));
                    None
                }
            },
        };
        let temperature = check_temperature(&mut errors, self.temperature);
        let max_tokens = check_max_tokens(&mut errors, "max_tokens", self.max_tokens);
        let model = check_model(&mut errors, registry, self.model.as_deref());
        if !errors.is_empty() {
            return Err(ApiError::Validation(errors));
        }
        Ok(ValidChat {
            message: self.message,
            conversation_id,
            system_prompt: self.system_prompt.filter(|s| !s.trim().is_empty()),
            model,
            temperature,
            max_tokens,
        })
    }
}

/// Token counts of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl From<Usage> for TokenUsage {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
        }
    }
}

/// `POST /chat` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChatResponse {
    pub message: String,
    pub conversation_id: Uuid,
    pub model: String,
    pub usage: TokenUsage,
    /// USD spent upstream for this answer (0 when served from the cache).
    pub cost_estimate: f64,
    pub cached: bool,
    /// RFC 3339.
    pub created_at: String,
}

/// What the cache stores for a completion.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedCompletion {
    pub content: String,
    pub model: String,
    pub usage: TokenUsage,
    pub finish_reason: String,
}

/// The services a chat turn needs, built once per cold start.
#[derive(Clone)]
pub struct ChatService {
    pub limiter: RateLimiter,
    pub conversations: Arc<dyn ConversationStore>,
    pub cache: Arc<dyn ResponseCache>,
    pub llm: Arc<dyn LlmClient>,
    pub cache_ttl: Duration,
}

/// The outcome of admission and cache lookup for one completion.
pub enum Gate {
    /// Served from the cache: nothing was reserved or will be sent upstream.
    Hit {
        cached: CachedCompletion,
        limit: LimitStatus,
    },
    /// Must be sent upstream; the reservation is held until settled or released.
    Miss(Admission),
}

/// An admitted upstream call: its reservation and where its answer will be cached.
pub struct Admission {
    pub limit: LimitStatus,
    reservation: TokenReservation,
    cache_key: Option<CacheKey>,
}

/// A conversation turn waiting for the model's answer.
pub struct PendingTurn {
    pub conversation_id: Uuid,
    pub request: CompletionRequest,
    expected_count: Option<u64>,
    user_message: String,
    pub admission: Admission,
}

/// A turn that starts a conversation or continues one.
pub enum TurnStart {
    Cached(ChatResponse, LimitStatus),
    Fresh(PendingTurn),
}

impl ChatService {
    /// Looks a completion up in the cache, then admits it: a hit counts the request only (it
    /// spends no tokens, so it reserves none and has nothing to release), a miss also reserves
    /// its token estimate. Cache first costs nothing on a miss (the two calls were sequential
    /// either way) and saves the release update on a hit.
    pub async fn gate(
        &self,
        principal: &Principal,
        request: &CompletionRequest,
        use_cache: bool,
    ) -> Result<Gate, ApiError> {
        let cache_key = use_cache.then(|| CacheKey::for_request("chat", &cache_parts(request)));
        let cached = match &cache_key {
            Some(key) => self.lookup(key).await,
            None => None,
        };
        if let Some(cached) = cached {
            let admitted = self.limiter.admit(principal, 1, 0).await?;
            cache_metric(true);
            return Ok(Gate::Hit {
                cached,
                limit: admitted.status,
            });
        }
        if cache_key.is_some() {
            cache_metric(false);
        }
        let estimate = request.estimated_prompt_tokens() + u64::from(request.max_tokens);
        let admitted = self.limiter.admit(principal, 1, estimate).await?;
        Ok(Gate::Miss(Admission {
            limit: admitted.status,
            reservation: admitted.reservation,
            cache_key,
        }))
    }

    /// A usable cached answer, if any. The cache is an optimisation: a failing read, or an
    /// entry that no longer parses, is a miss.
    async fn lookup(&self, key: &CacheKey) -> Option<CachedCompletion> {
        match self.cache.get(key).await {
            Ok(hit) => hit.and_then(|h| serde_json::from_str(&h.payload).ok()),
            Err(err) => {
                tracing::warn!(error = %err, "cache read failed");
                None
            }
        }
    }

    /// Settles an admitted call with the model's answer and caches it.
    pub async fn settle(
        &self,
        admission: Admission,
        completion: &Completion,
    ) -> Result<(), ApiError> {
        let settle = self
            .limiter
            .settle(admission.reservation, completion.usage.total_tokens);
        let cache = async {
            if let Some(key) = &admission.cache_key {
                self.fill_cache(key, cache_payload(completion)).await;
            }
        };
        let (settled, ()) = tokio::join!(settle, cache);
        settled
    }

    /// Writes a cache entry on its own. The cache is an optimisation: a failed write is logged.
    async fn fill_cache(&self, key: &CacheKey, payload: Option<String>) {
        if let Some(text) = payload
            && let Err(err) = self.cache.put(key, text, self.cache_ttl).await
        {
            tracing::warn!(error = %err, "cache write failed");
        }
    }

    /// Settles an admitted call that ended without a complete answer (a stream cut off, or a
    /// client that went away): `used` is the best estimate of what upstream consumed.
    pub async fn settle_partial(&self, admission: Admission, used: u64) {
        if let Err(err) = self.limiter.settle(admission.reservation, used).await {
            tracing::warn!(error = %err, "settling a token reservation failed");
        }
    }

    /// Returns an admitted call's whole reservation (the upstream call failed).
    pub async fn abandon(&self, admission: Admission) {
        if let Err(err) = self.limiter.release(admission.reservation).await {
            tracing::warn!(error = %err, "releasing a token reservation failed");
        }
    }

    /// Starts a conversation turn: history, admission, cache.
    pub async fn begin_turn(
        &self,
        principal: &Principal,
        chat: ValidChat,
        use_cache: bool,
    ) -> Result<TurnStart, ApiError> {
        let (conversation_id, history) = match chat.conversation_id {
            Some(id) => {
                let history = self
                    .conversations
                    .recent(&principal.user_id, id, HISTORY_MESSAGES)
                    .await?
                    .ok_or(ApiError::NotFound("conversation"))?;
                (id, Some(history))
            }
            None => (Uuid::new_v4(), None),
        };
        let mut messages = Vec::with_capacity(HISTORY_MESSAGES + 2);
        if let Some(system) = &chat.system_prompt {
            messages.push(ChatMessage::system(system.clone()));
        }
        if let Some(history) = &history {
            messages.extend(history.messages.iter().map(|m| match m.role.as_str() {
                "assistant" => ChatMessage::assistant(m.content.clone()),
                _ => ChatMessage::user(m.content.clone()),
            }));
        }
        messages.push(ChatMessage::user(chat.message.clone()));
        let mut request = CompletionRequest::new(chat.model, messages);
        request.temperature = chat.temperature;
        request.max_tokens = chat.max_tokens;
        let expected_count = history.map(|h| h.message_count);

        match self.gate(principal, &request, use_cache).await? {
            Gate::Hit { cached, limit } => {
                // A cached answer still becomes part of the conversation; nothing was spent.
                let turn = ChatTurn {
                    user_message: chat.message,
                    assistant_message: cached.content.clone(),
                    prompt_tokens: cached.usage.prompt_tokens,
                    completion_tokens: cached.usage.completion_tokens,
                    model: cached.model.clone(),
                    cost_usd: 0.0,
                };
                self.conversations
                    .append_turn(&principal.user_id, conversation_id, expected_count, &turn)
                    .await?;
                let response = ChatResponse {
                    message: cached.content,
                    conversation_id,
                    model: cached.model,
                    usage: cached.usage,
                    cost_estimate: 0.0,
                    cached: true,
                    created_at: crate::dynamo::now_rfc3339(),
                };
                Ok(TurnStart::Cached(response, limit))
            }
            Gate::Miss(admission) => Ok(TurnStart::Fresh(PendingTurn {
                conversation_id,
                request,
                expected_count,
                user_message: chat.message,
                admission,
            })),
        }
    }

    /// Stores a turn whose answer arrived, settles its tokens and caches the answer.
    ///
    /// Two writes, concurrently: the turn's transaction, which also carries the cache fill when
    /// the cache can be written that way (one round trip instead of two; if the transaction
    /// cannot take it, the turn is stored without it and the entry is written on its own
    /// afterwards, so a cache failure never fails the turn), and the token settlement. The
    /// settlement stays a separate update: it goes to the principal's rate-limit item, which
    /// every admission of that principal writes, and inside a transaction it would make those
    /// admissions fail with `TransactionConflict` and the principal's concurrent turns conflict
    /// with each other, turning one saved round trip into retries and 503s.
    pub async fn finish_turn(
        &self,
        principal: &Principal,
        pending: PendingTurn,
        completion: Completion,
    ) -> Result<ChatResponse, ApiError> {
        let turn = ChatTurn {
            user_message: pending.user_message,
            assistant_message: completion.content.clone(),
            prompt_tokens: completion.usage.prompt_tokens,
            completion_tokens: completion.usage.completion_tokens,
            model: completion.model.clone(),
            cost_usd: completion.cost_usd,
        };
        let Admission {
            reservation,
            cache_key,
            ..
        } = pending.admission;
        let fill = cache_key.map(|key| (key, cache_payload(&completion)));
        let bundled = fill.as_ref().and_then(|(key, payload)| {
            self.cache
                .bundled_put(key, payload.clone()?, self.cache_ttl)
        });
        let store = self.conversations.append_turn_carrying(
            &principal.user_id,
            pending.conversation_id,
            pending.expected_count,
            &turn,
            bundled,
        );
        let settle = self
            .limiter
            .settle(reservation, completion.usage.total_tokens);
        let (stored, settled) = tokio::join!(store, settle);
        if let Err(err) = settled {
            tracing::warn!(error = %err, "settling a token reservation failed");
        }
        let (_, carried) = stored?;
        if !carried && let Some((key, payload)) = fill {
            self.fill_cache(&key, payload).await;
        }
        Ok(ChatResponse {
            message: completion.content,
            conversation_id: pending.conversation_id,
            model: completion.model,
            usage: completion.usage.into(),
            cost_estimate: completion.cost_usd,
            cached: false,
            created_at: crate::dynamo::now_rfc3339(),
        })
    }

    /// A whole buffered turn: begin, call the model, finish.
    pub async fn chat(
        &self,
        principal: &Principal,
        chat: ValidChat,
        use_cache: bool,
        deadline: Option<Instant>,
    ) -> Result<(ChatResponse, LimitStatus), ApiError> {
        match self.begin_turn(principal, chat, use_cache).await? {
            TurnStart::Cached(response, limit) => Ok((response, limit)),
            TurnStart::Fresh(pending) => {
                let limit = pending.admission.limit;
                match self.llm.complete(&pending.request, deadline).await {
                    Ok(completion) => {
                        let response = self.finish_turn(principal, pending, completion).await?;
                        Ok((response, limit))
                    }
                    Err(err) => {
                        self.abandon(pending.admission).await;
                        Err(err)
                    }
                }
            }
        }
    }
}

/// A completion outside any conversation (`/v1/chat/completions`, batch items).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub content: String,
    pub model: String,
    pub usage: TokenUsage,
    pub finish_reason: String,
    pub cost_usd: f64,
    pub cached: bool,
}

impl ChatService {
    /// Admission, cache, model call and settlement for one stateless completion.
    pub async fn complete(
        &self,
        principal: &Principal,
        request: &CompletionRequest,
        use_cache: bool,
        deadline: Option<Instant>,
    ) -> Result<(Answer, LimitStatus), ApiError> {
        match self.gate(principal, request, use_cache).await? {
            Gate::Hit { cached, limit } => Ok((
                Answer {
                    content: cached.content,
                    model: cached.model,
                    usage: cached.usage,
                    finish_reason: cached.finish_reason,
                    cost_usd: 0.0,
                    cached: true,
                },
                limit,
            )),
            Gate::Miss(admission) => {
                let limit = admission.limit;
                match self.llm.complete(request, deadline).await {
                    Ok(completion) => {
                        if let Err(err) = self.settle(admission, &completion).await {
                            tracing::warn!(error = %err, "settling a token reservation failed");
                        }
                        Ok((
                            Answer {
                                content: completion.content,
                                model: completion.model,
                                usage: completion.usage.into(),
                                finish_reason: completion.finish_reason,
                                cost_usd: completion.cost_usd,
                                cached: false,
                            },
                            limit,
                        ))
                    }
                    Err(err) => {
                        self.abandon(admission).await;
                        Err(err)
                    }
                }
            }
        }
    }
}

/// What the cache stores for an answer (`None` only if it cannot be serialized).
fn cache_payload(completion: &Completion) -> Option<String> {
    serde_json::to_string(&CachedCompletion {
        content: completion.content.clone(),
        model: completion.model.clone(),
        usage: completion.usage.into(),
        finish_reason: completion.finish_reason.clone(),
    })
    .ok()
}

/// The fields that decide an answer: two requests equal in these get the same cached reply.
fn cache_parts(request: &CompletionRequest) -> serde_json::Value {
    let messages: Vec<_> = request
        .messages
        .iter()
        .map(|m| serde_json::json!([format!("{:?}", m.role), m.content]))
        .collect();
    serde_json::json!({
        "model": request.model,
        "messages": messages,
        "temperature": request.temperature,
        "max_tokens": request.max_tokens,
        "top_p": request.top_p,
        "stop": request.stop,
        "seed": request.seed,
    })
}

fn cache_metric(hit: bool) {
    crate::telemetry::MetricEvent::new()
        .dimension("cache", if hit { "hit" } else { "miss" })
        .metric("CacheLookups", 1.0, crate::telemetry::Unit::Count)
        .emit();
}

/// Deep health check of the LLM provider.
pub struct LlmProbe(pub Arc<dyn LlmClient>);

#[async_trait::async_trait]
impl crate::http::Probe for LlmProbe {
    fn name(&self) -> &'static str {
        "llm"
    }

    async fn check(&self) -> Result<(), ApiError> {
        self.0.ping().await
    }
}
