//! The batch binary's event dispatch, driven by the same fixtures `sam local invoke` uses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use lambda_runtime::{Context, LambdaEvent};
use serde_json::Value;

fn config() -> shared::Config {
    shared::Config::from_lookup(|name| name.ends_with("_TABLE").then(|| format!("t-{name}")))
        .unwrap()
}

fn event(fixture: &str) -> LambdaEvent<Value> {
    LambdaEvent::new(serde_json::from_str(fixture).unwrap(), Context::default())
}

#[tokio::test]
async fn function_url_event_reaches_the_router() {
    let router = batch::app(&config());
    let out = batch::handle_event(router, event(include_str!("../../../events/health.json")))
        .await
        .unwrap();
    assert_eq!(out["statusCode"], 200, "{out}");
    let body: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["function"], "batch");
    assert!(out["headers"]["x-request-id"].is_string(), "{out}");
}

#[tokio::test]
async fn scheduled_event_runs_the_drain_not_the_router() {
    let router = batch::app(&config());
    let out = batch::handle_event(
        router,
        event(include_str!("../../../events/scheduled.json")),
    )
    .await
    .unwrap();
    assert!(out.get("statusCode").is_none(), "{out}");
    assert_eq!(out["jobs_claimed"], 0);
}

#[tokio::test]
async fn unknown_event_shape_is_an_error_not_a_panic() {
    let router = batch::app(&config());
    let result = batch::handle_event(router, event(r#"{"hello": "world"}"#)).await;
    assert!(result.is_err());
}
