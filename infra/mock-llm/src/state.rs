//! What the mock remembers between requests: counters, recent request bodies and `times` usage.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

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
    /// Chat-completion requests being answered right now (their response body not yet sent).
    pub in_flight: u64,
    /// The most chat-completion requests ever in flight at once since start or the last reset:
    /// what a client's concurrency bound is checked against.
    pub peak_in_flight: u64,
    /// [`Stats::peak_in_flight`] among the requests that named a `key`, by key, so a test can
    /// check its own concurrency while other tests use the same server.
    pub peak_in_flight_by_key: BTreeMap<String, u64>,
    /// Streamed answers whose client went away before the last event: the body was dropped
    /// before the server finished or cut it.
    pub streams_cancelled: u64,
    /// [`Stats::streams_cancelled`] of the requests that named a `key`, by key, so a test can
    /// find its own cancellation among those of tests running at the same time.
    pub streams_cancelled_by_key: BTreeMap<String, u64>,
}

#[derive(Debug, Default)]
struct Ledger {
    stats: Stats,
    requests: VecDeque<RecordedRequest>,
    fault_uses: HashMap<String, u32>,
    /// Requests in flight now, by `key` (entries at zero are removed).
    in_flight_by_key: HashMap<String, u64>,
}

/// Shared server state. All bookkeeping sits behind one mutex held only for a few map
/// operations, so a request's record, its stats and its `times` decision stay consistent.
#[derive(Debug, Default)]
pub struct MockState {
    ledger: Mutex<Ledger>,
    next_id: AtomicU64,
    // Outside the ledger: they change twice per request and need no consistency with it.
    in_flight: AtomicU64,
    peak_in_flight: AtomicU64,
}

/// One chat-completion request counted as in flight until this is dropped (see
/// [`MockState::enter`]).
#[derive(Debug)]
pub struct InFlight {
    state: Arc<MockState>,
    key: Option<String>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::SeqCst);
        if let Some(key) = &self.key {
            let mut ledger = self.state.ledger();
            if let Some(count) = ledger.in_flight_by_key.get_mut(key) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    ledger.in_flight_by_key.remove(key);
                }
            }
        }
    }
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
        let mut stats = self.ledger().stats.clone();
        stats.in_flight = self.in_flight.load(Ordering::SeqCst);
        stats.peak_in_flight = self.peak_in_flight.load(Ordering::SeqCst);
        stats
    }

    /// Counts a request as in flight until the returned guard is dropped, raising the peak
    /// when it is a new maximum; under `key` too when the request named one.
    pub fn enter(self: &Arc<Self>, key: Option<&str>) -> InFlight {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        if let Some(key) = key {
            let mut ledger = self.ledger();
            let count = ledger.in_flight_by_key.entry(key.to_owned()).or_default();
            *count = count.saturating_add(1);
            let now = *count;
            let peak = ledger
                .stats
                .peak_in_flight_by_key
                .entry(key.to_owned())
                .or_default();
            *peak = (*peak).max(now);
        }
        InFlight {
            state: Arc::clone(self),
            key: key.map(str::to_owned),
        }
    }

    /// Counts a streamed answer whose client went away before its end, under `key` too when
    /// the request named one.
    pub fn record_cancelled_stream(&self, key: Option<&str>) {
        let mut ledger = self.ledger();
        ledger.stats.streams_cancelled = ledger.stats.streams_cancelled.saturating_add(1);
        if let Some(key) = key {
            let count = ledger
                .stats
                .streams_cancelled_by_key
                .entry(key.to_owned())
                .or_default();
            *count = count.saturating_add(1);
        }
    }

    /// The last `limit` recorded requests, oldest first.
    pub fn recent_requests(&self, limit: usize) -> Vec<RecordedRequest> {
        let ledger = self.ledger();
        let skip = ledger.requests.len().saturating_sub(limit);
        ledger.requests.iter().skip(skip).cloned().collect()
    }

    /// Forgets counters, recorded requests and `times` usage. Completion ids keep increasing so
    /// ids stay unique across a reset. The in-flight peak restarts from the requests still in
    /// flight, which keep counting.
    pub fn reset(&self) {
        let mut ledger = self.ledger();
        let in_flight_by_key = std::mem::take(&mut ledger.in_flight_by_key);
        *ledger = Ledger::default();
        for (key, count) in &in_flight_by_key {
            ledger
                .stats
                .peak_in_flight_by_key
                .insert(key.clone(), *count);
        }
        ledger.in_flight_by_key = in_flight_by_key;
        self.peak_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
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
    fn in_flight_counts_live_guards_and_peak_keeps_the_maximum() {
        let state = Arc::new(MockState::new());
        let a = state.enter(None);
        let b = state.enter(None);
        let c = state.enter(None);
        assert_eq!(
            (state.stats().in_flight, state.stats().peak_in_flight),
            (3, 3)
        );
        drop(b);
        drop(a);
        assert_eq!(
            (state.stats().in_flight, state.stats().peak_in_flight),
            (1, 3)
        );
        let d = state.enter(None);
        assert_eq!(
            (state.stats().in_flight, state.stats().peak_in_flight),
            (2, 3)
        );
        state.reset();
        assert_eq!(
            (state.stats().in_flight, state.stats().peak_in_flight),
            (2, 2)
        );
        drop(c);
        drop(d);
        assert_eq!(
            (state.stats().in_flight, state.stats().peak_in_flight),
            (0, 2)
        );
    }

    #[test]
    fn peak_in_flight_by_key_counts_only_that_keys_requests() {
        let state = Arc::new(MockState::new());
        let mine: Vec<InFlight> = (0..3).map(|_| state.enter(Some("mine"))).collect();
        let others: Vec<InFlight> = (0..4).map(|_| state.enter(Some("other"))).collect();
        let anonymous = state.enter(None);
        let stats = state.stats();
        assert_eq!(stats.peak_in_flight, 8);
        assert_eq!(
            stats.peak_in_flight_by_key,
            BTreeMap::from([("mine".to_owned(), 3), ("other".to_owned(), 4)])
        );
        drop(mine);
        let again = state.enter(Some("mine"));
        assert_eq!(
            state.stats().peak_in_flight_by_key["mine"],
            3,
            "a peak is kept"
        );
        state.reset();
        assert_eq!(
            state.stats().peak_in_flight_by_key,
            BTreeMap::from([("mine".to_owned(), 1), ("other".to_owned(), 4)]),
            "after a reset the peaks restart from what is still in flight"
        );
        drop((others, anonymous, again));
        let _next = state.enter(Some("other"));
        assert_eq!(state.stats().peak_in_flight_by_key["other"], 4);
        assert_eq!(state.stats().in_flight, 1);
    }

    #[test]
    fn cancelled_streams_are_counted_in_all_and_by_key_until_reset() {
        let state = MockState::new();
        state.record_cancelled_stream(Some("k1"));
        state.record_cancelled_stream(None);
        state.record_cancelled_stream(Some("k1"));
        state.record_cancelled_stream(Some("k2"));
        let stats = state.stats();
        assert_eq!(stats.streams_cancelled, 4);
        assert_eq!(
            stats.streams_cancelled_by_key,
            BTreeMap::from([("k1".to_owned(), 2), ("k2".to_owned(), 1)])
        );
        state.reset();
        let stats = state.stats();
        assert_eq!(stats.streams_cancelled, 0);
        assert!(stats.streams_cancelled_by_key.is_empty());
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
