//! The two wire formats of a streamed answer: the gateway's own SSE events (`/chat/stream`)
//! and OpenAI's `chat.completion.chunk` objects (`/v1/chat/completions`).

use axum::response::sse::Event;
use serde::Serialize;
use serde_json::json;
use shared::chat::TokenUsage;
use shared::error::ApiError;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::pump::{Finished, Format};

/// The `error` payload: the API error envelope's body, stamped with the request's id (the pump
/// runs outside the request task, so the id is carried explicitly).
fn error_body(err: &ApiError, request_id: &Option<String>) -> serde_json::Value {
    let mut envelope = err.envelope();
    envelope.error.request_id.clone_from(request_id);
    serde_json::to_value(envelope.error).unwrap_or_default()
}

fn json_event(value: &impl Serialize) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_default())
}

/// One Server-Sent Event as it goes over the wire, which is what the OpenAPI document describes
/// for `text/event-stream` answers: `data` is the JSON text of a [`ChatStreamEvent`] (or, on
/// `/v1/chat/completions`, of a `chat.completion.chunk`), and the last event's `data` is
/// `[DONE]`. `: ping` comments may precede the first event. Nothing names an `event`, `id` or
/// `retry`; they are listed because SSE allows them.
#[derive(Debug, Serialize, ToSchema)]
pub struct SseEvent {
    /// JSON text of one `ChatStreamEvent` or chunk, or `[DONE]`.
    pub data: String,
    pub event: Option<String>,
    pub id: Option<String>,
    pub retry: Option<u64>,
}

/// One event of `POST /chat/stream`, discriminated by `type`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ChatStreamEvent {
    /// First event: which conversation and model.
    Start {
        conversation_id: Uuid,
        model: String,
    },
    /// A piece of the answer, as the model produced it.
    Delta { content: String },
    /// Last event before `[DONE]`: the turn is stored.
    Done {
        conversation_id: Uuid,
        model: String,
        usage: TokenUsage,
        cost_estimate: f64,
        finish_reason: String,
        cached: bool,
    },
    /// The stream failed after it started; `error` is the error envelope's body.
    Error {
        #[schema(value_type = Object)]
        error: serde_json::Value,
    },
}

pub struct ChatFormat {
    pub conversation_id: Uuid,
    pub model: String,
    pub request_id: Option<String>,
}

impl Format for ChatFormat {
    fn start(&self) -> Vec<Event> {
        vec![json_event(&ChatStreamEvent::Start {
            conversation_id: self.conversation_id,
            model: self.model.clone(),
        })]
    }

    fn delta(&self, text: &str) -> Event {
        json_event(&ChatStreamEvent::Delta {
            content: text.to_owned(),
        })
    }

    fn done(&self, finished: &Finished) -> Vec<Event> {
        let c = &finished.completion;
        vec![json_event(&ChatStreamEvent::Done {
            conversation_id: self.conversation_id,
            model: c.model.clone(),
            usage: c.usage.into(),
            cost_estimate: c.cost_usd,
            finish_reason: c.finish_reason.clone(),
            cached: false,
        })]
    }

    fn error(&self, err: &ApiError) -> Event {
        json_event(&ChatStreamEvent::Error {
            error: error_body(err, &self.request_id),
        })
    }
}

pub struct OpenAiFormat {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
    pub request_id: Option<String>,
}

impl OpenAiFormat {
    fn chunk(&self, delta: serde_json::Value, finish_reason: Option<&str>) -> Event {
        json_event(&json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": null}],
        }))
    }

    /// The closing chunks: the finish reason, then usage when the client asked for it.
    pub fn closing(&self, finish_reason: &str, usage: TokenUsage) -> Vec<Event> {
        let mut events = vec![self.chunk(json!({}), Some(finish_reason))];
        if self.include_usage {
            events.push(json_event(&json!({
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage,
            })));
        }
        events
    }
}

impl Format for OpenAiFormat {
    fn start(&self) -> Vec<Event> {
        vec![self.chunk(json!({"role": "assistant", "content": ""}), None)]
    }

    fn delta(&self, text: &str) -> Event {
        self.chunk(json!({"content": text}), None)
    }

    fn done(&self, finished: &Finished) -> Vec<Event> {
        let c = &finished.completion;
        self.closing(&c.finish_reason, c.usage.into())
    }

    fn error(&self, err: &ApiError) -> Event {
        json_event(&json!({"error": error_body(err, &self.request_id)}))
    }
}

/// Splits a cached answer into word-sized deltas, so a replay looks like a live stream and
/// concatenates to exactly the original text.
pub fn replay_pieces(text: &str) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if c.is_whitespace() && !current.trim().is_empty() {
            pieces.push(std::mem::take(&mut current));
        }
        current.push(c);
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_pieces_concatenate_to_the_original() {
        for text in [
            "",
            "one",
            "one two  three",
            " lead\nand\ttabs ",
            "你好 世界",
        ] {
            assert_eq!(replay_pieces(text).concat(), text);
        }
        assert_eq!(replay_pieces("a b c").len(), 3);
    }
}
