//! Shared harness: a real mock-llm server on an ephemeral loopback port, and a reqwest client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mock_llm::MockState;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub struct MockServer {
    pub base: String,
    pub client: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

pub async fn start() -> MockServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(mock_llm::serve(
        listener,
        Arc::new(MockState::new()),
        async move {
            let _ = stopped.await;
        },
    ));
    MockServer {
        base: format!("http://{addr}"),
        client: reqwest::Client::new(),
        _stop: stop,
    }
}

impl MockServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A chat-completions request with a bearer key, ready for extra headers or a timeout.
    pub fn chat_request(&self, body: &Value) -> reqwest::RequestBuilder {
        self.client
            .post(self.url("/v1/chat/completions"))
            .bearer_auth("test-key")
            .json(body)
    }

    pub async fn chat(&self, body: &Value) -> reqwest::Response {
        self.chat_request(body).send().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let response = self.client.get(self.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "GET {path}");
        response.json().await.unwrap()
    }
}

/// A one-message request body for `model`.
pub fn user_body(model: &str, text: &str) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": text}],
    })
}

pub fn streaming(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body
}

/// One SSE event's `data` and the moment it was fully received.
pub struct SseEvent {
    pub data: String,
    pub arrived: Instant,
}

pub struct SseRead {
    pub events: Vec<SseEvent>,
    /// Set when the body ended with a transport error instead of a clean end.
    pub body_error: Option<reqwest::Error>,
}

impl SseRead {
    pub fn data(&self) -> Vec<&str> {
        self.events.iter().map(|e| e.data.as_str()).collect()
    }

    /// Every event but `[DONE]`, parsed as JSON.
    pub fn chunks(&self) -> Vec<Value> {
        self.events
            .iter()
            .filter(|e| e.data != "[DONE]")
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect()
    }

    /// The concatenated `delta.content` of all chunks.
    pub fn content(&self) -> String {
        self.chunks()
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect()
    }
}

/// Reads an SSE body to its end, timestamping each event as its terminating blank line arrives.
/// The mock writes single-line `data:` events, which is all this reader understands.
pub async fn read_sse(response: reqwest::Response) -> SseRead {
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    let mut body_error = None;
    let deadline = Duration::from_secs(10);
    loop {
        let next = tokio::time::timeout(deadline, stream.next())
            .await
            .expect("SSE body stalled");
        match next {
            None => break,
            Some(Err(err)) => {
                body_error = Some(err);
                break;
            }
            Some(Ok(bytes)) => {
                buffer.push_str(std::str::from_utf8(&bytes).unwrap());
                while let Some(end) = buffer.find("\n\n") {
                    let raw: String = buffer.drain(..end + 2).collect();
                    let data = raw
                        .lines()
                        .filter_map(|line| line.strip_prefix("data:"))
                        .map(|d| d.strip_prefix(' ').unwrap_or(d))
                        .collect::<Vec<_>>()
                        .join("\n");
                    events.push(SseEvent {
                        data,
                        arrived: Instant::now(),
                    });
                }
            }
        }
    }
    assert!(
        buffer.trim().is_empty() || body_error.is_some(),
        "unterminated event: {buffer:?}"
    );
    SseRead { events, body_error }
}

pub async fn error_body(response: reqwest::Response) -> Value {
    let body: Value = response.json().await.unwrap();
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["param"].is_null(), "{body}");
    body
}
