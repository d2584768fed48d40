//! Rate limits that hold across every concurrent Lambda instance.
//!
//! Counters live in DynamoDB. Each check is a single conditional `UpdateItem` (`ADD` guarded by "the new totals stay within the limits")
//! on one item per principal and hour, holding the request counter and one token counter per
//! minute; DynamoDB applies it atomically per item: no read-modify-write race, no matter how many
//! instances count at once. Tokens per minute are *reserved* before the upstream call from a
//! conservative estimate and *settled* afterwards against the usage the provider reports, so the
//! counter ends exact without an exact tokenizer on the cold-start path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use axum::http::{HeaderMap, HeaderValue};

use crate::auth::Principal;
use crate::config::TierQuotas;
use crate::dynamo::{now_epoch, unavailable};
use crate::error::ApiError;

pub const LIMIT_HEADER: &str = "x-ratelimit-limit";
pub const REMAINING_HEADER: &str = "x-ratelimit-remaining";
pub const RESET_HEADER: &str = "x-ratelimit-reset";

/// Counters outlive their window a little so a late settlement still finds its item; after that
/// DynamoDB's TTL removes them (reads never depend on the deletion having happened).
const COUNTER_GRACE_SECS: u64 = 300;

const HOUR_SECS: u64 = 3_600;
const MINUTE_SECS: u64 = 60;

/// Name of the request counter inside a principal's hourly item.
pub const REQUESTS: &str = "requests";

/// Name of the token counter of the minute starting at `minute_start` (one attribute per
/// minute inside the hourly item, so requests and tokens are checked in one update).
pub fn tokens_counter(minute_start: u64) -> String {
    format!("tokens_{minute_start}")
}

/// Identifies one principal's rate-limit item for one hour: `rl#<subject>#<hour start>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub id: String,
    /// Epoch second at which the hour ends.
    pub resets_at: u64,
}

impl CounterKey {
    pub fn hourly(subject: &str, now: u64) -> Self {
        let start = now - now % HOUR_SECS;
        Self {
            id: format!("rl#{subject}#{start}"),
            resets_at: start + HOUR_SECS,
        }
    }
}

/// One counter to increase, and the total it may not exceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub counter: String,
    pub amount: u64,
    pub limit: u64,
}

/// The outcome of one conditional charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Every amount was added; the new totals, in the order of the charges.
    Admitted { counts: Vec<u64> },
    /// Nothing was added. The totals at the time (in charge order) when the store could tell;
    /// a charge larger than its whole limit is reported as `None`.
    Rejected { counts: Vec<Option<u64>> },
}

/// Storage for rate-limit counters.
///
/// Contract: `try_charge` is atomic per key — it adds every amount if and only if each
/// resulting total stays within its limit, otherwise it adds nothing; concurrent callers on any
/// number of instances can never together push a counter past its limit. `adjust` adds a signed
/// delta to one counter unconditionally (settling a reservation against real usage); it may
/// leave a counter above its limit, which only delays later requests. A counter that was never
/// written counts as zero.
#[async_trait]
pub trait RateLimitStore: Send + Sync {
    async fn try_charge(&self, key: &CounterKey, charges: &[Charge])
    -> Result<Admission, ApiError>;
    async fn adjust(&self, key: &CounterKey, counter: &str, delta: i64) -> Result<(), ApiError>;
    /// The current total of one counter (tests and diagnostics; not used on the hot path).
    async fn current(&self, key: &CounterKey, counter: &str) -> Result<u64, ApiError>;
}

/// DynamoDB implementation: one `UpdateItem` per call.
pub struct DynamoRateLimits {
    client: Client,
    table: String,
}

impl DynamoRateLimits {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }
}

fn number(item: Option<&HashMap<String, AttributeValue>>, name: &str) -> Option<u64> {
    let value = item?.get(name)?.as_n().ok()?;
    // Settlements can take a counter below zero in arithmetic terms; clamp for reporting.
    value.parse::<i64>().ok().map(|n| n.max(0).unsigned_abs())
}

fn expiry(key: &CounterKey) -> AttributeValue {
    AttributeValue::N((key.resets_at + COUNTER_GRACE_SECS).to_string())
}

#[async_trait]
impl RateLimitStore for DynamoRateLimits {
    async fn try_charge(
        &self,
        key: &CounterKey,
        charges: &[Charge],
    ) -> Result<Admission, ApiError> {
        if charges.iter().any(|c| c.amount > c.limit) {
            // Can never fit; a conditional write with a negative bound would still pass on a
            // missing attribute, so decide here without a round trip.
            return Ok(Admission::Rejected {
                counts: vec![None; charges.len()],
            });
        }
        let mut update = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key.id.clone()))
            .expression_attribute_names("#exp", "expires_at")
            .expression_attribute_values(":exp", expiry(key));
        let mut adds = Vec::new();
        let mut guards = Vec::new();
        for (i, charge) in charges.iter().enumerate() {
            update = update
                .expression_attribute_names(format!("#c{i}"), &charge.counter)
                .expression_attribute_values(
                    format!(":a{i}"),
                    AttributeValue::N(charge.amount.to_string()),
                )
                .expression_attribute_values(
                    format!(":m{i}"),
                    AttributeValue::N((charge.limit - charge.amount).to_string()),
                );
            adds.push(format!("#c{i} :a{i}"));
            guards.push(format!("(attribute_not_exists(#c{i}) OR #c{i} <= :m{i})"));
        }
        let result = update
            .update_expression(format!(
                "ADD {} SET #exp = if_not_exists(#exp, :exp)",
                adds.join(", ")
            ))
            .condition_expression(guards.join(" AND "))
            .return_values(ReturnValue::UpdatedNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(output) => Ok(Admission::Admitted {
                counts: charges
                    .iter()
                    .map(|c| number(output.attributes(), &c.counter).unwrap_or(c.amount))
                    .collect(),
            }),
            Err(err) => match err.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(failed)) => {
                    Ok(Admission::Rejected {
                        counts: charges
                            .iter()
                            .map(|c| Some(number(failed.item(), &c.counter).unwrap_or(0)))
                            .collect(),
                    })
                }
                _ => Err(unavailable(err)),
            },
        }
    }

    async fn adjust(&self, key: &CounterKey, counter: &str, delta: i64) -> Result<(), ApiError> {
        if delta == 0 {
            return Ok(());
        }
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key.id.clone()))
            .update_expression("ADD #c :delta SET #exp = if_not_exists(#exp, :exp)")
            .expression_attribute_names("#c", counter)
            .expression_attribute_names("#exp", "expires_at")
            .expression_attribute_values(":delta", AttributeValue::N(delta.to_string()))
            .expression_attribute_values(":exp", expiry(key))
            .send()
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn current(&self, key: &CounterKey, counter: &str) -> Result<u64, ApiError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key.id.clone()))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        Ok(number(output.item(), counter).unwrap_or(0))
    }
}

/// In-memory fake with the same contract (atomic under its mutex).
#[derive(Default)]
pub struct InMemoryRateLimits {
    counters: Mutex<HashMap<(String, String), i64>>,
}

impl InMemoryRateLimits {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut HashMap<(String, String), i64>) -> T,
    ) -> Result<T, ApiError> {
        let mut guard = self
            .counters
            .lock()
            .map_err(|_| ApiError::internal("rate-limit fake poisoned"))?;
        Ok(f(&mut guard))
    }
}

fn clamp(n: i64) -> u64 {
    n.max(0).unsigned_abs()
}

#[async_trait]
impl RateLimitStore for InMemoryRateLimits {
    async fn try_charge(
        &self,
        key: &CounterKey,
        charges: &[Charge],
    ) -> Result<Admission, ApiError> {
        self.with(|counters| {
            let current: Vec<u64> = charges
                .iter()
                .map(|c| {
                    clamp(
                        *counters
                            .get(&(key.id.clone(), c.counter.clone()))
                            .unwrap_or(&0),
                    )
                })
                .collect();
            let fits = charges
                .iter()
                .zip(&current)
                .all(|(c, now)| c.amount <= c.limit && *now <= c.limit - c.amount);
            if !fits {
                return Admission::Rejected {
                    counts: charges
                        .iter()
                        .zip(&current)
                        .map(|(c, now)| (c.amount <= c.limit).then_some(*now))
                        .collect(),
                };
            }
            let counts = charges
                .iter()
                .map(|c| {
                    let slot = counters
                        .entry((key.id.clone(), c.counter.clone()))
                        .or_insert(0);
                    *slot += i64::try_from(c.amount).unwrap_or(i64::MAX);
                    clamp(*slot)
                })
                .collect();
            Admission::Admitted { counts }
        })
    }

    async fn adjust(&self, key: &CounterKey, counter: &str, delta: i64) -> Result<(), ApiError> {
        self.with(|counters| {
            *counters
                .entry((key.id.clone(), counter.to_owned()))
                .or_insert(0) += delta;
        })
    }

    async fn current(&self, key: &CounterKey, counter: &str) -> Result<u64, ApiError> {
        self.with(|counters| {
            clamp(
                *counters
                    .get(&(key.id.clone(), counter.to_owned()))
                    .unwrap_or(&0),
            )
        })
    }
}

/// What the `X-RateLimit-*` headers of a response report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitStatus {
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the window resets (the IETF RateLimit-header convention, not an epoch).
    pub reset_after_secs: u64,
}

impl LimitStatus {
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(LIMIT_HEADER, HeaderValue::from(self.limit));
        headers.insert(REMAINING_HEADER, HeaderValue::from(self.remaining));
        headers.insert(RESET_HEADER, HeaderValue::from(self.reset_after_secs));
    }
}

/// Tokens held against a principal's per-minute budget until the call's real usage is known.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a reservation must be settled or released"]
pub struct TokenReservation {
    key: CounterKey,
    counter: String,
    reserved: u64,
}

impl TokenReservation {
    pub fn reserved(&self) -> u64 {
        self.reserved
    }
}

/// An admitted request: what its headers report, and the tokens it holds.
#[derive(Debug)]
pub struct Admitted {
    pub status: LimitStatus,
    pub reservation: TokenReservation,
}

/// Applies tier quotas to principals on top of a [`RateLimitStore`].
#[derive(Clone)]
pub struct RateLimiter {
    store: Arc<dyn RateLimitStore>,
    quotas: TierQuotas,
}

impl RateLimiter {
    pub fn new(store: Arc<dyn RateLimitStore>, quotas: TierQuotas) -> Self {
        Self { store, quotas }
    }

    pub fn store(&self) -> &Arc<dyn RateLimitStore> {
        &self.store
    }

    /// Counts `requests` requests (a batch counts every item) against the hourly quota and holds
    /// `token_estimate` tokens of this minute's budget, in one atomic update: either both fit,
    /// or nothing is counted and the error says which limit was hit. An estimate of 0 (an
    /// answer from the cache, a local analysis) counts the requests only: it needs no room in
    /// the token budget, even one that a settlement left overdrawn.
    pub async fn admit(
        &self,
        principal: &Principal,
        requests: u64,
        token_estimate: u64,
    ) -> Result<Admitted, ApiError> {
        let quota = principal.quota(&self.quotas);
        let now = now_epoch();
        let key = CounterKey::hourly(&principal.user_id, now);
        let minute_start = now - now % MINUTE_SECS;
        let tokens = tokens_counter(minute_start);
        let mut charges = vec![Charge {
            counter: REQUESTS.to_owned(),
            amount: requests,
            limit: quota.requests_per_hour,
        }];
        if token_estimate > 0 {
            charges.push(Charge {
                counter: tokens.clone(),
                amount: token_estimate,
                limit: quota.tokens_per_minute,
            });
        }
        let reset_after_secs = key.resets_at.saturating_sub(now).max(1);
        match self.store.try_charge(&key, &charges).await? {
            Admission::Admitted { counts } => {
                let status = LimitStatus {
                    limit: quota.requests_per_hour,
                    remaining: quota
                        .requests_per_hour
                        .saturating_sub(counts.first().copied().unwrap_or(requests)),
                    reset_after_secs,
                };
                // Every later response of this request reports it, errors included.
                crate::http::record_limit(status);
                Ok(Admitted {
                    status,
                    reservation: TokenReservation {
                        key,
                        counter: tokens,
                        reserved: token_estimate,
                    },
                })
            }
            Admission::Rejected { counts } => {
                let requests_used = counts.first().copied().flatten();
                let requests_blocked =
                    requests_used.is_none_or(|used| used + requests > quota.requests_per_hour);
                if requests_blocked {
                    rejection_metric("requests");
                    Err(ApiError::RateLimited {
                        message: format!("{} requests per hour", quota.requests_per_hour),
                        limit: quota.requests_per_hour,
                        retry_after_secs: reset_after_secs,
                    })
                } else {
                    rejection_metric("tokens");
                    let used = counts.get(1).copied().flatten();
                    let message = match used {
                        Some(used) => format!(
                            "{} tokens per minute ({used} in use, this request needs up to {token_estimate})",
                            quota.tokens_per_minute
                        ),
                        None => format!(
                            "{} tokens per minute (this request needs up to {token_estimate})",
                            quota.tokens_per_minute
                        ),
                    };
                    Err(ApiError::RateLimited {
                        message,
                        limit: quota.tokens_per_minute,
                        retry_after_secs: (minute_start + MINUTE_SECS).saturating_sub(now).max(1),
                    })
                }
            }
        }
    }

    /// Replaces a reservation by the usage the provider reported: refunds what was not used, or
    /// charges what the estimate missed.
    pub async fn settle(&self, reservation: TokenReservation, actual: u64) -> Result<(), ApiError> {
        let delta = i64::try_from(actual).unwrap_or(i64::MAX)
            - i64::try_from(reservation.reserved).unwrap_or(i64::MAX);
        self.store
            .adjust(&reservation.key, &reservation.counter, delta)
            .await
    }

    /// Returns a whole reservation after a call that consumed nothing upstream (a failure, or a
    /// response served from the cache).
    pub async fn release(&self, reservation: TokenReservation) -> Result<(), ApiError> {
        self.settle(reservation, 0).await
    }
}

fn rejection_metric(kind: &str) {
    crate::telemetry::MetricEvent::new()
        .dimension("limit", kind.to_owned())
        .metric("RateLimitRejections", 1.0, crate::telemetry::Unit::Count)
        .emit();
}
