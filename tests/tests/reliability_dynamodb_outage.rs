//! DynamoDB stopped mid-run (issue 11), against a stack of its own (`make reliability`): while
//! the emulator is paused with SIGSTOP every route that needs DynamoDB answers a prompt 503 with
//! the error envelope and nothing of the SDK's text; once it continues, the same function
//! processes serve again, without a restart.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::time::{Duration, Instant};

use integration_tests::disturb::{
    PausedEmulator, crash_lines, function_log_len, function_log_since, function_processes,
    require_dedicated_stack,
};
use integration_tests::store;
use integration_tests::{Caller, Reply, Stack, unique};
use reqwest::Method;
use serde_json::{Value, json};
use shared::auth::Tier;

/// The SDK gives up after its operation timeout (5 s, shared/src/dynamo.rs); a request makes at
/// most one DynamoDB call before it fails, so anything near this bound is a hang.
const OUTAGE_ANSWER_BOUND: Duration = Duration::from_secs(12);
/// How long the service may take to serve again after the emulator continues (it first works
/// off the requests that queued up in its listen backlog).
const RECOVERY_BOUND: Duration = Duration::from_secs(30);

/// Text that would show an SDK error, a file path or a stack trace in a response body.
const INTERNALS: &[&str] = &[
    "dispatch failure",
    "DispatchFailure",
    "TimeoutError",
    "timed out",
    "smithy",
    "aws_sdk",
    "hyper",
    "connector",
    "ResponseError",
    ".rs:",
    "/src/",
    "panicked",
    "stack backtrace",
    "127.0.0.1",
    "local-",
];

fn leaked_internals(text: &str) -> Vec<&'static str> {
    INTERNALS
        .iter()
        .copied()
        .filter(|needle| text.contains(needle))
        .collect()
}

struct Probe {
    what: &'static str,
    request: reqwest::RequestBuilder,
    /// 503 for everything that needs DynamoDB; 200 for plain liveness.
    expected: u16,
}

async fn timed(stack: &Stack, probe: Probe) -> (&'static str, u16, Duration, Reply) {
    let started = Instant::now();
    let reply = stack.send(probe.request).await.unwrap();
    (probe.what, probe.expected, started.elapsed(), reply)
}

fn post(
    stack: &Stack,
    function: &str,
    path: &str,
    caller: &Caller,
    body: Value,
) -> reqwest::RequestBuilder {
    stack
        .request(Method::POST, function, path, caller)
        .json(&body)
}

#[tokio::test]
async fn dynamodb_paused_mid_run_is_a_prompt_503_and_service_resumes_without_restart() {
    let stack = require_dedicated_stack("reliability");
    let model = stack.registry().unwrap().default_model().id.clone();
    // An API key needs DynamoDB to authenticate; a JWT does not, so its requests reach the
    // stores behind authentication.
    let keyed = stack.new_user(Tier::Pro).await.unwrap();
    let jwt = stack.jwt_user(Some(Tier::Pro)).await.unwrap();
    let marker = unique("outage");

    let first = stack
        .chat_ok(
            &jwt,
            &json!({"message": format!("before the outage {marker}")}),
        )
        .await
        .unwrap();
    let id = first["conversation_id"].as_str().unwrap().to_owned();
    stack
        .chat_ok(
            &keyed,
            &json!({"message": format!("keyed before {marker}")}),
        )
        .await
        .unwrap();
    stack
        .send(post(
            &stack,
            "stream",
            "chat/stream",
            &jwt,
            json!({"message": format!("stream before {marker}")}),
        ))
        .await
        .unwrap()
        .assert_status(200);
    let processes_before = function_processes().unwrap();
    assert!(
        ["chat", "stream"]
            .iter()
            .all(|f| processes_before.contains_key(*f)),
        "chat and stream processes must be running before the outage: {processes_before:?}"
    );
    let log_before = function_log_len().unwrap();

    let paused = PausedEmulator::pause().await.unwrap();
    assert!(paused.is_stopped(), "the emulator did not stop");
    let probes = vec![
        Probe {
            what: "POST /chat with an API key",
            request: post(
                &stack,
                "chat",
                "chat",
                &keyed,
                json!({"message": format!("during {marker}")}),
            ),
            expected: 503,
        },
        Probe {
            what: "POST /chat with a JWT, new conversation",
            request: post(
                &stack,
                "chat",
                "chat",
                &jwt,
                json!({"message": format!("during new {marker}")}),
            ),
            expected: 503,
        },
        Probe {
            what: "POST /chat with a JWT, continuing",
            request: post(
                &stack,
                "chat",
                "chat",
                &jwt,
                json!({"message": format!("during cont {marker}"), "conversation_id": id}),
            ),
            expected: 503,
        },
        Probe {
            what: "POST /v1/chat/completions (chat)",
            request: post(
                &stack,
                "chat",
                "v1/chat/completions",
                &jwt,
                json!({"model": model, "messages": [{"role": "user", "content": format!("during v1 {marker}")}]}),
            ),
            expected: 503,
        },
        Probe {
            what: "GET /conversations",
            request: stack.request(Method::GET, "chat", "conversations", &jwt),
            expected: 503,
        },
        Probe {
            what: "GET /conversations/{id}",
            request: stack.request(Method::GET, "chat", &format!("conversations/{id}"), &jwt),
            expected: 503,
        },
        Probe {
            what: "POST /chat/stream",
            request: post(
                &stack,
                "stream",
                "chat/stream",
                &jwt,
                json!({"message": format!("during stream {marker}")}),
            ),
            expected: 503,
        },
        Probe {
            what: "POST /v1/chat/completions stream=true (stream)",
            request: post(
                &stack,
                "stream",
                "v1/chat/completions",
                &jwt,
                json!({"model": model, "stream": true, "messages": [{"role": "user", "content": format!("during sse {marker}")}]}),
            ),
            expected: 503,
        },
        Probe {
            what: "GET /health?deep=true",
            request: stack
                .http()
                .get(stack.url_with_query("chat", "health", &[("deep", "true")])),
            expected: 503,
        },
        Probe {
            what: "GET /health (liveness needs no DynamoDB)",
            request: stack.http().get(stack.url("chat", "health")),
            expected: 200,
        },
    ];
    let results =
        futures::future::join_all(probes.into_iter().map(|probe| timed(&stack, probe))).await;
    let still_stopped = paused.is_stopped();
    paused.resume().unwrap();

    let mut failures = Vec::new();
    for (what, expected, took, reply) in &results {
        eprintln!("during the outage: {what} -> {} in {took:?}", reply.status);
        if *took > OUTAGE_ANSWER_BOUND {
            failures.push(format!("{what}: took {took:?}"));
        }
        if reply.status.as_u16() != *expected {
            failures.push(format!("{what}: expected {expected}, got\n{reply}"));
            continue;
        }
        let leaked = leaked_internals(&reply.text);
        if !leaked.is_empty() {
            failures.push(format!("{what}: body shows {leaked:?}:\n{reply}"));
        }
        if *expected != 503 {
            continue;
        }
        if what.starts_with("GET /health") {
            if reply.json["checks"]["dynamodb"] != "failed" || reply.json["status"] != "degraded" {
                failures.push(format!(
                    "{what}: the deep check must name DynamoDB:\n{reply}"
                ));
            }
            continue;
        }
        if reply.error_code() != Some("service_unavailable")
            || reply.json["error"]["message"] != "DynamoDB is unavailable"
            || reply.header_u64("retry-after").is_none()
        {
            failures.push(format!(
                "{what}: expected the service_unavailable envelope naming DynamoDB, with \
                 Retry-After:\n{reply}"
            ));
        }
    }
    assert!(
        still_stopped,
        "the emulator was not stopped for the whole outage"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));

    // The service comes back by itself: the first turn that succeeds ends the recovery.
    let resumed = Instant::now();
    let after = format!("after the outage {marker}");
    loop {
        let reply = stack
            .chat(&jwt, &json!({"message": after, "conversation_id": id}))
            .await
            .unwrap();
        if reply.status == 200 {
            break;
        }
        assert!(
            resumed.elapsed() < RECOVERY_BOUND,
            "no successful turn {RECOVERY_BOUND:?} after the emulator continued; last:\n{reply}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "first successful turn {:?} after resuming",
        resumed.elapsed()
    );
    stack
        .chat_ok(&keyed, &json!({"message": format!("keyed after {marker}")}))
        .await
        .unwrap();
    let streamed = stack
        .send(post(
            &stack,
            "stream",
            "chat/stream",
            &keyed,
            json!({"message": format!("stream after {marker}")}),
        ))
        .await
        .unwrap();
    streamed.assert_status(200);
    assert!(
        streamed.text.contains("\"type\":\"done\"")
            && streamed.text.trim_end().ends_with("data: [DONE]"),
        "the stream after the outage must complete:\n{streamed}"
    );
    stack
        .get("chat", "conversations", &jwt)
        .await
        .unwrap()
        .assert_status(200);

    // Same processes: nothing was restarted, nothing crashed.
    let processes_after = function_processes().unwrap();
    for (name, pids) in &processes_before {
        for pid in pids {
            assert!(
                processes_after.get(name).is_some_and(|p| p.contains(pid)),
                "{name} process {pid} is gone after the outage: {processes_after:?}"
            );
        }
    }
    let crashes = crash_lines(&function_log_since(log_before).unwrap());
    assert!(crashes.is_empty(), "{crashes:#?}");

    // Whatever the outage did to writes in flight, the conversation is consistent.
    let stored = store::conversation(&stack.dynamodb().await.unwrap(), &id)
        .await
        .unwrap();
    assert!(
        stored.inconsistencies().is_empty(),
        "{:?}",
        stored.inconsistencies()
    );
    assert!(stored.turns() >= 2, "{stored:?}");
}
