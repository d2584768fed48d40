//! Hostile input on every route (issue 11): every operation that each function's
//! `/openapi.json` documents gets malformed and oversized bodies, the wrong content type, deep
//! nesting, invalid UTF-8, NUL and control characters, absurd numbers, very long headers, and
//! hostile ids in its path. Every answer must be a 4xx the operation documents, in the error
//! envelope, with nothing internal in it, and no function process may die of it.
//!
//! The routes come from the documents, so a route that lands later is covered without a change
//! here. Chat's field-by-field validation has its own tests (tests/chat.rs). What `cargo lambda
//! watch` itself cannot carry to a function (a non-UTF-8 `application/json` body, a header with
//! non-ASCII bytes: it answers its own 500 without calling the function; a repeated header: it
//! keeps one copy) is tested on the routers in process (functions/*/tests/hardening.rs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use integration_tests::{Caller, FUNCTIONS, Reply, Stack, unique};
use reqwest::Method;
use serde_json::json;
use shared::auth::Tier;

/// Above every function's body limit (1 MiB) and the 6 MB payload limit of a function URL.
const HUGE_BODY_BYTES: usize = 7 * 1024 * 1024;

/// Text in a body that would show internals: a stack trace, a source path, the SDK's or the HTTP
/// client's error text, a table name.
const INTERNALS: &[&str] = &[
    "panicked",
    "backtrace",
    ".rs:",
    "/src/",
    "/root/",
    "/home/",
    "/work/",
    "aws_sdk",
    "smithy",
    "DispatchFailure",
    "ServiceError",
    "reqwest::",
    "hyper::",
    "local-",
];

/// One documented operation of one function.
#[derive(Debug, Clone)]
struct Operation {
    function: &'static str,
    method: Method,
    /// The documented path, with `{param}` placeholders.
    path: String,
    takes_body: bool,
    secured: bool,
    documented: BTreeSet<u16>,
}

impl Operation {
    fn name(&self) -> String {
        format!("{} {} {}", self.function, self.method, self.path)
    }

    /// The path with every `{param}` replaced by `value` (already percent-encoded as needed).
    fn path_with(&self, value: &str) -> String {
        let mut out = String::new();
        let mut rest = self.path.as_str();
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            match rest[open..].find('}') {
                Some(close) => {
                    out.push_str(value);
                    rest = &rest[open + close + 1..];
                }
                None => {
                    out.push_str(&rest[open..]);
                    rest = "";
                }
            }
        }
        out.push_str(rest);
        out
    }
}

async fn operations(stack: &Stack) -> Vec<Operation> {
    let mut found = Vec::new();
    for function in FUNCTIONS {
        let doc = stack.openapi(function).await.unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let Ok(method) = method.to_uppercase().parse::<Method>() else {
                    continue;
                };
                found.push(Operation {
                    function,
                    method,
                    path: path.clone(),
                    takes_body: op.get("requestBody").is_some(),
                    secured: op.get("security").is_some(),
                    documented: op["responses"]
                        .as_object()
                        .map(|r| r.keys().filter_map(|k| k.parse().ok()).collect())
                        .unwrap_or_default(),
                });
            }
        }
    }
    assert!(
        found.iter().any(|op| op.takes_body),
        "no operation with a body documented"
    );
    found
}

/// Checks one answer: one of `allowed`, documented for the operation, the error envelope, and
/// nothing internal. Returns what is wrong.
fn judge(op: &Operation, case: &str, allowed: &[u16], reply: &Reply) -> Vec<String> {
    let mut wrong = Vec::new();
    let status = reply.status.as_u16();
    let what = format!("{} [{case}]", op.name());
    if !allowed.contains(&status) {
        wrong.push(format!("{what}: expected one of {allowed:?}, got\n{reply}"));
    } else if !op.documented.contains(&status) {
        wrong.push(format!(
            "{what}: {status} is not documented (documented: {:?})",
            op.documented
        ));
    }
    if status >= 400 {
        let error = &reply.json["error"];
        let complete = ["type", "code", "message", "param", "request_id"]
            .iter()
            .all(|k| error.get(*k).is_some());
        if !complete {
            wrong.push(format!("{what}: not the error envelope:\n{reply}"));
        }
    }
    for needle in INTERNALS {
        if reply.text.contains(needle) {
            wrong.push(format!("{what}: body shows `{needle}`:\n{reply}"));
        }
    }
    wrong
}

async fn send_raw(
    stack: &Stack,
    op: &Operation,
    caller: &Caller,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Reply {
    let mut request = stack.request(op.method.clone(), op.function, path, caller);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    stack.send(request.body(body)).await.unwrap()
}

/// A hostile body: what it is, its content type, its bytes, the statuses it may get.
type BodyCase = (&'static str, Option<&'static str>, Vec<u8>, &'static [u16]);

/// A value nested `depth` levels deep in arrays.
fn nested_arrays(depth: usize) -> String {
    format!(
        "{{\"message\": {}1{}}}",
        "[".repeat(depth),
        "]".repeat(depth)
    )
}

/// An object nested `depth` levels deep.
fn nested_objects(depth: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
}

#[tokio::test]
async fn hostile_bodies_get_a_documented_4xx_on_every_route() {
    let stack = Stack::require();
    let caller = stack.new_user(Tier::Enterprise).await.unwrap();
    let json = Some("application/json");
    let cases: Vec<BodyCase> = vec![
        ("malformed JSON", json, br#"{"message": "#.to_vec(), &[400]),
        (
            "trailing garbage",
            json,
            br#"{"message": "a"} }"#.to_vec(),
            &[400, 422],
        ),
        ("empty body", json, Vec::new(), &[400]),
        (
            "text/plain content type",
            Some("text/plain"),
            br#"{"message": "a"}"#.to_vec(),
            &[415],
        ),
        (
            "form content type",
            Some("application/x-www-form-urlencoded"),
            b"message=a".to_vec(),
            &[415],
        ),
        (
            "no content type",
            None,
            br#"{"message": "a"}"#.to_vec(),
            &[415],
        ),
        (
            "7 MB body",
            json,
            format!("{{\"message\": \"{}\"}}", "a".repeat(HUGE_BODY_BYTES)).into_bytes(),
            &[413],
        ),
        (
            "arrays nested 50000 deep",
            json,
            nested_arrays(50_000).into_bytes(),
            &[400, 422],
        ),
        (
            "objects nested 20000 deep",
            json,
            nested_objects(20_000).into_bytes(),
            &[400, 422],
        ),
        // `cargo lambda watch` answers a non-UTF-8 `application/json` body with its own 500 before
        // any function sees it; with a `+json` type it passes the bytes on as a real function URL
        // does (base64). The functions' own router tests cover plain `application/json`.
        (
            "invalid UTF-8 in a string",
            Some("application/vnd.api+json"),
            b"{\"message\": \"caf\xc3\x28 \xff\xfe\"}".to_vec(),
            &[400, 422],
        ),
        (
            "lone surrogate escape",
            json,
            br#"{"message": "\ud800"}"#.to_vec(),
            &[400, 422],
        ),
        (
            "NUL in a key",
            json,
            b"{\"mess\\u0000age\": \"a\"}".to_vec(),
            &[400, 422],
        ),
        (
            "raw control byte in a string",
            json,
            b"{\"message\": \"a\x01b\"}".to_vec(),
            &[400, 422],
        ),
        (
            "NaN",
            json,
            br#"{"message": "a", "temperature": NaN}"#.to_vec(),
            &[400],
        ),
        (
            "Infinity",
            json,
            br#"{"message": "a", "max_tokens": Infinity}"#.to_vec(),
            &[400],
        ),
        (
            "number beyond f64",
            json,
            br#"{"message": "a", "temperature": 1e400}"#.to_vec(),
            &[400, 422],
        ),
        (
            "integer beyond u64",
            json,
            br#"{"message": "a", "max_tokens": 123456789012345678901234567890}"#.to_vec(),
            &[400, 422],
        ),
        (
            "negative zero and exponent",
            json,
            br#"{"message": "a", "max_tokens": -0e-0}"#.to_vec(),
            &[400, 422],
        ),
        ("top-level array", json, b"[]".to_vec(), &[400, 422]),
        (
            "top-level string",
            json,
            br#""message""#.to_vec(),
            &[400, 422],
        ),
        ("top-level null", json, b"null".to_vec(), &[400, 422]),
        (
            "duplicate keys",
            json,
            br#"{"message": "a", "message": "b"}"#.to_vec(),
            &[400, 422],
        ),
        (
            "BOM before JSON",
            json,
            b"\xef\xbb\xbf{\"message\": \"a\"}".to_vec(),
            &[400],
        ),
    ];
    let mut wrong = Vec::new();
    for op in operations(&stack)
        .await
        .into_iter()
        .filter(|op| op.takes_body)
    {
        let path = op.path_with(&uuid::Uuid::new_v4().to_string());
        for (case, content_type, body, allowed) in &cases {
            let reply = send_raw(&stack, &op, &caller, &path, *content_type, body.clone()).await;
            wrong.extend(judge(&op, case, allowed, &reply));
        }
    }
    assert_functions_alive(&stack, &mut wrong).await;
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

/// Valid JSON whose text fields carry NUL, C0/C1 control characters and other hostile text:
/// refused by validation (422) on the chat routes, never stored, never sent upstream.
#[tokio::test]
async fn nul_and_control_characters_are_refused_before_the_upstream() {
    let stack = Stack::require();
    let caller = stack.new_user(Tier::Enterprise).await.unwrap();
    let marker = unique("ctl");
    let texts = [
        format!("nul \u{0000} {marker}"),
        format!("delete \u{007f} {marker}"),
        format!("c1 \u{0085} {marker}"),
        format!("carriage \r return {marker}"),
        format!("{}{marker}", "\u{0000}".repeat(64)),
    ];
    let mut wrong = Vec::new();
    for (function, path) in [("chat", "chat"), ("stream", "chat/stream")] {
        for text in &texts {
            for body in [
                json!({"message": text}),
                json!({"message": format!("fine {marker}"), "system_prompt": text}),
            ] {
                let reply = stack
                    .post_json(function, path, &caller, &body)
                    .await
                    .unwrap();
                if reply.status != 422 || reply.error_code() != Some("validation_failed") {
                    wrong.push(format!(
                        "{function}/{path} {body}: expected 422, got\n{reply}"
                    ));
                }
            }
        }
        // In the model name the text is looked up, not stored: an unknown model, 422.
        let reply = stack
            .post_json(
                function,
                path,
                &caller,
                &json!({"message": format!("fine {marker}"), "model": "gpt\u{0000}-4o"}),
            )
            .await
            .unwrap();
        if reply.status != 422 {
            wrong.push(format!(
                "{function}/{path} NUL in model: expected 422, got\n{reply}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
    assert!(
        stack
            .upstream_requests_with(&marker)
            .await
            .unwrap()
            .is_empty(),
        "a request with control characters reached the upstream"
    );
}

#[tokio::test]
async fn hostile_ids_in_paths_are_422_or_404_never_someone_elses_data() {
    let stack = Stack::require();
    let caller = stack.new_user(Tier::Enterprise).await.unwrap();
    let long = "a".repeat(4_000);
    let ids: Vec<(&str, String, &[u16])> = vec![
        ("not a UUID", "not-a-uuid".to_owned(), &[422]),
        ("empty-ish", "%20".to_owned(), &[422]),
        ("NUL", "%00".to_owned(), &[422]),
        (
            "path traversal, encoded slashes",
            "..%2F..%2F..%2Fetc%2Fpasswd".to_owned(),
            &[422],
        ),
        (
            "path traversal, encoded dots",
            "%2e%2e%2f%2e%2e%2fhealth".to_owned(),
            &[422],
        ),
        (
            "backslash traversal",
            "..%5C..%5Cwindows".to_owned(),
            &[422],
        ),
        (
            "UUID followed by traversal",
            format!("{}%2F..%2F..", uuid::Uuid::new_v4()),
            &[422],
        ),
        (
            "UUID with a NUL suffix",
            format!("{}%00", uuid::Uuid::new_v4()),
            &[422],
        ),
        ("4000 characters", long, &[422]),
        ("SQL-ish", "1'%20OR%20'1'%3D'1".to_owned(), &[422]),
        ("unknown UUID v4", uuid::Uuid::new_v4().to_string(), &[404]),
        (
            "uppercase UUID",
            uuid::Uuid::new_v4().to_string().to_uppercase(),
            &[404],
        ),
        ("nil UUID", uuid::Uuid::nil().to_string(), &[404]),
        (
            "UUID without hyphens",
            uuid::Uuid::new_v4().simple().to_string(),
            &[404],
        ),
    ];
    let mut wrong = Vec::new();
    let ops: Vec<Operation> = operations(&stack)
        .await
        .into_iter()
        .filter(|op| op.path.contains('{'))
        .collect();
    assert!(
        !ops.is_empty(),
        "no operation with a path parameter documented"
    );
    for op in &ops {
        for (case, id, allowed) in &ids {
            let path = op.path_with(id);
            let mut request = stack.request(op.method.clone(), op.function, &path, &caller);
            if op.takes_body {
                request = request.json(&json!({}));
            }
            let reply = stack.send(request).await.unwrap();
            wrong.extend(judge(op, case, allowed, &reply));
        }
    }
    assert_functions_alive(&stack, &mut wrong).await;
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

#[tokio::test]
async fn very_long_headers_are_refused_cleanly() {
    let stack = Stack::require();
    let caller = stack.new_user(Tier::Enterprise).await.unwrap();
    let key = caller.api_key().unwrap().to_owned();
    let mut wrong = Vec::new();
    for op in operations(&stack).await.into_iter().filter(|op| op.secured) {
        let path = op.path_with(&uuid::Uuid::new_v4().to_string());
        let base = || {
            let request = stack
                .http()
                .request(op.method.clone(), stack.url(op.function, &path));
            if op.takes_body {
                request
                    .header("content-type", "application/json")
                    .body(r#"{"message": "#)
            } else {
                request
            }
        };
        let cases: Vec<(&str, reqwest::RequestBuilder, &[u16])> = vec![
            (
                "20 KB bearer token",
                base().header("authorization", format!("Bearer {}", "e".repeat(20_000))),
                &[401],
            ),
            (
                "10 KB API key",
                base().header("x-api-key", format!("gwk_{}", "0".repeat(10_000))),
                &[401],
            ),
            (
                "16 KB request id with a valid key",
                base()
                    .header("x-api-key", &key)
                    .header("x-request-id", "r".repeat(16_000)),
                &[200, 400, 404, 422],
            ),
        ];
        for (case, request, allowed) in cases {
            let reply = stack.send(request).await.unwrap();
            wrong.extend(judge(&op, case, allowed, &reply));
            if case.contains("request id")
                && reply
                    .header("x-request-id")
                    .is_some_and(|id| id.len() > 128)
            {
                wrong.push(format!("{}: a 16 KB request id was echoed", op.name()));
            }
        }
    }
    assert_functions_alive(&stack, &mut wrong).await;
    assert!(wrong.is_empty(), "{}", wrong.join("\n\n"));
}

/// After hostile input, every function still answers its liveness check.
async fn assert_functions_alive(stack: &Stack, wrong: &mut Vec<String>) {
    for function in FUNCTIONS {
        let reply = stack
            .get(function, "health", &Caller::anonymous())
            .await
            .unwrap();
        if reply.status != 200 {
            wrong.push(format!("{function} /health after hostile input:\n{reply}"));
        }
    }
}
