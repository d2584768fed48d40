//! The chat response cache (issue 5): an identical request is answered without an upstream call
//! and without charging tokens, `Cache-Control: no-cache` bypasses it, every input of the prompt
//! is part of the key, and a hit is still stored as a turn.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use integration_tests::{Caller, Reply, Stack, free_tier_quota, now_epoch, unique};
use reqwest::Method;
use serde_json::{Value, json};
use shared::auth::Tier;

async fn chat(stack: &Stack, caller: &Caller, body: &Value) -> Reply {
    let reply = stack.chat(caller, body).await.unwrap();
    reply.assert_status(200);
    reply
}

#[track_caller]
fn assert_miss(reply: &Reply) {
    assert_eq!(reply.header("x-cache"), Some("MISS"), "{reply}");
    assert_eq!(reply.json["cached"], false, "{reply}");
}

#[track_caller]
fn assert_hit(reply: &Reply) {
    assert_eq!(reply.header("x-cache"), Some("HIT"), "{reply}");
    assert_eq!(reply.json["cached"], true, "{reply}");
}

fn conversation_id(reply: &Reply) -> String {
    reply.json["conversation_id"].as_str().unwrap().to_owned()
}

async fn upstream_calls(stack: &Stack, marker: &str) -> usize {
    stack.upstream_requests_with(marker).await.unwrap().len()
}

#[tokio::test]
async fn identical_request_is_a_hit_without_upstream_call_and_is_still_stored() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("hit");
    let message = format!("cache me if you can {marker}");
    let body = json!({
        "message": message,
        "system_prompt": "Answer in one line.",
        "temperature": 0.4,
        "max_tokens": 200,
    });

    let first = chat(&stack, &user, &body).await;
    assert_miss(&first);
    assert_eq!(upstream_calls(&stack, &marker).await, 1);

    let second = chat(&stack, &user, &body).await;
    assert_hit(&second);
    assert_eq!(
        upstream_calls(&stack, &marker).await,
        1,
        "a cache hit must not call the upstream"
    );
    assert_eq!(second.json["message"], first.json["message"]);
    assert_eq!(second.json["model"], first.json["model"]);

    // The hit started its own conversation and stored the turn in it.
    let hit_id = conversation_id(&second);
    assert_ne!(hit_id, conversation_id(&first));
    let stored = stack.conversation(&user, &hit_id).await.unwrap();
    stored.assert_status(200);
    assert_eq!(stored.json["message_count"], 2, "{stored}");
    let messages = stored.json["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "user");
    assert_eq!(messages[0]["content"], message.as_str());
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"], first.json["message"]);
}

#[tokio::test]
async fn no_cache_header_bypasses_the_cache() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("nocache");
    let body = json!({"message": format!("always fresh {marker}")});

    assert_miss(&chat(&stack, &user, &body).await);
    let bypass = stack
        .send(
            stack
                .request(Method::POST, "chat", "chat", &user)
                .header("cache-control", "no-cache")
                .json(&body),
        )
        .await
        .unwrap();
    bypass.assert_status(200);
    assert_miss(&bypass);
    assert_eq!(
        upstream_calls(&stack, &marker).await,
        2,
        "no-cache must call the upstream"
    );

    // Without the header the entry is still there.
    assert_hit(&chat(&stack, &user, &body).await);
    assert_eq!(upstream_calls(&stack, &marker).await, 2);
}

#[tokio::test]
async fn model_system_prompt_temperature_and_max_tokens_are_part_of_the_key() {
    let stack = Stack::require();
    let registry = stack.registry().unwrap();
    let default_id = registry.default_model().id.clone();
    let other_model = registry
        .models()
        .iter()
        .map(|m| m.id.clone())
        .find(|id| *id != default_id && !id.starts_with("mock-"))
        .expect("a second model in the registry");
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("key");
    let base = json!({
        "message": format!("same words {marker}"),
        "system_prompt": "Be exact.",
        "temperature": 0.5,
        "max_tokens": 100,
    });
    assert_miss(&chat(&stack, &user, &base).await);

    let variants = [
        ("model", json!(other_model)),
        ("system_prompt", json!("Be vague.")),
        ("temperature", json!(0.6)),
        ("max_tokens", json!(101)),
    ];
    for (n, (field, value)) in variants.into_iter().enumerate() {
        let mut body = base.clone();
        body[field] = value;
        let reply = chat(&stack, &user, &body).await;
        assert_eq!(reply.header("x-cache"), Some("MISS"), "other {field}");
        assert_eq!(
            upstream_calls(&stack, &marker).await,
            n + 2,
            "another {field} must call the upstream"
        );
    }

    assert_hit(&chat(&stack, &user, &base).await);
    assert_eq!(upstream_calls(&stack, &marker).await, 5);
}

#[tokio::test]
async fn hit_in_a_continued_conversation_needs_the_same_history() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("hist");
    let q1 = format!("opening line {marker}");
    let q2 = format!("follow up line {marker}");

    let x1 = chat(&stack, &user, &json!({"message": q1})).await;
    assert_miss(&x1);
    let y1 = chat(&stack, &user, &json!({"message": q1})).await;
    assert_hit(&y1);
    let (x, y) = (conversation_id(&x1), conversation_id(&y1));
    assert_ne!(x, y);

    let x2 = chat(&stack, &user, &json!({"message": q2, "conversation_id": x})).await;
    assert_miss(&x2);
    // Y's history equals X's (the hit stored the same reply), so the same follow-up is a hit.
    let y2 = chat(&stack, &user, &json!({"message": q2, "conversation_id": y})).await;
    assert_hit(&y2);
    assert_eq!(y2.json["message"], x2.json["message"]);
    // The same follow-up in a new conversation has no history: a different request.
    let z1 = chat(&stack, &user, &json!({"message": q2})).await;
    assert_miss(&z1);

    let upstream = stack.upstream_requests_with(&marker).await.unwrap();
    let ending_with = |q: &str| {
        upstream
            .iter()
            .filter(|r| r.turns().last().is_some_and(|(_, c)| c == q))
            .count()
    };
    assert_eq!(ending_with(&q1), 1, "q1 went upstream once");
    assert_eq!(ending_with(&q2), 2, "q2 went upstream for X and for Z");

    let stored = stack.conversation(&user, &y).await.unwrap();
    stored.assert_status(200);
    assert_eq!(stored.json["message_count"], 4, "{stored}");
}

/// A hit must not spend the caller's tokens-per-minute budget. The free tier's budget is small
/// under the local stack, so: spend about half of it on one long answer, repeat it (a hit), then
/// ask for a reservation that fits only if the hit charged nothing.
#[tokio::test]
async fn cache_hit_spends_no_tokens_of_the_budget() {
    const RESERVATION_SLACK: u64 = 200;
    let stack = Stack::require();
    let (requests, tokens_per_minute) = free_tier_quota();
    assert!(
        requests >= 3 && tokens_per_minute <= 8_000,
        "this test needs the stack's lowered free-tier quotas \
         (RATE_LIMIT_FREE_REQUESTS_PER_HOUR >= 3, RATE_LIMIT_FREE_TOKENS_PER_MINUTE <= 8000)"
    );
    let long_answer = tokens_per_minute * 47 / 100;

    // All three requests must fall into one token window (one minute).
    let second = now_epoch() % 60;
    if second > 40 {
        tokio::time::sleep(Duration::from_secs(61 - second)).await;
    }
    let window = now_epoch() / 60;

    let user = stack.new_user(Tier::Free).await.unwrap();
    let marker = unique("budget");
    let body = json!({
        "message": format!("[mock tokens={long_answer}] tell me a long story {marker}"),
        "max_tokens": long_answer + 50,
    });
    let first = chat(&stack, &user, &body).await;
    assert_miss(&first);
    assert_eq!(
        first.json["usage"]["completion_tokens"].as_u64(),
        Some(long_answer)
    );
    let spent = first.json["usage"]["total_tokens"].as_u64().unwrap();

    assert_hit(&chat(&stack, &user, &body).await);

    // Fits when only `spent` is used; would not if the hit had charged anything like `spent`.
    let max_tokens = tokens_per_minute - spent - RESERVATION_SLACK;
    let third = stack
        .chat(
            &user,
            &json!({"message": format!("a short one {marker}"), "max_tokens": max_tokens}),
        )
        .await
        .unwrap();
    assert_eq!(
        now_epoch() / 60,
        window,
        "the requests crossed a minute boundary, so the budget was reset; rerun"
    );
    assert_eq!(
        third.status.as_u16(),
        200,
        "a reservation of {max_tokens} tokens after spending {spent} of {tokens_per_minute} \
         was refused: the cache hit was charged tokens\n{third}"
    );
}
