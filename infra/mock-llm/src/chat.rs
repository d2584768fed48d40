//! `POST /v1/chat/completions`: parse, merge options, decide the fault, then answer.

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{BoxError, Json};
use bytes::Bytes;
use futures::{StreamExt, stream};
use http_body::{Frame, SizeHint};
use serde_json::Value;

use crate::openai::{ApiError, ChatChunk, ChatCompletion, ChatRequest, ResponseMeta, Usage};
use crate::options::{Fault, MockOptions, header_option_name};
use crate::reply::Completion;
use crate::state::{InFlight, MockState, RecordedRequest};

/// Before cutting a body the server pauses at least this long, so the bytes already produced
/// are flushed to the socket instead of being discarded together with the aborted connection.
const MIN_CUT_PAUSE: Duration = Duration::from_millis(20);

pub async fn chat_completions(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let in_flight = state.enter(request_key(&headers, &body).as_deref());
    let mut response = answer(&state, &headers, &body).await;
    let stream = response
        .extensions_mut()
        .remove::<StreamedAnswer>()
        .map(|answer| StreamWatch {
            state: Arc::clone(&state),
            key: answer.key,
            ended: false,
        });
    response.map(|body| {
        Body::new(Tracked {
            body,
            in_flight,
            stream,
        })
    })
}

/// The `key` option of a request, read before it is answered so that the request counts as
/// in flight under its key from its first moment.
fn request_key(headers: &HeaderMap, body: &Bytes) -> Option<String> {
    let request = serde_json::from_slice::<ChatRequest>(body).ok()?;
    let turns = request.turns();
    MockOptions::from_sources(
        &request.model,
        mock_headers(headers),
        turns.iter().map(|turn| turn.text.as_str()),
    )
    .key
}

/// The answer to one request: everything the mock does except the in-flight bookkeeping.
async fn answer(state: &Arc<MockState>, headers: &HeaderMap, body: &Bytes) -> Response {
    let parsed = serde_json::from_slice::<Value>(body);
    state.record(recorded_request(headers, parsed.as_ref().ok(), body));
    if !has_bearer_token(headers) {
        return ApiError::MissingApiKey.into_response();
    }
    let request = match parsed {
        Err(err) => return ApiError::InvalidJson(err.to_string()).into_response(),
        Ok(value) => match serde_json::from_value::<ChatRequest>(value) {
            Ok(request) => request,
            Err(err) => return ApiError::InvalidRequest(err.to_string()).into_response(),
        },
    };
    let turns = request.turns();
    let options = MockOptions::from_sources(
        &request.model,
        mock_headers(headers),
        turns.iter().map(|turn| turn.text.as_str()),
    );
    let fault = options
        .fault
        .filter(|_| state.claim_fault(&options.fault_key(), options.times));
    let reply = Reply {
        meta: ResponseMeta {
            id: state.next_completion_id(),
            created: unix_now(),
            model: request.model.clone(),
        },
        completion: Completion::compose(&turns, options.tokens, request.token_limit()),
        stream: request.is_stream(),
        include_usage: request.include_usage(),
        options,
    };
    reply.send(fault).await
}

/// A response body that keeps its request counted as in flight until the body has been sent
/// to the end or dropped (a client that went away), so streamed answers count for their whole
/// duration. Size hint and end-of-stream pass through, so headers such as `content-length`
/// are unchanged.
struct Tracked {
    body: Body,
    in_flight: InFlight,
    /// Set for a streamed answer: notices a client that goes away before the end.
    stream: Option<StreamWatch>,
}

/// Put on a streamed answer's response by [`Reply::event_stream`], so the body wrapper knows
/// to watch it; `key` is the request's `key` option.
#[derive(Debug, Clone)]
struct StreamedAnswer {
    key: Option<String>,
}

/// A streamed answer in progress. Dropped before the body reached its end (or its injected
/// cut), it counts as cancelled: hyper drops a response body only when it is done with it or
/// when the connection failed, i.e. the client went away.
#[derive(Debug)]
struct StreamWatch {
    state: Arc<MockState>,
    key: Option<String>,
    ended: bool,
}

impl Drop for StreamWatch {
    fn drop(&mut self) {
        if !self.ended {
            self.state.record_cancelled_stream(self.key.as_deref());
        }
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.body).poll_frame(cx);
        // The server's own end of the body: its last frame, or the error of an injected cut.
        if let (Poll::Ready(None | Some(Err(_))), Some(watch)) = (&poll, this.stream.as_mut()) {
            watch.ended = true;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked")
            .field("in_flight", &self.in_flight)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

/// Everything needed to answer one request once its options are known.
struct Reply {
    meta: ResponseMeta,
    completion: Completion,
    options: MockOptions,
    stream: bool,
    include_usage: bool,
}

impl Reply {
    async fn send(self, fault: Option<Fault>) -> Response {
        let options = &self.options;
        // A streamed answer spends `latency_ms` nowhere else, so both delays apply to the head
        // of a non-streamed one; injected errors wait too, which lets a test build a slow 503.
        let head_delay = if self.stream {
            options.ttft_ms
        } else {
            options.ttft_ms.saturating_add(options.latency_ms)
        };
        sleep_ms(head_delay).await;
        match fault {
            None => {}
            Some(Fault::Hang) => sleep_ms(options.hang_ms).await,
            Some(Fault::RateLimited) => {
                let retry_after_s = options.retry_after_s;
                return ApiError::RateLimited { retry_after_s }.into_response();
            }
            Some(Fault::Internal) => return ApiError::Internal.into_response(),
            Some(Fault::BadGateway) => return ApiError::BadGateway.into_response(),
            Some(Fault::Unavailable) => return ApiError::Unavailable.into_response(),
            Some(Fault::ContextLength) => return ApiError::ContextLengthExceeded.into_response(),
            Some(Fault::Malformed) => return malformed_response(self.stream),
            Some(Fault::Cut) if self.stream => return self.event_stream(Some(options.cut_after)),
            Some(Fault::Cut) => return self.truncated_json(),
        }
        if self.stream {
            self.event_stream(None)
        } else {
            Json(ChatCompletion::new(&self.meta, &self.completion)).into_response()
        }
    }

    /// The SSE answer. With `cut_after`, the body fails after that many content chunks, before
    /// any finish chunk or `[DONE]`, so the client sees an abnormally terminated body.
    fn event_stream(&self, cut_after: Option<usize>) -> Response {
        let meta = &self.meta;
        let token_gap = Duration::from_millis(self.options.token_ms);
        let mut steps = vec![(Duration::ZERO, chunk_event(&ChatChunk::role(meta)))];
        let pieces = self
            .completion
            .pieces()
            .take(cut_after.unwrap_or(usize::MAX));
        for (i, piece) in pieces.enumerate() {
            let gap = if i == 0 { Duration::ZERO } else { token_gap };
            steps.push((gap, chunk_event(&ChatChunk::content(meta, piece))));
        }
        if cut_after.is_some() {
            steps.push((token_gap.max(MIN_CUT_PAUSE), Err(cut_error())));
        } else {
            let reason = self.completion.finish_reason.as_str();
            steps.push((
                Duration::ZERO,
                chunk_event(&ChatChunk::finish(meta, reason)),
            ));
            if self.include_usage {
                let usage = Usage::of(&self.completion);
                steps.push((Duration::ZERO, chunk_event(&ChatChunk::usage(meta, usage))));
            }
            steps.push((Duration::ZERO, Ok(done_event())));
        }
        // Each step is produced only when the body is polled, so every event leaves as its own
        // write at its own time rather than as one buffered response.
        let events = stream::iter(steps).then(|(gap, event)| async move {
            if !gap.is_zero() {
                tokio::time::sleep(gap).await;
            }
            event
        });
        let mut response = Sse::new(events).into_response();
        response.extensions_mut().insert(StreamedAnswer {
            key: self.options.key.clone(),
        });
        response
    }

    /// The first half of the JSON answer, then a body error: the response is 200 but the body
    /// never completes.
    fn truncated_json(&self) -> Response {
        let full = Bytes::from(
            serde_json::to_vec(&ChatCompletion::new(&self.meta, &self.completion))
                .unwrap_or_default(),
        );
        let half = full.slice(..full.len() / 2);
        let parts = stream::iter([Ok(half), Err(cut_error())]).then(|part| async move {
            if part.is_err() {
                tokio::time::sleep(MIN_CUT_PAUSE).await;
            }
            part
        });
        json_response(Body::from_stream(parts))
    }
}

fn malformed_response(stream: bool) -> Response {
    if stream {
        let events = [
            Ok::<_, BoxError>(Event::default().data("{not json")),
            Ok(done_event()),
        ];
        Sse::new(stream::iter(events)).into_response()
    } else {
        json_response(Body::from(r#"{"id":"chatcmpl-mock","choices":[{"#))
    }
}

fn json_response(body: Body) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn chunk_event(chunk: &ChatChunk<'_>) -> Result<Event, BoxError> {
    Event::default().json_data(chunk).map_err(BoxError::from)
}

fn done_event() -> Event {
    Event::default().data("[DONE]")
}

fn cut_error() -> BoxError {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "mock-llm cut the response",
    )
    .into()
}

/// Any `Authorization: Bearer ...` passes: the mock checks that a client sends a key, not
/// which one.
fn has_bearer_token(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.get(..6))
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("bearer"))
}

fn mock_headers(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers.iter().filter_map(|(name, value)| {
        let name = name.as_str();
        header_option_name(name)?;
        Some((name, value.to_str().ok()?))
    })
}

fn recorded_request(headers: &HeaderMap, parsed: Option<&Value>, raw: &Bytes) -> RecordedRequest {
    let model = parsed
        .and_then(|body| body.get("model"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let headers: BTreeMap<String, String> = mock_headers(headers)
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .collect();
    let body = parsed
        .cloned()
        .unwrap_or_else(|| Value::String(String::from_utf8_lossy(raw).into_owned()));
    RecordedRequest {
        model,
        headers,
        body,
    }
}

async fn sleep_ms(ms: u64) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
