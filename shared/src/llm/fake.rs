//! [`ScriptedLlm`]: an in-memory [`LlmClient`] for handler tests.
//!
//! Replies and errors are played in the order they were scripted, one per `complete` or
//! `stream` call; every request is recorded. Usage is deterministic: the crate's token estimates
//! of the prompt and of the reply (reported as provider usage, `estimated: false`), priced with
//! the registry like the real client does.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use futures::StreamExt;

use super::registry::{ModelRegistry, cost_usd};
use super::{
    Completion, CompletionRequest, CompletionStream, LlmClient, StreamEvent, Usage, resolve_model,
};
use crate::error::ApiError;

/// One scripted outcome.
#[derive(Debug)]
pub enum Scripted {
    /// A successful answer. Streamed, it arrives word by word (whitespace kept with the word).
    Reply(String),
    /// Fails the call before any text (for `stream`: `stream()` itself returns the error).
    Fail(ApiError),
    /// A stream that yields `deltas`, then `then` as its terminal `Err` item, or `Done` if none.
    /// Through `complete`, the deltas joined, or the error.
    Stream {
        deltas: Vec<String>,
        then: Option<ApiError>,
    },
}

/// A scripted fake of [`LlmClient`]; see the module documentation.
#[derive(Debug)]
pub struct ScriptedLlm {
    registry: ModelRegistry,
    script: Mutex<VecDeque<Scripted>>,
    received: Mutex<Vec<CompletionRequest>>,
    healthy: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock has already failed; keep serving the others.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ScriptedLlm {
    pub fn new(registry: ModelRegistry) -> Self {
        Self {
            registry,
            script: Mutex::new(VecDeque::new()),
            received: Mutex::new(Vec::new()),
            healthy: AtomicBool::new(true),
        }
    }

    /// Appends an outcome to the script (usable through an `Arc`).
    pub fn push(&self, outcome: Scripted) {
        lock(&self.script).push_back(outcome);
    }

    pub fn reply(self, text: impl Into<String>) -> Self {
        self.push(Scripted::Reply(text.into()));
        self
    }

    pub fn fail(self, error: ApiError) -> Self {
        self.push(Scripted::Fail(error));
        self
    }

    /// A stream of `deltas` that then fails with `error` instead of finishing.
    pub fn stream_then_fail(self, deltas: &[&str], error: ApiError) -> Self {
        self.push(Scripted::Stream {
            deltas: deltas.iter().map(|d| (*d).to_owned()).collect(),
            then: Some(error),
        });
        self
    }

    /// Makes `ping` answer 503 (`false`) or succeed (`true`).
    pub fn set_healthy(&self, healthy: bool) {
        self.healthy.store(healthy, Ordering::SeqCst);
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<CompletionRequest> {
        lock(&self.received).clone()
    }

    /// Scripted outcomes not consumed yet (a test can assert it used them all).
    pub fn remaining(&self) -> usize {
        lock(&self.script).len()
    }

    /// Records the request and takes the next outcome, checking model and deadline first as
    /// the real client does.
    fn next_outcome(
        &self,
        req: &CompletionRequest,
        deadline: Option<Instant>,
    ) -> Result<(String, Scripted), ApiError> {
        lock(&self.received).push(req.clone());
        let model = resolve_model(&self.registry, &req.model)?.id.clone();
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(ApiError::UpstreamTimeout);
        }
        let outcome = lock(&self.script)
            .pop_front()
            .ok_or_else(|| ApiError::internal("ScriptedLlm: no scripted outcome left"))?;
        Ok((model, outcome))
    }

    fn usage(req: &CompletionRequest, text: &str) -> Usage {
        Usage::reported(
            req.estimated_prompt_tokens(),
            crate::tokens::estimate_tokens(text),
        )
    }

    fn cost(&self, model: &str, usage: &Usage) -> f64 {
        self.registry
            .resolve(model)
            .map_or(0.0, |info| cost_usd(info, usage))
    }
}

/// `text` cut into word-sized pieces that concatenate back to it.
fn words(text: &str) -> Vec<String> {
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

#[async_trait::async_trait]
impl LlmClient for ScriptedLlm {
    async fn complete(
        &self,
        req: &CompletionRequest,
        deadline: Option<Instant>,
    ) -> Result<Completion, ApiError> {
        let (model, outcome) = self.next_outcome(req, deadline)?;
        let content = match outcome {
            Scripted::Reply(text) => text,
            Scripted::Fail(error)
            | Scripted::Stream {
                then: Some(error), ..
            } => return Err(error),
            Scripted::Stream { deltas, then: None } => deltas.concat(),
        };
        let usage = Self::usage(req, &content);
        Ok(Completion {
            cost_usd: self.cost(&model, &usage),
            content,
            model,
            usage,
            finish_reason: "stop".to_owned(),
            attempts: 1,
            fell_back: false,
        })
    }

    async fn stream(
        &self,
        req: &CompletionRequest,
        deadline: Option<Instant>,
    ) -> Result<CompletionStream, ApiError> {
        let (model, outcome) = self.next_outcome(req, deadline)?;
        let (deltas, then) = match outcome {
            Scripted::Reply(text) => (words(&text), None),
            Scripted::Fail(error) => return Err(error),
            Scripted::Stream { deltas, then } => (deltas, then),
        };
        let terminal = match then {
            Some(error) => Err(error),
            None => {
                let usage = Self::usage(req, &deltas.concat());
                Ok(StreamEvent::Done {
                    cost_usd: self.cost(&model, &usage),
                    model,
                    usage,
                    finish_reason: "stop".to_owned(),
                })
            }
        };
        let items = deltas
            .into_iter()
            .filter(|d| !d.is_empty())
            .map(|d| Ok(StreamEvent::Delta(d)))
            .chain(std::iter::once(terminal))
            .collect::<Vec<_>>();
        Ok(futures::stream::iter(items).boxed())
    }

    async fn ping(&self) -> Result<(), ApiError> {
        if self.healthy.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(ApiError::Unavailable {
                dependency: "LLM",
                detail: "ScriptedLlm set unhealthy".to_owned(),
            })
        }
    }

    fn registry(&self) -> &ModelRegistry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::llm::ChatMessage;

    fn fake() -> ScriptedLlm {
        ScriptedLlm::new(ModelRegistry::builtin().unwrap())
    }

    fn request(model: &str) -> CompletionRequest {
        CompletionRequest::new(model, vec![ChatMessage::user("hello there")])
    }

    #[test]
    fn words_concatenate_back_to_the_text() {
        assert_eq!(words("a bc  d"), ["a", " bc", "  d"]);
        assert_eq!(words("a bc  d").concat(), "a bc  d");
        assert!(words("").is_empty());
    }

    #[tokio::test]
    async fn plays_the_script_in_order_and_records_requests() {
        let llm = fake().reply("first answer").fail(ApiError::UpstreamTimeout);
        let done = llm.complete(&request("gpt-4o"), None).await.unwrap();
        assert_eq!(done.content, "first answer");
        assert_eq!(done.model, "gpt-4o");
        // "hello there" = 3 tokens + 4 framing + 3 priming; "first answer" = 3 tokens.
        assert_eq!(done.usage, Usage::reported(10, 3));
        assert!((done.cost_usd - (10.0 * 0.0025 + 3.0 * 0.01) / 1000.0).abs() < 1e-15);
        let err = llm.complete(&request("gpt-4o"), None).await.unwrap_err();
        assert!(matches!(err, ApiError::UpstreamTimeout));
        let err = llm.complete(&request("gpt-4o"), None).await.unwrap_err();
        assert!(matches!(err, ApiError::Internal { .. }), "script exhausted");
        assert_eq!(llm.requests().len(), 3);
    }

    #[tokio::test]
    async fn unknown_model_is_rejected_without_consuming_the_script() {
        let llm = fake().reply("x");
        let err = llm.complete(&request("gpt-9"), None).await.unwrap_err();
        assert_eq!(err.code(), "model_not_found");
        assert_eq!(llm.remaining(), 1);
    }

    #[tokio::test]
    async fn streams_words_then_done_or_the_scripted_error() {
        let llm = fake()
            .reply("one two three")
            .stream_then_fail(&["a", "b"], ApiError::UpstreamTimeout);
        let items: Vec<_> = llm
            .stream(&request("gpt-4o-mini"), None)
            .await
            .unwrap()
            .collect()
            .await;
        assert_eq!(items.len(), 4);
        assert!(matches!(&items[1], Ok(StreamEvent::Delta(d)) if d == " two"));
        assert!(matches!(&items[3], Ok(StreamEvent::Done { model, .. }) if model == "gpt-4o-mini"));
        let items: Vec<_> = llm
            .stream(&request("gpt-4o-mini"), None)
            .await
            .unwrap()
            .collect()
            .await;
        assert_eq!(items.len(), 3);
        assert!(matches!(items[2], Err(ApiError::UpstreamTimeout)));
    }
}
