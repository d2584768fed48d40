//! `ConversationStore` contract, run against the in-memory fake and DynamoDB (emulator).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use shared::conversations::{
    ChatTurn, ConversationStore, DynamoConversations, InMemoryConversations,
};
use uuid::Uuid;

async fn dynamo_store() -> Arc<dyn ConversationStore> {
    let table = common::stack_var("CONVERSATIONS_TABLE");
    Arc::new(DynamoConversations::new(common::dynamo().await, table, 30))
}

fn turn(n: u64) -> ChatTurn {
    ChatTurn {
        user_message: format!("question {n}"),
        assistant_message: format!("answer {n}"),
        prompt_tokens: 10 + n,
        completion_tokens: 5 + n,
        model: "gpt-4o-mini".to_owned(),
        cost_usd: 0.000_125,
    }
}

async fn first_turn_creates_and_history_is_oldest_first(store: Arc<dyn ConversationStore>) {
    let owner = common::unique("alice");
    let id = Uuid::new_v4();
    assert!(store.recent(&owner, id, 20).await.unwrap().is_none());
    assert_eq!(
        store.append_turn(&owner, id, None, &turn(0)).await.unwrap(),
        0
    );
    let history = store.recent(&owner, id, 20).await.unwrap().unwrap();
    assert_eq!(history.message_count, 2);
    assert_eq!(history.messages.len(), 2);
    assert_eq!(history.messages[0].role, "user");
    assert_eq!(history.messages[0].content, "question 0");
    assert_eq!(history.messages[1].role, "assistant");
    for n in 1..5 {
        let seq = store
            .append_turn(
                &owner,
                id,
                Some(history_count(&store, &owner, id).await),
                &turn(n),
            )
            .await
            .unwrap();
        assert_eq!(seq, 2 * n);
    }
    let recent = store.recent(&owner, id, 3).await.unwrap().unwrap();
    assert_eq!(recent.message_count, 10);
    let seqs: Vec<u64> = recent.messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![7, 8, 9], "the newest 3, oldest first");
}

async fn history_count(store: &Arc<dyn ConversationStore>, owner: &str, id: Uuid) -> u64 {
    store
        .recent(owner, id, 1)
        .await
        .unwrap()
        .unwrap()
        .message_count
}

async fn stale_expected_count_retries_with_fresh_sequence_numbers(
    store: Arc<dyn ConversationStore>,
) {
    let owner = common::unique("bob");
    let id = Uuid::new_v4();
    store.append_turn(&owner, id, None, &turn(0)).await.unwrap();
    store
        .append_turn(&owner, id, Some(2), &turn(1))
        .await
        .unwrap();
    // Built on a stale view (count 2): must land at 4..5, not overwrite 2..3.
    let seq = store
        .append_turn(&owner, id, Some(2), &turn(2))
        .await
        .unwrap();
    assert_eq!(seq, 4);
    let (meta, messages) = store.get(&owner, id).await.unwrap().unwrap();
    assert_eq!(meta.message_count, 6);
    let contents: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(
        contents,
        [
            "question 0",
            "answer 0",
            "question 1",
            "answer 1",
            "question 2",
            "answer 2"
        ]
    );
}

async fn concurrent_turns_lose_no_message(store: Arc<dyn ConversationStore>) {
    let owner = common::unique("carol");
    let id = Uuid::new_v4();
    store.append_turn(&owner, id, None, &turn(0)).await.unwrap();
    let tasks: Vec<_> = (1..=20)
        .map(|n| {
            let (store, owner) = (store.clone(), owner.clone());
            tokio::spawn(async move { store.append_turn(&owner, id, Some(2), &turn(n)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let (meta, messages) = store.get(&owner, id).await.unwrap().unwrap();
    assert_eq!(messages.len(), 42);
    assert_eq!(meta.message_count, 42);
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (0..42).collect::<Vec<_>>(),
        "contiguous sequence numbers"
    );
    for pair in messages.chunks(2) {
        assert_eq!(pair[0].role, "user");
        assert_eq!(pair[1].role, "assistant");
        let n = pair[0].content.trim_start_matches("question ");
        assert_eq!(
            pair[1].content,
            format!("answer {n}"),
            "a turn's two messages stay adjacent"
        );
    }
    let expected_tokens: u64 = (0..=20).map(|n| 15 + 2 * n).sum();
    assert_eq!(meta.total_tokens, expected_tokens);
    assert!(
        (meta.total_cost - 21.0 * 0.000_125).abs() < 1e-9,
        "{}",
        meta.total_cost
    );
    let total: u64 = messages.iter().map(|m| m.tokens).sum();
    assert_eq!(
        total, meta.total_tokens,
        "totals equal the sums of the messages"
    );
}

async fn another_principal_sees_nothing(store: Arc<dyn ConversationStore>) {
    let owner = common::unique("dave");
    let stranger = common::unique("eve");
    let id = Uuid::new_v4();
    store.append_turn(&owner, id, None, &turn(0)).await.unwrap();

    assert!(store.recent(&stranger, id, 20).await.unwrap().is_none());
    assert!(store.get(&stranger, id).await.unwrap().is_none());
    assert!(
        store
            .list(&stranger, 10, None)
            .await
            .unwrap()
            .conversations
            .is_empty()
    );
    let err = store
        .append_turn(&stranger, id, Some(2), &turn(1))
        .await
        .unwrap_err();
    assert_eq!(err.status().as_u16(), 404);
    let err = store
        .append_turn(&stranger, id, None, &turn(1))
        .await
        .unwrap_err();
    assert_eq!(
        err.status().as_u16(),
        404,
        "cannot hijack an existing id as new"
    );
    assert!(!store.delete(&stranger, id).await.unwrap());
    let (meta, messages) = store.get(&owner, id).await.unwrap().unwrap();
    assert_eq!(
        (meta.message_count, messages.len()),
        (2, 2),
        "owner's data untouched"
    );
}

async fn lists_own_conversations_newest_first_with_cursor(store: Arc<dyn ConversationStore>) {
    let owner = common::unique("frank");
    let mut ids = Vec::new();
    for n in 0..5 {
        let id = Uuid::new_v4();
        store.append_turn(&owner, id, None, &turn(n)).await.unwrap();
        ids.push(id);
        tokio::time::sleep(std::time::Duration::from_millis(3)).await;
    }
    let first = store.list(&owner, 2, None).await.unwrap();
    assert_eq!(first.conversations.len(), 2);
    let mut seen: Vec<Uuid> = first.conversations.iter().map(|c| c.id).collect();
    let mut cursor = first.next_cursor;
    while let Some(c) = cursor {
        let page = store.list(&owner, 2, Some(&c)).await.unwrap();
        seen.extend(page.conversations.iter().map(|c| c.id));
        cursor = page.next_cursor;
    }
    let newest_first: Vec<Uuid> = ids.iter().rev().copied().collect();
    assert_eq!(seen, newest_first);
    assert_eq!(first.conversations[0].title, "question 4");

    // A cursor is bound to its owner.
    let again = store.list(&owner, 2, None).await.unwrap();
    let err = store
        .list("mallory", 2, again.next_cursor.as_deref())
        .await
        .unwrap_err();
    assert_eq!(err.status().as_u16(), 400);
    assert_eq!(
        store
            .list(&owner, 2, Some("garbage!"))
            .await
            .unwrap_err()
            .status()
            .as_u16(),
        400
    );
}

async fn delete_removes_everything_then_404(store: Arc<dyn ConversationStore>) {
    let owner = common::unique("grace");
    let id = Uuid::new_v4();
    store.append_turn(&owner, id, None, &turn(0)).await.unwrap();
    for n in 1..15 {
        let count = history_count(&store, &owner, id).await;
        store
            .append_turn(&owner, id, Some(count), &turn(n))
            .await
            .unwrap();
    }
    assert!(store.delete(&owner, id).await.unwrap());
    assert!(store.get(&owner, id).await.unwrap().is_none());
    assert!(store.recent(&owner, id, 20).await.unwrap().is_none());
    assert!(
        store
            .list(&owner, 10, None)
            .await
            .unwrap()
            .conversations
            .is_empty()
    );
    assert!(!store.delete(&owner, id).await.unwrap());
}

macro_rules! contract {
    ($($name:ident),*) => {
        mod in_memory {
            use super::*;
            $( #[tokio::test] async fn $name() { super::$name(Arc::new(InMemoryConversations::new())).await } )*
        }
        mod dynamodb {
            use super::*;
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 4)] async fn $name() { super::$name(dynamo_store().await).await } )*
        }
    };
}

contract!(
    first_turn_creates_and_history_is_oldest_first,
    stale_expected_count_retries_with_fresh_sequence_numbers,
    concurrent_turns_lose_no_message,
    another_principal_sees_nothing,
    lists_own_conversations_newest_first_with_cursor,
    delete_removes_everything_then_404
);

/// A turn's transaction carrying a write of another table (the response cache's fill): committed
/// together when DynamoDB accepts it, and never the reason a turn fails when it does not.
mod carrying {
    use std::time::Duration;

    use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem};
    use shared::cache::{CacheKey, DynamoCache, ResponseCache};
    use shared::dynamo::BundledWrite;

    use super::*;

    async fn stores() -> (DynamoConversations, DynamoCache, String) {
        let client = common::dynamo().await;
        let cache_table = common::stack_var("CACHE_TABLE");
        (
            DynamoConversations::new(client.clone(), common::stack_var("CONVERSATIONS_TABLE"), 30),
            DynamoCache::new(client, cache_table.clone()),
            cache_table,
        )
    }

    fn key() -> CacheKey {
        CacheKey::for_request("test", &common::unique("carried"))
    }

    async fn stored_messages(store: &DynamoConversations, owner: &str, id: Uuid) -> u64 {
        store
            .recent(owner, id, 20)
            .await
            .unwrap()
            .unwrap()
            .message_count
    }

    /// A put of `pk` into `table` that fails its condition when the item exists.
    fn put_if_absent(table: &str, pk: &str) -> BundledWrite {
        let put = Put::builder()
            .table_name(table)
            .item("pk", AttributeValue::S(pk.to_owned()))
            .item(
                "payload",
                AttributeValue::S("from the bundled write".to_owned()),
            )
            .item("expires_at", AttributeValue::N("9999999999".to_owned()))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .unwrap();
        BundledWrite::new(TransactWriteItem::builder().put(put).build())
    }

    #[tokio::test]
    async fn the_cache_fill_commits_with_the_turn() {
        let (store, cache, _) = stores().await;
        let (owner, id, k) = (common::unique("carol"), Uuid::new_v4(), key());
        let bundled = cache.bundled_put(&k, "cached answer".to_owned(), Duration::from_secs(60));
        let (seq, carried) = store
            .append_turn_carrying(&owner, id, None, &turn(0), bundled)
            .await
            .unwrap();
        assert_eq!((seq, carried), (0, true));
        assert_eq!(
            cache.get(&k).await.unwrap().unwrap().payload,
            "cached answer"
        );
        assert_eq!(stored_messages(&store, &owner, id).await, 2);
    }

    #[tokio::test]
    async fn a_conflict_on_the_turn_still_carries_the_fill_on_the_retry() {
        let (store, cache, _) = stores().await;
        let (owner, id, k) = (common::unique("carol"), Uuid::new_v4(), key());
        store.append_turn(&owner, id, None, &turn(0)).await.unwrap();
        store
            .append_turn(&owner, id, Some(2), &turn(1))
            .await
            .unwrap();
        // Expected count 2 is stale (4 are stored): the first attempt fails on the turn's own
        // items, which must not be taken for a refusal of the bundled write.
        let bundled = cache.bundled_put(&k, "after a conflict".to_owned(), Duration::from_secs(60));
        let (seq, carried) = store
            .append_turn_carrying(&owner, id, Some(2), &turn(2), bundled)
            .await
            .unwrap();
        assert_eq!((seq, carried), (4, true));
        assert_eq!(
            cache.get(&k).await.unwrap().unwrap().payload,
            "after a conflict"
        );
        assert_eq!(stored_messages(&store, &owner, id).await, 6);
    }

    #[tokio::test]
    async fn a_bundled_write_that_fails_its_condition_is_dropped_and_the_turn_stored() {
        let (store, cache, table) = stores().await;
        let (owner, id, k) = (common::unique("carol"), Uuid::new_v4(), key());
        cache
            .put(&k, "already there".to_owned(), Duration::from_secs(60))
            .await
            .unwrap();
        let (seq, carried) = store
            .append_turn_carrying(
                &owner,
                id,
                None,
                &turn(0),
                Some(put_if_absent(&table, k.as_str())),
            )
            .await
            .unwrap();
        assert_eq!((seq, carried), (0, false));
        assert_eq!(stored_messages(&store, &owner, id).await, 2);
        assert_eq!(
            cache.get(&k).await.unwrap().unwrap().payload,
            "already there"
        );
    }

    #[tokio::test]
    async fn a_bundled_write_to_a_missing_table_is_dropped_and_the_turn_stored() {
        let (store, _, _) = stores().await;
        let (owner, id) = (common::unique("carol"), Uuid::new_v4());
        let missing = common::unique("no-such-table");
        let (seq, carried) = store
            .append_turn_carrying(
                &owner,
                id,
                None,
                &turn(0),
                Some(put_if_absent(&missing, "x")),
            )
            .await
            .unwrap();
        assert_eq!((seq, carried), (0, false));
        assert_eq!(stored_messages(&store, &owner, id).await, 2);
    }

    #[tokio::test]
    async fn the_in_memory_store_carries_nothing_and_stores_the_turn() {
        let store = InMemoryConversations::new();
        let (owner, id) = (common::unique("carol"), Uuid::new_v4());
        let (seq, carried) = store
            .append_turn_carrying(&owner, id, None, &turn(0), Some(put_if_absent("t", "x")))
            .await
            .unwrap();
        assert_eq!((seq, carried), (0, false));
        assert_eq!(
            store
                .recent(&owner, id, 20)
                .await
                .unwrap()
                .unwrap()
                .message_count,
            2
        );
    }
}
