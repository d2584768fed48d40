#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{start, user_body};
use serde_json::{Value, json};

#[tokio::test]
async fn fault_model_ids_select_the_fault() {
    let server = start().await;
    let response = server.chat(&user_body("mock-fault-503", "hi")).await;
    assert_eq!(response.status(), 503);
    let response = server.chat(&user_body("mock-fault-context", "hi")).await;
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn other_model_ids_are_echoed_back() {
    let server = start().await;
    let response = server.chat(&user_body("some-provider/model-x", "hi")).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["model"], "some-provider/model-x");
}

#[tokio::test]
async fn x_mock_headers_set_options() {
    let server = start().await;
    let response = server
        .chat_request(&user_body("gpt-4o", "hi"))
        .header("x-mock-fault", "500")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);

    let started = Instant::now();
    let response = server
        .chat_request(&user_body("gpt-4o", "hi"))
        .header("x-mock-ttft-ms", "200")
        .header("x-mock-tokens", "5")
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(200));
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn directives_apply_from_any_message_and_are_not_echoed() {
    let server = start().await;
    let body = json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "be brief [mock tokens=7]"},
            {"role": "user", "content": "what is up [mock latency_ms=1]"},
        ],
    });
    let response: Value = server.chat(&body).await.json().await.unwrap();
    assert_eq!(response["usage"]["completion_tokens"], 7);
    let content = response["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    assert!(
        content.starts_with("[mock] messages=2 last=what is up lorem"),
        "{content}"
    );
}

#[tokio::test]
async fn headers_override_the_model_and_directives_override_headers() {
    let server = start().await;
    let response = server
        .chat_request(&user_body("mock-fault-429", "hi"))
        .header("x-mock-fault", "502")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);

    let response = server
        .chat_request(&user_body("mock-fault-429", "hi [mock fault=none]"))
        .header("x-mock-fault", "502")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn unknown_options_and_malformed_values_are_ignored() {
    let server = start().await;
    let response = server
        .chat_request(&user_body(
            "gpt-4o",
            "[mock colour=blue tokens=many fault=teapot ttft_ms=-5]",
        ))
        .header("x-mock-whatever", "1")
        .header("x-mock-tokens", "ten")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 12);
}
