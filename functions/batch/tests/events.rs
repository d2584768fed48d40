//! The batch binary's event dispatch, driven by the same fixtures `sam local invoke` uses:
//! function-URL events reach the router, scheduled events run the drain under the invocation's
//! deadline.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{ALICE, Harness, harness, harness_with};
use lambda_runtime::{Context, LambdaEvent};
use serde_json::{Value, json};

const HEALTH: &str = include_str!("../../../events/health.json");
const SCHEDULED: &str = include_str!("../../../events/scheduled.json");

fn event(payload: Value, deadline_ms: u64) -> LambdaEvent<Value> {
    let mut context = Context::default();
    context.deadline = deadline_ms;
    context.request_id = "test-invocation".to_owned();
    LambdaEvent::new(payload, context)
}

/// A function-URL event for `method path` with an optional API key and JSON body, built from
/// the health fixture (so the request context, source IP included, is the real shape).
fn url_event(method: &str, path: &str, key: Option<&str>, body: Option<&Value>) -> Value {
    let mut payload: Value = serde_json::from_str(HEALTH).unwrap();
    payload["rawPath"] = json!(path);
    payload["requestContext"]["http"]["method"] = json!(method);
    payload["requestContext"]["http"]["path"] = json!(path);
    if let Some(key) = key {
        payload["headers"]["x-api-key"] = json!(key);
    }
    if let Some(body) = body {
        payload["headers"]["content-type"] = json!("application/json");
        payload["body"] = json!(body.to_string());
    }
    payload
}

async fn invoke(h: &Harness, payload: Value, deadline_ms: u64) -> Value {
    batch::handle_event(
        h.batch.clone(),
        batch::app(h.batch.clone()),
        event(payload, deadline_ms),
    )
    .await
    .unwrap()
}

fn body_of(response: &Value) -> Value {
    serde_json::from_str(response["body"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn function_url_event_reaches_the_router() {
    let h = harness().await;
    let out = invoke(&h, serde_json::from_str(HEALTH).unwrap(), 0).await;
    assert_eq!(out["statusCode"], 200, "{out}");
    assert_eq!(body_of(&out)["function"], "batch");
    assert!(out["headers"]["x-request-id"].is_string(), "{out}");
}

#[tokio::test]
async fn scheduled_event_runs_the_drain_not_the_router() {
    let h = harness().await;
    // No time left (the default context's deadline is long past): the drain starts nothing.
    let out = invoke(&h, serde_json::from_str(SCHEDULED).unwrap(), 0).await;
    assert!(out.get("statusCode").is_none(), "{out}");
    assert_eq!(out["jobs_claimed"], 0);
    assert_eq!(out["stopped"], "deadline");
}

#[tokio::test]
async fn scheduled_event_with_time_left_drains_a_job_submitted_through_the_url() {
    let h = harness().await;
    let items: Vec<Value> = (0..5)
        .map(|i| json!({"prompt": format!("scheduled {i}")}))
        .collect();
    let submit = url_event(
        "POST",
        "/batch/jobs",
        Some(ALICE),
        Some(&json!({ "items": items })),
    );
    let out = invoke(&h, submit, 0).await;
    assert_eq!(out["statusCode"], 202, "{out}");
    let id = body_of(&out)["job_id"].as_str().unwrap().to_owned();

    let deadline = shared::jobs::now_ms() + 20_000;
    let report = invoke(&h, serde_json::from_str(SCHEDULED).unwrap(), deadline).await;
    assert_eq!(report["jobs_claimed"], 1, "{report}");
    assert_eq!(report["jobs_finished"], 1, "{report}");
    assert_eq!(report["items_processed"], 5, "{report}");
    assert_eq!(report["stopped"], "no_work", "{report}");

    let read = url_event("GET", &format!("/batch/jobs/{id}"), Some(ALICE), None);
    let job = body_of(&invoke(&h, read, 0).await);
    assert_eq!(job["status"], "done", "{job}");
    assert_eq!(job["successful"], 5);
}

#[tokio::test]
async fn anonymous_callers_may_batch_but_not_submit_jobs() {
    let h = harness_with(&[("ALLOW_ANONYMOUS", "true")]).await;
    let body = json!({"items": [{"prompt": "anonymous"}]});
    let out = invoke(&h, url_event("POST", "/batch", None, Some(&body)), 0).await;
    assert_eq!(out["statusCode"], 200, "{out}");
    let out = invoke(&h, url_event("POST", "/batch/jobs", None, Some(&body)), 0).await;
    assert_eq!(out["statusCode"], 401, "{out}");
}

#[tokio::test]
async fn unknown_event_shape_is_an_error_not_a_panic() {
    let h = harness().await;
    let result = batch::handle_event(
        h.batch.clone(),
        batch::app(h.batch.clone()),
        event(json!({"hello": "world"}), 0),
    )
    .await;
    assert!(result.is_err());
}

#[test]
fn the_drain_deadline_keeps_the_margin_before_the_invocation_deadline() {
    let margin = Duration::from_secs(2);
    let before = Instant::now();
    let deadline = batch::drain_deadline(shared::jobs::now_ms() + 10_000, margin);
    let left = deadline.duration_since(before);
    assert!(
        (Duration::from_millis(7_900)..=Duration::from_millis(8_050)).contains(&left),
        "{left:?}"
    );
    // `cargo lambda watch` sends its timeout (600000) where Lambda sends an epoch.
    let watch = batch::drain_deadline(600_000, margin).duration_since(Instant::now());
    assert!(
        (Duration::from_millis(597_900)..=Duration::from_millis(598_000)).contains(&watch),
        "{watch:?}"
    );
    // Past or unknown deadlines leave no time at all, never a panic.
    assert!(batch::drain_deadline(0, margin) <= Instant::now());
    assert!(batch::drain_deadline(shared::jobs::now_ms() + 1_000, margin) <= Instant::now());
}
