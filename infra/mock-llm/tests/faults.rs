#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{error_body, read_sse, start, streaming, user_body};

#[tokio::test]
async fn rate_limit_fault_returns_429_with_retry_after() {
    let server = start().await;
    let response = server
        .chat(&user_body(
            "gpt-4o-mini",
            "hi [mock fault=429 retry_after=7]",
        ))
        .await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    let body = error_body(response).await;
    assert_eq!(body["error"]["type"], "rate_limit_exceeded");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
}

#[tokio::test]
async fn rate_limit_retry_after_defaults_to_one_second() {
    let server = start().await;
    let response = server.chat(&user_body("mock-fault-429", "hi")).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
}

#[tokio::test]
async fn server_error_faults_return_their_status_with_server_error_type() {
    let server = start().await;
    for status in [500_u16, 502, 503] {
        let response = server
            .chat(&user_body("gpt-4o", &format!("[mock fault={status}]")))
            .await;
        assert_eq!(response.status(), status);
        let body = error_body(response).await;
        assert_eq!(body["error"]["type"], "server_error");
    }
}

#[tokio::test]
async fn context_fault_returns_400_context_length_exceeded() {
    let server = start().await;
    let response = server
        .chat(&user_body("gpt-4o", "[mock fault=context]"))
        .await;
    assert_eq!(response.status(), 400);
    let body = error_body(response).await;
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn hang_fault_outlasts_a_client_timeout() {
    let server = start().await;
    let started = Instant::now();
    let result = server
        .chat_request(&user_body("gpt-4o", "[mock fault=hang hang_ms=5000]"))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    let err = result.expect_err("a hanging upstream must not answer within 300 ms");
    assert!(err.is_timeout(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn hang_fault_answers_normally_after_hang_ms() {
    let server = start().await;
    let started = Instant::now();
    let response = server
        .chat(&user_body("mock-fault-hang", "[mock hang_ms=150]"))
        .await;
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(150));
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn cut_fault_breaks_the_stream_after_cut_after_tokens() {
    let server = start().await;
    let response = server
        .chat(&streaming(user_body(
            "gpt-4o",
            "[mock fault=cut cut_after=2]",
        )))
        .await;
    assert_eq!(response.status(), 200);
    let read = read_sse(response).await;
    assert!(read.body_error.is_some(), "the body must end with an error");
    assert!(!read.data().contains(&"[DONE]"));
    let chunks = read.chunks();
    // The role chunk, then exactly two content chunks, and no finish chunk.
    assert_eq!(chunks.len(), 3, "{:?}", read.data());
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"][0]["finish_reason"].is_null())
    );
    assert_eq!(read.content(), "[mock] messages=1");
}

#[tokio::test]
async fn cut_fault_without_streaming_truncates_the_json_body() {
    let server = start().await;
    let response = server.chat(&user_body("mock-fault-cut", "hello")).await;
    assert_eq!(response.status(), 200);
    let body = response.bytes().await;
    assert!(body.is_err(), "the body must not complete: {body:?}");
}

#[tokio::test]
async fn malformed_fault_returns_200_with_unparsable_json() {
    let server = start().await;
    let response = server
        .chat(&user_body("mock-fault-malformed", "hello"))
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body = response.bytes().await.unwrap();
    assert!(serde_json::from_slice::<serde_json::Value>(&body).is_err());
}

#[tokio::test]
async fn malformed_fault_when_streaming_sends_an_unparsable_event() {
    let server = start().await;
    let response = server
        .chat(&streaming(user_body("mock-fault-malformed", "hello")))
        .await;
    assert_eq!(response.status(), 200);
    let read = read_sse(response).await;
    assert_eq!(read.data(), ["{not json", "[DONE]"]);
    assert!(serde_json::from_str::<serde_json::Value>(read.data()[0]).is_err());
}

#[tokio::test]
async fn times_limits_the_fault_to_the_first_requests_of_a_key() {
    let server = start().await;
    let body = user_body("gpt-4o", "[mock fault=429 times=2 key=t1]");
    let statuses = [
        server.chat(&body).await.status(),
        server.chat(&body).await.status(),
        server.chat(&body).await.status(),
    ];
    assert_eq!(statuses, [429, 429, 200]);

    let other_key = user_body("gpt-4o", "[mock fault=429 times=2 key=t2]");
    assert_eq!(server.chat(&other_key).await.status(), 429);
}

#[tokio::test]
async fn times_without_key_counts_identical_option_sets_together() {
    let server = start().await;
    let body = user_body("gpt-4o", "[mock fault=503 times=1]");
    assert_eq!(server.chat(&body).await.status(), 503);
    assert_eq!(server.chat(&body).await.status(), 200);
    // Different options make a different default key, with its own count.
    let other = user_body("gpt-4o", "[mock fault=503 times=1 tokens=5]");
    assert_eq!(server.chat(&other).await.status(), 503);
}
