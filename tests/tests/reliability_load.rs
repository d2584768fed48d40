//! Load with injected upstream faults (issue 11), against a stack of its own (`make
//! reliability`): several client processes keep many requests in flight over `chat` and
//! `stream` for a bounded time while the mock LLM answers about 10% with 429, 5% with 500, 5%
//! never and cuts 5% off mid-answer. Then every invariant is checked on the outcomes, on the
//! items in the DynamoDB emulator and on the function processes.
//!
//! Size: `GW_LOAD_WORKERS` processes x `GW_LOAD_CONCURRENCY` requests in flight for
//! `GW_LOAD_SECONDS`, choices drawn from `GW_LOAD_SEED` (defaults below; RELIABILITY.md has the
//! figures of the last run).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration_tests::disturb::{
    crash_lines, function_log_len, function_log_since, function_processes, require_dedicated_stack,
};
use integration_tests::load::{Audience, Fault, LoadPlan, MOCK_ANSWER_TOKENS, Outcome};
use integration_tests::store::{self, rate_limit_counters};
use integration_tests::{Caller, Stack, free_tier_quota, unique};
use serde_json::json;
use shared::auth::Tier;
use shared::llm::{ChatMessage, CompletionRequest};

const DEFAULT_WORKERS: usize = 4;
/// 4 x 24 = 96 requests in flight at most. Not more: `cargo lambda watch` (1.9) puts every
/// invocation of every function through one scheduler channel of 100 entries, and with about 200
/// in flight it wedged for good in every run here (no function invoked again, `/health`
/// unanswered for minutes, all of watch's threads idle; RELIABILITY.md, known limits). That is the
/// emulator's ceiling, not the gateway's: a function URL has no such queue.
const DEFAULT_CONCURRENCY: usize = 24;
const DEFAULT_SECONDS: u64 = 30;
const DEFAULT_SEED: u64 = 20_261_127;
const FREE_USERS: usize = 8;
const PRO_USERS: usize = 6;
const SHARED_CONVERSATIONS: usize = 12;
/// Small enough that the free tier's token budget never binds before its request quota.
const FREE_MAX_TOKENS: u32 = 20;
const MAX_TOKENS: u32 = 30;

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// The documented statuses of `route` (POST) in `function`'s OpenAPI document.
async fn documented_statuses(stack: &Stack, function: &str, route: &str) -> BTreeSet<u16> {
    let doc = stack.openapi(function).await.unwrap();
    doc["paths"][route]["post"]["responses"]
        .as_object()
        .unwrap_or_else(|| panic!("{function} documents no POST {route}"))
        .keys()
        .filter_map(|k| k.parse().ok())
        .collect()
}

/// The error codes a status may carry (ARCHITECTURE.md, "Errors, everywhere").
fn codes_for(status: u16) -> &'static [&'static str] {
    match status {
        400 => &["invalid_json", "unknown_field", "invalid_body"],
        401 => &["invalid_credentials"],
        404 => &["not_found"],
        413 => &["payload_too_large"],
        422 => &["validation_failed"],
        429 => &["rate_limit_exceeded", "upstream_rate_limited"],
        502 => &["upstream_error"],
        503 => &["service_unavailable"],
        504 => &["upstream_timeout"],
        _ => &[],
    }
}

/// Watches the function processes while the load runs: every pid ever seen must still be alive
/// at the end (a function process that died, or was replaced, breaks that).
async fn watch_processes(until: Instant) -> BTreeMap<String, BTreeSet<u32>> {
    let mut seen: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    while Instant::now() < until {
        for (name, pids) in function_processes().unwrap() {
            seen.entry(name).or_default().extend(pids);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    seen
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// The tokens the gateway must have charged the ledger user for one outcome:
/// - a completed answer: the usage the mock reported (the reservation is settled to it);
/// - a stream cut after it started: the gateway's own estimate of what was consumed, i.e. the
///   prompt estimate plus the estimate of the text streamed so far (the mock reports no usage
///   for an answer it cut off, so there is nothing better to reconcile to);
/// - anything that failed before the first byte, or was refused: nothing (released).
fn expected_charge(outcome: &Outcome, model: &str) -> i64 {
    if let Some(usage) = outcome.reported_usage() {
        return usage["total_tokens"].as_i64().unwrap_or(-1_000_000);
    }
    match &outcome.stream {
        Some(seen) if seen.start.is_some() => {
            let request = CompletionRequest::new(model, vec![ChatMessage::user(&outcome.message)]);
            i64::try_from(
                request.estimated_prompt_tokens() + shared::tokens::estimate_tokens(&seen.text),
            )
            .unwrap_or(i64::MAX)
        }
        _ => 0,
    }
}

#[tokio::test]
async fn load_with_upstream_faults_keeps_every_invariant() {
    let stack = require_dedicated_stack("reliability");
    let workers = env_number("GW_LOAD_WORKERS", DEFAULT_WORKERS);
    let concurrency = env_number("GW_LOAD_CONCURRENCY", DEFAULT_CONCURRENCY);
    let seconds = env_number("GW_LOAD_SECONDS", DEFAULT_SECONDS);
    let seed = env_number("GW_LOAD_SEED", DEFAULT_SEED);
    let (quota, _) = free_tier_quota();
    let model = stack.registry().unwrap().default_model().id.clone();
    let client = stack.dynamodb().await.unwrap();

    // -- principals and the conversations every worker continues at once ---------------------
    let mut free = Vec::new();
    for _ in 0..FREE_USERS {
        free.push(stack.new_user(Tier::Free).await.unwrap());
    }
    let mut pro = Vec::new();
    for _ in 0..PRO_USERS {
        pro.push(stack.new_user(Tier::Pro).await.unwrap());
    }
    let ledger = stack.new_user(Tier::Pro).await.unwrap();
    let mut shared_conversations = Vec::new();
    let mut seed_cost: HashMap<String, f64> = HashMap::new();
    for n in 0..SHARED_CONVERSATIONS {
        let owner = n % PRO_USERS;
        let answer = stack
            .chat_ok(
                &pro[owner],
                &json!({"message": format!("shared conversation {n} {}", unique("seed")), "max_tokens": MAX_TOKENS}),
            )
            .await
            .unwrap();
        let id = answer["conversation_id"].as_str().unwrap().to_owned();
        seed_cost.insert(id.clone(), answer["cost_estimate"].as_f64().unwrap());
        shared_conversations.push((id, owner));
    }
    // Warm the stream function too, so its first process exists before the count starts (as
    // a user whose conversations are not checked).
    let bystander = stack.new_user(Tier::Pro).await.unwrap();
    stack
        .send(
            stack
                .request(reqwest::Method::POST, "stream", "chat/stream", &bystander)
                .json(&json!({"message": "warm up", "max_tokens": 5})),
        )
        .await
        .unwrap()
        .assert_status(200);
    let documented: HashMap<&str, BTreeSet<u16>> = HashMap::from([
        ("/chat", documented_statuses(&stack, "chat", "/chat").await),
        (
            "/chat/stream",
            documented_statuses(&stack, "stream", "/chat/stream").await,
        ),
    ]);
    let stats_before = stack.mock_stats().await.unwrap();
    let log_before = function_log_len().unwrap();

    // -- the load -----------------------------------------------------------------------------
    let plan = LoadPlan {
        seed,
        duration_ms: seconds * 1000,
        concurrency,
        functions_url: stack.functions_url().to_owned(),
        free_keys: free
            .iter()
            .map(|c| c.api_key().unwrap().to_owned())
            .collect(),
        pro_keys: pro
            .iter()
            .map(|c| c.api_key().unwrap().to_owned())
            .collect(),
        ledger_key: ledger.api_key().unwrap().to_owned(),
        shared_conversations: shared_conversations.clone(),
        free_max_tokens: FREE_MAX_TOKENS,
        max_tokens: MAX_TOKENS,
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique("load-"));
    std::fs::create_dir_all(&dir).unwrap();
    let plan_path = dir.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_vec(&plan).unwrap()).unwrap();

    let started = Instant::now();
    let mut children = Vec::new();
    for worker in 0..workers {
        let out = dir.join(format!("outcomes-{worker}.json"));
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_load_worker"))
            .arg(&plan_path)
            .arg(worker.to_string())
            .arg(&out)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        children.push((child, out));
    }
    // Each worker stops sending at the deadline; what is in flight then gets the client's
    // timeout at most.
    let bound = Duration::from_secs(seconds) + integration_tests::load::CLIENT_TIMEOUT;
    let watcher = tokio::spawn(watch_processes(started + Duration::from_secs(seconds)));
    let mut outcomes: Vec<Outcome> = Vec::new();
    for (mut child, out) in children {
        let status = tokio::time::timeout(bound + Duration::from_secs(10), child.wait())
            .await
            .unwrap_or_else(|_| panic!("a load worker overran its bound of {bound:?}"))
            .unwrap();
        assert!(status.success(), "load worker failed: {status}");
        outcomes
            .extend(serde_json::from_slice::<Vec<Outcome>>(&std::fs::read(&out).unwrap()).unwrap());
    }
    let elapsed = started.elapsed();
    let seen_processes = watcher.await.unwrap();
    let stats_after = stack.mock_stats().await.unwrap();

    let mut violations: Vec<String> = Vec::new();

    // -- every answer is documented ------------------------------------------------------------
    for o in &outcomes {
        if let Some(problem) = &o.problem {
            violations.push(format!(
                "{} {} ({:?}, fault {}): {problem}",
                o.function,
                o.route,
                o.audience,
                o.fault.name()
            ));
            continue;
        }
        if !documented[o.route.as_str()].contains(&o.status) {
            violations.push(format!("{} answered undocumented {}", o.route, o.status));
        }
        if let Some(code) = &o.error_code
            && !codes_for(o.status).contains(&code.as_str())
        {
            violations.push(format!("{} {} carries code {code}", o.route, o.status));
        }
        if let Some(code) = o.stream.as_ref().and_then(|s| s.error_code.as_deref())
            && ![502, 504, 429, 503]
                .iter()
                .any(|s| codes_for(*s).contains(&code))
        {
            violations.push(format!("stream error event with code {code}"));
        }
        // Without an injected fault, only our own rate limit may refuse a request.
        let refused_by_us = o.error_code.as_deref() == Some("rate_limit_exceeded");
        if o.fault == Fault::None && o.stored_in().is_none() && !refused_by_us {
            violations.push(format!(
                "a request without a fault failed: {} {} -> {}",
                o.route,
                o.status,
                o.label()
            ));
        }
        // A fault on every attempt can never end in a stored answer.
        if matches!(
            o.fault,
            Fault::RateLimited | Fault::ServerError | Fault::Hang | Fault::Cut
        ) && o.stored_in().is_some()
        {
            violations.push(format!("fault {} still stored an answer", o.fault.name()));
        }
    }

    // -- no function process died -----------------------------------------------------------
    let alive_now = function_processes().unwrap();
    for (name, pids) in &seen_processes {
        for pid in pids {
            if !alive_now.get(name).is_some_and(|alive| alive.contains(pid)) {
                violations.push(format!("{name} process {pid} died during the load"));
            }
        }
    }
    for line in crash_lines(&function_log_since(log_before).unwrap()) {
        violations.push(format!("function log: {line}"));
    }
    for function in ["chat", "stream"] {
        let health = tokio::time::timeout(
            Duration::from_secs(15),
            stack.get(function, "health", &Caller::anonymous()),
        )
        .await;
        match health {
            Ok(Ok(reply)) if reply.status == 200 => {}
            Ok(Ok(reply)) => {
                violations.push(format!(
                    "{function} /health is {} after the load",
                    reply.status
                ));
            }
            Ok(Err(err)) => violations.push(format!("{function} /health after the load: {err}")),
            Err(_) => violations.push(format!("{function} /health hangs after the load")),
        }
    }

    // -- every stored conversation is consistent, no turn lost or invented -------------------
    let mut expected_turns: HashMap<String, usize> = HashMap::new();
    let mut expected_cost: HashMap<String, f64> = seed_cost.clone();
    for (id, _) in &shared_conversations {
        expected_turns.insert(id.clone(), 1);
    }
    let mut started_not_stored: BTreeSet<String> = BTreeSet::new();
    for o in &outcomes {
        if let Some(id) = o.stored_in() {
            *expected_turns.entry(id.clone()).or_default() += 1;
            *expected_cost.entry(id).or_default() += o.reported_cost().unwrap_or(0.0);
        } else if let Some(id) = o.stream.as_ref().and_then(|s| s.start.clone())
            && o.continued.is_none()
        {
            started_not_stored.insert(id);
        }
    }
    let mut checked_conversations = 0;
    let mut stored_messages = 0;
    for (id, turns) in &expected_turns {
        let stored = store::conversation(&client, id).await.unwrap();
        checked_conversations += 1;
        stored_messages += stored.messages.len();
        violations.extend(stored.inconsistencies());
        if stored.turns() != *turns {
            violations.push(format!(
                "{id}: {} turns stored, {turns} reported as stored to clients",
                stored.turns()
            ));
        }
        let cost = expected_cost.get(id).copied().unwrap_or(0.0);
        // Each turn's cost is stored rounded to 10 decimals (conversations.rs, format_cost).
        let rounding = 1e-10 * (*turns as f64 + 1.0);
        if !stored
            .total_cost
            .is_some_and(|c| (c - cost).abs() <= rounding)
        {
            violations.push(format!(
                "{id}: total_cost {:?}, the turns reported {cost}",
                stored.total_cost
            ));
        }
    }
    for id in &started_not_stored {
        let stored = store::conversation(&client, id).await.unwrap();
        if stored.exists() {
            violations.push(format!("{id}: a stream that failed still stored its turn"));
        }
    }
    let owners: Vec<&Caller> = free.iter().chain(&pro).chain([&ledger]).collect();
    for owner in owners {
        for id in store::conversations_of(&client, &owner.user_id)
            .await
            .unwrap()
        {
            if !expected_turns.contains_key(&id) {
                violations.push(format!(
                    "{id} of {} is stored but no client was told it was",
                    owner.user_id
                ));
            }
        }
    }

    // -- rate limits admitted exactly their quota across every process -----------------------
    let mut free_sent = 0;
    let mut free_admitted_total = 0;
    for (i, user) in free.iter().enumerate() {
        let mine: Vec<&Outcome> = outcomes
            .iter()
            .filter(|o| o.audience == Audience::Free(i))
            .collect();
        let admitted = mine
            .iter()
            .filter(|o| o.error_code.as_deref() != Some("rate_limit_exceeded"))
            .count() as i64;
        free_sent += mine.len();
        free_admitted_total += admitted;
        let counters = rate_limit_counters(&stack, &user.user_id).await.unwrap();
        if counters.requests != admitted {
            violations.push(format!(
                "free user {i}: counter says {} requests, {admitted} were admitted",
                counters.requests
            ));
        }
        let quota = i64::try_from(quota).unwrap();
        let sent = mine.len() as i64;
        if counters.windows <= 1 {
            if admitted != quota.min(sent) {
                violations.push(format!(
                    "free user {i}: {admitted} of {sent} requests admitted, quota {quota}"
                ));
            }
        } else if counters.max_requests_per_window > quota {
            violations.push(format!(
                "free user {i}: a window admitted {} > quota {quota}",
                counters.max_requests_per_window
            ));
        }
    }

    // -- token counters reconcile with the upstream's usage ------------------------------------
    let mine: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.audience == Audience::Ledger)
        .collect();
    let mut expected_tokens = 0i64;
    let mut reported_tokens = 0i64;
    let mut partial_tokens = 0i64;
    let mut ledger_cut_after_start = 0;
    for o in &mine {
        let charge = expected_charge(o, &model);
        expected_tokens += charge;
        if let Some(usage) = o.reported_usage() {
            reported_tokens += charge;
            // The usage the gateway relays is the mock's: prompt = words + 4 per message,
            // completion = its answer length capped by max_tokens.
            let words = o.message.split_whitespace().count() as u64;
            let want_prompt = words + 4;
            let want_completion = MOCK_ANSWER_TOKENS.min(u64::from(MAX_TOKENS));
            if usage["prompt_tokens"].as_u64() != Some(want_prompt)
                || usage["completion_tokens"].as_u64() != Some(want_completion)
                || usage["total_tokens"].as_u64() != Some(want_prompt + want_completion)
            {
                violations.push(format!(
                    "usage {usage} differs from the mock's ({want_prompt} + {want_completion})"
                ));
            }
        } else {
            partial_tokens += charge;
            ledger_cut_after_start += usize::from(charge > 0);
        }
    }
    let ledger_counters = rate_limit_counters(&stack, &ledger.user_id).await.unwrap();
    if ledger_counters.tokens != expected_tokens {
        violations.push(format!(
            "ledger tokens: counter {} but usage reported {reported_tokens} + partial estimates \
             {partial_tokens} = {expected_tokens}",
            ledger_counters.tokens
        ));
    }
    if ledger_counters.requests != mine.len() as i64 {
        violations.push(format!(
            "ledger requests: counter {} but {} sent",
            ledger_counters.requests,
            mine.len()
        ));
    }

    // -- the figures of this run --------------------------------------------------------------
    let mut by_label: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_fault: BTreeMap<&str, usize> = BTreeMap::new();
    let mut by_function: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &outcomes {
        *by_label
            .entry(format!("{} {}", o.function, o.label()))
            .or_default() += 1;
        *by_fault.entry(o.fault.name()).or_default() += 1;
        *by_function.entry(o.function.as_str()).or_default() += 1;
    }
    let mut latencies: Vec<u64> = outcomes.iter().map(|o| o.latency_ms).collect();
    latencies.sort_unstable();
    let figures = json!({
        "seed": seed,
        "workers": workers,
        "concurrency_per_worker": concurrency,
        "seconds_of_sending": seconds,
        "wall_seconds": elapsed.as_secs_f64(),
        "requests": outcomes.len(),
        "requests_per_second": outcomes.len() as f64 / elapsed.as_secs_f64(),
        "by_function": by_function,
        "faults_injected": by_fault,
        "outcomes": by_label,
        "latency_ms": {
            "p50": percentile(&latencies, 0.5),
            "p95": percentile(&latencies, 0.95),
            "p99": percentile(&latencies, 0.99),
            "max": latencies.last().copied().unwrap_or(0),
        },
        "upstream_calls": stats_after.total.saturating_sub(stats_before.total),
        "function_processes": seen_processes.iter().map(|(k, v)| (k.clone(), v.len())).collect::<BTreeMap<_, _>>(),
        "conversations_checked": checked_conversations,
        "messages_checked": stored_messages,
        "free_users": FREE_USERS,
        "free_requests": free_sent,
        "free_admitted": free_admitted_total,
        "free_quota_per_user": quota,
        "ledger_requests": mine.len(),
        "ledger_tokens_counter": ledger_counters.tokens,
        "ledger_tokens_reported_usage": reported_tokens,
        "ledger_tokens_partial_estimates": partial_tokens,
        "ledger_streams_cut_after_start": ledger_cut_after_start,
        "violations": violations.len(),
    });
    let report = serde_json::to_string_pretty(&figures).unwrap();
    eprintln!("load figures:\n{report}");
    let figures_path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("reliability-load.json");
    std::fs::write(&figures_path, &report).unwrap();

    if violations.is_empty() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("plan and outcomes kept in {}", dir.display());
    }
    let shown: Vec<&String> = violations.iter().take(40).collect();
    assert!(
        violations.is_empty(),
        "{} invariant violations (first {}):\n{}",
        violations.len(),
        shown.len(),
        shown
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        outcomes.len() >= workers * concurrency,
        "the load sent only {} requests",
        outcomes.len()
    );
}
