//! The `ApiKeyStore` contract, one suite run against the in-memory fake and against
//! `DynamoApiKeys` on the local DynamoDB emulator with the real SDK.
//!
//! The emulator half needs `AWS_ENDPOINT_URL_DYNAMODB` and `API_KEYS_TABLE`, which the local
//! stack exports (`python infra/devstack.py run -- cargo nextest run`). Without them it fails,
//! never skips. Every test uses fresh random keys, so runs can share one table.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use shared::auth::{
    ApiKeyRecord, ApiKeyStore, DUPLICATE_KEY_CODE, DynamoApiKeys, InMemoryApiKeys, Tier,
    generate_api_key, hash_api_key,
};
use shared::error::ApiError;

fn fresh_hash() -> String {
    hash_api_key(&generate_api_key())
}

fn unique_user(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// The behaviour every implementation must have, written once.
mod contract {
    use super::*;

    pub async fn find_unknown_hash_returns_none<S: ApiKeyStore + ?Sized>(store: &S) {
        assert_eq!(store.find(&fresh_hash()).await.unwrap(), None);
    }

    pub async fn put_then_find_returns_the_same_record<S: ApiKeyStore + ?Sized>(store: &S) {
        let record = ApiKeyRecord::new(fresh_hash(), unique_user("alice"), Tier::Pro);
        store.put(&record).await.unwrap();
        assert_eq!(store.find(&record.key_hash).await.unwrap(), Some(record));
    }

    pub async fn put_refuses_an_existing_hash_and_keeps_the_original<S: ApiKeyStore + ?Sized>(
        store: &S,
    ) {
        let original = ApiKeyRecord::new(fresh_hash(), unique_user("alice"), Tier::Free);
        store.put(&original).await.unwrap();
        let mut intruder = ApiKeyRecord::new(
            original.key_hash.clone(),
            unique_user("mallory"),
            Tier::Enterprise,
        );
        let err = store.put(&intruder).await.unwrap_err();
        assert_eq!(err.code(), DUPLICATE_KEY_CODE, "{err:?}");
        // Not even a revoked record may be replaced (that would un-revoke it).
        store.revoke(&original.key_hash).await.unwrap();
        intruder.user_id = original.user_id.clone();
        let err = store.put(&intruder).await.unwrap_err();
        assert_eq!(err.code(), DUPLICATE_KEY_CODE, "{err:?}");
        let stored = store.find(&original.key_hash).await.unwrap().unwrap();
        assert_eq!(stored.tier, Tier::Free);
        assert!(stored.revoked);
    }

    pub async fn concurrent_puts_of_one_hash_admit_exactly_one<S: ApiKeyStore + ?Sized>(store: &S) {
        let hash = fresh_hash();
        let records: Vec<ApiKeyRecord> = (0..6)
            .map(|i| ApiKeyRecord::new(hash.clone(), unique_user(&format!("racer{i}")), Tier::Pro))
            .collect();
        let results = futures::future::join_all(records.iter().map(|r| store.put(r))).await;
        let winners: Vec<&ApiKeyRecord> = records
            .iter()
            .zip(&results)
            .filter(|(_, result)| result.is_ok())
            .map(|(record, _)| record)
            .collect();
        assert_eq!(winners.len(), 1, "{results:?}");
        for result in &results {
            if let Err(err) = result {
                assert_eq!(err.code(), DUPLICATE_KEY_CODE, "{err:?}");
            }
        }
        assert_eq!(store.find(&hash).await.unwrap().as_ref(), Some(winners[0]));
    }

    pub async fn revoke_keeps_the_record_and_marks_it_revoked<S: ApiKeyStore + ?Sized>(store: &S) {
        let record = ApiKeyRecord::new(fresh_hash(), unique_user("bob"), Tier::Enterprise);
        store.put(&record).await.unwrap();
        assert!(store.revoke(&record.key_hash).await.unwrap());
        let stored = store.find(&record.key_hash).await.unwrap().unwrap();
        assert_eq!(
            stored,
            ApiKeyRecord {
                revoked: true,
                ..record
            }
        );
    }

    pub async fn revoking_twice_still_reports_the_key<S: ApiKeyStore + ?Sized>(store: &S) {
        let record = ApiKeyRecord::new(fresh_hash(), unique_user("bob"), Tier::Free);
        store.put(&record).await.unwrap();
        assert!(store.revoke(&record.key_hash).await.unwrap());
        assert!(store.revoke(&record.key_hash).await.unwrap());
        assert!(store.find(&record.key_hash).await.unwrap().unwrap().revoked);
    }

    pub async fn revoke_unknown_hash_returns_false_and_creates_nothing<S: ApiKeyStore + ?Sized>(
        store: &S,
    ) {
        let hash = fresh_hash();
        assert!(!store.revoke(&hash).await.unwrap());
        assert_eq!(store.find(&hash).await.unwrap(), None);
        // ... and a later put of that hash still succeeds.
        let record = ApiKeyRecord::new(hash, unique_user("late"), Tier::Free);
        store.put(&record).await.unwrap();
        assert!(!store.find(&record.key_hash).await.unwrap().unwrap().revoked);
    }

    pub async fn revoking_one_key_leaves_others_alone<S: ApiKeyStore + ?Sized>(store: &S) {
        let user = unique_user("carol");
        let first = ApiKeyRecord::new(fresh_hash(), user.clone(), Tier::Pro);
        let second = ApiKeyRecord::new(fresh_hash(), user, Tier::Pro);
        store.put(&first).await.unwrap();
        store.put(&second).await.unwrap();
        store.revoke(&first.key_hash).await.unwrap();
        assert!(store.find(&first.key_hash).await.unwrap().unwrap().revoked);
        assert_eq!(store.find(&second.key_hash).await.unwrap(), Some(second));
    }
}

macro_rules! contract_suite {
    ($name:ident, $store:expr) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn find_unknown_hash_returns_none() {
                contract::find_unknown_hash_returns_none(&$store).await;
            }

            #[tokio::test]
            async fn put_then_find_returns_the_same_record() {
                contract::put_then_find_returns_the_same_record(&$store).await;
            }

            #[tokio::test]
            async fn put_refuses_an_existing_hash_and_keeps_the_original() {
                contract::put_refuses_an_existing_hash_and_keeps_the_original(&$store).await;
            }

            #[tokio::test]
            async fn concurrent_puts_of_one_hash_admit_exactly_one() {
                contract::concurrent_puts_of_one_hash_admit_exactly_one(&$store).await;
            }

            #[tokio::test]
            async fn revoke_keeps_the_record_and_marks_it_revoked() {
                contract::revoke_keeps_the_record_and_marks_it_revoked(&$store).await;
            }

            #[tokio::test]
            async fn revoking_twice_still_reports_the_key() {
                contract::revoking_twice_still_reports_the_key(&$store).await;
            }

            #[tokio::test]
            async fn revoke_unknown_hash_returns_false_and_creates_nothing() {
                contract::revoke_unknown_hash_returns_false_and_creates_nothing(&$store).await;
            }

            #[tokio::test]
            async fn revoking_one_key_leaves_others_alone() {
                contract::revoking_one_key_leaves_others_alone(&$store).await;
            }
        }
    };
}

contract_suite!(in_memory, InMemoryApiKeys::new());
contract_suite!(dynamodb, emulator::store().await);

/// The local stack's DynamoDB emulator. Missing variables fail the test with instructions.
mod emulator {
    use super::*;

    pub fn var(name: &str) -> String {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| {
                panic!(
                    "{name} is not set: the DynamoDB half of the ApiKeyStore contract needs the \
                 local emulator; run under infra/devstack.py run (make test), e.g. \
                 `python infra/devstack.py run -- cargo nextest run`"
                )
            })
    }

    pub async fn client() -> aws_sdk_dynamodb::Client {
        // Also keeps these tests from ever reaching a real AWS account by accident.
        var("AWS_ENDPOINT_URL_DYNAMODB");
        shared::dynamo::client().await
    }

    pub fn table() -> String {
        var("API_KEYS_TABLE")
    }

    pub async fn store() -> DynamoApiKeys {
        DynamoApiKeys::new(client().await, table())
    }
}

/// Other code (infra/devstack.py seeds a dev key with boto3) writes this table directly, so the
/// attribute names and types are part of the contract too.
#[tokio::test]
async fn dynamodb_item_layout_is_the_documented_one() {
    let client = emulator::client().await;
    let store = DynamoApiKeys::new(client.clone(), emulator::table());

    let record = ApiKeyRecord::new(fresh_hash(), unique_user("layout"), Tier::Pro);
    store.put(&record).await.unwrap();
    let item = client
        .get_item()
        .table_name(emulator::table())
        .key("pk", AttributeValue::S(record.key_hash.clone()))
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    let expected = HashMap::from([
        ("pk".to_owned(), AttributeValue::S(record.key_hash.clone())),
        ("user".to_owned(), AttributeValue::S(record.user_id.clone())),
        ("tier".to_owned(), AttributeValue::S("pro".to_owned())),
        (
            "created_at".to_owned(),
            AttributeValue::S(record.created_at.clone()),
        ),
        ("revoked".to_owned(), AttributeValue::Bool(false)),
    ]);
    assert_eq!(item, expected);

    // An item written the way devstack.py writes one is read back as a record.
    let key = format!("gwk_dev_{}", uuid::Uuid::new_v4().simple());
    let user = unique_user("dev");
    client
        .put_item()
        .table_name(emulator::table())
        .item("pk", AttributeValue::S(hash_api_key(&key)))
        .item("user", AttributeValue::S(user.clone()))
        .item("tier", AttributeValue::S("enterprise".to_owned()))
        .item(
            "created_at",
            AttributeValue::S("2026-01-01T00:00:00Z".to_owned()),
        )
        .item("revoked", AttributeValue::Bool(false))
        .send()
        .await
        .unwrap();
    let found = store.find(&hash_api_key(&key)).await.unwrap().unwrap();
    assert_eq!((found.user_id, found.tier), (user, Tier::Enterprise));
}

#[tokio::test]
async fn dynamodb_failure_is_unavailable_not_not_found() {
    let client = emulator::client().await;
    let missing = DynamoApiKeys::new(client, unique_user("no-such-table"));
    let err = missing.find(&fresh_hash()).await.unwrap_err();
    assert!(matches!(err, ApiError::Unavailable { .. }), "{err:?}");
    let err = missing.revoke(&fresh_hash()).await.unwrap_err();
    assert!(matches!(err, ApiError::Unavailable { .. }), "{err:?}");
    let record = ApiKeyRecord::new(fresh_hash(), "x", Tier::Free);
    let err = missing.put(&record).await.unwrap_err();
    assert!(matches!(err, ApiError::Unavailable { .. }), "{err:?}");
}
