#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{start, streaming, user_body};
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
    assert_eq!(
        stats,
        json!({
            "total": 0,
            "by_model": {},
            "in_flight": 0,
            "peak_in_flight": 0,
            "peak_in_flight_by_key": {},
            "streams_cancelled": 0,
            "streams_cancelled_by_key": {}
        })
    );
    assert_eq!(server.get_json("/mock/requests").await, json!([]));
    assert_eq!(server.chat(&body).await.status(), 429);
}

#[tokio::test]
async fn stats_report_peak_in_flight_of_concurrent_requests() {
    let server = start().await;
    let idle = server.get_json("/mock/stats").await;
    assert_eq!(
        (idle["in_flight"].as_u64(), idle["peak_in_flight"].as_u64()),
        (Some(0), Some(0))
    );

    // Six slow requests at once: all six are in flight together while they wait.
    let slow = user_body("gpt-4o", "[mock latency_ms=400]");
    let calls: Vec<_> = (0..6).map(|_| server.chat(&slow)).collect();
    let during = async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        server.get_json("/mock/stats").await
    };
    let (responses, during) = tokio::join!(futures::future::join_all(calls), during);
    assert!(responses.iter().all(|r| r.status() == 200));
    assert_eq!(during["in_flight"], 6, "{during}");

    // A streamed answer counts until its body has been sent, not just until its headers.
    let streamed = streaming(user_body("gpt-4o", "[mock tokens=4 token_ms=150]"));
    let response = server.chat(&streamed).await;
    let mid_stream = server.get_json("/mock/stats").await;
    assert_eq!(mid_stream["in_flight"], 1, "{mid_stream}");
    response.text().await.unwrap();

    let after = server.get_json("/mock/stats").await;
    assert_eq!(after["in_flight"], 0, "{after}");
    assert_eq!(after["peak_in_flight"], 6, "{after}");

    // Sequential requests never raise the peak above one after a reset.
    server
        .client
        .post(server.url("/mock/reset"))
        .send()
        .await
        .unwrap();
    for _ in 0..3 {
        server
            .chat(&user_body("gpt-4o", "one at a time"))
            .await
            .text()
            .await
            .unwrap();
    }
    let sequential = server.get_json("/mock/stats").await;
    assert_eq!(sequential["peak_in_flight"], 1, "{sequential}");
}

#[tokio::test]
async fn peak_in_flight_by_key_separates_concurrent_clients() {
    let server = start().await;
    // Two clients at once: three requests keyed `a` (also as a header), five unkeyed.
    let keyed = user_body("gpt-4o", "[mock latency_ms=300 key=a]");
    let plain = user_body("gpt-4o", "[mock latency_ms=300]");
    let mut calls: Vec<_> = (0..2).map(|_| server.chat(&keyed)).collect();
    calls.push(server.chat(&plain));
    let header_keyed = server
        .chat_request(&user_body("gpt-4o", "[mock latency_ms=300]"))
        .header("x-mock-key", "a")
        .send();
    let unkeyed: Vec<_> = (0..4).map(|_| server.chat(&plain)).collect();
    let (keyed_done, header_done, unkeyed_done) = tokio::join!(
        futures::future::join_all(calls),
        header_keyed,
        futures::future::join_all(unkeyed)
    );
    assert!(
        keyed_done
            .iter()
            .chain(&unkeyed_done)
            .all(|r| r.status() == 200)
    );
    assert_eq!(header_done.unwrap().status(), 200);
    let stats = server.get_json("/mock/stats").await;
    assert_eq!(stats["peak_in_flight"], 8, "{stats}");
    assert_eq!(stats["peak_in_flight_by_key"], json!({"a": 3}), "{stats}");
}
