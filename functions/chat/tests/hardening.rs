//! What the function's router does with requests that `cargo lambda watch` cannot deliver as
//! they are (issue 11): a browser origin (watch answers CORS itself; on AWS the function URL's
//! CORS configuration in template.yaml does), a non-UTF-8 JSON body, non-ASCII and repeated
//! credential headers. In process, on in-memory stores and a scripted LLM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, Response};
use http_body_util::BodyExt;
use shared::auth::{ApiKeyRecord, ApiKeyStore, InMemoryApiKeys, Tier, hash_api_key};
use shared::llm::{ModelRegistry, ScriptedLlm};
use shared::services::Services;
use tower::ServiceExt;

const KEY: &str = "gwk_hardening_test";
const FOREIGN_ORIGIN: &str = "https://attacker.example";

async fn app() -> axum::Router {
    let config =
        shared::Config::from_lookup(|name| name.ends_with("_TABLE").then(|| format!("t-{name}")))
            .unwrap();
    let keys = Arc::new(InMemoryApiKeys::new());
    keys.put(&ApiKeyRecord::new(
        hash_api_key(KEY),
        "hardening",
        Tier::Pro,
    ))
    .await
    .unwrap();
    let llm = Arc::new(ScriptedLlm::new(ModelRegistry::builtin().unwrap()));
    chat::app(Services::in_memory(config, llm, keys).unwrap())
}

async fn call(request: Request<Body>) -> (Response<Body>, serde_json::Value) {
    let response = app().await.oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (Response::from_parts(parts, Body::empty()), json)
}

#[tokio::test]
async fn no_cors_header_for_a_foreign_origin_on_any_kind_of_request() {
    let requests = [
        Request::get("/health")
            .header("origin", FOREIGN_ORIGIN)
            .body(Body::empty())
            .unwrap(),
        Request::options("/chat")
            .header("origin", FOREIGN_ORIGIN)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "x-api-key, content-type")
            .body(Body::empty())
            .unwrap(),
        Request::post("/chat")
            .header("origin", FOREIGN_ORIGIN)
            .header("x-api-key", KEY)
            .header("content-type", "application/json")
            .body(Body::from(r#"{"message": ""}"#))
            .unwrap(),
        Request::post("/chat")
            .header("origin", FOREIGN_ORIGIN)
            .body(Body::empty())
            .unwrap(),
    ];
    for request in requests {
        let what = format!("{} {}", request.method(), request.uri());
        let (response, _) = call(request).await;
        for header in response.headers().keys() {
            assert!(
                !header.as_str().starts_with("access-control-"),
                "{what}: the function itself sent {header}"
            );
        }
    }
}

#[tokio::test]
async fn a_json_body_that_is_not_utf8_is_400_invalid_json() {
    let request = Request::post("/chat")
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(Body::from(&b"{\"message\": \"caf\xc3\x28 \xff\xfe\"}"[..]))
        .unwrap();
    let (response, json) = call(request).await;
    assert_eq!(response.status(), 400, "{json}");
    assert_eq!(json["error"]["code"], "invalid_json");
}

#[tokio::test]
async fn non_ascii_or_repeated_api_keys_are_401() {
    let non_ascii = Request::post("/chat")
        .header(
            "x-api-key",
            axum::http::HeaderValue::from_bytes(b"gwk_\xff\xfe").unwrap(),
        )
        .header("content-type", "application/json")
        .body(Body::from(r#"{"message": "hi"}"#))
        .unwrap();
    let repeated = Request::post("/chat")
        .header("x-api-key", KEY)
        .header("x-api-key", KEY)
        .header("content-type", "application/json")
        .body(Body::from(r#"{"message": "hi"}"#))
        .unwrap();
    for request in [non_ascii, repeated] {
        let (response, json) = call(request).await;
        assert_eq!(response.status(), 401, "{json}");
        assert_eq!(json["error"]["code"], "invalid_credentials");
    }
}
