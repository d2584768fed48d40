//! What the mock remembers between requests: counters, recent request bodies and `times` usage.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Serialize;
use serde_json::Value;

/// Recorded requests kept in memory; older ones are dropped first.
pub const MAX_RECORDED_REQUESTS: usize = 1000;

/// One chat-completion request as received, for `/mock/requests`.
#[derive(Debug, Clone, Serialize)]
pub struct RecordedRequest {
    /// The `model` field, when the body was a JSON object with a string model.
    pub model: Option<String>,
    /// Only the `x-mock-*` headers: the others may carry credentials.
    pub headers: BTreeMap<String, String>,
    /// The parsed JSON body, or the raw text as a JSON string when it was not JSON.
    pub body: Value,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub total: u64,
    pub by_model: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct Ledger {
    stats: Stats,
    requests: VecDeque<RecordedRequest>,
    fault_uses: HashMap<String, u32>,
}

/// Shared server state. All bookkeeping sits behind one mutex held only for a few map
/// operations, so a request's record, its stats and its `times` decision stay consistent.
#[derive(Debug, Default)]
pub struct MockState {
    ledger: Mutex<Ledger>,
    next_id: AtomicU64,
}

impl MockState {
    pub fn new() -> Self {
        Self::default()
    }

    // A panic while holding the lock cannot leave the ledger half-updated in a way that matters
    // to a test double, so a poisoned lock is simply taken over.
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts and remembers a chat-completion request.
    pub fn record(&self, request: RecordedRequest) {
        let mut ledger = self.ledger();
        ledger.stats.total = ledger.stats.total.saturating_add(1);
        let model = request.model.clone().unwrap_or_default();
        let count = ledger.stats.by_model.entry(model).or_default();
        *count = count.saturating_add(1);
        if ledger.requests.len() >= MAX_RECORDED_REQUESTS {
            ledger.requests.pop_front();
        }
        ledger.requests.push_back(request);
    }

    pub fn stats(&self) -> Stats {
        self.ledger().stats.clone()
    }

    /// The last `limit` recorded requests, oldest first.
    pub fn recent_requests(&self, limit: usize) -> Vec<RecordedRequest> {
        let ledger = self.ledger();
        let skip = ledger.requests.len().saturating_sub(limit);
        ledger.requests.iter().skip(skip).cloned().collect()
    }

    /// Forgets counters, recorded requests and `times` usage. Completion ids keep increasing so
    /// ids stay unique across a reset.
    pub fn reset(&self) {
        *self.ledger() = Ledger::default();
    }

    /// Decides whether a fault limited to `times` uses still fires for `key`, and if so uses one
    /// up. Check and increment happen under one lock, so concurrent requests sharing a key never
    /// get more than `times` faults between them. Without a limit the fault always fires.
    pub fn claim_fault(&self, key: &str, times: Option<u32>) -> bool {
        let Some(times) = times else {
            return true;
        };
        let mut ledger = self.ledger();
        let used = ledger.fault_uses.entry(key.to_owned()).or_default();
        if *used < times {
            *used += 1;
            true
        } else {
            false
        }
    }

    pub fn next_completion_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        format!("chatcmpl-mock-{n}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(model: &str) -> RecordedRequest {
        RecordedRequest {
            model: Some(model.to_owned()),
            headers: BTreeMap::new(),
            body: Value::Null,
        }
    }

    #[test]
    fn times_limits_faults_per_key() {
        let state = MockState::new();
        assert!(state.claim_fault("a", Some(2)));
        assert!(state.claim_fault("a", Some(2)));
        assert!(!state.claim_fault("a", Some(2)));
        assert!(state.claim_fault("b", Some(2)));
        assert!(state.claim_fault("a", None));
        assert!(!state.claim_fault("c", Some(0)));
        state.reset();
        assert!(state.claim_fault("a", Some(2)));
    }

    #[test]
    fn recorded_requests_are_bounded_and_newest_last() {
        let state = MockState::new();
        for i in 0..MAX_RECORDED_REQUESTS + 5 {
            state.record(request(&format!("m{i}")));
        }
        let all = state.recent_requests(usize::MAX);
        assert_eq!(all.len(), MAX_RECORDED_REQUESTS);
        let last_two = state.recent_requests(2);
        let models: Vec<_> = last_two.iter().filter_map(|r| r.model.as_deref()).collect();
        assert_eq!(models, ["m1003", "m1004"]);
        assert_eq!(state.stats().total, (MAX_RECORDED_REQUESTS + 5) as u64);
    }
}
