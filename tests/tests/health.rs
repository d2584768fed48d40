//! Every function, served by `cargo lambda watch`: liveness, its OpenAPI document, and the
//! error envelope of an unknown route.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use integration_tests::{Caller, FUNCTIONS, Reply, Stack, unique};

async fn get(stack: &Stack, function: &str, path: &str) -> Reply {
    stack
        .get(function, path, &Caller::anonymous())
        .await
        .unwrap_or_else(|e| panic!("GET {function}/{path}: {e}"))
}

#[track_caller]
fn assert_stamped(reply: &Reply) {
    let id = reply.header("x-request-id");
    assert!(
        id.is_some_and(|id| !id.trim().is_empty()),
        "x-request-id missing; the reply was\n{reply}"
    );
    let took = reply
        .header("x-process-time-ms")
        .and_then(|v| v.parse::<f64>().ok());
    assert!(
        took.is_some_and(|ms| ms.is_finite() && ms >= 0.0),
        "x-process-time-ms missing or not a non-negative number; the reply was\n{reply}"
    );
}

async fn health_is_ok(function: &str) {
    let stack = Stack::require();
    let reply = get(&stack, function, "health").await;
    reply.assert_status(200);
    assert_eq!(reply.json["status"], "ok", "{reply}");
    assert_eq!(reply.json["function"], function, "{reply}");
    assert_stamped(&reply);
}

#[tokio::test]
async fn chat_health_answers_ok_without_credentials() {
    health_is_ok("chat").await;
}

#[tokio::test]
async fn stream_health_answers_ok_without_credentials() {
    health_is_ok("stream").await;
}

#[tokio::test]
async fn analyze_health_answers_ok_without_credentials() {
    health_is_ok("analyze").await;
}

#[tokio::test]
async fn batch_health_answers_ok_without_credentials() {
    health_is_ok("batch").await;
}

async fn openapi_document_describes(function: &str) {
    let stack = Stack::require();
    let reply = get(&stack, function, "openapi.json").await;
    reply.assert_status(200);
    assert_stamped(&reply);
    let version = reply.json["openapi"].as_str().unwrap_or_default();
    assert!(
        version.starts_with("3.1"),
        "expected an OpenAPI 3.1 document, got version {version:?}"
    );
    assert_eq!(reply.json["info"]["title"], function, "info.title");
    let paths = reply.json["paths"]
        .as_object()
        .unwrap_or_else(|| panic!("no `paths` object in\n{reply}"));
    assert!(
        paths.contains_key("/health"),
        "/health is not documented; paths are {:?}",
        paths.keys().collect::<Vec<_>>()
    );
    assert!(
        paths["/health"].get("get").is_some(),
        "/health documents no GET operation"
    );
}

#[tokio::test]
async fn chat_serves_its_openapi_3_1_document() {
    openapi_document_describes("chat").await;
}

#[tokio::test]
async fn stream_serves_its_openapi_3_1_document() {
    openapi_document_describes("stream").await;
}

#[tokio::test]
async fn analyze_serves_its_openapi_3_1_document() {
    openapi_document_describes("analyze").await;
}

#[tokio::test]
async fn batch_serves_its_openapi_3_1_document() {
    openapi_document_describes("batch").await;
}

#[tokio::test]
async fn unknown_route_is_a_json_404_envelope_carrying_the_request_id() {
    let stack = Stack::require();
    for function in FUNCTIONS {
        let path = unique("no-such-route-");
        let reply = get(&stack, function, &path).await;
        reply.assert_error(404, "not_found");
        assert_stamped(&reply);
        let content_type = reply.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "{function}: error content type {content_type:?}"
        );
    }
}

#[tokio::test]
async fn valid_incoming_request_id_is_kept_and_invalid_one_replaced() {
    let stack = Stack::require();
    for function in FUNCTIONS {
        let id = unique("it-req-");
        let reply = stack
            .send(
                stack
                    .http()
                    .get(stack.url(function, "health"))
                    .header("x-request-id", &id),
            )
            .await
            .unwrap();
        reply.assert_status(200);
        assert_eq!(
            reply.header("x-request-id"),
            Some(id.as_str()),
            "{function}"
        );

        // Spaces and `!` are not allowed in a request id: the function must mint its own.
        let bad = format!("{id} with spaces!");
        let reply = stack
            .send(
                stack
                    .http()
                    .get(stack.url(function, "health"))
                    .header("x-request-id", &bad),
            )
            .await
            .unwrap();
        reply.assert_status(200);
        let echoed = reply.header("x-request-id").unwrap_or_default();
        assert!(
            !echoed.is_empty() && echoed != bad,
            "{function}: an invalid request id must be replaced, got {echoed:?}"
        );
    }
}
