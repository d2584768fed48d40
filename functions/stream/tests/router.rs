//! The stream router in process, on in-memory stores and a scripted LLM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use shared::auth::Tier;
use shared::error::ApiError;
use shared::llm::{Scripted, ScriptedLlm};
use shared::ratelimit::{CounterKey, tokens_counter};
use shared::services::Services;
use tower::ServiceExt;

const KEY: &str = "gwk_stream_test";

async fn harness() -> (Services, Arc<ScriptedLlm>) {
    let h = test_support::in_memory(&[(KEY, "streamer", Tier::Pro)], &[]).await;
    (h.services, h.llm)
}

fn post(path: &str, body: Value) -> Request<Body> {
    Request::post(path)
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// The `data:` payloads of an SSE body, in order.
fn data_lines(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|event| {
            event
                .lines()
                .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        })
        .map(str::to_owned)
        .collect()
}

async fn call(services: &Services, request: Request<Body>) -> (u16, axum::http::HeaderMap, String) {
    let reply = test_support::call(stream::app(services.clone()), request).await;
    let text = reply.text();
    (reply.status, reply.headers, text)
}

#[tokio::test]
async fn chat_stream_sends_start_deltas_done_then_done_marker() {
    let (services, llm) = harness().await;
    llm.push(Scripted::Reply("streamed answer here".into()));
    let (status, headers, body) =
        call(&services, post("/chat/stream", json!({"message": "hi"}))).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert!(headers.contains_key("x-request-id"));
    assert!(headers.contains_key("x-ratelimit-remaining"));
    let lines = data_lines(&body);
    assert_eq!(lines.last().unwrap(), "[DONE]");
    let events: Vec<Value> = lines[..lines.len() - 1]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["type"], "start");
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "delta")
        .map(|e| e["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "streamed answer here");
    let done = events.last().unwrap();
    assert_eq!(done["type"], "done");
    assert!(done["usage"]["total_tokens"].as_u64().unwrap() > 0);

    // The turn was stored after the stream completed.
    let id = events[0]["conversation_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (meta, messages) = services
        .chat
        .conversations
        .get("streamer", id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(meta.message_count, 2);
    assert_eq!(messages[1].content, "streamed answer here");
}

#[tokio::test]
async fn failure_after_the_first_byte_is_an_error_event_and_nothing_is_stored() {
    let (services, llm) = harness().await;
    llm.push(Scripted::Stream {
        deltas: vec!["partial ".into(), "answer".into()],
        then: Some(ApiError::UpstreamFailed {
            detail: "connection reset".into(),
        }),
    });
    let (status, _, body) = call(&services, post("/chat/stream", json!({"message": "hi"}))).await;
    assert_eq!(status, 200);
    let lines = data_lines(&body);
    assert_eq!(lines.last().unwrap(), "[DONE]");
    let error: Value = serde_json::from_str(&lines[lines.len() - 2]).unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["code"], "upstream_error");
    assert!(error["error"]["request_id"].is_string());
    assert!(
        !body.contains("connection reset"),
        "internal detail leaked: {body}"
    );
    let start: Value = serde_json::from_str(&lines[0]).unwrap();
    let id = start["conversation_id"].as_str().unwrap().parse().unwrap();
    assert!(
        services
            .chat
            .conversations
            .get("streamer", id)
            .await
            .unwrap()
            .is_none()
    );
}

/// The caller's per-minute token counter as it stands now.
async fn tokens_used(services: &Services) -> u64 {
    let now = shared::dynamo::now_epoch();
    services
        .chat
        .limiter
        .store()
        .current(
            &CounterKey::hourly("streamer", now),
            &tokens_counter(now - now % 60),
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn failure_before_the_first_byte_is_a_plain_http_error_and_returns_the_reservation() {
    let (services, llm) = harness().await;
    let routes = [
        ("/chat/stream", json!({"message": "hi", "max_tokens": 4000})),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 4000,
                   "messages": [{"role": "user", "content": "hi"}]}),
        ),
    ];
    for (path, body) in routes {
        llm.push(Scripted::Fail(ApiError::UpstreamTimeout));
        let (status, headers, body) = call(&services, post(path, body)).await;
        assert_eq!(status, 504, "{path}: {body}");
        assert_eq!(headers["content-type"], "application/json");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "upstream_timeout");
        // Admission reserved 4000+ tokens; nothing reached the model, so all of it is back.
        assert_eq!(tokens_used(&services).await, 0, "{path}");
    }
}

#[tokio::test]
async fn a_cache_hit_is_replayed_as_a_stream() {
    let (services, llm) = harness().await;
    llm.push(Scripted::Reply("cached words come back".into()));
    call(&services, post("/chat/stream", json!({"message": "same"}))).await;
    let (status, headers, body) =
        call(&services, post("/chat/stream", json!({"message": "same"}))).await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-cache"], "HIT");
    let lines = data_lines(&body);
    let events: Vec<Value> = lines[..lines.len() - 1]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "delta")
        .map(|e| e["content"].as_str().unwrap())
        .collect();
    assert_eq!(text, "cached words come back");
    assert_eq!(events.last().unwrap()["cached"], true);
    assert_eq!(llm.requests().len(), 1);
}

#[tokio::test]
async fn openai_stream_sends_chunks_usage_and_done() {
    let (services, llm) = harness().await;
    llm.push(Scripted::Reply("chunked reply".into()));
    llm.push(Scripted::Reply("chunked reply".into()));
    let request = |include: bool| {
        post(
            "/v1/chat/completions",
            json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": true,
                   "stream_options": {"include_usage": include}}),
        )
    };
    let (status, _, body) = call(&services, request(true)).await;
    assert_eq!(status, 200);
    let lines = data_lines(&body);
    assert_eq!(lines.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = lines[..lines.len() - 1]
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "chunked reply");
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert!(usage["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "stop"
    );

    let (_, _, body) = call(
        &services,
        Request::post("/v1/chat/completions")
            .header("x-api-key", KEY)
            .header("content-type", "application/json")
            .header("cache-control", "no-cache")
            .body(Body::from(json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": true}).to_string()))
            .unwrap(),
    )
    .await;
    assert!(
        !body.contains("\"usage\""),
        "no usage chunk unless asked: {body}"
    );
}

#[tokio::test]
async fn openai_non_stream_returns_a_completion_object() {
    let (services, llm) = harness().await;
    llm.push(Scripted::Reply("plain".into()));
    let (status, _, body) = call(
        &services,
        post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}]}),
        ),
    )
    .await;
    assert_eq!(status, 200);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["message"]["content"], "plain");
}

#[tokio::test]
async fn a_client_that_goes_away_stops_the_stream_and_settles_the_reservation() {
    let (services, llm) = harness().await;
    let words: Vec<String> = (0..200).map(|i| format!("w{i} ")).collect();
    llm.push(Scripted::Stream {
        deltas: words,
        then: None,
    });
    let response = stream::app(services.clone())
        .oneshot(post(
            "/chat/stream",
            json!({"message": "hi", "max_tokens": 4000}),
        ))
        .await
        .unwrap();
    let mut body = response.into_body();
    // Read one frame, then hang up.
    let _ = body.frame().await;
    drop(body);
    let mut settled = u64::MAX;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        settled = tokens_used(&services).await;
        if settled < 4000 {
            break;
        }
    }
    assert!(
        settled < 4000,
        "reservation of 4000+ tokens was not settled: {settled}"
    );
    assert!(settled > 0, "the prompt was consumed upstream");
    assert!(
        services
            .chat
            .conversations
            .list("streamer", 10, None)
            .await
            .unwrap()
            .conversations
            .is_empty()
    );
}

#[tokio::test]
async fn openapi_documents_the_event_types() {
    let (services, _) = harness().await;
    let (status, _, body) = call(
        &services,
        Request::get("/openapi.json").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(doc["paths"]["/chat/stream"]["post"].is_object());
    assert!(doc["paths"]["/v1/chat/completions"]["post"].is_object());
    assert!(doc["components"]["schemas"]["ChatStreamEvent"].is_object());
}
