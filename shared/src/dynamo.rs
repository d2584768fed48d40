//! DynamoDB client construction and error mapping shared by every store.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::DisplayErrorContext;
use aws_sdk_dynamodb::types::TransactWriteItem;

use crate::error::ApiError;

/// Builds the client once per cold start. Region, credentials and endpoint come from the
/// standard AWS chain, so `AWS_ENDPOINT_URL_DYNAMODB` points it at the local emulator with no
/// code path of its own.
///
/// Timeouts are tight because every call sits on a request's hot path: a DynamoDB that does not
/// answer must become a prompt 503, not a Lambda timeout. The SDK's standard retry (3 attempts,
/// jittered) absorbs throttling before we map the error.
///
/// Its HTTPS client trusts the process's roots ([`crate::tls`]), loaded once for every client.
pub async fn client() -> Client {
    let config = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(1))
                .operation_attempt_timeout(Duration::from_secs(2))
                .operation_timeout(Duration::from_secs(5))
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(3))
        .http_client(crate::tls::aws_http_client())
        .load()
        .await;
    Client::new(&config)
}

/// Any DynamoDB failure the caller does not handle itself: the store is unavailable (503).
/// The detail (which may name a table) is logged by the error's renderer, never sent.
pub fn unavailable(err: impl std::error::Error) -> ApiError {
    ApiError::Unavailable {
        dependency: "DynamoDB",
        detail: DisplayErrorContext(&err).to_string(),
    }
}

/// A best-effort write that one store hands to another to carry in its own
/// `TransactWriteItems`, saving the round trip of a separate call (the response cache's fill,
/// carried by a chat turn's transaction). The carrier must never let it fail its own write: if
/// the transaction cannot commit with it, the carrier drops it, commits without it, and reports
/// that it did not carry it, so the owner can write it on its own.
#[derive(Debug, Clone)]
pub struct BundledWrite(TransactWriteItem);

impl BundledWrite {
    pub fn new(item: TransactWriteItem) -> Self {
        Self(item)
    }

    pub fn into_item(self) -> TransactWriteItem {
        self.0
    }
}

/// Seconds since the Unix epoch.
pub fn now_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// RFC 3339 timestamp (UTC, millisecond precision) for `created_at` / `updated_at`. Fixed width,
/// so string order is time order, which the `byOwner` index relies on.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let millis = now.millisecond();
    let format = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    let base = now.format(&format).unwrap_or_default();
    format!("{base}.{millis:03}Z")
}

/// Deep health check of DynamoDB: describes one table the function uses.
pub struct DynamoProbe {
    pub client: Client,
    pub table: String,
}

#[async_trait::async_trait]
impl crate::http::Probe for DynamoProbe {
    fn name(&self) -> &'static str {
        "dynamodb"
    }

    async fn check(&self) -> Result<(), ApiError> {
        self.client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}
