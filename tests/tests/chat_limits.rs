//! Rate limits and upstream failures of `POST /chat/chat` (issue 5).
//!
//! Faults come from `[mock fault=... times=... key=...]` directives in the message. Each test
//! uses its own `key`, and the failing message is never stored, so a later turn is clean.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use integration_tests::{Reply, Stack, free_tier_quota, mock_reply_prefix, unique};
use serde_json::json;
use shared::auth::Tier;

/// A fault test must settle well within the suite's per-test budget.
const FAULT_BUDGET: Duration = Duration::from_secs(25);
/// The architecture's retry bound: at most this many upstream attempts per model.
const MAX_ATTEMPTS: usize = 3;

#[track_caller]
fn assert_seconds_header(reply: &Reply, name: &str, max: u64) {
    let value = reply.header_u64(name);
    assert!(
        value.is_some_and(|s| (1..=max).contains(&s)),
        "{name} must be 1..={max} seconds; the reply was\n{reply}"
    );
}

#[tokio::test]
async fn free_tier_answers_429_once_its_hourly_requests_are_spent() {
    let stack = Stack::require();
    let (limit, _) = free_tier_quota();
    assert!(
        (1..=20).contains(&limit),
        "the stack must lower the free tier's hourly requests (RATE_LIMIT_FREE_REQUESTS_PER_HOUR)"
    );
    let user = stack.new_user(Tier::Free).await.unwrap();
    let marker = unique("hourly");

    for n in 1..=limit {
        let reply = stack
            .chat(
                &user,
                &json!({"message": format!("request {n} {marker}"), "max_tokens": 20}),
            )
            .await
            .unwrap();
        reply.assert_status(200);
        assert_eq!(
            reply.header_u64("x-ratelimit-limit"),
            Some(limit),
            "{reply}"
        );
        assert_eq!(
            reply.header_u64("x-ratelimit-remaining"),
            Some(limit - n),
            "{reply}"
        );
    }

    let refused = stack
        .chat(
            &user,
            &json!({"message": format!("one too many {marker}"), "max_tokens": 20}),
        )
        .await
        .unwrap();
    refused.assert_error(429, "rate_limit_exceeded");
    assert_seconds_header(&refused, "retry-after", 3600);
    assert_eq!(refused.header_u64("x-ratelimit-limit"), Some(limit));
    assert_eq!(refused.header_u64("x-ratelimit-remaining"), Some(0));
    assert_seconds_header(&refused, "x-ratelimit-reset", 3600);
    assert_eq!(
        stack.upstream_requests_with(&marker).await.unwrap().len(),
        usize::try_from(limit).unwrap(),
        "the refused request must not reach the upstream"
    );
}

#[tokio::test]
async fn request_over_the_token_budget_is_429_and_not_counted() {
    let stack = Stack::require();
    let (limit, tokens_per_minute) = free_tier_quota();
    let max_tokens = 4000;
    assert!(
        tokens_per_minute < max_tokens,
        "the stack must lower the free tier's tokens per minute below {max_tokens} \
         (RATE_LIMIT_FREE_TOKENS_PER_MINUTE)"
    );
    let user = stack.new_user(Tier::Free).await.unwrap();
    let marker = unique("tpm");

    let refused = stack
        .chat(
            &user,
            &json!({"message": format!("write a lot {marker}"), "max_tokens": max_tokens}),
        )
        .await
        .unwrap();
    refused.assert_error(429, "rate_limit_exceeded");
    assert_seconds_header(&refused, "retry-after", 3600);
    for header in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        assert!(
            refused.header_u64(header).is_some(),
            "{header} missing on a 429:\n{refused}"
        );
    }
    assert!(
        stack
            .upstream_requests_with(&marker)
            .await
            .unwrap()
            .is_empty()
    );

    // The refused request did not use up one of the hour's requests.
    let next = stack
        .chat(
            &user,
            &json!({"message": format!("just a little {marker}"), "max_tokens": 20}),
        )
        .await
        .unwrap();
    next.assert_status(200);
    assert_eq!(next.header_u64("x-ratelimit-remaining"), Some(limit - 1));
}

/// Runs one turn, then a turn whose upstream call fails with `fault`, then a clean turn, and
/// checks the failure's status and code, that nothing of the failed turn was stored, and that
/// the clean turn builds on the first one only. Returns the failure's reply.
async fn upstream_fault_leaves_no_trace(fault: &str, status: u16, code: &str) -> Reply {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("fault");
    let first = stack
        .chat_ok(
            &user,
            &json!({"message": format!("before the fault {marker}")}),
        )
        .await
        .unwrap();
    let id = first["conversation_id"].as_str().unwrap().to_owned();

    let key = unique("key");
    let failing = format!("[mock {fault} times=10 key={key}] this turn fails {marker}");
    let started = Instant::now();
    let failed = stack
        .chat(&user, &json!({"message": failing, "conversation_id": id}))
        .await
        .unwrap();
    let took = started.elapsed();
    failed.assert_error(status, code);
    assert!(
        took < FAULT_BUDGET,
        "the failure took {took:?}: retries must stay bounded"
    );
    let attempts = stack.upstream_requests_with(&key).await.unwrap().len();
    assert!(
        (1..=MAX_ATTEMPTS).contains(&attempts),
        "{attempts} upstream attempts; expected 1..={MAX_ATTEMPTS}"
    );

    let stored = stack.conversation(&user, &id).await.unwrap();
    stored.assert_status(200);
    assert_eq!(
        stored.json["message_count"], 2,
        "a failed turn stores nothing:\n{stored}"
    );
    assert_eq!(stored.json["messages"].as_array().map(Vec::len), Some(2));

    let after = format!("after the fault {marker}");
    let next = stack
        .chat_ok(&user, &json!({"message": after, "conversation_id": id}))
        .await
        .unwrap();
    let text = next["message"].as_str().unwrap_or_default();
    assert!(
        text.starts_with(&mock_reply_prefix(3, &after)),
        "the next turn sees the first turn only: {text:?}"
    );
    let upstream = stack.upstream_request_ending_with(&after).await.unwrap();
    assert!(
        !upstream.mentions(&key),
        "the failed message leaked into the history"
    );
    let stored = stack.conversation(&user, &id).await.unwrap();
    assert_eq!(stored.json["message_count"], 4, "{stored}");
    failed
}

#[tokio::test]
async fn upstream_429_is_429_upstream_rate_limited_with_retry_after() {
    let failed =
        upstream_fault_leaves_no_trace("fault=429 retry_after=2", 429, "upstream_rate_limited")
            .await;
    assert_seconds_header(&failed, "retry-after", 60);
}

#[tokio::test]
async fn upstream_hang_is_504_upstream_timeout() {
    upstream_fault_leaves_no_trace("fault=hang hang_ms=20000", 504, "upstream_timeout").await;
}

#[tokio::test]
async fn upstream_500_is_502_upstream_error() {
    upstream_fault_leaves_no_trace("fault=500", 502, "upstream_error").await;
}
