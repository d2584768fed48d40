//! `ResponseCache` contract, run against the in-memory fake and DynamoDB (emulator).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use shared::cache::{CacheKey, DynamoCache, InMemoryCache, ResponseCache};

async fn dynamo_store() -> Arc<dyn ResponseCache> {
    let table = common::stack_var("CACHE_TABLE");
    Arc::new(DynamoCache::new(common::dynamo().await, table))
}

fn key() -> CacheKey {
    CacheKey::for_request("test", &common::unique("req"))
}

async fn hit_returns_the_stored_payload(cache: Arc<dyn ResponseCache>) {
    let k = key();
    assert!(cache.get(&k).await.unwrap().is_none());
    cache
        .put(
            &k,
            r#"{"message":"hi"}"#.to_owned(),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let hit = cache.get(&k).await.unwrap().unwrap();
    assert_eq!(hit.payload, r#"{"message":"hi"}"#);
    assert!(hit.expires_at > shared::dynamo::now_epoch());
    cache
        .put(&k, "second".to_owned(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cache.get(&k).await.unwrap().unwrap().payload, "second");
}

async fn different_keys_do_not_collide(cache: Arc<dyn ResponseCache>) {
    let (a, b) = (key(), key());
    cache
        .put(&a, "a".to_owned(), Duration::from_secs(60))
        .await
        .unwrap();
    assert!(cache.get(&b).await.unwrap().is_none());
}

mod in_memory {
    use super::*;
    #[tokio::test]
    async fn hit_returns_the_stored_payload() {
        super::hit_returns_the_stored_payload(Arc::new(InMemoryCache::new())).await
    }
    #[tokio::test]
    async fn different_keys_do_not_collide() {
        super::different_keys_do_not_collide(Arc::new(InMemoryCache::new())).await
    }
    #[tokio::test]
    async fn expired_entry_is_a_miss() {
        let cache = InMemoryCache::new();
        let k = key();
        cache.insert_raw(
            &k,
            shared::cache::CachedResponse {
                payload: "old".into(),
                created_at: String::new(),
                expires_at: shared::dynamo::now_epoch() - 1,
            },
        );
        assert!(cache.get(&k).await.unwrap().is_none());
    }
}

mod dynamodb {
    use super::*;
    #[tokio::test]
    async fn hit_returns_the_stored_payload() {
        super::hit_returns_the_stored_payload(dynamo_store().await).await
    }
    #[tokio::test]
    async fn different_keys_do_not_collide() {
        super::different_keys_do_not_collide(dynamo_store().await).await
    }

    /// The emulator (like DynamoDB within its TTL lag) still holds the item: it must read as a miss.
    #[tokio::test]
    async fn expired_entry_is_a_miss_although_the_item_is_still_stored() {
        let table = common::stack_var("CACHE_TABLE");
        let client = common::dynamo().await;
        let k = key();
        client
            .put_item()
            .table_name(&table)
            .item("pk", AttributeValue::S(k.as_str().to_owned()))
            .item("payload", AttributeValue::S("stale".into()))
            .item(
                "created_at",
                AttributeValue::S("2020-01-01T00:00:00.000Z".into()),
            )
            .item(
                "expires_at",
                AttributeValue::N((shared::dynamo::now_epoch() - 5).to_string()),
            )
            .send()
            .await
            .unwrap();
        let raw = client
            .get_item()
            .table_name(&table)
            .key("pk", AttributeValue::S(k.as_str().to_owned()))
            .send()
            .await
            .unwrap();
        assert!(
            raw.item().is_some(),
            "the emulator still holds the expired item"
        );
        let cache = DynamoCache::new(client, table);
        assert!(cache.get(&k).await.unwrap().is_none());
    }
}
