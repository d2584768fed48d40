//! Drives one upstream stream into SSE events on a channel.
//!
//! The pump runs in its own task and owns everything a turn needs to end properly: when the
//! upstream finishes it stores/settles the turn before the last event; when the upstream fails
//! after the first byte it sends an error event; when the client goes away (the channel closes)
//! it stops reading upstream (dropping the stream cancels the HTTP request) and settles the
//! token reservation with what was consumed. It never panics: every path ends in `[DONE]` or a
//! closed channel.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::Event;
use futures::StreamExt;
use futures::future::BoxFuture;
use shared::error::ApiError;
use shared::llm::{Completion, CompletionStream, StreamEvent};
use tokio::sync::mpsc;

pub type EventSender = mpsc::Sender<Result<Event, Infallible>>;

/// How one route renders the stream (the gateway's own events or OpenAI chunks).
pub trait Format: Send + Sync + 'static {
    /// Events before the first delta.
    fn start(&self) -> Vec<Event>;
    fn delta(&self, text: &str) -> Event;
    /// Events after a finished stream (before `[DONE]`).
    fn done(&self, finished: &Finished) -> Vec<Event>;
    fn error(&self, err: &ApiError) -> Event;
}

/// A completed answer as it is reported to the client.
pub struct Finished {
    pub completion: Completion,
}

/// What to do with the result; runs inside the pump so it happens even if nobody listens.
pub trait Finish: Send + 'static {
    /// The upstream finished: persist / settle. An error becomes the stream's error event.
    fn complete(
        self: Box<Self>,
        completion: Completion,
    ) -> BoxFuture<'static, Result<(), ApiError>>;
    /// The stream ended without an answer: settle with `used` tokens (an estimate).
    fn abort(self: Box<Self>, used: u64) -> BoxFuture<'static, ()>;
}

/// The upstream call: already answered, or still waiting for its first token.
pub enum Upstream {
    Ready(CompletionStream),
    Pending(BoxFuture<'static, Result<CompletionStream, ApiError>>),
}

pub fn done_event() -> Event {
    Event::default().data("[DONE]")
}

async fn send(tx: &EventSender, event: Event) -> bool {
    tx.send(Ok(event)).await.is_ok()
}

pub async fn run(
    upstream: Upstream,
    format: impl Format,
    finish: Box<dyn Finish>,
    prompt_estimate: u64,
    heartbeat: Duration,
    tx: EventSender,
) {
    let mut stream = match upstream {
        Upstream::Ready(stream) => stream,
        Upstream::Pending(mut call) => {
            // Keeps proxies and clients from timing out while the model is slow to start.
            let mut ticker = tokio::time::interval(heartbeat);
            ticker.tick().await;
            loop {
                tokio::select! {
                    result = &mut call => match result {
                        Ok(stream) => break stream,
                        Err(err) => {
                            finish.abort(0).await;
                            let _ = send(&tx, format.error(&err)).await;
                            let _ = send(&tx, done_event()).await;
                            return;
                        }
                    },
                    _ = ticker.tick() => {
                        if !send(&tx, Event::default().comment("ping")).await {
                            finish.abort(0).await;
                            return;
                        }
                    }
                }
            }
        }
    };
    for event in format.start() {
        if !send(&tx, event).await {
            finish.abort(prompt_estimate).await;
            return;
        }
    }
    let mut text = String::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(StreamEvent::Delta(delta)) => {
                text.push_str(&delta);
                if !send(&tx, format.delta(&delta)).await {
                    drop(stream);
                    let used = prompt_estimate + shared::tokens::estimate_tokens(&text);
                    tracing::info!(streamed_chars = text.len(), "client went away mid-stream");
                    finish.abort(used).await;
                    return;
                }
            }
            Ok(StreamEvent::Done {
                model,
                usage,
                finish_reason,
                cost_usd,
            }) => {
                let completion = Completion {
                    content: text,
                    model,
                    usage,
                    finish_reason,
                    attempts: 1,
                    fell_back: false,
                    cost_usd,
                };
                let finished = Finished {
                    completion: completion.clone(),
                };
                match finish.complete(completion).await {
                    Ok(()) => {
                        for event in format.done(&finished) {
                            let _ = send(&tx, event).await;
                        }
                    }
                    Err(err) => {
                        let _ = send(&tx, format.error(&err)).await;
                    }
                }
                let _ = send(&tx, done_event()).await;
                return;
            }
            Err(err) => {
                let used = prompt_estimate + shared::tokens::estimate_tokens(&text);
                finish.abort(used).await;
                let _ = send(&tx, format.error(&err)).await;
                let _ = send(&tx, done_event()).await;
                return;
            }
        }
    }
    // The stream contract ends with Done or Err; an early end is a failure, never silence.
    let used = prompt_estimate + shared::tokens::estimate_tokens(&text);
    finish.abort(used).await;
    let err = ApiError::UpstreamFailed {
        detail: "upstream stream ended without a final event".to_owned(),
    };
    let _ = send(&tx, format.error(&err)).await;
    let _ = send(&tx, done_event()).await;
}
