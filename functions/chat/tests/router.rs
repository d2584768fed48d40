//! The chat router in process, on in-memory stores and a scripted LLM (no Lambda, no network).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use axum::body::Body;
use axum::http::Request;
use serde_json::{Value, json};
use shared::ApiError;
use shared::auth::Tier;
use shared::llm::ScriptedLlm;
use shared::services::Services;

const ALICE: &str = "gwk_test_alice";
const BOB: &str = "gwk_test_bob";

struct Harness {
    services: Services,
    llm: Arc<ScriptedLlm>,
}

async fn harness() -> Harness {
    let h = test_support::in_memory(
        &[(ALICE, "alice", Tier::Pro), (BOB, "bob", Tier::Pro)],
        &[("STREAM_FUNCTION_URL", "https://stream.example/")],
    )
    .await;
    Harness {
        services: h.services,
        llm: h.llm,
    }
}

impl Harness {
    async fn call(&self, request: Request<Body>) -> (u16, axum::http::HeaderMap, Value) {
        let reply = test_support::call(chat::app(self.services.clone()), request).await;
        let json = reply.json();
        (reply.status, reply.headers, json)
    }

    async fn post(
        &self,
        path: &str,
        key: &str,
        body: Value,
    ) -> (u16, axum::http::HeaderMap, Value) {
        self.call(
            Request::post(path)
                .header("x-api-key", key)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
    }

    async fn get(&self, path: &str, key: &str) -> (u16, Value) {
        let (status, _, body) = self
            .call(
                Request::get(path)
                    .header("x-api-key", key)
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        (status, body)
    }
}

#[tokio::test]
async fn health_names_the_function() {
    let h = harness().await;
    let (status, _, body) = h
        .call(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["function"], "chat");
}

#[tokio::test]
async fn deep_health_reports_a_failing_llm_as_503() {
    let h = harness().await;
    h.llm.set_healthy(false);
    let (status, _, body) = h
        .call(
            Request::get("/health?deep=true")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, 503);
    assert_eq!(body["checks"]["llm"], "failed");
}

#[tokio::test]
async fn openapi_documents_every_route() {
    let h = harness().await;
    let (status, _, body) = h
        .call(Request::get("/openapi.json").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, 200);
    for path in [
        "/chat",
        "/v1/chat/completions",
        "/models",
        "/v1/models",
        "/conversations",
        "/conversations/{id}",
        "/health",
        "/openapi.json",
    ] {
        assert!(
            body["paths"][path].is_object(),
            "{path} missing from openapi.json"
        );
    }
    assert!(body["components"]["securitySchemes"]["api_key"].is_object());
    assert!(body["components"]["schemas"]["ChatRequest"].is_object());
}

#[tokio::test]
async fn missing_credentials_is_401_before_the_body_is_read() {
    let h = harness().await;
    let (status, _, body) = h
        .post("/chat", "gwk_unknown", json!({"message": "hi"}))
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "invalid_credentials");
    assert_eq!(h.llm.requests().len(), 0);
}

#[tokio::test]
async fn each_validation_rule_is_a_422_naming_its_field() {
    let h = harness().await;
    let cases = [
        (json!({"message": "   "}), "message"),
        (json!({"message": "x".repeat(5001)}), "message"),
        (json!({"message": "bell\u{7}"}), "message"),
        (
            json!({"message": "hi", "system_prompt": "s".repeat(1001)}),
            "system_prompt",
        ),
        (json!({"message": "hi", "temperature": 2.5}), "temperature"),
        (json!({"message": "hi", "temperature": -0.1}), "temperature"),
        (json!({"message": "hi", "max_tokens": 0}), "max_tokens"),
        (json!({"message": "hi", "max_tokens": 4001}), "max_tokens"),
        (
            json!({"message": "hi", "conversation_id": "not-a-uuid"}),
            "conversation_id",
        ),
        (json!({"message": "hi", "model": "no-such-model"}), "model"),
        (json!({"message": 5}), "message"),
    ];
    for (body, field) in cases {
        let (status, _, out) = h.post("/chat", ALICE, body.clone()).await;
        assert_eq!(status, 422, "{body} -> {out}");
        assert_eq!(
            out["error"]["details"][0]["loc"],
            json!(["body", field]),
            "{body} -> {out}"
        );
    }
    assert_eq!(h.llm.requests().len(), 0, "nothing reached the model");
}

#[tokio::test]
async fn newline_and_tab_are_allowed_and_text_is_not_rewritten() {
    let h = harness();
    let h = h.await;
    h.llm.push(shared::llm::Scripted::Reply("ok".into()));
    let (status, _, _) = h
        .post(
            "/chat",
            ALICE,
            json!({"message": "  line one\n\tline two  "}),
        )
        .await;
    assert_eq!(status, 200);
    let sent = h.llm.requests();
    assert_eq!(
        sent[0].messages.last().unwrap().content,
        "  line one\n\tline two  "
    );
}

#[tokio::test]
async fn unknown_field_is_400() {
    let h = harness().await;
    let (status, _, out) = h
        .post("/chat", ALICE, json!({"message": "hi", "mesage": "typo"}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(out["error"]["param"], "mesage");
}

#[tokio::test]
async fn an_admitted_request_that_fails_upstream_still_reports_its_rate_limit() {
    let h = harness().await;
    h.llm
        .push(shared::llm::Scripted::Fail(ApiError::UpstreamTimeout));
    let (status, headers, out) = h.post("/chat", ALICE, json!({"message": "hello"})).await;
    assert_eq!(status, 504, "{out}");
    assert_eq!(headers["x-ratelimit-limit"], "1000");
    assert_eq!(headers["x-ratelimit-remaining"], "999");
    assert!(headers.contains_key("x-ratelimit-reset"));

    // Refused before admission: nothing was counted, so nothing is reported.
    let (status, headers, _) = h.post("/chat", ALICE, json!({"message": ""})).await;
    assert_eq!(status, 422);
    assert!(!headers.contains_key("x-ratelimit-limit"));
}

#[tokio::test]
async fn a_turn_is_stored_and_a_repeat_is_a_cache_hit_without_upstream_call() {
    let h = harness().await;
    h.llm
        .push(shared::llm::Scripted::Reply("first answer".into()));
    let (status, headers, first) = h.post("/chat", ALICE, json!({"message": "hello"})).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(headers["x-cache"], "MISS");
    assert_eq!(headers["x-ratelimit-limit"], "1000");
    assert_eq!(first["message"], "first answer");
    assert_eq!(first["cached"], false);

    let (status, headers, second) = h.post("/chat", ALICE, json!({"message": "hello"})).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(headers["x-cache"], "HIT");
    assert_eq!(second["message"], "first answer");
    assert_eq!(second["cost_estimate"], 0.0);
    assert_eq!(h.llm.requests().len(), 1, "the hit made no upstream call");

    let id = first["conversation_id"].as_str().unwrap();
    let (status, conversation) = h.get(&format!("/conversations/{id}"), ALICE).await;
    assert_eq!(status, 200);
    assert_eq!(conversation["message_count"], 2);
    assert_eq!(conversation["messages"][1]["content"], "first answer");
}

#[tokio::test]
async fn a_cache_hit_is_served_when_the_token_budget_is_spent() {
    use shared::ratelimit::{CounterKey, tokens_counter};
    let h = harness().await;
    h.llm.push(shared::llm::Scripted::Reply("an answer".into()));
    let (status, headers, _) = h.post("/chat", ALICE, json!({"message": "budget"})).await;
    assert_eq!(
        (status, &headers["x-cache"]),
        (200, &"MISS".parse().unwrap())
    );

    // Overdraw this minute's token budget (as a late settlement can).
    let now = shared::dynamo::now_epoch();
    h.services
        .chat
        .limiter
        .store()
        .adjust(
            &CounterKey::hourly("alice", now),
            &tokens_counter(now - now % 60),
            10_000_000,
        )
        .await
        .unwrap();

    let (status, headers, body) = h.post("/chat", ALICE, json!({"message": "budget"})).await;
    assert_eq!(
        status, 200,
        "a hit spends no tokens, so it needs none: {body}"
    );
    assert_eq!(headers["x-cache"], "HIT");
    let (status, _, body) = h
        .post("/chat", ALICE, json!({"message": "a new one"}))
        .await;
    if shared::dynamo::now_epoch() / 60 == now / 60 {
        assert_eq!(
            status, 429,
            "a miss still needs room for its tokens: {body}"
        );
    }
}

#[tokio::test]
async fn another_principal_gets_404_everywhere() {
    let h = harness().await;
    h.llm.push(shared::llm::Scripted::Reply("mine".into()));
    let (_, _, first) = h.post("/chat", ALICE, json!({"message": "private"})).await;
    let id = first["conversation_id"].as_str().unwrap().to_owned();

    assert_eq!(h.get(&format!("/conversations/{id}"), BOB).await.0, 404);
    let (status, _, _) = h
        .call(
            Request::delete(format!("/conversations/{id}"))
                .header("x-api-key", BOB)
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(status, 404);
    let (status, _, _) = h
        .post(
            "/chat",
            BOB,
            json!({"message": "let me in", "conversation_id": id}),
        )
        .await;
    assert_eq!(status, 404);
    let (_, list) = h.get("/conversations", BOB).await;
    assert_eq!(list["conversations"], json!([]));
    assert_eq!(h.get(&format!("/conversations/{id}"), ALICE).await.0, 200);
}

#[tokio::test]
async fn openai_stream_request_is_400_naming_the_stream_url() {
    let h = harness().await;
    let (status, _, out) = h
        .post("/v1/chat/completions", ALICE, json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .await;
    assert_eq!(status, 400);
    assert!(
        out["error"]["message"]
            .as_str()
            .unwrap()
            .contains("https://stream.example/v1/chat/completions"),
        "{out}"
    );
}

#[tokio::test]
async fn openai_completion_has_the_openai_shape_and_ignores_unknown_fields() {
    let h = harness().await;
    h.llm
        .push(shared::llm::Scripted::Reply("hello there".into()));
    let (status, _, out) = h
        .post(
            "/v1/chat/completions",
            ALICE,
            json!({"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}], "presence_penalty": 0.5, "logprobs": false}),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["object"], "chat.completion");
    assert_eq!(out["choices"][0]["message"]["content"], "hello there");
    assert_eq!(out["choices"][0]["message"]["role"], "assistant");
    assert!(out["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(h.llm.requests()[0].messages.len(), 2);
}

#[tokio::test]
async fn models_list_the_registry_in_both_shapes() {
    let h = harness().await;
    let (status, catalog) = h.get("/models", ALICE).await;
    assert_eq!(status, 200);
    let mini = catalog["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "gpt-4o-mini")
        .unwrap();
    assert!(mini["input_price_per_1k"].as_f64().unwrap() > 0.0);
    let (status, list) = h.get("/v1/models", ALICE).await;
    assert_eq!(status, 200);
    assert_eq!(list["object"], "list");
    assert!(
        list["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "gpt-4o-mini" && m["object"] == "model")
    );
}

#[tokio::test]
async fn conversation_listing_validates_its_query() {
    let h = harness().await;
    assert_eq!(h.get("/conversations?limit=0", ALICE).await.0, 422);
    assert_eq!(h.get("/conversations?limit=abc", ALICE).await.0, 422);
    assert_eq!(h.get("/conversations?cursor=%%%", ALICE).await.0, 400);
    assert_eq!(h.get("/conversations/../../etc", ALICE).await.0, 404);
    assert_eq!(h.get("/conversations/not-a-uuid", ALICE).await.0, 422);
}
