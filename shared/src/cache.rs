//! Response cache.
//!
//! Keyed by the SHA-256 of a normalized request (model, messages, sampling fields), so two
//! requests that would produce the same upstream call share an entry. Entries carry their own
//! expiry; reads treat an expired entry as a miss whether or not DynamoDB's TTL (which deletes
//! lazily, up to days later) has removed it yet.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem};
use axum::http::HeaderMap;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::dynamo::{BundledWrite, now_epoch, now_rfc3339, unavailable};
use crate::error::ApiError;

/// A cache key: hex SHA-256 of the canonical JSON of the request's cache-relevant fields.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    /// `namespace` separates response kinds (a chat reply and an analysis of the same text must
    /// not collide). `parts` is serialized through `serde_json::Value`, whose maps are sorted,
    /// so field order in the source struct does not change the key.
    pub fn for_request(namespace: &str, parts: &impl Serialize) -> Self {
        let canonical = serde_json::to_value(parts)
            .map(|v| v.to_string())
            .unwrap_or_default();
        let mut hasher = Sha256::new();
        hasher.update(namespace.as_bytes());
        hasher.update([0u8]);
        hasher.update(canonical.as_bytes());
        Self(hex::encode(hasher.finalize()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A stored response: the serialized payload plus when it was made and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedResponse {
    pub payload: String,
    pub created_at: String,
    pub expires_at: u64,
}

/// Whether the client asked to skip the cache (`Cache-Control: no-cache` or `no-store`).
pub fn bypass_requested(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| {
            matches!(
                d.trim().to_ascii_lowercase().as_str(),
                "no-cache" | "no-store"
            )
        })
}

/// Storage for cached responses.
///
/// Contract: `get` returns an entry only if one was `put` under the key and its expiry is
/// still in the future; `put` overwrites. "Not found" and "expired" are both `Ok(None)`.
/// `bundled_put` is `put` as a write another store's transaction can carry (see
/// [`BundledWrite`]); a store that has no such form returns `None` and the caller calls `put`.
#[async_trait]
pub trait ResponseCache: Send + Sync {
    async fn get(&self, key: &CacheKey) -> Result<Option<CachedResponse>, ApiError>;
    async fn put(&self, key: &CacheKey, payload: String, ttl: Duration) -> Result<(), ApiError>;
    fn bundled_put(
        &self,
        _key: &CacheKey,
        _payload: String,
        _ttl: Duration,
    ) -> Option<BundledWrite> {
        None
    }
}

pub struct DynamoCache {
    client: Client,
    table: String,
}

impl DynamoCache {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }
}

#[async_trait]
impl ResponseCache for DynamoCache {
    async fn get(&self, key: &CacheKey) -> Result<Option<CachedResponse>, ApiError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key.0.clone()))
            .send()
            .await
            .map_err(unavailable)?;
        let Some(item) = out.item() else {
            return Ok(None);
        };
        let text = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
        let expires_at = item
            .get("expires_at")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if expires_at <= now_epoch() {
            return Ok(None);
        }
        Ok(text("payload").map(|payload| CachedResponse {
            payload,
            created_at: text("created_at").unwrap_or_default(),
            expires_at,
        }))
    }

    async fn put(&self, key: &CacheKey, payload: String, ttl: Duration) -> Result<(), ApiError> {
        self.client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(entry_item(key, payload, ttl)))
            .send()
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The same item as `put`, unconditional, for a chat turn's transaction to carry.
    fn bundled_put(&self, key: &CacheKey, payload: String, ttl: Duration) -> Option<BundledWrite> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(entry_item(key, payload, ttl)))
            .build()
            .ok()?;
        Some(BundledWrite::new(
            TransactWriteItem::builder().put(put).build(),
        ))
    }
}

fn entry_item(key: &CacheKey, payload: String, ttl: Duration) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("pk".to_owned(), AttributeValue::S(key.0.clone())),
        ("payload".to_owned(), AttributeValue::S(payload)),
        ("created_at".to_owned(), AttributeValue::S(now_rfc3339())),
        (
            "expires_at".to_owned(),
            AttributeValue::N((now_epoch() + ttl.as_secs().max(1)).to_string()),
        ),
    ])
}

#[derive(Default)]
pub struct InMemoryCache {
    entries: Mutex<HashMap<CacheKey, CachedResponse>>,
}

impl InMemoryCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores an entry with an explicit expiry (tests use it to plant expired entries).
    pub fn insert_raw(&self, key: &CacheKey, entry: CachedResponse) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(key.clone(), entry);
        }
    }
}

#[async_trait]
impl ResponseCache for InMemoryCache {
    async fn get(&self, key: &CacheKey) -> Result<Option<CachedResponse>, ApiError> {
        let entries = self
            .entries
            .lock()
            .map_err(|_| ApiError::internal("cache fake poisoned"))?;
        Ok(entries
            .get(key)
            .filter(|e| e.expires_at > now_epoch())
            .cloned())
    }

    async fn put(&self, key: &CacheKey, payload: String, ttl: Duration) -> Result<(), ApiError> {
        self.insert_raw(
            key,
            CachedResponse {
                payload,
                created_at: now_rfc3339(),
                expires_at: now_epoch() + ttl.as_secs().max(1),
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn key_ignores_field_order_but_not_values_or_namespace() {
        #[derive(Serialize)]
        struct A {
            model: &'static str,
            temperature: f32,
        }
        #[derive(Serialize)]
        struct B {
            temperature: f32,
            model: &'static str,
        }
        let a = CacheKey::for_request(
            "chat",
            &A {
                model: "m",
                temperature: 0.5,
            },
        );
        let b = CacheKey::for_request(
            "chat",
            &B {
                temperature: 0.5,
                model: "m",
            },
        );
        assert_eq!(a, b);
        assert_ne!(
            a,
            CacheKey::for_request(
                "chat",
                &A {
                    model: "m",
                    temperature: 0.6
                }
            )
        );
        assert_ne!(
            a,
            CacheKey::for_request(
                "analyze",
                &A {
                    model: "m",
                    temperature: 0.5
                }
            )
        );
        assert_eq!(a.as_str().len(), 64);
    }

    #[test]
    fn no_cache_and_no_store_bypass() {
        let mut headers = HeaderMap::new();
        assert!(!bypass_requested(&headers));
        headers.insert("cache-control", "max-age=0, No-Cache".parse().unwrap());
        assert!(bypass_requested(&headers));
        headers.insert("cache-control", "no-store".parse().unwrap());
        assert!(bypass_requested(&headers));
        headers.insert("cache-control", "max-age=60".parse().unwrap());
        assert!(!bypass_requested(&headers));
    }
}
