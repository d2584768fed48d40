//! The scheduled drain: claims queued jobs (or running ones whose drain went away), runs their
//! unfinished items under the concurrency bound until the invocation's deadline nears, records
//! each result as it finishes, and then completes or releases the job.
//!
//! Exactly-once comes from the store ([`JobStore`]'s contract): an item is run only after this
//! drain won its claim, and its result is written only while the claim is still this drain's.
//! An item is started only when its whole timeout fits before the deadline, so a drain never
//! leaves work behind that it had started, except when the process dies; then the claims lapse
//! and the next drain runs those items again.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use shared::auth::{KeyKind, Principal};
use shared::error::ApiError;
use shared::jobs::{ItemOutcome, Job, JobItem, now_ms};
use uuid::Uuid;

use crate::Batch;
use crate::fanout::{ItemResult, RunOptions, ValidItem, run_item, token_estimate};

/// Candidate jobs read per look at the index.
const CANDIDATES: usize = 10;
/// Below this much time left a drain does not start on another job.
const MIN_USEFUL: Duration = Duration::from_millis(500);

/// Why a drain stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Nothing left to claim.
    NoWork,
    /// The invocation's deadline (less the margin) came too close.
    Deadline,
    /// DynamoDB or the rate limiter failed; the next run tries again.
    DependencyFailed,
}

/// What one drain did (the scheduled invocation's response, and a log line).
#[derive(Debug, Clone, Serialize)]
pub struct DrainReport {
    pub worker: String,
    pub jobs_claimed: u32,
    pub jobs_finished: u32,
    pub jobs_released: u32,
    /// Items whose result this drain recorded.
    pub items_processed: u32,
    pub items_succeeded: u32,
    pub items_failed: u32,
    pub stopped: StopReason,
}

/// Claims and processes jobs until there are none left or `deadline` nears.
pub async fn drain(batch: &Batch, deadline: Instant) -> DrainReport {
    let worker = format!("drain-{}", Uuid::new_v4());
    let mut report = DrainReport {
        worker: worker.clone(),
        jobs_claimed: 0,
        jobs_finished: 0,
        jobs_released: 0,
        items_processed: 0,
        items_succeeded: 0,
        items_failed: 0,
        stopped: StopReason::NoWork,
    };
    // A job this run released (rate limited, or items still claimed by a dead drain) is not
    // taken again by the same run.
    let mut seen = HashSet::new();
    let lease_ms = millis(batch.services.config.batch.lease);
    loop {
        if Instant::now() + MIN_USEFUL >= deadline {
            report.stopped = StopReason::Deadline;
            break;
        }
        let candidates = match batch
            .jobs
            .claimable(now_ms(), seen.len() + CANDIDATES)
            .await
        {
            Ok(ids) => ids,
            Err(err) => {
                tracing::warn!(error = %err, "listing claimable jobs failed");
                report.stopped = StopReason::DependencyFailed;
                break;
            }
        };
        let mut claimed = None;
        for id in candidates {
            if !seen.insert(id) {
                continue;
            }
            match batch.jobs.claim(id, &worker, now_ms(), lease_ms).await {
                Ok(Some(job)) => {
                    claimed = Some(job);
                    break;
                }
                Ok(None) => {}
                Err(err) => tracing::warn!(error = %err, job = %id, "claiming a job failed"),
            }
        }
        let Some(job) = claimed else {
            report.stopped = StopReason::NoWork;
            break;
        };
        report.jobs_claimed += 1;
        let run = JobRun::new(batch, job, &worker, deadline);
        let outcome = run.run().await;
        report.items_succeeded += run.succeeded.load(Ordering::SeqCst);
        report.items_failed += run.failed.load(Ordering::SeqCst);
        match outcome {
            JobOutcome::Finished => report.jobs_finished += 1,
            JobOutcome::Released => report.jobs_released += 1,
            JobOutcome::Lost => {}
        }
        match run.halt() {
            Some(Halt::Deadline) => {
                report.stopped = StopReason::Deadline;
                break;
            }
            Some(Halt::DependencyFailed) => {
                report.stopped = StopReason::DependencyFailed;
                break;
            }
            // Only this owner is limited: other jobs may still run.
            Some(Halt::Throttled) | None => {}
        }
    }
    report.items_processed = report.items_succeeded + report.items_failed;
    report.emit_metrics();
    report
}

impl DrainReport {
    /// One EMF line per drain: what got done, for dashboards and alarms on stuck jobs.
    fn emit_metrics(&self) {
        use shared::telemetry::{MetricEvent, Unit};
        MetricEvent::new()
            .dimension("function", crate::FUNCTION_NAME)
            .metric(
                "DrainJobsClaimed",
                f64::from(self.jobs_claimed),
                Unit::Count,
            )
            .metric(
                "DrainJobsFinished",
                f64::from(self.jobs_finished),
                Unit::Count,
            )
            .metric(
                "DrainItemsSucceeded",
                f64::from(self.items_succeeded),
                Unit::Count,
            )
            .metric(
                "DrainItemsFailed",
                f64::from(self.items_failed),
                Unit::Count,
            )
            .property("worker", self.worker.clone())
            .emit();
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Why a job's run stopped starting items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Halt {
    Deadline,
    /// The owner's rate limit refused an item.
    Throttled,
    DependencyFailed,
}

enum JobOutcome {
    Finished,
    Released,
    /// Another drain took the job over (this one missed its renewals).
    Lost,
}

/// One claimed job being worked on.
struct JobRun<'a> {
    batch: &'a Batch,
    job: Job,
    worker: &'a str,
    deadline: Instant,
    /// The owner, as the rate limiter sees them. Anonymous callers cannot submit jobs, so the
    /// key kind only has to be a credentialed one for the tier's quota to apply.
    principal: Principal,
    options: Option<RunOptions>,
    lost: AtomicBool,
    halt: Mutex<Option<Halt>>,
    /// Set when the owner's rate limit refused an item: retry the job after this many seconds.
    throttled_secs: Mutex<Option<u64>>,
    succeeded: AtomicU32,
    failed: AtomicU32,
}

impl<'a> JobRun<'a> {
    fn new(batch: &'a Batch, job: Job, worker: &'a str, deadline: Instant) -> Self {
        let options = serde_json::from_value::<RunOptions>(job.spec.clone()).ok();
        Self {
            batch,
            principal: Principal {
                user_id: job.owner.clone(),
                tier: job.tier,
                key_kind: KeyKind::ApiKey,
            },
            job,
            worker,
            deadline,
            options,
            lost: AtomicBool::new(false),
            halt: Mutex::new(None),
            throttled_secs: Mutex::new(None),
            succeeded: AtomicU32::new(0),
            failed: AtomicU32::new(0),
        }
    }

    fn halt(&self) -> Option<Halt> {
        self.halt.lock().ok().and_then(|h| *h)
    }

    /// Stops starting items; the first reason wins.
    fn halt_with(&self, reason: Halt) {
        if let Ok(mut halt) = self.halt.lock() {
            halt.get_or_insert(reason);
        }
    }

    fn halted(&self) -> bool {
        self.lost.load(Ordering::SeqCst) || self.halt().is_some()
    }

    async fn run(&self) -> JobOutcome {
        let store = &self.batch.jobs;
        let settings = self.batch.services.config.batch;
        let lease_ms = millis(settings.lease);
        let concurrency = self
            .options
            .map_or(1, |o| o.max_concurrency)
            .min(settings.drain_concurrency)
            .max(1);
        let items = match store.unfinished(self.job.id, now_ms()).await {
            Ok(items) => items,
            Err(err) => {
                tracing::warn!(error = %err, job = %self.job.id, "listing unfinished items failed");
                self.halt_with(Halt::DependencyFailed);
                Vec::new()
            }
        };
        let work = futures::stream::iter(items)
            .map(|item| self.process(item))
            .buffer_unordered(concurrency)
            .for_each(|()| async {});
        tokio::pin!(work);
        // Renew well before the lease lapses, so a long job is never taken over by a drain
        // that merely started later.
        let mut renewal =
            tokio::time::interval((settings.lease / 3).max(Duration::from_millis(100)));
        renewal.tick().await;
        loop {
            tokio::select! {
                () = &mut work => break,
                _ = renewal.tick() => {
                    match store.renew(self.job.id, self.worker, now_ms(), lease_ms).await {
                        Ok(true) => {}
                        Ok(false) => self.lost.store(true, Ordering::SeqCst),
                        Err(err) => tracing::warn!(error = %err, job = %self.job.id, "renewing a lease failed"),
                    }
                }
            }
        }
        if self.lost.load(Ordering::SeqCst) {
            tracing::warn!(job = %self.job.id, "lease lost to another drain");
            return JobOutcome::Lost;
        }
        let throttled = self.throttled_secs.lock().ok().and_then(|t| *t);
        if throttled.is_none() {
            match store.finish(self.job.id, self.worker).await {
                Ok(Some(status)) => {
                    tracing::info!(job = %self.job.id, status = status.as_str(), "job finished");
                    return JobOutcome::Finished;
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(error = %err, job = %self.job.id, "finishing a job failed")
                }
            }
        }
        // Items are left: let the next drain (or, after a rate limit, the first one after it
        // resets) pick the job up.
        let retry_at = now_ms().saturating_add(throttled.unwrap_or(0).saturating_mul(1000));
        if let Err(err) = store.release(self.job.id, self.worker, retry_at).await {
            // The lease then simply lapses.
            tracing::warn!(error = %err, job = %self.job.id, "releasing a job failed");
        }
        JobOutcome::Released
    }

    /// Claims, runs and records one item, unless the run has to stop first.
    async fn process(&self, item: JobItem) {
        if self.halted() {
            return;
        }
        let store = &self.batch.jobs;
        let timeout = self.options.map_or(Duration::ZERO, |o| o.timeout());
        // Only start what can finish: an item cut off by the deadline would be redone anyway.
        if Instant::now() + timeout >= self.deadline {
            self.halt_with(Halt::Deadline);
            return;
        }
        let now = now_ms();
        let claim_until = now
            .saturating_add(millis(timeout))
            .saturating_add(millis(self.batch.services.config.batch.lease));
        match store
            .claim_item(self.job.id, item.index, self.worker, now, claim_until)
            .await
        {
            Ok(true) => {}
            Ok(false) => return,
            Err(err) => {
                tracing::warn!(error = %err, job = %self.job.id, "claiming an item failed");
                self.halt_with(Halt::DependencyFailed);
                return;
            }
        }
        let index = usize::try_from(item.index).unwrap_or(usize::MAX);
        let parsed = serde_json::from_value::<ValidItem>(item.input.clone());
        let result = match (self.options, parsed) {
            (Some(options), Ok(valid)) => match self.run_admitted(index, &valid, &options).await {
                Some(result) => result,
                None => {
                    self.give_back(item.index).await;
                    return;
                }
            },
            // Stored by an incompatible version: it can never run, so it fails, once.
            (_, parsed) => {
                let id = parsed.map_or_else(|_| index.to_string(), |v| v.id);
                let broken = ValidItem {
                    id,
                    model: String::new(),
                    messages: Vec::new(),
                };
                let err =
                    ApiError::internal(format!("job {} item {index} is unreadable", self.job.id));
                ItemResult::failed(index, &broken, &err, 0)
            }
        };
        self.record(item.index, result).await
    }

    /// Admits the item against the owner's quotas, runs it and settles its tokens; `None` when
    /// the limiter refused it (the job then waits) or failed.
    async fn run_admitted(
        &self,
        index: usize,
        item: &ValidItem,
        options: &RunOptions,
    ) -> Option<ItemResult> {
        let chat = &self.batch.services.chat;
        let admitted = match chat
            .limiter
            .admit(&self.principal, 1, token_estimate(item, options))
            .await
        {
            Ok(admitted) => admitted,
            Err(ApiError::RateLimited {
                retry_after_secs, ..
            }) => {
                if let Ok(mut throttled) = self.throttled_secs.lock() {
                    *throttled =
                        Some(throttled.map_or(retry_after_secs, |t| t.max(retry_after_secs)));
                }
                self.halt_with(Halt::Throttled);
                return None;
            }
            Err(err) => {
                tracing::warn!(error = %err, job = %self.job.id, "rate limiter failed");
                self.halt_with(Halt::DependencyFailed);
                return None;
            }
        };
        let result = run_item(chat.llm.as_ref(), index, item, options, Some(self.deadline)).await;
        if let Err(err) = chat
            .limiter
            .settle(admitted.reservation, result.total_tokens())
            .await
        {
            tracing::warn!(error = %err, "settling a token reservation failed");
        }
        Some(result)
    }

    async fn give_back(&self, index: u32) {
        if let Err(err) = self
            .batch
            .jobs
            .release_item(self.job.id, index, self.worker)
            .await
        {
            // The claim lapses by itself; the item is then picked up again.
            tracing::warn!(error = %err, job = %self.job.id, "handing an item back failed");
        }
    }

    async fn record(&self, index: u32, result: ItemResult) {
        let ok = result.is_ok();
        let document = match serde_json::to_value(&result) {
            Ok(document) => document,
            Err(err) => {
                tracing::error!(error = %err, "serializing an item result failed");
                return;
            }
        };
        let outcome = if ok {
            ItemOutcome::Succeeded(document)
        } else {
            ItemOutcome::Failed(document)
        };
        match self
            .batch
            .jobs
            .record(self.job.id, index, self.worker, outcome)
            .await
        {
            Ok(true) => {
                let counter = if ok { &self.succeeded } else { &self.failed };
                counter.fetch_add(1, Ordering::SeqCst);
            }
            Ok(false) => {
                tracing::warn!(job = %self.job.id, index, "item claim lost before its result was recorded");
            }
            Err(err) => {
                tracing::warn!(error = %err, job = %self.job.id, index, "recording an item result failed");
                self.halt_with(Halt::DependencyFailed);
            }
        }
    }
}
