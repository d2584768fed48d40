//! `admin keys ...`: API keys through the same `ApiKeyStore` the functions use.

use std::io::{self, Write};

use shared::auth::{
    ANONYMOUS_PREFIX, ApiKeyRecord, ApiKeyStore, DynamoApiKeys, Tier, generate_api_key,
    hash_api_key,
};

use crate::AdminError;

/// Enough of the hash to find the key in a listing, not enough to matter if logged.
const HASH_PREFIX_CHARS: usize = 12;
const MAX_USER_CHARS: usize = 256;

/// A user id the functions can work with. `anon:` is reserved for anonymous callers, whose
/// conversations and quotas a key must not share.
pub fn validate_user(user: &str) -> Result<String, AdminError> {
    let user = user.trim();
    let reason = if user.is_empty() {
        "it is empty"
    } else if user.chars().count() > MAX_USER_CHARS {
        "it is longer than 256 characters"
    } else if user.chars().any(char::is_control) {
        "it contains control characters"
    } else if user.starts_with(ANONYMOUS_PREFIX) {
        "the 'anon:' prefix is reserved for anonymous callers"
    } else {
        return Ok(user.to_owned());
    };
    Err(AdminError::Invalid {
        what: "--user",
        reason: reason.to_owned(),
    })
}

async fn store(table: &str) -> DynamoApiKeys {
    DynamoApiKeys::new(shared::dynamo::client().await, table)
}

fn prefix(hash: &str) -> &str {
    hash.get(..HASH_PREFIX_CHARS).unwrap_or(hash)
}

pub async fn create(
    out: &mut impl Write,
    table: &str,
    user: String,
    tier: Tier,
) -> Result<(), AdminError> {
    let key = generate_api_key();
    let record = ApiKeyRecord::new(hash_api_key(&key), user, tier);
    store(table).await.put(&record).await?;
    // Only the key on stdout, so `KEY=$(admin keys create ...)` captures exactly it.
    writeln!(out, "{key}")?;
    out.flush()?;
    let _ = writeln!(
        io::stderr(),
        "created API key for user '{}' (tier {}) in table {table}; hash prefix {}",
        record.user_id,
        record.tier.as_str(),
        prefix(&record.key_hash),
    );
    Ok(())
}

async fn find(store: &DynamoApiKeys, table: &str, hash: &str) -> Result<ApiKeyRecord, AdminError> {
    store
        .find(hash)
        .await?
        .ok_or_else(|| AdminError::KeyNotFound {
            hash: format!("{}…", prefix(hash)),
            table: table.to_owned(),
        })
}

pub async fn show(out: &mut impl Write, table: &str, hash: &str) -> Result<(), AdminError> {
    let record = find(&store(table).await, table, hash).await?;
    writeln!(out, "user: {}", record.user_id)?;
    writeln!(out, "tier: {}", record.tier.as_str())?;
    writeln!(out, "revoked: {}", record.revoked)?;
    writeln!(out, "created_at: {}", record.created_at)?;
    writeln!(out, "hash: {}", record.key_hash)?;
    Ok(())
}

pub async fn revoke(out: &mut impl Write, table: &str, hash: &str) -> Result<(), AdminError> {
    let store = store(table).await;
    // Looked up first only to say whose key it was; the revocation itself is one conditional
    // update that never creates a record.
    let record = find(&store, table, hash).await?;
    if !store.revoke(hash).await? {
        return Err(AdminError::KeyNotFound {
            hash: format!("{}…", prefix(hash)),
            table: table.to_owned(),
        });
    }
    let note = if record.revoked {
        " (it was already revoked)"
    } else {
        ""
    };
    writeln!(
        out,
        "revoked API key {}… of user '{}'{note}",
        prefix(hash),
        record.user_id
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn user_ids_are_trimmed_and_checked() {
        assert_eq!(validate_user("  alice ").unwrap(), "alice");
        assert_eq!(
            validate_user("alice@example.com").unwrap(),
            "alice@example.com"
        );
        for bad in ["", "   ", "anon:1.2.3.4", "a\nb", &"x".repeat(257)] {
            assert!(
                matches!(
                    validate_user(bad),
                    Err(AdminError::Invalid { what: "--user", .. })
                ),
                "{bad:?} accepted"
            );
        }
    }
}
