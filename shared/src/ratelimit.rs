//! Rate limits that hold across every concurrent Lambda instance.
//!
//! Counters live in DynamoDB, one item per principal, scope and fixed window. Each check is a
//! single conditional `UpdateItem` (`ADD` guarded by "the new total stays within the limit"),
//! which DynamoDB applies atomically per item: no read-modify-write race, no matter how many
//! instances count at once. Tokens per minute are *reserved* before the upstream call from a
//! conservative estimate and *settled* afterwards against the usage the provider reports, so the
//! counter ends exact without an exact tokenizer on the cold-start path.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
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

/// A fixed counting window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub scope: &'static str,
    pub length_secs: u64,
}

pub const REQUESTS_PER_HOUR: Window = Window {
    scope: "rph",
    length_secs: 3_600,
};
pub const TOKENS_PER_MINUTE: Window = Window {
    scope: "tpm",
    length_secs: 60,
};

/// Identifies one counter: `<scope>#<subject>#<window start>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CounterKey {
    pub id: String,
    /// Epoch second at which the window ends and the counter resets.
    pub resets_at: u64,
}

impl CounterKey {
    pub fn new(window: Window, subject: &str, now: u64) -> Self {
        let start = now - now % window.length_secs;
        Self {
            id: format!("{}#{}#{}", window.scope, subject, start),
            resets_at: start + window.length_secs,
        }
    }
}

/// The outcome of one conditional increment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The amount was added; `count` is the new total.
    Admitted { count: u64 },
    /// Nothing was added; `count` is the total at the time, when the store could tell.
    Rejected { count: Option<u64> },
}

/// Storage for windowed counters.
///
/// Contract: `try_add` is atomic per key — it adds `amount` if and only if the resulting total
/// is at most `limit`, and concurrent callers on any number of instances can never together push
/// a counter past its limit. `adjust` adds a signed delta unconditionally (settling a reservation
/// against real usage); it may leave a counter above its limit, which only delays later requests.
/// A key that was never written counts as zero.
#[async_trait]
pub trait RateLimitStore: Send + Sync {
    async fn try_add(
        &self,
        key: &CounterKey,
        amount: u64,
        limit: u64,
    ) -> Result<Admission, ApiError>;
    async fn adjust(&self, key: &CounterKey, delta: i64) -> Result<(), ApiError>;
    /// The current total (for tests and diagnostics; not used on the hot path).
    async fn current(&self, key: &CounterKey) -> Result<u64, ApiError>;
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
    // Refunds can drive a counter briefly negative in arithmetic terms; clamp for reporting.
    value.parse::<i64>().ok().map(|n| n.max(0).unsigned_abs())
}

#[async_trait]
impl RateLimitStore for DynamoRateLimits {
    async fn try_add(
        &self,
        key: &CounterKey,
        amount: u64,
        limit: u64,
    ) -> Result<Admission, ApiError> {
        if amount > limit {
            // Can never fit; a conditional write with a negative bound would still pass on a
            // missing item, so decide here.
            return Ok(Admission::Rejected { count: None });
        }
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key.id.clone()))
            .update_expression("ADD #count :amount SET #exp = if_not_exists(#exp, :exp)")
            .condition_expression("attribute_not_exists(#count) OR #count <= :max_before")
            .expression_attribute_names("#count", "count")
            .expression_attribute_names("#exp", "expires_at")
            .expression_attribute_values(":amount", AttributeValue::N(amount.to_string()))
            .expression_attribute_values(
                ":max_before",
                AttributeValue::N((limit - amount).to_string()),
            )
            .expression_attribute_values(
                ":exp",
                AttributeValue::N((key.resets_at + COUNTER_GRACE_SECS).to_string()),
            )
            .return_values(ReturnValue::UpdatedNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match result {
            Ok(output) => Ok(Admission::Admitted {
                count: number(output.attributes(), "count").unwrap_or(amount),
            }),
            Err(err) => match err.as_service_error() {
                Some(service) if service.is_conditional_check_failed_exception() => {
                    let count = match service {
                        aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(e) => {
                            number(e.item(), "count")
                        }
                        _ => None,
                    };
                    Ok(Admission::Rejected { count })
                }
                _ => Err(unavailable(err)),
            },
        }
    }

    async fn adjust(&self, key: &CounterKey, delta: i64) -> Result<(), ApiError> {
        if delta == 0 {
            return Ok(());
        }
        self.client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key.id.clone()))
            .update_expression("ADD #count :delta SET #exp = if_not_exists(#exp, :exp)")
            .expression_attribute_names("#count", "count")
            .expression_attribute_names("#exp", "expires_at")
            .expression_attribute_values(":delta", AttributeValue::N(delta.to_string()))
            .expression_attribute_values(
                ":exp",
                AttributeValue::N((key.resets_at + COUNTER_GRACE_SECS).to_string()),
            )
            .send()
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn current(&self, key: &CounterKey) -> Result<u64, ApiError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key.id.clone()))
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        Ok(number(output.item(), "count").unwrap_or(0))
    }
}

/// In-memory fake with the same contract (atomic under its mutex).
#[derive(Default)]
pub struct InMemoryRateLimits {
    counters: Mutex<HashMap<String, i64>>,
}

impl InMemoryRateLimits {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, i64>) -> T) -> Result<T, ApiError> {
        let mut guard = self
            .counters
            .lock()
            .map_err(|_| ApiError::internal("rate-limit fake poisoned"))?;
        Ok(f(&mut guard))
    }
}

#[async_trait]
impl RateLimitStore for InMemoryRateLimits {
    async fn try_add(
        &self,
        key: &CounterKey,
        amount: u64,
        limit: u64,
    ) -> Result<Admission, ApiError> {
        self.with(|counters| {
            let count = counters.entry(key.id.clone()).or_insert(0);
            let current = (*count).max(0).unsigned_abs();
            if amount > limit || current > limit - amount {
                Admission::Rejected {
                    count: Some(current),
                }
            } else {
                *count += i64::try_from(amount).unwrap_or(i64::MAX);
                Admission::Admitted {
                    count: (*count).max(0).unsigned_abs(),
                }
            }
        })
    }

    async fn adjust(&self, key: &CounterKey, delta: i64) -> Result<(), ApiError> {
        self.with(|counters| *counters.entry(key.id.clone()).or_insert(0) += delta)
    }

    async fn current(&self, key: &CounterKey) -> Result<u64, ApiError> {
        self.with(|counters| {
            counters
                .get(&key.id)
                .copied()
                .unwrap_or(0)
                .max(0)
                .unsigned_abs()
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
    reserved: u64,
}

impl TokenReservation {
    pub fn reserved(&self) -> u64 {
        self.reserved
    }
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

    /// Counts `requests` requests (a batch counts each item) against the hourly quota.
    pub async fn admit_requests(
        &self,
        principal: &Principal,
        requests: u64,
    ) -> Result<LimitStatus, ApiError> {
        let limit = principal.quota(&self.quotas).requests_per_hour;
        let now = now_epoch();
        let key = CounterKey::new(REQUESTS_PER_HOUR, &principal.user_id, now);
        let reset_after_secs = key.resets_at.saturating_sub(now).max(1);
        match self.store.try_add(&key, requests, limit).await? {
            Admission::Admitted { count } => Ok(LimitStatus {
                limit,
                remaining: limit.saturating_sub(count),
                reset_after_secs,
            }),
            Admission::Rejected { .. } => {
                rejection_metric("requests");
                Err(ApiError::RateLimited {
                    message: format!("{limit} requests per hour"),
                    limit,
                    retry_after_secs: reset_after_secs,
                })
            }
        }
    }

    /// Holds `estimate` tokens of the per-minute budget before an upstream call.
    pub async fn reserve_tokens(
        &self,
        principal: &Principal,
        estimate: u64,
    ) -> Result<TokenReservation, ApiError> {
        let limit = principal.quota(&self.quotas).tokens_per_minute;
        let now = now_epoch();
        let key = CounterKey::new(TOKENS_PER_MINUTE, &principal.user_id, now);
        match self.store.try_add(&key, estimate, limit).await? {
            Admission::Admitted { .. } => Ok(TokenReservation {
                key,
                reserved: estimate,
            }),
            Admission::Rejected { count } => {
                rejection_metric("tokens");
                let message = match count {
                    Some(used) => format!(
                        "{limit} tokens per minute ({used} in use, this request needs up to {estimate})"
                    ),
                    None => {
                        format!("{limit} tokens per minute (this request needs up to {estimate})")
                    }
                };
                Err(ApiError::RateLimited {
                    message,
                    limit,
                    retry_after_secs: key.resets_at.saturating_sub(now).max(1),
                })
            }
        }
    }

    /// Replaces a reservation by the usage the provider reported: refunds what was not used, or
    /// charges what the estimate missed.
    pub async fn settle(&self, reservation: TokenReservation, actual: u64) -> Result<(), ApiError> {
        let delta = i64::try_from(actual).unwrap_or(i64::MAX)
            - i64::try_from(reservation.reserved).unwrap_or(i64::MAX);
        self.store.adjust(&reservation.key, delta).await
    }

    /// Returns a whole reservation after a failed call (nothing was consumed upstream).
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
