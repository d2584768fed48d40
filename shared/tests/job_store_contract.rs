//! `JobStore` contract, run against the in-memory fake and against DynamoDB (emulator).
//!
//! Leases are compared with times the caller passes in, so every test lays out its own
//! timeline (`t0` plus offsets) instead of sleeping. On the emulator each test gets its own copy
//! of the stack's Jobs table (same keys and index, read from the table the local stack created
//! from template.yaml): a scheduled drain running at the same time in the end-to-end tests
//! claims whatever is queued in the shared table, and must not take these tests' jobs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::types::{BillingMode, GlobalSecondaryIndex};
use serde_json::json;
use shared::auth::Tier;
use shared::jobs::{
    DynamoJobs, InMemoryJobs, ItemOutcome, ItemState, JobStatus, JobStore, NewJob, now_ms,
};
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(3_600);
const LEASE_MS: u64 = 30_000;
/// Item claims in these tests outlive every offset a test uses, unless it says otherwise.
const LONG_CLAIM_MS: u64 = 600_000;

async fn dynamo_store() -> Arc<dyn JobStore> {
    let client = common::dynamo().await;
    let source = common::stack_var("JOBS_TABLE");
    let described = client
        .describe_table()
        .table_name(&source)
        .send()
        .await
        .expect("the stack's Jobs table");
    let table = described.table().expect("a table description");
    let name = common::unique("jobs-contract");
    let mut create = client
        .create_table()
        .table_name(&name)
        .billing_mode(BillingMode::PayPerRequest)
        .set_attribute_definitions(Some(table.attribute_definitions().to_vec()))
        .set_key_schema(Some(table.key_schema().to_vec()));
    for index in table.global_secondary_indexes() {
        create = create.global_secondary_indexes(
            GlobalSecondaryIndex::builder()
                .set_index_name(index.index_name().map(str::to_owned))
                .set_key_schema(Some(index.key_schema().to_vec()))
                .set_projection(index.projection().cloned())
                .build()
                .unwrap(),
        );
    }
    create.send().await.expect("creating the test's Jobs table");
    Arc::new(DynamoJobs::new(client, name, TTL))
}

fn memory_store() -> Arc<dyn JobStore> {
    Arc::new(InMemoryJobs::new(TTL))
}

fn new_job(owner: &str, items: usize) -> NewJob {
    NewJob {
        owner: owner.to_owned(),
        tier: Tier::Pro,
        spec: json!({"max_concurrency": 4, "note": "contract"}),
        inputs: (0..items)
            .map(|i| json!({"prompt": format!("item {i}"), "n": i}))
            .collect(),
    }
}

/// Claims, processes and records every item `worker` can take at `now`, counting each upstream
/// call it would make in `calls`.
async fn drain_items(
    store: Arc<dyn JobStore>,
    job: Uuid,
    worker: &str,
    now: u64,
    calls: Arc<Mutex<HashMap<u32, Vec<String>>>>,
) -> usize {
    let mut done = 0;
    for item in store.unfinished(job, now).await.unwrap() {
        if !store
            .claim_item(job, item.index, worker, now, now + LONG_CLAIM_MS)
            .await
            .unwrap()
        {
            continue;
        }
        calls
            .lock()
            .unwrap()
            .entry(item.index)
            .or_default()
            .push(worker.to_owned());
        tokio::task::yield_now().await;
        let recorded = store
            .record(
                job,
                item.index,
                worker,
                ItemOutcome::Succeeded(json!({"by": worker, "n": item.input["n"]})),
            )
            .await
            .unwrap();
        assert!(recorded, "{worker} lost item {} it had claimed", item.index);
        done += 1;
    }
    done
}

async fn create_then_read_back_in_order_and_only_by_the_owner(store: Arc<dyn JobStore>) {
    let owner = common::unique("alice");
    let created = store.create(new_job(&owner, 7)).await.unwrap();
    assert_eq!(created.status, JobStatus::Queued);
    assert_eq!(created.total, 7);

    let job = store.get(&owner, created.id).await.unwrap().unwrap();
    assert_eq!(job.status, JobStatus::Queued);
    assert_eq!((job.total, job.succeeded, job.failed), (7, 0, 0));
    assert_eq!(job.tier, Tier::Pro);
    assert_eq!(job.spec, json!({"max_concurrency": 4, "note": "contract"}));

    let first = store
        .items(&owner, created.id, None, 3)
        .await
        .unwrap()
        .unwrap();
    let indexes: Vec<u32> = first.items.iter().map(|i| i.index).collect();
    assert_eq!(indexes, [0, 1, 2]);
    assert!(first.has_more);
    assert_eq!(first.items[1].input, json!({"prompt": "item 1", "n": 1}));
    assert!(
        first
            .items
            .iter()
            .all(|i| i.state == ItemState::Pending && i.result.is_none())
    );
    let rest = store
        .items(&owner, created.id, Some(2), 10)
        .await
        .unwrap()
        .unwrap();
    let indexes: Vec<u32> = rest.items.iter().map(|i| i.index).collect();
    assert_eq!(indexes, [3, 4, 5, 6]);
    assert!(!rest.has_more);
    let exact = store
        .items(&owner, created.id, Some(3), 3)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exact.items.len(), 3);
    assert!(
        !exact.has_more,
        "a page that ends on the last item has no successor"
    );

    assert!(store.get("mallory", created.id).await.unwrap().is_none());
    assert!(
        store
            .items("mallory", created.id, None, 10)
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.get(&owner, Uuid::new_v4()).await.unwrap().is_none());
}

async fn claim_is_exclusive_until_the_lease_lapses(store: Arc<dyn JobStore>) {
    let owner = common::unique("bob");
    let id = store.create(new_job(&owner, 2)).await.unwrap().id;
    let t0 = now_ms();

    let claimed = store.claim(id, "drain-a", t0, LEASE_MS).await.unwrap();
    assert_eq!(claimed.map(|j| j.status), Some(JobStatus::Running));
    assert!(
        store
            .claim(id, "drain-b", t0 + 1, LEASE_MS)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store.get(&owner, id).await.unwrap().unwrap().status,
        JobStatus::Running
    );

    // A renewal moves the expiry: the old one no longer frees the job.
    assert!(
        store
            .renew(id, "drain-a", t0 + 20_000, LEASE_MS)
            .await
            .unwrap()
    );
    assert!(
        store
            .claim(id, "drain-b", t0 + LEASE_MS + 1, LEASE_MS)
            .await
            .unwrap()
            .is_none()
    );
    // Once the renewed lease lapses another drain takes over, and the old holder is out.
    let takeover = t0 + 20_000 + LEASE_MS;
    assert!(
        store
            .claim(id, "drain-b", takeover, LEASE_MS)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        !store
            .renew(id, "drain-a", takeover + 1, LEASE_MS)
            .await
            .unwrap()
    );
    assert!(!store.release(id, "drain-a", takeover + 1).await.unwrap());
    assert!(
        store
            .renew(id, "drain-b", takeover + 1, LEASE_MS)
            .await
            .unwrap()
    );
}

async fn concurrent_claims_have_exactly_one_winner(store: Arc<dyn JobStore>) {
    let owner = common::unique("carol");
    let id = store.create(new_job(&owner, 1)).await.unwrap().id;
    let t0 = now_ms();
    let tasks: Vec<_> = (0..8)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .claim(id, &format!("drain-{n}"), t0, LEASE_MS)
                    .await
                    .unwrap()
                    .is_some()
            })
        })
        .collect();
    let mut winners = 0;
    for task in tasks {
        winners += usize::from(task.await.unwrap());
    }
    assert_eq!(winners, 1);
}

async fn claimable_lists_lapsed_then_queued_jobs_oldest_first(store: Arc<dyn JobStore>) {
    let owner = common::unique("dave");
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(store.create(new_job(&owner, 1)).await.unwrap().id);
        // created_at has millisecond resolution: keep the order unambiguous.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t0 = now_ms();
    // Job 1 is being drained, job 3 is finished: neither is a candidate while that holds.
    assert!(
        store
            .claim(ids[1], "drain-a", t0, LEASE_MS)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .claim(ids[3], "drain-a", t0, LEASE_MS)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .claim_item(ids[3], 0, "drain-a", t0, t0 + 1_000)
            .await
            .unwrap()
    );
    assert!(
        store
            .record(ids[3], 0, "drain-a", ItemOutcome::Succeeded(json!("ok")))
            .await
            .unwrap()
    );
    assert_eq!(
        store.finish(ids[3], "drain-a").await.unwrap(),
        Some(JobStatus::Done)
    );

    let mine = |listed: Vec<Uuid>| -> Vec<Uuid> {
        listed.into_iter().filter(|id| ids.contains(id)).collect()
    };
    assert_eq!(
        mine(store.claimable(t0 + 1, 50).await.unwrap()),
        [ids[0], ids[2]]
    );
    // After the lease lapses the interrupted job comes first: it was started earlier.
    assert_eq!(
        mine(store.claimable(t0 + LEASE_MS, 50).await.unwrap()),
        [ids[1], ids[0], ids[2]]
    );
}

async fn two_concurrent_drains_process_each_item_exactly_once(store: Arc<dyn JobStore>) {
    let owner = common::unique("erin");
    let items = 30;
    let id = store.create(new_job(&owner, items)).await.unwrap().id;
    let t0 = now_ms();
    assert!(
        store
            .claim(id, "drain-a", t0, LEASE_MS)
            .await
            .unwrap()
            .is_some()
    );
    // Drain A is slow to renew; B takes the job over while A is still working on it, so both
    // go through the same items at the same time.
    let t1 = t0 + LEASE_MS;
    assert!(
        store
            .claim(id, "drain-b", t1, LEASE_MS)
            .await
            .unwrap()
            .is_some()
    );
    let calls = Arc::new(Mutex::new(HashMap::new()));
    let a = tokio::spawn(drain_items(
        store.clone(),
        id,
        "drain-a",
        t0 + 10,
        calls.clone(),
    ));
    let b = tokio::spawn(drain_items(store.clone(), id, "drain-b", t1, calls.clone()));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!(a + b, items);

    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), items, "every item processed");
    for (index, by) in &calls {
        assert_eq!(by.len(), 1, "item {index} processed by {by:?}");
    }
    let job = store.get(&owner, id).await.unwrap().unwrap();
    assert_eq!((job.succeeded, job.failed), (items as u64, 0));
    let page = store.items(&owner, id, None, 100).await.unwrap().unwrap();
    for item in &page.items {
        assert_eq!(item.state, ItemState::Succeeded);
        let by = &calls[&item.index][0];
        assert_eq!(item.result, Some(json!({"by": by, "n": item.index})));
    }
    // Only the lease holder closes the job.
    assert_eq!(store.finish(id, "drain-a").await.unwrap(), None);
    assert_eq!(
        store.finish(id, "drain-b").await.unwrap(),
        Some(JobStatus::Done)
    );
    assert_eq!(
        store.get(&owner, id).await.unwrap().unwrap().status,
        JobStatus::Done
    );
    assert!(
        store
            .claim(id, "drain-c", t1 + 10 * LEASE_MS, LEASE_MS)
            .await
            .unwrap()
            .is_none()
    );
}

async fn a_stopped_drain_is_resumed_without_redoing_finished_items(store: Arc<dyn JobStore>) {
    let owner = common::unique("frank");
    let id = store.create(new_job(&owner, 10)).await.unwrap().id;
    let t0 = now_ms();
    let claim_ms = 20_000;
    assert!(
        store
            .claim(id, "drain-a", t0, LEASE_MS)
            .await
            .unwrap()
            .is_some()
    );
    // A finishes items 0..3, is working on 3 and 4 when it dies.
    for index in 0..5 {
        assert!(
            store
                .claim_item(id, index, "drain-a", t0, t0 + claim_ms)
                .await
                .unwrap()
        );
    }
    for index in 0..3 {
        let outcome = ItemOutcome::Succeeded(json!({"by": "drain-a", "n": index}));
        assert!(store.record(id, index, "drain-a", outcome).await.unwrap());
    }
    let job = store.get(&owner, id).await.unwrap().unwrap();
    assert_eq!((job.succeeded, job.status), (3, JobStatus::Running));

    // Before the lease lapses nobody else gets the job; A's live claims are not up for grabs.
    assert!(
        store
            .claim(id, "drain-b", t0 + 5_000, LEASE_MS)
            .await
            .unwrap()
            .is_none()
    );
    let left: Vec<u32> = store
        .unfinished(id, t0 + 5_000)
        .await
        .unwrap()
        .iter()
        .map(|i| i.index)
        .collect();
    assert_eq!(left, [5, 6, 7, 8, 9]);

    // The next drain after the lease lapsed resumes with everything but the finished items.
    let t1 = t0 + LEASE_MS;
    assert!(
        store
            .claim(id, "drain-b", t1, LEASE_MS)
            .await
            .unwrap()
            .is_some()
    );
    let left: Vec<u32> = store
        .unfinished(id, t1)
        .await
        .unwrap()
        .iter()
        .map(|i| i.index)
        .collect();
    assert_eq!(left, [3, 4, 5, 6, 7, 8, 9]);
    let calls = Arc::new(Mutex::new(HashMap::new()));
    assert_eq!(
        drain_items(store.clone(), id, "drain-b", t1, calls.clone()).await,
        7
    );
    // A comes back to life late: its result for item 3 is refused, nothing is counted twice.
    let late = ItemOutcome::Succeeded(json!({"by": "drain-a", "n": 3}));
    assert!(!store.record(id, 3, "drain-a", late).await.unwrap());

    let job = store.get(&owner, id).await.unwrap().unwrap();
    assert_eq!((job.succeeded, job.failed), (10, 0));
    let page = store.items(&owner, id, None, 100).await.unwrap().unwrap();
    let by: Vec<&str> = page
        .items
        .iter()
        .map(|i| i.result.as_ref().unwrap()["by"].as_str().unwrap())
        .collect();
    assert_eq!(
        &by[..3],
        ["drain-a"; 3],
        "finished items are kept, not redone"
    );
    assert_eq!(&by[3..], ["drain-b"; 7]);
    assert_eq!(
        store.finish(id, "drain-b").await.unwrap(),
        Some(JobStatus::Done)
    );
}

async fn results_need_the_claim_and_count_once(store: Arc<dyn JobStore>) {
    let owner = common::unique("grace");
    let id = store.create(new_job(&owner, 2)).await.unwrap().id;
    let t0 = now_ms();
    assert!(
        store
            .claim(id, "drain-a", t0, LEASE_MS)
            .await
            .unwrap()
            .is_some()
    );
    let failure = || ItemOutcome::Failed(json!({"code": "upstream_error"}));

    assert!(
        !store.record(id, 0, "drain-a", failure()).await.unwrap(),
        "not claimed"
    );
    assert!(
        store
            .claim_item(id, 0, "drain-a", t0, t0 + 1_000)
            .await
            .unwrap()
    );
    assert!(
        !store
            .claim_item(id, 0, "drain-b", t0 + 1, t0 + 2_000)
            .await
            .unwrap()
    );
    assert!(
        !store.record(id, 0, "drain-b", failure()).await.unwrap(),
        "someone else's"
    );
    assert!(store.record(id, 0, "drain-a", failure()).await.unwrap());
    assert!(
        !store.record(id, 0, "drain-a", failure()).await.unwrap(),
        "already recorded"
    );
    assert!(
        !store
            .claim_item(id, 0, "drain-a", t0 + 5_000, t0 + 9_000)
            .await
            .unwrap()
    );
    assert!(!store.release_item(id, 0, "drain-a").await.unwrap());

    // A released item is pending again and can be claimed by anyone.
    assert!(
        store
            .claim_item(id, 1, "drain-a", t0, t0 + 1_000)
            .await
            .unwrap()
    );
    assert!(!store.release_item(id, 1, "drain-b").await.unwrap());
    assert!(store.release_item(id, 1, "drain-a").await.unwrap());
    assert_eq!(store.unfinished(id, t0).await.unwrap().len(), 1);
    assert_eq!(
        store.finish(id, "drain-a").await.unwrap(),
        None,
        "item 1 is left"
    );
    assert!(
        store
            .claim_item(id, 1, "drain-b", t0, t0 + 1_000)
            .await
            .unwrap()
    );
    assert!(store.record(id, 1, "drain-b", failure()).await.unwrap());

    let job = store.get(&owner, id).await.unwrap().unwrap();
    assert_eq!((job.succeeded, job.failed), (0, 2));
    let page = store.items(&owner, id, None, 10).await.unwrap().unwrap();
    assert!(page.items.iter().all(|i| i.state == ItemState::Failed));
    assert_eq!(
        page.items[0].result,
        Some(json!({"code": "upstream_error"}))
    );
    assert_eq!(
        store.finish(id, "drain-a").await.unwrap(),
        Some(JobStatus::Failed)
    );
    assert!(store.unfinished(id, t0).await.unwrap().is_empty());
}

async fn a_released_job_stays_running_and_waits_for_its_retry_time(store: Arc<dyn JobStore>) {
    let owner = common::unique("heidi");
    let id = store.create(new_job(&owner, 3)).await.unwrap().id;
    let t0 = now_ms();
    assert!(
        store
            .claim(id, "drain-a", t0, LEASE_MS)
            .await
            .unwrap()
            .is_some()
    );
    assert!(store.release(id, "drain-a", t0 + 10_000).await.unwrap());
    assert!(
        !store.release(id, "drain-a", t0 + 10_000).await.unwrap(),
        "released already"
    );
    assert!(!store.renew(id, "drain-a", t0 + 1, LEASE_MS).await.unwrap());
    assert_eq!(
        store.get(&owner, id).await.unwrap().unwrap().status,
        JobStatus::Running
    );
    assert!(
        store
            .claim(id, "drain-b", t0 + 9_999, LEASE_MS)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .claim(id, "drain-b", t0 + 10_000, LEASE_MS)
            .await
            .unwrap()
            .is_some()
    );
}

macro_rules! contract {
    ($($name:ident),*) => {
        mod in_memory {
            use super::*;
            $( #[tokio::test] async fn $name() { super::$name(memory_store()).await } )*
        }
        mod dynamodb {
            use super::*;
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $name() { super::$name(dynamo_store().await).await } )*
        }
    };
}

contract!(
    create_then_read_back_in_order_and_only_by_the_owner,
    claim_is_exclusive_until_the_lease_lapses,
    concurrent_claims_have_exactly_one_winner,
    claimable_lists_lapsed_then_queued_jobs_oldest_first,
    two_concurrent_drains_process_each_item_exactly_once,
    a_stopped_drain_is_resumed_without_redoing_finished_items,
    results_need_the_claim_and_count_once,
    a_released_job_stays_running_and_waits_for_its_retry_time
);
