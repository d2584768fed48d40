//! `POST /chat/chat` (issue 5): the turn's response and headers, what reaches the upstream,
//! authentication, request validation, and the deep health check.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use integration_tests::{
    Caller, Credential, Reply, Stack, expected_cost, free_tier_quota, is_rfc3339, jwt_expiry,
    mint_jwt, mock_reply_prefix, requests_per_hour, same_cost, stack_var, unique,
};
use reqwest::Method;
use serde_json::{Value, json};
use shared::auth::Tier;

/// The temperature and completion limit a request gets when it names neither.
const DEFAULT_TEMPERATURE: f64 = 0.7;
const DEFAULT_MAX_TOKENS: u64 = 1000;
const MAX_MESSAGE_CHARS: usize = 5000;
const MAX_SYSTEM_PROMPT_CHARS: usize = 1000;
const ONE_MIB: usize = 1024 * 1024;

#[track_caller]
fn assert_rate_limit_headers(reply: &Reply, limit: u64, remaining: u64) {
    assert_eq!(
        reply.header_u64("x-ratelimit-limit"),
        Some(limit),
        "x-ratelimit-limit; the reply was\n{reply}"
    );
    assert_eq!(
        reply.header_u64("x-ratelimit-remaining"),
        Some(remaining),
        "x-ratelimit-remaining; the reply was\n{reply}"
    );
    let reset = reply.header_u64("x-ratelimit-reset");
    assert!(
        reset.is_some_and(|s| (1..=3600).contains(&s)),
        "x-ratelimit-reset must be the seconds until the hourly window resets; the reply was\n{reply}"
    );
}

/// The locations named by a 422's `error.details`.
fn detail_locations(reply: &Reply) -> BTreeSet<Vec<String>> {
    reply.json["error"]["details"]
        .as_array()
        .unwrap_or_else(|| panic!("422 without error.details:\n{reply}"))
        .iter()
        .map(|detail| {
            assert!(
                detail["msg"].as_str().is_some_and(|m| !m.is_empty()),
                "detail without msg: {detail}"
            );
            assert!(
                detail["type"].as_str().is_some_and(|t| !t.is_empty()),
                "detail without type: {detail}"
            );
            detail["loc"]
                .as_array()
                .unwrap_or_else(|| panic!("detail without loc: {detail}"))
                .iter()
                .map(|part| part.as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .collect()
}

fn body_loc(field: &str) -> Vec<String> {
    vec!["body".to_owned(), field.to_owned()]
}

#[tokio::test]
async fn chat_turn_answers_with_the_contract_fields_and_headers() {
    let stack = Stack::require();
    let registry = stack.registry().unwrap();
    let model = registry.default_model();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("turn");
    let message = format!("hello gateway {marker}");

    let reply = stack
        .chat(&user, &json!({"message": message}))
        .await
        .unwrap();
    reply.assert_status(200);
    let body = &reply.json;

    let text = body["message"].as_str().unwrap_or_default();
    assert!(
        text.starts_with(&mock_reply_prefix(1, &message)),
        "the reply should be the mock's answer to exactly one message: {text:?}"
    );
    let conversation_id = body["conversation_id"].as_str().unwrap_or_default();
    assert!(
        uuid::Uuid::parse_str(conversation_id).is_ok(),
        "conversation_id {conversation_id:?} is not a UUID"
    );
    assert_eq!(body["model"], model.id.as_str(), "default model");
    assert_eq!(body["cached"], false);
    assert!(
        body["created_at"].as_str().is_some_and(is_rfc3339),
        "created_at must be RFC 3339: {}",
        body["created_at"]
    );

    // The upstream saw exactly this one request, with the defaults filled in.
    let upstream = stack.upstream_requests_with(&marker).await.unwrap();
    assert_eq!(upstream.len(), 1, "upstream requests for one turn");
    let request = &upstream[0];
    assert_eq!(request.model.as_deref(), Some(model.id.as_str()));
    assert_eq!(request.turns(), [("user".to_owned(), message.clone())]);
    let temperature = request.body["temperature"].as_f64().unwrap_or(f64::NAN);
    assert!(
        (temperature - DEFAULT_TEMPERATURE).abs() < 1e-6,
        "default temperature sent upstream: {}",
        request.body
    );
    assert_eq!(
        request.token_limit(),
        Some(DEFAULT_MAX_TOKENS),
        "default max_tokens sent upstream: {}",
        request.body
    );

    // Usage is the upstream's, and the cost is priced from the registry.
    let usage = &body["usage"];
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(prompt, request.mock_prompt_tokens(), "prompt_tokens");
    assert_eq!(
        completion,
        text.split_whitespace().count() as u64,
        "completion_tokens (the mock answers one token per word)"
    );
    assert_eq!(usage["total_tokens"].as_u64(), Some(prompt + completion));
    let cost = body["cost_estimate"].as_f64().unwrap();
    let expected = expected_cost(model, prompt, completion);
    assert!(
        cost > 0.0 && same_cost(cost, expected),
        "cost_estimate {cost} != {expected}"
    );

    assert_eq!(reply.header("x-cache"), Some("MISS"));
    let limit = requests_per_hour(Tier::Pro);
    assert_rate_limit_headers(&reply, limit, limit - 1);
    assert!(reply.header("x-request-id").is_some_and(|v| !v.is_empty()));
}

#[tokio::test]
async fn system_prompt_model_alias_and_sampling_options_reach_the_upstream() {
    let stack = Stack::require();
    let registry = stack.registry().unwrap();
    let default_id = registry.default_model().id.clone();
    let (model, alias) = registry
        .models()
        .iter()
        .filter(|m| m.id != default_id)
        .find_map(|m| m.aliases.first().map(|alias| (m, alias.clone())))
        .expect("the registry has a non-default model with an alias");
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("opts");
    let system_prompt = format!("You answer tersely. {marker}");
    let message = format!("what is two plus two {marker}");

    let body = stack
        .chat_ok(
            &user,
            &json!({
                "message": message,
                "system_prompt": system_prompt,
                "model": alias,
                "temperature": 0.25,
                "max_tokens": 50,
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        body["model"],
        model.id.as_str(),
        "an alias answers with the model's id"
    );
    let text = body["message"].as_str().unwrap_or_default();
    assert!(
        text.starts_with(&mock_reply_prefix(2, &message)),
        "system prompt + message should reach the upstream: {text:?}"
    );

    let upstream = stack.upstream_requests_with(&marker).await.unwrap();
    assert_eq!(upstream.len(), 1);
    let request = &upstream[0];
    assert_eq!(request.model.as_deref(), Some(model.id.as_str()));
    assert_eq!(
        request.turns(),
        [
            ("system".to_owned(), system_prompt),
            ("user".to_owned(), message)
        ]
    );
    let temperature = request.body["temperature"].as_f64().unwrap_or(f64::NAN);
    assert!((temperature - 0.25).abs() < 1e-6, "{}", request.body);
    assert_eq!(request.token_limit(), Some(50), "{}", request.body);

    let prompt = body["usage"]["prompt_tokens"].as_u64().unwrap();
    let completion = body["usage"]["completion_tokens"].as_u64().unwrap();
    let cost = body["cost_estimate"].as_f64().unwrap();
    assert!(
        same_cost(cost, expected_cost(model, prompt, completion)),
        "cost_estimate {cost} must use {}'s prices",
        model.id
    );
}

#[tokio::test]
async fn jwt_bearer_authenticates_with_the_tier_of_its_claim() {
    let stack = Stack::require();
    let (free_requests, _) = free_tier_quota();
    let cases = [
        (Some(Tier::Enterprise), requests_per_hour(Tier::Enterprise)),
        (Some(Tier::Pro), requests_per_hour(Tier::Pro)),
        (Some(Tier::Free), free_requests),
        // No tier claim means free.
        (None, free_requests),
    ];
    for (tier, limit) in cases {
        let caller = stack.jwt_user(tier).await.unwrap();
        let reply = stack
            .chat(
                &caller,
                &json!({"message": format!("jwt hello {}", unique("jwt"))}),
            )
            .await
            .unwrap();
        reply.assert_status(200);
        assert_rate_limit_headers(&reply, limit, limit - 1);
        let id = reply.json["conversation_id"].as_str().unwrap();
        // The token's subject owns what it created.
        stack
            .conversation(&caller, id)
            .await
            .unwrap()
            .assert_status(200);
    }
}

#[tokio::test]
async fn api_key_is_accepted_in_the_bearer_header_like_openai_sdks_send_it() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let bearer = user.with_api_key_as_bearer();
    assert!(matches!(bearer.credential, Credential::Bearer(_)));

    let reply = stack
        .chat(
            &bearer,
            &json!({"message": format!("bearer key {}", unique("bk"))}),
        )
        .await
        .unwrap();
    reply.assert_status(200);
    let limit = requests_per_hour(Tier::Pro);
    assert_rate_limit_headers(&reply, limit, limit - 1);
    // Same principal whichever header carries the key.
    let id = reply.json["conversation_id"].as_str().unwrap();
    stack
        .conversation(&user, id)
        .await
        .unwrap()
        .assert_status(200);
}

#[tokio::test]
async fn missing_or_bad_credentials_are_401_and_never_reach_the_upstream() {
    let stack = Stack::require();
    let marker = unique("auth");
    let secret = stack_var("JWT_SECRET").unwrap();
    let revoked = stack.new_user(Tier::Pro).await.unwrap();
    assert!(
        stack.revoke(&revoked).await.unwrap(),
        "revoking a stored key"
    );
    let expired = mint_jwt(
        &secret,
        &json!({"sub": unique("it-jwt-"), "tier": "pro", "exp": jwt_expiry(-3600)}),
    )
    .unwrap();
    let forged = mint_jwt(
        &format!("{secret}-not-the-secret"),
        &json!({"sub": unique("it-jwt-"), "tier": "pro", "exp": jwt_expiry(600)}),
    )
    .unwrap();
    let no_exp = mint_jwt(&secret, &json!({"sub": unique("it-jwt-"), "tier": "pro"})).unwrap();
    let unknown_key = format!("{}{}", shared::auth::API_KEY_PREFIX, unique(""));

    let cases = [
        ("no credentials", Caller::anonymous()),
        (
            "unknown API key",
            Caller::presenting(Credential::ApiKey(unknown_key.clone())),
        ),
        (
            "unknown API key as bearer",
            Caller::presenting(Credential::Bearer(unknown_key)),
        ),
        ("revoked API key", revoked),
        (
            "expired JWT",
            Caller::presenting(Credential::Bearer(expired)),
        ),
        (
            "JWT signed with another secret",
            Caller::presenting(Credential::Bearer(forged)),
        ),
        (
            "JWT without exp",
            Caller::presenting(Credential::Bearer(no_exp)),
        ),
        (
            "garbage bearer",
            Caller::presenting(Credential::Bearer("not-a-token".to_owned())),
        ),
    ];
    for (what, caller) in cases {
        let reply = stack
            .chat(&caller, &json!({"message": format!("who am I {marker}")}))
            .await
            .unwrap();
        assert_eq!(reply.status.as_u16(), 401, "{what}:\n{reply}");
        reply.assert_error(401, "invalid_credentials");
    }
    assert!(
        stack
            .upstream_requests_with(&marker)
            .await
            .unwrap()
            .is_empty(),
        "an unauthenticated request reached the upstream"
    );
}

#[tokio::test]
async fn malformed_json_is_400_invalid_json() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let reply = stack
        .send(
            stack
                .request(Method::POST, "chat", "chat", &user)
                .header("content-type", "application/json")
                .body(r#"{"message": "unterminated"#),
        )
        .await
        .unwrap();
    reply.assert_error(400, "invalid_json");
}

#[tokio::test]
async fn unknown_field_is_400_unknown_field_naming_it() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("uf");
    let reply = stack
        .chat(
            &user,
            &json!({"message": format!("hi {marker}"), "colour": "blue"}),
        )
        .await
        .unwrap();
    reply.assert_error(400, "unknown_field");
    assert_eq!(reply.json["error"]["param"], "colour", "{reply}");
    assert!(
        stack
            .upstream_requests_with(&marker)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn invalid_fields_are_one_422_naming_every_failing_field() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let reply = stack
        .chat(
            &user,
            &json!({
                "message": "   \n\t  ",
                "temperature": 2.5,
                "max_tokens": 0,
                "system_prompt": "s".repeat(MAX_SYSTEM_PROMPT_CHARS + 1),
            }),
        )
        .await
        .unwrap();
    reply.assert_error(422, "validation_failed");
    let locations = detail_locations(&reply);
    for field in ["message", "temperature", "max_tokens", "system_prompt"] {
        assert!(
            locations.contains(&body_loc(field)),
            "details should name body.{field}; they name {locations:?}"
        );
    }
    assert_eq!(locations.len(), 4, "only the failing fields: {locations:?}");
}

#[tokio::test]
async fn each_out_of_contract_value_is_422_naming_its_field() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("val");
    // Every body carries the marker in a valid field, so none may reach the upstream.
    let ok_message = format!("valid message {marker}");
    let cases: Vec<(&str, &str, Value)> = vec![
        (
            "missing message",
            "message",
            json!({"system_prompt": marker}),
        ),
        (
            "empty message",
            "message",
            json!({"message": "", "system_prompt": marker}),
        ),
        (
            "message over 5000 chars",
            "message",
            json!({"message": "a".repeat(MAX_MESSAGE_CHARS + 1), "system_prompt": marker}),
        ),
        (
            "bell character in message",
            "message",
            json!({"message": format!("ring \u{0007} {marker}")}),
        ),
        (
            "escape character in message",
            "message",
            json!({"message": format!("\u{001b}[31m red {marker}")}),
        ),
        (
            "message of the wrong type",
            "message",
            json!({"message": 42, "system_prompt": marker}),
        ),
        (
            "negative temperature",
            "temperature",
            json!({"message": ok_message, "temperature": -0.1}),
        ),
        (
            "temperature above 2",
            "temperature",
            json!({"message": ok_message, "temperature": 2.01}),
        ),
        (
            "temperature of the wrong type",
            "temperature",
            json!({"message": ok_message, "temperature": "hot"}),
        ),
        (
            "max_tokens 0",
            "max_tokens",
            json!({"message": ok_message, "max_tokens": 0}),
        ),
        (
            "max_tokens above 4000",
            "max_tokens",
            json!({"message": ok_message, "max_tokens": 4001}),
        ),
        (
            "fractional max_tokens",
            "max_tokens",
            json!({"message": ok_message, "max_tokens": 1.5}),
        ),
        (
            "system prompt over 1000 chars",
            "system_prompt",
            json!({"message": ok_message, "system_prompt": "s".repeat(MAX_SYSTEM_PROMPT_CHARS + 1)}),
        ),
        (
            "conversation_id not a UUID",
            "conversation_id",
            json!({"message": ok_message, "conversation_id": "not-a-uuid"}),
        ),
        (
            "unknown model",
            "model",
            json!({"message": ok_message, "model": unique("no-such-model-")}),
        ),
    ];
    for (what, field, body) in cases {
        let reply = stack.chat(&user, &body).await.unwrap();
        assert_eq!(reply.status.as_u16(), 422, "{what}:\n{reply}");
        reply.assert_error(422, "validation_failed");
        let locations = detail_locations(&reply);
        assert!(
            locations.contains(&body_loc(field)),
            "{what}: details should name body.{field}; they name {locations:?}"
        );
    }
    assert!(
        stack
            .upstream_requests_with(&marker)
            .await
            .unwrap()
            .is_empty(),
        "an invalid request reached the upstream"
    );
}

#[tokio::test]
async fn values_at_the_contract_boundaries_are_accepted() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("edge");

    // 5000 characters after trimming, with the allowed control characters inside.
    let head = format!("{marker}\tfirst line\nsecond line ");
    let message = format!(
        "{head}{}",
        "x".repeat(MAX_MESSAGE_CHARS - head.chars().count())
    );
    assert_eq!(message.chars().count(), MAX_MESSAGE_CHARS);
    let body = stack
        .chat_ok(
            &user,
            &json!({
                "message": format!("  {message}  "),
                "system_prompt": "s".repeat(MAX_SYSTEM_PROMPT_CHARS),
                "temperature": 0,
                "max_tokens": 1,
            }),
        )
        .await
        .unwrap();
    assert_eq!(
        body["usage"]["completion_tokens"], 1,
        "max_tokens 1 caps the completion"
    );
    let upstream = stack.upstream_requests_with(&marker).await.unwrap();
    assert_eq!(upstream.len(), 1);
    let sent = upstream[0].turns();
    assert_eq!(
        sent.last().map(|(_, c)| c.trim()),
        Some(message.as_str()),
        "the message reaches the upstream with its tabs and newlines"
    );
    assert_eq!(upstream[0].token_limit(), Some(1));

    let body = stack
        .chat_ok(
            &user,
            &json!({
                "message": format!("upper bounds {marker}"),
                "temperature": 2,
                "max_tokens": 4000,
            }),
        )
        .await
        .unwrap();
    assert_eq!(body["cached"], false);
    let upstream = stack.upstream_requests_with(&marker).await.unwrap();
    assert_eq!(upstream.len(), 2);
    assert_eq!(upstream[1].token_limit(), Some(4000));
}

#[tokio::test]
async fn body_over_one_mib_is_413() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let body = json!({"message": "a".repeat(ONE_MIB + 1024)});
    let reply = stack.chat(&user, &body).await.unwrap();
    reply.assert_error(413, "payload_too_large");
}

#[tokio::test]
async fn deep_health_reports_dynamodb_and_llm_checks() {
    let stack = Stack::require();
    let reply = stack
        .send(
            stack
                .http()
                .get(stack.url_with_query("chat", "health", &[("deep", "true")])),
        )
        .await
        .unwrap();
    reply.assert_status(200);
    assert_eq!(reply.json["status"], "ok", "{reply}");
    let checks = reply.json["checks"]
        .as_object()
        .unwrap_or_else(|| panic!("deep health without `checks`:\n{reply}"));
    for dependency in ["dynamodb", "llm"] {
        assert_eq!(
            checks.get(dependency).and_then(Value::as_str),
            Some("ok"),
            "checks.{dependency}:\n{reply}"
        );
    }
}
