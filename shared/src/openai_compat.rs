//! OpenAI-compatible request and response shapes, so any OpenAI SDK can call the gateway by
//! pointing its base URL at a function URL. Unknown OpenAI fields are accepted and ignored.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::chat::{check_max_tokens, check_model, check_temperature};
use crate::error::{ApiError, FieldError};
use crate::llm::{ChatMessage, Completion, CompletionRequest, ModelInfo, ModelRegistry, Role};

/// `POST /v1/chat/completions` body (the subset the gateway acts on; other fields are ignored).
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct OpenAiChatRequest {
    pub model: Option<String>,
    pub messages: Vec<OpenAiMessage>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub top_p: Option<f64>,
    pub stop: Option<StopSequences>,
    pub seed: Option<i64>,
    pub user: Option<String>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum StopSequences {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct OpenAiMessage {
    /// `system`, `developer`, `user` or `assistant`.
    pub role: String,
    pub content: Option<MessageContent>,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

const MAX_MESSAGES: usize = 500;

impl OpenAiChatRequest {
    pub fn wants_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// Validates and converts to the gateway's request. Every failure is reported at once.
    pub fn validate(self, registry: &ModelRegistry) -> Result<CompletionRequest, ApiError> {
        let mut errors = Vec::new();
        if self.messages.is_empty() || self.messages.len() > MAX_MESSAGES {
            errors.push(FieldError::body(
                "messages",
                "length",
                format!("messages must hold 1..={MAX_MESSAGES} entries"),
            ));
        }
        let mut messages = Vec::with_capacity(self.messages.len());
        for (i, message) in self.messages.into_iter().enumerate() {
            let role = match message.role.as_str() {
                "system" | "developer" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                _ => {
                    errors.push(FieldError::body(
                        &format!("messages.{i}.role"),
                        "enum",
                        "role must be system, developer, user or assistant",
                    ));
                    continue;
                }
            };
            let content = match message.content {
                None => String::new(),
                Some(MessageContent::Text(text)) => text,
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            _ => errors.push(FieldError::body(
                                &format!("messages.{i}.content"),
                                "unsupported_content",
                                "only text content parts are supported",
                            )),
                        }
                    }
                    text
                }
            };
            messages.push(ChatMessage { role, content });
        }
        let temperature = check_temperature(&mut errors, self.temperature);
        let (field, requested) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) => ("max_completion_tokens", Some(n)),
            (None, n) => ("max_tokens", n),
        };
        let max_tokens = check_max_tokens(&mut errors, field, requested);
        let model = check_model(&mut errors, registry, self.model.as_deref());
        if let Some(top_p) = self.top_p
            && !(top_p.is_finite() && (0.0..=1.0).contains(&top_p))
        {
            errors.push(FieldError::body(
                "top_p",
                "range",
                "top_p must be between 0 and 1",
            ));
        }
        if self.n.is_some_and(|n| n != 1) {
            errors.push(FieldError::body(
                "n",
                "unsupported",
                "only n = 1 is supported",
            ));
        }
        let stop = match self.stop {
            None => None,
            Some(StopSequences::One(s)) => Some(vec![s]),
            Some(StopSequences::Many(v)) if v.len() <= 4 => Some(v),
            Some(StopSequences::Many(_)) => {
                errors.push(FieldError::body(
                    "stop",
                    "length",
                    "at most 4 stop sequences",
                ));
                None
            }
        };
        if !errors.is_empty() {
            return Err(ApiError::Validation(errors));
        }
        let mut request = CompletionRequest::new(model, messages);
        request.temperature = temperature;
        request.max_tokens = max_tokens;
        request.top_p = self.top_p.map(|p| p as f32);
        request.stop = stop;
        request.seed = self.seed;
        // Providers want a stable end-user id for abuse monitoring, not the raw value (it is
        // often an e-mail address): forward a short hash.
        request.user = self.user.filter(|u| !u.is_empty()).map(|u| {
            use sha2::Digest;
            hex::encode(&sha2::Sha256::digest(u.as_bytes())[..16])
        });
        Ok(request)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiResponseMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiChoice {
    pub index: u32,
    pub message: OpenAiResponseMessage,
    pub finish_reason: String,
    pub logprobs: Option<serde_json::Value>,
}

/// `chat.completion` object.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiChatResponse {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub model: String,
    pub choices: Vec<OpenAiChoice>,
    pub usage: OpenAiUsage,
    /// Gateway extension: USD spent upstream (0 when served from the cache).
    pub cost_estimate: f64,
}

pub fn completion_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
}

impl OpenAiChatResponse {
    pub fn new(
        model: String,
        content: String,
        finish_reason: String,
        usage: crate::chat::TokenUsage,
        cost: f64,
    ) -> Self {
        Self {
            id: completion_id(),
            object: "chat.completion".to_owned(),
            created: crate::dynamo::now_epoch(),
            model,
            choices: vec![OpenAiChoice {
                index: 0,
                message: OpenAiResponseMessage {
                    role: "assistant".to_owned(),
                    content,
                },
                finish_reason,
                logprobs: None,
            }],
            usage: OpenAiUsage {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                total_tokens: usage.total_tokens,
            },
            cost_estimate: cost,
        }
    }

    /// The non-streaming answer of `/v1/chat/completions` (chat and stream functions alike):
    /// the `chat.completion` object with the rate-limit and cache headers.
    pub fn into_response(
        answer: crate::chat::Answer,
        limit: crate::ratelimit::LimitStatus,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        let hit = answer.cached;
        let body = Self::new(
            answer.model,
            answer.content,
            answer.finish_reason,
            answer.usage,
            answer.cost_usd,
        );
        let mut response = axum::Json(body).into_response();
        limit.apply(response.headers_mut());
        crate::http::set_cache_header(response.headers_mut(), hit);
        response
    }

    pub fn from_completion(completion: Completion) -> Self {
        Self::new(
            completion.model,
            completion.content,
            completion.finish_reason,
            completion.usage.into(),
            completion.cost_usd,
        )
    }
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiModel {
    pub id: String,
    pub object: String,
    pub created: u64,
    pub owned_by: String,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OpenAiModelList {
    pub object: String,
    pub data: Vec<OpenAiModel>,
}

impl OpenAiModelList {
    pub fn from_registry(registry: &ModelRegistry) -> Self {
        Self {
            object: "list".to_owned(),
            data: registry
                .models()
                .iter()
                .map(|m: &ModelInfo| OpenAiModel {
                    id: m.id.clone(),
                    object: "model".to_owned(),
                    created: 0,
                    owned_by: m.owned_by.clone(),
                })
                .collect(),
        }
    }
}
