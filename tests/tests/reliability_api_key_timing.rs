//! The response time of a wrong API key tells nothing about the stored keys (issue 11).
//!
//! A presented key is hashed and the digest is the table's primary key, so a wrong key costs one
//! hash and one point lookup whatever is stored. Measured here through the function URL, on a
//! quiet stack of its own (`make reliability`), because timing needs a machine that is not busy
//! with the main suite:
//! - method: client-side wall time of `GET /chat/models` (authentication is its only DynamoDB
//!   call) over loopback, the groups interleaved request by request so drift hits them alike,
//!   compared by their medians;
//! - groups: random unknown keys, near misses of a stored key (last or first character
//!   changed), and random unknown keys again after 300 more keys were stored. A lookup that
//!   compared against stored keys, or scanned them, would separate the groups.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::time::Instant;

use integration_tests::disturb::require_dedicated_stack;
use integration_tests::{Caller, Credential, Stack};
use shared::auth::{
    ApiKeyRecord, ApiKeyStore, DynamoApiKeys, Tier, generate_api_key, hash_api_key,
};

const ROUNDS: usize = 150;
const EXTRA_KEYS: usize = 300;
/// Medians may differ by this much (or 25% of the smaller one) without telling anything: loopback
/// timing of one HTTP request through `cargo lambda watch` varies by about that much.
const TOLERANCE_MS: f64 = 1.5;

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

async fn time_wrong_key(stack: &Stack, key: &str) -> (f64, String) {
    let caller = Caller::presenting(Credential::ApiKey(key.to_owned()));
    let started = Instant::now();
    let reply = stack.get("chat", "models", &caller).await.unwrap();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    reply.assert_error(401, "invalid_credentials");
    let mut body = reply.json.clone();
    body["error"]["request_id"] = serde_json::Value::Null;
    (ms, body.to_string())
}

/// A stored key with one character changed at `index`.
fn near_miss(key: &str, index: usize) -> String {
    let mut chars: Vec<char> = key.chars().collect();
    chars[index] = if chars[index] == 'a' { 'b' } else { 'a' };
    chars.into_iter().collect()
}

fn assert_same_time(what: &str, a: f64, b: f64) {
    let allowed = TOLERANCE_MS.max(0.25 * a.min(b));
    assert!(
        (a - b).abs() <= allowed,
        "{what}: medians {a:.2} ms vs {b:.2} ms differ by more than {allowed:.2} ms"
    );
}

#[tokio::test]
async fn wrong_api_key_timing_does_not_depend_on_stored_keys() {
    let stack = require_dedicated_stack("reliability");
    let stored = stack.new_user(Tier::Pro).await.unwrap();
    let key = stored.api_key().unwrap().to_owned();
    let prefix = shared::auth::API_KEY_PREFIX.len();
    // Warm the function and the connection pool.
    for _ in 0..20 {
        time_wrong_key(&stack, &generate_api_key()).await;
    }

    let mut bodies = std::collections::BTreeSet::new();
    let (mut random, mut last_changed, mut first_changed) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for (samples, probe) in [
            (&mut random, generate_api_key()),
            (&mut last_changed, near_miss(&key, key.len() - 1)),
            (&mut first_changed, near_miss(&key, prefix)),
        ] {
            let (ms, body) = time_wrong_key(&stack, &probe).await;
            samples.push(ms);
            bodies.insert(body);
        }
    }

    // Many more stored keys, then the same measurement of unknown keys, interleaved with the
    // first table size's group again (a fresh baseline under the same conditions).
    let table = integration_tests::stack_var("API_KEYS_TABLE").unwrap();
    let keys = DynamoApiKeys::new(stack.dynamodb().await.unwrap(), table);
    let puts = (0..EXTRA_KEYS).map(|n| {
        let keys = keys.clone();
        async move {
            keys.put(&ApiKeyRecord::new(
                hash_api_key(&generate_api_key()),
                format!("timing-{n}"),
                Tier::Free,
            ))
            .await
        }
    });
    for put in futures::future::join_all(puts).await {
        put.unwrap();
    }
    let mut random_after = Vec::new();
    let mut near_after = Vec::new();
    for _ in 0..ROUNDS {
        let (ms, body) = time_wrong_key(&stack, &generate_api_key()).await;
        random_after.push(ms);
        bodies.insert(body);
        let (ms, body) = time_wrong_key(&stack, &near_miss(&key, key.len() - 1)).await;
        near_after.push(ms);
        bodies.insert(body);
    }

    let m_random = median(&mut random);
    let m_last = median(&mut last_changed);
    let m_first = median(&mut first_changed);
    let m_random_after = median(&mut random_after);
    let m_near_after = median(&mut near_after);
    eprintln!(
        "wrong-key timing, medians of {ROUNDS} each: random {m_random:.2} ms, last char changed \
         {m_last:.2} ms, first char changed {m_first:.2} ms; after {EXTRA_KEYS} more keys: random \
         {m_random_after:.2} ms, near miss {m_near_after:.2} ms"
    );
    assert_eq!(
        bodies.len(),
        1,
        "every wrong key must get the same body: {bodies:#?}"
    );
    assert_same_time("near miss (last char) vs random", m_last, m_random);
    assert_same_time("near miss (first char) vs random", m_first, m_random);
    assert_same_time("random, small vs large table", m_random, m_random_after);
    assert_same_time(
        "near miss vs random, large table",
        m_near_after,
        m_random_after,
    );
}
