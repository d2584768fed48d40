//! `streams_cancelled` in `GET /mock/stats`: a streamed answer whose client goes away before the
//! end is counted (by key too), while streams that finish or are cut by the mock are not.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{MockServer, read_sse, start, streaming, user_body};
use futures::StreamExt;
use serde_json::Value;

/// How long the server may take to notice a closed connection: its next write fails.
const NOTICE_BUDGET: Duration = Duration::from_secs(2);

async fn cancelled(server: &MockServer, key: &str) -> (u64, Option<u64>) {
    let stats = server.get_json("/mock/stats").await;
    (
        stats["streams_cancelled"].as_u64().unwrap(),
        stats["streams_cancelled_by_key"][key].as_u64(),
    )
}

/// Polls until `key` has a cancelled stream, returning how long that took.
async fn wait_for_cancellation(server: &MockServer, key: &str) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < NOTICE_BUDGET {
        if cancelled(server, key).await.1 == Some(1) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[tokio::test]
async fn a_client_that_drops_a_stream_midway_is_counted_under_its_key() {
    let server = start().await;
    // 40 tokens 100 ms apart: the stream would run for about 4 s.
    let body = streaming(user_body(
        "gpt-4o",
        "[mock tokens=40 token_ms=100 key=walkaway]",
    ));
    let response = server.chat(&body).await;
    assert_eq!(response.status(), 200);
    let mut bytes = response.bytes_stream();
    let mut seen = String::new();
    // The role chunk and three content chunks.
    while seen.matches("data:").count() < 4 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), bytes.next())
            .await
            .expect("stream stalled")
            .expect("stream ended early")
            .unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert_eq!(cancelled(&server, "walkaway").await, (0, None));
    drop(bytes);

    let noticed = wait_for_cancellation(&server, "walkaway").await;
    assert!(
        noticed.is_some(),
        "the dropped stream was not counted within {NOTICE_BUDGET:?}"
    );
    assert_eq!(cancelled(&server, "walkaway").await, (1, Some(1)));
}

#[tokio::test]
async fn streams_that_end_or_are_cut_by_the_mock_are_not_cancellations() {
    let server = start().await;
    let finished = server
        .chat(&streaming(user_body(
            "gpt-4o",
            "[mock tokens=5 token_ms=10 key=whole]",
        )))
        .await;
    let read = read_sse(finished).await;
    assert!(read.body_error.is_none());
    assert_eq!(read.data().last(), Some(&"[DONE]"));

    let cut = server
        .chat(&streaming(user_body(
            "gpt-4o",
            "[mock tokens=8 fault=cut cut_after=2 key=cut]",
        )))
        .await;
    let read = read_sse(cut).await;
    assert!(read.body_error.is_some(), "the cut must end the body early");

    let buffered = server
        .chat(&user_body("gpt-4o", "[mock tokens=5 key=plain]"))
        .await;
    let _: Value = buffered.json().await.unwrap();

    let stats = server.get_json("/mock/stats").await;
    assert_eq!(stats["streams_cancelled"], 0, "{stats}");
    assert_eq!(
        stats["streams_cancelled_by_key"],
        serde_json::json!({}),
        "{stats}"
    );
}
