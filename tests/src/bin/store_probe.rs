//! One rate-limit check through the functions' own DynamoDB client (`shared::dynamo::client`,
//! with its timeouts and retry policy) against whatever `AWS_ENDPOINT_URL_DYNAMODB` names, for
//! tests that point it at a misbehaving fake (tests/dynamodb_throttling.rs). Prints one JSON
//! line: `{"status", "code", "elapsed_ms"}` of the error the store returned, or `"status": 200`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Instant;

use shared::ratelimit::{Charge, CounterKey, DynamoRateLimits, REQUESTS, RateLimitStore};

#[tokio::main]
async fn main() -> ExitCode {
    let store = DynamoRateLimits::new(shared::dynamo::client().await, "probe-table");
    let key = CounterKey::hourly("probe", shared::dynamo::now_epoch());
    let charge = Charge {
        counter: REQUESTS.to_owned(),
        amount: 1,
        limit: 10,
    };
    let started = Instant::now();
    let outcome = store.try_charge(&key, &[charge]).await;
    let elapsed_ms = started.elapsed().as_millis();
    let line = match outcome {
        Ok(_) => serde_json::json!({"status": 200, "code": null, "elapsed_ms": elapsed_ms}),
        Err(err) => serde_json::json!({
            "status": err.status().as_u16(),
            "code": err.code(),
            "message": err.envelope().error.message,
            "elapsed_ms": elapsed_ms,
        }),
    };
    match writeln!(std::io::stdout(), "{line}") {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}
