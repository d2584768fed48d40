//! The LLM client: domain types, the [`LlmClient`] trait, the model registry, the OpenAI-compatible
//! implementation and an in-memory fake for handler tests.
//!
//! | file          | what lives there                                                        |
//! |---------------|-------------------------------------------------------------------------|
//! | `mod.rs`      | requests, completions, stream events, the trait and its contract        |
//! | `registry.rs` | models as data (`shared/models.toml`): ids, aliases, prices, fallbacks  |
//! | `retry.rs`    | backoff with full jitter, `Retry-After`, deadline arithmetic (pure)     |
//! | `openai.rs`   | [`OpenAiClient`]: async-openai + retries + fallback + logs and metrics  |
//! | `fake.rs`     | [`ScriptedLlm`]: scripted replies and errors, records requests          |

use std::time::Instant;

use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

mod fake;
mod openai;
mod registry;
mod retry;

pub use fake::{Scripted, ScriptedLlm};
pub use openai::{ClientInitError, OpenAiClient};
pub use registry::{ModelInfo, ModelRegistry, RegistryError, cost_usd};
pub use retry::{GiveUpReason, RetryDecision, RetryPolicy, retry_after_from_headers};

/// Who wrote a message of the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One message of the conversation sent to the model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            content: content.into(),
        }
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: Role::User,
            content: content.into(),
        }
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// What to ask the model.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletionRequest {
    /// A registry id or alias; unknown names are a 400 `model_not_found`.
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub temperature: f32,
    /// Upper bound of the completion length. Clamped to the model's `max_output_tokens`;
    /// `0` leaves the limit to the provider.
    pub max_tokens: u32,
    pub top_p: Option<f32>,
    pub stop: Option<Vec<String>>,
    pub seed: Option<i64>,
    /// An opaque end-user id (a hash, never an e-mail) forwarded to the provider for abuse
    /// monitoring, as OpenAI's `safety_identifier`.
    pub user: Option<String>,
}

impl CompletionRequest {
    /// A request with the provider's usual defaults: temperature 1, no token limit.
    pub fn new(model: impl Into<String>, messages: Vec<ChatMessage>) -> Self {
        Self {
            model: model.into(),
            messages,
            temperature: 1.0,
            max_tokens: 0,
            top_p: None,
            stop: None,
            seed: None,
            user: None,
        }
    }

    /// The crate's conservative estimate of the prompt tokens (see [`crate::tokens`]).
    pub fn estimated_prompt_tokens(&self) -> u64 {
        crate::tokens::estimate_messages(self.messages.iter().map(|m| m.content.as_str()))
    }
}

/// Tokens consumed by one completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// `true` when the provider reported no usage and these numbers come from
    /// [`crate::tokens`] (an upper-bound estimate).
    pub estimated: bool,
}

impl Usage {
    pub fn reported(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            estimated: false,
        }
    }

    pub fn estimated(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Self {
            estimated: true,
            ..Self::reported(prompt_tokens, completion_tokens)
        }
    }
}

/// A finished, non-streamed completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub content: String,
    /// Registry id of the model that produced the answer: the fallback when `fell_back`.
    pub model: String,
    pub usage: Usage,
    /// The provider's reason (`stop`, `length`, `content_filter`, ...), `unknown` if it gave none.
    pub finish_reason: String,
    /// Upstream requests made for this completion, the fallback's included.
    pub attempts: u32,
    pub fell_back: bool,
    /// `usage` priced with the registry entry of `model`.
    pub cost_usd: f64,
}

/// One item of a streamed completion.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// Text as the provider produced it; never empty.
    Delta(String),
    /// The last item of a successful stream.
    Done {
        model: String,
        usage: Usage,
        finish_reason: String,
        cost_usd: f64,
    },
}

/// A streamed completion: `Delta`s, then exactly one terminal item (`Done` or `Err`), then the
/// end of the stream.
pub type CompletionStream = BoxStream<'static, Result<StreamEvent, ApiError>>;

/// Chat completions from a model provider.
///
/// Contract, shared by every implementation (the OpenAI-compatible one and the fake):
///
/// - **Models.** `req.model` is a registry id or alias ([`LlmClient::registry`]). An unknown name
///   is `ApiError::BadRequest { code: "model_not_found", .. }` and nothing is sent upstream.
///   Results name the registry id of the model that actually answered, and `cost_usd` is its
///   usage priced with that model's registry entry ([`cost_usd`]).
/// - **Retries.** Transient failures (upstream 429, 5xx, timeout, connection) are retried up to
///   the policy's attempt count with exponential backoff and full jitter, waiting at least the
///   upstream `Retry-After`. When they keep failing, the model's registry `fallback` is tried
///   exactly once. Everything else (400 `context_length_exceeded`, other 4xx, malformed
///   responses) fails at once.
/// - **Deadline.** With `deadline` set (the Lambda invocation's), no attempt starts and no
///   backoff sleep runs unless it can finish before the deadline minus a safety margin: the call
///   fails early with the last error rather than being killed mid-wait. A deadline already too
///   close when the call starts gives `UpstreamTimeout` without contacting upstream.
/// - **Errors.** Upstream 429 is `UpstreamRateLimited` (with the upstream `Retry-After`), a
///   timeout `UpstreamTimeout`, 5xx / connection / malformed responses / other 4xx
///   `UpstreamFailed`, a too-long conversation `BadRequest { code: "context_length_exceeded" }`,
///   no provider configured `Unavailable { dependency: "LLM" }`.
/// - **Streams.** `stream` returns only once the first text delta has arrived (or the upstream
///   finished without text), so every retry and the fallback happen before it returns and its
///   `Err` can still become a plain HTTP error. The returned stream yields `Delta`s as they
///   arrive, then exactly one `Done` or `Err`, then ends; nothing is retried after the first
///   delta. The per-call timeout bounds the time to the first delta and every gap between
///   chunks. Dropping the stream cancels the upstream request.
/// - **Usage.** Reported by the provider when it does; otherwise estimated with
///   [`crate::tokens`] and marked `estimated: true`.
/// - Calls never panic, share nothing mutable between requests, and may run concurrently from
///   many tasks (`Arc<dyn LlmClient>`).
#[async_trait::async_trait]
pub trait LlmClient: Send + Sync {
    /// A whole completion.
    async fn complete(
        &self,
        req: &CompletionRequest,
        deadline: Option<Instant>,
    ) -> Result<Completion, ApiError>;

    /// A streamed completion; see the trait documentation for what happens before and after
    /// the first delta.
    async fn stream(
        &self,
        req: &CompletionRequest,
        deadline: Option<Instant>,
    ) -> Result<CompletionStream, ApiError>;

    /// A cheap reachability and credentials check of the provider (deep health check).
    /// Never retried.
    async fn ping(&self) -> Result<(), ApiError>;

    /// The registry used to resolve model names and price usage.
    fn registry(&self) -> &ModelRegistry;
}

/// Longest model name echoed back in a `model_not_found` message.
const MAX_ECHOED_MODEL_CHARS: usize = 100;

/// Resolves `name` in `registry`, or the contract's 400 for an unknown model.
pub(crate) fn resolve_model<'r>(
    registry: &'r ModelRegistry,
    name: &str,
) -> Result<&'r ModelInfo, ApiError> {
    registry.resolve(name).ok_or_else(|| {
        let shown: String = name.chars().take(MAX_ECHOED_MODEL_CHARS).collect();
        ApiError::BadRequest {
            code: "model_not_found",
            message: format!("unknown model '{shown}'"),
            param: Some("model".to_owned()),
        }
    })
}
