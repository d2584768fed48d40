//! When to try an upstream call again, as pure functions of the clock, the deadline and a random
//! sample, so the arithmetic is tested without sleeping or a network.
//!
//! Backoff uses "full jitter" (AWS Architecture Blog, "Exponential Backoff And Jitter"): the
//! delay before retry `n` is uniform in `[0, min(cap, base * 2^(n-1))]`, which spreads the
//! retries of many Lambda instances hitting the same rate limit instead of synchronising them.

use std::time::{Duration, Instant};

use http::HeaderMap;

/// Retry bounds of one logical LLM call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts on the requested model, the first one included (the fallback is extra).
    pub max_attempts: u32,
    /// Backoff ceiling before the first retry; doubles for each later one.
    pub base_delay: Duration,
    /// Largest backoff ceiling.
    pub max_delay: Duration,
    /// A `Retry-After` longer than this is not waited for: the caller's client is better placed
    /// to wait than a billed Lambda invocation.
    pub max_retry_after: Duration,
    /// Left free before the deadline so the caller can still turn the outcome into a response.
    pub deadline_margin: Duration,
    /// An attempt with less time than this cannot produce an answer and is not started.
    pub min_attempt_time: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(10),
            deadline_margin: Duration::from_millis(200),
            min_attempt_time: Duration::from_millis(100),
        }
    }
}

/// What to do after a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Sleep this long, then try the same model again.
    RetryAfter(Duration),
    GiveUp(GiveUpReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpReason {
    AttemptsExhausted,
    RetryAfterTooLong,
    /// The wait plus a useful attempt would not fit before the deadline.
    DeadlineTooClose,
}

impl GiveUpReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AttemptsExhausted => "attempts_exhausted",
            Self::RetryAfterTooLong => "retry_after_too_long",
            Self::DeadlineTooClose => "deadline_too_close",
        }
    }
}

impl RetryPolicy {
    /// Upper bound of the backoff before retry number `retry` (1 for the first retry).
    pub fn backoff_ceiling(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.base_delay
            .saturating_mul(1u32 << doublings)
            .min(self.max_delay)
    }

    /// Full jitter: `unit` (a sample of `[0, 1]`, clamped) scales the ceiling.
    pub fn full_jitter(&self, retry: u32, unit: f64) -> Duration {
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.backoff_ceiling(retry).mul_f64(unit)
    }

    /// The latest instant at which an attempt may still start, if there is a deadline.
    fn latest_start(&self, deadline: Instant) -> Option<Instant> {
        deadline
            .checked_sub(self.deadline_margin)?
            .checked_sub(self.min_attempt_time)
    }

    /// How long an attempt starting at `now` may run: the per-call timeout, shortened to end
    /// `deadline_margin` before the deadline. `None` when the attempt should not start at all.
    pub fn attempt_budget(
        &self,
        per_call: Duration,
        now: Instant,
        deadline: Option<Instant>,
    ) -> Option<Duration> {
        let Some(deadline) = deadline else {
            return Some(per_call);
        };
        if now > self.latest_start(deadline)? {
            return None;
        }
        let usable = deadline
            .checked_sub(self.deadline_margin)?
            .saturating_duration_since(now);
        Some(usable.min(per_call))
    }

    /// The decision after attempt number `attempt` (1-based) failed transiently at `now`.
    /// The delay is the jittered backoff, or the upstream `retry_after` when that is longer.
    pub fn after_failure(
        &self,
        attempt: u32,
        retry_after: Option<Duration>,
        unit: f64,
        now: Instant,
        deadline: Option<Instant>,
    ) -> RetryDecision {
        if attempt >= self.max_attempts {
            return RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted);
        }
        if retry_after.is_some_and(|wait| wait > self.max_retry_after) {
            return RetryDecision::GiveUp(GiveUpReason::RetryAfterTooLong);
        }
        let delay = self
            .full_jitter(attempt, unit)
            .max(retry_after.unwrap_or_default());
        if let Some(deadline) = deadline {
            let fits = now
                .checked_add(delay)
                .zip(self.latest_start(deadline))
                .is_some_and(|(start, latest)| start <= latest);
            if !fits {
                return RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose);
            }
        }
        RetryDecision::RetryAfter(delay)
    }
}

/// The wait an upstream asked for: OpenAI's `retry-after-ms` (milliseconds) when present, else
/// `Retry-After` in seconds (integer or decimal). The HTTP-date form is not used by model
/// providers and counts as absent, as do negative or unparsable values.
pub fn retry_after_from_headers(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 0.0)
    };
    // A bound keeps `Duration::from_secs_f64` far from its overflow panic.
    const MAX_SECS: f64 = 86_400.0;
    number("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| number("retry-after"))
        .map(|secs| Duration::from_secs_f64(secs.min(MAX_SECS)))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_ceiling_doubles_from_base_up_to_the_cap() {
        let p = RetryPolicy::default();
        assert_eq!(p.backoff_ceiling(1), 200 * MS);
        assert_eq!(p.backoff_ceiling(2), 400 * MS);
        assert_eq!(p.backoff_ceiling(3), 800 * MS);
        assert_eq!(p.backoff_ceiling(4), 1600 * MS);
        assert_eq!(p.backoff_ceiling(5), 2000 * MS);
        assert_eq!(p.backoff_ceiling(u32::MAX), 2000 * MS);
    }

    #[test]
    fn full_jitter_spans_zero_to_the_ceiling() {
        let p = RetryPolicy::default();
        assert_eq!(p.full_jitter(2, 0.0), Duration::ZERO);
        assert_eq!(p.full_jitter(2, 1.0), 400 * MS);
        assert_eq!(p.full_jitter(2, 0.5), 200 * MS);
        assert_eq!(p.full_jitter(2, f64::NAN), Duration::ZERO);
        assert_eq!(p.full_jitter(2, 7.0), 400 * MS);
    }

    #[test]
    fn gives_up_after_the_last_attempt() {
        let p = RetryPolicy::default();
        let now = Instant::now();
        assert!(matches!(
            p.after_failure(2, None, 0.5, now, None),
            RetryDecision::RetryAfter(_)
        ));
        assert_eq!(
            p.after_failure(3, None, 0.5, now, None),
            RetryDecision::GiveUp(GiveUpReason::AttemptsExhausted)
        );
    }

    #[test]
    fn retry_after_is_honoured_as_a_lower_bound() {
        let p = RetryPolicy::default();
        let now = Instant::now();
        assert_eq!(
            p.after_failure(1, Some(Duration::from_secs(1)), 1.0, now, None),
            RetryDecision::RetryAfter(Duration::from_secs(1))
        );
        // A zero Retry-After does not turn into a hot loop: the jittered backoff still applies.
        assert_eq!(
            p.after_failure(1, Some(Duration::ZERO), 1.0, now, None),
            RetryDecision::RetryAfter(200 * MS)
        );
        assert_eq!(
            p.after_failure(1, Some(Duration::from_secs(11)), 0.0, now, None),
            RetryDecision::GiveUp(GiveUpReason::RetryAfterTooLong)
        );
    }

    #[test]
    fn never_sleeps_past_the_deadline() {
        let p = RetryPolicy::default();
        let now = Instant::now();
        let deadline = Some(now + 500 * MS);
        assert_eq!(
            p.after_failure(1, Some(Duration::from_secs(5)), 0.0, now, deadline),
            RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose)
        );
        // 150 ms of sleep + 100 ms minimum attempt + 200 ms margin = 450 ms: fits.
        assert_eq!(
            p.after_failure(1, Some(150 * MS), 0.0, now, deadline),
            RetryDecision::RetryAfter(150 * MS)
        );
        assert_eq!(
            p.after_failure(1, Some(250 * MS), 0.0, now, deadline),
            RetryDecision::GiveUp(GiveUpReason::DeadlineTooClose)
        );
    }

    #[test]
    fn attempt_budget_is_clamped_to_the_deadline_minus_the_margin() {
        let p = RetryPolicy::default();
        let now = Instant::now();
        let per_call = Duration::from_secs(10);
        assert_eq!(p.attempt_budget(per_call, now, None), Some(per_call));
        assert_eq!(
            p.attempt_budget(per_call, now, Some(now + Duration::from_secs(60))),
            Some(per_call)
        );
        assert_eq!(
            p.attempt_budget(per_call, now, Some(now + 1000 * MS)),
            Some(800 * MS)
        );
        assert_eq!(p.attempt_budget(per_call, now, Some(now + 250 * MS)), None);
        assert_eq!(p.attempt_budget(per_call, now + 2 * MS, Some(now)), None);
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn reads_retry_after_seconds_and_prefers_milliseconds() {
        assert_eq!(
            retry_after_from_headers(&headers(&[("retry-after", "7")])),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after_from_headers(&headers(&[("retry-after", "1.5")])),
            Some(1500 * MS)
        );
        assert_eq!(
            retry_after_from_headers(&headers(&[("retry-after", "7"), ("retry-after-ms", "250")])),
            Some(250 * MS)
        );
        for bad in ["-1", "soon", "Wed, 21 Oct 2015 07:28:00 GMT", "NaN", "inf"] {
            let mut map = HeaderMap::new();
            map.insert("retry-after", HeaderValue::from_str(bad).unwrap());
            assert_eq!(retry_after_from_headers(&map), None, "{bad}");
        }
        assert_eq!(retry_after_from_headers(&HeaderMap::new()), None);
        assert_eq!(
            retry_after_from_headers(&headers(&[("retry-after", "1e300")])),
            Some(Duration::from_secs(86_400))
        );
    }

    proptest! {
        #[test]
        fn jittered_delay_stays_within_zero_and_the_cap(retry in 0u32..100, unit in any::<f64>()) {
            let p = RetryPolicy::default();
            let delay = p.full_jitter(retry, unit);
            prop_assert!(delay <= p.backoff_ceiling(retry));
            prop_assert!(delay <= p.max_delay);
        }

        #[test]
        fn a_granted_retry_always_leaves_room_before_the_deadline(
            attempt in 1u32..3,
            retry_after_ms in proptest::option::of(0u64..20_000),
            unit in 0.0f64..=1.0,
            deadline_ms in 0u64..5_000,
        ) {
            let p = RetryPolicy::default();
            let now = Instant::now();
            let deadline = now + Duration::from_millis(deadline_ms);
            let decision = p.after_failure(
                attempt,
                retry_after_ms.map(Duration::from_millis),
                unit,
                now,
                Some(deadline),
            );
            if let RetryDecision::RetryAfter(delay) = decision {
                prop_assert!(now + delay + p.min_attempt_time + p.deadline_margin <= deadline);
                prop_assert!(p.attempt_budget(Duration::from_secs(10), now + delay, Some(deadline)).is_some());
                if let Some(ms) = retry_after_ms {
                    prop_assert!(delay >= Duration::from_millis(ms));
                }
            }
        }
    }
}
