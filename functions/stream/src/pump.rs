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
    /// The upstream failed before the answer started: release the admission, nothing was used.
    fn abandon(self: Box<Self>) -> BoxFuture<'static, ()>;
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
            // Keeps proxies and clients from timing out while the model is slow to start. The
            // response starts only because a heartbeat has already passed without a token, so
            // the first ping is due now (the interval's first tick is immediate), then one per
            // heartbeat: the client never waits more than a heartbeat for a byte.
            let mut ticker = tokio::time::interval(heartbeat);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::response::IntoResponse;
    use axum::response::sse::Sse;
    use http_body_util::BodyExt;
    use shared::llm::Usage;

    struct Plain;

    impl Format for Plain {
        fn start(&self) -> Vec<Event> {
            vec![Event::default().data("start")]
        }
        fn delta(&self, text: &str) -> Event {
            Event::default().data(text)
        }
        fn done(&self, _: &Finished) -> Vec<Event> {
            vec![Event::default().data("done")]
        }
        fn error(&self, _: &ApiError) -> Event {
            Event::default().data("error")
        }
    }

    struct Ignore;

    impl Finish for Ignore {
        fn complete(self: Box<Self>, _: Completion) -> BoxFuture<'static, Result<(), ApiError>> {
            Box::pin(async { Ok(()) })
        }
        fn abort(self: Box<Self>, _: u64) -> BoxFuture<'static, ()> {
            Box::pin(async {})
        }
        fn abandon(self: Box<Self>) -> BoxFuture<'static, ()> {
            Box::pin(async {})
        }
    }

    /// What the client receives when the first token comes `first_token_after` into the
    /// streamed response, with pings every `heartbeat`.
    async fn body_for_slow_start(first_token_after: Duration, heartbeat: Duration) -> String {
        let call: BoxFuture<'static, Result<CompletionStream, ApiError>> = Box::pin(async move {
            tokio::time::sleep(first_token_after).await;
            let items = vec![
                Ok(StreamEvent::Delta("hi".to_owned())),
                Ok(StreamEvent::Done {
                    model: "m".to_owned(),
                    usage: Usage::reported(1, 1),
                    finish_reason: "stop".to_owned(),
                    cost_usd: 0.0,
                }),
            ];
            Ok(futures::stream::iter(items).boxed())
        });
        let (tx, mut rx) = mpsc::channel(16);
        tokio::spawn(run(
            Upstream::Pending(call),
            Plain,
            Box::new(Ignore),
            1,
            heartbeat,
            tx,
        ));
        let events = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let body = Sse::new(events).into_response().into_body();
        let bytes = body.collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_slow_start_pings_at_once_when_the_response_starts() {
        // The heartbeat is far longer than the wait: only an immediate ping can come first.
        let body = body_for_slow_start(Duration::from_millis(150), Duration::from_secs(30)).await;
        assert_eq!(
            body,
            ": ping\n\ndata: start\n\ndata: hi\n\ndata: done\n\ndata: [DONE]\n\n"
        );
    }

    #[tokio::test]
    async fn a_slow_start_keeps_pinging_every_heartbeat_until_the_first_token() {
        let body =
            body_for_slow_start(Duration::from_millis(500), Duration::from_millis(100)).await;
        let pings = body.matches(": ping\n\n").count();
        assert!((3..=6).contains(&pings), "{pings} pings in {body:?}");
        assert!(body.starts_with(": ping\n\n"), "{body:?}");
        assert!(
            body.ends_with("data: start\n\ndata: hi\n\ndata: done\n\ndata: [DONE]\n\n"),
            "{body:?}"
        );
    }
}
