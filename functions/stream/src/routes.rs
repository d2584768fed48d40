//! `POST /chat/stream` and the OpenAI-compatible `POST /v1/chat/completions`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{Extensions, HeaderMap, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use shared::auth::Principal;
use shared::cache::bypass_requested;
use shared::chat::{Admission, ChatRequest, ChatService, Gate, PendingTurn, TurnStart};
use shared::error::{ApiError, ErrorEnvelope};
use shared::http::{ApiJson, current_request_id, deadline, set_cache_header};
use shared::llm::{Completion, CompletionRequest, LlmClient};
use shared::openai_compat::{OpenAiChatRequest, OpenAiChatResponse, completion_id};
use shared::ratelimit::LimitStatus;
use shared::services::Services;
use tokio::sync::mpsc;

use crate::formats::{ChatFormat, ChatStreamEvent, OpenAiFormat, SseEvent, replay_pieces};
use crate::pump::{self, Finish, Format, Upstream, done_event};

/// Events buffered between the pump and the response body: small, so a slow client applies
/// back-pressure to the upstream read instead of growing memory.
const CHANNEL_EVENTS: usize = 16;

/// Starts the upstream call. If it answers within `heartbeat`, failures are still ordinary HTTP
/// errors; if not, the response starts and the pump sends `: ping` comments while it waits.
async fn start_upstream(
    llm: Arc<dyn LlmClient>,
    request: CompletionRequest,
    deadline: Option<Instant>,
    heartbeat: Duration,
) -> Result<Upstream, ApiError> {
    let mut call: BoxFuture<'static, _> =
        Box::pin(async move { llm.stream(&request, deadline).await });
    match tokio::time::timeout(heartbeat, &mut call).await {
        Ok(Ok(stream)) => Ok(Upstream::Ready(stream)),
        Ok(Err(err)) => Err(err),
        Err(_) => Ok(Upstream::Pending(call)),
    }
}

fn sse_response(
    events: impl futures::Stream<Item = Result<Event, Infallible>> + Send + 'static,
    limit: LimitStatus,
    cache_hit: bool,
) -> Response {
    let mut response = Sse::new(events).into_response();
    let headers = response.headers_mut();
    // Tells nginx-style proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    set_cache_header(headers, cache_hit);
    limit.apply(headers);
    response
}

fn channel_stream(
    mut rx: mpsc::Receiver<Result<Event, Infallible>>,
) -> impl futures::Stream<Item = Result<Event, Infallible>> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Starts the upstream call for an admitted request and answers with the events of a pump
/// running in its own task. If the upstream fails before the answer has started, the admission
/// is released ([`Finish::abandon`]) and the failure is the answer.
async fn stream_admitted(
    services: &Services,
    request: CompletionRequest,
    deadline: Option<Instant>,
    limit: LimitStatus,
    format: impl Format,
    finish: Box<dyn Finish>,
) -> Result<Response, ApiError> {
    let estimate = request.estimated_prompt_tokens();
    let heartbeat = services.config.stream_heartbeat;
    match start_upstream(services.chat.llm.clone(), request, deadline, heartbeat).await {
        Ok(upstream) => {
            let (tx, rx) = mpsc::channel(CHANNEL_EVENTS);
            tokio::spawn(pump::run(upstream, format, finish, estimate, heartbeat, tx));
            Ok(sse_response(channel_stream(rx), limit, false))
        }
        Err(err) => {
            finish.abandon().await;
            Err(err)
        }
    }
}

/// A cached answer replayed in `format`: the start events, the answer in pieces, `closing`,
/// then `[DONE]`.
fn replay(format: &impl Format, answer: &str, closing: Vec<Event>, limit: LimitStatus) -> Response {
    let mut events = format.start();
    events.extend(replay_pieces(answer).iter().map(|p| format.delta(p)));
    events.extend(closing);
    events.push(done_event());
    sse_response(
        futures::stream::iter(events.into_iter().map(Ok)),
        limit,
        true,
    )
}

struct TurnFinish {
    chat: ChatService,
    principal: Principal,
    pending: PendingTurn,
}

impl Finish for TurnFinish {
    fn complete(
        self: Box<Self>,
        completion: Completion,
    ) -> BoxFuture<'static, Result<(), ApiError>> {
        Box::pin(async move {
            self.chat
                .finish_turn(&self.principal, self.pending, completion)
                .await
                .map(|_| ())
        })
    }

    fn abort(self: Box<Self>, used: u64) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.chat.settle_partial(self.pending.admission, used).await })
    }

    fn abandon(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.chat.abandon(self.pending.admission).await })
    }
}

struct CompletionFinish {
    chat: ChatService,
    admission: Admission,
}

impl Finish for CompletionFinish {
    fn complete(
        self: Box<Self>,
        completion: Completion,
    ) -> BoxFuture<'static, Result<(), ApiError>> {
        Box::pin(async move { self.chat.settle(self.admission, &completion).await })
    }

    fn abort(self: Box<Self>, used: u64) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.chat.settle_partial(self.admission, used).await })
    }

    fn abandon(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.chat.abandon(self.admission).await })
    }
}

/// One chat turn with conversation memory, streamed as Server-Sent Events.
///
/// Events (`data: <json>`): `start`, then `delta`s as the model produces them, then `done`
/// (usage, cost, finish reason) once the turn is stored, or `error` if the upstream fails after
/// the stream began; always followed by `data: [DONE]`. While waiting for the first token the
/// stream may carry `: ping` comments. Errors before the stream starts are ordinary HTTP errors.
#[utoipa::path(
    post,
    path = "/chat/stream",
    tag = "stream",
    request_body = ChatRequest,
    security(("api_key" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "`text/event-stream`: each event's `data` is a ChatStreamEvent as JSON, the last one `[DONE]`",
         content_type = "text/event-stream", body = SseEvent),
        (status = 404, description = "Unknown conversation (or not yours)", body = ErrorEnvelope),
        (status = 422, description = "Validation failed", body = ErrorEnvelope),
        (status = 429, description = "Rate limited (ours or upstream)", body = ErrorEnvelope),
        (status = 502, description = "Upstream failed before the first token", body = ErrorEnvelope),
        (status = 503, description = "A dependency is unavailable", body = ErrorEnvelope),
        (status = 504, description = "Upstream timed out before the first token", body = ErrorEnvelope)
    )
)]
pub async fn chat_stream(
    State(services): State<Services>,
    principal: Principal,
    headers: HeaderMap,
    extensions: Extensions,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    let chat = request.validate(services.chat.llm.registry())?;
    let request_id = current_request_id();
    match services
        .chat
        .begin_turn(&principal, chat, !bypass_requested(&headers))
        .await?
    {
        TurnStart::Cached(answer, limit) => {
            let format = ChatFormat {
                conversation_id: answer.conversation_id,
                model: answer.model.clone(),
                request_id,
            };
            let done = Event::default().data(
                serde_json::to_string(&ChatStreamEvent::Done {
                    conversation_id: answer.conversation_id,
                    model: answer.model,
                    usage: answer.usage,
                    cost_estimate: 0.0,
                    finish_reason: "stop".to_owned(),
                    cached: true,
                })
                .unwrap_or_default(),
            );
            Ok(replay(&format, &answer.message, vec![done], limit))
        }
        TurnStart::Fresh(pending) => {
            let request = pending.request.clone();
            let limit = pending.admission.limit;
            let format = ChatFormat {
                conversation_id: pending.conversation_id,
                model: pending.request.model.clone(),
                request_id,
            };
            let finish = Box::new(TurnFinish {
                chat: services.chat.clone(),
                principal,
                pending,
            });
            let deadline = deadline(&extensions);
            stream_admitted(&services, request, deadline, limit, format, finish).await
        }
    }
}

/// OpenAI-compatible chat completion: `stream: true` streams `chat.completion.chunk` objects then
/// `data: [DONE]` (with a usage chunk when `stream_options.include_usage` is set); otherwise the
/// answer is one `chat.completion` JSON object.
#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = OpenAiChatRequest,
    security(("api_key" = []), ("bearer" = [])),
    responses(
        (status = 200, description = "With `stream: true` a `text/event-stream` whose events' `data` are `chat.completion.chunk` objects, then `[DONE]`; otherwise a `chat.completion` object",
         content(
             (OpenAiChatResponse = "application/json"),
             (SseEvent = "text/event-stream")
         )),
        (status = 400, description = "Malformed JSON", body = ErrorEnvelope),
        (status = 422, description = "Validation failed", body = ErrorEnvelope),
        (status = 429, description = "Rate limited (ours or upstream)", body = ErrorEnvelope),
        (status = 502, description = "Upstream failed before the first token", body = ErrorEnvelope),
        (status = 503, description = "A dependency is unavailable", body = ErrorEnvelope),
        (status = 504, description = "Upstream timed out before the first token", body = ErrorEnvelope)
    )
)]
pub async fn completions(
    State(services): State<Services>,
    principal: Principal,
    headers: HeaderMap,
    extensions: Extensions,
    ApiJson(request): ApiJson<OpenAiChatRequest>,
) -> Result<Response, ApiError> {
    let streaming = request.wants_stream();
    let include_usage = request.include_usage();
    let request = request.validate(services.chat.llm.registry())?;
    let use_cache = !bypass_requested(&headers);
    if !streaming {
        let (answer, limit) = services
            .chat
            .complete(&principal, &request, use_cache, deadline(&extensions))
            .await?;
        return Ok(OpenAiChatResponse::into_response(answer, limit));
    }
    let format = OpenAiFormat {
        id: completion_id(),
        created: shared::dynamo::now_epoch(),
        model: request.model.clone(),
        include_usage,
        request_id: current_request_id(),
    };
    match services.chat.gate(&principal, &request, use_cache).await? {
        Gate::Hit { cached, limit } => {
            let closing = format.closing(&cached.finish_reason, cached.usage);
            Ok(replay(&format, &cached.content, closing, limit))
        }
        Gate::Miss(admission) => {
            let limit = admission.limit;
            let finish = Box::new(CompletionFinish {
                chat: services.chat.clone(),
                admission,
            });
            let deadline = deadline(&extensions);
            stream_admitted(&services, request, deadline, limit, format, finish).await
        }
    }
}
