//! Per-request behaviour knobs: latency, reply length and injected faults.
//!
//! Options arrive from three places, applied in this order so that the more specific source wins:
//! the model id (`mock-fault-<kind>`), `x-mock-<option>` request headers, then `[mock k=v ...]`
//! directives found inside message content. A value that does not parse is dropped and the
//! earlier value stays, so a typo in a test never turns into a different behaviour silently
//! taking effect, and no input can make the server panic.

use std::fmt::Write as _;
use std::ops::Range;

/// Upper bound for every millisecond option. A bounded value keeps deadline arithmetic far from
/// overflow, and nothing a test wants to observe needs more than a day.
pub const MAX_DELAY_MS: u64 = 86_400_000;

/// Upper bound for the completion length, so one request cannot make the server allocate without
/// limit.
pub const MAX_COMPLETION_WORDS: usize = 100_000;

/// Longest accepted `key` value; keys live in memory until `/mock/reset`.
const MAX_KEY_CHARS: usize = 200;

const MODEL_FAULT_PREFIX: &str = "mock-fault-";
const HEADER_PREFIX: &str = "x-mock-";
const DIRECTIVE_OPEN: &[u8] = b"[mock";

/// A failure the server can be told to produce instead of (or in the middle of) a normal answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// 429 with `Retry-After`.
    RateLimited,
    /// 500 server error.
    Internal,
    /// 502 server error.
    BadGateway,
    /// 503 server error.
    Unavailable,
    /// Answer only after `hang_ms`, long enough for a client timeout to fire first.
    Hang,
    /// Abort the response body part-way through.
    Cut,
    /// 200 with a body that is not valid JSON.
    Malformed,
    /// 400 `context_length_exceeded`.
    ContextLength,
}

impl Fault {
    /// Parses a fault name. `Some(None)` is an explicit "no fault", which lets a header or a
    /// directive switch off a fault chosen by the model id.
    fn parse(value: &str) -> Option<Option<Self>> {
        let fault = match value.to_ascii_lowercase().as_str() {
            "none" | "off" => return Some(None),
            "429" => Self::RateLimited,
            "500" => Self::Internal,
            "502" => Self::BadGateway,
            "503" => Self::Unavailable,
            "hang" => Self::Hang,
            "cut" => Self::Cut,
            "malformed" => Self::Malformed,
            "context" => Self::ContextLength,
            _ => return None,
        };
        Some(Some(fault))
    }

    /// The name accepted by [`MockOptions::set`] for this fault.
    pub fn name(self) -> &'static str {
        match self {
            Self::RateLimited => "429",
            Self::Internal => "500",
            Self::BadGateway => "502",
            Self::Unavailable => "503",
            Self::Hang => "hang",
            Self::Cut => "cut",
            Self::Malformed => "malformed",
            Self::ContextLength => "context",
        }
    }
}

/// The merged options of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MockOptions {
    pub fault: Option<Fault>,
    /// Fire the fault only for the first `times` requests sharing the same fault key.
    pub times: Option<u32>,
    /// Names the `times` counter; see [`MockOptions::fault_key`].
    pub key: Option<String>,
    pub retry_after_s: u64,
    pub hang_ms: u64,
    pub cut_after: usize,
    /// Target completion length in words (the summary prefix included).
    pub tokens: usize,
    pub ttft_ms: u64,
    pub token_ms: u64,
    pub latency_ms: u64,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            fault: None,
            times: None,
            key: None,
            retry_after_s: 1,
            hang_ms: 600_000,
            cut_after: 3,
            tokens: 12,
            ttft_ms: 0,
            token_ms: 0,
            latency_ms: 0,
        }
    }
}

impl MockOptions {
    /// Merges the three option sources in precedence order.
    pub fn from_sources<'a>(
        model: &str,
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        contents: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let mut options = Self::default();
        options.apply_model(model);
        for (name, value) in headers {
            if let Some(option) = header_option_name(name) {
                options.set(option, value);
            }
        }
        for text in contents {
            options.apply_directives(text);
        }
        options
    }

    /// Applies one `name=value` pair. Names are case-insensitive and `-` equals `_`.
    /// Returns whether the pair was understood and taken.
    pub fn set(&mut self, name: &str, value: &str) -> bool {
        let value = value.trim();
        match normalize_name(name).as_str() {
            "fault" => Fault::parse(value)
                .map(|fault| self.fault = fault)
                .is_some(),
            "times" => value.parse().map(|n| self.times = Some(n)).is_ok(),
            "key" => {
                let valid = !value.is_empty() && value.chars().count() <= MAX_KEY_CHARS;
                if valid {
                    self.key = Some(value.to_owned());
                }
                valid
            }
            "retry_after" => parse_bounded(value, MAX_DELAY_MS / 1000)
                .map(|s| self.retry_after_s = s)
                .is_some(),
            "hang_ms" => parse_ms(value).map(|ms| self.hang_ms = ms).is_some(),
            "ttft_ms" => parse_ms(value).map(|ms| self.ttft_ms = ms).is_some(),
            "token_ms" => parse_ms(value).map(|ms| self.token_ms = ms).is_some(),
            "latency_ms" => parse_ms(value).map(|ms| self.latency_ms = ms).is_some(),
            "cut_after" => parse_words(value).map(|n| self.cut_after = n).is_some(),
            "tokens" => parse_words(value).map(|n| self.tokens = n).is_some(),
            _ => false,
        }
    }

    /// `mock-fault-<kind>` model ids select a fault so that a client which can only choose the
    /// model (for example through a model registry) can still trigger one.
    pub fn apply_model(&mut self, model: &str) {
        let Some(prefix) = model.get(..MODEL_FAULT_PREFIX.len()) else {
            return;
        };
        if prefix.eq_ignore_ascii_case(MODEL_FAULT_PREFIX) {
            self.set("fault", &model[MODEL_FAULT_PREFIX.len()..]);
        }
    }

    /// Applies every `[mock ...]` directive found in `text`, left to right.
    pub fn apply_directives(&mut self, text: &str) {
        for range in directive_spans(text) {
            let inner = &text[range.start + DIRECTIVE_OPEN.len()..range.end - 1];
            for pair in inner.split_whitespace() {
                if let Some((name, value)) = pair.split_once('=') {
                    self.set(name, value);
                }
            }
        }
    }

    /// The name of the `times` counter this request draws from: the explicit `key`, or else a
    /// canonical rendering of every other option, so identical option sets share one counter.
    pub fn fault_key(&self) -> String {
        if let Some(key) = &self.key {
            return key.clone();
        }
        let mut rendered = String::new();
        let fault = self.fault.map_or("none", Fault::name);
        let _ = write!(rendered, "fault={fault}");
        if let Some(times) = self.times {
            let _ = write!(rendered, " times={times}");
        }
        let _ = write!(
            rendered,
            " retry_after={} hang_ms={} cut_after={} tokens={} ttft_ms={} token_ms={} latency_ms={}",
            self.retry_after_s,
            self.hang_ms,
            self.cut_after,
            self.tokens,
            self.ttft_ms,
            self.token_ms,
            self.latency_ms
        );
        rendered
    }
}

/// The option named by an `x-mock-<option>` header, if `name` is one.
pub fn header_option_name(name: &str) -> Option<&str> {
    let prefix = name.get(..HEADER_PREFIX.len())?;
    if !prefix.eq_ignore_ascii_case(HEADER_PREFIX) {
        return None;
    }
    let option = &name[HEADER_PREFIX.len()..];
    (!option.is_empty()).then_some(option)
}

/// Returns `text` with every `[mock ...]` directive removed.
pub fn strip_directives(text: &str) -> String {
    let mut kept = String::with_capacity(text.len());
    let mut cursor = 0;
    for range in directive_spans(text) {
        kept.push_str(&text[cursor..range.start]);
        cursor = range.end;
    }
    kept.push_str(&text[cursor..]);
    kept
}

/// Byte ranges of `[mock ...]` directives, each including both brackets. `[mock` must be
/// followed by whitespace or `]`, so ordinary words such as `[mocking]` are left alone; an
/// opening without a closing bracket is plain text.
fn directive_spans(text: &str) -> Vec<Range<usize>> {
    let bytes = text.as_bytes();
    let mut spans = Vec::new();
    let mut from = 0;
    while let Some(offset) = text.get(from..).and_then(|rest| rest.find('[')) {
        let start = from + offset;
        let after_open = start + DIRECTIVE_OPEN.len();
        let opens = bytes
            .get(start..after_open)
            .is_some_and(|b| b.eq_ignore_ascii_case(DIRECTIVE_OPEN))
            && bytes
                .get(after_open)
                .is_some_and(|&b| b == b']' || b.is_ascii_whitespace());
        if !opens {
            from = start + 1;
            continue;
        }
        // `after_open` sits right after ASCII bytes, so it is a char boundary.
        match text[after_open..].find(']') {
            Some(close) => {
                let end = after_open + close + 1;
                spans.push(start..end);
                from = end;
            }
            None => break,
        }
    }
    spans
}

fn normalize_name(name: &str) -> String {
    name.trim().to_ascii_lowercase().replace('-', "_")
}

fn parse_bounded(value: &str, max: u64) -> Option<u64> {
    value.parse::<u64>().ok().filter(|&n| n <= max)
}

fn parse_ms(value: &str) -> Option<u64> {
    parse_bounded(value, MAX_DELAY_MS)
}

fn parse_words(value: &str) -> Option<usize> {
    value
        .parse::<usize>()
        .ok()
        .filter(|&n| n <= MAX_COMPLETION_WORDS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn from_text(text: &str) -> MockOptions {
        MockOptions::from_sources("gpt-4o-mini", [], [text])
    }

    #[test]
    fn defaults_apply_when_nothing_is_given() {
        let options = from_text("plain question");
        assert_eq!(options, MockOptions::default());
        assert_eq!(options.tokens, 12);
        assert_eq!(options.retry_after_s, 1);
        assert_eq!(options.hang_ms, 600_000);
        assert_eq!(options.cut_after, 3);
    }

    #[test]
    fn directive_sets_fault_times_key_and_retry_after() {
        let options = from_text("hi [mock fault=429 times=2 key=t1 retry_after=7] there");
        assert_eq!(options.fault, Some(Fault::RateLimited));
        assert_eq!(options.times, Some(2));
        assert_eq!(options.key.as_deref(), Some("t1"));
        assert_eq!(options.retry_after_s, 7);
        assert_eq!(options.fault_key(), "t1");
    }

    #[test]
    fn directive_sets_latency_options_with_dashes_or_underscores() {
        let options = from_text("[mock tokens=20 token-ms=50 TTFT_MS=100 latency_ms=5]");
        assert_eq!(options.tokens, 20);
        assert_eq!(options.token_ms, 50);
        assert_eq!(options.ttft_ms, 100);
        assert_eq!(options.latency_ms, 5);
    }

    #[test]
    fn every_fault_kind_parses_from_the_model_id() {
        let cases = [
            ("mock-fault-429", Fault::RateLimited),
            ("mock-fault-500", Fault::Internal),
            ("mock-fault-502", Fault::BadGateway),
            ("mock-fault-503", Fault::Unavailable),
            ("mock-fault-hang", Fault::Hang),
            ("mock-fault-cut", Fault::Cut),
            ("mock-fault-malformed", Fault::Malformed),
            ("mock-fault-context", Fault::ContextLength),
        ];
        for (model, fault) in cases {
            let options = MockOptions::from_sources(model, [], []);
            assert_eq!(options.fault, Some(fault), "{model}");
        }
        assert_eq!(MockOptions::from_sources("gpt-4o", [], []).fault, None);
        assert_eq!(
            MockOptions::from_sources("mock-fault-teapot", [], []).fault,
            None
        );
    }

    #[test]
    fn later_sources_override_earlier_ones() {
        let headers = [("x-mock-fault", "500"), ("x-mock-tokens", "30")];
        let options =
            MockOptions::from_sources("mock-fault-429", headers, ["[mock fault=hang]", "x"]);
        assert_eq!(options.fault, Some(Fault::Hang));
        assert_eq!(options.tokens, 30);

        let options = MockOptions::from_sources("mock-fault-429", [("x-mock-fault", "none")], []);
        assert_eq!(options.fault, None);
    }

    #[test]
    fn later_directives_override_earlier_messages() {
        let options =
            MockOptions::from_sources("m", [], ["[mock tokens=5 ttft_ms=9]", "[mock tokens=6]"]);
        assert_eq!(options.tokens, 6);
        assert_eq!(options.ttft_ms, 9);
    }

    #[test]
    fn malformed_values_keep_the_earlier_value() {
        let options = MockOptions::from_sources(
            "mock-fault-503",
            [("x-mock-tokens", "40")],
            ["[mock fault=teapot tokens=-3 ttft_ms=abc times=1.5 hang_ms=99999999999999 key=]"],
        );
        assert_eq!(options.fault, Some(Fault::Unavailable));
        assert_eq!(options.tokens, 40);
        assert_eq!(options.ttft_ms, 0);
        assert_eq!(options.times, None);
        assert_eq!(options.hang_ms, 600_000);
        assert_eq!(options.key, None);
    }

    #[test]
    fn unknown_options_and_headers_are_ignored() {
        let headers = [
            ("x-mock-colour", "blue"),
            ("x-other", "1"),
            ("x-mock-", "1"),
        ];
        let options = MockOptions::from_sources("m", headers, ["[mock colour=red nonsense]"]);
        assert_eq!(options, MockOptions::default());
    }

    #[test]
    fn words_that_merely_start_like_a_directive_are_not_directives() {
        assert_eq!(from_text("[mocking tokens=3]").tokens, 12);
        assert_eq!(from_text("[mock tokens=3").tokens, 12);
        assert_eq!(from_text("[MOCK tokens=3]").tokens, 3);
        assert_eq!(from_text("[mock]").tokens, 12);
    }

    #[test]
    fn strip_directives_removes_only_directives() {
        assert_eq!(
            strip_directives("a [mock tokens=3] b [mocking] [mock]c"),
            "a  b [mocking] c"
        );
        assert_eq!(strip_directives("é[mock x=ü]ß"), "éß");
        assert_eq!(
            strip_directives("open [mock tokens=3"),
            "open [mock tokens=3"
        );
    }

    #[test]
    fn default_fault_key_differs_by_options_and_is_stable() {
        let a = from_text("[mock fault=429 times=2]");
        let b = from_text("x [mock times=2 fault=429]");
        let c = from_text("[mock fault=429 times=3]");
        assert_eq!(a.fault_key(), b.fault_key());
        assert_ne!(a.fault_key(), c.fault_key());
    }

    #[test]
    fn header_names_need_the_full_prefix() {
        assert_eq!(header_option_name("x-mock-ttft-ms"), Some("ttft-ms"));
        assert_eq!(header_option_name("X-Mock-Fault"), Some("Fault"));
        assert_eq!(header_option_name("x-mock"), None);
        assert_eq!(header_option_name("x-mock-"), None);
        assert_eq!(header_option_name("authorization"), None);
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in any::<String>(), model in any::<String>()) {
            let options = MockOptions::from_sources(&model, [("x-mock-fault", text.as_str())], [text.as_str()]);
            let _ = options.fault_key();
            let stripped = strip_directives(&text);
            prop_assert!(stripped.len() <= text.len());
        }

        #[test]
        fn directive_like_text_never_panics(
            text in r"(\[mock|\[MOCK|\]|[a-z_-]{1,9}=[0-9a-zé-]{0,25}| |ü|\[){0,30}"
        ) {
            let options = from_text(&text);
            prop_assert!(options.tokens <= MAX_COMPLETION_WORDS);
            prop_assert!(options.hang_ms <= MAX_DELAY_MS);
            prop_assert!(strip_directives(&text).len() <= text.len());
        }
    }
}
