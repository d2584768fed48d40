//! Conversation memory and the conversation routes of the chat function (issue 5): what history
//! reaches the upstream, listing, detail, deletion, and ownership.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use integration_tests::{
    Caller, Reply, Stack, is_rfc3339, mock_message_count, mock_reply_prefix, same_cost, unique,
};
use reqwest::Method;
use serde_json::{Value, json};
use shared::auth::Tier;

/// Stored messages the upstream prompt carries besides the system prompt and the new message.
const HISTORY_WINDOW: usize = 20;

async fn conversation_json(stack: &Stack, caller: &Caller, id: &str) -> Value {
    let reply = stack.conversation(caller, id).await.unwrap();
    reply.assert_status(200);
    reply.json
}

async fn list(stack: &Stack, caller: &Caller, query: &[(&str, &str)]) -> Reply {
    stack
        .send(
            caller.authorize(stack.http().get(stack.url_with_query(
                "chat",
                "conversations",
                query,
            ))),
        )
        .await
        .unwrap()
}

fn ids(page: &Value) -> Vec<String> {
    page["conversations"]
        .as_array()
        .unwrap_or_else(|| panic!("no `conversations` array in {page}"))
        .iter()
        .map(|c| c["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn second_turn_sends_the_first_turn_upstream() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("mem");
    let first = format!("my name is Ada {marker}");
    let second = format!("what is my name {marker}");

    let one = stack
        .chat_ok(&user, &json!({"message": first}))
        .await
        .unwrap();
    let id = one["conversation_id"].as_str().unwrap().to_owned();
    let two = stack
        .chat_ok(&user, &json!({"message": second, "conversation_id": id}))
        .await
        .unwrap();
    assert_eq!(two["conversation_id"], id.as_str());
    let text = two["message"].as_str().unwrap_or_default();
    assert!(
        text.starts_with(&mock_reply_prefix(3, &second)),
        "turn 2 should send 2 stored messages + the new one: {text:?}"
    );

    let upstream = stack.upstream_request_ending_with(&second).await.unwrap();
    assert_eq!(
        upstream.turns(),
        [
            ("user".to_owned(), first),
            (
                "assistant".to_owned(),
                one["message"].as_str().unwrap().to_owned()
            ),
            ("user".to_owned(), second),
        ]
    );
}

#[tokio::test]
async fn upstream_prompt_keeps_the_last_twenty_messages_and_the_conversation_keeps_all() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("long");
    let system_prompt = format!("You are a patient listener {marker}");
    const TURNS: usize = 25;

    let mut id: Option<String> = None;
    let mut sent = Vec::new();
    let mut replies = Vec::new();
    let mut total_tokens = 0;
    let mut total_cost = 0.0;
    for turn in 1..=TURNS {
        let message = format!("turn {turn} of the long talk {marker}");
        let mut body = json!({"message": message, "system_prompt": system_prompt});
        if let Some(id) = &id {
            body["conversation_id"] = json!(id);
        }
        let answer = stack.chat_ok(&user, &body).await.unwrap();
        let text = answer["message"].as_str().unwrap().to_owned();
        let history = (2 * (turn - 1)).min(HISTORY_WINDOW);
        assert_eq!(
            mock_message_count(&text),
            Some(1 + history + 1),
            "turn {turn}: system prompt + {history} stored messages + the new one; reply {text:?}"
        );
        total_tokens += answer["usage"]["total_tokens"].as_u64().unwrap();
        total_cost += answer["cost_estimate"].as_f64().unwrap();
        id.get_or_insert_with(|| answer["conversation_id"].as_str().unwrap().to_owned());
        sent.push(message);
        replies.push(text);
    }

    // The last upstream request: system prompt, then turns 15..=24 in order, then turn 25.
    let last = stack
        .upstream_request_ending_with(&sent[TURNS - 1])
        .await
        .unwrap();
    let mut expected = vec![("system".to_owned(), system_prompt.clone())];
    for turn in (TURNS - HISTORY_WINDOW / 2)..TURNS {
        expected.push(("user".to_owned(), sent[turn - 1].clone()));
        expected.push(("assistant".to_owned(), replies[turn - 1].clone()));
    }
    expected.push(("user".to_owned(), sent[TURNS - 1].clone()));
    assert_eq!(last.turns(), expected);

    // Storage keeps every message, in order, and the totals add up.
    let id = id.unwrap();
    let conversation = conversation_json(&stack, &user, &id).await;
    assert_eq!(conversation["id"], id.as_str());
    assert_eq!(conversation["message_count"], 2 * TURNS);
    let messages = conversation["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2 * TURNS);
    let mut previous_seq = None;
    for (i, message) in messages.iter().enumerate() {
        let (role, content) = if i % 2 == 0 {
            ("user", &sent[i / 2])
        } else {
            ("assistant", &replies[i / 2])
        };
        assert_eq!(message["role"], role, "message {i}");
        assert_eq!(message["content"], content.as_str(), "message {i}");
        assert!(message["tokens"].as_u64().is_some(), "message {i}: tokens");
        assert!(
            message["created_at"].as_str().is_some_and(is_rfc3339),
            "message {i}: created_at"
        );
        let seq = message["seq"].as_u64().unwrap();
        if let Some(previous) = previous_seq {
            assert_eq!(seq, previous + 1, "sequence numbers are contiguous");
        }
        previous_seq = Some(seq);
    }
    assert_eq!(conversation["total_tokens"], total_tokens);
    let stored_cost = conversation["total_cost"].as_f64().unwrap();
    assert!(
        same_cost(stored_cost, total_cost),
        "total_cost {stored_cost} != sum of the turns' cost_estimate {total_cost}"
    );
}

#[tokio::test]
async fn conversations_are_listed_newest_first_with_a_cursor_and_only_to_their_owner() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let stranger = stack.new_user(Tier::Pro).await.unwrap();
    let model = stack.registry().unwrap().default_model().id.clone();
    let marker = unique("list");

    let mut created = Vec::new();
    for n in 1..=3 {
        let answer = stack
            .chat_ok(
                &user,
                &json!({"message": format!("conversation {n} {marker}")}),
            )
            .await
            .unwrap();
        created.push(answer);
    }
    let newest_first: Vec<String> = created
        .iter()
        .rev()
        .map(|a| a["conversation_id"].as_str().unwrap().to_owned())
        .collect();

    let first = list(&stack, &user, &[("limit", "2")]).await;
    first.assert_status(200);
    assert_eq!(ids(&first.json), newest_first[..2]);
    let cursor = first.json["next_cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("a first page of 2 out of 3 needs a next_cursor:\n{first}"))
        .to_owned();
    let second = list(&stack, &user, &[("limit", "2"), ("cursor", &cursor)]).await;
    second.assert_status(200);
    assert_eq!(ids(&second.json), newest_first[2..]);
    assert!(
        second.json["next_cursor"].is_null(),
        "the last page has no next_cursor:\n{second}"
    );

    // Every listed field, checked on the newest conversation.
    let entry = &first.json["conversations"][0];
    let turn = &created[2];
    assert_eq!(entry["model"], model.as_str());
    assert_eq!(entry["message_count"], 2);
    assert_eq!(entry["total_tokens"], turn["usage"]["total_tokens"]);
    assert!(same_cost(
        entry["total_cost"].as_f64().unwrap(),
        turn["cost_estimate"].as_f64().unwrap()
    ));
    assert!(
        entry["title"]
            .as_str()
            .is_some_and(|t| !t.trim().is_empty()),
        "title: {entry}"
    );
    let created_at = entry["created_at"].as_str().unwrap_or_default();
    let updated_at = entry["updated_at"].as_str().unwrap_or_default();
    assert!(is_rfc3339(created_at) && is_rfc3339(updated_at), "{entry}");

    let theirs = list(&stack, &stranger, &[]).await;
    theirs.assert_status(200);
    assert!(
        ids(&theirs.json).is_empty(),
        "a fresh user lists no conversations, not someone else's:\n{theirs}"
    );
}

#[tokio::test]
async fn conversation_detail_has_the_counters_and_messages_in_order() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let marker = unique("detail");
    let first = format!("first question {marker}");
    let second = format!("second question {marker}");
    let one = stack
        .chat_ok(&user, &json!({"message": first}))
        .await
        .unwrap();
    let id = one["conversation_id"].as_str().unwrap();
    let two = stack
        .chat_ok(&user, &json!({"message": second, "conversation_id": id}))
        .await
        .unwrap();

    let conversation = conversation_json(&stack, &user, id).await;
    assert_eq!(conversation["message_count"], 4);
    let contents: Vec<(&str, &str)> = conversation["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["role"].as_str().unwrap_or_default(),
                m["content"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        contents,
        [
            ("user", first.as_str()),
            ("assistant", one["message"].as_str().unwrap()),
            ("user", second.as_str()),
            ("assistant", two["message"].as_str().unwrap()),
        ]
    );
    let tokens = one["usage"]["total_tokens"].as_u64().unwrap()
        + two["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(conversation["total_tokens"], tokens);
    for field in ["title", "model", "total_cost", "created_at", "updated_at"] {
        assert!(
            !conversation[field].is_null(),
            "{field} missing: {conversation}"
        );
    }
}

#[tokio::test]
async fn deleted_conversation_is_gone() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let answer = stack
        .chat_ok(
            &user,
            &json!({"message": format!("short lived {}", unique("del"))}),
        )
        .await
        .unwrap();
    let id = answer["conversation_id"].as_str().unwrap();
    let path = format!("conversations/{id}");

    let deleted = stack
        .send(stack.request(Method::DELETE, "chat", &path, &user))
        .await
        .unwrap();
    deleted.assert_status(204);
    assert!(deleted.text.is_empty(), "204 has no body:\n{deleted}");

    stack
        .conversation(&user, id)
        .await
        .unwrap()
        .assert_error(404, "not_found");
    stack
        .send(stack.request(Method::DELETE, "chat", &path, &user))
        .await
        .unwrap()
        .assert_error(404, "not_found");
    let listed = list(&stack, &user, &[]).await;
    listed.assert_status(200);
    assert!(!ids(&listed.json).contains(&id.to_owned()), "{listed}");
}

#[tokio::test]
async fn another_principal_gets_404_for_get_delete_and_continuing() {
    let stack = Stack::require();
    let owner = stack.new_user(Tier::Pro).await.unwrap();
    let stranger = stack.new_user(Tier::Pro).await.unwrap();
    let jwt_stranger = stack.jwt_user(Some(Tier::Pro)).await.unwrap();
    let marker = unique("own");
    let answer = stack
        .chat_ok(&owner, &json!({"message": format!("mine {marker}")}))
        .await
        .unwrap();
    let id = answer["conversation_id"].as_str().unwrap();
    let path = format!("conversations/{id}");
    let intrusion = format!("let me in {marker}");

    for other in [&stranger, &jwt_stranger] {
        stack
            .conversation(other, id)
            .await
            .unwrap()
            .assert_error(404, "not_found");
        stack
            .send(stack.request(Method::DELETE, "chat", &path, other))
            .await
            .unwrap()
            .assert_error(404, "not_found");
        stack
            .chat(other, &json!({"message": intrusion, "conversation_id": id}))
            .await
            .unwrap()
            .assert_error(404, "not_found");
    }

    // Nothing happened to the owner's conversation, and nothing went upstream for the stranger.
    let conversation = conversation_json(&stack, &owner, id).await;
    assert_eq!(conversation["message_count"], 2);
    assert_eq!(conversation["messages"].as_array().map(Vec::len), Some(2));
    let upstream = stack.upstream_requests_with(&marker).await.unwrap();
    assert_eq!(
        upstream.len(),
        1,
        "only the owner's turn may reach the upstream"
    );
}

#[tokio::test]
async fn unknown_conversation_id_is_404_for_get_and_delete() {
    let stack = Stack::require();
    let user = stack.new_user(Tier::Pro).await.unwrap();
    let id = uuid::Uuid::new_v4().to_string();
    stack
        .conversation(&user, &id)
        .await
        .unwrap()
        .assert_error(404, "not_found");
    stack
        .send(stack.request(
            Method::DELETE,
            "chat",
            &format!("conversations/{id}"),
            &user,
        ))
        .await
        .unwrap()
        .assert_error(404, "not_found");
}
