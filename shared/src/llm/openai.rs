//! [`LlmClient`] for any OpenAI-compatible chat-completions API, through `async-openai`.
//!
//! async-openai 0.43 retries on its own by default (3 retries, `Retry-After` slept in full, no
//! deadline) and its errors drop the response headers. Both are replaced here: the client runs
//! on [`UpstreamTransport`] (async-openai's `middleware` hook), which sends each request exactly
//! once and turns a non-2xx answer into an [`UpstreamStatus`] error that keeps `Retry-After`.
//! Retries, the deadline and the fallback are then decided by [`RetryPolicy`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::{OpenAIError, WrappedError};
use async_openai::middleware::HttpRequestFactory;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    ChatCompletionResponseStream, ChatCompletionStreamOptions, CompletionUsage,
    CreateChatCompletionRequest, CreateChatCompletionResponse, CreateChatCompletionStreamResponse,
    FinishReason, StopConfiguration,
};
use futures::StreamExt;
use futures::future::BoxFuture;

use super::registry::{ModelInfo, ModelRegistry, RegistryError, cost_usd};
use super::retry::{RetryDecision, RetryPolicy, retry_after_from_headers};
use super::{
    ChatMessage, Completion, CompletionRequest, CompletionStream, LlmClient, Role, StreamEvent,
    Usage, resolve_model,
};
use crate::config::{Config, LlmSettings, Secret};
use crate::error::ApiError;
use crate::telemetry::{MetricEvent, Unit};

/// The dependency name in 503s and logs.
const DEPENDENCY: &str = "LLM";

/// Upstream error bodies are kept for logs only, and only this much of them.
const MAX_DETAIL_CHARS: usize = 500;

/// Why the client could not be built at cold start.
#[derive(Debug, thiserror::Error)]
pub enum ClientInitError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// async-openai would panic on every request building the `Authorization` header.
    #[error("OPENAI_API_KEY contains characters that are not allowed in an HTTP header")]
    InvalidApiKey,
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),
    #[error(transparent)]
    TrustRoots(#[from] crate::tls::NoTrustRoots),
}

/// The OpenAI-compatible [`LlmClient`]. Build it once per cold start and share it.
pub struct OpenAiClient {
    /// `None` when no API key is configured: every call is a 503.
    upstream: Option<Client<OpenAIConfig>>,
    registry: ModelRegistry,
    timeout: Duration,
    policy: RetryPolicy,
    log_prompts: bool,
}

impl std::fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("configured", &self.upstream.is_some())
            .field("models", &self.registry.models().len())
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl OpenAiClient {
    /// The client the configuration describes, its registry loaded and validated.
    pub fn from_config(config: &Config) -> Result<Self, ClientInitError> {
        let registry = ModelRegistry::load(&config.llm)?;
        Ok(Self::new(&config.llm, registry)?.with_log_prompts(config.log_prompts))
    }

    pub fn new(settings: &LlmSettings, registry: ModelRegistry) -> Result<Self, ClientInitError> {
        let upstream = match &settings.api_key {
            Some(key) => Some(upstream_client(&settings.base_url, key)?),
            None => None,
        };
        Ok(Self {
            upstream,
            registry,
            timeout: settings.timeout,
            policy: RetryPolicy::default(),
            log_prompts: false,
        })
    }

    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Logs the prompt of every call (`LOG_PROMPTS`): for local debugging only.
    pub fn with_log_prompts(mut self, log_prompts: bool) -> Self {
        self.log_prompts = log_prompts;
        self
    }

    fn upstream(&self) -> Result<&Client<OpenAIConfig>, ApiError> {
        self.upstream.as_ref().ok_or_else(|| ApiError::Unavailable {
            dependency: DEPENDENCY,
            detail: "no model provider configured (OPENAI_API_KEY is not set)".to_owned(),
        })
    }

    fn log_prompt(&self, call: &'static str, req: &CompletionRequest) {
        if self.log_prompts {
            tracing::info!(target: "llm_prompt", call, model = %req.model, messages = ?req.messages, "LLM prompt");
        }
    }

    /// Runs `attempt` on `primary` with retries, then once on its fallback. Each attempt is
    /// bounded by the per-call timeout, shortened to fit the deadline.
    async fn run<'a, T, F>(
        &'a self,
        primary: &'a ModelInfo,
        deadline: Option<Instant>,
        mut attempt: F,
    ) -> Attempted<'a, T>
    where
        F: FnMut(&'a ModelInfo) -> BoxFuture<'a, Result<T, Failure>>,
    {
        let mut tally = Tally::default();
        let mut last_error = None;
        while let Some(budget) = self
            .policy
            .attempt_budget(self.timeout, Instant::now(), deadline)
        {
            tally.attempts += 1;
            let failure = match within(budget, attempt(primary)).await {
                Ok(value) => return tally.finish(Ok(value), primary, false),
                Err(failure) => failure,
            };
            if !failure.retryable {
                log_attempt_failure(&primary.id, tally.attempts, &failure, "not_retryable");
                return tally.finish(Err(failure.error), primary, false);
            }
            let decision = self.policy.after_failure(
                tally.attempts,
                failure.retry_after,
                rand::random::<f64>(),
                Instant::now(),
                deadline,
            );
            match decision {
                RetryDecision::RetryAfter(delay) => {
                    log_attempt_failure(&primary.id, tally.attempts, &failure, "retrying");
                    tally.retries += 1;
                    last_error = Some(failure.error);
                    tokio::time::sleep(delay).await;
                }
                RetryDecision::GiveUp(reason) => {
                    log_attempt_failure(&primary.id, tally.attempts, &failure, reason.as_str());
                    last_error = Some(failure.error);
                    break;
                }
            }
        }
        // Transient failures all the way (or no time left to start): one try elsewhere.
        if let Some(fallback) = self.registry.fallback_for(primary)
            && let Some(budget) = self
                .policy
                .attempt_budget(self.timeout, Instant::now(), deadline)
        {
            tally.attempts += 1;
            let result = within(budget, attempt(fallback)).await.map_err(|failure| {
                log_attempt_failure(&fallback.id, tally.attempts, &failure, "fallback_failed");
                failure.error
            });
            return tally.finish(result, fallback, true);
        }
        let error = last_error.unwrap_or(ApiError::UpstreamTimeout);
        tally.finish(Err(error), primary, false)
    }
}

#[async_trait::async_trait]
impl LlmClient for OpenAiClient {
    async fn complete(
        &self,
        req: &CompletionRequest,
        deadline: Option<Instant>,
    ) -> Result<Completion, ApiError> {
        let upstream = self.upstream()?;
        let primary = resolve_model(&self.registry, &req.model)?;
        self.log_prompt("complete", req);
        let started = Instant::now();
        let outcome = self
            .run(primary, deadline, |model| {
                let body = chat_request(req, model, false);
                Box::pin(async move {
                    let response = upstream.chat().create(body).await.map_err(classify)?;
                    Answer::from_response(response)
                })
            })
            .await;
        let report = CallReport {
            call: "complete",
            model: outcome.model.id.clone(),
            attempts: outcome.attempts,
            retries: outcome.retries,
            fell_back: outcome.fell_back,
            started,
            ttft: None,
        };
        match outcome.result {
            Ok(answer) => {
                let usage = answer
                    .usage
                    .unwrap_or_else(|| estimate_usage(req, &answer.content));
                let cost = cost_usd(outcome.model, &usage);
                report.succeeded(&usage, cost);
                Ok(Completion {
                    content: answer.content,
                    model: outcome.model.id.clone(),
                    usage,
                    finish_reason: answer.finish_reason,
                    attempts: outcome.attempts,
                    fell_back: outcome.fell_back,
                    cost_usd: cost,
                })
            }
            Err(error) => {
                report.failed(&error, false);
                Err(error)
            }
        }
    }

    async fn stream(
        &self,
        req: &CompletionRequest,
        deadline: Option<Instant>,
    ) -> Result<CompletionStream, ApiError> {
        let upstream = self.upstream()?;
        let primary = resolve_model(&self.registry, &req.model)?;
        self.log_prompt("stream", req);
        let started = Instant::now();
        let outcome = self
            .run(primary, deadline, |model| {
                let body = chat_request(req, model, true);
                Box::pin(async move {
                    let chunks = upstream
                        .chat()
                        .create_stream(body)
                        .await
                        .map_err(classify)?;
                    OpenedStream::until_first_delta(chunks).await
                })
            })
            .await;
        let report = CallReport {
            call: "stream",
            model: outcome.model.id.clone(),
            attempts: outcome.attempts,
            retries: outcome.retries,
            fell_back: outcome.fell_back,
            started,
            ttft: Some(started.elapsed()),
        };
        match outcome.result {
            Ok(opened) => {
                let delivery = Delivery {
                    chunks: (!opened.ended).then_some(opened.chunks),
                    assembly: opened.assembly,
                    pending: opened.first,
                    model: outcome.model.clone(),
                    prompt_estimate: req.estimated_prompt_tokens(),
                    gap_timeout: self.timeout,
                    deadline: deadline.and_then(|d| d.checked_sub(self.policy.deadline_margin)),
                    report,
                    finished: false,
                };
                // Fused: polling again after the end must yield `None`, not unfold's panic.
                Ok(futures::stream::unfold(delivery, Delivery::next_item)
                    .fuse()
                    .boxed())
            }
            Err(error) => {
                report.failed(&error, false);
                Err(error)
            }
        }
    }

    async fn ping(&self) -> Result<(), ApiError> {
        let upstream = self.upstream()?;
        match tokio::time::timeout(self.timeout, upstream.models().list()).await {
            Err(_) => Err(ApiError::UpstreamTimeout),
            Ok(Ok(_)) => Ok(()),
            // A 2xx listing in a shape other than OpenAI's still proves the provider is up and
            // accepts the key, which is all a health check asks.
            Ok(Err(OpenAIError::JSONDeserialize(..))) => Ok(()),
            Ok(Err(err)) => Err(classify(err).error),
        }
    }

    fn registry(&self) -> &ModelRegistry {
        &self.registry
    }
}

// --- transport -------------------------------------------------------------------------------

fn upstream_client(base_url: &str, key: &Secret) -> Result<Client<OpenAIConfig>, ClientInitError> {
    if http::HeaderValue::from_str(&format!("Bearer {}", key.expose())).is_err() {
        return Err(ClientInitError::InvalidApiKey);
    }
    // The process's trust roots (crate::tls), not reqwest's own load of the system store.
    let roots = crate::tls::roots()?
        .reqwest_certificates()
        .map_err(ClientInitError::HttpClient)?;
    let http = reqwest::Client::builder()
        .tls_certs_only(roots)
        .build()
        .map_err(ClientInitError::HttpClient)?;
    // Organisation and project come from our typed Config only (it has none): async-openai
    // would otherwise read OPENAI_ORG_ID / OPENAI_PROJECT_ID behind the Config's back.
    let config = OpenAIConfig::new()
        .with_api_base(base_url.trim_end_matches('/'))
        .with_api_key(key.expose())
        .with_org_id("")
        .with_project_id("");
    Ok(Client::build(http.clone(), config).with_http_service(UpstreamTransport { http }))
}

/// Sends each request once; a non-2xx answer becomes an [`UpstreamStatus`] error.
#[derive(Clone)]
struct UpstreamTransport {
    http: reqwest::Client,
}

impl tower::Service<HttpRequestFactory> for UpstreamTransport {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = Pin<Box<dyn Future<Output = Result<reqwest::Response, OpenAIError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), OpenAIError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, factory: HttpRequestFactory) -> Self::Future {
        let http = self.http.clone();
        Box::pin(async move {
            let request = factory.build().await?;
            let response = http.execute(request).await?;
            if response.status().is_success() {
                Ok(response)
            } else {
                Err(OpenAIError::Boxed(Box::new(
                    UpstreamStatus::read(response).await,
                )))
            }
        })
    }
}

/// A non-2xx upstream answer, with what async-openai's own error type leaves out.
#[derive(Debug, thiserror::Error)]
#[error("upstream answered {status}: {message}")]
struct UpstreamStatus {
    status: u16,
    retry_after: Option<Duration>,
    /// OpenAI's `error.code`, e.g. `context_length_exceeded`.
    code: Option<String>,
    /// OpenAI's `error.type`, e.g. `insufficient_quota`.
    kind: Option<String>,
    message: String,
}

impl UpstreamStatus {
    async fn read(response: reqwest::Response) -> Self {
        let status = response.status().as_u16();
        let retry_after = retry_after_from_headers(response.headers());
        let (code, kind, message) = match response.bytes().await {
            Err(err) => (None, None, format!("(body unreadable: {err})")),
            Ok(body) => match serde_json::from_slice::<WrappedError>(&body) {
                Ok(wrapped) => (
                    wrapped.error.code,
                    wrapped.error.r#type,
                    wrapped.error.message,
                ),
                Err(_) => (None, None, String::from_utf8_lossy(&body).into_owned()),
            },
        };
        Self {
            status,
            retry_after,
            code,
            kind,
            message: truncate(&message),
        }
    }
}

fn truncate(text: &str) -> String {
    text.chars().take(MAX_DETAIL_CHARS).collect()
}

// --- error classification --------------------------------------------------------------------

/// One failed attempt, classified.
#[derive(Debug)]
struct Failure {
    error: ApiError,
    /// Transient: another attempt (or model) may succeed.
    retryable: bool,
    retry_after: Option<Duration>,
}

impl Failure {
    fn transient(error: ApiError, retry_after: Option<Duration>) -> Self {
        Self {
            error,
            retryable: true,
            retry_after,
        }
    }

    fn permanent(error: ApiError) -> Self {
        Self {
            error,
            retryable: false,
            retry_after: None,
        }
    }
}

fn classify(err: OpenAIError) -> Failure {
    match err {
        OpenAIError::Boxed(boxed) => match boxed.downcast::<UpstreamStatus>() {
            Ok(status) => classify_status(*status),
            Err(other) => Failure::permanent(ApiError::UpstreamFailed {
                detail: other.to_string(),
            }),
        },
        // Only reachable if a non-2xx answer bypassed the transport; no headers then.
        OpenAIError::ApiError(response) => classify_status(UpstreamStatus {
            status: response.status_code.as_u16(),
            retry_after: None,
            code: response.api_error.code,
            kind: response.api_error.r#type,
            message: truncate(&response.api_error.message),
        }),
        OpenAIError::Reqwest(err) if err.is_timeout() => {
            Failure::transient(ApiError::UpstreamTimeout, None)
        }
        OpenAIError::Reqwest(err) if err.is_builder() => Failure::permanent(ApiError::internal(
            format!("cannot build the upstream request: {err}"),
        )),
        // Connection refused or reset, TLS, a body cut off: the next attempt may get through.
        OpenAIError::Reqwest(err) => Failure::transient(
            ApiError::UpstreamFailed {
                detail: format!("upstream connection failed: {err}"),
            },
            None,
        ),
        // The content may hold completion text: only the parser's message is kept.
        OpenAIError::JSONDeserialize(err, _content) => {
            Failure::permanent(ApiError::UpstreamFailed {
                detail: format!("malformed upstream response: {err}"),
            })
        }
        OpenAIError::StreamError(err) => Failure::transient(
            ApiError::UpstreamFailed {
                detail: format!("upstream stream failed: {err}"),
            },
            None,
        ),
        OpenAIError::InvalidArgument(message)
        | OpenAIError::FileSaveError(message)
        | OpenAIError::FileReadError(message) => Failure::permanent(ApiError::internal(message)),
    }
}

fn classify_status(status: UpstreamStatus) -> Failure {
    let is =
        |name: &str| status.code.as_deref() == Some(name) || status.kind.as_deref() == Some(name);
    match status.status {
        // A 429 for an exhausted balance will not pass with time.
        429 if is("insufficient_quota") => Failure::permanent(ApiError::Unavailable {
            dependency: DEPENDENCY,
            detail: format!("provider quota exhausted: {}", status.message),
        }),
        429 => Failure::transient(
            ApiError::UpstreamRateLimited {
                retry_after_secs: status.retry_after.map(ceil_secs),
            },
            status.retry_after,
        ),
        408 => Failure::transient(ApiError::UpstreamTimeout, status.retry_after),
        500..=599 => Failure::transient(
            ApiError::UpstreamFailed {
                detail: format!("upstream {}: {}", status.status, status.message),
            },
            status.retry_after,
        ),
        400 if is("context_length_exceeded") => Failure::permanent(ApiError::BadRequest {
            code: "context_length_exceeded",
            message: "the conversation is longer than the model's context window".to_owned(),
            param: Some("messages".to_owned()),
        }),
        code => {
            // We sent something the provider refused (or our key is wrong): our bug, not the
            // caller's, hence 502 and an error log rather than passing the 4xx through.
            tracing::error!(
                status = code,
                upstream_code = status.code.as_deref().unwrap_or("-"),
                message = %status.message,
                "LLM provider rejected our request"
            );
            Failure::permanent(ApiError::UpstreamFailed {
                detail: format!(
                    "upstream rejected the request with {code}: {}",
                    status.message
                ),
            })
        }
    }
}

fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// `future`, or a transient `UpstreamTimeout` once `budget` has passed.
async fn within<T>(
    budget: Duration,
    future: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    tokio::time::timeout(budget, future)
        .await
        .unwrap_or_else(|_| Err(Failure::transient(ApiError::UpstreamTimeout, None)))
}

fn log_attempt_failure(model: &str, attempt: u32, failure: &Failure, next: &str) {
    tracing::warn!(
        model,
        attempt,
        code = failure.error.code(),
        retry_after_ms = failure.retry_after.map(|d| d.as_millis() as u64),
        next,
        detail = %failure_detail(&failure.error),
        "LLM upstream attempt failed"
    );
}

fn failure_detail(error: &ApiError) -> String {
    match error {
        ApiError::UpstreamFailed { detail }
        | ApiError::Unavailable { detail, .. }
        | ApiError::Internal { detail } => detail.clone(),
        other => other.to_string(),
    }
}

// --- requests and answers --------------------------------------------------------------------

// `seed` is marked deprecated by async-openai (OpenAI calls it beta) but is still honoured, and
// is what makes a batch run reproducible.
#[allow(deprecated)]
fn chat_request(
    req: &CompletionRequest,
    model: &ModelInfo,
    stream: bool,
) -> CreateChatCompletionRequest {
    CreateChatCompletionRequest {
        model: model.id.clone(),
        messages: req.messages.iter().map(upstream_message).collect(),
        temperature: Some(req.temperature),
        top_p: req.top_p,
        max_completion_tokens: (req.max_tokens > 0)
            .then(|| req.max_tokens.min(model.max_output_tokens)),
        stop: req
            .stop
            .clone()
            .filter(|stop| !stop.is_empty())
            .map(StopConfiguration::StringArray),
        seed: req.seed,
        // OpenAI replaced the deprecated `user` with `safety_identifier` for abuse monitoring.
        safety_identifier: req.user.clone(),
        stream: stream.then_some(true),
        // Without it the provider reports no usage for a stream, and we would have to estimate.
        stream_options: stream.then(|| ChatCompletionStreamOptions {
            include_usage: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn upstream_message(message: &ChatMessage) -> ChatCompletionRequestMessage {
    let content = message.content.as_str();
    match message.role {
        Role::System => ChatCompletionRequestSystemMessage::from(content).into(),
        Role::User => ChatCompletionRequestUserMessage::from(content).into(),
        Role::Assistant => ChatCompletionRequestAssistantMessage::from(content).into(),
    }
}

fn finish_reason_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::FunctionCall => "function_call",
    }
}

fn reported_usage(usage: &CompletionUsage) -> Usage {
    Usage::reported(
        u64::from(usage.prompt_tokens),
        u64::from(usage.completion_tokens),
    )
}

fn estimate_usage(req: &CompletionRequest, completion: &str) -> Usage {
    Usage::estimated(
        req.estimated_prompt_tokens(),
        crate::tokens::estimate_tokens(completion),
    )
}

/// The useful part of a non-streamed answer.
struct Answer {
    content: String,
    finish_reason: String,
    usage: Option<Usage>,
}

impl Answer {
    fn from_response(response: CreateChatCompletionResponse) -> Result<Self, Failure> {
        let usage = response.usage.as_ref().map(reported_usage);
        let Some(choice) = response.choices.into_iter().next() else {
            return Err(Failure::permanent(ApiError::UpstreamFailed {
                detail: "upstream answer has no choices".to_owned(),
            }));
        };
        Ok(Self {
            content: choice.message.content.unwrap_or_default(),
            finish_reason: choice
                .finish_reason
                .map_or("unknown", finish_reason_name)
                .to_owned(),
            usage,
        })
    }
}

// --- streaming -------------------------------------------------------------------------------

/// What a stream has said so far: its text (for the usage estimate), finish reason and usage.
#[derive(Debug, Default)]
pub(crate) struct StreamAssembly {
    text: String,
    finish_reason: Option<&'static str>,
    usage: Option<Usage>,
}

impl StreamAssembly {
    /// Folds one chunk in and returns its text, if it has any.
    pub(crate) fn push(&mut self, chunk: CreateChatCompletionStreamResponse) -> Option<String> {
        if let Some(usage) = &chunk.usage {
            self.usage = Some(reported_usage(usage));
        }
        let mut text = String::new();
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(finish_reason_name(reason));
            }
            if let Some(content) = choice.delta.content {
                text.push_str(&content);
            }
        }
        if text.is_empty() {
            return None;
        }
        self.text.push_str(&text);
        Some(text)
    }

    /// The stream's outcome once the upstream has ended it: the reported usage, or an estimate
    /// from `prompt_estimate` and the text seen. A stream that ends without a finish reason was
    /// cut off, even if the connection closed cleanly.
    pub(crate) fn finish(&self, prompt_estimate: u64) -> Result<(Usage, &'static str), ApiError> {
        let reason = self.finish_reason.ok_or_else(|| ApiError::UpstreamFailed {
            detail: "upstream stream ended without a finish reason".to_owned(),
        })?;
        let usage = self.usage.unwrap_or_else(|| {
            Usage::estimated(prompt_estimate, crate::tokens::estimate_tokens(&self.text))
        });
        Ok((usage, reason))
    }
}

/// An upstream stream read up to its first text delta.
struct OpenedStream {
    chunks: ChatCompletionResponseStream,
    assembly: StreamAssembly,
    first: Option<String>,
    /// The upstream finished before producing any text.
    ended: bool,
}

impl OpenedStream {
    async fn until_first_delta(mut chunks: ChatCompletionResponseStream) -> Result<Self, Failure> {
        let mut assembly = StreamAssembly::default();
        loop {
            match chunks.next().await {
                Some(Ok(chunk)) => {
                    if let Some(first) = assembly.push(chunk) {
                        return Ok(Self {
                            chunks,
                            assembly,
                            first: Some(first),
                            ended: false,
                        });
                    }
                }
                Some(Err(err)) => return Err(classify(err)),
                None => {
                    // Ending without a finish reason is a cut: transient, worth a retry.
                    assembly
                        .finish(0)
                        .map_err(|error| Failure::transient(error, None))?;
                    return Ok(Self {
                        chunks,
                        assembly,
                        first: None,
                        ended: true,
                    });
                }
            }
        }
    }
}

/// The state behind a returned [`CompletionStream`].
struct Delivery {
    /// `None` once the upstream has ended (or failed): the connection is released at once.
    chunks: Option<ChatCompletionResponseStream>,
    assembly: StreamAssembly,
    pending: Option<String>,
    model: ModelInfo,
    prompt_estimate: u64,
    gap_timeout: Duration,
    /// The deadline minus the safety margin.
    deadline: Option<Instant>,
    report: CallReport,
    finished: bool,
}

impl Delivery {
    async fn next_item(mut self) -> Option<(Result<StreamEvent, ApiError>, Self)> {
        if self.finished {
            return None;
        }
        if let Some(first) = self.pending.take() {
            return Some((Ok(StreamEvent::Delta(first)), self));
        }
        loop {
            let Some(chunks) = self.chunks.as_mut() else {
                let item = self.done();
                return Some((item, self));
            };
            let wait = match self.deadline {
                Some(deadline) => self
                    .gap_timeout
                    .min(deadline.saturating_duration_since(Instant::now())),
                None => self.gap_timeout,
            };
            match tokio::time::timeout(wait, chunks.next()).await {
                Ok(Some(Ok(chunk))) => {
                    if let Some(text) = self.assembly.push(chunk) {
                        return Some((Ok(StreamEvent::Delta(text)), self));
                    }
                }
                Ok(None) => self.chunks = None,
                Ok(Some(Err(err))) => {
                    let error = classify(err).error;
                    return Some((Err(self.fail(error)), self));
                }
                Err(_) => {
                    let error = self.fail(ApiError::UpstreamTimeout);
                    return Some((Err(error), self));
                }
            }
        }
    }

    fn done(&mut self) -> Result<StreamEvent, ApiError> {
        match self.assembly.finish(self.prompt_estimate) {
            Ok((usage, reason)) => {
                self.finished = true;
                let cost = cost_usd(&self.model, &usage);
                self.report.succeeded(&usage, cost);
                Ok(StreamEvent::Done {
                    model: self.model.id.clone(),
                    usage,
                    finish_reason: reason.to_owned(),
                    cost_usd: cost,
                })
            }
            Err(error) => Err(self.fail(error)),
        }
    }

    fn fail(&mut self, error: ApiError) -> ApiError {
        self.finished = true;
        self.chunks = None;
        self.report.failed(&error, true);
        error
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if !self.finished {
            tracing::info!(
                model = %self.model.id,
                latency_ms = self.report.started.elapsed().as_millis() as u64,
                "LLM stream dropped by the consumer before its end"
            );
        }
    }
}

// --- retries bookkeeping, logs and metrics ---------------------------------------------------

#[derive(Debug, Default)]
struct Tally {
    attempts: u32,
    retries: u32,
}

impl Tally {
    fn finish<'a, T>(
        self,
        result: Result<T, ApiError>,
        model: &'a ModelInfo,
        fell_back: bool,
    ) -> Attempted<'a, T> {
        Attempted {
            result,
            model,
            attempts: self.attempts,
            retries: self.retries,
            fell_back,
        }
    }
}

/// The outcome of [`OpenAiClient::run`].
struct Attempted<'a, T> {
    result: Result<T, ApiError>,
    /// The model of the last attempt.
    model: &'a ModelInfo,
    attempts: u32,
    retries: u32,
    fell_back: bool,
}

/// One log line and one EMF record per logical call. Never the prompt or the completion text.
#[derive(Debug)]
struct CallReport {
    call: &'static str,
    model: String,
    attempts: u32,
    retries: u32,
    fell_back: bool,
    started: Instant,
    /// Streams only: time to the first text delta, retries included.
    ttft: Option<Duration>,
}

impl CallReport {
    fn succeeded(&self, usage: &Usage, cost: f64) {
        let latency_ms = millis(self.started.elapsed());
        tracing::info!(
            call = self.call,
            model = %self.model,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            usage_estimated = usage.estimated,
            latency_ms,
            ttft_ms = self.ttft.map(millis),
            attempts = self.attempts,
            cost_usd = cost,
            fell_back = self.fell_back,
            "LLM call"
        );
        self.metrics(
            "ok",
            usage,
            cost,
            latency_ms,
            self.attempts.saturating_sub(1),
        )
        .emit();
    }

    fn failed(&self, error: &ApiError, after_first_delta: bool) {
        let latency_ms = millis(self.started.elapsed());
        tracing::warn!(
            call = self.call,
            model = %self.model,
            code = error.code(),
            status = error.status().as_u16(),
            after_first_delta,
            latency_ms,
            attempts = self.attempts,
            fell_back = self.fell_back,
            detail = %failure_detail(error),
            "LLM call failed"
        );
        self.metrics(
            error.code(),
            &Usage::default(),
            0.0,
            latency_ms,
            self.attempts,
        )
        .metric("LlmFailures", 1.0, Unit::Count)
        .emit();
    }

    fn metrics(
        &self,
        outcome: &str,
        usage: &Usage,
        cost: f64,
        latency_ms: f64,
        upstream_errors: u32,
    ) -> MetricEvent {
        let mut event = MetricEvent::new()
            .dimension("model", self.model.clone())
            .metric("LlmCalls", 1.0, Unit::Count)
            .metric("LlmTokensIn", usage.prompt_tokens as f64, Unit::Count)
            .metric("LlmTokensOut", usage.completion_tokens as f64, Unit::Count)
            .metric("LlmCostUsd", cost, Unit::None)
            .metric("LlmLatency", latency_ms, Unit::Milliseconds)
            .metric("LlmUpstreamErrors", f64::from(upstream_errors), Unit::Count)
            .metric("LlmRetries", f64::from(self.retries), Unit::Count)
            .metric(
                "LlmFallbacks",
                f64::from(u8::from(self.fell_back)),
                Unit::Count,
            )
            .property("call", self.call)
            .property("outcome", outcome.to_owned())
            .property("attempts", self.attempts)
            .property("usage_estimated", usage.estimated);
        if let Some(id) = crate::http::current_request_id() {
            event = event.property("request_id", id);
        }
        event
    }
}

fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1000.0 * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use serde_json::json;

    fn chunk(value: serde_json::Value) -> CreateChatCompletionStreamResponse {
        let mut base = json!({
            "id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": []
        });
        if let (Some(base), Some(extra)) = (base.as_object_mut(), value.as_object()) {
            for (k, v) in extra {
                base.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(base).unwrap()
    }

    fn delta(text: &str) -> CreateChatCompletionStreamResponse {
        chunk(json!({"choices": [{"index": 0, "delta": {"content": text}}]}))
    }

    fn finish(reason: &str) -> CreateChatCompletionStreamResponse {
        chunk(json!({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]}))
    }

    #[test]
    fn assembly_yields_text_only_and_uses_reported_usage() {
        let mut a = StreamAssembly::default();
        assert_eq!(
            a.push(chunk(
                json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            )),
            None
        );
        assert_eq!(a.push(delta("Hello")).as_deref(), Some("Hello"));
        assert_eq!(a.push(delta(" world")).as_deref(), Some(" world"));
        assert_eq!(a.push(finish("length")), None);
        assert_eq!(
            a.push(chunk(
                json!({"usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}})
            )),
            None
        );
        let (usage, reason) = a.finish(1234).unwrap();
        assert_eq!(usage, Usage::reported(9, 2));
        assert_eq!(reason, "length");
    }

    #[test]
    fn assembly_estimates_usage_when_the_provider_reports_none() {
        let mut a = StreamAssembly::default();
        a.push(delta("abcdefgh"));
        a.push(delta("你好"));
        a.push(finish("stop"));
        let (usage, reason) = a.finish(17).unwrap();
        assert_eq!(reason, "stop");
        // 8 ASCII characters = 2 tokens, plus one per CJK character.
        assert_eq!(usage, Usage::estimated(17, 4));
        assert!(usage.estimated);
        assert_eq!(usage.total_tokens, 21);
    }

    #[test]
    fn assembly_without_finish_reason_is_a_cut_stream() {
        let mut a = StreamAssembly::default();
        a.push(delta("partial"));
        let err = a.finish(1).unwrap_err();
        assert!(matches!(err, ApiError::UpstreamFailed { .. }), "{err:?}");
    }

    #[test]
    fn request_clamps_max_tokens_and_asks_for_stream_usage() {
        let registry = ModelRegistry::builtin().unwrap();
        let mini = registry.resolve("gpt-4o-mini").unwrap();
        let mut req = CompletionRequest::new(
            "gpt-4o-mini",
            vec![ChatMessage::system("be brief"), ChatMessage::user("hi")],
        );
        req.max_tokens = 1_000_000;
        req.stop = Some(vec![]);
        let body = serde_json::to_value(chat_request(&req, mini, true)).unwrap();
        assert_eq!(body["model"], "gpt-4o-mini");
        assert_eq!(body["max_completion_tokens"], 16384);
        assert_eq!(body["stream"], true);
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][1]["content"], "hi");
        assert!(body.get("stop").is_none());
        req.max_tokens = 0;
        let body = serde_json::to_value(chat_request(&req, mini, false)).unwrap();
        assert!(body.get("max_completion_tokens").is_none());
        assert!(body.get("stream_options").is_none());
    }

    fn status(status: u16, code: Option<&str>, retry_after: Option<u64>) -> Failure {
        classify_status(UpstreamStatus {
            status,
            retry_after: retry_after.map(Duration::from_millis),
            code: code.map(str::to_owned),
            kind: None,
            message: "m".into(),
        })
    }

    #[test]
    fn classifies_upstream_statuses() {
        let f = status(429, None, Some(1500));
        assert!(f.retryable);
        assert!(matches!(
            f.error,
            ApiError::UpstreamRateLimited {
                retry_after_secs: Some(2)
            }
        ));
        let f = status(429, Some("insufficient_quota"), None);
        assert!(!f.retryable);
        assert_eq!(f.error.status().as_u16(), 503);
        for code in [500, 502, 503, 504] {
            let f = status(code, None, None);
            assert!(f.retryable, "{code}");
            assert_eq!(f.error.status().as_u16(), 502, "{code}");
        }
        let f = status(400, Some("context_length_exceeded"), None);
        assert!(!f.retryable);
        assert_eq!(f.error.code(), "context_length_exceeded");
        assert_eq!(f.error.status().as_u16(), 400);
        for code in [400, 401, 404, 422] {
            let f = status(code, None, None);
            assert!(!f.retryable, "{code}");
            assert_eq!(f.error.status().as_u16(), 502, "{code}");
        }
        assert!(status(408, None, None).retryable);
    }
}
