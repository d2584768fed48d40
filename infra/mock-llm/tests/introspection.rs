#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{start, user_body};
use serde_json::json;

#[tokio::test]
async fn stats_count_every_chat_request_by_model() {
    let server = start().await;
    server.chat(&user_body("gpt-4o", "a")).await;
    server.chat(&user_body("gpt-4o", "b")).await;
    server.chat(&user_body("mock-fault-500", "c")).await;
    server
        .client
        .post(server.url("/v1/chat/completions"))
        .json(&user_body("gpt-4o-mini", "no key"))
        .send()
        .await
        .unwrap();
    let stats = server.get_json("/mock/stats").await;
    assert_eq!(stats["total"], 4);
    assert_eq!(
        stats["by_model"],
        json!({"gpt-4o": 2, "mock-fault-500": 1, "gpt-4o-mini": 1})
    );
}

#[tokio::test]
async fn requests_returns_recent_bodies_newest_last_with_only_mock_headers() {
    let server = start().await;
    for text in ["one", "two", "three"] {
        server
            .chat_request(&user_body("gpt-4o", text))
            .header("x-mock-tokens", "5")
            .header("x-other", "secret")
            .send()
            .await
            .unwrap();
    }
    let recent = server.get_json("/mock/requests?limit=2").await;
    let recent = recent.as_array().unwrap();
    assert_eq!(recent.len(), 2);
    assert_eq!(recent[0]["body"], user_body("gpt-4o", "two"));
    assert_eq!(recent[1]["body"], user_body("gpt-4o", "three"));
    assert_eq!(recent[1]["model"], "gpt-4o");
    assert_eq!(recent[1]["headers"], json!({"x-mock-tokens": "5"}));

    let all = server.get_json("/mock/requests").await;
    assert_eq!(all.as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn reset_clears_counters_requests_and_times_state() {
    let server = start().await;
    let body = user_body("gpt-4o", "[mock fault=429 times=1 key=r]");
    assert_eq!(server.chat(&body).await.status(), 429);
    assert_eq!(server.chat(&body).await.status(), 200);

    let response = server
        .client
        .post(server.url("/mock/reset"))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());

    let stats = server.get_json("/mock/stats").await;
    assert_eq!(stats, json!({"total": 0, "by_model": {}}));
    assert_eq!(server.get_json("/mock/requests").await, json!([]));
    assert_eq!(server.chat(&body).await.status(), 429);
}
