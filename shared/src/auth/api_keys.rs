//! API keys: generated once, shown once, stored only as their SHA-256 digest.
//!
//! A leaked table therefore leaks no usable credential, and a request's key is never compared
//! against stored keys: it is hashed and the digest is used as the item's primary key.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use sha2::{Digest, Sha256};

use super::Tier;
use crate::dynamo::{now_rfc3339, unavailable};
use crate::error::ApiError;

/// Every generated key starts with this, so secret scanners and humans can recognise one.
pub const API_KEY_PREFIX: &str = "gwk_";

/// Error code of the [`ApiError`] returned by [`ApiKeyStore::put`] when the hash is taken.
pub const DUPLICATE_KEY_CODE: &str = "api_key_exists";

/// What the store knows about one key. The key itself is never part of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRecord {
    /// Lowercase hex SHA-256 of the key (see [`hash_api_key`]).
    pub key_hash: String,
    pub user_id: String,
    pub tier: Tier,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub revoked: bool,
}

impl ApiKeyRecord {
    /// A fresh, unrevoked record created now.
    pub fn new(key_hash: impl Into<String>, user_id: impl Into<String>, tier: Tier) -> Self {
        Self {
            key_hash: key_hash.into(),
            user_id: user_id.into(),
            tier,
            created_at: now_rfc3339(),
            revoked: false,
        }
    }
}

/// Storage of API key records.
///
/// Contract:
/// - Records are stored and looked up only by the lowercase hex SHA-256 digest of the key
///   ([`hash_api_key`]); the key itself is never given to, or kept by, a store.
/// - `find` returns `Ok(None)` when no record has that hash ("not found" is not an error). A
///   revoked key is still returned, with `revoked: true`: deciding what a revoked key means is
///   the caller's job. A read reflects every `put` and `revoke` that completed before it.
/// - `put` is conditional: it fails, leaving the stored record untouched, when a record with the
///   same hash exists (the error's [`ApiError::code`] is [`DUPLICATE_KEY_CODE`]).
/// - `revoke` marks an existing record revoked and keeps it; it returns `Ok(true)` when a record
///   with that hash exists (revoking twice is harmless) and `Ok(false)` when none does, in which
///   case nothing is created.
/// - Any other failure of the backing store is an `Err` (for DynamoDB, `ApiError::Unavailable`),
///   never `Ok(None)`: an outage must not look like a bad key.
#[async_trait]
pub trait ApiKeyStore: Send + Sync {
    async fn find(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>, ApiError>;
    async fn put(&self, record: &ApiKeyRecord) -> Result<(), ApiError>;
    async fn revoke(&self, key_hash: &str) -> Result<bool, ApiError>;
}

/// A new key: [`API_KEY_PREFIX`] followed by 32 random bytes in hex (256 bits of entropy).
pub fn generate_api_key() -> String {
    // `rand::random` draws from the thread-local CSPRNG, seeded from the operating system.
    let bytes: [u8; 32] = rand::random();
    format!("{API_KEY_PREFIX}{}", hex::encode(bytes))
}

/// Lowercase hex SHA-256 of `key`: the only form in which a key is stored or looked up.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Whether `value` has the shape [`hash_api_key`] produces (64 lowercase hex digits).
pub fn is_key_hash(value: &str) -> bool {
    value.len() == 64
        && value
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn duplicate_key() -> ApiError {
    ApiError::BadRequest {
        code: DUPLICATE_KEY_CODE,
        message: "an API key with this hash already exists".to_owned(),
        param: None,
    }
}

/// API keys in DynamoDB: pk = key hash; attributes `user` (S), `tier` (S), `created_at` (S),
/// `revoked` (BOOL).
#[derive(Debug, Clone)]
pub struct DynamoApiKeys {
    client: Client,
    table: String,
}

impl DynamoApiKeys {
    /// `table` comes from `Config.tables.api_keys` (`API_KEYS_TABLE`).
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
    }
}

#[async_trait]
impl ApiKeyStore for DynamoApiKeys {
    async fn find(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>, ApiError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key_hash.to_owned()))
            // A revocation must take effect on the next request, not after replication catches up.
            .consistent_read(true)
            .send()
            .await
            .map_err(unavailable)?;
        output.item().map(record_from_item).transpose()
    }

    async fn put(&self, record: &ApiKeyRecord) -> Result<(), ApiError> {
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(record.key_hash.clone()))
            .item("user", AttributeValue::S(record.user_id.clone()))
            .item("tier", AttributeValue::S(record.tier.as_str().to_owned()))
            .item("created_at", AttributeValue::S(record.created_at.clone()))
            .item("revoked", AttributeValue::Bool(record.revoked))
            // Never overwrite: replacing a record would silently un-revoke or re-assign a key.
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Err(duplicate_key())
            }
            Err(err) => Err(unavailable(err)),
        }
    }

    async fn revoke(&self, key_hash: &str) -> Result<bool, ApiError> {
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(key_hash.to_owned()))
            .update_expression("SET #revoked = :revoked")
            // Without the condition an update would create a bare item for an unknown hash.
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#revoked", "revoked")
            .expression_attribute_values(":revoked", AttributeValue::Bool(true))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(err) => Err(unavailable(err)),
        }
    }
}

/// A record that does not parse is an operator error (hand-edited item): it fails closed with a
/// 500 that names the attribute in the log, rather than authenticating with a guessed tier.
fn record_from_item(item: &HashMap<String, AttributeValue>) -> Result<ApiKeyRecord, ApiError> {
    let string = |name: &str| -> Result<String, ApiError> {
        match item.get(name) {
            Some(AttributeValue::S(value)) => Ok(value.clone()),
            _ => Err(ApiError::internal(format!(
                "API key item lacks string attribute '{name}'"
            ))),
        }
    };
    let tier_name = string("tier")?;
    let tier = Tier::parse(&tier_name).ok_or_else(|| {
        ApiError::internal(format!("API key item has unknown tier '{tier_name}'"))
    })?;
    let revoked = match item.get("revoked") {
        Some(AttributeValue::Bool(revoked)) => *revoked,
        _ => {
            return Err(ApiError::internal(
                "API key item lacks boolean attribute 'revoked'",
            ));
        }
    };
    Ok(ApiKeyRecord {
        key_hash: string("pk")?,
        user_id: string("user")?,
        tier,
        created_at: string("created_at")?,
        revoked,
    })
}

/// In-process store for tests and local wiring; same contract as [`DynamoApiKeys`].
#[derive(Debug, Default)]
pub struct InMemoryApiKeys {
    records: Mutex<HashMap<String, ApiKeyRecord>>,
}

impl InMemoryApiKeys {
    pub fn new() -> Self {
        Self::default()
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, ApiKeyRecord>> {
        // A panic elsewhere while holding the lock cannot leave a map half-updated (every
        // critical section is a single insert or lookup), so the data stays usable.
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl ApiKeyStore for InMemoryApiKeys {
    async fn find(&self, key_hash: &str) -> Result<Option<ApiKeyRecord>, ApiError> {
        Ok(self.records().get(key_hash).cloned())
    }

    async fn put(&self, record: &ApiKeyRecord) -> Result<(), ApiError> {
        let mut records = self.records();
        if records.contains_key(&record.key_hash) {
            return Err(duplicate_key());
        }
        records.insert(record.key_hash.clone(), record.clone());
        Ok(())
    }

    async fn revoke(&self, key_hash: &str) -> Result<bool, ApiError> {
        Ok(self
            .records()
            .get_mut(key_hash)
            .map(|record| record.revoked = true)
            .is_some())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn generated_keys_are_prefixed_random_and_hex() {
        let a = generate_api_key();
        let b = generate_api_key();
        assert_ne!(a, b);
        let body = a.strip_prefix(API_KEY_PREFIX).unwrap();
        assert_eq!(body.len(), 64);
        assert!(body.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn hash_is_lowercase_hex_sha256() {
        // SHA-256("abc"), from FIPS 180-2 appendix B.1.
        assert_eq!(
            hash_api_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_key_hash(&hash_api_key(&generate_api_key())));
        assert!(!is_key_hash(&hash_api_key("abc").to_uppercase()));
        assert!(!is_key_hash("abc"));
    }

    #[test]
    fn item_without_revoked_flag_or_with_unknown_tier_fails_closed() {
        let mut item = HashMap::from([
            ("pk".to_owned(), AttributeValue::S("h".into())),
            ("user".to_owned(), AttributeValue::S("alice".into())),
            ("tier".to_owned(), AttributeValue::S("pro".into())),
            ("created_at".to_owned(), AttributeValue::S("t".into())),
        ]);
        assert!(matches!(
            record_from_item(&item),
            Err(ApiError::Internal { .. })
        ));
        item.insert("revoked".to_owned(), AttributeValue::Bool(false));
        assert_eq!(record_from_item(&item).unwrap().tier, Tier::Pro);
        item.insert("tier".to_owned(), AttributeValue::S("gold".into()));
        assert!(matches!(
            record_from_item(&item),
            Err(ApiError::Internal { .. })
        ));
    }
}
