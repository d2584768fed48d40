//! The scheduled drain in process (in-memory job store, real mock LLM): deadlines, resuming,
//! concurrent drains and rate limits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{ALICE, BOB, FRED, Harness, harness, harness_with};
use serde_json::{Value, json};

/// Submits a job of `n` items, each naming its own unique marker `<tag>-<i>-`.
async fn submit(h: &Harness, key: &str, tag: &str, n: usize, extra: Value) -> String {
    let items: Vec<Value> = (0..n)
        .map(|i| json!({"prompt": format!("{tag}-{i}- {}", extra["directive"].as_str().unwrap_or(""))}))
        .collect();
    let mut body = json!({ "items": items, "max_tokens": 40 });
    for (k, v) in extra.as_object().unwrap() {
        if k != "directive" {
            body[k] = v.clone();
        }
    }
    let (status, _, reply) = h.post("/batch/jobs", key, &body).await;
    assert_eq!(status, 202, "{reply}");
    reply["job_id"].as_str().unwrap().to_owned()
}

async fn job(h: &Harness, key: &str, id: &str) -> Value {
    let (status, body) = h.get(&format!("/batch/jobs/{id}?limit=1000"), key).await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn a_drain_stopped_by_its_deadline_is_resumed_without_redoing_finished_items() {
    let h = harness().await;
    let id = submit(
        &h,
        ALICE,
        "resume",
        8,
        json!({"directive": "[mock latency_ms=300]", "max_concurrency": 2, "timeout_ms": 1000}),
    )
    .await;

    // 1.6 s: two waves of two items fit (each must be able to run its whole 1 s timeout
    // before the deadline), then the drain stops starting items and lets the job go.
    let first = batch::drain(&h.batch, Instant::now() + Duration::from_millis(1_600)).await;
    assert_eq!(first.jobs_claimed, 1, "{first:?}");
    assert_eq!(first.jobs_released, 1, "{first:?}");
    assert_eq!(first.jobs_finished, 0, "{first:?}");
    assert!(
        (2..=6).contains(&first.items_processed),
        "{} items in the first run",
        first.items_processed
    );
    assert_eq!(serde_json::to_value(&first).unwrap()["stopped"], "deadline");
    let partial = job(&h, ALICE, &id).await;
    assert_eq!(partial["status"], "running");
    assert_eq!(
        partial["completed"].as_u64().unwrap(),
        u64::from(first.items_processed)
    );
    let unstarted = partial["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["status"] == "pending")
        .count();
    assert_eq!(
        unstarted as u32,
        8 - first.items_processed,
        "nothing left claimed"
    );

    let second = batch::drain(&h.batch, Instant::now() + Duration::from_secs(30)).await;
    assert_eq!(second.jobs_finished, 1, "{second:?}");
    assert_eq!(first.items_processed + second.items_processed, 8);

    let done = job(&h, ALICE, &id).await;
    assert_eq!(done["status"], "done");
    assert_eq!(done["successful"], 8);
    for i in 0..8 {
        assert_eq!(
            h.upstream_count(&format!("resume-{i}-")),
            1,
            "item {i} ran once"
        );
    }
}

#[tokio::test]
async fn two_concurrent_drains_process_each_item_exactly_once() {
    let h = harness().await;
    let mut jobs = Vec::new();
    for j in 0..3 {
        let key = if j == 1 { BOB } else { ALICE };
        let tag = format!("twice{j}");
        let id = submit(
            &h,
            key,
            &tag,
            6,
            json!({"directive": "[mock latency_ms=50]", "max_concurrency": 3}),
        )
        .await;
        jobs.push((key, tag, id));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let (a, b) = tokio::join!(
        batch::drain(&h.batch, deadline),
        batch::drain(&h.batch, deadline)
    );
    assert_eq!(a.items_processed + b.items_processed, 18, "{a:?} {b:?}");
    assert_eq!(a.jobs_finished + b.jobs_finished, 3, "{a:?} {b:?}");
    for (key, tag, id) in &jobs {
        let body = job(&h, key, id).await;
        assert_eq!(body["status"], "done", "{body}");
        assert_eq!(body["successful"], 6);
        for i in 0..6 {
            assert_eq!(
                h.upstream_count(&format!("{tag}-{i}-")),
                1,
                "{tag} item {i}"
            );
        }
    }
}

#[tokio::test]
async fn a_job_over_the_owners_quota_waits_instead_of_failing() {
    let h = harness_with(&[("RATE_LIMIT_FREE_REQUESTS_PER_HOUR", "3")]).await;
    let id = submit(&h, FRED, "quota", 5, json!({"max_concurrency": 1})).await;
    let report = batch::drain(&h.batch, Instant::now() + Duration::from_secs(30)).await;
    assert_eq!(report.items_processed, 3, "{report:?}");
    assert_eq!(report.jobs_released, 1, "{report:?}");
    let body = job(&h, FRED, &id).await;
    assert_eq!(body["status"], "running");
    assert_eq!(
        (body["successful"].as_u64(), body["pending"].as_u64()),
        (Some(3), Some(2))
    );
    let statuses: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["ok", "ok", "ok", "pending", "pending"]);
    // Released until the hourly window resets: the next drain leaves it alone.
    let again = batch::drain(&h.batch, Instant::now() + Duration::from_secs(30)).await;
    assert_eq!(again.jobs_claimed, 0, "{again:?}");
    assert_eq!(h.mock.stats().total, 3);
}

#[tokio::test]
async fn failed_items_are_recorded_and_an_all_failed_job_ends_failed() {
    let h = harness().await;
    let id = submit(
        &h,
        ALICE,
        "doomed",
        3,
        json!({"directive": "[mock fault=500]"}),
    )
    .await;
    let report = batch::drain(&h.batch, Instant::now() + Duration::from_secs(30)).await;
    assert_eq!(
        (report.items_failed, report.jobs_finished),
        (3, 1),
        "{report:?}"
    );
    let body = job(&h, ALICE, &id).await;
    assert_eq!(body["status"], "failed");
    assert_eq!(body["failed"], 3);
    assert!(
        body["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["status"] == "error" && r["error"]["code"] == "upstream_error")
    );
}
