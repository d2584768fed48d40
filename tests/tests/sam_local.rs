//! The functions as built by `sam build` and run by the SAM local emulator (`sam local invoke`,
//! `sam local start-lambda`) in a local Docker engine, with HTTP API v2 (function URL) events
//! from `events/`, against the local stack's DynamoDB emulator and mock LLM on the host network.
//!
//! Run by `make sam-test` (infra/sam-local.sh test), not by the main suite: they need the
//! Docker engine, the base image and `sam build`, which that script provides (see
//! tests/src/sam.rs). Incremental delivery of streams is tested through cargo lambda watch
//! (the stream function's own tests): SAM local does not stream, so here the stream function's
//! raw streaming prelude and the SSE body after it are checked.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
// Invocation times are printed for the README's timings (nextest shows them with --no-capture).
#![allow(clippy::print_stderr)]

use std::convert::Infallible;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use integration_tests::sam::{
    HttpResponse, SamLocal, StreamedResponse, with_header, with_json_body, with_path,
};
use integration_tests::{mock_message_count, mock_reply_prefix, stack_var, unique};
use serde_json::{Value, json};

async fn dynamodb() -> aws_sdk_dynamodb::Client {
    stack_var("AWS_ENDPOINT_URL_DYNAMODB").unwrap();
    shared::dynamo::client().await
}

/// Every stored row of conversation `id`: `sk` -> item.
async fn conversation_rows(id: &str) -> Vec<std::collections::HashMap<String, AttributeValue>> {
    let table = stack_var("CONVERSATIONS_TABLE").unwrap();
    let out = dynamodb()
        .await
        .query()
        .table_name(table)
        .key_condition_expression("pk = :pk")
        .expression_attribute_values(":pk", AttributeValue::S(format!("CONV#{id}")))
        .send()
        .await
        .unwrap();
    out.items().to_vec()
}

fn s<'a>(item: &'a std::collections::HashMap<String, AttributeValue>, name: &str) -> &'a str {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map_or("", String::as_str)
}

fn n(item: &std::collections::HashMap<String, AttributeValue>, name: &str) -> u64 {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// The batch items "one <marker>", "two <marker>", "three <marker>" were each answered by the
/// mock for their own prompt, in order.
#[track_caller]
fn assert_each_word_answered(results: &[Value], marker: &str) {
    for (result, word) in results.iter().zip(["one", "two", "three"]) {
        let output = result["output"].as_str().unwrap();
        let prompt = format!("{word} {marker}");
        assert!(
            output.starts_with(&mock_reply_prefix(1, &prompt)),
            "{output}"
        );
    }
}

#[track_caller]
fn assert_ok(reply: &HttpResponse, logs: &str) {
    assert_eq!(
        reply.status, 200,
        "status {}; body:\n{}\nlogs:\n{logs}",
        reply.status, reply.body
    );
}

// ------------------------------------------------------------------------------------------
// Health, every function

async fn health_answers_ok(function: &str, name: &str) {
    let sam = SamLocal::require().await;
    let event = sam.event("health.json").unwrap();
    let invocation = sam.invoke(function, &event).await.unwrap();
    let reply = invocation.http().unwrap();
    assert_ok(&reply, &invocation.stderr);
    assert_eq!(reply.json["status"], "ok", "{}", reply.body);
    assert_eq!(reply.json["function"], name, "{}", reply.body);
    assert!(
        reply.header("x-request-id").is_some(),
        "{:?}",
        reply.headers
    );
    eprintln!(
        "sam local invoke {function} /health: {:?}",
        invocation.elapsed
    );
}

#[tokio::test]
async fn chat_health_answers_ok_under_sam_local_invoke() {
    health_answers_ok("ChatFunction", "chat").await;
}

#[tokio::test]
async fn analyze_health_answers_ok_under_sam_local_invoke() {
    health_answers_ok("AnalyzeFunction", "analyze").await;
}

#[tokio::test]
async fn batch_health_answers_ok_under_sam_local_invoke() {
    health_answers_ok("BatchFunction", "batch").await;
}

#[tokio::test]
async fn stream_health_arrives_behind_the_streaming_prelude() {
    let sam = SamLocal::require().await;
    let event = sam.event("health.json").unwrap();
    let invocation = sam.invoke("StreamFunction", &event).await.unwrap();
    let streamed = StreamedResponse::parse(&invocation.stdout)
        .unwrap_or_else(|e| panic!("{e}\nlogs:\n{}", invocation.stderr));
    assert_eq!(streamed.prelude["statusCode"], 200, "{}", streamed.prelude);
    let body: Value = serde_json::from_slice(&streamed.body).unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["function"], "stream");
}

// ------------------------------------------------------------------------------------------
// A chat turn, stored in the emulator; JWT verified with the secret read from SSM

#[tokio::test]
async fn chat_turn_under_sam_local_invoke_is_stored_in_the_emulator() {
    let sam = SamLocal::require().await;
    let user = unique("sam-user-");
    let marker = unique("samchat");
    let message = format!("hello from sam local {marker}");
    // Both secrets exist only as SSM parameters, so a 200 proves the cold start read them: the
    // JWT is verified with the one, and without the other LLM routes answer 503 (and the mock
    // LLM refuses requests that carry no key).
    let token = sam.jwt(&user, "pro").unwrap();
    let event = with_json_body(
        with_header(
            sam.event("chat.json").unwrap(),
            "authorization",
            &format!("Bearer {token}"),
        ),
        &json!({ "message": message }),
    );
    let invocation = sam.invoke("ChatFunction", &event).await.unwrap();
    let reply = invocation.http().unwrap();
    assert_ok(&reply, &invocation.stderr);
    let answer = reply.json["message"].as_str().unwrap().to_owned();
    // The mock LLM's answer to exactly this message: what the function sent upstream.
    assert!(
        answer.starts_with(&mock_reply_prefix(1, &message)),
        "not the mock LLM's answer to {message:?}: {answer}"
    );
    let id = reply.json["conversation_id"].as_str().unwrap();

    let rows = conversation_rows(id).await;
    let meta = rows
        .iter()
        .find(|r| s(r, "sk") == "META")
        .unwrap_or_else(|| panic!("no META row for conversation {id}: {rows:?}"));
    assert_eq!(s(meta, "owner"), user);
    assert_eq!(n(meta, "message_count"), 2);
    let messages: Vec<(&str, &str)> = rows
        .iter()
        .filter(|r| s(r, "sk").starts_with("MSG#"))
        .map(|r| (s(r, "role"), s(r, "content")))
        .collect();
    assert_eq!(
        messages,
        [("user", message.as_str()), ("assistant", answer.as_str())]
    );
}

#[tokio::test]
async fn chat_rejects_a_jwt_signed_with_another_secret_under_sam_local_invoke() {
    let sam = SamLocal::require().await;
    let forged = integration_tests::mint_jwt(
        "a-secret-that-is-not-the-one-in-ssm-0123456789",
        &json!({"sub": unique("forger-"), "exp": integration_tests::jwt_expiry(600)}),
    )
    .unwrap();
    let event = with_header(
        sam.event("chat.json").unwrap(),
        "authorization",
        &format!("Bearer {forged}"),
    );
    let invocation = sam.invoke("ChatFunction", &event).await.unwrap();
    let reply = invocation.http().unwrap();
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert!(reply.json["error"]["code"].is_string(), "{}", reply.body);
}

// ------------------------------------------------------------------------------------------
// Stream: the raw streaming prelude, then the SSE body

#[tokio::test]
async fn stream_under_sam_local_returns_the_prelude_then_the_sse_events() {
    let sam = SamLocal::require().await;
    let user = unique("sam-stream-");
    let marker = unique("samstream");
    let token = sam.jwt(&user, "pro").unwrap();
    let message = format!("stream please {marker}");
    let event = with_json_body(
        with_header(
            sam.event("stream.json").unwrap(),
            "authorization",
            &format!("Bearer {token}"),
        ),
        &json!({ "message": message }),
    );
    let invocation = sam.invoke("StreamFunction", &event).await.unwrap();
    let streamed = StreamedResponse::parse(&invocation.stdout)
        .unwrap_or_else(|e| panic!("{e}\nlogs:\n{}", invocation.stderr));
    let prelude = &streamed.prelude;
    assert_eq!(prelude["statusCode"], 200, "{prelude}");
    let header = |name: &str| prelude["headers"][name].as_str().unwrap_or_default();
    assert!(
        header("content-type").starts_with("text/event-stream"),
        "{prelude}"
    );
    assert_eq!(header("cache-control"), "no-cache", "{prelude}");
    assert_eq!(header("x-accel-buffering"), "no", "{prelude}");

    let body = streamed.body.clone();
    let events: Vec<String> = futures::stream::once(async move { Ok::<_, Infallible>(body) })
        .eventsource()
        .map(|event| event.unwrap().data)
        .collect()
        .await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let parsed: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let types: Vec<&str> = parsed.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.first(), Some(&"start"), "{types:?}");
    assert_eq!(types.last(), Some(&"done"), "{types:?}");
    assert!(
        types[1..types.len() - 1].iter().all(|t| *t == "delta"),
        "{types:?}"
    );
    assert!(types.len() > 2, "no delta events: {types:?}");
    let text: String = parsed
        .iter()
        .filter(|e| e["type"] == "delta")
        .map(|e| e["content"].as_str().unwrap())
        .collect();
    assert!(text.starts_with(&mock_reply_prefix(1, &message)), "{text}");
    let done = parsed.last().unwrap();
    assert!(
        done["usage"]["total_tokens"].as_u64().unwrap() > 0,
        "{done}"
    );

    // The turn is stored once the upstream stream completed.
    let id = parsed[0]["conversation_id"].as_str().unwrap();
    let rows = conversation_rows(id).await;
    let meta = rows.iter().find(|r| s(r, "sk") == "META").unwrap();
    assert_eq!(s(meta, "owner"), user);
    assert_eq!(n(meta, "message_count"), 2);
}

// ------------------------------------------------------------------------------------------
// Analyze and batch

#[tokio::test]
async fn analyze_under_sam_local_invoke_runs_every_task() {
    let sam = SamLocal::require().await;
    let key = stack_var("GW_DEV_API_KEY").unwrap();
    let mut event = with_header(sam.event("analyze.json").unwrap(), "x-api-key", &key);
    // A unique text, so the answer is computed here rather than taken from the cache.
    event = with_json_body(
        event,
        &json!({
            "content": format!("The new release is fast and the docs are excellent. Setup took five minutes. {}", unique("ref")),
            "mode": "local"
        }),
    );
    let invocation = sam.invoke("AnalyzeFunction", &event).await.unwrap();
    let reply = invocation.http().unwrap();
    assert_ok(&reply, &invocation.stderr);
    let results = &reply.json["results"];
    for task in ["sentiment", "keywords", "summary", "entities"] {
        assert_eq!(results[task]["method"], "local", "{task}: {}", reply.body);
    }
    assert_eq!(results["sentiment"]["label"], "positive", "{}", reply.body);
    assert_eq!(reply.json["cached"], false);
}

#[tokio::test]
async fn batch_under_sam_local_invoke_answers_every_item_in_order() {
    let sam = SamLocal::require().await;
    let key = stack_var("GW_DEV_API_KEY").unwrap();
    let marker = unique("sambatch");
    let event = with_json_body(
        with_header(sam.event("batch.json").unwrap(), "x-api-key", &key),
        &json!({
            "items": [
                {"id": "a", "prompt": format!("one {marker}")},
                {"id": "b", "prompt": format!("two {marker}")},
                {"id": "c", "prompt": format!("three {marker}")}
            ],
            "max_concurrency": 2
        }),
    );
    let invocation = sam.invoke("BatchFunction", &event).await.unwrap();
    let reply = invocation.http().unwrap();
    assert_ok(&reply, &invocation.stderr);
    assert_eq!(reply.json["total"], 3, "{}", reply.body);
    assert_eq!(reply.json["successful"], 3, "{}", reply.body);
    let results = reply.json["results"].as_array().unwrap();
    let ids: Vec<&str> = results.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_each_word_answered(results, &marker);
}

// ------------------------------------------------------------------------------------------
// The scheduled drain

#[tokio::test]
async fn scheduled_event_under_sam_local_invoke_drains_a_queued_job() {
    let sam = SamLocal::require().await;
    let user = unique("sam-jobs-");
    let token = sam.jwt(&user, "pro").unwrap();
    let bearer = format!("Bearer {token}");
    let marker = unique("samjob");
    let submit = with_json_body(
        with_header(
            sam.event("batch-job.json").unwrap(),
            "authorization",
            &bearer,
        ),
        &json!({
            "items": [
                {"id": "a", "prompt": format!("one {marker}")},
                {"id": "b", "prompt": format!("two {marker}")},
                {"id": "c", "prompt": format!("three {marker}")}
            ],
            "max_concurrency": 2
        }),
    );
    let invocation = sam.invoke("BatchFunction", &submit).await.unwrap();
    let accepted = invocation.http().unwrap();
    assert_eq!(
        accepted.status, 202,
        "{}\n{}",
        accepted.body, invocation.stderr
    );
    let job_id = accepted.json["job_id"].as_str().unwrap().to_owned();
    assert_eq!(accepted.json["status"], "queued");

    let status_event = with_header(
        with_path(
            sam.event("batch-job-status.json").unwrap(),
            &format!("/batch/jobs/{job_id}"),
        ),
        "authorization",
        &bearer,
    );
    let before = sam
        .invoke("BatchFunction", &status_event)
        .await
        .unwrap()
        .http()
        .unwrap();
    assert_eq!(before.json["status"], "queued", "{}", before.body);

    // The EventBridge scheduled event, as the rule of template.yaml delivers it.
    let scheduled = sam.event("scheduled.json").unwrap();
    let drain = sam.invoke("BatchFunction", &scheduled).await.unwrap();
    eprintln!(
        "drain report: {}",
        String::from_utf8_lossy(&drain.stdout).trim()
    );

    let after = sam
        .invoke("BatchFunction", &status_event)
        .await
        .unwrap()
        .http()
        .unwrap();
    assert_eq!(after.status, 200, "{}", after.body);
    assert_eq!(after.json["status"], "done", "{}", after.body);
    // Every item's result was recorded by the drain, in input order.
    let results = after.json["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{}", after.body);
    for result in results {
        assert_eq!(result["status"], "ok", "{result}");
    }
    assert_each_word_answered(results, &marker);
}

// ------------------------------------------------------------------------------------------
// start-lambda: a batch of invocations against warm containers

#[tokio::test]
async fn start_lambda_serves_a_batch_of_invocations_from_warm_containers() {
    let sam = SamLocal::require().await;
    let lambda = sam.start_lambda().await.unwrap();
    let mut timings = Vec::new();

    for (function, name) in [
        ("ChatFunction", "chat"),
        ("AnalyzeFunction", "analyze"),
        ("BatchFunction", "batch"),
    ] {
        let (payload, took) = lambda
            .invoke(function, &sam.event("health.json").unwrap())
            .await
            .unwrap();
        let reply = HttpResponse::from_payload(&serde_json::from_slice(&payload).unwrap()).unwrap();
        assert_eq!(reply.status, 200, "{function}: {}", reply.body);
        assert_eq!(reply.json["function"], name);
        timings.push((format!("{function} /health"), took));
    }

    // Three turns of one conversation: each sees the history the previous ones stored.
    let user = unique("sam-warm-");
    let token = sam.jwt(&user, "pro").unwrap();
    let mut conversation: Option<String> = None;
    for turn in 0..3 {
        let mut body = json!({ "message": format!("turn {turn} {}", unique("w")) });
        if let Some(id) = &conversation {
            body["conversation_id"] = Value::String(id.clone());
        }
        let event = with_json_body(
            with_header(
                sam.event("chat.json").unwrap(),
                "authorization",
                &format!("Bearer {token}"),
            ),
            &body,
        );
        let (payload, took) = lambda.invoke("ChatFunction", &event).await.unwrap();
        let reply = HttpResponse::from_payload(&serde_json::from_slice(&payload).unwrap()).unwrap();
        assert_eq!(
            reply.status,
            200,
            "turn {turn}: {}\n{}",
            reply.body,
            lambda.log_tail()
        );
        let answer = reply.json["message"].as_str().unwrap();
        // The upstream request carried the stored history plus the new message.
        assert_eq!(mock_message_count(answer), Some(2 * turn + 1), "{answer}");
        conversation = Some(reply.json["conversation_id"].as_str().unwrap().to_owned());
        timings.push((format!("ChatFunction turn {turn}"), took));
    }
    let rows = conversation_rows(conversation.as_deref().unwrap()).await;
    let meta = rows.iter().find(|r| s(r, "sk") == "META").unwrap();
    assert_eq!(n(meta, "message_count"), 6);

    for (what, took) in &timings {
        eprintln!("start-lambda {what}: {} ms", took.as_millis());
    }
    // Warm containers: after the first (cold) invocation of a function, no container start.
    let warm_turns: Vec<Duration> = timings[4..].iter().map(|(_, t)| *t).collect();
    assert!(
        warm_turns.iter().all(|t| *t < Duration::from_secs(10)),
        "warm invocations took {warm_turns:?}"
    );
    lambda.stop().await;
}
