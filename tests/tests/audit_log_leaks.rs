//! No leaks (issue 11), on the audit stack, whose functions log at debug level (`make
//! reliability` starts it with `--function-env RUST_LOG=debug`, and without `LOG_PROMPTS`):
//! requests with a JWT, an API key (in both headers) and a distinctive prompt, over every chat
//! and stream route, succeeding and failing; then every log the stack wrote is searched. Neither
//! credential appears anywhere, and the prompt appears in no log but the mock LLM's (which *is*
//! the provider the prompt is sent to). That prompts are logged with `LOG_PROMPTS=true` is
//! tested on the LLM client (shared/tests/llm_client.rs).
//!
//! The search is shown to look at the right place: the functions' log holds the request line of
//! every request sent here, and debug lines of the gateway itself.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use integration_tests::disturb::{function_log, log_files, require_dedicated_stack};
use integration_tests::forge::{self, TRUSTED_RS256_PRIVATE};
use integration_tests::{Caller, Credential, Reply, Stack, jwt_expiry, stack_var, unique};
use jsonwebtoken::Algorithm;
use reqwest::Method;
use serde_json::json;
use shared::auth::Tier;

/// A token the audit stack accepts (RS256, its issuer and audience).
fn audit_jwt() -> String {
    let claims = json!({
        "sub": unique("leak-user-"), "tier": "pro", "exp": jwt_expiry(600),
        "iss": stack_var("JWT_ISSUER").unwrap(), "aud": stack_var("JWT_AUDIENCE").unwrap(),
    });
    forge::rsa(Algorithm::RS256, TRUSTED_RS256_PRIVATE, &claims).unwrap()
}

async fn requests(stack: &Stack, callers: &[Caller], prompt: &str) -> Vec<Reply> {
    let model = stack.registry().unwrap().default_model().id.clone();
    let mut replies = Vec::new();
    for caller in callers {
        let post = |function: &str, path: &str, body: serde_json::Value| {
            stack
                .request(Method::POST, function, path, caller)
                .json(&body)
        };
        let sends = [
            post(
                "chat",
                "chat",
                json!({"message": format!("{prompt} first")}),
            ),
            post(
                "chat",
                "chat",
                json!({"message": format!("[mock fault=500] {prompt} failing")}),
            ),
            post(
                "chat",
                "chat",
                json!({"message": format!("{prompt}\u{0007} refused")}),
            ),
            post(
                "chat",
                "v1/chat/completions",
                json!({"model": model, "messages": [{"role": "system", "content": prompt}, {"role": "user", "content": prompt}]}),
            ),
            post(
                "stream",
                "chat/stream",
                json!({"message": format!("{prompt} streamed"), "system_prompt": prompt}),
            ),
            post(
                "stream",
                "chat/stream",
                json!({"message": format!("[mock fault=cut] {prompt} cut")}),
            ),
            post(
                "stream",
                "v1/chat/completions",
                json!({"model": model, "stream": true, "messages": [{"role": "user", "content": prompt}]}),
            ),
            stack
                .request(Method::POST, "chat", "chat", caller)
                .header("content-type", "application/json")
                .body(format!("{{\"message\": \"{prompt}\" trailing")),
            stack.request(Method::GET, "chat", "conversations", caller),
        ];
        for send in sends {
            replies.push(stack.send(send).await.unwrap());
        }
    }
    replies
}

#[tokio::test]
async fn debug_logs_hold_no_credential_and_no_prompt() {
    let stack = require_dedicated_stack("audit");
    let level = stack_var("RUST_LOG").unwrap();
    assert!(
        level
            .split(',')
            .any(|d| d.trim() == "debug" || d.trim() == "trace"),
        "the audit stack must log at debug level, RUST_LOG is {level:?}"
    );
    assert_ne!(
        std::env::var("LOG_PROMPTS").as_deref(),
        Ok("true"),
        "the audit stack must not log prompts"
    );
    let keyed = stack.new_user(Tier::Pro).await.unwrap();
    let key = keyed.api_key().unwrap().to_owned();
    let token = audit_jwt();
    let signature = token.rsplit('.').next().unwrap().to_owned();
    let prompt = unique("CanaryPrompt");
    let callers = [
        keyed.clone(),
        keyed.with_api_key_as_bearer(),
        Caller::presenting(Credential::Bearer(token.clone())),
    ];
    let mut replies = requests(&stack, &callers, &prompt).await;
    // Rejected credentials are secrets too: a near miss of the key and a tampered token.
    let near_miss = format!("{}0", &key[..key.len() - 1]);
    replies.push(
        stack
            .get(
                "chat",
                "models",
                &Caller::presenting(Credential::ApiKey(near_miss.clone())),
            )
            .await
            .unwrap(),
    );
    let tampered = format!("{}x", &token[..token.len() - 1]);
    replies.push(
        stack
            .get(
                "chat",
                "models",
                &Caller::presenting(Credential::Bearer(tampered.clone())),
            )
            .await
            .unwrap(),
    );
    // The emulator and watch flush line by line; give the pumps a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let secrets = [
        ("the API key", key.as_str()),
        ("the near-miss API key", near_miss.as_str()),
        ("the JWT", token.as_str()),
        ("the JWT's signature", signature.as_str()),
        ("the tampered JWT", tampered.as_str()),
    ];
    let mut found = Vec::new();
    for file in log_files().unwrap() {
        let text = String::from_utf8_lossy(&std::fs::read(&file).unwrap()).into_owned();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        for (what, secret) in secrets {
            if text.contains(secret) {
                found.push(format!("{what} is in {name}"));
            }
        }
        if !name.starts_with("mock-llm") {
            for line in text.lines().filter(|l| l.contains(&prompt)) {
                let shown: String = line.chars().take(300).collect();
                found.push(format!("the prompt is in {name}: {shown}"));
            }
        }
    }
    assert!(found.is_empty(), "{}", found.join("\n"));

    // The search looked at the right log, at the right level.
    let log = function_log().unwrap();
    for reply in &replies {
        let id = reply.header("x-request-id").unwrap();
        assert!(
            log.contains(id),
            "request {id} is not in the functions' log"
        );
    }
    assert!(
        log.lines()
            .any(|l| l.contains("DEBUG") && l.contains("credentials rejected")),
        "no debug line of the gateway in the functions' log"
    );
    // And no answer handed a credential back.
    for reply in &replies {
        let text = reply.to_string();
        for (what, secret) in secrets {
            assert!(!text.contains(secret), "{what} came back in\n{reply}");
        }
    }
}
