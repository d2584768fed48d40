//! Reads of what the functions stored, straight from the DynamoDB emulator with the AWS SDK, so
//! invariants are checked on the data itself and not through the API under test.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

use crate::{HarnessError, Result, Stack, stack_var};

type Item = HashMap<String, AttributeValue>;

fn text(item: &Item, name: &str) -> Option<String> {
    item.get(name)?.as_s().ok().cloned()
}

fn number<T: std::str::FromStr>(item: &Item, name: &str) -> Option<T> {
    item.get(name)?.as_n().ok()?.parse().ok()
}

/// One conversation as the table holds it.
#[derive(Debug, Clone)]
pub struct StoredConversation {
    pub id: String,
    pub owner: Option<String>,
    pub message_count: Option<u64>,
    pub total_tokens: Option<u64>,
    pub total_cost: Option<f64>,
    /// `(seq, role, tokens)` of every message item, in sort-key order.
    pub messages: Vec<(u64, String, u64)>,
    /// Message items whose sort key or attributes do not parse.
    pub malformed: usize,
}

impl StoredConversation {
    pub fn exists(&self) -> bool {
        self.owner.is_some() || !self.messages.is_empty()
    }

    /// Turns stored (pairs of messages).
    pub fn turns(&self) -> usize {
        self.messages.len() / 2
    }

    /// Everything wrong with this conversation: `message_count` equals the stored messages,
    /// sequence numbers are 0..n without gaps, roles alternate user/assistant starting with the
    /// user, every message carries the owner of META, and `total_tokens` is the sum of the
    /// messages' tokens. Empty when consistent.
    pub fn inconsistencies(&self) -> Vec<String> {
        let mut found = Vec::new();
        let id = &self.id;
        if self.owner.is_none() {
            found.push(format!("{id}: messages without META"));
        }
        if self.malformed > 0 {
            found.push(format!("{id}: {} malformed message items", self.malformed));
        }
        let count = self.messages.len() as u64;
        if self.message_count != Some(count) {
            found.push(format!(
                "{id}: message_count {:?} but {count} messages stored",
                self.message_count
            ));
        }
        for (expected, (seq, role, _)) in self.messages.iter().enumerate() {
            let expected = expected as u64;
            if *seq != expected {
                found.push(format!(
                    "{id}: seq {seq} where {expected} belongs (gap or duplicate)"
                ));
                break;
            }
            let want = if seq % 2 == 0 { "user" } else { "assistant" };
            if role != want {
                found.push(format!("{id}: message {seq} is {role}, expected {want}"));
            }
        }
        let tokens: u64 = self.messages.iter().map(|(_, _, t)| t).sum();
        if self.total_tokens != Some(tokens) {
            found.push(format!(
                "{id}: total_tokens {:?} but the messages hold {tokens}",
                self.total_tokens
            ));
        }
        found
    }
}

/// Reads every item of one conversation with a consistent query.
pub async fn conversation(
    client: &aws_sdk_dynamodb::Client,
    id: &str,
) -> Result<StoredConversation> {
    let table = stack_var("CONVERSATIONS_TABLE")?;
    let mut items: Vec<Item> = Vec::new();
    let mut start: Option<Item> = None;
    loop {
        let page = client
            .query()
            .table_name(&table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", AttributeValue::S(format!("CONV#{id}")))
            .consistent_read(true)
            .set_exclusive_start_key(start.take())
            .send()
            .await
            .map_err(|e| HarnessError::Unexpected(format!("query {id}: {e:?}")))?;
        items.extend(page.items().iter().cloned());
        match page.last_evaluated_key() {
            Some(key) if !key.is_empty() => start = Some(key.clone()),
            _ => break,
        }
    }
    let mut stored = StoredConversation {
        id: id.to_owned(),
        owner: None,
        message_count: None,
        total_tokens: None,
        total_cost: None,
        messages: Vec::new(),
        malformed: 0,
    };
    for item in &items {
        let sk = text(item, "sk").unwrap_or_default();
        if sk == "META" {
            stored.owner = text(item, "owner");
            stored.message_count = number(item, "message_count");
            stored.total_tokens = number(item, "total_tokens");
            stored.total_cost = number(item, "total_cost");
        } else if let Some(seq) = sk.strip_prefix("MSG#").and_then(|s| s.parse::<u64>().ok()) {
            match (text(item, "role"), number(item, "tokens")) {
                (Some(role), Some(tokens)) => stored.messages.push((seq, role, tokens)),
                _ => stored.malformed += 1,
            }
        } else {
            stored.malformed += 1;
        }
    }
    Ok(stored)
}

/// The ids of every conversation META item `owner` has in the `byOwner` index.
pub async fn conversations_of(
    client: &aws_sdk_dynamodb::Client,
    owner: &str,
) -> Result<Vec<String>> {
    let table = stack_var("CONVERSATIONS_TABLE")?;
    let mut ids = Vec::new();
    let mut start: Option<Item> = None;
    loop {
        let page = client
            .query()
            .table_name(&table)
            .index_name("byOwner")
            .key_condition_expression("#owner = :owner")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", AttributeValue::S(owner.to_owned()))
            .set_exclusive_start_key(start.take())
            .send()
            .await
            .map_err(|e| HarnessError::Unexpected(format!("byOwner {owner}: {e:?}")))?;
        ids.extend(
            page.items()
                .iter()
                .filter_map(|item| text(item, "pk")?.strip_prefix("CONV#").map(str::to_owned)),
        );
        match page.last_evaluated_key() {
            Some(key) if !key.is_empty() => start = Some(key.clone()),
            _ => break,
        }
    }
    Ok(ids)
}

/// A principal's rate-limit counters, summed over every hourly item it has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Hourly items found (more than one when a run crossed the hour).
    pub windows: usize,
    /// The largest request counter of one window.
    pub max_requests_per_window: i64,
    pub requests: i64,
    /// Every `tokens_<minute>` counter added up (settlements can move one below zero).
    pub tokens: i64,
}

/// Reads `rl#<user_id>#<hour>` items (a scan: the table only holds test principals).
pub async fn rate_limit_counters(stack: &Stack, user_id: &str) -> Result<Counters> {
    let client = stack.dynamodb().await?;
    let table = stack_var("RATE_LIMITS_TABLE")?;
    let prefix = format!("rl#{user_id}#");
    let mut counters = Counters::default();
    let mut start: Option<Item> = None;
    loop {
        let page = client
            .scan()
            .table_name(&table)
            .filter_expression("begins_with(pk, :prefix)")
            .expression_attribute_values(":prefix", AttributeValue::S(prefix.clone()))
            .consistent_read(true)
            .set_exclusive_start_key(start.take())
            .send()
            .await
            .map_err(|e| HarnessError::Unexpected(format!("scan rate limits: {e:?}")))?;
        for item in page.items() {
            counters.windows += 1;
            let requests: i64 = number(item, shared::ratelimit::REQUESTS).unwrap_or(0);
            counters.requests += requests;
            counters.max_requests_per_window = counters.max_requests_per_window.max(requests);
            counters.tokens += item
                .iter()
                .filter(|(name, _)| name.starts_with("tokens_"))
                .filter_map(|(_, value)| value.as_n().ok()?.parse::<i64>().ok())
                .sum::<i64>();
        }
        match page.last_evaluated_key() {
            Some(key) if !key.is_empty() => start = Some(key.clone()),
            _ => break,
        }
    }
    Ok(counters)
}
