//! Test support: the DynamoDB emulator of the local stack.
#![allow(clippy::expect_used, clippy::panic, dead_code)]

/// Reads a variable the local stack exports, failing loudly (never skipping) when absent.
pub fn stack_var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: this test needs the local stack (DynamoDB emulator and mock LLM). \
             Run it under `python infra/devstack.py run -- cargo nextest run` (that is what `make test` does)."
        )
    })
}

/// A DynamoDB client pointed at the emulator through the standard AWS environment.
pub async fn dynamo() -> aws_sdk_dynamodb::Client {
    stack_var("AWS_ENDPOINT_URL_DYNAMODB");
    shared::dynamo::client().await
}

/// A per-test unique string, so tests can share the emulator's tables.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}
