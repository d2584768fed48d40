//! The batch router's shared surface, in process (no Lambda, no network).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use axum::body::Body;
use axum::http::Request;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

fn config() -> shared::Config {
    shared::Config::from_lookup(|name| name.ends_with("_TABLE").then(|| format!("t-{name}")))
        .unwrap()
}

async fn get(path: &str) -> (u16, Value) {
    let response = batch::app(&config())
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn health_names_the_function() {
    let (status, body) = get("/health").await;
    assert_eq!(status, 200);
    assert_eq!(body["function"], "batch");
}

#[tokio::test]
async fn openapi_is_3_1_and_titled_for_the_function() {
    let (status, body) = get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(body["openapi"].as_str().unwrap().starts_with("3.1"));
    assert_eq!(body["info"]["title"], "batch");
    assert!(body["paths"]["/health"]["get"].is_object());
}

#[tokio::test]
async fn unknown_route_is_404_envelope() {
    let (status, body) = get("/definitely/not/here").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
}
