//! `RateLimitStore` contract, run against the in-memory fake and against DynamoDB (emulator).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod common;

use std::sync::Arc;

use shared::auth::{KeyKind, Principal, Tier};
use shared::config::{Quota, TierQuotas};
use shared::ratelimit::{
    Admission, Charge, CounterKey, DynamoRateLimits, InMemoryRateLimits, REQUESTS, RateLimitStore,
    RateLimiter, tokens_counter,
};

async fn dynamo_store() -> Arc<dyn RateLimitStore> {
    let table = common::stack_var("RATE_LIMITS_TABLE");
    Arc::new(DynamoRateLimits::new(common::dynamo().await, table))
}

fn key(subject: &str) -> CounterKey {
    CounterKey::hourly(subject, shared::dynamo::now_epoch())
}

fn charge(counter: &str, amount: u64, limit: u64) -> Charge {
    Charge {
        counter: counter.to_owned(),
        amount,
        limit,
    }
}

fn one(amount: u64, limit: u64) -> [Charge; 1] {
    [charge(REQUESTS, amount, limit)]
}

fn admitted(a: &Admission) -> bool {
    matches!(a, Admission::Admitted { .. })
}

fn principal(user: &str) -> Principal {
    Principal {
        user_id: user.to_owned(),
        tier: Tier::Free,
        key_kind: KeyKind::ApiKey,
    }
}

fn quotas(requests_per_hour: u64, tokens_per_minute: u64) -> TierQuotas {
    let q = Quota {
        requests_per_hour,
        tokens_per_minute,
    };
    TierQuotas {
        anonymous: q,
        free: q,
        pro: q,
        enterprise: q,
    }
}

fn minute_counter() -> String {
    let now = shared::dynamo::now_epoch();
    tokens_counter(now - now % 60)
}

async fn admits_until_the_limit_then_rejects(store: Arc<dyn RateLimitStore>) {
    let k = key(&common::unique("fill"));
    for i in 1..=3 {
        assert_eq!(
            store.try_charge(&k, &one(10, 30)).await.unwrap(),
            Admission::Admitted {
                counts: vec![10 * i]
            }
        );
    }
    assert_eq!(
        store.try_charge(&k, &one(1, 30)).await.unwrap(),
        Admission::Rejected {
            counts: vec![Some(30)]
        }
    );
    assert_eq!(store.current(&k, REQUESTS).await.unwrap(), 30);
    // An amount larger than the whole limit can never be admitted, even on a fresh key.
    let fresh = key(&common::unique("huge"));
    assert!(!admitted(
        &store.try_charge(&fresh, &one(31, 30)).await.unwrap()
    ));
    assert_eq!(store.current(&fresh, REQUESTS).await.unwrap(), 0);
}

async fn a_charge_is_all_or_nothing(store: Arc<dyn RateLimitStore>) {
    let k = key(&common::unique("both"));
    let both = |req, tok| [charge(REQUESTS, req, 5), charge("tokens_1", tok, 100)];
    assert!(admitted(&store.try_charge(&k, &both(1, 90)).await.unwrap()));
    // Requests would fit, tokens would not: neither counter moves.
    assert_eq!(
        store.try_charge(&k, &both(1, 20)).await.unwrap(),
        Admission::Rejected {
            counts: vec![Some(1), Some(90)]
        }
    );
    assert_eq!(store.current(&k, REQUESTS).await.unwrap(), 1);
    assert_eq!(store.current(&k, "tokens_1").await.unwrap(), 90);
    assert!(admitted(&store.try_charge(&k, &both(1, 10)).await.unwrap()));
    assert_eq!(store.current(&k, "tokens_1").await.unwrap(), 100);
}

async fn adjust_refunds_and_charges(store: Arc<dyn RateLimitStore>) {
    let k = key(&common::unique("adjust"));
    store.try_charge(&k, &one(100, 1000)).await.unwrap();
    store.adjust(&k, REQUESTS, -60).await.unwrap();
    assert_eq!(store.current(&k, REQUESTS).await.unwrap(), 40);
    store.adjust(&k, REQUESTS, 25).await.unwrap();
    assert_eq!(store.current(&k, REQUESTS).await.unwrap(), 65);
}

async fn race(store: &Arc<dyn RateLimitStore>, k: &CounterKey, n: usize) -> u64 {
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move { store.try_charge(&k, &one(1, 50)).await.unwrap() })
        })
        .collect();
    let mut count = 0;
    for t in tasks {
        if admitted(&t.await.unwrap()) {
            count += 1;
        }
    }
    count
}

async fn concurrent_checks_admit_exactly_the_limit(store: Arc<dyn RateLimitStore>) {
    let k = key(&common::unique("race"));
    assert_eq!(race(&store, &k, 200).await, 50);
    assert_eq!(store.current(&k, REQUESTS).await.unwrap(), 50);
}

async fn token_reservations_settle_and_release(store: Arc<dyn RateLimitStore>) {
    let limiter = RateLimiter::new(store.clone(), quotas(10, 1_000));
    let who = principal(&common::unique("tpm"));
    let k = key(&who.user_id);
    let tokens = minute_counter();

    let a = limiter.admit(&who, 1, 600).await.unwrap();
    assert_eq!(store.current(&k, &tokens).await.unwrap(), 600);
    limiter.settle(a.reservation, 150).await.unwrap();
    assert_eq!(
        store.current(&k, &tokens).await.unwrap(),
        150,
        "unused part refunded"
    );

    let a = limiter.admit(&who, 1, 800).await.unwrap();
    limiter.release(a.reservation).await.unwrap();
    assert_eq!(
        store.current(&k, &tokens).await.unwrap(),
        150,
        "failed call releases everything"
    );

    // 150 in use: a request that may need 900 does not fit the 1000 budget, and is not counted.
    let err = limiter.admit(&who, 1, 900).await.unwrap_err();
    assert_eq!(err.status().as_u16(), 429);
    assert!(err.to_string().contains("tokens per minute"), "{err}");
    assert!(
        err.retry_after_secs()
            .is_some_and(|s| (1..=60).contains(&s))
    );
    assert_eq!(store.current(&k, REQUESTS).await.unwrap(), 2);

    let a = limiter.admit(&who, 1, 100).await.unwrap();
    limiter.settle(a.reservation, 400).await.unwrap();
    assert_eq!(
        store.current(&k, &tokens).await.unwrap(),
        550,
        "underestimate charged"
    );
}

async fn request_quota_reports_remaining_then_429(store: Arc<dyn RateLimitStore>) {
    let limiter = RateLimiter::new(store, quotas(3, 1_000));
    let who = principal(&common::unique("rph"));
    for remaining in [2, 1, 0] {
        let a = limiter.admit(&who, 1, 10).await.unwrap();
        assert_eq!((a.status.limit, a.status.remaining), (3, remaining));
        assert!((1..=3600).contains(&a.status.reset_after_secs));
        limiter.settle(a.reservation, 10).await.unwrap();
    }
    let err = limiter.admit(&who, 1, 10).await.unwrap_err();
    assert_eq!(err.status().as_u16(), 429);
    assert!(err.to_string().contains("requests per hour"), "{err}");
    // Another principal has its own counter.
    assert!(
        limiter
            .admit(&principal(&common::unique("other")), 1, 10)
            .await
            .is_ok()
    );
}

/// A request that spends no tokens (a cached answer) is counted, needs no room in the token
/// budget, and still meets the request quota.
async fn a_zero_token_admission_counts_the_request_only(store: Arc<dyn RateLimitStore>) {
    let limiter = RateLimiter::new(store.clone(), quotas(2, 1_000));
    let who = principal(&common::unique("zero"));
    let k = key(&who.user_id);
    let tokens = minute_counter();
    // A settlement may leave the minute's budget overdrawn.
    store.adjust(&k, &tokens, 1_500).await.unwrap();
    assert!(
        limiter.admit(&who, 1, 10).await.is_err(),
        "no room for tokens"
    );

    let a = limiter.admit(&who, 1, 0).await.unwrap();
    assert_eq!(a.status.remaining, 1);
    assert_eq!(a.reservation.reserved(), 0);
    assert_eq!(store.current(&k, &tokens).await.unwrap(), 1_500);
    limiter.admit(&who, 1, 0).await.unwrap();
    let err = limiter.admit(&who, 1, 0).await.unwrap_err();
    assert!(err.to_string().contains("requests per hour"), "{err}");
}

macro_rules! contract {
    ($($name:ident),*) => {
        mod in_memory {
            use super::*;
            $( #[tokio::test] async fn $name() { super::$name(Arc::new(InMemoryRateLimits::new())).await } )*
        }
        mod dynamodb {
            use super::*;
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $name() { super::$name(dynamo_store().await).await } )*
        }
    };
}

contract!(
    admits_until_the_limit_then_rejects,
    a_charge_is_all_or_nothing,
    adjust_refunds_and_charges,
    concurrent_checks_admit_exactly_the_limit,
    token_reservations_settle_and_release,
    request_quota_reports_remaining_then_429,
    a_zero_token_admission_counts_the_request_only
);

const WORKER_KEY_VAR: &str = "RATE_LIMIT_WORKER_KEY";

fn shared_key(id: String) -> CounterKey {
    CounterKey {
        id,
        resets_at: shared::dynamo::now_epoch() + 120,
    }
}

/// Child side of the multi-process test: a no-op unless started by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_process_worker() {
    let Ok(id) = std::env::var(WORKER_KEY_VAR) else {
        return;
    };
    let admitted = race(&dynamo_store().await, &shared_key(id), 50).await;
    println!("\nADMITTED={admitted}");
}

/// 200 checks against a limit of 50: 50 from tokio tasks here and 150 from three other OS
/// processes, all on one counter in the emulator. Exactly 50 may pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limit_is_exact_across_processes() {
    let store = dynamo_store().await;
    let id = format!("test#{}#0", common::unique("procs"));
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..3)
        .map(|_| {
            std::process::Command::new(&exe)
                .args([
                    "--exact",
                    "multi_process_worker",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(WORKER_KEY_VAR, &id)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let k = shared_key(id);
    let mut admitted = race(&store, &k, 50).await;
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "worker failed");
        let text = String::from_utf8_lossy(&out.stdout);
        // libtest prints "test name ... " before the test's own output.
        let line = text
            .lines()
            .find_map(|l| l.split("ADMITTED=").nth(1))
            .expect("worker printed its count");
        admitted += line.trim().parse::<u64>().unwrap();
    }
    assert_eq!(admitted, 50, "admitted across 4 processes");
    assert_eq!(store.current(&k, REQUESTS).await.unwrap(), 50);
}
