//! `POST /analyze/analyze` (issue 7) through `cargo lambda watch`, against the mock LLM.
//!
//! The mock answers every request with `[mock] messages=N last=<first 40 characters of the last
//! user message> lorem ipsum ...`, which is not the JSON object an analysis task asks for. So:
//! - in `mode=auto` every task's reply fails validation, is asked again once, and the task falls
//!   back to its local method (`fallback_reason: invalid_llm_reply`); the tests use that to see
//!   how many upstream calls ran and how long they took;
//! - a content that *starts* with a sentiment object makes the mock's echo carry a valid answer
//!   inside prose, which the LLM path accepts (models wrap JSON in prose too): that is how the
//!   tests reach a successful `method: llm` result through the real client.
//!
//! Tests run in parallel against one stack, so each one counts only the upstream requests that
//! carry its own marker, and uses its own user.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use integration_tests::{Caller, Reply, Stack, unique};
use serde_json::{Value, json};
use shared::auth::Tier;

const TASKS: [&str; 4] = ["sentiment", "keywords", "summary", "entities"];

/// Upstream latency the slow-upstream test asks the mock for (below the stack's 1 s LLM
/// timeout).
const MOCK_LATENCY_MS: u64 = 400;

/// An answer to the sentiment task short enough to survive the mock's 40-character echo.
const SENTIMENT_ANSWER: &str = r#"{"label":"negative","score":-0.5}"#;

const REVIEW: &str = "The battery life is excellent and the screen is bright, but the speaker \
    is terrible. Support answered within two days. Contact support@example.com or visit \
    https://example.com/help before 2025-03-01.";

async fn analyze(stack: &Stack, caller: &Caller, body: &Value) -> Reply {
    stack
        .post_json("analyze", "analyze", caller, body)
        .await
        .unwrap()
}

async fn pro_user(stack: &Stack) -> Caller {
    stack.new_user(Tier::Pro).await.unwrap()
}

/// The function may still be starting under `cargo lambda watch`: one cheap local analysis
/// first, so timing assertions measure the analysis and not the process start.
async fn warm_up(stack: &Stack, caller: &Caller) {
    let reply = analyze(
        stack,
        caller,
        &json!({"content": unique("warm up "), "mode": "local", "tasks": ["sentiment"]}),
    )
    .await;
    reply.assert_status(200);
}

#[tokio::test]
async fn all_tasks_run_concurrently_against_a_slow_upstream() {
    let stack = Stack::require();
    let user = pro_user(&stack).await;
    warm_up(&stack, &user).await;
    let marker = unique("concurrent");
    let content = format!("{REVIEW} {marker} [mock latency_ms={MOCK_LATENCY_MS}]");

    let started = Instant::now();
    let reply = analyze(&stack, &user, &json!({"content": content})).await;
    let elapsed = started.elapsed();
    reply.assert_status(200);

    for task in TASKS {
        let result = &reply.json["results"][task];
        assert_eq!(result["method"], "local", "{task}; the reply was\n{reply}");
        assert_eq!(
            result["fallback_reason"], "invalid_llm_reply",
            "{task}; the reply was\n{reply}"
        );
    }
    let upstream = stack.upstream_requests_with(&marker).await.unwrap();
    assert_eq!(
        upstream.len(),
        TASKS.len() * 2,
        "each task asks once and once more after an invalid reply"
    );
    let sequential = Duration::from_millis(MOCK_LATENCY_MS * upstream.len() as u64);
    assert!(
        elapsed < sequential / 2,
        "took {elapsed:?}; one after the other the upstream calls alone take {sequential:?}"
    );
    // Two rounds of concurrent calls: the floor is twice the latency.
    assert!(elapsed >= Duration::from_millis(2 * MOCK_LATENCY_MS));
}

#[tokio::test]
async fn a_valid_llm_answer_is_used_and_named_llm() {
    let stack = Stack::require();
    let user = pro_user(&stack).await;
    let marker = unique("llmok");
    let content = format!("{SENTIMENT_ANSWER} {marker}");

    let reply = analyze(
        &stack,
        &user,
        &json!({"content": content, "mode": "llm", "tasks": ["sentiment"]}),
    )
    .await;
    reply.assert_status(200);
    let sentiment = &reply.json["results"]["sentiment"];
    assert_eq!(sentiment["method"], "llm", "{reply}");
    assert_eq!(sentiment["label"], "negative");
    assert_eq!(sentiment["score"], -0.5);
    assert_eq!(reply.json["errors"], json!({}));
    let model = stack.registry().unwrap().default_model().id.clone();
    assert_eq!(reply.json["model"], model.as_str());
    assert!(reply.json["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(reply.header("x-cache"), Some("MISS"));
    assert!(reply.header_u64("x-ratelimit-remaining").is_some());

    let upstream = stack.upstream_requests_with(&marker).await.unwrap();
    assert_eq!(upstream.len(), 1);
    let turns = upstream[0].turns();
    assert_eq!(turns.len(), 2);
    assert_eq!(turns[0].0, "system");
    assert!(turns[0].1.contains("sentiment"));
    assert_eq!(turns[1], ("user".to_owned(), content));
    assert_eq!(upstream[0].body["temperature"], 0.0);
}

#[tokio::test]
async fn in_llm_mode_a_failing_task_fills_its_error_and_the_other_returns() {
    let stack = Stack::require();
    let user = pro_user(&stack).await;
    let marker = unique("partial");
    // The echo answers the sentiment task; for keywords it is no valid reply, twice.
    let content = format!("{SENTIMENT_ANSWER} {marker}");

    let reply = analyze(
        &stack,
        &user,
        &json!({"content": content, "mode": "llm", "tasks": ["keywords", "sentiment"]}),
    )
    .await;
    reply.assert_status(200);
    assert_eq!(
        reply.json["results"]["sentiment"]["method"], "llm",
        "{reply}"
    );
    assert!(reply.json["results"].get("keywords").is_none(), "{reply}");
    let error = &reply.json["errors"]["keywords"]["error"];
    assert_eq!(error["code"], "upstream_error", "{reply}");
    assert_eq!(
        error["request_id"].as_str(),
        reply.header("x-request-id"),
        "{reply}"
    );
    assert_eq!(
        stack.upstream_requests_with(&marker).await.unwrap().len(),
        3
    );
}

#[tokio::test]
async fn one_task_failing_upstream_falls_back_while_the_others_return() {
    let stack = Stack::require();
    let user = pro_user(&stack).await;
    let marker = unique("fault");
    // Exactly one upstream request, whichever task sends it first, gets a broken body.
    let content = format!("{REVIEW} {marker} [mock fault=malformed times=1 key={marker}]");

    let reply = analyze(&stack, &user, &json!({"content": content})).await;
    reply.assert_status(200);
    let reasons: Vec<&str> = TASKS
        .iter()
        .map(|task| {
            let result = &reply.json["results"][*task];
            assert_eq!(result["method"], "local", "{task}; the reply was\n{reply}");
            result["fallback_reason"].as_str().unwrap_or_default()
        })
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| **r == "upstream_error").count(),
        1,
        "{reasons:?}"
    );
    assert_eq!(
        reasons
            .iter()
            .filter(|r| **r == "invalid_llm_reply")
            .count(),
        3,
        "{reasons:?}"
    );
    assert_eq!(reply.json["errors"], json!({}));
    // The failed task is not retried by the analysis; the three others ask twice.
    assert_eq!(
        stack.upstream_requests_with(&marker).await.unwrap().len(),
        7
    );
}

#[tokio::test]
async fn in_llm_mode_every_task_failing_upstream_is_502() {
    let stack = Stack::require();
    let user = pro_user(&stack).await;
    let marker = unique("allfail");
    let content = format!("{REVIEW} {marker} [mock fault=500]");

    let reply = analyze(
        &stack,
        &user,
        &json!({"content": content, "mode": "llm", "tasks": ["sentiment", "summary"]}),
    )
    .await;
    reply.assert_error(502, "upstream_error");
    assert!(stack.upstream_requests_with(&marker).await.unwrap().len() >= 2);
}

#[tokio::test]
async fn local_mode_makes_no_upstream_call() {
    let stack = Stack::require();
    let user = pro_user(&stack).await;
    let marker = unique("local");
    let before = stack.mock_stats().await.unwrap();
    let content =
        format!("这款手机的屏幕非常出色，电池续航令人满意。张伟在北京买了它，花了3999元。{marker}");

    let reply = analyze(&stack, &user, &json!({"content": content, "mode": "local"})).await;
    reply.assert_status(200);
    assert_eq!(reply.json["language"], "zh");
    for task in TASKS {
        let result = &reply.json["results"][task];
        assert_eq!(result["method"], "local", "{task}; the reply was\n{reply}");
        assert!(result.get("fallback_reason").is_none(), "{reply}");
    }
    assert_eq!(reply.json["results"]["sentiment"]["label"], "positive");
    assert_eq!(reply.json["usage"]["total_tokens"], 0);
    assert_eq!(reply.json["model"], Value::Null);
    // Other tests share the mock, so its global counter may move; none of its requests can
    // carry this test's marker.
    assert!(
        stack
            .upstream_requests_with(&marker)
            .await
            .unwrap()
            .is_empty()
    );
    let after = stack.mock_stats().await.unwrap();
    assert!(after.total >= before.total);
}

#[tokio::test]
async fn a_repeated_analysis_is_served_from_the_cache_without_upstream_call() {
    let stack = Stack::require();
    let user = pro_user(&stack).await;
    let marker = unique("cache");
    let body = json!({
        "content": format!("{SENTIMENT_ANSWER} {marker}"),
        "mode": "llm",
        "tasks": ["sentiment"],
    });

    let first = analyze(&stack, &user, &body).await;
    first.assert_status(200);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(first.json["cached"], false);

    let second = analyze(&stack, &user, &body).await;
    second.assert_status(200);
    assert_eq!(second.header("x-cache"), Some("HIT"), "{second}");
    assert_eq!(second.json["cached"], true);
    assert_eq!(second.json["cost_estimate"], 0.0);
    assert_eq!(second.json["results"], first.json["results"]);
    assert_eq!(
        stack.upstream_requests_with(&marker).await.unwrap().len(),
        1,
        "the hit made no upstream call"
    );
    // Both analyses counted against the rate limit, one request each.
    let first_left = first.header_u64("x-ratelimit-remaining").unwrap();
    assert_eq!(
        second.header_u64("x-ratelimit-remaining"),
        Some(first_left - 1)
    );
}

#[tokio::test]
async fn invalid_requests_are_422_naming_the_field() {
    let stack = Stack::require();
    let user = pro_user(&stack).await;
    let cases = [
        (json!({"content": ""}), vec!["body", "content"]),
        (
            json!({"content": "x".repeat(50_001)}),
            vec!["body", "content"],
        ),
        (
            json!({"content": "hi", "tasks": ["sentiment", "translation"]}),
            vec!["body", "tasks", "1"],
        ),
        (
            json!({"content": "hi", "language": "de"}),
            vec!["body", "language"],
        ),
    ];
    for (body, loc) in cases {
        let reply = analyze(&stack, &user, &body).await;
        reply.assert_error(422, "validation_failed");
        assert_eq!(
            reply.json["error"]["details"][0]["loc"],
            json!(loc),
            "{reply}"
        );
    }
}
