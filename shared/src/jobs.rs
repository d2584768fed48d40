//! Asynchronous batch jobs: a job, its items and their results, and the leases that let
//! scheduled drains share the work without doing any item twice.
//!
//! Layout (table `JOBS_TABLE`): pk `JOB#<uuid>`; sk `META` holds the owner, the status, the
//! progress counters and the drain's lease; sk `ITEM#<index, 6 digits>` holds one input, its
//! state, the claim of the drain working on it and, once finished, its result. Only META has a
//! `status` attribute, so only jobs appear in the `byStatus` index the drains query. Every row
//! carries `expires_at` (DynamoDB TTL); reads ignore expired rows before TTL removes them.
//!
//! Times that leases are compared with are passed in by the caller (`now_ms`, milliseconds
//! since the Unix epoch), so the same code serves the drain (wall clock) and tests (any
//! timeline).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeValue, PutRequest, ReturnValue, TransactWriteItem, Update, WriteRequest,
};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::Tier;
use crate::dynamo::{now_rfc3339, unavailable};
use crate::error::ApiError;

/// Most items one job may have.
pub const MAX_JOB_ITEMS: usize = 10_000;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Stored, no drain has taken it yet.
    Queued,
    /// A drain has started on it; some items may be finished.
    Running,
    /// Every item has a result, and at least one succeeded.
    Done,
    /// Every item has a result, and none succeeded.
    Failed,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "queued" => Some(Self::Queued),
            "running" => Some(Self::Running),
            "done" => Some(Self::Done),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// Where one item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ItemState {
    /// Not started, or given back unprocessed.
    Pending,
    /// Claimed by a drain that has not recorded a result yet.
    Running,
    Succeeded,
    Failed,
}

impl ItemState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "pending" => Some(Self::Pending),
            "running" => Some(Self::Running),
            "succeeded" => Some(Self::Succeeded),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// A job to store. `spec` and the inputs are the submitter's own documents: the store keeps
/// them as they are and never looks inside.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub owner: String,
    /// The owner's tier at submission, for the rate limits applied while the job is drained.
    pub tier: Tier,
    /// How to run the items (options shared by all of them).
    pub spec: Value,
    /// One input per item, in order; item `i` is `inputs[i]`.
    pub inputs: Vec<Value>,
}

/// A stored job (its META row).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: Uuid,
    pub owner: String,
    pub tier: Tier,
    pub status: JobStatus,
    pub spec: Value,
    pub total: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339; changes with every recorded result.
    pub updated_at: String,
}

impl Job {
    /// Items with a result.
    pub fn finished(&self) -> u64 {
        self.succeeded + self.failed
    }
}

/// One item of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobItem {
    pub index: u32,
    pub input: Value,
    pub state: ItemState,
    /// The recorded result, once the item has finished.
    pub result: Option<Value>,
}

/// A page of a job's items in index order.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemPage {
    pub items: Vec<JobItem>,
    /// Whether items follow the last one of this page.
    pub has_more: bool,
}

/// How an item ended, with the document to keep as its result.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemOutcome {
    Succeeded(Value),
    Failed(Value),
}

/// Milliseconds since the Unix epoch (the clock leases are measured on).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// Storage for batch jobs, shared by the function that accepts them and by the scheduled
/// drains that process them.
///
/// Contract, kept by the DynamoDB implementation and the in-memory fake alike:
///
/// - **Visibility.** `create` stores a job `queued` with all its items `pending`; it becomes
///   visible to `get`, `items` and the drains only once everything is stored (the items are
///   written first, the job's META row last), so a failed `create` leaves nothing a drain could
///   pick up. Rows past their expiry are ignored by every read.
/// - **Ownership.** A job belongs to the owner that submitted it. For anyone else `get` and
///   `items` answer `Ok(None)`, exactly as for a job that does not exist (the API's 404).
/// - **Job leases.** `claim` gives a job to one drain (`worker`) until `now_ms + lease_ms`, with
///   one conditional write on the job row: it succeeds only when the job is `queued`, or
///   `running` with a lease that has expired (`lease_until <= now_ms`). Of any number of
///   concurrent claims at most one wins. The holder extends its lease with `renew`, gives it up
///   with `release` (the job stays `running` and can be claimed again from `retry_at_ms`), and
///   closes the job with `finish`. `renew`, `release` and `finish` do nothing and report
///   `false` / `None` for a worker that no longer holds the lease. `claimable` lists candidate
///   jobs oldest first from an eventually consistent index: only `claim` decides.
/// - **Exactly-once items.** An item is processed only after `claim_item` succeeded for the
///   worker: a conditional write that takes a `pending` item, or a `running` one whose claim
///   expired (`claim_until <= now_ms`), so two drains can never hold the same item at once.
///   `record` writes the item's result and counts it on the job in one transaction, only if the
///   item is still claimed by that worker; otherwise it writes nothing and answers `false`. An
///   item therefore gets exactly one result, and `succeeded + failed` is always the number of
///   items with a result. `release_item` hands a claimed item back unprocessed.
/// - **Results as they finish, and resuming.** Results are recorded one by one as items
///   finish, never batched at the end. A drain that stops or crashes loses only the items it
///   had claimed and not yet recorded; `unfinished` lists what is left (pending items, and
///   running ones whose claim expired) in index order, never an item that has a result, so the
///   next drain resumes without redoing finished work.
/// - **Finishing.** `finish` closes a job whose items all have results: `done` when at least
///   one succeeded, `failed` when none did. While items remain it changes nothing.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Stores a new job, `queued`, with every item `pending`.
    async fn create(&self, job: NewJob) -> Result<Job, ApiError>;

    /// The job, when it exists and belongs to `owner`.
    async fn get(&self, owner: &str, id: Uuid) -> Result<Option<Job>, ApiError>;

    /// Up to `limit` items with an index above `after` (from the first when `None`), in index
    /// order; `None` when the job does not exist or is not `owner`'s.
    async fn items(
        &self,
        owner: &str,
        id: Uuid,
        after: Option<u32>,
        limit: usize,
    ) -> Result<Option<ItemPage>, ApiError>;

    /// Up to `limit` jobs a drain may claim at `now_ms`, oldest first: running jobs whose
    /// lease expired, then queued ones.
    async fn claimable(&self, now_ms: u64, limit: usize) -> Result<Vec<Uuid>, ApiError>;

    /// Takes the job for `worker` until `now_ms + lease_ms`; the job as claimed, or `None` when
    /// it is not claimable (another drain holds it, it is finished, or it does not exist).
    async fn claim(
        &self,
        id: Uuid,
        worker: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Option<Job>, ApiError>;

    /// Extends `worker`'s lease to `now_ms + lease_ms`; `false` when it no longer holds it.
    async fn renew(
        &self,
        id: Uuid,
        worker: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<bool, ApiError>;

    /// Gives up `worker`'s lease; the job stays `running` and is claimable from `retry_at_ms`.
    async fn release(&self, id: Uuid, worker: &str, retry_at_ms: u64) -> Result<bool, ApiError>;

    /// Closes the job when every item has a result: its final status, or `None` when items
    /// remain or `worker` does not hold the lease.
    async fn finish(&self, id: Uuid, worker: &str) -> Result<Option<JobStatus>, ApiError>;

    /// Items without a result that a drain may take at `now_ms`, in index order.
    async fn unfinished(&self, id: Uuid, now_ms: u64) -> Result<Vec<JobItem>, ApiError>;

    /// Takes one item for `worker` until `until_ms`; `false` when it is finished or another
    /// drain's claim on it is still live.
    async fn claim_item(
        &self,
        id: Uuid,
        index: u32,
        worker: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<bool, ApiError>;

    /// Hands an item `worker` claimed back unprocessed (`pending`).
    async fn release_item(&self, id: Uuid, index: u32, worker: &str) -> Result<bool, ApiError>;

    /// Records the result of an item `worker` holds and counts it on the job, atomically;
    /// `false`, with nothing written, when the item is not claimed by `worker`.
    async fn record(
        &self,
        id: Uuid,
        index: u32,
        worker: &str,
        outcome: ItemOutcome,
    ) -> Result<bool, ApiError>;
}

fn final_status(succeeded: u64) -> JobStatus {
    if succeeded > 0 {
        JobStatus::Done
    } else {
        JobStatus::Failed
    }
}

fn ttl_secs(ttl: Duration) -> u64 {
    ttl.as_secs().max(1)
}

// ------------------------------------------------------------------------------------------
// DynamoDB

const META: &str = "META";
/// Parallel `BatchWriteItem` calls while a job's items are stored.
const CREATE_PARALLELISM: usize = 4;
/// Rounds of retrying the items DynamoDB left unprocessed (throttling) before giving up.
const UNPROCESSED_ROUNDS: u32 = 8;
/// Index pages read per status when looking for claimable jobs.
const CLAIMABLE_PAGES: usize = 4;

fn pk(id: Uuid) -> String {
    format!("JOB#{id}")
}

/// Sorts after every item's sort key.
const LAST_ITEM_SK: &str = "ITEM#999999";

fn item_sk(index: u32) -> String {
    format!("ITEM#{index:06}")
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

type Row = HashMap<String, AttributeValue>;

fn get_s<'a>(row: &'a Row, name: &str) -> Option<&'a str> {
    row.get(name)?.as_s().ok().map(String::as_str)
}

fn get_n(row: &Row, name: &str) -> Option<u64> {
    row.get(name)?.as_n().ok()?.parse().ok()
}

fn get_json(row: &Row, name: &str) -> Option<Value> {
    serde_json::from_str(get_s(row, name)?).ok()
}

fn expired(row: &Row, now_secs: u64) -> bool {
    get_n(row, "expires_at").is_some_and(|exp| exp <= now_secs)
}

fn job_from(row: &Row) -> Option<Job> {
    let id = get_s(row, "pk")?.strip_prefix("JOB#")?.parse().ok()?;
    Some(Job {
        id,
        owner: get_s(row, "owner")?.to_owned(),
        tier: Tier::parse(get_s(row, "tier")?)?,
        status: JobStatus::parse(get_s(row, "status")?)?,
        spec: get_json(row, "spec").unwrap_or(Value::Null),
        total: get_n(row, "total").unwrap_or(0),
        succeeded: get_n(row, "succeeded").unwrap_or(0),
        failed: get_n(row, "failed").unwrap_or(0),
        created_at: get_s(row, "created_at").unwrap_or_default().to_owned(),
        updated_at: get_s(row, "updated_at").unwrap_or_default().to_owned(),
    })
}

fn item_from(row: &Row) -> Option<JobItem> {
    let index = get_s(row, "sk")?.strip_prefix("ITEM#")?.parse().ok()?;
    Some(JobItem {
        index,
        input: get_json(row, "input").unwrap_or(Value::Null),
        state: ItemState::parse(get_s(row, "item_state")?)?,
        result: get_json(row, "result"),
    })
}

fn now_secs() -> u64 {
    crate::dynamo::now_epoch()
}

/// A failed condition is an expected answer ("someone else has it"), not an outage.
fn condition_failed<E>(err: &aws_sdk_dynamodb::error::SdkError<E>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    err.as_service_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "ConditionalCheckFailedException")
}

/// The outcome of a conditional write: `true` when it was applied, `false` when its condition
/// did not hold (someone else got there first), an error when DynamoDB could not be reached.
fn applied<T, E>(result: Result<T, aws_sdk_dynamodb::error::SdkError<E>>) -> Result<bool, ApiError>
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
{
    match result {
        Ok(_) => Ok(true),
        Err(err) if condition_failed(&err) => Ok(false),
        Err(err) => Err(unavailable(err)),
    }
}

/// DynamoDB implementation.
pub struct DynamoJobs {
    client: Client,
    table: String,
    ttl: Duration,
}

impl DynamoJobs {
    pub fn new(client: Client, table: impl Into<String>, ttl: Duration) -> Self {
        Self {
            client,
            table: table.into(),
            ttl,
        }
    }

    async fn write_items(&self, requests: Vec<WriteRequest>) -> Result<(), ApiError> {
        let mut pending = HashMap::from([(self.table.clone(), requests)]);
        for round in 0..UNPROCESSED_ROUNDS {
            let out = self
                .client
                .batch_write_item()
                .set_request_items(Some(pending))
                .send()
                .await
                .map_err(unavailable)?;
            match out.unprocessed_items() {
                Some(rest) if rest.values().any(|v| !v.is_empty()) => pending = rest.clone(),
                _ => return Ok(()),
            }
            let backoff = rand::random_range(0..=(20u64 << round.min(5)));
            tokio::time::sleep(Duration::from_millis(backoff)).await;
        }
        Err(ApiError::Unavailable {
            dependency: "DynamoDB",
            detail: "job items kept coming back unprocessed".to_owned(),
        })
    }

    async fn meta(&self, id: Uuid) -> Result<Option<Row>, ApiError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(pk(id)))
            .key("sk", s(META))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        Ok(out.item().filter(|row| !expired(row, now_secs())).cloned())
    }

    /// One page of the `byStatus` index for `status`, oldest first.
    async fn by_status(
        &self,
        status: JobStatus,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Uuid>, ApiError> {
        let mut found = Vec::new();
        let mut start: Option<Row> = None;
        for _ in 0..CLAIMABLE_PAGES {
            let mut query = self
                .client
                .query()
                .table_name(&self.table)
                .index_name("byStatus")
                .key_condition_expression("#status = :status")
                .expression_attribute_names("#status", "status")
                .expression_attribute_names("#exp", "expires_at")
                .expression_attribute_values(":status", s(status.as_str()))
                .expression_attribute_values(":secs", n(now_ms / 1000))
                .limit(i32::try_from(limit.clamp(1, 100)).unwrap_or(100))
                .set_exclusive_start_key(start.take());
            query = if status == JobStatus::Running {
                query
                    .filter_expression(
                        "#exp > :secs AND (attribute_not_exists(#lease) OR #lease <= :now)",
                    )
                    .expression_attribute_names("#lease", "lease_until")
                    .expression_attribute_values(":now", n(now_ms))
            } else {
                query.filter_expression("#exp > :secs")
            };
            let out = query.send().await.map_err(unavailable)?;
            found.extend(
                out.items()
                    .iter()
                    .filter_map(|row| get_s(row, "pk")?.strip_prefix("JOB#")?.parse::<Uuid>().ok()),
            );
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() && found.len() < limit => start = Some(key.clone()),
                _ => break,
            }
        }
        found.truncate(limit);
        Ok(found)
    }
}

#[async_trait]
impl JobStore for DynamoJobs {
    async fn create(&self, job: NewJob) -> Result<Job, ApiError> {
        let id = Uuid::new_v4();
        let expires_at = now_secs() + ttl_secs(self.ttl);
        let total = u64::try_from(job.inputs.len()).unwrap_or(u64::MAX);
        let mut requests = Vec::with_capacity(job.inputs.len());
        for (index, input) in job.inputs.iter().enumerate() {
            let index = u32::try_from(index).map_err(ApiError::internal)?;
            let put = PutRequest::builder()
                .item("pk", s(pk(id)))
                .item("sk", s(item_sk(index)))
                .item("input", s(input.to_string()))
                .item("item_state", s(ItemState::Pending.as_str()))
                .item("expires_at", n(expires_at))
                .build()
                .map_err(ApiError::internal)?;
            requests.push(WriteRequest::builder().put_request(put).build());
        }
        // Items first: until META exists nothing reads them, and if this fails half-way the
        // orphans are invisible and expire.
        let chunks: Vec<Vec<WriteRequest>> = requests.chunks(25).map(<[_]>::to_vec).collect();
        futures::stream::iter(chunks)
            .map(|chunk| self.write_items(chunk))
            .buffer_unordered(CREATE_PARALLELISM)
            .try_collect::<Vec<()>>()
            .await?;
        let now = now_rfc3339();
        self.client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(pk(id)))
            .item("sk", s(META))
            .item("owner", s(&job.owner))
            .item("tier", s(job.tier.as_str()))
            .item("status", s(JobStatus::Queued.as_str()))
            .item("spec", s(job.spec.to_string()))
            .item("total", n(total))
            .item("succeeded", n(0))
            .item("failed", n(0))
            .item("created_at", s(&now))
            .item("updated_at", s(&now))
            .item("expires_at", n(expires_at))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await
            .map_err(unavailable)?;
        Ok(Job {
            id,
            owner: job.owner,
            tier: job.tier,
            status: JobStatus::Queued,
            spec: job.spec,
            total,
            succeeded: 0,
            failed: 0,
            created_at: now.clone(),
            updated_at: now,
        })
    }

    async fn get(&self, owner: &str, id: Uuid) -> Result<Option<Job>, ApiError> {
        Ok(self
            .meta(id)
            .await?
            .as_ref()
            .and_then(job_from)
            .filter(|job| job.owner == owner))
    }

    async fn items(
        &self,
        owner: &str,
        id: Uuid,
        after: Option<u32>,
        limit: usize,
    ) -> Result<Option<ItemPage>, ApiError> {
        if self.get(owner, id).await?.is_none() {
            return Ok(None);
        }
        let limit = limit.clamp(1, 1_000);
        let from = after.map_or(0, |a| a.saturating_add(1));
        let mut items = Vec::new();
        let mut start: Option<Row> = None;
        // One more than asked for tells whether another page exists.
        while items.len() <= limit {
            let want = limit + 1 - items.len();
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND sk BETWEEN :from AND :to")
                .expression_attribute_values(":pk", s(pk(id)))
                .expression_attribute_values(":from", s(item_sk(from)))
                .expression_attribute_values(":to", s(LAST_ITEM_SK))
                .limit(i32::try_from(want).unwrap_or(i32::MAX))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(unavailable)?;
            items.extend(out.items().iter().filter_map(item_from));
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        let has_more = items.len() > limit;
        items.truncate(limit);
        Ok(Some(ItemPage { items, has_more }))
    }

    async fn claimable(&self, now_ms: u64, limit: usize) -> Result<Vec<Uuid>, ApiError> {
        let mut ids = self.by_status(JobStatus::Running, now_ms, limit).await?;
        if ids.len() < limit {
            let queued = self
                .by_status(JobStatus::Queued, now_ms, limit - ids.len())
                .await?;
            ids.extend(queued);
        }
        Ok(ids)
    }

    async fn claim(
        &self,
        id: Uuid,
        worker: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Option<Job>, ApiError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(pk(id)))
            .key("sk", s(META))
            .update_expression(
                "SET #status = :running, #owner_l = :worker, #lease = :until, #upd = :upd",
            )
            // The one write that decides who drains the job: a queued job, or a running one
            // whose holder let its lease lapse (crashed, or released it).
            .condition_expression(
                "attribute_exists(pk) AND #exp > :secs AND (#status = :queued OR \
                 (#status = :running AND (attribute_not_exists(#lease) OR #lease <= :now)))",
            )
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#owner_l", "lease_owner")
            .expression_attribute_names("#lease", "lease_until")
            .expression_attribute_names("#upd", "updated_at")
            .expression_attribute_names("#exp", "expires_at")
            .expression_attribute_values(":running", s(JobStatus::Running.as_str()))
            .expression_attribute_values(":queued", s(JobStatus::Queued.as_str()))
            .expression_attribute_values(":worker", s(worker))
            .expression_attribute_values(":until", n(now_ms.saturating_add(lease_ms)))
            .expression_attribute_values(":now", n(now_ms))
            .expression_attribute_values(":secs", n(now_ms / 1000))
            .expression_attribute_values(":upd", s(now_rfc3339()))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match result {
            Ok(out) => Ok(out.attributes().and_then(job_from)),
            Err(err) if condition_failed(&err) => Ok(None),
            Err(err) => Err(unavailable(err)),
        }
    }

    async fn renew(
        &self,
        id: Uuid,
        worker: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<bool, ApiError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(pk(id)))
            .key("sk", s(META))
            .update_expression("SET #lease = :until")
            .condition_expression("#owner_l = :worker AND #status = :running")
            .expression_attribute_names("#owner_l", "lease_owner")
            .expression_attribute_names("#lease", "lease_until")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":worker", s(worker))
            .expression_attribute_values(":running", s(JobStatus::Running.as_str()))
            .expression_attribute_values(":until", n(now_ms.saturating_add(lease_ms)))
            .send()
            .await;
        applied(result)
    }

    async fn release(&self, id: Uuid, worker: &str, retry_at_ms: u64) -> Result<bool, ApiError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(pk(id)))
            .key("sk", s(META))
            .update_expression("SET #lease = :at REMOVE #owner_l")
            .condition_expression("#owner_l = :worker AND #status = :running")
            .expression_attribute_names("#owner_l", "lease_owner")
            .expression_attribute_names("#lease", "lease_until")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":worker", s(worker))
            .expression_attribute_values(":running", s(JobStatus::Running.as_str()))
            .expression_attribute_values(":at", n(retry_at_ms))
            .send()
            .await;
        applied(result)
    }

    async fn finish(&self, id: Uuid, worker: &str) -> Result<Option<JobStatus>, ApiError> {
        let Some(job) = self.meta(id).await?.as_ref().and_then(job_from) else {
            return Ok(None);
        };
        if job.finished() < job.total {
            return Ok(None);
        }
        let status = final_status(job.succeeded);
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(pk(id)))
            .key("sk", s(META))
            .update_expression("SET #status = :final, #upd = :upd REMOVE #owner_l, #lease")
            // DynamoDB cannot add in a condition: pin the counters that were read instead.
            // Once they add up to the total no item can be recorded any more, so equal
            // counters mean the job really is complete.
            .condition_expression(
                "#owner_l = :worker AND #status = :running AND #ok = :ok AND #ko = :ko",
            )
            .expression_attribute_names("#status", "status")
            .expression_attribute_names("#owner_l", "lease_owner")
            .expression_attribute_names("#lease", "lease_until")
            .expression_attribute_names("#upd", "updated_at")
            .expression_attribute_names("#ok", "succeeded")
            .expression_attribute_names("#ko", "failed")
            .expression_attribute_values(":final", s(status.as_str()))
            .expression_attribute_values(":running", s(JobStatus::Running.as_str()))
            .expression_attribute_values(":worker", s(worker))
            .expression_attribute_values(":ok", n(job.succeeded))
            .expression_attribute_values(":ko", n(job.failed))
            .expression_attribute_values(":upd", s(now_rfc3339()))
            .send()
            .await;
        match result {
            Ok(_) => Ok(Some(status)),
            Err(err) if condition_failed(&err) => Ok(None),
            Err(err) => Err(unavailable(err)),
        }
    }

    async fn unfinished(&self, id: Uuid, now_ms: u64) -> Result<Vec<JobItem>, ApiError> {
        let mut items = Vec::new();
        let mut start: Option<Row> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND begins_with(sk, :item)")
                .filter_expression("#st = :pending OR (#st = :running AND #claim <= :now)")
                .expression_attribute_names("#st", "item_state")
                .expression_attribute_names("#claim", "claim_until")
                .expression_attribute_values(":pk", s(pk(id)))
                .expression_attribute_values(":item", s("ITEM#"))
                .expression_attribute_values(":pending", s(ItemState::Pending.as_str()))
                .expression_attribute_values(":running", s(ItemState::Running.as_str()))
                .expression_attribute_values(":now", n(now_ms))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(unavailable)?;
            items.extend(out.items().iter().filter_map(item_from));
            match out.last_evaluated_key() {
                Some(key) if !key.is_empty() => start = Some(key.clone()),
                _ => break,
            }
        }
        Ok(items)
    }

    async fn claim_item(
        &self,
        id: Uuid,
        index: u32,
        worker: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<bool, ApiError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(pk(id)))
            .key("sk", s(item_sk(index)))
            .update_expression("SET #st = :running, #by = :worker, #claim = :until")
            // What makes item processing exactly-once across drains: only one writer can move
            // an item out of `pending` (or out of a lapsed claim).
            .condition_expression("#st = :pending OR (#st = :running AND #claim <= :now)")
            .expression_attribute_names("#st", "item_state")
            .expression_attribute_names("#by", "claim_owner")
            .expression_attribute_names("#claim", "claim_until")
            .expression_attribute_values(":pending", s(ItemState::Pending.as_str()))
            .expression_attribute_values(":running", s(ItemState::Running.as_str()))
            .expression_attribute_values(":worker", s(worker))
            .expression_attribute_values(":until", n(until_ms))
            .expression_attribute_values(":now", n(now_ms))
            .send()
            .await;
        applied(result)
    }

    async fn release_item(&self, id: Uuid, index: u32, worker: &str) -> Result<bool, ApiError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", s(pk(id)))
            .key("sk", s(item_sk(index)))
            .update_expression("SET #st = :pending REMOVE #by, #claim")
            .condition_expression("#st = :running AND #by = :worker")
            .expression_attribute_names("#st", "item_state")
            .expression_attribute_names("#by", "claim_owner")
            .expression_attribute_names("#claim", "claim_until")
            .expression_attribute_values(":pending", s(ItemState::Pending.as_str()))
            .expression_attribute_values(":running", s(ItemState::Running.as_str()))
            .expression_attribute_values(":worker", s(worker))
            .send()
            .await;
        applied(result)
    }

    async fn record(
        &self,
        id: Uuid,
        index: u32,
        worker: &str,
        outcome: ItemOutcome,
    ) -> Result<bool, ApiError> {
        let (state, counter, result) = match outcome {
            ItemOutcome::Succeeded(v) => (ItemState::Succeeded, "succeeded", v),
            ItemOutcome::Failed(v) => (ItemState::Failed, "failed", v),
        };
        let item = Update::builder()
            .table_name(&self.table)
            .key("pk", s(pk(id)))
            .key("sk", s(item_sk(index)))
            .update_expression("SET #st = :final, #res = :result REMOVE #claim")
            // Fenced by the claim: a drain whose claim lapsed and was taken over must not
            // write a second result.
            .condition_expression("#st = :running AND #by = :worker")
            .expression_attribute_names("#st", "item_state")
            .expression_attribute_names("#res", "result")
            .expression_attribute_names("#claim", "claim_until")
            .expression_attribute_names("#by", "claim_owner")
            .expression_attribute_values(":final", s(state.as_str()))
            .expression_attribute_values(":result", s(result.to_string()))
            .expression_attribute_values(":running", s(ItemState::Running.as_str()))
            .expression_attribute_values(":worker", s(worker))
            .build()
            .map_err(ApiError::internal)?;
        let meta = Update::builder()
            .table_name(&self.table)
            .key("pk", s(pk(id)))
            .key("sk", s(META))
            .update_expression("ADD #count :one SET #upd = :upd")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#count", counter)
            .expression_attribute_names("#upd", "updated_at")
            .expression_attribute_values(":one", n(1))
            .expression_attribute_values(":upd", s(now_rfc3339()))
            .build()
            .map_err(ApiError::internal)?;
        let result = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().update(item).build())
            .transact_items(TransactWriteItem::builder().update(meta).build())
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(err) => match err.as_service_error() {
                Some(e) if e.is_transaction_canceled_exception() => Ok(false),
                _ => Err(unavailable(err)),
            },
        }
    }
}

// ------------------------------------------------------------------------------------------
// In memory

#[derive(Debug, Clone)]
struct StoredItem {
    input: Value,
    state: ItemState,
    claim_owner: Option<String>,
    claim_until: u64,
    result: Option<Value>,
}

#[derive(Debug, Clone)]
struct StoredJob {
    job: Job,
    /// Order of creation, for "oldest first".
    seq: u64,
    lease_owner: Option<String>,
    lease_until: u64,
    expires_at_secs: u64,
    items: Vec<StoredItem>,
}

impl StoredJob {
    fn live(&self) -> bool {
        self.expires_at_secs > now_secs()
    }

    fn claimable(&self, now_ms: u64) -> bool {
        self.live()
            && match self.job.status {
                JobStatus::Queued => true,
                JobStatus::Running => self.lease_until <= now_ms,
                JobStatus::Done | JobStatus::Failed => false,
            }
    }

    fn held_by(&self, worker: &str) -> bool {
        self.job.status == JobStatus::Running && self.lease_owner.as_deref() == Some(worker)
    }
}

fn item_view(index: usize, item: &StoredItem) -> JobItem {
    JobItem {
        index: u32::try_from(index).unwrap_or(u32::MAX),
        input: item.input.clone(),
        state: item.state,
        result: item.result.clone(),
    }
}

/// In-memory fake with the same contract (every method is atomic under one mutex).
#[derive(Debug)]
pub struct InMemoryJobs {
    jobs: Mutex<HashMap<Uuid, StoredJob>>,
    next_seq: AtomicU64,
    ttl: Duration,
}

impl Default for InMemoryJobs {
    fn default() -> Self {
        Self::new(Duration::from_secs(7 * 86_400))
    }
}

impl InMemoryJobs {
    pub fn new(ttl: Duration) -> Self {
        Self {
            jobs: Mutex::new(HashMap::new()),
            next_seq: AtomicU64::new(0),
            ttl,
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, HashMap<Uuid, StoredJob>>, ApiError> {
        self.jobs
            .lock()
            .map_err(|_| ApiError::internal("job store fake poisoned"))
    }

    fn with_job<T>(
        &self,
        id: Uuid,
        missing: T,
        f: impl FnOnce(&mut StoredJob) -> T,
    ) -> Result<T, ApiError> {
        let mut jobs = self.lock()?;
        Ok(match jobs.get_mut(&id).filter(|j| j.live()) {
            Some(job) => f(job),
            None => missing,
        })
    }
}

#[async_trait]
impl JobStore for InMemoryJobs {
    async fn create(&self, job: NewJob) -> Result<Job, ApiError> {
        let id = Uuid::new_v4();
        let now = now_rfc3339();
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        let stored = StoredJob {
            job: Job {
                id,
                owner: job.owner,
                tier: job.tier,
                status: JobStatus::Queued,
                spec: job.spec,
                total: u64::try_from(job.inputs.len()).unwrap_or(u64::MAX),
                succeeded: 0,
                failed: 0,
                created_at: now.clone(),
                updated_at: now,
            },
            seq,
            lease_owner: None,
            lease_until: 0,
            expires_at_secs: now_secs() + ttl_secs(self.ttl),
            items: job
                .inputs
                .into_iter()
                .map(|input| StoredItem {
                    input,
                    state: ItemState::Pending,
                    claim_owner: None,
                    claim_until: 0,
                    result: None,
                })
                .collect(),
        };
        let view = stored.job.clone();
        self.lock()?.insert(id, stored);
        Ok(view)
    }

    async fn get(&self, owner: &str, id: Uuid) -> Result<Option<Job>, ApiError> {
        self.with_job(id, None, |stored| {
            (stored.job.owner == owner).then(|| stored.job.clone())
        })
    }

    async fn items(
        &self,
        owner: &str,
        id: Uuid,
        after: Option<u32>,
        limit: usize,
    ) -> Result<Option<ItemPage>, ApiError> {
        let limit = limit.clamp(1, 1_000);
        self.with_job(id, None, |stored| {
            if stored.job.owner != owner {
                return None;
            }
            let from = after.map_or(0, |a| {
                usize::try_from(a).unwrap_or(usize::MAX).saturating_add(1)
            });
            let items: Vec<JobItem> = stored
                .items
                .iter()
                .enumerate()
                .skip(from)
                .take(limit)
                .map(|(i, item)| item_view(i, item))
                .collect();
            let has_more = from.saturating_add(items.len()) < stored.items.len();
            Some(ItemPage { items, has_more })
        })
    }

    async fn claimable(&self, now_ms: u64, limit: usize) -> Result<Vec<Uuid>, ApiError> {
        let jobs = self.lock()?;
        let mut candidates: Vec<(bool, u64, Uuid)> = jobs
            .values()
            .filter(|j| j.claimable(now_ms))
            .map(|j| (j.job.status == JobStatus::Queued, j.seq, j.job.id))
            .collect();
        candidates.sort();
        Ok(candidates
            .into_iter()
            .take(limit)
            .map(|(_, _, id)| id)
            .collect())
    }

    async fn claim(
        &self,
        id: Uuid,
        worker: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<Option<Job>, ApiError> {
        self.with_job(id, None, |stored| {
            if !stored.claimable(now_ms) {
                return None;
            }
            stored.job.status = JobStatus::Running;
            stored.job.updated_at = now_rfc3339();
            stored.lease_owner = Some(worker.to_owned());
            stored.lease_until = now_ms.saturating_add(lease_ms);
            Some(stored.job.clone())
        })
    }

    async fn renew(
        &self,
        id: Uuid,
        worker: &str,
        now_ms: u64,
        lease_ms: u64,
    ) -> Result<bool, ApiError> {
        self.with_job(id, false, |stored| {
            if !stored.held_by(worker) {
                return false;
            }
            stored.lease_until = now_ms.saturating_add(lease_ms);
            true
        })
    }

    async fn release(&self, id: Uuid, worker: &str, retry_at_ms: u64) -> Result<bool, ApiError> {
        self.with_job(id, false, |stored| {
            if !stored.held_by(worker) {
                return false;
            }
            stored.lease_owner = None;
            stored.lease_until = retry_at_ms;
            true
        })
    }

    async fn finish(&self, id: Uuid, worker: &str) -> Result<Option<JobStatus>, ApiError> {
        self.with_job(id, None, |stored| {
            if !stored.held_by(worker) || stored.job.finished() < stored.job.total {
                return None;
            }
            let status = final_status(stored.job.succeeded);
            stored.job.status = status;
            stored.job.updated_at = now_rfc3339();
            stored.lease_owner = None;
            stored.lease_until = 0;
            Some(status)
        })
    }

    async fn unfinished(&self, id: Uuid, now_ms: u64) -> Result<Vec<JobItem>, ApiError> {
        self.with_job(id, Vec::new(), |stored| {
            stored
                .items
                .iter()
                .enumerate()
                .filter(|(_, item)| match item.state {
                    ItemState::Pending => true,
                    ItemState::Running => item.claim_until <= now_ms,
                    ItemState::Succeeded | ItemState::Failed => false,
                })
                .map(|(i, item)| item_view(i, item))
                .collect()
        })
    }

    async fn claim_item(
        &self,
        id: Uuid,
        index: u32,
        worker: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<bool, ApiError> {
        self.with_job(id, false, |stored| {
            let Some(item) = usize::try_from(index)
                .ok()
                .and_then(|i| stored.items.get_mut(i))
            else {
                return false;
            };
            let free = match item.state {
                ItemState::Pending => true,
                ItemState::Running => item.claim_until <= now_ms,
                ItemState::Succeeded | ItemState::Failed => false,
            };
            if free {
                item.state = ItemState::Running;
                item.claim_owner = Some(worker.to_owned());
                item.claim_until = until_ms;
            }
            free
        })
    }

    async fn release_item(&self, id: Uuid, index: u32, worker: &str) -> Result<bool, ApiError> {
        self.with_job(id, false, |stored| {
            let Some(item) = usize::try_from(index)
                .ok()
                .and_then(|i| stored.items.get_mut(i))
            else {
                return false;
            };
            if item.state != ItemState::Running || item.claim_owner.as_deref() != Some(worker) {
                return false;
            }
            item.state = ItemState::Pending;
            item.claim_owner = None;
            item.claim_until = 0;
            true
        })
    }

    async fn record(
        &self,
        id: Uuid,
        index: u32,
        worker: &str,
        outcome: ItemOutcome,
    ) -> Result<bool, ApiError> {
        self.with_job(id, false, |stored| {
            let Some(item) = usize::try_from(index)
                .ok()
                .and_then(|i| stored.items.get_mut(i))
            else {
                return false;
            };
            if item.state != ItemState::Running || item.claim_owner.as_deref() != Some(worker) {
                return false;
            }
            let (state, result) = match outcome {
                ItemOutcome::Succeeded(v) => {
                    stored.job.succeeded += 1;
                    (ItemState::Succeeded, v)
                }
                ItemOutcome::Failed(v) => {
                    stored.job.failed += 1;
                    (ItemState::Failed, v)
                }
            };
            item.state = state;
            item.result = Some(result);
            item.claim_until = 0;
            stored.job.updated_at = now_rfc3339();
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_through_their_stored_names() {
        for status in [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Done,
            JobStatus::Failed,
        ] {
            assert_eq!(JobStatus::parse(status.as_str()), Some(status));
        }
        for state in [
            ItemState::Pending,
            ItemState::Running,
            ItemState::Succeeded,
            ItemState::Failed,
        ] {
            assert_eq!(ItemState::parse(state.as_str()), Some(state));
        }
        assert_eq!(JobStatus::parse("QUEUED"), None);
    }

    #[test]
    fn item_sort_keys_sort_in_index_order() {
        assert!(item_sk(9) < item_sk(10));
        assert!(item_sk(99_999) < item_sk(100_000));
        assert!(item_sk(999_998).as_str() < LAST_ITEM_SK);
    }
}
