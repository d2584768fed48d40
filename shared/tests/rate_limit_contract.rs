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
    Admission, CounterKey, DynamoRateLimits, InMemoryRateLimits, RateLimitStore, RateLimiter,
    TOKENS_PER_MINUTE,
};

async fn dynamo_store() -> Arc<dyn RateLimitStore> {
    let table = common::stack_var("RATE_LIMITS_TABLE");
    Arc::new(DynamoRateLimits::new(common::dynamo().await, table))
}

fn key(subject: &str) -> CounterKey {
    CounterKey::new(TOKENS_PER_MINUTE, subject, shared::dynamo::now_epoch())
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

async fn admits_until_the_limit_then_rejects(store: Arc<dyn RateLimitStore>) {
    let k = key(&common::unique("fill"));
    for i in 1..=3 {
        assert_eq!(
            store.try_add(&k, 10, 30).await.unwrap(),
            Admission::Admitted { count: 10 * i }
        );
    }
    match store.try_add(&k, 1, 30).await.unwrap() {
        Admission::Rejected { count } => assert!(count.is_none() || count == Some(30)),
        other => panic!("expected rejection, got {other:?}"),
    }
    assert_eq!(store.current(&k).await.unwrap(), 30);
    // An amount larger than the whole limit can never be admitted, even on a fresh key.
    let fresh = key(&common::unique("huge"));
    assert!(matches!(
        store.try_add(&fresh, 31, 30).await.unwrap(),
        Admission::Rejected { .. }
    ));
    assert_eq!(store.current(&fresh).await.unwrap(), 0);
}

async fn adjust_refunds_and_charges(store: Arc<dyn RateLimitStore>) {
    let k = key(&common::unique("adjust"));
    store.try_add(&k, 100, 1000).await.unwrap();
    store.adjust(&k, -60).await.unwrap();
    assert_eq!(store.current(&k).await.unwrap(), 40);
    store.adjust(&k, 25).await.unwrap();
    assert_eq!(store.current(&k).await.unwrap(), 65);
}

async fn concurrent_checks_admit_exactly_the_limit(store: Arc<dyn RateLimitStore>) {
    let k = key(&common::unique("race"));
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move { store.try_add(&k, 1, 50).await.unwrap() })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Admission::Admitted { .. }) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 50);
    assert_eq!(store.current(&k).await.unwrap(), 50);
}

async fn token_reservations_settle_and_release(store: Arc<dyn RateLimitStore>) {
    let limiter = RateLimiter::new(store.clone(), quotas(10, 1_000));
    let who = principal(&common::unique("tpm"));
    let k = key(&who.user_id);

    let r = limiter.reserve_tokens(&who, 600).await.unwrap();
    assert_eq!(store.current(&k).await.unwrap(), 600);
    limiter.settle(r, 150).await.unwrap();
    assert_eq!(
        store.current(&k).await.unwrap(),
        150,
        "unused part refunded"
    );

    let r = limiter.reserve_tokens(&who, 800).await.unwrap();
    limiter.release(r).await.unwrap();
    assert_eq!(
        store.current(&k).await.unwrap(),
        150,
        "failed call releases everything"
    );

    // 150 used: a request that may need 900 does not fit in the 1000 budget.
    let err = limiter.reserve_tokens(&who, 900).await.unwrap_err();
    assert_eq!(err.status().as_u16(), 429);
    assert!(
        err.retry_after_secs()
            .is_some_and(|s| (1..=60).contains(&s))
    );

    let r = limiter.reserve_tokens(&who, 100).await.unwrap();
    limiter.settle(r, 400).await.unwrap();
    assert_eq!(
        store.current(&k).await.unwrap(),
        550,
        "underestimate charged"
    );
}

async fn request_quota_reports_remaining_then_429(store: Arc<dyn RateLimitStore>) {
    let limiter = RateLimiter::new(store, quotas(3, 1_000));
    let who = principal(&common::unique("rph"));
    for remaining in [2, 1, 0] {
        let status = limiter.admit_requests(&who, 1).await.unwrap();
        assert_eq!((status.limit, status.remaining), (3, remaining));
        assert!((1..=3600).contains(&status.reset_after_secs));
    }
    let err = limiter.admit_requests(&who, 1).await.unwrap_err();
    assert_eq!(err.status().as_u16(), 429);
    // Another principal has its own counter.
    assert!(
        limiter
            .admit_requests(&principal(&common::unique("other")), 1)
            .await
            .is_ok()
    );
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
    adjust_refunds_and_charges,
    concurrent_checks_admit_exactly_the_limit,
    token_reservations_settle_and_release,
    request_quota_reports_remaining_then_429
);

const WORKER_KEY_VAR: &str = "RATE_LIMIT_WORKER_KEY";

/// Child side of the multi-process test: a no-op unless started by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn multi_process_worker() {
    let Ok(id) = std::env::var(WORKER_KEY_VAR) else {
        return;
    };
    let store = dynamo_store().await;
    let k = CounterKey {
        id,
        resets_at: shared::dynamo::now_epoch() + 120,
    };
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move { store.try_add(&k, 1, 50).await.unwrap() })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        if matches!(t.await.unwrap(), Admission::Admitted { .. }) {
            admitted += 1;
        }
    }
    println!("ADMITTED={admitted}");
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
    let k = CounterKey {
        id,
        resets_at: shared::dynamo::now_epoch() + 120,
    };
    let mut admitted = 0;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let (store, k) = (store.clone(), k.clone());
            tokio::spawn(async move { store.try_add(&k, 1, 50).await.unwrap() })
        })
        .collect();
    for t in tasks {
        if matches!(t.await.unwrap(), Admission::Admitted { .. }) {
            admitted += 1;
        }
    }
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "worker failed");
        let text = String::from_utf8_lossy(&out.stdout);
        // libtest prints "test name ... " on the same line before the test's own output.
        let line = text
            .lines()
            .find_map(|l| l.split("ADMITTED=").nth(1))
            .expect("worker printed its count");
        admitted += line.trim().parse::<u64>().unwrap();
    }
    assert_eq!(admitted, 50, "admitted across 4 processes");
    assert_eq!(store.current(&k).await.unwrap(), 50);
}
