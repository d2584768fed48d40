//! Tenant isolation beyond what tests/conversations.rs covers (issue 11): a second principal can
//! neither continue a conversation of the first through the stream function, nor page through
//! the first's listing with its cursor, nor read its batch job; and the ids a principal gets are
//! random UUIDs (v4), so they cannot be guessed from one another.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;

use integration_tests::{Caller, Stack, unique};
use serde_json::json;
use shared::auth::Tier;

fn assert_v4(id: &str) {
    let parsed = uuid::Uuid::parse_str(id).unwrap_or_else(|_| panic!("{id} is not a UUID"));
    assert_eq!(
        parsed.get_version(),
        Some(uuid::Version::Random),
        "{id} is not a random (v4) UUID"
    );
    assert_eq!(parsed.get_variant(), uuid::Variant::RFC4122, "{id}");
}

#[tokio::test]
async fn a_stranger_cannot_continue_a_conversation_through_the_stream_function() {
    let stack = Stack::require();
    let owner = stack.new_user(Tier::Pro).await.unwrap();
    let stranger = stack.jwt_user(Some(Tier::Pro)).await.unwrap();
    let marker = unique("iso");
    let answer = stack
        .chat_ok(&owner, &json!({"message": format!("mine {marker}")}))
        .await
        .unwrap();
    let id = answer["conversation_id"].as_str().unwrap();

    let reply = stack
        .post_json(
            "stream",
            "chat/stream",
            &stranger,
            &json!({"message": format!("intrude {marker}"), "conversation_id": id}),
        )
        .await
        .unwrap();
    reply.assert_error(404, "not_found");
    // The same answer as for an id that does not exist at all: nothing tells the two apart.
    let unknown = stack
        .post_json(
            "stream",
            "chat/stream",
            &stranger,
            &json!({"message": format!("intrude {marker}"), "conversation_id": uuid::Uuid::new_v4()}),
        )
        .await
        .unwrap();
    unknown.assert_error(404, "not_found");

    let stored = stack.conversation(&owner, id).await.unwrap();
    assert_eq!(stored.json["message_count"], 2, "{stored}");
    assert_eq!(
        stack.upstream_requests_with(&marker).await.unwrap().len(),
        1,
        "only the owner's turn may reach the upstream"
    );
}

#[tokio::test]
async fn a_listing_cursor_is_useless_to_another_principal() {
    let stack = Stack::require();
    let owner = stack.new_user(Tier::Pro).await.unwrap();
    let stranger = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("cursor");
    for n in 0..3 {
        stack
            .chat_ok(
                &owner,
                &json!({"message": format!("conversation {n} {marker}")}),
            )
            .await
            .unwrap();
    }
    let list = |caller: &Caller, query: &[(&str, &str)]| {
        caller.authorize(
            stack
                .http()
                .get(stack.url_with_query("chat", "conversations", query)),
        )
    };
    let page = stack.send(list(&owner, &[("limit", "1")])).await.unwrap();
    page.assert_status(200);
    let cursor = page.json["next_cursor"].as_str().unwrap().to_owned();

    let theirs = stack
        .send(list(&stranger, &[("limit", "1"), ("cursor", &cursor)]))
        .await
        .unwrap();
    theirs.assert_error(400, "invalid_cursor");
    assert!(
        !theirs.text.contains(&marker),
        "another principal's data came back:\n{theirs}"
    );
}

#[tokio::test]
async fn conversation_ids_are_distinct_random_v4_uuids() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("ids");
    let mut ids = BTreeSet::new();
    for n in 0..8 {
        let answer = stack
            .chat_ok(&user, &json!({"message": format!("id {n} {marker}")}))
            .await
            .unwrap();
        let id = answer["conversation_id"].as_str().unwrap().to_owned();
        assert_v4(&id);
        ids.insert(id);
    }
    assert_eq!(ids.len(), 8, "conversation ids repeat: {ids:?}");
}

/// The batch function's job API, when it documents one: only the submitter reads a job, anyone
/// else gets the 404 of an unknown id. While the function documents no job routes, the test
/// checks that there is indeed nothing to read there (the route is unknown for everybody).
#[tokio::test]
async fn a_batch_job_is_readable_by_its_owner_only() {
    let stack = Stack::require();
    let owner = stack.new_user(Tier::Pro).await.unwrap();
    let stranger = stack.new_user(Tier::Pro).await.unwrap();
    let doc = stack.openapi("batch").await.unwrap();
    let documented = doc["paths"]["/batch/jobs/{id}"]["get"].is_object()
        && doc["paths"]["/batch/jobs"]["post"].is_object();
    if !documented {
        let probe = uuid::Uuid::new_v4().to_string();
        for caller in [&owner, &stranger] {
            stack
                .get("batch", &format!("batch/jobs/{probe}"), caller)
                .await
                .unwrap()
                .assert_error(404, "not_found");
        }
        return;
    }

    let marker = unique("job");
    let submitted = stack
        .post_json(
            "batch",
            "batch/jobs",
            &owner,
            &json!({"items": [{"prompt": format!("job item {marker}")}]}),
        )
        .await
        .unwrap();
    submitted.assert_status(202);
    let id = submitted.json["job_id"]
        .as_str()
        .or_else(|| submitted.json["id"].as_str())
        .unwrap_or_else(|| panic!("no job id in\n{submitted}"))
        .to_owned();
    assert_v4(&id);
    let path = format!("batch/jobs/{id}");

    stack
        .get("batch", &path, &owner)
        .await
        .unwrap()
        .assert_status(200);
    let jwt_stranger = stack.jwt_user(Some(Tier::Pro)).await.unwrap();
    for caller in [&stranger, &jwt_stranger] {
        let reply = stack.get("batch", &path, caller).await.unwrap();
        reply.assert_error(404, "not_found");
        assert!(!reply.text.contains(&marker), "{reply}");
    }
    let unknown = stack
        .get(
            "batch",
            &format!("batch/jobs/{}", uuid::Uuid::new_v4()),
            &stranger,
        )
        .await
        .unwrap();
    unknown.assert_error(404, "not_found");
}
