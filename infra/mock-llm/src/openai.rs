//! The OpenAI chat-completions wire format, as far as the mock reads and writes it.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::reply::{ChatTurn, Completion};

/// The request fields the mock acts on; every other field is accepted and ignored.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<RequestMessage>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
}

impl ChatRequest {
    pub fn is_stream(&self) -> bool {
        self.stream.unwrap_or(false)
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    }

    /// `max_completion_tokens` replaced `max_tokens` in the OpenAI API; prefer it when both are set.
    pub fn token_limit(&self) -> Option<u64> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    pub fn turns(&self) -> Vec<ChatTurn> {
        self.messages
            .iter()
            .map(|m| ChatTurn {
                role: m.role.clone(),
                text: m.text(),
            })
            .collect()
    }
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct RequestMessage {
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub content: Option<MessageContent>,
}

impl RequestMessage {
    /// The textual content; non-text parts (images, audio) contribute nothing.
    pub fn text(&self) -> String {
        match &self.content {
            None => String::new(),
            Some(MessageContent::Text(text)) => text.clone(),
            Some(MessageContent::Parts(parts)) => parts
                .iter()
                .filter(|p| p.kind == "text")
                .filter_map(|p| p.text.as_deref())
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl Usage {
    pub fn of(completion: &Completion) -> Self {
        let completion_tokens = completion.completion_tokens();
        Self {
            prompt_tokens: completion.prompt_tokens,
            completion_tokens,
            total_tokens: completion.prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

/// Identity shared by a response and all chunks of one stream.
#[derive(Debug, Clone, Serialize)]
pub struct ResponseMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

#[derive(Debug, Serialize)]
pub struct ChatCompletion<'a> {
    #[serde(flatten)]
    pub meta: &'a ResponseMeta,
    pub object: &'static str,
    pub choices: [Choice; 1],
    pub usage: Usage,
}

impl<'a> ChatCompletion<'a> {
    pub fn new(meta: &'a ResponseMeta, completion: &Completion) -> Self {
        Self {
            meta,
            object: "chat.completion",
            choices: [Choice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: completion.content(),
                },
                finish_reason: completion.finish_reason.as_str(),
            }],
            usage: Usage::of(completion),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
pub struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

#[derive(Debug, Serialize)]
pub struct ChatChunk<'a> {
    #[serde(flatten)]
    pub meta: &'a ResponseMeta,
    pub object: &'static str,
    pub choices: Vec<ChunkChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

impl<'a> ChatChunk<'a> {
    fn with_choice(meta: &'a ResponseMeta, choice: ChunkChoice) -> Self {
        Self {
            meta,
            object: "chat.completion.chunk",
            choices: vec![choice],
            usage: None,
        }
    }

    /// The opening chunk: it names the role and carries no text.
    pub fn role(meta: &'a ResponseMeta) -> Self {
        Self::with_choice(
            meta,
            ChunkChoice {
                index: 0,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                finish_reason: None,
            },
        )
    }

    pub fn content(meta: &'a ResponseMeta, piece: String) -> Self {
        Self::with_choice(
            meta,
            ChunkChoice {
                index: 0,
                delta: Delta {
                    role: None,
                    content: Some(piece),
                },
                finish_reason: None,
            },
        )
    }

    pub fn finish(meta: &'a ResponseMeta, reason: &'static str) -> Self {
        Self::with_choice(
            meta,
            ChunkChoice {
                index: 0,
                delta: Delta::default(),
                finish_reason: Some(reason),
            },
        )
    }

    /// The trailing chunk sent when `stream_options.include_usage` is set: no choices, only usage.
    pub fn usage(meta: &'a ResponseMeta, usage: Usage) -> Self {
        Self {
            meta,
            object: "chat.completion.chunk",
            choices: Vec::new(),
            usage: Some(usage),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// Every error the mock answers with, genuine or injected, in OpenAI's error envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    MissingApiKey,
    InvalidJson(String),
    InvalidRequest(String),
    NotFound,
    RateLimited { retry_after_s: u64 },
    ContextLengthExceeded,
    Internal,
    BadGateway,
    Unavailable,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingApiKey => StatusCode::UNAUTHORIZED,
            Self::InvalidJson(_) | Self::InvalidRequest(_) | Self::ContextLengthExceeded => {
                StatusCode::BAD_REQUEST
            }
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Self::BadGateway => StatusCode::BAD_GATEWAY,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::MissingApiKey
            | Self::InvalidJson(_)
            | Self::InvalidRequest(_)
            | Self::NotFound
            | Self::ContextLengthExceeded => "invalid_request_error",
            Self::RateLimited { .. } => "rate_limit_exceeded",
            Self::Internal | Self::BadGateway | Self::Unavailable => "server_error",
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            Self::MissingApiKey => Some("invalid_api_key"),
            Self::ContextLengthExceeded => Some("context_length_exceeded"),
            Self::RateLimited { .. } => Some("rate_limit_exceeded"),
            Self::NotFound => Some("unknown_url"),
            Self::InvalidJson(_)
            | Self::InvalidRequest(_)
            | Self::Internal
            | Self::BadGateway
            | Self::Unavailable => None,
        }
    }

    fn message(&self) -> String {
        match self {
            Self::MissingApiKey => {
                "You didn't provide an API key (expected an `Authorization: Bearer` header)."
                    .to_owned()
            }
            Self::InvalidJson(detail) => {
                format!("We could not parse the JSON body of your request: {detail}")
            }
            Self::InvalidRequest(detail) => format!("Invalid request body: {detail}"),
            Self::NotFound => "Unknown request URL.".to_owned(),
            Self::RateLimited { .. } => "Rate limit reached (injected by mock-llm).".to_owned(),
            Self::ContextLengthExceeded => {
                "This model's maximum context length was exceeded (injected by mock-llm)."
                    .to_owned()
            }
            Self::Internal => {
                "The server had an error while processing your request (injected by mock-llm)."
                    .to_owned()
            }
            Self::BadGateway => "Bad gateway (injected by mock-llm).".to_owned(),
            Self::Unavailable => {
                "The engine is currently overloaded (injected by mock-llm).".to_owned()
            }
        }
    }
}

#[derive(Serialize)]
struct ErrorEnvelope {
    error: ErrorDetail,
}

#[derive(Serialize)]
struct ErrorDetail {
    message: String,
    #[serde(rename = "type")]
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let envelope = ErrorEnvelope {
            error: ErrorDetail {
                message: self.message(),
                kind: self.kind(),
                code: self.code(),
                param: None,
            },
        };
        let mut response = (self.status(), Json(envelope)).into_response();
        if let Self::RateLimited { retry_after_s } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
        }
        response
    }
}
