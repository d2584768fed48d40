//! The chat function's OpenAI-compatible surface (issue 5): `POST /v1/chat/completions`,
//! `GET /v1/models`, `GET /models`, and the official OpenAI Python SDK against them.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use integration_tests::{Caller, Stack, mock_reply_prefix, now_epoch, unique};
use serde_json::{Value, json};
use shared::auth::Tier;

const SDK_SCRIPT_TIMEOUT: Duration = Duration::from_secs(45);

#[tokio::test]
async fn completions_answer_in_openai_shape_and_accept_unknown_openai_fields() {
    let stack = Stack::require();
    let model = stack.registry().unwrap().default_model().id.clone();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("v1");
    let system = format!("You are terse {marker}");
    let question = format!("name three colours {marker}");

    let reply = stack
        .post_json(
            "chat",
            "v1/chat/completions",
            &user,
            &json!({
                "model": model,
                "messages": [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ],
                "temperature": 0.3,
                "max_tokens": 40,
                // OpenAI fields the gateway does not act on must not be rejected.
                "logprobs": false,
                "presence_penalty": 0.5,
                "frequency_penalty": 0,
                "top_p": 1,
                "user": "integration-test",
            }),
        )
        .await
        .unwrap();
    reply.assert_status(200);
    let body = &reply.json;
    assert!(
        body["id"].as_str().is_some_and(|id| !id.is_empty()),
        "{reply}"
    );
    assert_eq!(body["object"], "chat.completion");
    let created = body["created"].as_u64().unwrap_or_default();
    assert!(
        created.abs_diff(now_epoch()) < 300,
        "created {created} is not a current Unix time"
    );
    assert_eq!(body["model"], model.as_str());
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 1);
    assert_eq!(choices[0]["index"], 0);
    assert_eq!(choices[0]["message"]["role"], "assistant");
    assert_eq!(choices[0]["finish_reason"], "stop");
    let content = choices[0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(
        content.starts_with(&mock_reply_prefix(2, &question)),
        "{content:?}"
    );

    let upstream = stack.upstream_requests_with(&marker).await.unwrap();
    assert_eq!(upstream.len(), 1);
    let request = &upstream[0];
    assert_eq!(
        request.turns(),
        [("system".to_owned(), system), ("user".to_owned(), question)]
    );
    assert_eq!(request.token_limit(), Some(40));
    let usage = &body["usage"];
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(prompt, request.mock_prompt_tokens());
    assert_eq!(completion, content.split_whitespace().count() as u64);
    assert_eq!(usage["total_tokens"].as_u64(), Some(prompt + completion));
}

#[tokio::test]
async fn streaming_completion_request_is_400_naming_the_stream_function_url() {
    let stack = Stack::require();
    let stream_url = std::env::var("STREAM_FUNCTION_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| format!("{}/stream", stack.functions_url()));
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("sse");
    let reply = stack
        .post_json(
            "chat",
            "v1/chat/completions",
            &user,
            &json!({
                "model": stack.registry().unwrap().default_model().id,
                "messages": [{"role": "user", "content": format!("stream please {marker}")}],
                "stream": true,
            }),
        )
        .await
        .unwrap();
    reply.assert_status(400);
    let message = reply.json["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(stream_url.trim_end_matches('/')),
        "the message should point to {stream_url}: {message:?}"
    );
    assert!(
        stack
            .upstream_requests_with(&marker)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn v1_models_lists_every_registry_model_in_openai_shape() {
    let stack = Stack::require();
    let registry = stack.registry().unwrap();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let reply = stack.get("chat", "v1/models", &user).await.unwrap();
    reply.assert_status(200);
    assert_eq!(reply.json["object"], "list", "{reply}");
    let data = reply.json["data"].as_array().unwrap();
    for model in registry.models() {
        let entry = data
            .iter()
            .find(|e| e["id"] == model.id.as_str())
            .unwrap_or_else(|| panic!("{} is not listed:\n{reply}", model.id));
        assert_eq!(entry["object"], "model", "{entry}");
        assert!(entry["created"].as_u64().is_some(), "{entry}");
        assert_eq!(entry["owned_by"], model.owned_by.as_str(), "{entry}");
    }
}

#[tokio::test]
async fn model_listings_require_credentials() {
    // ARCHITECTURE.md: authentication on every route but `GET /health`.
    let stack = Stack::require();
    for path in ["v1/models", "models"] {
        let reply = stack.get("chat", path, &Caller::anonymous()).await.unwrap();
        assert_eq!(reply.status.as_u16(), 401, "GET /chat/{path}:\n{reply}");
        reply.assert_error(401, "invalid_credentials");
    }
}

/// Every number in `value`, at any depth.
fn numbers(value: &Value, out: &mut Vec<f64>) {
    match value {
        Value::Number(n) => out.extend(n.as_f64()),
        Value::Array(items) => items.iter().for_each(|v| numbers(v, out)),
        Value::Object(map) => map.values().for_each(|v| numbers(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn models_lists_the_registry_with_prices_limits_and_aliases() {
    let stack = Stack::require();
    let registry = stack.registry().unwrap();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let reply = stack.get("chat", "models", &user).await.unwrap();
    reply.assert_status(200);
    // The listing is an array, under `models` or `data`, or the body itself.
    let entries = ["models", "data"]
        .iter()
        .find_map(|k| reply.json[k].as_array())
        .or_else(|| reply.json.as_array())
        .unwrap_or_else(|| panic!("no list of models in\n{reply}"));
    for model in registry.models() {
        let entry = entries
            .iter()
            .find(|e| e["id"] == model.id.as_str())
            .unwrap_or_else(|| panic!("{} is not listed:\n{reply}", model.id));
        let mut values = Vec::new();
        numbers(entry, &mut values);
        for (what, expected) in [
            ("input price per 1K", model.input_per_1k_usd),
            ("output price per 1K", model.output_per_1k_usd),
            ("context window", f64::from(model.context_window)),
            ("max output tokens", f64::from(model.max_output_tokens)),
        ] {
            assert!(
                values
                    .iter()
                    .any(|v| (v - expected).abs() <= 1e-12 * expected.abs().max(1.0)),
                "{}: {what} {expected} not found in {entry}",
                model.id
            );
        }
        let listed = entry.to_string();
        for alias in &model.aliases {
            assert!(
                listed.contains(&format!("\"{alias}\"")),
                "{}: alias {alias} not listed in {entry}",
                model.id
            );
        }
    }
}

/// `python` on PATH (the venv's under `make test`), else the workspace's `.venv`, whichever can
/// import the pinned `openai` package.
async fn python_with_openai() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    for candidate in [PathBuf::from("python"), venv] {
        let probe = tokio::process::Command::new(&candidate)
            .args(["-c", "import openai"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if probe.is_ok_and(|status| status.success()) {
            return candidate;
        }
    }
    panic!(
        "no Python with the `openai` package: run infra/bootstrap.sh (it installs the pinned \
         tools into .venv), then `make test`"
    );
}

#[tokio::test]
async fn openai_python_sdk_lists_models_completes_and_raises_rate_limit_error() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let key = user.api_key().unwrap().to_owned();
    let python = python_with_openai().await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("openai_compat.py");

    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .env("GW_FUNCTIONS_URL", stack.functions_url())
        .env("GW_COMPAT_API_KEY", &key)
        .env(
            "GW_COMPAT_MODEL",
            &stack.registry().unwrap().default_model().id,
        )
        .env("GW_COMPAT_MARKER", unique("sdk"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(SDK_SCRIPT_TIMEOUT, run)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{} did not finish within {SDK_SCRIPT_TIMEOUT:?}",
                script.display()
            )
        })
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(
        output.status.success(),
        "{} {} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        python.display(),
        script.display(),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );

    // The SDK sent the key as a bearer token; the gateway must have served it as this user.
    let again = stack
        .get("chat", "v1/models", &user.with_api_key_as_bearer())
        .await
        .unwrap();
    again.assert_status(200);
}
