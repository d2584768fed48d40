#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{error_body, read_sse, start, streaming, user_body};
use serde_json::{Value, json};

fn conversation() -> Value {
    json!({
        "model": "gpt-4o-mini",
        "temperature": 0.2,
        "tools": [],
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hello there, how are you today?"},
        ],
    })
}

#[tokio::test]
async fn completion_has_the_openai_shape_and_summary_prefix() {
    let server = start().await;
    let response = server.chat(&conversation()).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-mock-"));
    assert_eq!(body["object"], "chat.completion");
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(body["model"], "gpt-4o-mini");
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "stop");
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with("[mock] messages=2 last=hello there, how are you today? lorem ipsum"),
        "{content}"
    );
    assert_eq!(content.split_whitespace().count(), 12);
    // (3 words + 4) + (6 words + 4)
    assert_eq!(body["usage"]["prompt_tokens"], 17);
    assert_eq!(body["usage"]["completion_tokens"], 12);
    assert_eq!(body["usage"]["total_tokens"], 29);
}

#[tokio::test]
async fn same_input_gives_same_content_and_usage() {
    let server = start().await;
    let first: Value = server.chat(&conversation()).await.json().await.unwrap();
    let second: Value = server.chat(&conversation()).await.json().await.unwrap();
    assert_eq!(first["choices"], second["choices"]);
    assert_eq!(first["usage"], second["usage"]);
    assert_ne!(first["id"], second["id"]);
}

#[tokio::test]
async fn last_user_message_is_echoed_up_to_forty_characters() {
    let server = start().await;
    let text = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJ";
    let body: Value = server
        .chat(&user_body("gpt-4o", text))
        .await
        .json()
        .await
        .unwrap();
    let content = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with(&format!("[mock] messages=1 last={} lorem", &text[..40])),
        "{content}"
    );
}

#[tokio::test]
async fn tokens_option_sets_the_completion_length() {
    let server = start().await;
    for k in [4_u64, 30] {
        let body: Value = server
            .chat(&user_body("gpt-4o", &format!("count [mock tokens={k}]")))
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(body["usage"]["completion_tokens"], k);
        let content = body["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(content.split_whitespace().count() as u64, k);
    }
}

#[tokio::test]
async fn max_tokens_truncates_with_finish_reason_length() {
    let server = start().await;
    let mut request = user_body("gpt-4o", "hello [mock tokens=20]");
    request["max_tokens"] = json!(6);
    let body: Value = server.chat(&request).await.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 6);
    assert_eq!(body["choices"][0]["finish_reason"], "length");

    let mut request = user_body("gpt-4o", "hello [mock tokens=20]");
    request["max_completion_tokens"] = json!(8);
    let body: Value = server.chat(&request).await.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 8);
}

#[tokio::test]
async fn content_parts_are_read_as_text() {
    let server = start().await;
    let request = json!({
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "describe"},
            {"type": "image_url", "image_url": {"url": "data:,"}},
            {"type": "text", "text": "this [mock tokens=6]"},
        ]}],
    });
    let body: Value = server.chat(&request).await.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "[mock] messages=1 last=describe this lorem ipsum"
    );
    // Directives are part of the prompt: "describe this [mock tokens=6]" is four words.
    assert_eq!(body["usage"]["prompt_tokens"], 4 + 4);
}

#[tokio::test]
async fn streamed_deltas_concatenate_to_the_non_streamed_content() {
    let server = start().await;
    let plain: Value = server.chat(&conversation()).await.json().await.unwrap();
    let response = server.chat(&streaming(conversation())).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let read = read_sse(response).await;
    assert!(read.body_error.is_none());
    assert_eq!(read.content(), plain["choices"][0]["message"]["content"]);

    let chunks = read.chunks();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks[0]["choices"][0]["delta"]["content"], "");
    // Role chunk, 12 one-token chunks, finish chunk.
    assert_eq!(chunks.len(), 14);
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "gpt-4o-mini");
        assert_eq!(chunk["id"], chunks[0]["id"]);
        assert!(chunk.get("usage").is_none(), "usage only when asked");
    }
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert_eq!(read.data().last(), Some(&"[DONE]"));
}

#[tokio::test]
async fn include_usage_adds_a_usage_chunk_before_done() {
    let server = start().await;
    let plain: Value = server.chat(&conversation()).await.json().await.unwrap();
    let mut request = streaming(conversation());
    request["stream_options"] = json!({"include_usage": true});
    let read = read_sse(server.chat(&request).await).await;
    let data = read.data();
    assert_eq!(data.last(), Some(&"[DONE]"));
    let chunks = read.chunks();
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"], plain["usage"]);
    assert_eq!(
        chunks.iter().filter(|c| c.get("usage").is_some()).count(),
        1
    );
}

#[tokio::test]
async fn streamed_tokens_arrive_as_they_are_produced() {
    let server = start().await;
    let started = Instant::now();
    let response = server
        .chat(&streaming(user_body(
            "gpt-4o",
            "hi [mock tokens=10 token_ms=50]",
        )))
        .await;
    let read = read_sse(response).await;
    let content_arrivals: Vec<Instant> = read
        .events
        .iter()
        .filter(|e| {
            serde_json::from_str::<Value>(&e.data)
                .ok()
                .and_then(|c| c["choices"][0]["delta"]["content"].as_str().map(str::len))
                .is_some_and(|len| len > 0)
        })
        .map(|e| e.arrived)
        .collect();
    assert_eq!(content_arrivals.len(), 10);
    let first = content_arrivals[0] - started;
    let last = content_arrivals[9] - started;
    assert!(
        first < Duration::from_millis(250),
        "first chunk after {first:?}"
    );
    assert!(
        last >= Duration::from_millis(400),
        "last chunk after {last:?}"
    );
}

#[tokio::test]
async fn ttft_delays_the_first_streamed_token() {
    let server = start().await;
    let started = Instant::now();
    let response = server
        .chat(&streaming(user_body("gpt-4o", "hi [mock ttft_ms=200]")))
        .await;
    let read = read_sse(response).await;
    assert!(read.events[1].arrived - started >= Duration::from_millis(200));
}

#[tokio::test]
async fn latency_ms_delays_a_non_streamed_answer() {
    let server = start().await;
    let started = Instant::now();
    let response = server
        .chat(&user_body("gpt-4o", "hi [mock latency_ms=200]"))
        .await;
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[tokio::test]
async fn rejects_a_request_without_bearer_key_with_401() {
    let server = start().await;
    let response = server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&user_body("gpt-4o", "hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body = error_body(response).await;
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "invalid_api_key");
}

#[tokio::test]
async fn rejects_invalid_bodies_with_400_openai_errors() {
    let server = start().await;
    let bodies = [
        "{not json".to_owned(),
        "[]".to_owned(),
        json!({"model": "gpt-4o"}).to_string(),
        json!({"model": 7, "messages": []}).to_string(),
        json!({"model": "m", "messages": [{"role": "user", "content": 5}]}).to_string(),
    ];
    for body in bodies {
        let response = server
            .client
            .post(server.url("/v1/chat/completions"))
            .bearer_auth("k")
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{body}");
        let error = error_body(response).await;
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
}

#[tokio::test]
async fn models_endpoint_lists_models_in_openai_shape() {
    let server = start().await;
    let body = server.get_json("/v1/models").await;
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"gpt-4o-mini"));
    assert!(ids.contains(&"mock-fault-429"));
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(body["data"][0]["owned_by"], "mock");
}

#[tokio::test]
async fn health_answers_ok() {
    let server = start().await;
    let response = server
        .client
        .get(server.url("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "ok");
}
